"""Unit tests of the consumer loop — lanes, finished prefixes, retries, dead letters, revocations,
back-pressure — with the real worker threads and a recording stand-in for KafkaConsumer."""

import re
import threading
import time
import types

import prometheus_client
import pytest
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaTimeoutError
from kafka.producer.future import FutureProduceResult, FutureRecordMetadata

import main
from main import Consequence, TaskFailure
from tests.kit import make_message

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


class RecordingConsumer:
    config = {"api_version": (2, 8)}

    def __init__(self):
        self._fetcher = FetcherConfig()
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


class FetcherConfig:
    """What the loop changes of kafka-python's fetcher: the size of each partition's fetch."""

    def __init__(self):
        self.config = {}


def record(partition: TopicPartition, offset: int, key: bytes | None = b"k"):
    return make_message(b"v", key, topic=partition.topic, partition=partition.partition, offset=offset,
                        headers=[("h", b"1")], timestamp_ms=1_700_000_000_000)


def answers(mapping):
    """A process_message answering from `mapping` ((partition, offset) -> result), True otherwise."""
    def process_message(message):
        result = mapping.get((message.partition, message.offset), True)
        if isinstance(result, BaseException):
            raise result
        return result
    return process_message


def make_loop(handler=None, **env):
    settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_RETRY_INITIAL_MS": "1000",
                                   "KAFKA_MAX_POLL_RECORDS": "4", **env}, "test-kernel", "t")
    loop = main.ConsumerLoop(RecordingConsumer(), settings, main.KernelHandler(handler or answers({})), main.StopSignal())
    loop.assigned({P0, P1})
    return loop


def settle_all(loop):
    """Hand out every ready lane and settle what comes back, until nothing is in flight."""
    loop.hand_out()
    while loop.ledger.in_flight:
        assert loop.settle_handed_back(timeout_s=5), "a worker did not hand its task back"
        loop.hand_out()


def task_of(records):
    return main.LaneTask(P0, [main.Lane(P0, None)], records)


def test_process_task_counts_finished_messages_and_stops_at_false():
    task = task_of([record(P0, 5), record(P0, 6), record(P0, 7)])
    outcome = main.process_task(task, answers({(0, 6): False}), main.StopSignal())
    assert (outcome.finished, outcome.failure) == (1, TaskFailure(Consequence.RETRY, "process_message returned False"))


def test_process_task_stops_after_the_message_in_hand():
    stop = main.StopSignal()

    def stop_after_first(message):
        stop.requested = True
        return True

    task = task_of([record(P0, 0), record(P0, 1)])
    assert main.process_task(task, stop_after_first, stop).finished == 1


