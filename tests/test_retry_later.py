"""raise RetryLater(seconds): the message is tried again after the wait it asks for (an API's
retry-after), at most KERNEL_RETRY_MAX_MS, counted against KERNEL_MAX_ATTEMPTS like a False, holding
only its lane; a stop while it waits is as prompt as any."""

import logging
import math
import signal
import time

import pytest
from kafka import TopicPartition

import main
from main import Consequence, RetryLater, TaskFailure
from tests.fixtures import settings_from, wait_until
from tests.kit import call, call_batch, make_message

P0 = TopicPartition("t", 0)


def record(offset: int):
    return make_message(b"v", topic=P0.topic, partition=P0.partition, offset=offset)


@pytest.mark.parametrize("seconds, asked", [(2, 2.0), ("1.5", 1.5), (0, 0.0), (-3, -3.0), (math.inf, math.inf),
                                            (math.nan, None), (None, None), ("soon", None)])
def test_retry_later_keeps_the_seconds_it_was_given_or_none_for_what_is_no_number(seconds, asked):
    assert RetryLater(seconds).seconds == asked


@pytest.mark.parametrize("asked_s, delay_s", [(2.0, 2.0), (0.0, 0.0), (-3.0, 0.0), (120.0, 30.0), (math.inf, 30.0)])
def test_the_wait_asked_for_is_kept_between_nothing_and_kernel_retry_max_ms(asked_s, delay_s):
    policy = main.RetryPolicy(initial_ms=500, max_ms=30_000, max_attempts=0)
    assert policy.delay_s(attempts=1, asked_s=asked_s) == delay_s
    assert 0.45 <= policy.delay_s(attempts=1) <= 0.5, "without one, the backoff"


def failure_policy(max_attempts: int = 0, max_ms: int = 30_000) -> tuple[main.FailurePolicy, main.Ledger]:
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "localhost:9092", "KERNEL_RETRY_MAX_MS": str(max_ms),
                              "KERNEL_MAX_ATTEMPTS": str(max_attempts)})
    book = main.Ledger(keyed=False)
    book.assign({P0})
    return main.FailurePolicy(settings, book, None, main.KernelMetrics()), book


def fail_first(book: main.Ledger, failure: TaskFailure, now_s: float | None = None) -> main.Lane:
    """The partition's next task comes back with `failure` at its first record: that record's lane."""
    [task] = book.start_tasks(time.monotonic() if now_s is None else now_s)
    return book.take_back(main.TaskOutcome(task, 0, failure))


def test_a_retry_later_waits_what_it_asked_for_capped_and_says_so(caplog):
    policy, book = failure_policy(max_ms=5_000)
    book.add(P0, [record(0), record(1)])
    asked = TaskFailure(Consequence.RETRY, "rate limited", delay_s=3.0)
    lane = fail_first(book, asked)
    before_s = time.monotonic()
    policy.apply(lane, asked)
    book.requeue(lane)
    assert before_s + 2.9 < book.next_retry_due_s() < time.monotonic() + 3.1
    assert book.start_tasks(time.monotonic()) == [], "not before the wait is over"
    endless = TaskFailure(Consequence.RETRY, "rate limited", delay_s=math.inf)
    lane = fail_first(book, endless, now_s=time.monotonic() + 3.1)
    with caplog.at_level(logging.WARNING, logger="kernel"):
        policy.apply(lane, endless)
    assert book.next_retry_due_s() < time.monotonic() + 5.1, "capped at KERNEL_RETRY_MAX_MS"
    assert "rate limited for t[0]@0 (attempt 2); retrying in 5.0 s (RetryLater asked for inf s: capped at " \
           "KERNEL_RETRY_MAX_MS)" in caplog.text


def test_a_retry_later_counts_against_kernel_max_attempts_like_a_false():
    policy, book = failure_policy(max_attempts=2)
    book.add(P0, [record(0)])
    limited = TaskFailure(Consequence.RETRY, "rate limited", delay_s=0.0)
    policy.apply(fail_first(book, limited), limited)
    book.requeue(book.partitions[P0].lanes[None])
    with pytest.raises(main.NoDeadLetterTopic, match=r"t\[0\]@0: rate limited on all 2 attempts"):
        policy.apply(fail_first(book, limited), limited)


def test_the_kit_reports_a_retry_later_with_its_seconds():
    def limited(message):
        raise RetryLater(message.value.decode(), "429")

    outcome = call(make_message(b"2.5"), limited)
    assert outcome.result is False and outcome.retry_after == 2.5 and not outcome.committed
    assert call(make_message(b"soon"), limited).retry_after is None, "no number: the backoff"
    assert call(make_message(b"x"), lambda message: False).retry_after is None

    def limited_batch(messages):
        raise RetryLater(7)

    batch = call_batch([make_message(b"a"), make_message(b"b", offset=1)], limited_batch)
    assert batch.result is False and batch.done == 0 and batch.retry_after == 7.0


