"""Memory benchmark: the kernel process's own peak resident set (VmHWM), small messages and large.

    uv run bench/memory.py            # prints the table (about six minutes)
    uv run bench/memory.py --write    # also writes it into BENCHMARKS.md

Each run is a fresh kernel (bench/probe_kernel.py) in its own group on preloaded data, and reports its
own VmHWM once it has processed every message: a no-op handler on 100,000 messages of 100 bytes; a
backlog of large messages, four times KERNEL_BUFFER_MAX_BYTES in all, with a handler sleeping 10 ms, at
concurrency 1 and 32; and that backlog again without the byte budget and with the client's default
fetch size (what the kernel did before it counted bytes). Two runs have a target (issue 27): a hundred
partitions each holding one 3 MB message with a 200 ms handler, at most 256 MB (the limit in
deploy/kubernetes); and 200 partitions of 100 KB messages with a 20 ms handler, at most 180 MB (the
budget plus the process). `--targets` runs only those two (about two minutes).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import preload, run_probe, write_section  # noqa: E402

import main  # noqa: E402
from devtools.broker import Broker  # noqa: E402

BUDGET = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "localhost:9092"}, "bench", "bench").buffer_max_bytes
SLEEP = {"BENCH_SLEEP_S": "0.010"}
NO_BUDGET = {"KERNEL_BUFFER_MAX_BYTES": str(10**12), "KAFKA_FETCH_MAX_BYTES": "52428800"}
# (label, topic, messages, value bytes, partitions, environment); TARGETS' runs end with their target in MB
TARGETS = [
    ("3 MB messages, one in each of 100 partitions, 200 ms handler", "wide", 100, 3_000_000, 100,
     {"BENCH_SLEEP_S": "0.200"}, 256),
    ("100 KB messages over 200 partitions, 20 ms handler", "many", 2_000, 100_000, 200,
     {"BENCH_SLEEP_S": "0.020"}, 180),
]
RUNS = [
    ("no-op handler, 100-byte messages", "small", 100_000, 100, 6, {}),
    ("300 KB messages, 10 ms handler, concurrency 1", "large", 4 * BUDGET // 300_000, 300_000, 3, SLEEP),
    ("300 KB messages, 10 ms handler, concurrency 32", "large", 4 * BUDGET // 300_000, 300_000, 3,
     {**SLEEP, "KERNEL_CONCURRENCY": "32"}),
    ("1 MB messages, 10 ms handler, concurrency 1", "huge", 4 * BUDGET // 1_000_000, 1_000_000, 6, SLEEP),
    ("1 MB messages, 10 ms handler, concurrency 32", "huge", 4 * BUDGET // 1_000_000, 1_000_000, 6,
     {**SLEEP, "KERNEL_CONCURRENCY": "32"}),
    ("300 KB messages, 10 ms handler, concurrency 1, no byte budget, 50 MB fetches (before)", "large",
     4 * BUDGET // 300_000, 300_000, 3, {**SLEEP, **NO_BUDGET}),
]


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--targets", action="store_true", help="only the runs with a target")
    arguments = parser.parse_args()
    runs = [(*run, None) for run in ([] if arguments.targets else RUNS)] + TARGETS
    rows = []
    with Broker() as broker:
        for topic, count, size, partitions in {(r[1], r[2], r[3], r[4]) for r in runs}:
            broker.create_topic(topic, partitions)
            print(f"Preloading {count:,} messages of {size:,} bytes into {topic}...", flush=True)
            preload(broker.bootstrap, topic, count, value_bytes=size, partitions=partitions)
        for label, topic, count, size, _, env, target in runs:
            result = run_probe("probe_kernel.py", broker, topic, count, env)
            rows.append((label, count, count * size, result, target))
            print(f"{label}: peak RSS {result['rss_mb']:.0f} MB{against(result, target)}", flush=True)
    table = render(rows)
    print(table)
    if arguments.write:
        write_section("memory", table)


def render(rows) -> str:
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; broker: Tansu "
        f"(embedded, PLAINTEXT). KERNEL_BUFFER_MAX_BYTES={BUDGET:,} (the default) unless the run says otherwise.",
        "",
        "| run | messages | in all (MB) | peak RSS of the kernel process, VmHWM (MB) | target (MB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {label} | {count:,} | {total / 1e6:,.0f} | {result['rss_mb']:.0f} | "
              f"{against(result, target).strip(' ;') if target else ''} |"
              for label, count, total, result, target in rows]
    return "\n".join(lines)


def against(result: dict, target: int | None) -> str:
    """The peak against its target: the ratio, and whether it is met (a figure, not an assertion)."""
    if target is None:
        return ""
    ratio = result["rss_mb"] / target
    return f"; {target}, {ratio:.2f} of it ({'met' if ratio <= 1 else 'NOT met'})"


if __name__ == "__main__":
    run()
