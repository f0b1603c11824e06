"""A/B of the no-op kernel: the work tree against an earlier commit, interleaved, in one run.

    uv run bench/ab.py 9968888              # 6 pairs of 150,000 messages over 6 partitions
    uv run bench/ab.py 9968888 --runs 10
    uv run bench/ab.py c7b8565 --forward    # each message forwarded with send() (c7b8565 on: librdkafka's producer)
    uv run bench/ab.py 9968888 --concurrency 8   # both arms at KERNEL_CONCURRENCY=8 (key order)
    uv run bench/ab.py 9968888 --dead-letter     # DeadLetter raised for each of the first 30,000 messages

Timings drift 2x between runs on a shared machine, so both arms run against the same preloaded topic
on one broker, in alternating order, and the medians and their ratio are what to read (with the CPU
each spends per 1,000 messages, which drifts less than the rate). The commit is exported with
`git archive` into a temporary folder: nothing of the work tree changes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchmark import HERE, interleaved, preload  # noqa: E402
from devtools.broker import Broker  # noqa: E402

MESSAGES = 150_000
DEAD_LETTERS = 30_000  # of them, when each is dead-lettered (slower)


def exported(commit: str, directory: Path) -> Path:
    """`commit` of this repository, its files written under `directory`."""
    archive = subprocess.run(["git", "archive", commit], cwd=HERE.parent, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="the earlier commit (A); B is the work tree")
    parser.add_argument("--runs", type=int, default=6, help="pairs of runs (default 6)")
    parser.add_argument("--concurrency", type=int, help="KERNEL_CONCURRENCY of both arms (default: the kernel's, 1)")
    parser.add_argument("--forward", action="store_true", help="each message forwarded (send()) to a topic ab-out")
    parser.add_argument("--dead-letter", action="store_true",
                        help=f"DeadLetter raised for each message (the first {DEAD_LETTERS:,}), to a topic ab-dlt")
    args = parser.parse_args()
    env = {} if args.concurrency is None else {"KERNEL_CONCURRENCY": str(args.concurrency)}
    if args.forward:
        env["BENCH_FORWARD"] = "ab-out"
    if args.dead_letter:
        env |= {"BENCH_DEAD_LETTER": "1", "KERNEL_DEAD_LETTER_TOPIC": "ab-dlt"}
    with tempfile.TemporaryDirectory() as folder, Broker() as broker:
        arms = {args.commit: (str(exported(args.commit, Path(folder)) / "bench" / "probe_kernel.py"), env),
                "work tree": (str(HERE / "probe_kernel.py"), env)}
        broker.create_topic("ab", 6)
        for wanted, topic in ((args.forward, "ab-out"), (args.dead_letter, "ab-dlt")):
            if wanted:
                broker.create_topic(topic, 6)
        preload(broker.bootstrap, "ab", MESSAGES, partitions=6)
        results = interleaved(arms, broker, "ab", DEAD_LETTERS if args.dead_letter else MESSAGES, args.runs)
    medians = {name: (statistics.median(r["rate"] for r in runs), statistics.median(r["cpu_per_1000"] for r in runs))
               for name, runs in results.items()}
    for name, (rate, cpu) in medians.items():
        print(f"median {name}: {rate:,.0f} messages/s, {cpu * 1000:.2f} CPU ms per 1,000")
    (rate_a, cpu_a), (rate_b, cpu_b) = medians.values()
    print(f"work tree / {args.commit}: throughput {rate_b / rate_a:.2f}, CPU per message {cpu_b / cpu_a:.2f}")


if __name__ == "__main__":
    main()
