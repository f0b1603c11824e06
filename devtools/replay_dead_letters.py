"""Send dead-lettered messages back to the topic they came from, once the cause is fixed.

    uv run devtools/replay_dead_letters.py DEAD_LETTER_TOPIC [--to TOPIC] [--dry-run]

Connects with the kernel's own settings (the environment or .env: KAFKA_BOOTSTRAP_SERVERS and the
certificates). Reads DEAD_LETTER_TOPIC as the consumer group "{KAFKA_CONSUMER_GROUP}-replay", from
where it stopped last time up to the end each partition had when it started (so what comes after,
its own replays failing again among them, waits for the next run), publishes each record (same key,
value and headers, without the dead-letter ones, plus kernel-replays: how many times it has been
replayed) to its kafka_dlt-original-topic header or --to, confirmed with acks=all, and commits after
each confirmed record, so a second run replays only what came since. Then it watches the topic for
WATCH_S seconds: a replay that comes back already (the cause is not fixed) is reported, not replayed
again, and the run exits 1. A letter replayed before is replayed again, saying how often it came back.
A dead letter that went without its value (too large for the dead-letter topic: header
kernel-value-dropped) is replayed with the value read again from where it came from
(kafka_dlt-original-topic, -partition, -offset), if the record there is the one the letter names (its
key, timestamp, size and headers: once a topic is created again its offsets hold other records); if
it is gone or another, it stops there.
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

IDLE_TIMEOUT_MS = 5000  # short of its ends, it stops when nothing came for this long
WATCH_S = 5  # how long it watches for replays that come back
ASSIGNMENT_TIMEOUT_S = 60
DEAD_LETTER_HEADER_PREFIXES = ("kafka_dlt-", "kernel-")
REPLAYS_HEADER = "kernel-replays"
# Written by the kernel's tracing into a dead letter in place of the original's: not the record's own.
TRACE_CONTEXT_HEADERS = {"traceparent", "tracestate", "baggage", "b3", "uber-trace-id"}


def replay(dead_letter_topic: str, to: str | None, dry_run: bool) -> int:
    settings = main.load_settings(os.environ, main.KERNEL_NAME, main.DEFAULT_TOPIC)
    with main.tls_files(settings) as tls:
        connection = main.security_config(settings, tls)
        ends = end_offsets(connection, dead_letter_topic)  # before anything is replayed, so none of its own
        consumer = KafkaConsumer(dead_letter_topic, **connection, group_id=f"{settings.group_id}-replay",
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 session_timeout_ms=settings.session_timeout_ms,
                                 heartbeat_interval_ms=settings.heartbeat_interval_ms)
        # As large as anything a broker takes (a record batch up to 50 MB comes whole): the broker decides.
        producer = KafkaProducer(**connection, acks="all", max_request_size=52_428_800, buffer_memory=104_857_600)
        replays: dict[tuple, str] = {}  # where each replay of this run went: the letter it came from
        replayed, again, came_back = 0, 0, 0
        try:
            for record in records_to_the_ends(consumer, ends, 0 if dry_run else WATCH_S):
                headers = dict(record.headers or [])
                origin = original_coordinates(headers)
                if record.offset >= ends.get(TopicPartition(record.topic, record.partition), 0):
                    if origin in replays:  # past the ends only its own replays matter; the rest waits for the next run
                        came_back += 1
                        print(f"{main.coordinates(record)}: the replay of {replays[origin]} came back: "
                              f"{headers.get('kafka_dlt-exception-message', b'').decode(errors='replace')[:300]}",
                              file=sys.stderr)
                    continue
                target, value, trouble = what_to_replay(connection, record, headers, to)
                if trouble:
                    print(f"{main.coordinates(record)}: {trouble}: stopping", file=sys.stderr)
                    return 1
                before = replay_count(headers)
                replayed, again = replayed + 1, again + (before > 0)
                kept = [(k, v) for k, v in record.headers or [] if not k.startswith(DEAD_LETTER_HEADER_PREFIXES)]
                print(f"{main.coordinates(record)} -> {target}" + (f" (back after {before} replay(s))" * (before > 0)))
                if not dry_run:
                    sent = producer.send(target, key=record.key, value=value,
                                         headers=[*kept, (REPLAYS_HEADER, str(before + 1).encode())]).get(timeout=30)
                    replays[sent.topic, sent.partition, sent.offset] = main.coordinates(record)
                    consumer.commit({TopicPartition(record.topic, record.partition):
                                     OffsetAndMetadata(record.offset + 1, "", -1)})
        finally:
            producer.close()
            consumer.close(autocommit=False)
    print(f"{'Would replay' if dry_run else 'Replayed'} {replayed} message(s)"
          + (f", {again} of them replayed before and dead-lettered again" if again else ""))
    if came_back:
        print(f"{came_back} of them came back within {WATCH_S} s, dead-lettered again: the cause is not fixed yet? "
              f"They stay in {dead_letter_topic} for the next run", file=sys.stderr)
        return 1
    return 0


def what_to_replay(connection: dict, letter, headers: dict, to: str | None) -> tuple[str, bytes | None, str]:
    """Where the letter goes and the value it takes there, and ""; or what stops the replay at it."""
    value = letter.value
    if "kernel-value-dropped" in headers:
        value, trouble = original_value(connection, letter)
        if trouble:
            return "", None, f"its value was dropped and {trouble}"
    target = to or headers.get("kafka_dlt-original-topic", b"").decode()
    if not target:
        return "", None, "no kafka_dlt-original-topic header and no --to"
    return target, value, ""


def replay_count(headers: dict) -> int:
    """How many times the letter's message was replayed before: its kernel-replays header."""
    try:
        return int(headers.get(REPLAYS_HEADER, b"0"))
    except ValueError:
        return 0


