"""Tracing benchmark: what OpenTelemetry tracing costs the kernel, with a no-op process_message.

    uv run bench/tracing.py            # prints the table (about four minutes)
    uv run bench/tracing.py --write    # also writes it into BENCHMARKS.md

Preloads 100,000 messages of 100 bytes over 6 partitions into the embedded broker, then runs the
kernel (bench/probe_kernel.py) over them, each run a fresh process in its own group, in turn:
  before       main.py of the base revision, which has no tracing at all: --base, by default where this
               branch left main (on main itself, name the commit before tracing came in)
  off          this main.py, OTEL_TRACES_EXPORTER unset (nothing of OpenTelemetry is imported)
  sampled out  OTEL_TRACES_EXPORTER=otlp with OTEL_TRACES_SAMPLER=always_off: the hooks, no span kept
  on           OTEL_TRACES_EXPORTER=otlp: a span per message, exported over OTLP/HTTP to a receiver
               this script serves, as a collector would (it counts the spans, and decodes nothing more)
The variants are interleaved, REPEATS rounds of all four; the table shows each one's median.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import HERE, PARTITIONS, preload, run_probe, write_section  # noqa: E402

from devtools.broker import Broker  # noqa: E402

MESSAGES = 100_000
REPEATS = 5


class SpanSink:
    """An OTLP/HTTP receiver that answers 200 and counts the spans it was sent."""

    def __init__(self):
        self.spans = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                sink.spans += sum(len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def base_probe(revision: str, directory: Path) -> Path:
    """bench/probe_kernel.py beside the main.py of `revision`, in `directory`."""
    (directory / "bench").mkdir(parents=True)
    main_py = subprocess.run(["git", "show", f"{revision}:main.py"], cwd=HERE.parent, capture_output=True,
                             check=True).stdout
    (directory / "main.py").write_bytes(main_py)
    for name in ("probe_kernel.py", "measure.py"):
        shutil.copy(HERE / name, directory / "bench" / name)
    return directory / "bench" / "probe_kernel.py"


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the revision whose main.py is 'before' (default: git merge-base HEAD main)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    arguments = parser.parse_args()
    base = arguments.base or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=HERE.parent,
                                            capture_output=True, text=True, check=True).stdout.strip()
    sink = SpanSink()
    otlp = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
    variants = {"before": {}, "off": {}, "sampled out": {**otlp, "OTEL_TRACES_SAMPLER": "always_off"}, "on": otlp}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as temporary, Broker() as broker:
        before = base_probe(base, Path(temporary))
        broker.create_topic("bench", PARTITIONS)
        print(f"Preloading {MESSAGES:,} messages of 100 bytes over {PARTITIONS} partitions...", flush=True)
        preload(broker.bootstrap, "bench", MESSAGES)
        for name in [name for name in os.environ if name.startswith("OTEL_")]:
            del os.environ[name]  # the probes get os.environ, and only the variant's OTEL_* variables
        for round_ in range(REPEATS):
            for name, env in variants.items():
                sink.spans = 0
                result = run_probe(str(before) if name == "before" else "probe_kernel.py", broker, "bench",
                                   MESSAGES, env, measure_stop=True)
                result["spans"] = sink.spans  # exported once the kernel stopped (it flushes at shutdown)
                runs[name].append(result)
                print(f"round {round_ + 1}, {name}: {result['rate']:,.0f} messages/s, "
                      f"{result['cpu_per_1000'] * 1000:.1f} CPU µs per message, {result['spans']:,} spans", flush=True)
    table = render(runs, base)
    print(table)
    if arguments.write:
        write_section("tracing", table)


def render(runs: dict[str, list[dict]], base: str) -> str:
    def median(name: str, figure: str) -> float:
        return statistics.median(result[figure] for result in runs[name])

    off, off_cpu = median("off", "rate"), median("off", "cpu_per_1000") * 1000
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; broker: Tansu "
        f"(embedded, PLAINTEXT). No-op handler, {MESSAGES:,} messages of 100 bytes over {PARTITIONS} partitions; "
        f"each figure the median of {REPEATS} runs, the variants interleaved.",
        "",
        "| kernel | messages/s | ratio to tracing off | CPU µs per message | ratio to tracing off | peak RSS (MB) "
        "| spans exported |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {"before": f"before tracing existed (main.py of {base[:12]})",
              "off": "tracing off: `OTEL_TRACES_EXPORTER` unset",
              "sampled out": "tracing on, every trace sampled out (`OTEL_TRACES_SAMPLER=always_off`)",
              "on": "tracing on: a span per message, exported over OTLP/HTTP"}
    for name, label in labels.items():
        cpu = median(name, "cpu_per_1000") * 1000  # CPU µs per message
        lines.append(f"| {label} | {median(name, 'rate'):,.0f} | {median(name, 'rate') / off:.2f} | {cpu:.1f} "
                     f"| {cpu / off_cpu:.2f} | {median(name, 'rss_mb'):.0f} | {median(name, 'spans'):,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run()
