"""The example kernels (examples/), each run end to end as `python -m examples.<name>` through the
real kernel loop against the broker over mutual TLS, checked with an independent client (and
PostgreSQL, and the webhook's own record); plus their handling of malformed input, without a broker."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest
from psycopg import sql

import main
from devtools.broker import free_port
from examples import analytics, memory, notification, transform, triage
from tests.fixtures import MAIN, REPO, copy_repository, http_get, wait_committed, wait_until
from tests.kit import call, call_batch, make_message

BIG = json.dumps({"id": "big", "type": "t", "user_id": "u", "text": "x", "recipient": "r", "pad": "x" * 1_000_000})
MALFORMED = [  # (label, value, what the dead-letter reason says)
    ("invalid JSON", b'{"id": "e-1", ', "not JSON (Expecting"),
    ("wrong shape", b'[{"id": "e-1"}]', "JSON but not an object (an array)"),
    ("binary", bytes(range(128, 256)), "not UTF-8 text (byte 0: 0x80)"),
    ("empty", b"", "the value is empty"),
    ("tombstone", None, "no value (a tombstone)"),
    ("1 MB", BIG.encode(), f"the value is {len(BIG)} bytes, over the"),
]
EXAMPLES = [transform, memory, notification, triage]


def dead_letters(cluster, topic: str) -> dict[str, str]:
    """Dead-lettered message's key -> the reason in its headers."""
    return {record.key().decode(): dict(record.headers())["kafka_dlt-exception-message"].decode()
            for record in cluster.read_topic(topic, 1)}


def produce_malformed(cluster, topic: str) -> Counter:
    return cluster.produce(topic, [(0, label.encode(), value) for label, value, _ in MALFORMED])