def test_handler_tallies_add_up_what_each_worker_thread_counted_as_a_histogram_and_a_counter_would():
    """The workers count call times and finished messages without a lock, each in tallies of its
    own; /metrics must show what prometheus_client's own Histogram and Counter would for the same
    calls, the counter once the loop has added the tallies to it (again only what is new)."""
    metrics, reference = main.KernelMetrics(), prometheus_client.CollectorRegistry()
    histogram = prometheus_client.Histogram("kernel_processing_seconds", "", ["topic"], registry=reference)
    counter = prometheus_client.Counter("kernel_messages_processed", "", ["topic"], registry=reference)
    calls = {"a": [0.001, 0.005, 0.02, 0.02, 3.0, 60.0], "b": [0.3]}

    def worker(share):
        for topic, seconds in calls.items():
            for value in seconds[share::3]:
                tally = metrics.calls.tally(topic)
                main.HandlerTallies.count_call(tally, value)
                tally[main.HandlerTallies.PROCESSED] += 1
                histogram.labels(topic).observe(value)
                counter.labels(topic).inc()

    def run_workers():
        threads = [threading.Thread(target=worker, args=(share,)) for share in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def samples(registry):
        return sorted((sample.name, tuple(sorted(sample.labels.items())), round(sample.value, 9))
                      for family in registry.collect() if family.name.startswith("kernel_processing_seconds")
                      or family.name == "kernel_messages_processed"
                      for sample in family.samples if not sample.name.endswith("_created"))

    run_workers()
    assert len(metrics.calls.tallies) == 3
    assert ("kernel_processing_seconds_bucket", (("le", "0.025"), ("topic", "a")), 4) in samples(metrics.registry)
    assert not [s for s in samples(metrics.registry) if s[0] == "kernel_messages_processed_total"], "not added yet"
    metrics.calls.add_processed()
    assert samples(metrics.registry) == samples(reference)
    for _ in range(2):  # a thread counting on between additions: only what is new is added
        worker(0)
        metrics.calls.add_processed()
        assert samples(metrics.registry) == samples(reference)


def test_what_the_loop_commits_is_on_the_processed_counter_first():
    """The workers' tallies are added to the counter before each commit: a kernel killed right after
    one (the local runner sums the counters of its runs) has counted what it committed."""
    loop = make_loop(KERNEL_HTTP_PORT="8080")  # per-message metrics, as when /metrics is served
    loop.ledger.add(P0, [record(P0, 0), record(P0, 1)])
    settle_all(loop)
    assert loop.metrics.processed.labels("t")._value.get() == 0, "counted by the workers, not added yet"
    loop.commit()
    assert loop.consumer.commits() == [{P0: 2}] and loop.metrics.processed.labels("t")._value.get() == 2


def test_the_watchdog_reads_a_tasks_progress_once_while_its_worker_moves_it():
    """The watchdog looks at tasks while workers run them: one that finishes between two reads of
    task.progress must not send it past the end of the task's records."""

    class Finishing(main.LaneTask):  # running (long: worth a warning) when the watchdog first looks, finished after
        reads = iter([(0, 1.0)] + [(1, 1.0)] * 10)
        progress = property(lambda self: next(self.reads), lambda self, value: None)

    loop = make_loop()
    task = Finishing(P0, [main.Lane(P0, None)], [record(P0, 0)])
    loop.ledger.in_flight.add(task)
    loop.watchdog.watch_in_flight()


@pytest.mark.parametrize("result, cause", [(ValueError("boom"), "boom"), (None, "must return True or False, got None")])
def test_an_exception_or_a_wrong_return_value_is_fatal(result, cause):
    loop = make_loop(answers({(0, 6): result}))
    loop.ledger.add(P0, [record(P0, 5), record(P0, 6), record(P0, 7)])
    with pytest.raises(main.MessageFailed, match=r"t\[0\]@6") as failure:
        settle_all(loop)
    assert cause in str(failure.value.__cause__)
    loop.commit(force=True)
    assert loop.consumer.commits() == [{P0: 6}]


def test_finished_prefixes_are_committed_explicitly_and_once():
    loop = make_loop()
    loop.ledger.add(P0, [record(P0, 5), record(P0, 6)])
    loop.ledger.add(P1, [record(P1, 0)])
    settle_all(loop)
    loop.commit()
    loop.commit()
    assert loop.consumer.commits() == [{P0: 7, P1: 1}]
    assert loop.ledger.unfinished == 0 and not any(lane.records or lane.task
                                                   for lane in loop.ledger.partitions[P0].lanes.values())


def test_false_holds_its_partition_at_concurrency_one_and_counts_attempts():
    results = {(0, 6): False}
    loop = make_loop(answers(results))
    loop.ledger.add(P0, [record(P0, 5), record(P0, 6, key=b"a"), record(P0, 7, key=b"b")])
    settle_all(loop)
    loop.commit()
    lane = loop.ledger.partitions[P0].lanes[None]
    assert [r.offset for r in lane.records] == [6, 7], "the message after it must wait"
    assert (lane.retry.offset, lane.retry.attempts) == (6, 1) and lane in loop.ledger.retrying
    assert 800 <= loop.poll_timeout_ms() <= 1000

    lane.retry.due_s = 0  # due now
    settle_all(loop)
    assert lane.retry.attempts == 2
    results[(0, 6)] = True
    lane.retry.due_s = 0
    settle_all(loop)
    loop.commit()
    assert loop.consumer.commits() == [{P0: 6}, {P0: 8}]
    assert loop.ledger.retrying == set()


def test_false_holds_only_its_key_with_concurrency():
    loop = make_loop(answers({(0, 6): False}), KERNEL_CONCURRENCY="4")
    loop.ledger.add(P0, [record(P0, 5, b"a"), record(P0, 6, b"b"), record(P0, 7, b"a"), record(P0, 8, b"b")])
    settle_all(loop)
    lanes = loop.ledger.partitions[P0].lanes
    assert not lanes[b"a"].records and [r.offset for r in lanes[b"b"].records] == [6, 8]
    loop.commit()
    assert loop.consumer.commits() == [{P0: 6}], "key a finished 7, but 6 is not done"


def test_exhausted_attempts_without_a_dead_letter_topic_stop_the_kernel():
    loop = make_loop(answers({(0, 6): False}), KERNEL_MAX_ATTEMPTS="2")
    loop.ledger.add(P0, [record(P0, 5), record(P0, 6)])
    settle_all(loop)
    loop.ledger.partitions[P0].lanes[None].retry.due_s = 0
    with pytest.raises(main.NoDeadLetterTopic, match=r"t\[0\]@6: process_message returned False on all 2 attempts"):
        settle_all(loop)
    loop.commit(force=True)
    assert loop.consumer.commits() == [{P0: 6}]


def test_back_pressure_pauses_a_partition_with_two_polls_unfinished_and_resumes_below_one():
    loop = make_loop()
    loop.ledger.add(P0, [record(P0, offset) for offset in range(8)])
    loop.budget.apply()
    assert loop.consumer.paused() == {P0}
    settle_all(loop)
    loop.budget.apply()
    assert loop.consumer.paused() == set()


def test_failed_commits_keep_the_offsets_for_later():
    loop = make_loop()
    loop.ledger.add(P0, [record(P0, 3)])
    settle_all(loop)
    for error in (KafkaTimeoutError(), CommitFailedError()):
        loop.consumer.commit_error = error
        loop.commit()
    loop.consumer.commit_error = None
    loop.commit()
    assert loop.consumer.commits() == [{P0: 4}]


def test_revocation_commits_and_forgets_only_the_revoked_partitions():
    loop = make_loop(answers({(1, 4): False}))
    loop.ledger.add(P0, [record(P0, 2)])
    loop.ledger.add(P1, [record(P1, 3), record(P1, 4)])
    settle_all(loop)
    main.RebalanceListener(loop).on_partitions_revoked([P1])
    assert loop.consumer.commits() == [{P1: 4}]
    assert set(loop.ledger.partitions) == {P0} and loop.ledger.retrying == set() and loop.ledger.unfinished == 0


def test_revocation_waits_for_the_message_in_hand_and_stops_the_rest():
    started, release = threading.Event(), threading.Event()

    def blocking(message):
        if message.offset == 0:
            started.set()
            release.wait(5)
        return True

    loop = make_loop(blocking)
    loop.ledger.add(P0, [record(P0, 0), record(P0, 1)])
    loop.ledger.add(P1, [record(P1, 7)])
    loop.hand_out()
    assert started.wait(5)
    threading.Timer(0.3, release.set).start()
    main.RebalanceListener(loop).on_partitions_revoked([P0])
    assert loop.consumer.commits() == [{P0: 1}], "offset 0 finished in hand; offset 1 left for the next owner"
    assert set(loop.ledger.partitions) == {P1}
    settle_all(loop)  # P1's task, handed back during the revocation, is settled by the loop
    loop.commit()
    assert loop.consumer.commits()[-1] == {P1: 8}
    assert loop.ledger.unfinished == 0


def test_dead_letter_headers_use_spring_kafka_names_and_encodings():
    headers = dict(main.dead_letter_headers(record(P1, 7), 3, "group", "DeadLetter", "the reason", main.KERNEL_NAME))
    assert headers["kafka_dlt-original-topic"] == b"t"
    assert int.from_bytes(headers["kafka_dlt-original-partition"], "big") == 1
    assert int.from_bytes(headers["kafka_dlt-original-offset"], "big") == 7
    assert int.from_bytes(headers["kafka_dlt-original-timestamp"], "big") == 1_700_000_000_000
    assert headers["kafka_dlt-original-timestamp-type"] == b"CreateTime"
    assert headers["kafka_dlt-original-consumer-group"] == b"group"
    assert (headers["kafka_dlt-exception-fqcn"], headers["kafka_dlt-exception-message"]) == (b"DeadLetter", b"the reason")
    assert (headers["kernel-attempts"], headers["kernel-name"]) == (b"3", main.KERNEL_NAME.encode())


class PendingProducer:
    """A stand-in for the kernel's producer whose sends the test confirms or fails by hand."""

    timeout_s = 0.2

    def __init__(self):
        self.futures: list[tuple[str, bytes | None, FutureRecordMetadata]] = []

    def send(self, topic, key, value, headers):
        produced = FutureProduceResult(TopicPartition(topic, 0))
        future = FutureRecordMetadata(produced, 0, 0, None, 0, 0, 0)
        self.futures.append((topic, value, produced))
        self.headers = headers
        return future


def forward(message):
    main.send("out", message.value)
    return True


def test_a_message_counts_as_done_only_once_what_it_sent_is_confirmed():
    producer = PendingProducer()
    task, outcomes = task_of([record(P0, 5), record(P0, 6)]), []
    worker = threading.Thread(target=lambda: outcomes.append(main.process_task(task, forward, main.StopSignal(),
                                                                               producer)))
    producer.timeout_s = 5
    worker.start()
    wait_for(lambda: len(producer.futures) == 2)
    assert task.progress[0] == 0, "nothing may be committed while its output could still be lost"
    time.sleep(0.3)
    producer.futures[0][2].success((0, -1, None))
    wait_for(lambda: task.progress[0] == 1)
    producer.futures[1][2].success((1, -1, None))
    worker.join(timeout=5)
    assert (outcomes[0].finished, outcomes[0].failure) == (2, None)
    assert outcomes[0].seconds < 0.2, "the handler's pace (Ledger.message_s), without the wait for confirmations"


def test_an_undelivered_send_stops_the_task_at_its_message_to_be_tried_again():
    producer = PendingProducer()
    task, outcomes = task_of([record(P0, 5), record(P0, 6), record(P0, 7)]), []
    worker = threading.Thread(target=lambda: outcomes.append(main.process_task(task, forward, main.StopSignal(),
                                                                               producer)))
    producer.timeout_s = 5
    worker.start()
    wait_for(lambda: len(producer.futures) == 3)
    producer.futures[1][2].failure(KafkaTimeoutError("no broker"))
    producer.futures[0][2].success((0, -1, None))
    worker.join(timeout=10)
    assert (outcomes[0].finished, outcomes[0].failure) == (1, TaskFailure(
        Consequence.RETRY, "a message it sent was not delivered (KafkaTimeoutError('no broker'))"))

    # never confirmed: 0.2 s timeout
    unconfirmed = main.process_task(task_of([record(P0, 5)]), forward, main.StopSignal(), PendingProducer())
    assert unconfirmed.finished == 0 and "KafkaTimeoutError" in unconfirmed.failure.reason


def test_dead_letter_without_a_dead_letter_topic_stops_the_kernel_uncommitted():
    loop = make_loop(answers({(0, 6): main.DeadLetter("not an event")}))
    loop.ledger.add(P0, [record(P0, 5), record(P0, 6), record(P0, 7)])
    with pytest.raises(main.NoDeadLetterTopic, match=r"t\[0\]@6: not an event"):
        settle_all(loop)
    loop.commit(force=True)
    assert loop.consumer.commits() == [{P0: 6}]


def test_dead_letter_is_published_with_its_reason_then_passed():
    loop = make_loop(answers({(0, 6): main.DeadLetter("not an event")}), KERNEL_DEAD_LETTER_TOPIC="dlt")
    loop.producer = loop.failures.dead_letters.producer = producer = PendingProducer()
    loop.ledger.add(P0, [record(P0, 5), record(P0, 6), record(P0, 7)])
    loop.hand_out()
    assert loop.settle_handed_back(timeout_s=5)  # 5 done, 6 rejected: its dead letter goes unconfirmed
    assert [(topic, value) for topic, value, _ in producer.futures] == [("dlt", b"v")]
    assert dict(producer.headers)["kernel-name"] == b"test-kernel", "the name the kernel runs under"
    assert list(loop.ledger.partitions[P0].lanes[None].records)[0].offset == 6, "kept while the publish failed"
    loop.ledger.partitions[P0].lanes[None].retry.due_s = 0
    threading.Timer(0.05, lambda: producer.futures[1][2].success((0, -1, None))).start()
    producer.timeout_s = 5
    settle_all(loop)
    loop.commit(force=True)
    assert loop.consumer.commits()[-1] == {P0: 8}
    assert loop.metrics.dead_lettered.labels("t")._value.get() == 1


def test_a_worker_dead_letters_and_goes_on_without_waiting_for_the_dead_letter():
    """A topic whose messages all raise DeadLetter goes at the pace of sends: the worker sends the dead
    letter and calls process_message on the next record at once, in the same task; the record counts
    as finished, and is committed past, only once the dead-letter topic confirmed it."""
    calls = []

    def reject_six(message):
        calls.append((message.offset, len(producer.futures)))
        return answers({(0, 6): main.DeadLetter("not an event")})(message)

    loop = make_loop(reject_six, KERNEL_DEAD_LETTER_TOPIC="dlt")
    loop.producer = loop.failures.dead_letters.producer = producer = PendingProducer()
    producer.timeout_s = 5
    loop.ledger.add(P0, [record(P0, 5), record(P0, 6), record(P0, 7)])
    loop.hand_out()
    wait_for(lambda: len(calls) == 3)
    assert calls == [(5, 0), (6, 0), (7, 1)], "7 while 6's dead letter was still unconfirmed"
    assert loop.ledger.in_flight and loop.workers.next_back(0.2) is None, "the task waits for it"
    loop.commit(force=True)
    assert loop.consumer.commits() == [{P0: 6}], "6 not committed past before its dead letter is confirmed"
    producer.futures[0][2].success((0, -1, None))
    settle_all(loop)
    loop.commit(force=True)
    assert loop.consumer.commits()[-1] == {P0: 8} and [topic for topic, _, _ in producer.futures] == ["dlt"]
    assert loop.metrics.dead_lettered.labels("t")._value.get() == 1


class ScriptedProducer:
    """Confirms each send at once, except as `answer` says (from the topic, key, value and the count of
    sends so far, this one included): (seconds, error), a broker's answer after that long, failing
    with the error unless it is None. Keeps the dead-letter topic's sends as (offset, key, value)."""

    timeout_s = 5

    def __init__(self, answer):
        self.answer, self.sends, self.dead_letters = answer, 0, []

    def send(self, topic, key, value, headers):
        self.sends += 1
        if topic == "dlt":
            self.dead_letters.append((int.from_bytes(dict(headers)["kafka_dlt-original-offset"], "big"), key, value))
        if (answer := self.answer(topic, key, value, self.sends)) is None:
            return main.kafka.future.Future().success(None)
        seconds, error = answer
        produced = FutureProduceResult(TopicPartition(topic, 0))
        threading.Timer(seconds, lambda: produced.success((0, -1, None)) if error is None
                        else produced.failure(error)).start()
        return FutureRecordMetadata(produced, 0, 0, None, 0, 0, 0)


def settle_with_retries(loop, rounds: int = 20):
    """settle_all(), the retries made due at once, until the ledger holds nothing more."""
    for _ in range(rounds):
        settle_all(loop)
        for lane in loop.ledger.partitions[P0].lanes.values():
            if lane.retry is not None:
                lane.retry.due_s = 0
        if not loop.ledger.unfinished:
            return


def test_a_dead_letter_too_large_goes_again_without_its_value_then_its_key_from_the_worker_and_once(caplog):
    """The dead-letter topic refuses a letter as too large (after the worker went on): the worker sends
    it again without its value, then without its key too, each waited for as long as the first; the
    letters after it go once, and nothing is processed twice."""
    calls = []

    def reject_all(message):
        calls.append(message.offset)
        raise main.DeadLetter("no")

    too_large = main.kafka.errors.MessageSizeTooLargeError("too large")
    loop = make_loop(reject_all, KERNEL_DEAD_LETTER_TOPIC="dlt")
    loop.producer = loop.failures.dead_letters.producer = producer = ScriptedProducer(  # answers in 0.3 s of 0.5
        lambda topic, key, value, _: (0.3, too_large if len(key or b"") + len(value) > 10 else None))
    producer.timeout_s = 0.5
    loop.ledger.add(P0, [make_message(b"x" * 20, b"y" * 20, topic="t", offset=5), record(P0, 6)])
    settle_with_retries(loop)
    loop.commit(force=True)
    assert producer.dead_letters == [(5, b"y" * 20, b"x" * 20), (6, b"k", b"v"), (5, b"y" * 20, b""), (5, None, b"")]
    assert calls == [5, 6] and "Could not publish" not in caplog.text
    assert ("Dead-lettered t[0]@5 to dlt (without its value of 20 bytes and its key of 20 bytes, too large for the "
            "dead-letter topic: t[0]@5 still holds it): no") in caplog.text
    assert loop.consumer.commits()[-1] == {P0: 7}


def test_dead_letters_after_a_send_that_failed_go_again_and_both_are_said(caplog):
    """5's output is not delivered, so 5 and the records after it are processed again: 6's dead letter,
    confirmed after that, goes twice (as outputs may), and the log and /metrics count both."""
    def forward_five(message):
        if message.offset == 5:
            return forward(message)
        raise main.DeadLetter("not an event")

    not_delivered = KafkaTimeoutError("not delivered")
    loop = make_loop(forward_five, KERNEL_DEAD_LETTER_TOPIC="dlt")
    loop.producer = loop.failures.dead_letters.producer = producer = ScriptedProducer(
        lambda topic, key, value, sends: {1: (0.2, not_delivered), 2: (0.4, None)}.get(sends))
    loop.ledger.add(P0, [record(P0, 5), record(P0, 6)])
    settle_with_retries(loop)
    loop.commit(force=True)
    assert loop.consumer.commits()[-1] == {P0: 7} and producer.dead_letters == [(6, b"k", b"v")] * 2
    assert caplog.text.count("Dead-lettered t[0]@6 to dlt") == 2
    assert loop.metrics.dead_lettered.labels("t")._value.get() == 2


def wait_for(condition, timeout_s: float = 5):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_records_polled_while_keeping_membership_are_kept():
    """While every worker is busy the loop polls with its partitions paused, to stay in the group. A
    rebalance inside that poll can assign a partition (not paused) whose records come back in the
    same call: they must be kept, or the next commit of that partition would skip them."""
    started, release = threading.Event(), threading.Event()

    def blocking(message):
        started.set()
        return release.wait(5)

    loop = make_loop(blocking)
    p2 = TopicPartition("t", 2)
    loop.ledger.add(P0, [record(P0, offset) for offset in range(8)])
    loop.hand_out()
    assert started.wait(5)

    def poll(timeout_ms):
        loop.assigned({p2})  # what kafka-python's rebalance callback does inside poll()
        return {p2: [record(p2, 10), record(p2, 11)]}

    loop.consumer.poll = poll
    loop.keep_membership()
    release.set()
    settle_all(loop)
    loop.commit()
    assert loop.consumer.commits() == [{P0: 8, p2: 12}]


def big_record(partition, offset, size):
    return make_message(b"x" * size, topic=partition.topic, partition=partition.partition, offset=offset)


def test_a_partition_pauses_before_a_fetch_could_pass_its_share_and_resumes_below_half_of_it():
    loop = make_loop(KERNEL_BUFFER_MAX_BYTES=str(1_000_000), KAFKA_MAX_POLL_RECORDS="100")  # 500 KB a partition
    assert loop.budget.fetch_limit == 125_000 and loop.consumer._fetcher.config["max_partition_fetch_bytes"] == 125_000
    loop.ledger.add(P0, [big_record(P0, 0, 100_000)])  # two polls: the last brought 250 KB, what the
    loop.ledger.add(P0, [big_record(P0, 1, 250_000)])  # next fetch of each partition could bring
    loop.budget.apply()
    assert loop.consumer.paused() == set(), "350 KB of a 500 KB share: a fetch of 125 KB fits"
    loop.ledger.add(P0, [big_record(P0, 2, 100_000)])
    loop.budget.apply()
    assert loop.consumer.paused() == {P0}, "450 KB: the next fetch could pass the share; the other partition goes on"
    for still_paused in (True, False):  # 350 KB held, then 100 KB: at most half the share
        [task] = loop.ledger.start_tasks(0)
        if (lane := loop.ledger.take_back(main.TaskOutcome(task, 1))) is not None:  # some went back
            loop.ledger.requeue(lane)
        loop.budget.apply()
        assert loop.consumer.paused() == ({P0} if still_paused else set())
    assert loop.metrics.buffered_bytes._value.get() == loop.ledger.unfinished_bytes


def test_fetches_shrink_with_the_share_as_partitions_come_and_go_but_never_stop():
    loop = make_loop(KERNEL_BUFFER_MAX_BYTES=str(64 * 2**20))
    assert loop.budget.fetch_limit == 2**20, "two partitions of a 64 MiB budget: KAFKA_MAX_PARTITION_FETCH_BYTES"
    many = {TopicPartition("t", p) for p in range(2, 2000)}
    loop.assigned(many)
    assert loop.budget.fetch_limit == main.MIN_PARTITION_FETCH_BYTES, "2,000 partitions: 34 KB each, fetched 16 KiB at a time"
    assert loop.consumer._fetcher.config["max_partition_fetch_bytes"] == main.MIN_PARTITION_FETCH_BYTES
    tp = TopicPartition("t", 7)
    loop.ledger.add(tp, [big_record(tp, 0, 100_000)])  # one batch larger than the share: it still came
    loop.budget.apply()
    fetching = set(loop.ledger.partitions) - loop.consumer.paused()
    assert tp not in fetching and len(fetching) == 1, "one at a time while the others have brought nothing yet"
    loop.revoked(many)
    assert loop.budget.fetch_limit == 2**20


def test_a_partition_waiting_for_a_retry_never_holds_up_the_others():
    loop = make_loop(answers({(0, 0): False}), KERNEL_BUFFER_MAX_BYTES=str(1_000_000))
    loop.ledger.add(P0, [big_record(P0, offset, 200_000) for offset in range(3)])  # 600 KB behind a retry
    loop.ledger.add(P1, [big_record(P1, 0, 10_000)])  # P1's fetches are small
    settle_all(loop)
    loop.budget.apply()
    assert loop.ledger.unfinished_bytes > 500_000 and loop.consumer.paused() == {P0}


def test_a_message_larger_than_the_whole_budget_is_processed_alone():
    loop = make_loop(KERNEL_BUFFER_MAX_BYTES=str(100_000))
    loop.ledger.add(P1, [big_record(P1, 0, 1_000_000)])
    loop.budget.apply()
    assert loop.consumer.paused() == {P0, P1}, "the others wait while it is held"
    settle_all(loop)
    loop.budget.apply()
    loop.commit()
    assert loop.consumer.commits() == [{P1: 1}]
    assert loop.consumer.paused() == {P1}, "P0 waited first; P1's next fetch could be as large again: it waits its turn"
    loop.ledger.add(P0, [big_record(P0, 0, 1_000)])
    settle_all(loop)
    loop.budget.turn_ends_s = time.monotonic()
    loop.budget.apply()
    assert loop.consumer.paused() == {P0}, "at the end of P0's turn P1 goes, alone"


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt()])
def test_system_exit_and_keyboard_interrupt_from_process_message_are_fatal_like_any_exception(raised):
    loop = make_loop(answers({(0, 1): raised}))
    loop.ledger.add(P0, [record(P0, 0), record(P0, 1)])
    with pytest.raises(main.MessageFailed, match=r"t\[0\]@1") as failure:
        settle_all(loop)
    assert failure.value.__cause__ is raised
    loop.commit(force=True)
    assert loop.consumer.commits() == [{P0: 1}]


