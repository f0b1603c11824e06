"""The reliability suite: crashes, a changing group, a broker outage, poison messages and a slow
handler. Every scenario prints produced / processed / repeated / lost; lost must be 0."""

import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tests.fixtures import REPO, check_one_owner_at_a_time, processed, wait_committed, wait_until

pytestmark = pytest.mark.both_brokers

MAX_POLL_RECORDS = 200


def report(scenario: str, produced: Counter, attempts) -> int:
    """Print the scenario's figures; return the number of repeats."""
    finished = Counter((a.partition, a.offset) for a in attempts if a.result == "true")
    expected = {(p, o) for p, n in produced.items() for o in range(n)}
    lost = len(expected - set(finished))
    repeats = sum(n - 1 for n in finished.values())
    print(f"\n{scenario}: produced {sum(produced.values())}, processed {len(finished)}, "
          f"repeated {repeats}, lost {lost}")
    assert lost == 0 and set(finished) == expected
    return repeats


class CommittedOffsetSampler(threading.Thread):
    """Reads the group's committed offsets twice a second, to check they never move backwards."""

    def __init__(self, cluster, group: str, topic: str, partitions: int):
        super().__init__(daemon=True)
        self.args = (group, topic, partitions)
        self.cluster = cluster
        self.samples: list[dict[int, int | None]] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.samples.append(self.cluster.committed(*self.args))

    def check_monotonic(self) -> None:
        self.done.set()
        self.join(timeout=30)
        assert len(self.samples) > 10
        for partition in range(self.args[2]):
            seen = [s[partition] for s in self.samples if s[partition] is not None]
            assert seen == sorted(seen), f"partition {partition}'s committed offset moved backwards: {seen}"


@pytest.mark.parametrize("concurrency", [1, 32])
def test_crash_loop_of_five_sigkills_loses_nothing(cluster, kernels, concurrency):
    topic, group = cluster.create_topic(partitions=6), f"crash-loop-{concurrency}"
    env = kernels.env(topic, group, TEST_SLEEP_S=0.0005, KAFKA_MAX_POLL_RECORDS=MAX_POLL_RECORDS,
                      KERNEL_CONCURRENCY=concurrency,
                      KAFKA_SESSION_TIMEOUT_MS=cluster.shortest_session_timeout_ms)
    messages = [(i % 6, f"key-{i % 100}".encode(), f"m{i}".encode()) for i in range(20_000)]
    producer = cluster.produce_in_background(topic, messages, 25)
    sampler = CommittedOffsetSampler(cluster, group, topic, 6)
    rng = random.Random(20_000)
    kills = []
    for _ in range(5):
        kernel = kernels.start(env)
        kernel.wait_for_log("Partitions assigned", 30)
        time.sleep(rng.uniform(0.5, 4))
        kills.append(len(kernels.attempts()))
        kernel.process.send_signal(signal.SIGKILL)
        kernel.wait()
    produced = producer.result()
    last = kernels.start(env)
    last.wait_for_log("Partitions assigned", 30)
    wait_until(lambda: len(processed(kernels.attempts())) == 20_000, 120, "every message processed")
    # What a killed kernel finished but did not commit, the last one redoes: wait for its commits.
    wait_committed(cluster, last, group, topic, produced, 6)
    assert last.stop() == 0
    sampler.check_monotonic()

    repeats = report(f"crash loop, concurrency {concurrency} (SIGKILL after {kills} processed)", produced,
                     kernels.attempts())
    # A kill repeats what finished but was not committed: beyond each partition's finished prefix
    # (at most the 2 x KAFKA_MAX_POLL_RECORDS a partition buffers), or within the last 0.1 s.
    assert repeats <= 5 * (6 * 2 * MAX_POLL_RECORDS + MAX_POLL_RECORDS)
    assert cluster.committed(group, topic, 6) == {p: produced[p] for p in range(6)}