def original_coordinates(headers: dict) -> tuple[str, int, int] | None:
    """Where the letter's message was when it failed: topic, partition, offset (None if not said)."""
    try:
        return (headers["kafka_dlt-original-topic"].decode(),
                int.from_bytes(headers["kafka_dlt-original-partition"], "big", signed=True),
                int.from_bytes(headers["kafka_dlt-original-offset"], "big", signed=True))
    except (KeyError, AttributeError, UnicodeDecodeError):
        return None


def end_offsets(connection: dict, topic: str) -> dict[TopicPartition, int]:
    """Each partition's end as fetch responses report it (main.high_watermarks: some brokers answer a
    ListOffsets request wrongly)."""
    reader = KafkaConsumer(**connection, group_id=None, enable_auto_commit=False)
    try:
        partitions = reader.partitions_for_topic(topic)
        if not partitions:
            raise SystemExit(f"the dead-letter topic {topic} does not exist or is not visible to this client")
        ends = main.high_watermarks(reader, [TopicPartition(topic, p) for p in sorted(partitions)])
    finally:
        reader.close()
    if unknown := [f"{tp.topic}[{tp.partition}]" for tp, end in ends.items() if end is None]:
        raise SystemExit(f"the end of {', '.join(unknown)} is not known: no fetch answered within "
                         f"{main.CHECK_FETCH_TIMEOUT_S:.0f} s")
    return ends


def original_value(connection: dict, letter) -> tuple[bytes | None, str]:
    """The value of the record a dead letter came from, read again at its original coordinates, and "";
    or None and what is wrong: the record is gone, or its offset holds another one."""
    topic, partition, offset = original_coordinates(dict(letter.headers)) or ("", 0, 0)
    where, tp = f"{topic}[{partition}]@{offset}", TopicPartition(topic, partition)
    reader = KafkaConsumer(**connection, group_id=None, enable_auto_commit=False)
    try:
        reader.assign([tp])
        reader.seek(tp, offset)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if records := reader.poll(timeout_ms=500).get(tp):
                if records[0].offset != offset:
                    break
                if differs := difference(letter, records[0]):
                    return None, f"{where} holds another record ({differs} differs: the topic was created again?)"
                return records[0].value, ""
        return None, f"{where} is gone (the topic no longer holds it)"
    finally:
        reader.close()


def difference(letter, record) -> str:
    """What tells `record` from the one `letter` was made of ("" when nothing does): its key, its
    timestamp, its size, its headers (the dead letter kept them, then added its own)."""
    headers = dict(letter.headers)
    if record.key != letter.key:
        return "the key"
    if record.timestamp != int.from_bytes(headers.get("kafka_dlt-original-timestamp", b""), "big", signed=True):
        return "the timestamp"
    if str(len(record.value or b"")).encode() != headers["kernel-value-dropped"]:
        return "the size"
    if own_headers(letter.headers) != own_headers(main.producible_headers(record.headers or [])):
        return "the headers"
    return ""


def own_headers(headers: list) -> list:
    """A record's headers without those a dead letter adds or the kernel's tracing replaces."""
    return [(k, v) for k, v in headers
            if not k.startswith(DEAD_LETTER_HEADER_PREFIXES) and k.lower() not in TRACE_CONTEXT_HEADERS]


def records_to_the_ends(consumer: KafkaConsumer, ends: dict[TopicPartition, int], watch_s: float):
    """Yield records until each assigned partition is read up to its end in `ends`, then those that
    come for `watch_s` more; or until none came for IDLE_TIMEOUT_MS (an end not reached is said)."""
    idle_ms, deadline, watch_until = 0, time.monotonic() + ASSIGNMENT_TIMEOUT_S, None
    while idle_ms < IDLE_TIMEOUT_MS or not consumer.assignment():
        if not consumer.assignment() and time.monotonic() > deadline:
            raise SystemExit(f"no partition of the dead-letter topic was assigned within {ASSIGNMENT_TIMEOUT_S} s")
        if consumer.assignment() and watch_until is None and all(
                consumer.position(tp) >= ends.get(tp, 0) for tp in consumer.assignment()):
            watch_until = time.monotonic() + watch_s
        if watch_until is not None and time.monotonic() >= watch_until:
            return
        batch = consumer.poll(timeout_ms=500)
        idle_ms = 0 if batch else idle_ms + 500
        for records in batch.values():
            yield from records
    for tp in sorted(consumer.assignment()):
        if consumer.position(tp) < ends.get(tp, 0):
            print(f"{tp.topic}[{tp.partition}]: nothing came for {IDLE_TIMEOUT_MS / 1000:.0f} s at offset "
                  f"{consumer.position(tp)}, short of its end {ends[tp]}: the rest waits for the next run",
                  file=sys.stderr)


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
