"""KERNEL_CONCURRENCY: messages in flight at once, order kept per key, commits never past an
unfinished message, and bounded shutdown."""

import random
import signal
import time
from collections import defaultdict

import pytest

from tests.fixtures import processed, wait_until

pytestmark = pytest.mark.both_brokers


def most_at_once(attempts) -> int:
    """The largest number of process_message calls that overlapped in time."""
    events = sorted([(a.started_ns, 1) for a in attempts] + [(a.ended_ns, -1) for a in attempts])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def test_order_is_kept_per_key_while_messages_run_concurrently(cluster, kernels):
    topic = cluster.create_topic(partitions=3)
    rng = random.Random(7)
    sequence = defaultdict(int)
    messages = []
    for i in range(1_200):
        key = f"key-{rng.randrange(40)}"
        sequence[key] += 1
        behaviour = "false:1" if i % 97 == 0 else f"sleep:{rng.uniform(0, 0.01):.4f}"
        messages.append((hash(key) % 3, key.encode(), f"{behaviour}|{key}|{sequence[key]}".encode()))
    produced = cluster.produce(topic, messages)
    kernel = kernels.start(kernels.env(topic, "per-key", KERNEL_CONCURRENCY=16, KERNEL_RETRY_INITIAL_MS=50))
    wait_until(lambda: len(processed(kernels.attempts())) == 1_200, 60, "every message processed")
    assert kernel.stop() == 0

    attempts = kernels.attempts()
    by_key = defaultdict(list)
    for attempt in sorted(attempts, key=lambda a: a.started_ns):
        _, key, number = attempt.value.split("|")
        by_key[key].append((int(number), attempt))
    for key, calls in by_key.items():
        done = [number for number, attempt in calls if attempt.result == "true"]
        assert done == sorted(done) == list(range(1, sequence[key] + 1)), f"{key} out of order: {done}"
        for (number, attempt), (next_number, next_attempt) in zip(calls, calls[1:], strict=False):
            assert attempt.ended_ns <= next_attempt.started_ns, f"{key}: two of its messages ran at once"
            assert next_number in (number, number + 1), f"{key}: message {next_number} started before {number} was done"
    assert sum(1 for a in attempts if a.result == "false") == len([m for m in messages if m[2].startswith(b"false")])
    assert most_at_once(attempts) >= 8, "messages did not run concurrently"
    assert cluster.committed("per-key", topic, 3) == {p: produced[p] for p in range(3)}


def test_nothing_is_committed_past_an_unfinished_message(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    messages = [(0, b"a", b"m0"), (0, b"slow", b"sleep:6")] + [(0, f"k{i}".encode(), f"m{i}".encode())
                                                                for i in range(2, 200)]
    cluster.produce(topic, messages)
    kernel = kernels.start(kernels.env(topic, "unfinished", KERNEL_CONCURRENCY=8))
    wait_until(lambda: len(processed(kernels.attempts())) == 199, 30, "everything but the slow message")
    time.sleep(1.5)  # more than a commit interval with the slow message still running
    assert (0, 1) not in processed(kernels.attempts())
    assert cluster.committed("unfinished", topic, 1) == {0: 1}, "committed past the unfinished message"
    wait_until(lambda: (0, 1) in processed(kernels.attempts()), 30, "the slow message")
    wait_until(lambda: cluster.committed("unfinished", topic, 1) == {0: 200}, 10, "the commit to catch up")
    assert kernel.stop() == 0


def test_sigterm_drains_messages_in_flight_and_commits_them(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, f"k{i}".encode(), b"sleep:2") for i in range(4)] + [(0, b"k9", b"after")])
    kernel = kernels.start(kernels.env(topic, "drain", KERNEL_CONCURRENCY=4))
    kernel.wait_for_log("Partitions assigned", 30)
    time.sleep(1)
    started = time.monotonic()
    assert kernel.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    finished = processed(kernels.attempts())
    assert {(0, o) for o in range(4)} <= finished
    assert cluster.committed("drain", topic, 1)[0] == max(o for _, o in finished) + 1


def test_shutdown_timeout_bounds_the_wait_for_a_message_in_hand(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, b"a", b"quick"), (0, b"b", b"sleep:30")])
    kernel = kernels.start(kernels.env(topic, "abandon", KERNEL_CONCURRENCY=2, KERNEL_SHUTDOWN_TIMEOUT_MS=1000))
    wait_until(lambda: (0, 0) in processed(kernels.attempts()), 30, "the quick message")
    time.sleep(1)
    started = time.monotonic()
    assert kernel.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 6
    assert "1 message(s) still in process_message after KERNEL_SHUTDOWN_TIMEOUT_MS" in kernel.log()
    assert cluster.committed("abandon", topic, 1) == {0: 1}, "the abandoned message must stay uncommitted"


def test_an_exception_stops_concurrent_work_and_commits_only_finished_prefixes(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, b"a", b"m0"), (0, b"b", b"sleep:1|before-raise"), (0, b"c", b"raise")]
                    + [(0, f"k{i}".encode(), b"sleep:0.5") for i in range(6)])
    kernel = kernels.start(kernels.env(topic, "fatal-concurrent", KERNEL_CONCURRENCY=4))
    assert kernel.wait(timeout_s=30) == 1
    assert "RuntimeError: poison message" in kernel.log()
    committed = cluster.committed("fatal-concurrent", topic, 1)[0]
    assert committed is not None and committed <= 2, "committed past the message that raised"