@pytest.mark.parametrize("concurrency", [1, 32])
def test_group_of_three_survives_kill_join_and_stop_with_one_owner_per_partition(cluster, kernels, concurrency):
    topic, group = cluster.create_topic(partitions=6), f"group-of-three-{concurrency}"
    env = kernels.env(topic, group, TEST_SLEEP_S=0.002, KERNEL_CONCURRENCY=concurrency)
    messages = [(i % 6, f"key-{i % 100}".encode(), f"m{i}".encode()) for i in range(6_000)]
    producer = cluster.produce_in_background(topic, messages, 30)
    members = [kernels.start(env) for _ in range(3)]
    for member in members:
        member.wait_for_log("Partitions assigned", 30)
    time.sleep(3)
    members[0].process.send_signal(signal.SIGKILL)  # gone without leaving: the group notices by session timeout
    members[0].wait()
    time.sleep(2)
    members.append(kernels.start(env))
    members[3].wait_for_log("Partitions assigned", 30)
    time.sleep(3)
    assert members[1].stop(signal.SIGTERM) == 0  # leaves the group cleanly
    produced = producer.result()
    wait_until(lambda: len(processed(kernels.attempts())) == 6_000, 90, "every message processed")
    wait_committed(cluster, members[2], group, topic, produced, 6)
    for member in (members[2], members[3]):
        assert member.stop(signal.SIGTERM) == 0

    attempts = kernels.attempts()
    report(f"group of three, concurrency {concurrency} (kill one, start one, stop one)", produced, attempts)
    check_one_owner_at_a_time(attempts)
    assert len({a.pid for a in attempts}) >= 3
    assert cluster.committed(group, topic, 6) == {p: produced[p] for p in range(6)}


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def test_broker_outage_of_ten_seconds_is_survived(cluster, kernels):
    topic = cluster.create_topic(partitions=3)
    produced = cluster.produce(topic, [(i % 3, None, f"m{i}".encode()) for i in range(3_000)])
    kernel = kernels.start(kernels.env(topic, "outage", TEST_SLEEP_S=0.004, KAFKA_MAX_POLL_RECORDS=100))
    wait_until(lambda: len(kernels.attempts()) >= 500, 60, "500 messages processed")

    cpu_before, lines_before = cpu_seconds(kernel.process.pid), len(kernel.log().splitlines())
    cluster.outage(10)
    cpu_during = cpu_seconds(kernel.process.pid) - cpu_before
    outage_log = kernel.log().splitlines()[lines_before:]
    assert kernel.process.poll() is None, "the kernel exited during the outage"

    wait_until(lambda: len(processed(kernels.attempts())) == 3_000, 90, "every message processed")
    wait_committed(cluster, kernel, "outage", topic, produced, 3)
    assert kernel.stop() == 0
    repeats = report("10 s broker outage", produced, kernels.attempts())
    problems = [line for line in outage_log if " WARNING " in line or " ERROR " in line]
    print(f"during the outage: {cpu_during:.2f} s of CPU, {len(problems)} warning/error lines")
    assert cpu_during < 3, "busy loop during the outage"
    assert len(problems) <= 30, "\n".join(problems)
    assert repeats <= 3 * 100  # what was finished but not committed when the session expired
    assert cluster.committed("outage", topic, 3) == {p: produced[p] for p in range(3)}