# Malformed input, without a broker: every example dead-letters it with a reason, nothing raises.


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda module: module.KERNEL_NAME)
@pytest.mark.parametrize("label, value, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_dead_lettered_with_its_reason(example, label, value, reason):
    outcome = call(make_message(value, key=label), example.process_message)
    assert outcome.result is None and reason in outcome.dead_letter


@pytest.mark.parametrize("example, field", [(transform, "type"), (memory, "text"), (notification, "recipient"),
                                            (triage, "text")])
def test_a_missing_field_is_dead_lettered_by_name(example, field):
    event = {"id": "e-1", "type": "t", "user_id": "u", "text": "hi", "recipient": "r"}
    del event[field]
    outcome = call(make_message(event), example.process_message)
    assert outcome.dead_letter == f'field "{field}" must be a non-empty string, got None'


def test_transform_sends_the_enriched_event_under_the_same_key(monkeypatch):
    monkeypatch.setenv("TRANSFORM_OUTPUT_TOPIC", "enriched")
    message = make_message({"id": "e-1", "type": "signup", "extra": [1]}, key="user-1", partition=3, offset=9,
                           timestamp_ms=1_700_000_000_000)
    outcome = call(message, transform.process_message)
    assert outcome.result is True and len(outcome.sent) == 1
    sent = outcome.sent[0]
    assert (sent.topic, sent.key, sent.headers) == ("enriched", b"user-1", [("content-type", b"application/json")])
    assert sent.json() == {"id": "e-1", "type": "signup", "extra": [1], "enriched_by": "transform-kernel",
                           "source": {"topic": message.topic, "partition": 3, "offset": 9,
                                      "timestamp": "2023-11-14T22:13:20.000+00:00"}}


# transform


def test_transform_forwards_valid_events_and_dead_letters_the_rest(cluster, kernels):
    source, output, dlt = (cluster.create_topic(partitions=p) for p in (3, 2, 1))
    group = f"transform-{uuid.uuid4().hex[:6]}"
    events = [(i % 3, f"user-{i % 9}".encode(), json.dumps({"id": f"e-{i}", "type": "click", "n": i}).encode())
              for i in range(300)]
    produced = cluster.produce(source, events) + produce_malformed(cluster, source)
    produced += cluster.produce(source, [(1, b"no-type", b'{"id": "e-x"}')])
    port = free_port()
    env = kernels.env(source, group, TRANSFORM_OUTPUT_TOPIC=output, KERNEL_DEAD_LETTER_TOPIC=dlt,
                      KERNEL_CONCURRENCY=4, KERNEL_HTTP_PORT=port)
    kernel = kernels.start(env, module="examples.transform")
    wait_committed(cluster, kernel, group, source, produced, 3)
    assert kernel.process.poll() is None, "the kernel stopped"
    metrics = http_get(port, "/metrics")[1]
    assert f'kernel_messages_sent_total{{topic="{output}"}} 300.0' in metrics
    assert f'kernel_messages_sent_total{{topic="{dlt}"}} 7.0' in metrics
    assert f'kernel_messages_dead_lettered_total{{topic="{source}"}} 7.0' in metrics
    assert kernel.stop() == 0

    forwarded = [json.loads(record.value()) for record in cluster.read_topic(output, 2)]
    assert sorted(event["n"] for event in forwarded) == list(range(300)), "each event forwarded once"
    by_key = defaultdict(list)
    for record in cluster.read_topic(output, 2):
        by_key[record.key()].append(json.loads(record.value())["n"])
    assert all(ns == sorted(ns) for ns in by_key.values()), "per key, the output keeps the input's order"
    assert all(event["enriched_by"] == "transform-kernel" and event["source"]["topic"] == source for event in forwarded)

    rejected = dead_letters(cluster, dlt)
    for label, _, reason in MALFORMED:
        assert reason in rejected[label]
    assert rejected["no-type"] == 'field "type" must be a non-empty string, got None'
    assert "Dead-lettered" in kernel.log() and "not JSON" in kernel.log()
    assert "INFO [transform-kernel] Partitions assigned" in kernel.log(), "the name the example hands run_kernel()"


@pytest.mark.both_brokers
def test_transform_never_loses_an_output_when_killed(cluster, kernels):
    """SIGKILL mid-stream, twice: every input committed has its output in the topic (some twice)."""
    source, output = cluster.create_topic(partitions=3), cluster.create_topic(partitions=3)
    group = f"transform-crash-{uuid.uuid4().hex[:6]}"
    total = 6000
    produced = cluster.produce(source, [(i % 3, None, json.dumps({"id": f"e-{i}", "type": "t", "n": i}).encode())
                                        for i in range(total)])
    env = kernels.env(source, group, TRANSFORM_OUTPUT_TOPIC=output, KAFKA_MAX_POLL_RECORDS=200)
    for at_least in (total // 4, total // 2):
        kernel = kernels.start(env, module="examples.transform")
        wait_until(lambda n=at_least: sum(o or 0 for o in cluster.committed(group, source, 3).values()) >= n, 60,
                   f"{at_least} inputs committed")
        kernel.kill()
        committed = cluster.committed(group, source, 3)
        outputs = Counter(json.loads(r.value())["n"] for r in cluster.read_topic(output, 3))
        for partition, offset in committed.items():
            inputs = range(partition, 3 * (offset or 0), 3)  # message n went to partition n % 3, offset n // 3
            assert all(outputs[n] for n in inputs), f"an input below the commit of partition {partition} has no output"
    kernel = kernels.start(env, module="examples.transform")
    wait_committed(cluster, kernel, group, source, produced, 3)
    # The second kernel may have committed everything before it was killed: this one is stopped once it
    # runs (its SIGTERM handler in place), not while Python still imports it (exit -15).
    kernel.wait_for_log("Partitions assigned", 60)
    assert kernel.stop() == 0
    outputs = Counter(json.loads(r.value())["n"] for r in cluster.read_topic(output, 3))
    assert set(outputs) == set(range(total))
    print(f"\ntransform, 2 x SIGKILL: {total} inputs, {sum(outputs.values())} outputs, "
          f"{sum(c - 1 for c in outputs.values())} repeated, 0 lost")


# memory


@pytest.fixture
def database(monkeypatch, postgres):
    """A fresh table in a fresh database of the tests' own PostgreSQL (the `postgres` fixture)."""
    connection, url = postgres
    table = f"memories_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("MEMORY_TABLE", table)
    monkeypatch.setattr(memory, "shared", None)
    yield Table(connection, table, url)
    if memory.shared is not None:
        memory.shared.pool.close()
    connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


class Table(NamedTuple):
    connection: psycopg.Connection
    name: str
    url: str

    def rows(self) -> list[tuple[int, int, str]]:
        query = sql.SQL('SELECT partition, "offset", memory->>\'text\' FROM {}').format(sql.Identifier(self.name))
        try:
            return self.connection.execute(query).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def test_memory_stores_a_message_once_however_often_it_comes(database):
    message = make_message({"user_id": "u-1", "text": "likes tea"}, partition=1, offset=7)
    assert call(message, memory.process_message).result is True
    assert call(message, memory.process_message).result is True
    assert database.rows() == [(1, 7, "likes tea")]


def test_memory_stores_a_new_message_at_an_offset_used_before(database):
    """A topic created again, or the local broker started over: offset 7 again, but another message."""
    first = make_message({"user_id": "u-1", "text": "likes tea"}, partition=1, offset=7, timestamp_ms=1_000)
    second = make_message({"user_id": "u-1", "text": "likes coffee"}, partition=1, offset=7, timestamp_ms=2_000)
    for message in (first, second, second):
        assert call(message, memory.process_message).result is True
    assert sorted(database.rows()) == [(1, 7, "likes coffee"), (1, 7, "likes tea")]


def test_memory_dead_letters_what_postgresql_refuses(database):
    outcome = call(make_message({"user_id": "u-1", "text": "a NUL \u0000 character"}), memory.process_message)
    assert outcome.dead_letter.startswith("PostgreSQL refused it: unsupported Unicode escape sequence")


def test_memory_retries_while_postgresql_is_unreachable(monkeypatch, caplog):
    monkeypatch.setenv("DATABASE_URL", f"postgresql://127.0.0.1:{free_port()}/test")
    monkeypatch.setattr(memory, "shared", None)
    monkeypatch.setattr(memory, "CONNECT_TIMEOUT_S", 1)
    outcome = call(make_message({"user_id": "u-1", "text": "likes tea"}), memory.process_message)
    assert outcome.result is False and "PostgreSQL unavailable" in caplog.text


@pytest.mark.both_brokers
def test_memory_stores_every_message_exactly_once_across_crashes(cluster, kernels, database):
    """SIGKILL twice mid-stream at concurrency 4: some messages are delivered again, none stored twice."""
    topic, dlt = cluster.create_topic(partitions=3), cluster.create_topic(partitions=1)
    group, total = f"memory-{uuid.uuid4().hex[:6]}", 3000
    produced = cluster.produce(topic, [(i % 3, f"u-{i % 7}".encode(), json.dumps({"user_id": f"u-{i % 7}",
                                        "text": f"memory {i}"}).encode()) for i in range(total)])
    produced += produce_malformed(cluster, topic)
    produced += cluster.produce(topic, [(0, b"nul", json.dumps({"user_id": "u", "text": "\u0000"}).encode())])
    env = kernels.env(topic, group, DATABASE_URL=database.url, MEMORY_TABLE=database.name, KERNEL_CONCURRENCY=4,
                      KERNEL_DEAD_LETTER_TOPIC=dlt, KAFKA_MAX_POLL_RECORDS=200, LOG_LEVEL="DEBUG")
    runs = []
    for at_least in (total // 4, total // 2):
        runs.append(kernels.start(env, module="examples.memory"))
        wait_until(lambda n=at_least: len(database.rows()) >= n, 60, f"{at_least} memories stored")
        runs[-1].kill()
    runs.append(kernels.start(env, module="examples.memory"))
    wait_committed(cluster, runs[-1], group, topic, produced, 3)
    assert runs[-1].stop() == 0

    rows = database.rows()
    assert len(rows) == total and len({(p, o) for p, o, _ in rows}) == total
    assert {text for _, _, text in rows} == {f"memory {i}" for i in range(total)}
    redelivered = sum(run.log().count("was already stored: a redelivery") for run in runs)
    assert redelivered > 0, "no message was delivered twice: the crashes proved nothing"
    rejected = dead_letters(cluster, dlt)
    assert set(rejected) == {label for label, _, _ in MALFORMED} | {"nul"}
    assert rejected["nul"].startswith("PostgreSQL refused it")
    print(f"\nmemory, 2 x SIGKILL at concurrency 4: {total} stored once each, {redelivered} redelivered, "
          f"{len(rejected)} dead-lettered")


# notification


class Webhook:
    """A local webhook that fails on purpose, by recipient: "flaky" answers 503 twice, "throttled"
    429 once, "drop" closes the connection once, "slow" answers too late once, "reject" 400; the
    rest 200. Every request is recorded as (recipient, Idempotency-Key, status)."""

    def __init__(self):
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                recipient, key = body["recipient"], self.headers["Idempotency-Key"]
                with webhook.lock:
                    seen = sum(1 for r, k, _ in webhook.requests if (r, k) == (recipient, key))
                    status = webhook.status(recipient, seen)
                    webhook.requests.append((recipient, key, status))
                if status == 0:  # drop the connection without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if recipient == "slow" and seen == 0:
                    time.sleep(1.5)  # past WEBHOOK_TIMEOUT_S
                write_answer(self, status, b"unknown recipient" if status == 400 else b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def status(recipient: str, seen: int) -> int:
        failing = {"flaky": (503, 2), "throttled": (429, 1), "drop": (0, 1), "reject": (400, 99)}
        status, times = failing.get(recipient, (200, 0))
        return status if seen < times else 200

    def delivered(self) -> set[str]:
        """Recipients with a request answered 200."""
        return {recipient for recipient, _, status in self.requests if status == 200}


def write_answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
    """Answer the request of a local test server; a client that gave up waiting ("slow") is no error."""
    try:
        handler.send_response(status)
        for name, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
    except OSError:
        pass


@pytest.fixture
def webhook(monkeypatch):
    hook = Webhook()
    monkeypatch.setenv("WEBHOOK_URL", hook.url)
    monkeypatch.setenv("WEBHOOK_TIMEOUT_S", "1")
    monkeypatch.setattr(notification, "shared", None)
    yield hook
    hook.server.shutdown()


def notify(recipient: str, message=None):
    """process_message on a notification to `recipient` (or on `message`, when tried again)."""
    return call(message or make_message({"recipient": recipient, "text": "hello"}), notification.process_message)


@pytest.mark.parametrize("recipient, results", [
    ("alice", [True]),
    ("flaky", [False, False, True]),  # 503
    ("throttled", [False, True]),  # 429
    ("drop", [False, True]),  # connection closed without an answer
    ("slow", [False, True]),  # timed out
])
def test_notification_retries_what_may_work_later(webhook, recipient, results):
    message = make_message({"recipient": recipient, "text": "hello"})  # tried again as the kernel does: the same record
    assert [notify(recipient, message).result for _ in results] == results
    assert {key for _, key, _ in webhook.requests} == {main.message_id(message)}, "the same Idempotency-Key each time"


def test_notification_dead_letters_a_client_error(webhook):
    assert notify("reject").dead_letter == "webhook answered 400: 'unknown recipient'"


def test_notification_retries_while_the_webhook_is_down(monkeypatch, caplog):
    monkeypatch.setenv("WEBHOOK_URL", f"http://127.0.0.1:{free_port()}/hook")
    monkeypatch.setattr(notification, "shared", None)
    assert notify("alice").result is False and "Webhook unreachable" in caplog.text


def test_notification_without_a_webhook_url_names_the_variable(monkeypatch):
    """What start-up and `check` say (read_settings: tests/test_your_settings.py), and a call too."""
    monkeypatch.setenv("WEBHOOK_URL", "hooks.example.com/secret-token")
    monkeypatch.setattr(notification, "shared", None)
    with pytest.raises(main.ConfigError, match="^WEBHOOK_URL: must be an http:// or https:// URL$"):
        notification.read_settings()
    with pytest.raises(main.ConfigError) as error:
        notify("alice")
    assert "secret-token" not in str(error.value)


def test_notification_end_to_end_against_a_failing_webhook(cluster, kernels, webhook):
    topic, dlt = cluster.create_topic(partitions=2), cluster.create_topic(partitions=1)
    group = f"notification-{uuid.uuid4().hex[:6]}"
    recipients = [f"user-{i}" for i in range(40)] + ["flaky", "throttled", "drop", "slow", "reject"]
    produced = cluster.produce(topic, [(i % 2, r.encode(), json.dumps({"recipient": r, "text": "hi"}).encode())
                                       for i, r in enumerate(recipients)])
    produced += produce_malformed(cluster, topic)
    port = free_port()
    env = kernels.env(topic, group, WEBHOOK_URL=webhook.url, WEBHOOK_TIMEOUT_S=1, KERNEL_DEAD_LETTER_TOPIC=dlt,
                      KERNEL_CONCURRENCY=4, KERNEL_RETRY_INITIAL_MS=100, KERNEL_HTTP_PORT=port)
    kernel = kernels.start(env, module="examples.notification")
    wait_committed(cluster, kernel, group, topic, produced, 2)
    metrics = http_get(port, "/metrics")[1]
    assert f'notifications_sent_total{{topic="{topic}"}} {len(recipients) - 1}.0' in metrics, "all but the rejected"
    assert kernel.stop() == 0

    assert webhook.delivered() == set(recipients) - {"reject"}
    attempts = Counter(recipient for recipient, _, _ in webhook.requests)
    assert (attempts["flaky"], attempts["throttled"], attempts["drop"], attempts["slow"]) == (3, 2, 2, 2)
    keys = defaultdict(set)
    for recipient, key, _ in webhook.requests:
        keys[recipient].add(key)
    assert all(len(k) == 1 for k in keys.values()), "a retry carries the same Idempotency-Key"
    rejected = dead_letters(cluster, dlt)
    assert set(rejected) == {"reject"} | {label for label, _, _ in MALFORMED}
    assert rejected["reject"] == "webhook answered 400: 'unknown recipient'"
    assert all(reason in rejected[label] for label, _, reason in MALFORMED)
    assert "Webhook answered 503" in kernel.log() and "Webhook unreachable" in kernel.log()


# adopting an example


def adopt(example: str, main_path) -> None:
    """`uv run devtools/adopt_example.py EXAMPLE --main MAIN_PATH`."""
    subprocess.run([sys.executable, str(REPO / "devtools" / "adopt_example.py"), example, "--main", str(main_path)],
                   check=True, capture_output=True)


def adopted_main(example: str, directory: Path) -> Path:
    """A copy of main.py in `directory` (made if missing) with `example` adopted; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    adopted = directory / "main.py"
    adopted.write_text(MAIN.read_text())
    adopt(example, adopted)
    return adopted


@pytest.mark.parametrize("example", ["transform", "memory", "notification", "analytics", "triage"])
def test_adopting_an_example_gives_a_main_py_that_passes_the_linter(tmp_path, example):
    adopted = adopted_main(example, tmp_path)
    text = adopted.read_text()
    assert f'KERNEL_NAME = "{example}-kernel"' in text and "from main import" not in text
    assert "def describe_timestamp" in text and "class ConsumerLoop:" in text, "the kernel itself stays"
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(REPO / "pyproject.toml"),
                           str(adopted)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_an_adopted_transform_kernel_runs_as_main_py(cluster, kernels, tmp_path):
    adopted = adopted_main("transform", tmp_path / "adopted")
    source, output, dlt = (cluster.create_topic(partitions=1) for _ in range(3))
    group = f"adopted-{uuid.uuid4().hex[:6]}"
    produced = cluster.produce(source, [(0, b"k", b'{"id": "e-1", "type": "t"}'), (0, b"bad", b"not json")])
    env = kernels.env(source, group, TRANSFORM_OUTPUT_TOPIC=output, KERNEL_DEAD_LETTER_TOPIC=dlt)
    kernel = kernels.start(env, script=adopted)
    wait_committed(cluster, kernel, group, source, produced, 1)
    assert kernel.stop() == 0
    assert [json.loads(r.value())["enriched_by"] for r in cluster.read_topic(output, 1)] == ["transform-kernel"]
    assert list(dead_letters(cluster, dlt)) == ["bad"]
    assert "[transform-kernel]" in kernel.log()


@pytest.mark.parametrize("extra, example, packages", [
    ("database", memory, {"psycopg", "psycopg-binary", "psycopg-pool"}),
    ("database", analytics, {"psycopg", "psycopg-binary", "psycopg-pool"}),
    ("http", notification, {"httpx"}),
    ("ai", triage, {"anthropic"}),
])
def test_each_extra_installs_what_its_example_imports(tmp_path, extra, example, packages):
    """`uv sync --extra NAME` (dry run, into an empty environment) installs the example's packages."""
    uv = os.environ.get("UV") or shutil.which("uv")
    result = subprocess.run([uv, "sync", "--locked", "--no-dev", "--extra", extra, "--dry-run"], cwd=REPO,
                            env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv")},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    installed = set(re.findall(r"^ \+ ([\w.-]+)==", result.stderr + result.stdout, re.M))
    assert packages <= installed, f"uv sync --extra {extra} would not install {packages - installed}"
    imported = set(re.findall(r"^(?:import|from) (\w+)", Path(example.__file__).read_text(), re.M))
    third_party = {name.replace("_", "-") for name in imported
                   if name not in sys.stdlib_module_names and name not in ("main", "examples")}
    assert third_party and third_party <= installed, f"examples/{example.__name__} imports {third_party}"


@pytest.mark.broker  # the local run's own
def test_the_local_run_of_an_adopted_kernel_dead_letters_samples_it_cannot_use(tmp_path):
    """`uv run devtools/run_local.py` after adopting transform: its samples lack "id" and "type", so
    they go to the local dead-letter topic instead of stopping the kernel."""
    shutil.copytree(REPO / "devtools", tmp_path / "devtools", ignore=shutil.ignore_patterns("__pycache__"))
    adopted_main("transform", tmp_path)
    log_path = tmp_path / "run_local.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "KERNEL_"))}
    with log_path.open("wb") as log:
        runner = subprocess.Popen([sys.executable, "devtools/run_local.py"], cwd=tmp_path, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: log_path.read_text().count("Dead-lettered events[") == 5, 30, "five dead letters")
        assert runner.poll() is None, "the kernel stopped"
        os.killpg(runner.pid, signal.SIGINT)
        assert runner.wait(timeout=20) == 0
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert "to events-dead-letters: field \"id\" must be a non-empty string" in log_path.read_text()


@pytest.mark.broker  # the tests it runs start one
@pytest.mark.timeout(600)
@pytest.mark.parametrize("example, extra_tests", [("transform", []), ("analytics", ["tests/test_local_run.py"])])
def test_after_adopting_an_example_the_template_tests_still_pass(tmp_path, example, extra_tests):
    """A copy of the repository with an example adopted, a process_message kernel or a process_batch
    one: the template's tests that run main.py itself, and those of the docs and the linter, pass (the
    hello-world ones are deselected). tests/test_process_message.py is the author's, and not run."""
    copy_repository(tmp_path)
    adopt(example, tmp_path / "main.py")
    tests = ["tests/test_tls.py", "tests/test_shutdown.py", "tests/test_config.py", "tests/test_docs.py",
             "tests/test_lint.py", "tests/test_loop.py", "tests/test_ledger.py", *extra_tests]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "KERNEL_", "PYTEST_"))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rs", *tests],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.parametrize("example", [memory, analytics])
def test_a_malformed_database_url_is_fatal_and_never_shows_the_password(monkeypatch, caplog, example):
    """A generated password with a raw %: psycopg cannot parse the URL, and its message would quote the
    password. The kernel stops at start-up (read_settings: exit 2, a person must fix it) saying what to
    do, the password nowhere; a call stops it too."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:S3cretPw%ZZ@127.0.0.1:5432/test")
    monkeypatch.setattr(example, "shared", None)
    message = make_message({"user_id": "u-1", "text": "hi", "type": "click", "user": "u-1", "ts": 1})
    handler = example.process_message if example is memory else example.process_batch
    with pytest.raises(main.ConfigError, match="^DATABASE_URL: not a valid PostgreSQL URL: percent-encode"):
        example.read_settings()
    with pytest.raises(main.ConfigError, match="^DATABASE_URL: not a valid PostgreSQL URL: percent-encode") as raised:
        call(message, handler) if example is memory else call_batch([message], handler)
    assert "S3cretPw" not in str(raised.value) and raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "S3cretPw" not in caplog.text


@pytest.mark.parametrize("example, extra", [("memory", "database"), ("analytics", "database"), ("notification", "http"),
                                            ("triage", "ai"), ("transform", None)])
def test_adopting_an_example_says_which_extra_it_needs(tmp_path, example, extra):
    main_path = tmp_path / "main.py"
    main_path.write_text(MAIN.read_text())
    said = subprocess.run([sys.executable, str(REPO / "devtools" / "adopt_example.py"), example, "--main",
                           str(main_path)], check=True, capture_output=True, text=True).stdout
    if extra is None:
        assert "--extra" not in said, said
    else:
        assert f"It needs --extra {extra}: uv sync --extra {extra}" in said, said


@pytest.mark.parametrize("example", [memory, analytics])
@pytest.mark.parametrize("query, said", [("sslmode=bogus", 'invalid sslmode value: "bogus"'),
                                         ("target_session_attrs=any-old", "invalid target_session_attrs value")])
def test_a_database_url_with_an_invalid_option_is_fatal_not_an_outage(monkeypatch, example, query, said):
    """libpq refuses the option before connecting, every time: a fault to fix, not an outage to retry."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:S3cretPw@127.0.0.1:{free_port()}/test?{query}")
    monkeypatch.setattr(example, "shared", None)
    message = make_message({"user_id": "u-1", "text": "hi", "type": "click", "user": "u-1", "ts": 1})
    handler = example.process_message if example is memory else example.process_batch
    with pytest.raises(main.ConfigError, match=f"^DATABASE_URL: not a valid PostgreSQL URL: {said}") as raised:
        example.read_settings()  # what start-up and `check` call: exit 2 before the first message
    assert "S3cretPw" not in str(raised.value)
    with pytest.raises(main.ConfigError, match=f"^DATABASE_URL: not a valid PostgreSQL URL: {said}"):
        call(message, handler) if example is memory else call_batch([message], handler)


@pytest.mark.brokers("kafka")
def test_transform_names_an_output_topic_that_does_not_exist(cluster, kernels):
    """TRANSFORM_OUTPUT_TOPIC mistyped on a broker that does not create topics: a line names the topic,
    /readyz answers 503 naming it, and after KERNEL_MAX_ATTEMPTS the message is dead-lettered."""
    source, dlt = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1)
    missing = f"events-enriched-typo-{uuid.uuid4().hex[:6]}"
    group = f"transform-missing-{uuid.uuid4().hex[:6]}"
    cluster.produce(source, [(0, b"k", json.dumps({"id": "e-1", "type": "t"}).encode())])
    port = free_port()
    env = kernels.env(source, group, TRANSFORM_OUTPUT_TOPIC=missing, KERNEL_DEAD_LETTER_TOPIC=dlt,
                      KERNEL_MAX_ATTEMPTS=2, KERNEL_RETRY_INITIAL_MS=100, KAFKA_PRODUCE_TIMEOUT_MS=2000,
                      KERNEL_HTTP_PORT=port)
    kernel = kernels.start(env, module="examples.transform")
    kernel.wait_for_log(rf"topic {missing} does not exist \(TRANSFORM_OUTPUT_TOPIC holds it\)", timeout_s=30)
    status, body = http_get(port, "/readyz")
    assert status == 503 and missing in body, (status, body)
    wait_until(lambda: cluster.committed(group, source, 1)[0] == 1, 60, "the message dead-lettered and committed")
    assert f"topic {missing} does not exist" in dead_letters(cluster, dlt)["k"]
    assert http_get(port, "/readyz")[0] == 503, "still not ready: the topic still does not exist"
    assert kernel.stop() == 0
