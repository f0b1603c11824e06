"""Records the client cannot decode: a header key that is not UTF-8 (legal on the wire, and what Go
clients can write), a batch that fails its CRC check. They go to the dead-letter topic in their place,
or stop the kernel saying where they are and how to move past them; the records around them are
processed, and nothing loops."""

from __future__ import annotations

import re

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

import main
from tests.fixtures import processed, wait_committed, wait_until
from tests.kit import make_message


class RawName(str):
    """A header name that kafka-python's producer writes as the bytes given, UTF-8 or not."""

    def __new__(cls, raw: bytes):
        name = super().__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, *args, **kwargs) -> bytes:
        return self.raw


def produce_raw_headers(cluster, topic: str, messages) -> None:
    """Produce (key, value, headers) to partition 0 in one batch, header names as given (bytes or str)."""
    producer = KafkaProducer(bootstrap_servers=cluster.bootstrap, security_protocol="SSL",
                             ssl_cafile=str(cluster.pki.ca_file), ssl_certfile=str(cluster.pki.client_cert_file),
                             ssl_keyfile=str(cluster.pki.client_key_file), acks="all", linger_ms=50)
    try:
        for key, value, headers in messages:
            producer.send(topic, key=key, value=value, partition=0,
                          headers=[(RawName(name) if isinstance(name, bytes) else name, data) for name, data in headers])
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)


def batch(base_offset: int, messages, compression: int = 0) -> bytes:
    """One record batch (format v2) of (key, value, headers) from `base_offset`, header names as given."""
    builder = MemoryRecordsBuilder(magic=2, compression_type=compression, batch_size=1_000_000, offset=base_offset)
    for key, value, headers in messages:
        builder.append(1_700_000_000_000, key, value,
                       [(RawName(name) if isinstance(name, bytes) else name, data) for name, data in headers])
    builder.close()
    return bytes(builder.buffer())


def read(fetched: bytes, fetch_offset: int = 0, check_crcs: bool = True) -> list:
    """What the kernel's consumer takes from a fetch of `fetched` at `fetch_offset`."""
    records = main.LenientPartitionRecords(fetch_offset, TopicPartition("t", 0), MemoryRecords(fetched),
                                           check_crcs=check_crcs)
    taken = []
    for _ in range(10):  # as the client's polls do, until the fetch is read to its end (a failure ends a take)
        taken += records.take()
        if not records:
            return taken
    pytest.fail("the fetch is not read to its end")


BAD_NAME = b"trace-\xff\xfe-id"
MESSAGES = [(b"k0", b"before", [("ok", b"1")]),
            (b"k1", b"the bad one", [("ok", b"2"), (BAD_NAME, b"v")]),
            (b"k2", b"after", [])]


@pytest.mark.both_brokers
def test_a_header_name_that_is_not_utf8_is_dead_lettered_and_the_others_processed(cluster, kernels):
    topic, dead_letters = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1)
    produce_raw_headers(cluster, topic, MESSAGES)
    kernel = kernels.start(kernels.env(topic, "undecodable", KERNEL_DEAD_LETTER_TOPIC=dead_letters))
    wait_committed(cluster, kernel, "undecodable", topic, {0: 3}, 1, timeout_s=60)
    assert kernel.stop() == 0, kernel.log()[-3000:]

    assert processed(kernels.attempts()) == {(0, 0), (0, 2)}, "the handler never sees the bad record"
    letters = cluster.read_topic(dead_letters, 1)
    assert len(letters) == 1, kernel.log()[-3000:]
    letter, headers = letters[0], dict(letters[0].headers())
    assert (letter.key(), letter.value()) == (b"k1", b"the bad one")
    assert headers["ok"] == b"2" and headers["trace-\\xff\\xfe-id"] == b"v", "the name escaped, the value kept"
    assert headers["kernel-header-names-escaped"] == b"1"
    assert int.from_bytes(headers["kafka_dlt-original-offset"], "big") == 1
    assert headers["kafka_dlt-exception-fqcn"] == b"CorruptRecordError"
    assert b"not UTF-8" in headers["kafka_dlt-exception-message"]
    assert re.search(r"Dead-lettered \S+\[0\]@1 to \S+: ", kernel.log())