def test_headers_are_made_producible_or_refused_saying_which():
    assert main.producible_headers([("a", None), ("b", bytearray(b"1")), ("c", b"2")]) == [
        ("a", b""), ("b", b"1"), ("c", b"2")]
    with pytest.raises(TypeError, match="header 'n' must have a bytes value .*got str"):
        main.producible_headers([("n", "text")])
    with pytest.raises(TypeError, match=r"a header must be a \(str, bytes\) pair, got \(b'n', b'v'\)"):
        main.producible_headers([(b"n", b"v")])


def test_send_refuses_what_is_not_a_topic_or_bytes_saying_which_and_sends_the_rest():
    class Sent:
        def send(self, topic, key, value, headers):
            return (topic, key, value, headers)

    sends = main.start_sends(Sent())
    try:
        for arguments, refusal in [(("", b"v"), "topic must be a topic name, got ''"),
                                   (("out", "text"), "value must be bytes or None, got str: encode it first"),
                                   (("out", b"v", 7), "key must be bytes or None, got int"),
                                   (("out", {}, "k"), "value must be bytes or None, got dict")]:
            with pytest.raises(TypeError, match=re.escape(refusal)):
                main.send(*arguments)
        with pytest.raises(ValueError, match=r"^send\(\) topic 'out put' is not a Kafka topic name \(letters"):
            main.send("out put", b"v")  # kafka-python's producer would raise it later, less clearly; the kit not at all
        main.send("out", bytearray(b"v"), key=b"k")
        main.send("out", None, headers=[("h", None)])
        assert sends == [("out", b"k", bytearray(b"v"), []), ("out", None, b"", [("h", b"")])]
    finally:
        main.current_call.sends = None
    with pytest.raises(RuntimeError, match=r"send\(\) works inside process_message"):
        main.send("out", b"v")


