"""The analytics example (examples/analytics.py), a process_batch kernel with exactly-once effects in
PostgreSQL: each event stored once and every per-minute count equal to the events stored, through
redeliveries, SIGKILLs, a database outage and malformed events in the middle of a batch."""

import json
import random
import re
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import prometheus_client
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from devtools.broker import free_port
from devtools.tls_proxy import TlsProxy
from examples import analytics
from tests.fixtures import http_get, wait_committed, wait_until
from tests.kit import call_batch, make_message

pytestmark = pytest.mark.both_brokers

MALFORMED = [  # (label, value, what the dead-letter reason says)
    ("not JSON", b'{"type": "click", ', "not JSON (Expecting"),
    ("no type", b'{"user": "u-1", "ts": 1}', 'field "type" must be a non-empty string'),
    ("bad time", b'{"type": "click", "user": "u-1", "ts": "yesterday"}', 'field "ts" must be an ISO-8601 time'),
    ("NUL", b'{"type": "click\\u0000", "user": "u-1", "ts": 1}', "holds a NUL character"),
    ("lone surrogate", b'{"type": "click", "user": "\\ud800", "ts": 1}', "not valid Unicode text (a lone surrogate)"),
    # Valid JSON that only PostgreSQL refuses (a lone surrogate in jsonb): found by storing one at a time.
    ("refused by PostgreSQL", b'{"type": "click", "user": "u-1", "ts": 1, "note": "\\ud800"}', "PostgreSQL refused it"),
]


def event(number: int, kind: str | None = None) -> bytes:
    """An event: a type of three, a user of seven, a time spread over four minutes."""
    minute, second = divmod(number % 240, 60)
    return json.dumps({"type": kind or ("click", "view", "buy")[number % 3], "user": f"u-{number % 7}",
                       "ts": f"2026-11-27T10:{minute:02d}:{second:02d}Z", "n": number}).encode()


class Warehouse(NamedTuple):
    connection: psycopg.Connection
    url: str
    events: str
    rollups: str

    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.url, "ANALYTICS_EVENTS_TABLE": self.events, "ANALYTICS_ROLLUPS_TABLE": self.rollups}

    def stored(self) -> Counter:
        """How many times each event number is in the events table."""
        return Counter(row[0] for row in self.query("SELECT (event->>'n')::int FROM {events}"))

    def check_rollups(self) -> int:
        """Every rollup equals the count of its events, and no events lack one; the number of rollups."""
        rollups = dict(((t, m), n) for t, m, n in self.query("SELECT type, minute, events FROM {rollups}"))
        counted = dict(((t, m), n) for t, m, n in self.query(
            "SELECT type, date_trunc('minute', ts), count(*) FROM {events} GROUP BY 1, 2"))
        assert rollups == counted, "a rollup differs from the events it counts"
        return len(rollups)

    def query(self, text: str) -> list[tuple]:
        statement = sql.SQL(text).format(events=sql.Identifier(self.events), rollups=sql.Identifier(self.rollups))
        try:
            return self.connection.execute(statement).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


@pytest.fixture
def warehouse(monkeypatch, postgres):
    connection, url = postgres
    tables = Warehouse(connection, url, *(f"{kind}_{uuid.uuid4().hex[:8]}" for kind in ("events", "rollups")))
    for name, value in tables.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(analytics, "shared", None)
    yield tables
    if analytics.shared is not None:
        analytics.shared.pool.close()
    for table in (tables.events, tables.rollups):
        connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


@pytest.mark.parametrize("label, value, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_event_is_dead_lettered_after_those_before_it_are_stored(warehouse, label, value, reason):
    messages = [make_message(event(0), offset=0), make_message(event(1), offset=1),
                make_message(value, key=label, offset=2), make_message(event(3), offset=3)]
    outcome = call_batch(messages, analytics.process_batch)
    assert (outcome.result, outcome.done, outcome.dead_letter[0]) == (None, 2, messages[2])
    assert reason in outcome.dead_letter[1]
    assert warehouse.stored() == Counter({0: 1, 1: 1}), "stored before the dead letter, not after"


def counted(name: str, topic: str) -> float:
    """The example's own metric, as /metrics serves it (prometheus_client's default registry)."""
    return prometheus_client.REGISTRY.get_sample_value(f"{name}_total", {"topic": topic}) or 0.0


def test_a_batch_delivered_again_changes_neither_the_events_nor_the_rollups(warehouse):
    messages = [make_message(event(n), partition=1, offset=n) for n in range(30)]
    before = [counted(name, messages[0].topic) for name in ("analytics_events_stored", "analytics_redeliveries_skipped")]
    assert call_batch(messages[:20], analytics.process_batch).result is True
    assert call_batch(messages, analytics.process_batch).result is True  # 0-19 again, after a crash say
    assert warehouse.stored() == Counter(range(30))
    assert warehouse.check_rollups() > 1
    assert [counted(name, messages[0].topic) - count for name, count in zip(
        ("analytics_events_stored", "analytics_redeliveries_skipped"), before, strict=True)] == [30, 20]


def test_events_at_offsets_used_before_are_stored_and_counted_when_the_topic_starts_over(warehouse):
    """The topic created again, or the local broker started over: offsets begin at 0 again, and the new
    events there are new (their message_id differs), not redeliveries to skip."""
    before = [make_message(event(n), partition=0, offset=n, timestamp_ms=1_000 + n) for n in range(10)]
    after = [make_message(event(n), partition=0, offset=n - 10, timestamp_ms=9_000 + n) for n in range(10, 20)]
    assert call_batch(before, analytics.process_batch).result is True
    assert call_batch(after, analytics.process_batch).result is True
    assert call_batch(after, analytics.process_batch).result is True  # and delivered again: no change
    assert warehouse.stored() == Counter(range(20))
    warehouse.check_rollups()


def test_a_dead_letter_in_the_middle_of_a_batch_end_to_end(cluster, kernels, warehouse):
    topic, dlt, group = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1), "analytics-dlt"
    produced = cluster.produce(topic, [(0, b"bad" if n == 5 else None, b"{oops" if n == 5 else event(n))
                                       for n in range(11)])
    port = free_port()
    env = kernels.env(topic, group, KERNEL_DEAD_LETTER_TOPIC=dlt, LOG_LEVEL="DEBUG", KERNEL_HTTP_PORT=port,
                      **warehouse.env())
    kernel = kernels.start(env, module="examples.analytics")
    wait_committed(cluster, kernel, group, topic, produced, 1)
    metrics = http_get(port, "/metrics")[1]
    assert f'analytics_events_stored_total{{topic="{topic}"}} 10.0' in metrics, "the example's metric, beside the kernel's"
    assert f'kernel_messages_dead_lettered_total{{topic="{topic}"}} 1.0' in metrics
    assert kernel.stop() == 0

    assert warehouse.stored() == Counter(n for n in range(11) if n != 5)
    warehouse.check_rollups()
    [letter] = cluster.read_topic(dlt, 1)
    assert letter.key() == b"bad" and b"not JSON" in dict(letter.headers())["kafka_dlt-exception-message"]
    assert re.search(rf"Stored 5 new event\(s\) of {topic}\[0\]@0\.\.4\n", kernel.log()), "the batch before it"
    assert re.search(rf"Stored 5 new event\(s\) of {topic}\[0\]@6\.\.10\n", kernel.log()), "the next batch after it"


