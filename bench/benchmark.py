"""Throughput benchmark: the kernel against the raw kafka-python loop, on the same data, in one run.

    uv run --group bench bench/benchmark.py          # prints the table
    uv run --group bench bench/benchmark.py --write  # also writes it into BENCHMARKS.md, and its charts

The bench dependency group holds the peer (Quix Streams); the kernel and its tests do not need it.

Starts the embedded broker (PLAINTEXT: TLS costs every client alike), preloads 200,000 messages of
100 bytes over 6 partitions, then runs each consumer as its own process in its own group and reads
the figures it reports once it has seen every message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.broker import Broker, free_port  # noqa: E402

HERE = Path(__file__).resolve().parent
MESSAGES = 200_000
PARTITIONS = 6
KEYS = 1_000
DEAD_LETTERS = 50_000  # of the messages, when every one is dead-lettered
REPEATS = 5
HANDLER_SLEEP_S = 0.020
# Messages per concurrency level for the 20 ms handler: about six seconds of ideal work each.
SLOW_RUNS = {1: 300, 8: 2_400, 32: 9_600, 64: 19_200}
# The raw loop with larger polls: what tuning alone gives the client.
RAW_TUNED = {"max_poll_records": 2000, "receive_message_max_bytes": 64 * 1024 * 1024}
# What `pip install kafka-python` gives today: its newest release (3.0.12), without the crc32c extension,
# so CRCs are checked in pure Python.
PLAIN_CLIENT = ["uv", "run", "--isolated", "--no-project", "--with", "kafka-python==3.0.12", "python"]


def preload(bootstrap: str, topic: str, count: int, value_bytes: int = 100, partitions: int = PARTITIONS) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
                         "queue.buffering.max.messages": 1_000_000,
                         "message.max.bytes": max(2_000_000, value_bytes + 100_000)})
    value = b"x" * value_bytes
    for i in range(count):
        while True:
            try:
                producer.produce(topic, value=value, key=f"key-{i % KEYS}".encode(), partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0


def run_probe(script: str, broker: Broker, topic: str, count: int, env: dict[str, str],
              measure_stop: bool = False, python: list[str] | None = None) -> dict:
    """Run a probe until it has seen `count` messages; return its figures."""
    out = Path(tempfile.mkdtemp()) / "result.json"
    started = time.time()
    process = subprocess.Popen(
        [*(python or [sys.executable]), str(HERE / script)],
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": topic,
             "KAFKA_CONSUMER_GROUP": f"bench-{uuid.uuid4().hex[:8]}", "KAFKA_CA_CERT": "",
             "KAFKA_CLIENT_CERT": "", "KAFKA_CLIENT_KEY": "", "KAFKA_SESSION_TIMEOUT_MS": "6000",
             "KAFKA_HEARTBEAT_INTERVAL_MS": "1000", "LOG_LEVEL": "WARNING", "BENCH_COUNT": str(count),
             "BENCH_OUT": str(out), **env},
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not out.exists() or not out.read_text():
        if process.poll() is not None and not out.exists():
            raise RuntimeError(f"{script} exited with {process.returncode} before the end")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{script} did not finish within 600 s")
        time.sleep(0.05)
    figures = json.loads(out.read_text())
    result = {
        "rate": count / (figures["last"]["time"] - figures["first"]["time"]),
        "cpu_per_1000": (figures["last"]["cpu_s"] - figures["first"]["cpu_s"]) / count * 1000,
        "rss_mb": figures["last"]["peak_rss_kb"] / 1024,
        "to_first_s": figures["first"]["time"] - started,
    }
    if measure_stop:
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        result["stop_s"] = time.monotonic() - stopping
    elif script == "probe_raw.py":  # exits by itself once done
        process.wait(timeout=60)
    else:  # the kernel and Quix keep consuming
        process.kill()
    return result


def interleaved(arms: dict[str, tuple[str, dict[str, str]]], broker: Broker, topic: str, count: int,
                runs: int) -> dict[str, list[dict]]:
    """Each arm's (script, environment) run `runs` times over `topic`, in alternating order (the machine's
    drift falls on every arm alike), each run's figures printed as it ends; the figures of each arm."""
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for run in range(runs):
        for name in list(arms)[:: 1 if run % 2 == 0 else -1]:
            script, env = arms[name]
            result = run_probe(script, broker, topic, count, env)
            results[name].append(result)
            print(f"{name}: {result['rate']:,.0f} messages/s, {result['cpu_per_1000'] * 1000:.2f} CPU ms per 1,000, "
                  f"peak {result['rss_mb']:.0f} MB", flush=True)
    return results