def test_a_record_the_producer_would_refuse_is_dead_lettered_adapted():
    """A null header value and a record with neither key nor value: legal in Kafka, refused by
    kafka-python's producer. Dead-lettered with the header empty and the value empty."""
    loop = make_loop(answers({(0, 0): main.DeadLetter("no")}), KERNEL_DEAD_LETTER_TOPIC="dlt")
    loop.failures.dead_letters.producer = producer = CapturingProducer()
    odd = make_message(None, topic="t", headers=[("a", None), ("b", b"1")])
    loop.ledger.add(P0, [odd])
    settle_all(loop)
    loop.commit()
    [(topic, key, value, headers)] = producer.sent
    assert (topic, key, value, headers[:2]) == ("dlt", None, b"", [("a", b""), ("b", b"1")])
    assert loop.consumer.commits() == [{P0: 1}]


class CapturingProducer:
    timeout_s = 1

    def __init__(self, error: Exception | None = None):
        self.sent, self.error = [], error

    def send(self, topic, key, value, headers):
        if self.error is not None:
            raise self.error
        self.sent.append((topic, key, value, headers))
        return main.kafka.future.Future().success(None)


def test_an_error_in_the_dead_letter_path_keeps_the_message_and_names_it(caplog):
    loop = make_loop(answers({(0, 0): main.DeadLetter("no")}), KERNEL_DEAD_LETTER_TOPIC="dlt")
    loop.failures.dead_letters.producer = CapturingProducer(AssertionError("the producer refused it"))
    loop.ledger.add(P0, [record(P0, 0), record(P0, 1)])
    loop.hand_out()
    assert loop.settle_handed_back(timeout_s=5)
    assert "Could not publish t[0]@0 to the dead-letter topic dlt (AssertionError('the producer refused it'))" in caplog.text
    assert [r.offset for r in loop.ledger.partitions[P0].lanes[None].records] == [0, 1], "kept, to be retried"
    loop.commit()
    assert loop.consumer.commits() == []
    assert loop.health.ready() == (False, "dead letters cannot be published to dlt: AssertionError('the producer "
                                          "refused it')"), "/readyz says so"
    assert loop.metrics.registry.get_sample_value("kernel_dead_letter_failures_total") == 1, "and /metrics"


