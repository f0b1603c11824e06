"""process_batch: runs of one partition's messages, up to KERNEL_BATCH_MAX_MESSAGES, against the real
broker (tests/recording_kernel.py with TEST_BATCH=1 records each call's messages under the call's
start time). Done commits the batch; False tries the same batch again, then dead-letters each of its
messages; DeadLetter naming one commits those before it and sends the rest in the next batch;
anything else stops the kernel with nothing of the batch committed."""

import re
import signal
import time
from collections import defaultdict

import pytest

from devtools.broker import free_port
from main import DeadLetter
from tests.fixtures import http_get, processed, wait_committed, wait_until
from tests.kit import call_batch, make_message

pytestmark = pytest.mark.both_brokers


def calls(attempts) -> list[list]:
    """The attempts grouped by process_batch call, in the order the calls started."""
    by_call = defaultdict(list)
    for attempt in attempts:
        by_call[attempt.pid, attempt.started_ns].append(attempt)
    return [by_call[key] for key in sorted(by_call, key=lambda key: key[1])]


def test_batches_come_per_partition_in_order_up_to_the_limit_and_are_committed(cluster, kernels):
    topic, port = cluster.create_topic(partitions=3), free_port()
    produced = cluster.produce(topic, [(i % 3, None, f"m{i}".encode()) for i in range(900)])
    env = kernels.env(topic, "batches", TEST_BATCH=1, KERNEL_BATCH_MAX_MESSAGES=100, KERNEL_CONCURRENCY=3,
                      TEST_SLEEP_S=0.05, KERNEL_HTTP_PORT=port)
    kernel = kernels.start(env)
    wait_committed(cluster, kernel, "batches", topic, produced, 3)
    metrics = http_get(port, "/metrics")[1]
    assert kernel.stop() == 0

    batches = calls(kernels.attempts())
    assert all(len({a.partition for a in batch}) == 1 for batch in batches), "a batch mixes partitions"
    assert max(len(batch) for batch in batches) == 100
    for partition in range(3):
        offsets = [a.offset for batch in batches for a in batch if a.partition == partition]
        assert offsets == list(range(produced[partition])), f"partition {partition} not once and in order"
    overlapping = any(a[0].started_ns < b[-1].ended_ns and b[0].started_ns < a[-1].ended_ns
                      for a in batches for b in batches if a[0].partition != b[0].partition)
    assert overlapping, "batches of different partitions never ran at once"
    assert f'kernel_batch_size_count{{topic="{topic}"}} {len(batches)}.0' in metrics
    assert f'kernel_messages_processed_total{{topic="{topic}"}} 900.0' in metrics


def test_false_tries_the_same_batch_again_then_dead_letters_each_of_its_messages(cluster, kernels):
    topic, dlt = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1)
    produced = cluster.produce(topic, [(0, None, b"false:1000" if i == 3 else f"m{i}".encode()) for i in range(8)])
    env = kernels.env(topic, "batch-false", TEST_BATCH=1, KERNEL_BATCH_MAX_MESSAGES=20, KERNEL_MAX_ATTEMPTS=3,
                      KERNEL_RETRY_INITIAL_MS=100, KERNEL_DEAD_LETTER_TOPIC=dlt)
    kernel = kernels.start(env)
    wait_until(lambda: kernels.attempts(), 30, "the first attempt")
    produced += cluster.produce(topic, [(0, None, f"m{i}".encode()) for i in range(8, 12)])  # not part of it
    wait_committed(cluster, kernel, "batch-false", topic, produced, 1)
    assert kernel.stop() == 0

    batches = calls(kernels.attempts())
    assert [[a.offset for a in batch] for batch in batches] == [list(range(8))] * 3 + [list(range(8, 12))], (
        "the same batch three times, then the messages that came meanwhile")
    letters = cluster.read_topic(dlt, 1)
    assert sorted(int.from_bytes(dict(r.headers())["kafka_dlt-original-offset"], "big") for r in letters) == list(range(8))
    reasons = {dict(r.headers())["kafka_dlt-exception-message"] for r in letters}
    assert reasons == {b"process_batch returned False on all 3 attempts (KERNEL_MAX_ATTEMPTS)"}
    assert re.search(r"process_batch returned False for \S+\[0\]@0\.\.7 \(attempt 2\); retrying in", kernel.log())


