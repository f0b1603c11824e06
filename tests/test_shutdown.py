"""Shutdown: the message in hand is finished and committed; a second signal exits at once."""

import signal
import time

import pytest

pytestmark = pytest.mark.both_brokers


def test_sigterm_finishes_the_message_in_hand_and_commits_it(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"sleep:3"), (0, None, b"after")])
    kernel = kernels.start(kernels.env(topic, "in-hand"))
    kernel.wait_for_log(r"Partitions assigned", 30)
    time.sleep(1)  # well inside the 3 s message
    assert kernel.stop(signal.SIGTERM) == 0
    assert [r[2] for r in kernels.records()] == ["sleep:3"], "it must finish the message, then stop"
    assert cluster.committed("in-hand", topic, 1) == {0: 1}


def test_a_second_signal_exits_at_once(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"sleep:30")])
    kernel = kernels.start(kernels.env(topic, "second-signal"))
    kernel.wait_for_log(r"Partitions assigned", 30)
    time.sleep(1)
    kernel.process.send_signal(signal.SIGTERM)
    kernel.wait_for_log("Received SIGTERM", 5)
    started = time.monotonic()
    assert kernel.stop(signal.SIGTERM, timeout_s=5) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 2
    assert list(kernels.certificate_tmpdir.iterdir()) == [], "certificates left behind"
    assert cluster.committed("second-signal", topic, 1) == {0: None}