def test_a_task_handed_back_while_the_loop_waits_for_another_is_held_then_found():
    workers = main.WorkerPool(2, "test", lambda task: main.process_task(task, lambda message: True, main.StopSignal()))
    first, second = task_of([record(P0, 0)]), task_of([record(P0, 1)])
    workers.give(second)
    wait_for(lambda: workers.handed_back.qsize() == 1)  # back before anyone waits for it
    workers.give(first)
    assert [outcome.task for outcome in workers.wait_for({first}, time.monotonic() + 5)] == [first]
    assert [outcome.task for outcome in workers.back_early] == [second]
    started = time.monotonic()
    assert [outcome.task for outcome in workers.wait_for({second}, time.monotonic() + 5)] == [second], \
        "found among those back early"
    assert time.monotonic() - started < 0.5 and not workers.back_early
    workers.stop()


def test_revocation_finds_the_task_it_waits_for_among_those_already_handed_back():
    """Concurrency 2: P1's task comes back while the revocation of P0 waits; the loop settles it after."""
    release = threading.Event()
    loop = make_loop(lambda message: release.wait(5), KERNEL_CONCURRENCY="2", KERNEL_ORDERING="partition")
    loop.ledger.add(P0, [record(P0, 0)])
    loop.ledger.add(P1, [record(P1, 0)])
    loop.hand_out()
    release.set()
    wait_for(lambda: loop.workers.handed_back.qsize() == 2)
    main.RebalanceListener(loop).on_partitions_revoked([P1])
    assert len(loop.workers.back_early) == 1 and loop.workers.back_early[0].task.partition == P0
    assert loop.consumer.commits() == [{P1: 1}]
    settle_all(loop)
    loop.commit()
    assert loop.consumer.commits()[-1] == {P0: 1}