def test_a_dead_letter_in_the_middle_of_a_batch(cluster, kernels):
    topic, dlt = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1)
    produced = cluster.produce(topic, [(0, None, b"dead" if i == 5 else f"m{i}".encode()) for i in range(11)])
    env = kernels.env(topic, "batch-dead", TEST_BATCH=1, KERNEL_DEAD_LETTER_TOPIC=dlt)
    kernel = kernels.start(env)
    wait_committed(cluster, kernel, "batch-dead", topic, produced, 1)
    assert kernel.stop() == 0

    batches = calls(kernels.attempts())
    assert [[(a.offset, a.result) for a in batch] for batch in batches] == [
        [(o, "true") for o in range(5)] + [(5, "dead")], [(o, "true") for o in range(6, 11)]]
    [letter] = cluster.read_topic(dlt, 1)
    assert (letter.value(), dict(letter.headers())["kafka_dlt-exception-message"]) == (b"dead", b"dead on purpose")
    assert processed(kernels.attempts()) == {(0, o) for o in range(11)} - {(0, 5)}


def test_a_batch_that_raises_stops_the_kernel_with_nothing_of_it_committed(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"a"), (0, None, b"b"), (0, None, b"raise"), (0, None, b"c")])
    kernel = kernels.start(kernels.env(topic, "batch-raise", TEST_BATCH=1))
    assert kernel.wait(timeout_s=30) == 1
    assert re.search(r"process_batch failed on \S+\[0\]@0\.\.3; it stays uncommitted", kernel.log())
    assert "RuntimeError: poison batch" in kernel.log()
    assert cluster.committed("batch-raise", topic, 1) == {0: None}


def test_exhausted_batch_without_a_dead_letter_topic_stops_the_kernel_with_code_4(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"false:1000"), (0, None, b"m1")])
    env = kernels.env(topic, "batch-no-dlt", TEST_BATCH=1, KERNEL_MAX_ATTEMPTS=2, KERNEL_RETRY_INITIAL_MS=100)
    kernel = kernels.start(env)
    assert kernel.wait(timeout_s=30) == 4
    assert "process_batch returned False on all 2 attempts (KERNEL_MAX_ATTEMPTS) (and the other 1 messages of its " \
           "batch); no KERNEL_DEAD_LETTER_TOPIC is set" in kernel.log()
    assert cluster.committed("batch-no-dlt", topic, 1) == {0: None}


def test_sigterm_lets_the_batch_in_hand_finish_and_commits_it(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"sleep:2"), (0, None, b"m1")])
    kernel = kernels.start(kernels.env(topic, "batch-stop", TEST_BATCH=1, KERNEL_BATCH_MAX_WAIT_MS=0))
    wait_until(lambda: "Partitions assigned" in kernel.log(), 30, "the assignment")
    time.sleep(1)  # inside the two-second batch
    assert kernel.stop(signal.SIGTERM) == 0
    assert processed(kernels.attempts()) == {(0, 0), (0, 1)}
    assert cluster.committed("batch-stop", topic, 1) == {0: 2}


def test_the_kit_calls_a_batch_handler_as_the_kernel_does():
    messages = [make_message(f"m{i}", offset=i) for i in range(4)]

    def handler(batch):
        for message in batch:
            if message.value == b"m2":
                raise DeadLetter("the third is bad", message=message)
        return True

    def unnamed(batch):
        raise DeadLetter("which one?")

    outcome = call_batch(messages, handler)
    assert (outcome.result, outcome.done, outcome.dead_letter) == (None, 2, (messages[2], "the third is bad"))
    assert call_batch(messages[:2], handler).result is True
    assert (call_batch(messages, lambda batch: False).result, call_batch(messages, lambda batch: False).done) == (False, 0)
    with pytest.raises(TypeError, match=r"DeadLetter from process_batch must name one of its messages"):
        call_batch(messages, unnamed)