def test_a_header_name_that_is_not_utf8_without_a_dead_letter_topic_stops_the_kernel_saying_how_to_go_on(
        cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    produce_raw_headers(cluster, topic, MESSAGES)
    kernel = kernels.start(kernels.env(topic, "undecodable-no-dlt"))
    assert kernel.wait(timeout_s=60) == 4, kernel.log()[-3000:]
    stop = [line for line in kernel.log().splitlines() if "Stopping" in line]
    assert len(stop) == 1 and f"{topic}[0]@1" in stop[0] and "not UTF-8" in stop[0], kernel.log()[-3000:]
    assert "--to-offset 2" in stop[0] and "KERNEL_DEAD_LETTER_TOPIC" in stop[0]
    assert "Traceback" not in kernel.log()
    assert processed(kernels.attempts()) == {(0, 0)}
    wait_until(lambda: cluster.committed("undecodable-no-dlt", topic, 1) == {0: 1}, 10, "offset 1 committed")

    # Started again with a dead-letter topic, it fetches from the bad record, in the middle of its batch.
    dead_letters = cluster.create_topic(partitions=1)
    kernel = kernels.start(kernels.env(topic, "undecodable-no-dlt", KERNEL_DEAD_LETTER_TOPIC=dead_letters))
    wait_committed(cluster, kernel, "undecodable-no-dlt", topic, {0: 3}, 1, timeout_s=60)
    assert kernel.stop() == 0, kernel.log()[-3000:]
    assert processed(kernels.attempts()) == {(0, 0), (0, 2)}
    assert [int.from_bytes(dict(letter.headers())["kafka_dlt-original-offset"], "big")
            for letter in cluster.read_topic(dead_letters, 1)] == [1]


def test_a_record_with_a_header_name_that_is_not_utf8_is_read_in_its_place_and_the_batch_goes_on():
    for compression in (0, 1):  # none, gzip
        fetched = batch(0, MESSAGES, compression) + batch(3, [(b"k3", b"next batch", [])])
        records = read(fetched)
        assert [(type(r), r.offset, r.key, r.value) for r in records] == [
            (ConsumerRecord, 0, b"k0", b"before"), (main.UndecodableRecord, 1, b"k1", b"the bad one"),
            (ConsumerRecord, 2, b"k2", b"after"), (ConsumerRecord, 3, b"k3", b"next batch")]
        assert records[1].headers == [("ok", b"2"), ("trace-\\xff\\xfe-id", b"v"), ("kernel-header-names-escaped", b"1")]
        assert "not UTF-8" in records[1].undecodable
        assert records[0].headers == [("ok", b"1")] and records[1].timestamp == 1_700_000_000_000
        # Fetched again from the bad record, or from the one after it (a restart after its dead letter).
        assert [r.offset for r in read(fetched, 1)] == [1, 2, 3] and [r.offset for r in read(fetched, 2)] == [2, 3]


def test_a_batch_that_fails_its_crc_check_is_an_undecodable_record_per_offset():
    good = batch(0, [(b"k0", b"first batch", [])])
    corrupt = bytearray(batch(1, [(b"k1", b"a", []), (b"k2", b"b", [])]))
    corrupt[corrupt.rindex(b"b")] = ord("c")  # the last record's value changed after the CRC was computed
    fetched = good + bytes(corrupt) + batch(3, [(b"k3", b"after", [])])
    records = read(fetched)
    assert [(type(r).__name__, r.offset) for r in records] == [
        ("ConsumerRecord", 0), ("UndecodableRecord", 1), ("UndecodableRecord", 2), ("ConsumerRecord", 3)]
    assert "failed crc check" in records[1].undecodable and records[1].value is None
    # Without CRC checks (KAFKA_CHECK_CRCS=false) the same bytes are read as they are.
    assert [r.value for r in read(fetched, check_crcs=False)] == [b"first batch", b"a", b"c", b"after"]


def test_a_record_whose_structure_is_broken_makes_the_rest_of_its_batch_undecodable():
    broken = bytearray(batch(0, [(b"k0", b"fine", []), (b"k1", b"x", []), (b"k2", b"y", [])]))
    broken[-1] = 0x03  # the last record's header count: -2 as a varint
    records = read(bytes(broken), check_crcs=False)
    assert [(type(r).__name__, r.offset) for r in records] == [
        ("ConsumerRecord", 0), ("ConsumerRecord", 1), ("UndecodableRecord", 2)]
    assert "CorruptRecordError" in records[2].undecodable


def test_an_undecodable_record_is_dead_lettered_never_handed_to_process_message():
    record = main.UndecodableRecord(*make_message(None, topic="t", offset=5), undecodable="why")
    calls = []
    outcome = main.process_task(main.LaneTask(TopicPartition("t", 0), [], [record]),
                                lambda message: calls.append(message) or True, main.StopSignal())
    assert calls == [] and outcome.finished == 0
    assert outcome.failure == main.TaskFailure(main.Consequence.DEAD_LETTER, "why", exception="CorruptRecordError")
    # With process_batch, the batch ends before it; alone, it is dead-lettered.
    good = make_message(b"v", topic="t", offset=4)
    outcome = main.process_batch_task(main.LaneTask(TopicPartition("t", 0), [], [good, record]),
                                      lambda messages: calls.append(messages) or True, main.StopSignal())
    assert calls == [[good]] and outcome.finished == 1 and outcome.failure is None
    outcome = main.process_batch_task(main.LaneTask(TopicPartition("t", 0), [], [record, good]),
                                      lambda messages: calls.append(messages) or True, main.StopSignal())
    assert calls == [[good]] and outcome.finished == 0 and outcome.failure.exception == "CorruptRecordError"