def test_a_fatal_failure_on_a_revoked_partition_still_stops_the_kernel():
    """kafka-python swallows exceptions raised in a rebalance callback: the loop raises it after."""
    started, release = threading.Event(), threading.Event()

    def failing(message):
        started.set()
        release.wait(5)
        raise ValueError("boom")

    loop = make_loop(failing)
    loop.ledger.add(P0, [record(P0, 3)])
    loop.hand_out()
    assert started.wait(5)
    release.set()
    main.RebalanceListener(loop).on_partitions_revoked([P0])
    with pytest.raises(main.MessageFailed, match=r"t\[0\]@3"):
        loop.settle_handed_back(timeout_s=0)
    assert loop.metrics.failed.labels("t")._value.get() == 1


def test_a_fatal_failure_while_stopping_is_logged_and_makes_the_exit_code_1(caplog):
    started = threading.Event()

    def failing(message):
        started.set()
        time.sleep(0.2)
        raise ValueError("boom while stopping")

    loop = make_loop(failing)
    loop.ledger.add(P0, [record(P0, 3)])
    loop.hand_out()
    assert started.wait(5)
    loop.stop.requested = True
    loop.consumer.close = lambda autocommit: None
    loop.consumer.subscribe = lambda topics, listener: None
    loop.consumer.partitions_for_topic = lambda topic: {0}
    assert loop.run() == main.EXIT_FATAL
    assert "process_message failed on t[0]@3 while stopping; it stays uncommitted" in caplog.text
    assert "ValueError: boom while stopping" in caplog.text
    assert loop.consumer.commits() == []