# Through the real loop, on Tansu: the recording kernel's "later:S" raises RetryLater(S) the first time.


@pytest.mark.parametrize("concurrency, key_b_waits", [(1, True), (4, False)])
def test_a_retry_later_waits_its_seconds_holding_only_its_lane(cluster, kernels, concurrency, key_b_waits):
    """At KERNEL_CONCURRENCY=1 the lane is the partition: key B waits too; above 1 only key A does.
    Another partition goes on during the wait either way."""
    topic = cluster.create_topic(partitions=2)
    group = f"later-{concurrency}"
    produced = cluster.produce(topic, [(0, b"A", b"later:3"), (0, b"A", b"a-1"), (0, b"B", b"b-0")])
    kernel = kernels.start(kernels.env(topic, group, KERNEL_CONCURRENCY=concurrency))
    wait_until(lambda: (0, 0, "later:3", "later") in kernels.records(), 30, lambda: f"the RetryLater\n{kernel.log()}")
    produced += cluster.produce(topic, [(1, None, b"p1-0")])  # while partition 0 waits
    wait_until(lambda: len({(r[0], r[1]) for r in kernels.records() if r[3] == "true"}) == 4, 30,
               lambda: f"every message processed\n{kernel.log()[-3000:]}")
    assert kernel.stop() == 0

    attempts = kernels.attempts()
    first, second = [a for a in attempts if (a.partition, a.offset) == (0, 0)]
    waited_s = (second.started_ns - first.ended_ns) / 1e9
    assert 2.9 < waited_s < 4.5, f"waited {waited_s:.2f} s for a RetryLater(3), not the 0.5 s backoff"
    print(f"concurrency {concurrency}: waited {waited_s:.2f} s for RetryLater(3)")
    by_value = {a.value: a for a in attempts}
    during_the_wait = second.started_ns - 1e9  # at least a second before it ended
    assert by_value["p1-0"].ended_ns < during_the_wait, "partition 1 was held up by partition 0's wait"
    assert by_value["a-1"].started_ns >= second.ended_ns, "key A's next message overtook the retry"
    if key_b_waits:
        assert by_value["b-0"].started_ns >= second.ended_ns, "at concurrency 1 the whole partition waits"
    else:
        assert by_value["b-0"].ended_ns < during_the_wait, "key B was held up by key A's wait"
    assert cluster.committed(group, topic, 2) == {0: produced[0], 1: produced[1]}
    assert f"asked to wait for {topic}[0]@0 (attempt 1); retrying in 3.0 s" in kernel.log()


def test_a_retry_later_is_capped_counted_in_kernel_max_attempts_and_a_stop_does_not_wait_for_it(cluster, kernels):
    topic, dlt = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1)
    produced = cluster.produce(topic, [(0, None, b"later:60:5")])
    kernel = kernels.start(kernels.env(topic, "later-capped", KERNEL_RETRY_MAX_MS=1000, KERNEL_MAX_ATTEMPTS=2,
                                       KERNEL_DEAD_LETTER_TOPIC=dlt))
    wait_until(lambda: cluster.committed("later-capped", topic, 1) == {0: produced[0]}, 30,
               lambda: f"the message dead-lettered\n{kernel.log()[-3000:]}")
    assert kernel.stop() == 0
    first, second = kernels.attempts()
    assert 0.9 < (second.started_ns - first.ended_ns) / 1e9 < 2.5, "RetryLater(60) waits KERNEL_RETRY_MAX_MS"
    assert "retrying in 1.0 s (RetryLater asked for 60.0 s: capped at KERNEL_RETRY_MAX_MS)" in kernel.log()
    [letter] = cluster.read_topic(dlt, 1, settle_s=1)
    headers = dict(letter.headers())
    assert (headers["kafka_dlt-exception-fqcn"], headers["kafka_dlt-exception-message"], headers["kernel-attempts"]) == (
        b"RetriesExhausted", b"asked to wait on all 2 attempts (KERNEL_MAX_ATTEMPTS)", b"2")

    produced += cluster.produce(topic, [(0, None, b"later:60")])
    waiting = kernels.start(kernels.env(topic, "later-capped"))
    wait_until(lambda: len(kernels.attempts()) == 3, 30, lambda: f"the second RetryLater\n{waiting.log()}")
    time.sleep(0.5)  # well into its wait of 30 s (KERNEL_RETRY_MAX_MS)
    asked_s = time.monotonic()
    assert waiting.stop(signal.SIGTERM, timeout_s=20) == 0
    stopped_s = time.monotonic() - asked_s
    assert stopped_s < 4, f"a stop during the wait took {stopped_s:.1f} s"
    print(f"stopped {stopped_s:.2f} s after SIGTERM, during a wait of 30 s")
    assert cluster.committed("later-capped", topic, 1) == {0: produced[0] - 1}, "the waiting message stays uncommitted"
