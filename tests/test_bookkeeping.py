"""Unit tests for the loop's bookkeeping: what the worker reports, what gets committed, retries and
revocations, against a recording stand-in for KafkaConsumer."""

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
        self.paused_partitions = set()
        self.commit_error = None

    def pause(self, *partitions):
        self.paused_partitions |= set(partitions)
        self.calls.append(("pause", partitions))

    def resume(self, *partitions):
        self.paused_partitions -= set(partitions)
        self.calls.append(("resume", partitions))

    def paused(self):
        return set(self.paused_partitions)

    def seek(self, partition, offset):
        self.calls.append(("seek", partition, offset))

    def assignment(self):
        return self.assigned

    def commit(self, offsets, timeout_ms=None):
        if self.commit_error:
            raise self.commit_error
        self.calls.append(("commit", {tp: meta.offset for tp, meta in offsets.items()}))


def record(partition: TopicPartition, offset: int, value: bytes = b"v"):
    return ConsumerRecord(partition.topic, partition.partition, None, offset, 1_700_000_000_000, 0, b"k", value,
                          [("h", b"1")], None, 1, len(value), -1)


def results(mapping):
    """A process_message answering from `mapping` ((partition, offset) -> result), True otherwise."""
    def process_message(message):
        result = mapping.get((message.partition, message.offset), True)
        if isinstance(result, Exception):
            raise result
        return result
    return process_message


@pytest.fixture
def kernel(monkeypatch):
    settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_RETRY_INITIAL_MS": "1000"})
    kernel = main.Kernel(RecordingConsumer(), settings, main.StopSignal())
    kernel.owned = {P0, P1}
    yield kernel
    kernel.worker.shutdown()


def test_process_work_reports_the_offset_after_the_last_finished_message(monkeypatch):
    monkeypatch.setattr(main, "process_message", results({(0, 6): False}))
    work = main.Work(P0, [record(P0, 5), record(P0, 6), record(P0, 7)])
    main.process_work(work, main.StopSignal())
    assert (work.finished, work.failed.offset, work.current) == (6, 6, None)


def test_process_work_stops_after_the_message_in_hand(monkeypatch):
    stop = main.StopSignal()

    def stop_after_first(message):
        stop.requested = True
        return True

    monkeypatch.setattr(main, "process_message", stop_after_first)
    work = main.Work(P0, [record(P0, 0), record(P0, 1)])
    main.process_work(work, stop)
    assert work.finished == 1


@pytest.mark.parametrize("result, cause", [(ValueError("boom"), "boom"), (None, "must return True or False, got None")])
def test_an_exception_or_a_wrong_return_value_leaves_the_message_unfinished(monkeypatch, result, cause):
    monkeypatch.setattr(main, "process_message", results({(0, 6): result}))
    work = main.Work(P0, [record(P0, 5), record(P0, 6), record(P0, 7)])
    with pytest.raises(main.MessageFailed, match=r"t\[0\]@6") as failure:
        main.process_work(work, main.StopSignal())
    assert cause in str(failure.value.__cause__)
    assert work.finished == 6


def test_finished_offsets_are_committed_explicitly_and_once(kernel, monkeypatch):
    monkeypatch.setattr(main, "process_message", results({}))
    kernel.process(main.Work(P0, [record(P0, 5), record(P0, 6)]))
    kernel.process(main.Work(P1, [record(P1, 0)]))
    kernel.commit_finished()
    kernel.commit_finished()
    assert kernel.consumer.calls == [("commit", {P0: 7, P1: 1})]


def test_false_pauses_and_rewinds_the_partition_and_counts_attempts(kernel, monkeypatch):
    answers = {(0, 6): False}
    monkeypatch.setattr(main, "process_message", results(answers))
    kernel.process(main.Work(P0, [record(P0, 5), record(P0, 6), record(P0, 7)]))
    assert kernel.finished == {P0: 6}
    assert kernel.consumer.calls == [("pause", (P0,)), ("seek", P0, 6)]
    assert (kernel.retries[P0].offset, kernel.retries[P0].attempts) == (6, 1)
    assert 800 <= kernel.poll_timeout_ms() <= 1000

    kernel.retries[P0].due_s = 0  # due now
    kernel.resume_due_partitions()
    assert kernel.consumer.calls[-1] == ("resume", (P0,))
    kernel.process(main.Work(P1, [record(P1, 0)]))  # other partitions' work does not reset the count
    kernel.process(main.Work(P0, [record(P0, 6), record(P0, 7)]))
    assert kernel.retries[P0].attempts == 2

    answers[(0, 6)] = True
    kernel.retries[P0].due_s = 0
    kernel.resume_due_partitions()
    kernel.process(main.Work(P0, [record(P0, 6), record(P0, 7)]))
    assert kernel.finished[P0] == 8 and P0 not in kernel.retries


def test_exhausted_attempts_without_a_dead_letter_topic_stop_the_kernel(kernel, monkeypatch):
    kernel.settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_MAX_ATTEMPTS": "2"})
    monkeypatch.setattr(main, "process_message", results({(0, 6): False}))
    kernel.process(main.Work(P0, [record(P0, 5), record(P0, 6)]))
    with pytest.raises(main.RetriesExhausted, match=r"t\[0\]@6 returned False 2 times"):
        kernel.process(main.Work(P0, [record(P0, 6)]))
    assert kernel.finished == {P0: 6}


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


def test_revocation_commits_and_forgets_only_the_revoked_partitions(kernel, monkeypatch):
    monkeypatch.setattr(main, "process_message", results({(1, 4): False}))
    kernel.finished = {P0: 3}
    kernel.process(main.Work(P1, [record(P1, 3), record(P1, 4)]))
    kernel.consumer.calls.clear()
    main.RebalanceListener(kernel).on_partitions_revoked([P1])
    assert kernel.consumer.calls == [("commit", {P1: 4})]
    assert kernel.finished == {P0: 3} and kernel.retries == {} and kernel.owned == {P0}


def test_work_of_a_revoked_partition_is_not_committed_afterwards(kernel):
    work = main.Work(P1, [record(P1, 0)], finished=1)
    kernel.release({P1})
    kernel.settle(work)
    assert kernel.finished == {}, "committing for a partition we lost could move its offset backwards"


def test_dead_letter_headers_use_spring_kafka_names_and_encodings():
    headers = dict(main.dead_letter_headers(record(P1, 7), 3, "group", "the reason"))
    assert headers["kafka_dlt-original-topic"] == b"t"
    assert int.from_bytes(headers["kafka_dlt-original-partition"], "big") == 1
    assert int.from_bytes(headers["kafka_dlt-original-offset"], "big") == 7
    assert int.from_bytes(headers["kafka_dlt-original-timestamp"], "big") == 1_700_000_000_000
    assert headers["kafka_dlt-original-timestamp-type"] == b"CreateTime"
    assert headers["kafka_dlt-original-consumer-group"] == b"group"
    assert headers["kafka_dlt-exception-message"] == b"the reason"
    assert (headers["kernel-attempts"], headers["kernel-name"]) == (b"3", main.KERNEL_NAME.encode())