def make_batch_loop(handler, **env):
    settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_BATCH_MAX_WAIT_MS": "0", **env},
                                  "test-kernel", "t")
    loop = main.ConsumerLoop(RecordingConsumer(), settings, main.KernelHandler(handler, takes_batches=True), main.StopSignal())
    loop.assigned({P0, P1})
    return loop


def test_a_batch_handler_that_changes_its_list_changes_nothing_of_the_kernels():
    calls = []

    def filtering(messages):
        calls.append([m.offset for m in messages])
        messages[:] = [m for m in messages if m.offset != 4]  # in place
        messages.reverse()
        return len(calls) > 1

    loop = make_batch_loop(filtering, KERNEL_RETRY_INITIAL_MS="1000")
    loop.ledger.add(P0, [record(P0, offset) for offset in range(3, 7)])
    settle_all(loop)
    loop.ledger.partitions[P0].lanes[None].retry.due_s = 0
    settle_all(loop)
    loop.commit()
    assert calls == [[3, 4, 5, 6], [3, 4, 5, 6]], "the same batch again, whole"
    assert loop.consumer.commits() == [{P0: 7}]
    assert (loop.ledger.unfinished, loop.ledger.unfinished_bytes) == (0, 0)


def test_a_batch_whose_dead_letters_are_only_partly_published_keeps_the_rest():
    """KERNEL_MAX_ATTEMPTS used up: each message of the batch is dead-lettered; the dead-letter topic
    confirms the first only, so the other two stay, as a batch of two, for the next attempt."""
    loop = make_batch_loop(lambda messages: False, KERNEL_MAX_ATTEMPTS="1", KERNEL_DEAD_LETTER_TOPIC="dlt")
    loop.failures.dead_letters.producer = producer = PendingProducer()
    producer.timeout_s = 5

    def answer():
        producer.futures[0][2].success((0, -1, None))
        producer.futures[1][2].failure(KafkaTimeoutError("no broker"))

    threading.Timer(0.3, answer).start()
    loop.ledger.add(P0, [record(P0, offset) for offset in range(3)])
    loop.hand_out()
    assert loop.settle_handed_back(timeout_s=5)
    loop.commit()
    lane = loop.ledger.partitions[P0].lanes[None]
    assert [r.offset for r in lane.records] == [1, 2] and lane.retry.batch_size == 2
    assert loop.consumer.commits() == [{P0: 1}] and loop.metrics.dead_lettered.labels("t")._value.get() == 1


def test_a_dead_letter_named_in_a_batch_without_a_dead_letter_topic_stops_the_kernel_after_those_before():
    def rejecting(messages):
        raise main.DeadLetter("the third", message=messages[2])

    loop = make_batch_loop(rejecting)
    loop.ledger.add(P0, [record(P0, offset) for offset in range(5)])
    with pytest.raises(main.NoDeadLetterTopic, match=r"t\[0\]@2: the third$"):
        settle_all(loop)
    loop.commit(force=True)
    assert loop.consumer.commits() == [{P0: 2}]


