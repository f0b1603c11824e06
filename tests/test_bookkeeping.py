"""Unit tests for the loop's bookkeeping — lanes, finished prefixes, retries, revocations — with the
real worker threads and a recording stand-in for KafkaConsumer."""

import threading
import time

import pytest
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaTimeoutError
from kafka.producer.future import FutureProduceResult, FutureRecordMetadata

import main

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


class RecordingConsumer:
    config = {"api_version": (2, 8)}

    def __init__(self):
        self.calls = []
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

    def commit(self, offsets, timeout_ms=None):
        if self.commit_error:
            raise self.commit_error
        self.calls.append(("commit", {tp: meta.offset for tp, meta in offsets.items()}))

    def commits(self):
        return [call[1] for call in self.calls if call[0] == "commit"]


def record(partition: TopicPartition, offset: int, key: bytes | None = b"k"):
    return ConsumerRecord(partition.topic, partition.partition, None, offset, 1_700_000_000_000, 0, key, b"v",
                          [("h", b"1")], None, 1, 1, -1)


def answers(mapping):
    """A process_message answering from `mapping` ((partition, offset) -> result), True otherwise."""
    def process_message(message):
        result = mapping.get((message.partition, message.offset), True)
        if isinstance(result, Exception):
            raise result
        return result
    return process_message


def make_kernel(**env):
    settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_RETRY_INITIAL_MS": "1000",
                                   "KAFKA_MAX_POLL_RECORDS": "4", **env})
    kernel = main.Kernel(RecordingConsumer(), settings, main.StopSignal())
    kernel.assign({P0, P1})
    return kernel


def settle_all(kernel):
    """Hand out every ready lane and settle what comes back, until nothing is in flight."""
    kernel.hand_out_ready_lanes()
    while kernel.in_flight:
        assert kernel.settle_returned(timeout_s=5), "a worker did not hand its work back"
        kernel.hand_out_ready_lanes()


def test_process_work_counts_finished_messages_and_stops_at_false(monkeypatch):
    monkeypatch.setattr(main, "process_message", answers({(0, 6): False}))
    work = main.Work(main.Lane(P0, None), [record(P0, 5), record(P0, 6), record(P0, 7)])
    main.process_work(work, main.StopSignal())
    assert (work.done, work.failed) == (1, "process_message returned False")


def test_process_work_stops_after_the_message_in_hand(monkeypatch):
    stop = main.StopSignal()

    def stop_after_first(message):
        stop.requested = True
        return True

    monkeypatch.setattr(main, "process_message", stop_after_first)
    work = main.Work(main.Lane(P0, None), [record(P0, 0), record(P0, 1)])
    main.process_work(work, stop)
    assert work.done == 1


@pytest.mark.parametrize("result, cause", [(ValueError("boom"), "boom"), (None, "must return True or False, got None")])
def test_an_exception_or_a_wrong_return_value_is_fatal(monkeypatch, result, cause):
    monkeypatch.setattr(main, "process_message", answers({(0, 6): result}))
    kernel = make_kernel()
    kernel.distribute({P0: [record(P0, 5), record(P0, 6), record(P0, 7)]})
    with pytest.raises(main.MessageFailed, match=r"t\[0\]@6") as failure:
        settle_all(kernel)
    assert cause in str(failure.value.__cause__)
    kernel.commit_progress(force=True)
    assert kernel.consumer.commits() == [{P0: 6}]


def test_finished_prefixes_are_committed_explicitly_and_once(monkeypatch):
    monkeypatch.setattr(main, "process_message", answers({}))
    kernel = make_kernel()
    kernel.distribute({P0: [record(P0, 5), record(P0, 6)], P1: [record(P1, 0)]})
    settle_all(kernel)
    kernel.commit_progress()
    kernel.commit_progress()
    assert kernel.consumer.commits() == [{P0: 7, P1: 1}]
    assert kernel.unfinished == 0 and kernel.partitions[P0].lanes == {}


def test_the_commit_never_passes_an_unfinished_message():
    state = main.PartitionState(fetched_end=10)
    slow, fast = main.Lane(P0, b"slow"), main.Lane(P0, b"fast")
    slow.work = main.Work(slow, [record(P0, 4), record(P0, 7)], done=1)  # 4 done, 7 in process_message
    fast.records.extend([record(P0, 9)])
    state.lanes = {b"slow": slow, b"fast": fast}
    assert state.next_commit() == 7
    slow.work.done = 2
    assert state.next_commit() == 9
    fast.records.clear()
    assert state.next_commit() == 10


