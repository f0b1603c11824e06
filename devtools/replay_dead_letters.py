"""Send dead-lettered messages back to the topic they came from, once the cause is fixed.

    uv run devtools/replay_dead_letters.py DEAD_LETTER_TOPIC [--to TOPIC] [--dry-run]

Connects with the kernel's own settings (the environment or .env: KAFKA_BOOTSTRAP_SERVERS and the
certificates). Reads DEAD_LETTER_TOPIC from its start as the consumer group
"{KAFKA_CONSUMER_GROUP}-replay", publishes each record (same key, value and headers, without the
dead-letter ones) to its kafka_dlt-original-topic header or --to, confirmed with acks=all, and
commits after each confirmed record, so a second run replays only what came since. Stops when
nothing new arrives for five seconds. A dead letter that went without its value (too large for the
dead-letter topic: header kernel-value-dropped) is replayed with the value read again from where it
came from (kafka_dlt-original-topic, -partition, -offset), and its key too if that was dropped as well
(kernel-key-dropped); if that is gone, it stops there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dotenv import load_dotenv  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition  # noqa: E402

import main  # noqa: E402

IDLE_TIMEOUT_MS = 5000
ASSIGNMENT_TIMEOUT_S = 60
DEAD_LETTER_HEADER_PREFIXES = ("kafka_dlt-", "kernel-")


def replay(dead_letter_topic: str, to: str | None, dry_run: bool) -> int:
    settings = main.load_settings(os.environ, main.KERNEL_NAME, main.DEFAULT_TOPIC)
    with main.tls_files(settings) as tls:
        connection = main.security_config(settings, tls)
        consumer = KafkaConsumer(dead_letter_topic, **connection, group_id=f"{settings.group_id}-replay",
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 session_timeout_ms=settings.session_timeout_ms,
                                 heartbeat_interval_ms=settings.heartbeat_interval_ms)
        # As large as anything a broker takes (a record batch up to 50 MB comes whole): the broker decides.
        producer = KafkaProducer(**connection, acks="all", max_request_size=52_428_800, buffer_memory=104_857_600)
        replayed = 0
        for record in records_until_idle(consumer):
            headers = dict(record.headers or [])
            key, value = record.key, record.value
            if "kernel-value-dropped" in headers:
                original = original_record(connection, headers)
                if original is None:
                    print(f"{main.coordinates(record)}: its value was dropped and its original is gone: stopping",
                          file=sys.stderr)
                    return 1
                key, value = original.key if "kernel-key-dropped" in headers else key, original.value
            target = to or headers.get("kafka_dlt-original-topic", b"").decode()
            if not target:
                print(f"{main.coordinates(record)}: no kafka_dlt-original-topic "
                      "header and no --to: stopping", file=sys.stderr)
                return 1
            kept = [(k, v) for k, v in record.headers or [] if not k.startswith(DEAD_LETTER_HEADER_PREFIXES)]
            print(f"{main.coordinates(record)} -> {target}")
            if not dry_run:
                producer.send(target, key=key, value=value, headers=kept).get(timeout=30)
                consumer.commit({TopicPartition(record.topic, record.partition):
                                 OffsetAndMetadata(record.offset + 1, "", -1)})
            replayed += 1
        print(f"{'Would replay' if dry_run else 'Replayed'} {replayed} message(s)")
        producer.close()
        consumer.close(autocommit=False)
        return 0


def original_record(connection: dict, headers: dict):
    """The record a dead letter came from, read again at its original coordinates; None if gone."""
    partition = TopicPartition(headers["kafka_dlt-original-topic"].decode(),
                               int.from_bytes(headers["kafka_dlt-original-partition"], "big", signed=True))
    offset = int.from_bytes(headers["kafka_dlt-original-offset"], "big", signed=True)
    reader = KafkaConsumer(**connection, group_id=None, enable_auto_commit=False)
    try:
        reader.assign([partition])
        reader.seek(partition, offset)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for record in reader.poll(timeout_ms=500).get(partition, []):
                return record if record.offset == offset else None
        return None
    finally:
        reader.close()


def records_until_idle(consumer: KafkaConsumer):
    """Yield records until none came for IDLE_TIMEOUT_MS after the group assigned partitions."""
    idle_ms, deadline = 0, time.monotonic() + ASSIGNMENT_TIMEOUT_S
    while idle_ms < IDLE_TIMEOUT_MS or not consumer.assignment():
        if not consumer.assignment() and time.monotonic() > deadline:
            raise SystemExit(f"no partition of the dead-letter topic was assigned within {ASSIGNMENT_TIMEOUT_S} s")
        batch = consumer.poll(timeout_ms=500)
        idle_ms = 0 if batch else idle_ms + 500
        for records in batch.values():
            yield from records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dead_letter_topic")
    parser.add_argument("--to", help="publish here instead of each record's original topic")
    parser.add_argument("--dry-run", action="store_true", help="list what would be replayed; publish nothing")
    arguments = parser.parse_args()
    load_dotenv(Path(main.__file__).with_name(".env"))
    try:
        sys.exit(replay(arguments.dead_letter_topic, arguments.to, arguments.dry_run))
    except main.ConfigError as error:
        sys.exit(f"Configuration error: {error}")