def test_a_revocation_waits_for_the_batch_in_hand_and_commits_it():
    started, release = threading.Event(), threading.Event()

    def slow(messages):
        started.set()
        return release.wait(5)

    loop = make_batch_loop(slow)
    loop.ledger.add(P0, [record(P0, offset) for offset in range(4)])
    loop.hand_out()
    assert started.wait(5)
    threading.Timer(0.3, release.set).start()
    main.RebalanceListener(loop).on_partitions_revoked([P0])
    assert loop.consumer.commits() == [{P0: 4}] and set(loop.ledger.partitions) == {P1}


def test_the_consumer_never_creates_a_topic():
    settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1"}, "test-kernel", "t")
    assert main.consumer_config(settings, None)["allow_auto_create_topics"] is False


def test_the_budget_decides_how_many_partitions_fetch_at_once_and_they_take_turns():
    loop = make_loop(KERNEL_BUFFER_MAX_BYTES=str(1_000_000))
    assert len(loop.consumer.paused()) == 1, "partitions that brought nothing yet join one at a time at first"
    loop.consumer.poll = lambda timeout_ms: {}
    loop.poll(0)
    loop.budget.apply()
    assert loop.consumer.paused() == set(), "then two"
    many = [TopicPartition("t", p) for p in range(2, 10)]
    loop.assigned(set(many))
    for tp in [P0, P1, *many]:  # every partition's last poll brought 300 KB, now finished
        loop.ledger.add(tp, [big_record(tp, 0, 300_000)])
    settle_all(loop)
    loop.budget.apply()
    fetching = set(loop.ledger.partitions) - loop.consumer.paused()
    assert len(fetching) == 3, "three fetches of 300 KB fit in 1 MB"
    loop.budget.apply()
    assert set(loop.ledger.partitions) - loop.consumer.paused() == fetching, "they keep their places for a turn"
    loop.budget.turn_ends_s = time.monotonic()
    loop.budget.apply()
    assert not fetching & (set(loop.ledger.partitions) - loop.consumer.paused()), "then those that waited go first"


def test_readiness_says_when_credentials_are_refused_or_no_fetch_or_heartbeat_came_for_a_session_timeout():
    settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SESSION_TIMEOUT_MS": "6000"}, "k", "t")
    health = main.HealthState(settings)
    health.joined = True
    assert health.ready() == (True, "ok")
    health.last_contact_s -= 7
    assert health.ready() == (False, "no fetch or heartbeat answered for 7 s (KAFKA_SESSION_TIMEOUT_MS)")
    health.refused(main.AccessRefused("b:1 refused the SASL PLAIN credentials", "authentication"))
    health.refused(main.AccessRefused("a later one", "authentication"))  # the first is the one told
    assert health.ready() == (False, "credentials refused: b:1 refused the SASL PLAIN credentials")
    health.accepted()
    health.last_contact_s = time.monotonic()
    assert health.ready() == (True, "ok")


def test_a_producer_failed_for_good_stops_the_loop():
    """librdkafka's fatal errors reach the health state (tests/test_sending.py); the loop stops on one."""
    loop = make_loop()
    loop.consumer._coordinator = types.SimpleNamespace(heartbeat=types.SimpleNamespace(last_receive=time.time()))
    loop.check_contact()
    loop.health.producer_failed = main.KafkaError("the producer failed for good (OUT_OF_ORDER_SEQUENCE_NUMBER: ...)")
    with pytest.raises(main.KafkaError, match="failed for good"):
        loop.check_contact()
    loop.workers.stop()


def test_committed_offsets_that_are_only_said_are_waited_for_within_a_bound():
    class Coordinator:  # answers the first partition, then never again (kafka-python raises at the timeout given)
        def __init__(self):
            self.timeouts_ms = []

        def committed(self, tp, timeout_ms=None):
            self.timeouts_ms.append(timeout_ms)
            if tp == P0:
                return 7
            time.sleep(timeout_ms / 1000)
            raise KafkaTimeoutError("Failed to get committed offsets")

    consumer = Coordinator()
    started = time.monotonic()
    assert main.committed_offsets(consumer, {P1, P0}, timeout_s=0.2) == {P0: 7, P1: main.UNKNOWN}
    assert None not in consumer.timeouts_ms and time.monotonic() - started < 1
    assert main.format_partitions({P0, P1}, {P0: 7, P1: main.UNKNOWN}) == "t[0]@7, t[1]@unknown"


def test_lanes_waiting_for_a_place_wait_for_a_task_to_come_back_not_for_records(monkeypatch):
    release = threading.Event()
    loop = make_loop(lambda message: release.wait(5), KERNEL_CONCURRENCY="2", KAFKA_MAX_POLL_RECORDS="100")
    timeouts = []
    loop.consumer.poll = lambda timeout_ms: timeouts.append(timeout_ms) or {}
    loop.consumer.highwater = lambda tp: None
    monkeypatch.setattr(main, "last_heartbeat_answered_s", lambda consumer: time.time())
    loop.ledger.add(P0, [record(P0, offset, b"k%d" % offset) for offset in range(20)])
    loop.hand_out()
    assert len(loop.ledger.in_flight) == 8 and len(loop.ledger.queued) == 12, "two workers: eight places"
    loop.run_once()
    assert timeouts == [0], "a poll that finds nothing must not hold up the lanes waiting for a place"
    release.set()
    settle_all(loop)
    assert loop.ledger.unfinished == 0
