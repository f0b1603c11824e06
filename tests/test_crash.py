"""SIGKILL mid-stream, then a restart: nothing is lost, and repeats stay within what was in flight."""

import signal
from collections import Counter

import pytest

from tests.fixtures import wait_committed, wait_until

pytestmark = pytest.mark.both_brokers

MAX_POLL_RECORDS = 50


def test_sigkill_then_restart_loses_nothing(cluster, kernels):
    topic = cluster.create_topic(partitions=2)
    produced = cluster.produce(topic, [(i % 2, None, f"m{i}".encode()) for i in range(1000)])
    env = kernels.env(topic, "crash", TEST_SLEEP_S=0.003, KAFKA_MAX_POLL_RECORDS=MAX_POLL_RECORDS)
    kernel = kernels.start(env)
    wait_until(lambda: len(kernels.records()) >= 300, 60, "300 messages processed")
    kernel.process.send_signal(signal.SIGKILL)
    kernel.wait()
    before_restart = len(kernels.records())
    assert before_restart < 1000, "the kill came too late to test anything"

    restarted = kernels.start(env)
    wait_until(lambda: len({(r[0], r[1]) for r in kernels.records()}) == 1000, 60, "every message processed")
    wait_committed(cluster, restarted, "crash", topic, produced, 2)  # what the killed one did not commit, redone
    assert restarted.stop() == 0

    attempts = Counter((r[0], r[1]) for r in kernels.records())
    assert set(attempts) == {(p, o) for p in range(2) for o in range(produced[p])}
    repeats = sum(n - 1 for n in attempts.values())
    print(f"SIGKILL after {before_restart} processed: 1000 produced, {repeats} repeated, 0 lost")
    assert repeats <= MAX_POLL_RECORDS, "more repeats than one polled batch can explain"
    assert cluster.committed("crash", topic, 2) == {p: produced[p] for p in range(2)}