def median_run(results: list[dict]) -> dict:
    return sorted(results, key=lambda result: result["rate"])[len(results) // 2]


def spread(results: list[dict]) -> str:
    """The lowest and the highest rate of the runs: how far one figure can be trusted."""
    rates = sorted(result["rate"] for result in results)
    return f"{rates[0]:,.0f}–{rates[-1]:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    arguments = parser.parse_args()
    if importlib.util.find_spec("quixstreams") is None:
        sys.exit("Quix Streams, the benchmark's peer, is missing: run `uv run --group bench bench/benchmark.py`")

    with Broker() as broker:
        broker.create_topic("bench", PARTITIONS)
        broker.create_topic("bench-slow", PARTITIONS)
        broker.create_topic("bench-out", PARTITIONS)
        broker.create_topic("bench-dlt", PARTITIONS)
        print(f"Preloading {MESSAGES:,} messages of 100 bytes over {PARTITIONS} partitions...", flush=True)
        preload(broker.bootstrap, "bench", MESSAGES)
        preload(broker.bootstrap, "bench-slow", max(SLOW_RUNS.values()))

        # The machine is shared and small: each consumer runs REPEATS times, interleaved, and the
        # run with the median throughput is reported.
        runs: dict[str, list[dict]] = {name: [] for name in (
            "naive", "same", "tuned", "tuned_gc", "kernel", "kernel_http", "kernel8", "kernel8_partition", "quix",
            "raw_forward", "kernel_forward", "kernel_forward_kafka_python", "quix_forward", "kernel_dead_letter",
            "kernel_dead_letter_kafka_python")}
        for _ in range(REPEATS):
            runs["naive"].append(run_probe("probe_raw.py", broker, "bench", MESSAGES, {}, python=PLAIN_CLIENT))
            runs["same"].append(run_probe("probe_raw.py", broker, "bench", MESSAGES, {}))
            runs["tuned"].append(run_probe("probe_raw.py", broker, "bench", MESSAGES,
                                           {"BENCH_TUNED": json.dumps(RAW_TUNED)}))
            runs["tuned_gc"].append(run_probe("probe_raw.py", broker, "bench", MESSAGES,
                                              {"BENCH_TUNED": json.dumps(RAW_TUNED), "BENCH_GC": "1"}))
            runs["kernel"].append(run_probe("probe_kernel.py", broker, "bench", MESSAGES, {}, measure_stop=True))
            runs["kernel_http"].append(run_probe("probe_kernel.py", broker, "bench", MESSAGES,
                                                 {"KERNEL_HTTP_PORT": str(free_port())}))
            runs["kernel8"].append(run_probe("probe_kernel.py", broker, "bench", MESSAGES, {"KERNEL_CONCURRENCY": "8"}))
            runs["kernel8_partition"].append(run_probe("probe_kernel.py", broker, "bench", MESSAGES,
                                                       {"KERNEL_CONCURRENCY": "8", "KERNEL_ORDERING": "partition"}))
            runs["quix"].append(run_probe("probe_quix.py", broker, "bench", MESSAGES, {}))
            runs["raw_forward"].append(run_probe("probe_raw.py", broker, "bench", MESSAGES,
                                                 {"BENCH_FORWARD": "bench-out"}))
            for producer, suffix in (("confluent-kafka", ""), ("kafka-python", "_kafka_python")):
                runs["kernel_forward" + suffix].append(run_probe("probe_kernel.py", broker, "bench", MESSAGES, {
                    "BENCH_FORWARD": "bench-out", "KERNEL_PRODUCER": producer}))
                runs["kernel_dead_letter" + suffix].append(run_probe("probe_kernel.py", broker, "bench", DEAD_LETTERS, {
                    "BENCH_DEAD_LETTER": "1", "KERNEL_DEAD_LETTER_TOPIC": "bench-dlt", "KERNEL_PRODUCER": producer}))
            runs["quix_forward"].append(run_probe("probe_quix.py", broker, "bench", MESSAGES,
                                                  {"BENCH_FORWARD": "bench-out"}))
        tuned, kernel = median_run(runs["tuned"]), median_run(runs["kernel"])
        rows = [
            ("naive raw loop: `pip install kafka-python` (3.0.12, no extras), client defaults (500 records a poll)",
             "naive"),
            ("raw loop, the kernel's packages (2.3.3, crc32c in C), client defaults", "same"),
            ("raw loop, the kernel's packages, 2,000 records a poll (the kernel's setting)", "tuned"),
            ("the same, collecting garbage as the kernel does (`gc.freeze()`, threshold 10,000)", "tuned_gc"),
            ("**kernel**, no-op `process_message`, default settings", "kernel"),
            ("**kernel**, no-op, serving /healthz and /metrics (`KERNEL_HTTP_PORT` set, as deployed)", "kernel_http"),
            ("**kernel**, no-op, `KERNEL_CONCURRENCY=8` (key order)", "kernel8"),
            ("**kernel**, no-op, `KERNEL_CONCURRENCY=8`, `KERNEL_ORDERING=partition`", "kernel8_partition"),
            ("peer: Quix Streams no-op application, at-least-once (confluent-kafka)", "quix"),
        ]
        rows = [(name, median_run(runs[key]), spread(runs[key]), median_run(runs[key])["rate"] / tuned["rate"])
                for name, key in rows]

        slow_rows = []
        for concurrency, count in SLOW_RUNS.items():
            result = run_probe("probe_kernel.py", broker, "bench-slow", count,
                               {"BENCH_SLEEP_S": str(HANDLER_SLEEP_S), "KERNEL_CONCURRENCY": str(concurrency)})
            slow_rows.append((concurrency, count, result, result["rate"] / (concurrency / HANDLER_SLEEP_S)))

    forward_rows = [
        ("raw loop: send each record (acks=all), flush, then commit, after every poll", "raw_forward"),
        ("**kernel**: `send()` each message from `process_message`, default settings (confluent-kafka's producer)",
         "kernel_forward"),
        ("**kernel**: the same, `KERNEL_PRODUCER=kafka-python`", "kernel_forward_kafka_python"),
        ("peer: Quix Streams application, at-least-once, `to_topic` each message", "quix_forward"),
        (f"**kernel**: `DeadLetter` raised for every message (the first {DEAD_LETTERS:,}), default settings",
         "kernel_dead_letter"),
        ("**kernel**: the same, `KERNEL_PRODUCER=kafka-python`", "kernel_dead_letter_kafka_python"),
    ]
    forward_rows = [(name, median_run(runs[key]), spread(runs[key]),
                     median_run(runs[key])["rate"] / median_run(runs["raw_forward"])["rate"])
                    for name, key in forward_rows]
    concurrency_cost = median_run(runs["kernel8"])["rate"] / kernel["rate"]
    forwarding = median_run(runs["kernel_forward"])["rate"]
    forward_ratios = (forwarding / median_run(runs["quix_forward"])["rate"], forwarding / kernel["rate"])
    table = render(rows, slow_rows, kernel, forward_rows, concurrency_cost, forward_ratios)
    print(table)
    if arguments.write:
        write_section("table", table)


def render(rows, slow_rows, kernel, forward_rows, concurrency_cost: float, forward_ratios: tuple[float, float]) -> str:
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; broker: Tansu (embedded, in memory, PLAINTEXT).",
        "",
        f"No-op handler, {MESSAGES:,} messages of 100 bytes over {PARTITIONS} partitions (median of {REPEATS} "
        "interleaved runs, and their range):",
        "",
        "| consumer | messages/s | range | ratio to the raw loop with 2,000 records a poll "
        "| CPU s per 1,000 messages | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result, low_high, ratio in rows:
        lines.append(f"| {name} | {result['rate']:,.0f} | {low_high} | {ratio:.2f} "
                     f"| {result['cpu_per_1000']:.4f} | {result['rss_mb']:.0f} |")
    lines += [
        "",
        f"`KERNEL_CONCURRENCY=8` with key order runs at {concurrency_cost:.2f} of concurrency 1 (the target: 0.90 or "
        f"more: {'met' if concurrency_cost >= 0.90 else 'not met'} in this run).",
        "",
        f"Kernel start-up, process start to first processed message: {kernel['to_first_s']:.1f} s "
        "(most of it is the broker's first group join, about half of KAFKA_SESSION_TIMEOUT_MS=6000).",
        f"Kernel shutdown, SIGTERM to exit: {kernel['stop_s']:.2f} s.",
        "",
        f"Forwarding: each of the {MESSAGES:,} messages sent on to another topic of {PARTITIONS} partitions, "
        "an input committed only once its output is confirmed (median of the same runs):",
        "",
        "| consumer | messages/s | range | ratio to the raw loop | CPU s per 1,000 messages | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {name} | {result['rate']:,.0f} | {low_high} | {ratio:.2f} | {result['cpu_per_1000']:.4f} "
          f"| {result['rss_mb']:.0f} |" for name, result, low_high, ratio in forward_rows),
        "",
        f"The kernel forwards at {forward_ratios[0]:.2f} times Quix Streams (the target: 1.5 or more: "
        f"{'met' if forward_ratios[0] >= 1.5 else 'not met'}) and at {forward_ratios[1]:.2f} of its own no-op rate "
        f"(the target: 0.6 or more: {'met' if forward_ratios[1] >= 0.6 else 'not met'}) in this run. CPU s per 1,000 "
        "messages is CPU µs per message in thousandths: 0.0100 is 10 µs; peak RSS is the process's own VmHWM.",
        "",
        f"Handler sleeping {HANDLER_SLEEP_S * 1000:.0f} ms, {KEYS:,} distinct keys, KERNEL_ORDERING=key:",
        "",
        "| KERNEL_CONCURRENCY | messages | messages/s | ideal (concurrency / 0.020 s) | ratio to ideal "
        "| peak RSS (MB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency, count, result, ratio in slow_rows:
        lines.append(f"| {concurrency} | {count:,} | {result['rate']:,.0f} | {concurrency / HANDLER_SLEEP_S:,.0f} "
                     f"| {ratio:.2f} | {result['rss_mb']:.0f} |")
    return "\n".join(lines)


def write_section(name: str, table: str) -> None:
    """Replace what stands between <!-- name --> and <!-- /name --> in BENCHMARKS.md."""
    path = HERE.parent / "BENCHMARKS.md"
    text = path.read_text()
    head, rest = text.split(f"<!-- {name} -->", 1)
    tail = rest.split(f"<!-- /{name} -->", 1)[1]
    path.write_text(f"{head}<!-- {name} -->\n{table}\n<!-- /{name} -->{tail}")
    print(f"Wrote {path}")
    from bench import charts  # the pictures of BENCHMARKS.md, drawn again from its tables

    charts.redraw()


if __name__ == "__main__":
    main()
