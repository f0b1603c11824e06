"""What holds forwarding back: the kernel against copies of main.py with one safeguard taken out each.

    uv run --group bench bench/forwarding_limits.py             # 3 interleaved rounds, 150,000 messages
    uv run --group bench bench/forwarding_limits.py --runs 5

Each arm forwards every message to another topic (probe_kernel.py with $BENCH_FORWARD), on one Tansu
broker and one preloaded topic, in alternating order; medians are printed with their ratio to Quix
Streams and to the kernel's own no-op rate. The altered copies are for measuring only: they commit what
the broker has not confirmed, which the kernel never does.

- "kernel": main.py as it is: a task's messages count as finished once their sends are confirmed, which
  the worker awaits at the end of the task before it takes the next.
- "no waiting": the same delivery reports (a Python callback per message, on the producer's thread),
  but a send counts as confirmed at once: what the worker's wait costs.
- "no reports": nor any Python callback (confluent-kafka still takes the GIL once a message for the
  report): what the per-message reports cost on top.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchmark import HERE, interleaved, preload  # noqa: E402
from devtools.broker import Broker  # noqa: E402

MESSAGES = 150_000
PRODUCE = "                self.client.produce(topic, value, key, headers=headers or None, on_delivery=future.report)\n"
VARIANTS = {
    "no waiting": PRODUCE + "                future.is_done = True\n",
    "no reports": "                self.client.produce(topic, value, key, headers=headers or None)\n"
                  "                future.is_done = True\n",
}


def altered_copy(folder: Path, replacement: str) -> Path:
    """main.py with its produce() line replaced, beside a copy of bench/: the copy's probe_kernel.py."""
    source = (HERE.parent / "main.py").read_text()
    if source.count(PRODUCE) != 1:
        raise SystemExit("main.py's produce() line changed: update PRODUCE in bench/forwarding_limits.py")
    (folder / "main.py").write_text(source.replace(PRODUCE, replacement))
    shutil.copytree(HERE, folder / "bench")
    return folder / "bench" / "probe_kernel.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (default 3)")
    args = parser.parse_args()
    if importlib.util.find_spec("quixstreams") is None:
        sys.exit("Quix Streams, the peer, is missing: run `uv run --group bench bench/forwarding_limits.py`")
    with tempfile.TemporaryDirectory() as folder, Broker() as broker:
        forward = {"BENCH_FORWARD": "limits-out"}
        arms = {"kernel": (str(HERE / "probe_kernel.py"), forward)}
        for number, (name, replacement) in enumerate(VARIANTS.items()):
            (copy := Path(folder) / str(number)).mkdir()
            arms[name] = (str(altered_copy(copy, replacement)), forward)
        arms["quix"] = (str(HERE / "probe_quix.py"), forward)
        arms["kernel, no-op"] = (str(HERE / "probe_kernel.py"), {})
        broker.create_topic("limits", 6)
        broker.create_topic("limits-out", 6)
        preload(broker.bootstrap, "limits", MESSAGES, partitions=6)
        results = interleaved(arms, broker, "limits", MESSAGES, args.runs)
    medians = {name: statistics.median(result["rate"] for result in runs) for name, runs in results.items()}
    for name, rate in medians.items():
        print(f"median {name}: {rate:,.0f} messages/s, {rate / medians['quix']:.2f} of Quix Streams, "
              f"{rate / medians['kernel, no-op']:.2f} of the no-op kernel")


if __name__ == "__main__":
    main()
