"""Shutdown: the message in hand is finished and committed; a second signal exits at once; the local
run command shows the kernel working and stops cleanly on Ctrl-C."""

import os
import re
import signal
import subprocess
import sys
import time

import main
from tests.conftest import REPO, hello_world, wait_until


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


@hello_world
def test_local_run_command_shows_sample_messages_and_stops_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "KERNEL_"))}
    log_path = tmp_path / "run_local.log"
    with log_path.open("wb") as log:
        runner = subprocess.Popen([sys.executable, "devtools/run_local.py"], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        wait_until(lambda: len(re.findall(rf"INFO \[{main.KERNEL_NAME}\] Received {main.DEFAULT_TOPIC}\[",
                                          log_path.read_text())) == 5, 20,
                   "the five sample messages")
        print(f"sample messages processed {time.monotonic() - started:.1f} s after start")
        os.killpg(runner.pid, signal.SIGINT)  # what Ctrl-C does to the terminal's foreground group
        assert runner.wait(timeout=20) == 0
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert "Consumer closed" in output and "<256 bytes>" in output and "(529 characters)" in output
    broker_port = re.search(r"Broker on 127\.0\.0\.1:(\d+)", output).group(1)
    leftovers = subprocess.run(["pgrep", "-f", f"listener-url tcp://127.0.0.1:{broker_port}"], capture_output=True)
    assert leftovers.stdout == b"", "the broker outlived the local run"
