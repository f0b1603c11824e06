"""What a task costs the loop and a worker, without a broker: the hand-off measured alone.

    uv run bench/handoff.py                      # this work tree's main.py
    uv run bench/handoff.py --commit 80a9705     # an earlier commit's, for an A/B (run both, interleaved)

A ConsumerLoop (the real one, with a stand-in consumer and the real worker threads) is given
records of distinct keys and hands them out, one lane a task, until every task is settled: the
time per task is the loop's and the worker's cost of handing a task out, processing it with a no-op
process_message, handing it back and settling it. The commit is exported with `git archive`; the arms
alternate, and the medians are what to read (timings drift on a shared machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

REPO = Path(__file__).resolve().parent.parent
P0 = TopicPartition("t", 0)


class StandInConsumer:
    """What the loop asks of KafkaConsumer while it hands out and settles tasks."""

    config = {"api_version": (2, 8)}

    def __init__(self):
        self._fetcher = type("Fetcher", (), {"config": {}})()

    def pause(self, *partitions): ...

    def resume(self, *partitions): ...


def load_main(folder: Path):
    spec = importlib.util.spec_from_file_location(f"main_{abs(hash(folder))}", folder / "main.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds_per_task(main, tasks: int, concurrency: int) -> float:
    settings = main.load_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_CONCURRENCY": str(concurrency),
                                   "KERNEL_ORDERING": "key"}, "handoff", "t")
    loop = main.ConsumerLoop(StandInConsumer(), settings, main.KernelHandler(lambda message: True), main.StopSignal())
    loop.ledger.assign({P0})
    loop.ledger.tasks_wanted = 1 << 30  # one lane a task, whatever the handler's speed
    records = [ConsumerRecord("t", 0, None, offset, 0, 0, b"%d" % offset, b"v", [], None, 1, 1, -1)
               for offset in range(tasks)]
    try:
        started = time.perf_counter()
        loop.ledger.add(P0, records)
        loop.hand_out()
        while loop.ledger.in_flight:
            loop.settle_handed_back(timeout_s=5)
        return (time.perf_counter() - started) / tasks
    finally:
        loop.workers.stop()
        loop.producer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", help="an earlier commit to compare with (A); B is the work tree")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks a run (default 20,000)")
    parser.add_argument("--runs", type=int, default=7, help="runs of each arm (default 7)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="KERNEL_CONCURRENCY (default 2, the least at which each key is a lane of its own)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        arms = {"work tree": load_main(REPO)}
        if args.commit:
            archive = subprocess.run(["git", "archive", args.commit, "main.py"], cwd=REPO, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
            arms = {args.commit: load_main(Path(folder)), **arms}
        results: dict[str, list[float]] = {name: [] for name in arms}
        for run in range(args.runs):
            for name in list(arms)[::1 if run % 2 == 0 else -1]:
                results[name].append(seconds_per_task(arms[name], args.tasks, args.concurrency))
    medians = {name: statistics.median(runs) for name, runs in results.items()}
    for name, median in medians.items():
        print(f"median {name}: {median * 1e6:.2f} µs a task (runs: "
              f"{', '.join(f'{s * 1e6:.2f}' for s in results[name])})")
    if args.commit:
        print(f"work tree / {args.commit}: time a task {medians['work tree'] / medians[args.commit]:.2f}")


if __name__ == "__main__":
    main()
