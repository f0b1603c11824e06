"""Memory is bounded in bytes: a backlog of large messages, six times KERNEL_BUFFER_MAX_BYTES, goes
through a kernel with a slow handler while its resident memory stays under the budget plus a fixed
overhead, and every message is processed once and committed; and a hundred partitions together stay
within the budget too."""

import re
import threading
import uuid
from collections import Counter

import pytest

from devtools.broker import free_port
from tests.fixtures import http_get, processed, wait_committed

pytestmark = pytest.mark.both_brokers

BUDGET = 16 * 1024 * 1024
MESSAGE = 300_000
# Measured on the test machine with these settings (TLS, default fetch sizes): the kernel process
# itself (interpreter, client, threads, TLS buffers) and the fetch data being decoded peak at 63 to 73
# MiB over the budget (79 to 89 MiB in all; 132 MiB without the byte budget). The bound leaves room for
# another interpreter or allocator.
OVERHEAD = 100 * 1024 * 1024


def resident_kb(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the process's own peak) of `pid`, in kB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples_kb, self.done = pid, [], threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.samples_kb.append(resident_kb(self.pid, "VmRSS"))


def test_a_backlog_of_large_messages_stays_within_the_byte_budget(cluster, kernels):
    topic, group = cluster.create_topic(partitions=3), f"memory-{uuid.uuid4().hex[:6]}"
    count = 6 * BUDGET // MESSAGE
    produced = cluster.produce(topic, [(i % 3, None, f"m{i}|".encode().ljust(MESSAGE, b"x")) for i in range(count)])
    kernel = kernels.start(kernels.env(topic, group, TEST_SLEEP_S=0.01, KERNEL_BUFFER_MAX_BYTES=BUDGET))
    sampler = RssSampler(kernel.process.pid)
    wait_committed(cluster, kernel, group, topic, produced, 3, timeout_s=120)
    peak_kb = resident_kb(kernel.process.pid, "VmHWM")
    sampler.done.set()
    assert kernel.stop() == 0

    attempts = Counter((a.partition, a.offset) for a in kernels.attempts())
    assert set(attempts) == {(p, o) for p in range(3) for o in range(produced[p])} == processed(kernels.attempts())
    assert set(attempts.values()) == {1}, "a message was processed twice"
    print(f"\n{count} messages of {MESSAGE:,} bytes ({count * MESSAGE / 2**20:.0f} MiB), budget {BUDGET / 2**20:.0f} MiB: "
          f"peak RSS {peak_kb / 1024:.0f} MiB (VmHWM; sampled VmRSS max {max(sampler.samples_kb) / 1024:.0f} MiB), "
          f"bound {(BUDGET + OVERHEAD) / 2**20:.0f} MiB")
    assert peak_kb * 1024 < BUDGET + OVERHEAD


def test_a_hundred_partitions_together_stay_within_the_byte_budget(cluster, kernels):
    """With a hundred partitions a 4 MiB budget is 42 KB each: a full-size fetch of every partition
    (1 MiB each) would bring all of the backlog at once. kernel_buffered_bytes, sampled every 20 ms,
    must stay under the budget."""
    budget, size, partitions = 4 * 2**20, 15_000, 100
    topic, group, port = cluster.create_topic(partitions=partitions), f"memory-many-{uuid.uuid4().hex[:6]}", free_port()
    messages = [(i % partitions, None, f"m{i}|".encode().ljust(size, b"x")) for i in range(5 * partitions)]
    produced = cluster.produce(topic, messages, one_per_batch=True)  # a record batch as large as a message
    kernel = kernels.start(kernels.env(topic, group, TEST_SLEEP_S=0.005, KERNEL_BUFFER_MAX_BYTES=budget,
                                       KERNEL_HTTP_PORT=port))
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            found = re.search(r"^kernel_buffered_bytes (\S+)$", http_get(port, "/metrics")[1], re.M)
            if found:
                samples.append(float(found.group(1)))

    threading.Thread(target=sample, daemon=True).start()
    wait_committed(cluster, kernel, group, topic, produced, partitions, timeout_s=120)
    done.set()
    assert kernel.stop() == 0
    print(f"\n{len(messages)} messages of {size:,} bytes over {partitions} partitions, budget {budget / 2**20:.0f} MiB: "
          f"kernel_buffered_bytes peaked at {max(samples) / 2**20:.2f} MiB over {len(samples)} samples")
    assert len(samples) > 10 and max(samples) <= budget


def sample_buffered_bytes(port: int, samples: list[float], done: threading.Event) -> None:
    """Append kernel_buffered_bytes from /metrics every 20 ms until `done`."""
    while not done.wait(0.02):
        found = re.search(r"^kernel_buffered_bytes (\S+)$", http_get(port, "/metrics")[1], re.M)
        if found:
            samples.append(float(found.group(1)))


def run_one_message_per_partition(cluster, kernels, partitions: int, size: int, budget: int):
    """A kernel (50 ms a message) under a budget of `budget` bytes, on a topic of `partitions` holding one
    message of `size` bytes each, until all are committed and it stopped with 0; it and its
    kernel_buffered_bytes samples."""
    topic, group, port = cluster.create_topic(partitions=partitions), f"memory-{uuid.uuid4().hex[:6]}", free_port()
    produced = cluster.produce(topic, [(p, None, f"m{p}|".encode().ljust(size, b"x")) for p in range(partitions)])
    kernel = kernels.start(kernels.env(topic, group, TEST_SLEEP_S=0.05, KERNEL_BUFFER_MAX_BYTES=budget,
                                       KERNEL_HTTP_PORT=port))
    samples: list[float] = []
    done = threading.Event()
    threading.Thread(target=sample_buffered_bytes, args=(port, samples, done), daemon=True).start()
    wait_committed(cluster, kernel, group, topic, produced, partitions, timeout_s=60)
    done.set()
    assert kernel.stop() == 0
    return kernel, samples


def test_partitions_of_large_messages_fetch_in_turn_within_the_byte_budget(cluster, kernels):
    """Twenty partitions each holding one 600 KB message, with a 2 MiB budget: a fetch brings a whole
    record batch of every partition it names, so the budget must decide how many partitions fetch at
    once (before, each partition holding nothing fetched: all twenty, 12 MB, were held at once). Every
    message is processed once, and kernel_buffered_bytes stays within the budget."""
    budget, size, partitions = 2 * 2**20, 600_000, 20
    kernel, samples = run_one_message_per_partition(cluster, kernels, partitions, size, budget)
    attempts = Counter((a.partition, a.offset) for a in kernels.attempts())
    assert set(attempts) == {(p, 0) for p in range(partitions)} == processed(kernels.attempts())
    assert set(attempts.values()) == {1}, "a message was processed twice"
    print(f"\n{partitions} partitions of one {size:,}-byte message, budget {budget / 2**20:.0f} MiB: "
          f"kernel_buffered_bytes peaked at {max(samples) / 2**20:.2f} MiB over {len(samples)} samples")
    assert len(samples) > 10 and max(samples) <= budget


@pytest.mark.brokers("tansu")  # Apache Kafka refuses a message over 1 MB unless the topic allows it
def test_a_message_larger_than_the_whole_budget_is_taken_alone(cluster, kernels):
    """Six partitions each holding one message of 1.5 MB, with a 1 MiB budget: each message is
    fetched while nothing else is held, processed, and the log says so; kernel_buffered_bytes never
    holds two of them."""
    budget, size, partitions = 2**20, 1_500_000, 6
    kernel, samples = run_one_message_per_partition(cluster, kernels, partitions, size, budget)
    assert processed(kernels.attempts()) == {(p, 0) for p in range(partitions)}
    print(f"\n{partitions} messages of {size:,} bytes, budget {budget / 2**20:.0f} MiB: kernel_buffered_bytes peaked "
          f"at {max(samples) / 2**20:.2f} MiB over {len(samples)} samples")
    assert len(samples) > 10 and max(samples) < 2 * size
    assert "more than KERNEL_BUFFER_MAX_BYTES (1048576): it is taken alone" in kernel.log()