def test_false_holds_its_partition_at_concurrency_one_and_counts_attempts(monkeypatch):
    results = {(0, 6): False}
    monkeypatch.setattr(main, "process_message", answers(results))
    kernel = make_kernel()
    kernel.distribute({P0: [record(P0, 5), record(P0, 6, key=b"a"), record(P0, 7, key=b"b")]})
    settle_all(kernel)
    kernel.commit_progress()
    lane = kernel.partitions[P0].lanes[None]
    assert [r.offset for r in lane.records] == [6, 7], "the message after it must wait"
    assert (lane.retry.offset, lane.retry.attempts) == (6, 1) and lane in kernel.retrying
    assert 800 <= kernel.poll_timeout_ms() <= 1000

    lane.retry.due_s = 0  # due now
    settle_all(kernel)
    assert lane.retry.attempts == 2
    results[(0, 6)] = True
    lane.retry.due_s = 0
    settle_all(kernel)
    kernel.commit_progress()
    assert kernel.consumer.commits() == [{P0: 6}, {P0: 8}]
    assert kernel.retrying == set()


def test_false_holds_only_its_key_with_concurrency(monkeypatch):
    monkeypatch.setattr(main, "process_message", answers({(0, 6): False}))
    kernel = make_kernel(KERNEL_CONCURRENCY="4")
    kernel.distribute({P0: [record(P0, 5, b"a"), record(P0, 6, b"b"), record(P0, 7, b"a"), record(P0, 8, b"b")]})
    settle_all(kernel)
    lanes = kernel.partitions[P0].lanes
    assert set(lanes) == {b"b"} and [r.offset for r in lanes[b"b"].records] == [6, 8]
    kernel.commit_progress()
    assert kernel.consumer.commits() == [{P0: 6}], "key a finished 7, but 6 is not done"


def test_exhausted_attempts_without_a_dead_letter_topic_stop_the_kernel(monkeypatch):
    monkeypatch.setattr(main, "process_message", answers({(0, 6): False}))
    kernel = make_kernel(KERNEL_MAX_ATTEMPTS="2")
    kernel.distribute({P0: [record(P0, 5), record(P0, 6)]})
    settle_all(kernel)
    kernel.partitions[P0].lanes[None].retry.due_s = 0
    with pytest.raises(main.NoDeadLetterTopic, match=r"t\[0\]@6: process_message returned False on all 2 attempts"):
        settle_all(kernel)
    kernel.commit_progress(force=True)
    assert kernel.consumer.commits() == [{P0: 6}]


def test_back_pressure_pauses_a_partition_with_two_polls_unfinished_and_resumes_below_one(monkeypatch):
    kernel = make_kernel()
    kernel.distribute({P0: [record(P0, offset) for offset in range(8)]})
    kernel.apply_back_pressure()
    assert kernel.consumer.paused() == {P0}
    monkeypatch.setattr(main, "process_message", answers({}))
    settle_all(kernel)
    kernel.apply_back_pressure()
    assert kernel.consumer.paused() == set()


def test_failed_commits_keep_the_offsets_for_later(monkeypatch):
    monkeypatch.setattr(main, "process_message", answers({}))
    kernel = make_kernel()
    kernel.distribute({P0: [record(P0, 3)]})
    settle_all(kernel)
    for error in (KafkaTimeoutError(), CommitFailedError()):
        kernel.consumer.commit_error = error
        kernel.commit_progress()
    kernel.consumer.commit_error = None
    kernel.commit_progress()
    assert kernel.consumer.commits() == [{P0: 4}]


def test_revocation_commits_and_forgets_only_the_revoked_partitions(monkeypatch):
    monkeypatch.setattr(main, "process_message", answers({(1, 4): False}))
    kernel = make_kernel()
    kernel.distribute({P0: [record(P0, 2)], P1: [record(P1, 3), record(P1, 4)]})
    settle_all(kernel)
    main.RebalanceListener(kernel).on_partitions_revoked([P1])
    assert kernel.consumer.commits() == [{P1: 4}]
    assert set(kernel.partitions) == {P0} and kernel.retrying == set() and kernel.unfinished == 0


def test_revocation_waits_for_the_message_in_hand_and_stops_the_rest(monkeypatch):
    started, release = threading.Event(), threading.Event()

    def blocking(message):
        if message.offset == 0:
            started.set()
            release.wait(5)
        return True

    monkeypatch.setattr(main, "process_message", blocking)
    kernel = make_kernel()
    kernel.distribute({P0: [record(P0, 0), record(P0, 1)], P1: [record(P1, 7)]})
    kernel.hand_out_ready_lanes()
    assert started.wait(5)
    threading.Timer(0.3, release.set).start()
    main.RebalanceListener(kernel).on_partitions_revoked([P0])
    assert kernel.consumer.commits() == [{P0: 1}], "offset 0 finished in hand; offset 1 left for the next owner"
    assert set(kernel.partitions) == {P1}
    settle_all(kernel)  # P1's work, handed back during the revocation, is settled by the loop
    kernel.commit_progress()
    assert kernel.consumer.commits()[-1] == {P1: 8}
    assert kernel.unfinished == 0


