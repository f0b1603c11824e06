"""What a local run did, printed when it stops: the kernel's own counters added up over its restarts,
the first dead letters with their reasons, and each partition's committed offset against its end,
both read from the broker."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

# The kernel's Prometheus counters (docs/reference.md, "Operations"), by the word the summary uses.
COUNTERS = {
    "processed": "kernel_messages_processed_total",
    "retried": "kernel_messages_retried_total",
    "dead-lettered": "kernel_messages_dead_lettered_total",
    "failed": "kernel_messages_failed_total",
}
FIRST_DEAD_LETTERS = 3
READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PartitionProgress:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed this partition
    end: int  # the high watermark: the offset the next message will get

    def describe(self) -> str:
        committed = "nothing committed" if self.committed is None else f"committed {self.committed}"
        behind = self.end - (self.committed or 0)
        return f"{self.topic}[{self.partition}]: {committed} of {self.end}" + (f" ({behind} behind)" if behind else "")


def kernel_counters(metrics_dir: Path) -> dict[str, dict[str, int]]:
    """topic → {word: count}, summed over every kernel process that ran: each one wrote its counters
    into `metrics_dir` (prometheus_client's multiprocess mode), so a restart does not reset the sum."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    names = {name: word for word, name in COUNTERS.items()}
    counts: dict[str, dict[str, int]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in names:
                topic_counts = counts.setdefault(sample.labels["topic"], dict.fromkeys(COUNTERS, 0))
                topic_counts[names[sample.name]] += int(sample.value)
    return counts


def read_from_start(consumer: KafkaConsumer, partitions: list[TopicPartition],
                    keep: int = 0) -> tuple[dict[TopicPartition, int], list]:
    """The end of each partition, and up to `keep` records from their start.

    The end is the high watermark a fetch reports, not `end_offsets()`: the broker's ListOffsets answer
    is wrong after a producer sends a batch of several records (it gives the last batch's base offset + 1).
    """
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    records: list = []
    deadline = time.monotonic() + READ_TIMEOUT_S
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
        ends = {tp: consumer.highwater(tp) for tp in partitions}
        if None not in ends.values() and (len(records) >= keep or all(
                consumer.position(tp) >= end for tp, end in ends.items())):
            return ends, records[:keep]
    raise TimeoutError(f"the broker did not report the end of {partitions} within {READ_TIMEOUT_S} s")


def partitions_of(consumer: KafkaConsumer, topics: list[str]) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for topic in topics for p in sorted(consumer.partitions_for_topic(topic) or ())]


def committed_offsets(consumer: KafkaConsumer, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    """The group's committed offsets, within READ_TIMEOUT_S in all: kafka-python's committed() waits for
    ever for a coordinator without a timeout."""
    deadline = time.monotonic() + READ_TIMEOUT_S
    return {tp: consumer.committed(tp, timeout_ms=max(0.0, deadline - time.monotonic()) * 1000) for tp in partitions}


def partition_progress(config: dict, group: str, topics: list[str]) -> list[PartitionProgress]:
    consumer = KafkaConsumer(**config, group_id=group, enable_auto_commit=False)
    try:
        partitions = partitions_of(consumer, topics)
        committed = committed_offsets(consumer, partitions)  # before assign(): the group's, not ours
        ends, _ = read_from_start(consumer, partitions)
    finally:
        consumer.close(autocommit=False)
    return [PartitionProgress(tp.topic, tp.partition, committed[tp], ends[tp]) for tp in partitions]


def first_dead_letters(config: dict, topic: str) -> tuple[int, list[str]]:
    """How many records the dead-letter topic holds, and "origin: reason" for the first few."""
    consumer = KafkaConsumer(**config, enable_auto_commit=False)
    try:
        ends, records = read_from_start(consumer, partitions_of(consumer, [topic]), keep=FIRST_DEAD_LETTERS)
    finally:
        consumer.close(autocommit=False)
    return sum(ends.values()), [describe_dead_letter(record) for record in records]


def describe_dead_letter(record) -> str:
    """"topic[partition]@offset: reason" from the headers the kernel adds to a dead letter."""
    headers = dict(record.headers or [])
    origin = "{}[{}]@{}".format(
        headers.get("kafka_dlt-original-topic", b"?").decode(errors="replace"),
        int.from_bytes(headers.get("kafka_dlt-original-partition", b"\xff"), "big", signed=True),
        int.from_bytes(headers.get("kafka_dlt-original-offset", b"\xff"), "big", signed=True),
    )
    return f"{origin}: {headers.get('kafka_dlt-exception-message', b'(no reason given)').decode(errors='replace')}"


def summary(config: dict, metrics_dir: Path, group: str, topics: list[str], dead_letter_topic: str,
            kernel_runs: int) -> str:
    counts = kernel_counters(metrics_dir)
    lines = [f"Summary of {kernel_runs} kernel run{'s' * (kernel_runs != 1)} (group {group}):"]
    for topic in sorted(set(topics) | set(counts)):
        topic_counts = counts.get(topic, dict.fromkeys(COUNTERS, 0))
        lines.append(f"  {topic}: " + ", ".join(f"{word} {topic_counts[word]}" for word in COUNTERS))
    dead_letters, reasons = first_dead_letters(config, dead_letter_topic)
    if dead_letters:
        lines.append(f"  {dead_letter_topic} holds {dead_letters} dead letter(s); the first:")
        lines.extend(f"    {reason}" for reason in reasons)
    lines.append("  committed offset / end of each partition:")
    lines.extend(f"    {progress.describe()}" for progress in partition_progress(config, group, topics))
    return "\n".join(lines)