def test_sigkills_while_events_arrive_leave_each_event_stored_once_and_the_rollups_exact(cluster, kernels, warehouse):
    topic, group, total = cluster.create_topic(partitions=3), "analytics-crash", 6000
    producer = cluster.produce_in_background(topic, [(n % 3, None, event(n)) for n in range(total)], 20)
    env = kernels.env(topic, group, KERNEL_CONCURRENCY=3, KERNEL_BATCH_MAX_MESSAGES=200, LOG_LEVEL="DEBUG",
                      KAFKA_SESSION_TIMEOUT_MS=cluster.shortest_session_timeout_ms, **warehouse.env())
    rng, runs = random.Random(6000), []

    def redelivered():
        return sum(int(found) for run in runs for found in re.findall(r"; (\d+) were there already", run.log()))

    for _ in range(3):
        runs.append(kernels.start(env, module="examples.analytics"))
        runs[-1].wait_for_log("Partitions assigned", 30)
        time.sleep(rng.uniform(0.5, 2))
        runs[-1].process.send_signal(signal.SIGKILL)
        runs[-1].wait()
    produced = producer.result()
    runs.append(kernels.start(env, module="examples.analytics"))
    runs[-1].wait_for_log("Partitions assigned", 30)
    wait_committed(cluster, runs[-1], group, topic, produced, 3, timeout_s=120)
    assert runs[-1].stop() == 0
    # A kill lands between a batch's transaction and its offset commit only by chance (the window is up to
    # COMMIT_INTERVAL_S): a redelivery is made sure of by committing each partition 100 events back, as a
    # member that died after storing them would have left it, and running the kernel once more.
    cluster.commit(group, topic, {p: max(0, end - 100) for p, end in produced.items()})
    runs.append(kernels.start(env, module="examples.analytics"))
    wait_committed(cluster, runs[-1], group, topic, produced, 3, timeout_s=120)
    assert runs[-1].stop() == 0

    assert warehouse.stored() == Counter(range(total)), "an event missing, or stored twice"
    rollups = warehouse.check_rollups()
    assert redelivered() > 0, "no event was delivered twice: the test proved nothing"
    print(f"\nanalytics, 3 x SIGKILL while producing: {total} events stored once each, "
          f"{redelivered()} redelivered and not stored again, {rollups} rollups equal to their events")


def test_a_database_outage_loses_nothing_and_counts_nothing_twice(cluster, kernels, warehouse):
    """PostgreSQL unreachable for a few seconds, through a TCP proxy the test controls in front of the
    server's Unix socket (the server itself is never stopped): the batches are retried, then everything
    is stored once."""
    server = conninfo_to_dict(warehouse.url)  # the tests' server: {"host": its socket directory, ...}
    socket_path = Path(server["host"]) / f".s.PGSQL.{server.get('port') or 5432}"
    proxy = TlsProxy(free_port(), socket_path, None).start()
    try:
        url = f"postgresql://{server['user']}@127.0.0.1:{proxy.listen_port}/{server['dbname']}"
        topic, group, total = cluster.create_topic(partitions=2), "analytics-outage", 2000
        env = kernels.env(topic, group, KERNEL_CONCURRENCY=2, KERNEL_RETRY_INITIAL_MS=200, KERNEL_RETRY_MAX_MS=1000,
                          **{**warehouse.env(), "DATABASE_URL": url})
        kernel = kernels.start(env, module="examples.analytics")
        produced = cluster.produce(topic, [(n % 2, None, event(n)) for n in range(total // 2)])
        wait_until(lambda: len(warehouse.stored()) >= 200, 60, f"the first events stored\n{kernel.log()[-2000:]}")
        proxy.drop_connections(4)
        produced += cluster.produce(topic, [(n % 2, None, event(n)) for n in range(total // 2, total)])
        kernel.wait_for_log("PostgreSQL unavailable", 15)
        wait_committed(cluster, kernel, group, topic, produced, 2, timeout_s=90)
        assert kernel.stop() == 0
    finally:
        proxy.stop()
    assert warehouse.stored() == Counter(range(total))
    warehouse.check_rollups()
