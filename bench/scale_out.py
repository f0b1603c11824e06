"""Scale-out benchmark: 1, 2, 3 and 6 replicas of a kernel whose handler waits 20 ms per message (an
API call) at KERNEL_CONCURRENCY=8, sharing a topic of 6 partitions through their consumer group.

    uv run bench/scale_out.py            # prints the table (about five minutes)
    uv run bench/scale_out.py --write    # also writes it into BENCHMARKS.md

On Apache Kafka (one node, PLAINTEXT: the group coordinator production runs; Java 17 and Maven, as for
the tests). Each run has a topic and a group of its own: the replicas start, and once the group is
stable with every replica holding its share of the partitions, the messages are produced (faster than
any of the runs consumes them). Throughput is counted from the first to the last message any replica
finished (each replica appends the time it finished each message to a shared file). Each replica's
CPU time over that span and its peak memory (VmHWM) are read from /proc.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import preload, write_section  # noqa: E402

from devtools.apache_kafka import KAFKA_VERSION, KafkaCluster  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTITIONS = 6
REPLICAS = (1, 2, 3, 6)
CONCURRENCY = 8
HANDLER_SLEEP_S = 0.020
IDEAL_PER_REPLICA = CONCURRENCY / HANDLER_SLEEP_S  # messages a second, were the handler all there is
SECONDS_OF_WORK = 12  # messages per run: about this many seconds of ideal work, whatever the replica count
REPEATS = 3
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NOT_YET = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
           KafkaError.GROUP_ID_NOT_FOUND)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def peak_rss_mb(pid: int) -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def wait_for_group(bootstrap: str, group: str, replicas: int, timeout_s: float = 60) -> None:
    """Until the group is stable with `replicas` members holding every partition between them."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
        except KafkaException as error:  # the group's coordinator is being chosen or loaded
            if error.args[0].code() not in NOT_YET:
                raise
            time.sleep(0.2)
            continue
        held = sorted(tp.partition for m in description.members for tp in m.assignment.topic_partitions)
        if (description.state == ConsumerGroupState.STABLE and len(description.members) == replicas
                and held == list(range(PARTITIONS))):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the group of {replicas} replicas was not stable within {timeout_s} s")


def run(broker: KafkaCluster, replicas: int) -> dict:
    """Start `replicas` kernels in a new group, produce, and measure until every message is done."""
    topic, group = f"scale-{uuid.uuid4().hex[:8]}", f"scale-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, PARTITIONS)
    count = int(replicas * IDEAL_PER_REPLICA * SECONDS_OF_WORK)
    record = Path(tempfile.mkdtemp()) / "done.txt"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": topic,
           "KAFKA_CONSUMER_GROUP": group, "KAFKA_CA_CERT": "", "KAFKA_CLIENT_CERT": "", "KAFKA_CLIENT_KEY": "",
           "KAFKA_SESSION_TIMEOUT_MS": "6000", "KAFKA_HEARTBEAT_INTERVAL_MS": "1000", "LOG_LEVEL": "WARNING",
           "KERNEL_CONCURRENCY": str(CONCURRENCY), "BENCH_SLEEP_S": str(HANDLER_SLEEP_S), "BENCH_RECORD": str(record)}
    started = time.monotonic()
    kernels = [subprocess.Popen([sys.executable, str(HERE / "probe_kernel.py")], env=env, stdout=subprocess.DEVNULL)
               for _ in range(replicas)]
    try:
        wait_for_group(broker.bootstrap, group, replicas)
        joined_s = time.monotonic() - started
        cpu_before = {k.pid: cpu_seconds(k.pid) for k in kernels}
        preload(broker.bootstrap, topic, count)
        deadline = time.monotonic() + 10 * SECONDS_OF_WORK + 60
        while not (record.exists() and record.read_bytes().count(b"\n") >= count):
            if time.monotonic() > deadline or any(k.poll() is not None for k in kernels):
                raise RuntimeError(f"{replicas} replicas did not finish {count:,} messages")
            time.sleep(0.2)
        cpu = [cpu_seconds(k.pid) - cpu_before[k.pid] for k in kernels]
        rss = [peak_rss_mb(k.pid) for k in kernels]
    finally:
        for kernel in kernels:
            kernel.send_signal(signal.SIGTERM)
        for kernel in kernels:
            kernel.wait(timeout=60)
    done = [line.split() for line in record.read_text().splitlines()]
    times = sorted(int(t) for _, t in done)
    seconds = (times[-1] - times[0]) / 1e9
    per_replica = Counter(pid for pid, _ in done)
    return {"replicas": replicas, "count": count, "rate": count / seconds, "joined_s": joined_s,
            "cpu_cores": statistics.mean(cpu) / seconds, "rss_mb": max(rss),
            "spread": (min(per_replica.values()), max(per_replica.values()))}


def render(rows: list[dict]) -> str:
    single = next(row for row in rows if row["replicas"] == 1)["rate"]
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; broker: Apache "
        f"Kafka {KAFKA_VERSION} (one node, PLAINTEXT) on the same machine. Handler sleeping "
        f"{HANDLER_SLEEP_S * 1000:.0f} ms, KERNEL_CONCURRENCY={CONCURRENCY}, 1,000 keys over {PARTITIONS} partitions, "
        f"about {SECONDS_OF_WORK} s of ideal work per run; median of {REPEATS} interleaved runs.",
        "",
        "| replicas | messages | messages/s | per replica | ratio to 1 replica × replicas | ratio to ideal "
        f"(replicas × {IDEAL_PER_REPLICA:.0f}) | CPU per replica (cores) | peak RSS per replica, VmHWM (MB) "
        "| group stable after start (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        n = row["replicas"]
        lines.append(f"| {n} | {row['count']:,} | {row['rate']:,.0f} | {row['rate'] / n:,.0f} "
                     f"| {row['rate'] / (single * n):.2f} | {row['rate'] / (IDEAL_PER_REPLICA * n):.2f} "
                     f"| {row['cpu_cores']:.2f} | {row['rss_mb']:.0f} | {row['joined_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    arguments = parser.parse_args()
    runs: dict[int, list[dict]] = {n: [] for n in REPLICAS}
    with tempfile.TemporaryDirectory() as directory, KafkaCluster(Path(directory), 1) as broker:
        for repeat in range(REPEATS):
            for replicas in REPLICAS:  # interleaved: the machine's other load spreads over every count
                result = run(broker, replicas)
                runs[replicas].append(result)
                print(f"run {repeat + 1}: {replicas} replica(s): {result['rate']:,.0f} messages/s "
                      f"(each finished {result['spread'][0]:,}-{result['spread'][1]:,})", flush=True)
    rows = [sorted(results, key=lambda r: r["rate"])[len(results) // 2] for results in runs.values()]
    table = render(rows)
    print(table)
    if arguments.write:
        write_section("scale-out", table)


if __name__ == "__main__":
    main()
