"""Unit tests for the loop's offset bookkeeping, against a recording stand-in for KafkaConsumer."""

import pytest
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaTimeoutError

import main

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


class RecordingConsumer:
    def __init__(self):
        self.calls = []
        self.assigned = {P0, P1}
        self.commit_error = None

    def pause(self, *partitions):
        self.calls.append(("pause", partitions))

    def resume(self, *partitions):
        self.calls.append(("resume", partitions))

    def seek(self, partition, offset):
        self.calls.append(("seek", partition, offset))

    def assignment(self):
        return self.assigned

    def commit(self, offsets, timeout_ms=None):
        if self.commit_error:
            raise self.commit_error
        self.calls.append(("commit", {tp: meta.offset for tp, meta in offsets.items()}))


def record(partition: TopicPartition, offset: int, value: bytes = b"v"):
    return ConsumerRecord(partition.topic, partition.partition, None, offset, 0, 0, None, value, [], None, 0, len(value), -1)


@pytest.fixture
def kernel(monkeypatch):
    results = {}
    monkeypatch.setattr(main, "process_message", lambda message: results.get((message.partition, message.offset), True))
    settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_RETRY_INITIAL_MS": "1000"})
    kernel = main.Kernel(RecordingConsumer(), settings, main.StopSignal())
    kernel.results = results
    return kernel


def test_finished_offsets_are_committed_explicitly_and_once(kernel):
    kernel.process_partition(P0, [record(P0, 5), record(P0, 6)])
    kernel.process_partition(P1, [record(P1, 0)])
    kernel.commit_finished()
    kernel.commit_finished()
    assert kernel.consumer.calls == [("commit", {P0: 7, P1: 1})]


def test_false_pauses_and_rewinds_the_partition_and_counts_attempts(kernel):
    kernel.results[(0, 6)] = False
    kernel.process_partition(P0, [record(P0, 5), record(P0, 6), record(P0, 7)])
    assert kernel.finished == {P0: 6}
    assert kernel.consumer.calls == [("pause", (P0,)), ("seek", P0, 6)]
    assert kernel.retries[P0].offset == 6 and kernel.retries[P0].attempts == 1
    assert 900 <= kernel.poll_timeout_ms() <= 1000

    kernel.retries[P0].due_s = 1e-9  # due now
    kernel.resume_due_partitions()
    assert kernel.consumer.calls[-1] == ("resume", (P0,))
    kernel.process_partition(P0, [record(P0, 6), record(P0, 7)])
    assert kernel.retries[P0].attempts == 2, "attempts count the same message across polls"

    kernel.results[(0, 6)] = True
    kernel.retries[P0].due_s = 1e-9
    kernel.resume_due_partitions()
    kernel.process_partition(P0, [record(P0, 6), record(P0, 7)])
    assert kernel.finished == {P0: 8} and P0 not in kernel.retries


def test_an_exception_leaves_the_message_unfinished(kernel, monkeypatch):
    def explode(message):
        if message.offset == 6:
            raise ValueError("boom")
        return True

    monkeypatch.setattr(main, "process_message", explode)
    with pytest.raises(main.MessageFailed, match=r"t\[0\]@6"):
        kernel.process_partition(P0, [record(P0, 5), record(P0, 6), record(P0, 7)])
    assert kernel.finished == {P0: 6}


def test_a_stop_request_finishes_the_message_in_hand_only(kernel, monkeypatch):
    def stop_after_first(message):
        kernel.stop.requested = True
        return True

    monkeypatch.setattr(main, "process_message", stop_after_first)
    kernel.process_partition(P0, [record(P0, 0), record(P0, 1)])
    assert kernel.finished == {P0: 1}


def test_commit_failed_by_a_rebalance_forgets_only_lost_partitions(kernel):
    kernel.finished = {P0: 3, P1: 4}
    kernel.consumer.assigned = {P1}
    kernel.consumer.commit_error = CommitFailedError()
    kernel.commit_finished()
    assert kernel.finished == {P1: 4}, "a lost partition must not be committed later by us"


def test_commit_failed_by_a_lost_connection_keeps_everything(kernel):
    kernel.finished = {P0: 3}
    kernel.consumer.commit_error = KafkaTimeoutError()
    kernel.commit_finished()
    assert kernel.finished == {P0: 3}


def test_revocation_commits_and_forgets_only_the_revoked_partitions(kernel):
    kernel.finished = {P0: 3, P1: 4}
    kernel.results[(1, 4)] = False
    kernel.process_partition(P1, [record(P1, 4)])
    kernel.consumer.calls.clear()
    main.RebalanceListener(kernel).on_partitions_revoked([P1])
    assert kernel.consumer.calls == [("commit", {P1: 4})]
    assert kernel.finished == {P0: 3} and kernel.retries == {}