def test_dead_letter_headers_use_spring_kafka_names_and_encodings():
    headers = dict(main.dead_letter_headers(record(P1, 7), 3, "group", "DeadLetter", "the reason"))
    assert headers["kafka_dlt-original-topic"] == b"t"
    assert int.from_bytes(headers["kafka_dlt-original-partition"], "big") == 1
    assert int.from_bytes(headers["kafka_dlt-original-offset"], "big") == 7
    assert int.from_bytes(headers["kafka_dlt-original-timestamp"], "big") == 1_700_000_000_000
    assert headers["kafka_dlt-original-timestamp-type"] == b"CreateTime"
    assert headers["kafka_dlt-original-consumer-group"] == b"group"
    assert (headers["kafka_dlt-exception-fqcn"], headers["kafka_dlt-exception-message"]) == (b"DeadLetter", b"the reason")
    assert (headers["kernel-attempts"], headers["kernel-name"]) == (b"3", main.KERNEL_NAME.encode())


class PendingOutput:
    """A stand-in for the kernel's producer whose sends the test confirms or fails by hand."""

    timeout_s = 0.2

    def __init__(self):
        self.futures: list[tuple[str, bytes | None, FutureRecordMetadata]] = []

    def send(self, topic, key, value, headers):
        produced = FutureProduceResult(TopicPartition(topic, 0))
        future = FutureRecordMetadata(produced, 0, 0, None, 0, 0, 0)
        self.futures.append((topic, value, produced))
        return future


def forward(message):
    main.send("out", message.value)
    return True


def test_a_message_counts_as_done_only_once_what_it_sent_is_confirmed(monkeypatch):
    monkeypatch.setattr(main, "process_message", forward)
    output = PendingOutput()
    work = main.Work(main.Lane(P0, None), [record(P0, 5), record(P0, 6)])
    worker = threading.Thread(target=main.process_work, args=(work, main.StopSignal(), output))
    output.timeout_s = 5
    worker.start()
    wait_for(lambda: len(output.futures) == 2)
    assert work.done == 0, "nothing may be committed while its output could still be lost"
    output.futures[0][2].success((0, -1, None))
    wait_for(lambda: work.done == 1)
    output.futures[1][2].success((1, -1, None))
    worker.join(timeout=5)
    assert (work.done, work.failed) == (2, None)


def test_an_undelivered_send_stops_the_work_at_its_message_to_be_tried_again(monkeypatch):
    monkeypatch.setattr(main, "process_message", forward)
    output = PendingOutput()
    work = main.Work(main.Lane(P0, None), [record(P0, 5), record(P0, 6), record(P0, 7)])
    worker = threading.Thread(target=main.process_work, args=(work, main.StopSignal(), output))
    output.timeout_s = 5
    worker.start()
    wait_for(lambda: len(output.futures) == 3)
    output.futures[1][2].failure(KafkaTimeoutError("no broker"))
    output.futures[0][2].success((0, -1, None))
    worker.join(timeout=10)
    assert (work.done, work.failed) == (1, "a message it sent was not delivered (KafkaTimeoutError('no broker'))")

    unconfirmed = main.Work(main.Lane(P0, None), [record(P0, 5)])
    main.process_work(unconfirmed, main.StopSignal(), PendingOutput())  # never confirmed: 0.2 s timeout
    assert unconfirmed.done == 0 and "KafkaTimeoutError" in unconfirmed.failed


def test_dead_letter_without_a_dead_letter_topic_stops_the_kernel_uncommitted(monkeypatch):
    monkeypatch.setattr(main, "process_message", answers({(0, 6): main.DeadLetter("not an event")}))
    kernel = make_kernel()
    kernel.distribute({P0: [record(P0, 5), record(P0, 6), record(P0, 7)]})
    with pytest.raises(main.NoDeadLetterTopic, match=r"t\[0\]@6: not an event"):
        settle_all(kernel)
    kernel.commit_progress(force=True)
    assert kernel.consumer.commits() == [{P0: 6}]


def test_dead_letter_is_published_with_its_reason_then_passed(monkeypatch):
    monkeypatch.setattr(main, "process_message", answers({(0, 6): main.DeadLetter("not an event")}))
    kernel = make_kernel(KERNEL_DEAD_LETTER_TOPIC="dlt")
    kernel.output = output = PendingOutput()
    kernel.distribute({P0: [record(P0, 5), record(P0, 6), record(P0, 7)]})
    kernel.hand_out_ready_lanes()
    assert kernel.settle_returned(timeout_s=5)  # 5 done, 6 rejected: its dead letter goes unconfirmed
    assert [(topic, value) for topic, value, _ in output.futures] == [("dlt", b"v")]
    assert list(kernel.partitions[P0].lanes[None].records)[0].offset == 6, "kept while the publish failed"
    kernel.partitions[P0].lanes[None].retry.due_s = 0
    threading.Timer(0.05, lambda: output.futures[1][2].success((0, -1, None))).start()
    output.timeout_s = 5
    settle_all(kernel)
    kernel.commit_progress(force=True)
    assert kernel.consumer.commits()[-1] == {P0: 8}
    assert kernel.metrics.dead_lettered.labels("t")._value.get() == 1


def wait_for(condition, timeout_s: float = 5):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
