"""The no-op kernel and the raw loop on both brokers of the tests, side by side, in one run; and forwarding.

    uv run --group bench bench/brokers.py          # prints the tables
    uv run --group bench bench/brokers.py --write  # also writes them into BENCHMARKS.md

Each broker (Tansu, and one Apache Kafka 4.4 node) gets the same 200,000 messages of 100 bytes over 6
partitions, PLAINTEXT; then the raw kafka-python loop (the kernel's packages, 2,000 records a poll)
and the kernel with a no-op process_message each run REPEATS times, interleaved across the brokers; so
do the kernel forwarding each message (send(), with each producer) and Quix Streams doing the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchmark import MESSAGES, PARTITIONS, RAW_TUNED, median_run, preload, run_probe, write_section  # noqa: E402
from devtools.apache_kafka import KAFKA_VERSION, KafkaCluster  # noqa: E402
from devtools.broker import Broker  # noqa: E402

REPEATS = 5
FORWARDING = [  # (case, probe, its environment): each message sent on to bench-out
    ("confluent-kafka", "probe_kernel.py", {"BENCH_FORWARD": "bench-out"}),
    ("kafka-python", "probe_kernel.py", {"BENCH_FORWARD": "bench-out", "KERNEL_PRODUCER": "kafka-python"}),
    ("Quix Streams", "probe_quix.py", {"BENCH_FORWARD": "bench-out"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    arguments = parser.parse_args()
    started = time.monotonic()
    tansu = Broker().start()
    tansu_start_s = time.monotonic() - started
    started = time.monotonic()
    kafka = KafkaCluster(Path(tempfile.mkdtemp(prefix="bench-kafka-"))).start()
    kafka_start_s = time.monotonic() - started
    brokers = {"Tansu": tansu, f"Apache Kafka {KAFKA_VERSION}": kafka}
    try:
        for broker in brokers.values():
            broker.create_topic("bench", PARTITIONS)
            broker.create_topic("bench-out", PARTITIONS)
            preload(broker.bootstrap, "bench", MESSAGES)
        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(REPEATS):
            for name, broker in brokers.items():
                runs.setdefault((name, "raw"), []).append(
                    run_probe("probe_raw.py", broker, "bench", MESSAGES, {"BENCH_TUNED": json.dumps(RAW_TUNED)}))
                runs.setdefault((name, "kernel"), []).append(
                    run_probe("probe_kernel.py", broker, "bench", MESSAGES, {}))
                for case, script, env in FORWARDING:
                    runs.setdefault((name, case), []).append(run_probe(script, broker, "bench", MESSAGES, env))
    finally:
        tansu.stop()
        kafka.stop()
    table = render(brokers, runs, tansu_start_s, kafka_start_s)
    print(table)
    if arguments.write:
        write_section("brokers", table)


def render(brokers, runs, tansu_start_s: float, kafka_start_s: float) -> str:
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}. "
        f"{MESSAGES:,} messages of 100 bytes over {PARTITIONS} partitions, PLAINTEXT, median of {REPEATS} "
        "interleaved runs (`uv run --group bench bench/brokers.py`):",
        "",
        "| broker | raw loop, 2,000 records a poll (messages/s) | no-op kernel (messages/s) | kernel / raw "
        "| kernel CPU s per 1,000 messages |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in brokers:
        raw, kernel = median_run(runs[(name, "raw")]), median_run(runs[(name, "kernel")])
        spread = ", ".join(f"{run['rate']:,.0f}" for run in sorted(runs[(name, "kernel")], key=lambda r: r["rate"]))
        lines.append(f"| {name} | {raw['rate']:,.0f} | {kernel['rate']:,.0f} ({spread}) | "
                     f"{kernel['rate'] / raw['rate']:.2f} | {kernel['cpu_per_1000']:.3f} |")
    lines += ["", f"Broker start (command to ready): Tansu {tansu_start_s:.1f} s, Apache Kafka one node "
                  f"{kafka_start_s:.1f} s (storage format included).", "",
              "Forwarding each message to another topic of 6 partitions (committed once its output is confirmed), "
              "messages/s and CPU µs a message, medians of the same runs:", "",
              "| broker | kernel, confluent-kafka's producer | kernel, `KERNEL_PRODUCER=kafka-python` | Quix Streams, "
              "`to_topic` | kernel / Quix | kernel / its no-op rate |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in brokers:
        cells = [median_run(runs[(name, case)]) for case, _, _ in FORWARDING]
        kernel, quix = cells[0]["rate"], cells[2]["rate"]
        lines.append(f"| {name} | " + " | ".join(f"{cell['rate']:,.0f} ({cell['cpu_per_1000'] * 1000:.1f} µs)"
                                               for cell in cells)
                     + f" | {kernel / quix:.2f} | {kernel / median_run(runs[(name, 'kernel')])['rate']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