def test_poison_message_goes_to_the_dead_letter_topic_once(cluster, kernels):
    topic, dead_letters = cluster.create_topic(partitions=2), cluster.create_topic(partitions=1)
    messages = [(0, b"k0", b"m0"), (0, b"poison-key", b"false:1000"), (0, None, b"m2"), (0, None, b"m3")]
    produced = cluster.produce(topic, messages + [(1, None, f"p1-{i}".encode()) for i in range(5)])
    env = kernels.env(topic, "poison", KERNEL_MAX_ATTEMPTS=3, KERNEL_DEAD_LETTER_TOPIC=dead_letters,
                      KERNEL_RETRY_INITIAL_MS=100)
    kernel = kernels.start(env)
    wait_until(lambda: {(0, 3), (1, 4)} <= processed(kernels.attempts()), 30, "the messages after the poison")
    assert kernel.stop() == 0

    assert [a.result for a in kernels.attempts() if (a.partition, a.offset) == (0, 1)] == ["false"] * 3
    records = cluster.read_topic(dead_letters, 1)
    assert len(records) == 1, "the poison message must be dead-lettered exactly once"
    headers = dict(records[0].headers())
    assert (records[0].key(), records[0].value()) == (b"poison-key", b"false:1000")
    assert headers["kafka_dlt-original-topic"] == topic.encode()
    assert int.from_bytes(headers["kafka_dlt-original-partition"], "big") == 0
    assert int.from_bytes(headers["kafka_dlt-original-offset"], "big") == 1
    assert int.from_bytes(headers["kafka_dlt-original-timestamp"], "big") > 0
    assert headers["kafka_dlt-original-consumer-group"] == b"poison"
    assert headers["kernel-attempts"] == b"3" and headers["kafka_dlt-exception-fqcn"] == b"RetriesExhausted"
    assert headers["kafka_dlt-exception-message"] == b"process_message returned False on all 3 attempts (KERNEL_MAX_ATTEMPTS)"
    assert cluster.committed("poison", topic, 2) == {0: produced[0], 1: produced[1]}
    assert re.search(r"Dead-lettered \S+\[0\]@1 to \S+: process_message returned False on all 3 attempts", kernel.log())
    print("\npoison with a dead-letter topic: produced 9, processed 8, dead-lettered 1, lost 0")

    # The README's replay command sends it back to where it came from, once.
    for _ in range(2):
        replay = subprocess.run([sys.executable, str(REPO / "devtools" / "replay_dead_letters.py"), dead_letters],
                                env=env, capture_output=True, text=True, timeout=60)
        assert replay.returncode == 0, replay.stderr
    replayed = [r for r in cluster.read_topic(topic, 2) if r.value() == b"false:1000"]
    assert len(replayed) == 2, "the original and exactly one replayed copy"
    assert replayed[1].key() == b"poison-key" and replayed[1].partition() == 0
    assert not [k for k, _ in replayed[1].headers() or [] if k.startswith("kafka_dlt-")]


def test_poison_message_without_a_dead_letter_topic_stops_the_kernel(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"m0"), (0, None, b"false:1000"), (0, None, b"m2")])
    env = kernels.env(topic, "poison-no-dlt", KERNEL_MAX_ATTEMPTS=2, KERNEL_RETRY_INITIAL_MS=100)
    kernel = kernels.start(env)
    assert kernel.wait(timeout_s=30) == 4
    assert "returned False on all 2 attempts (KERNEL_MAX_ATTEMPTS); no KERNEL_DEAD_LETTER_TOPIC" in kernel.log()
    assert (0, 2) not in processed(kernels.attempts())
    assert cluster.committed("poison-no-dlt", topic, 1) == {0: 1}


def test_a_message_slower_than_the_max_poll_interval_keeps_the_group_stable(cluster, kernels):
    topic = cluster.create_topic(partitions=4)
    env = kernels.env(topic, "slow", KAFKA_MAX_POLL_INTERVAL_MS=3000)
    members = [kernels.start(env) for _ in range(2)]
    for member in members:
        member.wait_for_log("Partitions assigned", 30)
    time.sleep(5)  # let the group settle after the second member's join
    assigned_lines = [m.log().count("Partitions assigned") for m in members]

    # Expelled after 3 s, a member would see its partitions move while the message still runs.
    produced = cluster.produce(topic, [(0, None, b"sleep:10")] + [(p, None, f"m{p}-{i}".encode())
                                                                  for i in range(50) for p in range(4)])
    wait_until(lambda: len(processed(kernels.attempts())) == sum(produced.values()), 60, "every message processed")
    time.sleep(3)  # a rebalance started by an expulsion would complete meanwhile
    assert [m.log().count("Partitions assigned") for m in members] == assigned_lines, "the group rebalanced"
    for member in members:
        assert member.stop() == 0

    attempts = kernels.attempts()
    report("a 10 s message with a 3 s max-poll interval", produced, attempts)
    check_one_owner_at_a_time(attempts)
    assert [a.result for a in attempts if a.value == "sleep:10"] == ["true"], "the slow message ran twice"
    assert any("process_message has been running for" in m.log() for m in members)
