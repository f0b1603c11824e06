"""The real kernel (main.run_kernel) with a counting process_message, for the benchmark.

Counts calls; when $BENCH_COUNT messages are done, writes timings and resource use as JSON to
$BENCH_OUT. Sleeps $BENCH_SLEEP_S per message (0: a no-op handler); with $BENCH_FORWARD, send()s
each message to that topic (the kernel commits it once the broker confirmed the send); with
$BENCH_DEAD_LETTER, raises DeadLetter for each (KERNEL_DEAD_LETTER_TOPIC is where they go). With
$BENCH_RECORD, appends "pid time_ns" to that file for each message done instead, for runs of several
replicas sharing the messages (bench/scale_out.py).
"""

import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from measure import usage  # noqa: E402

import main  # noqa: E402

COUNT = int(os.environ.get("BENCH_COUNT", "0"))
RECORD = os.open(os.environ["BENCH_RECORD"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if (
    "BENCH_RECORD" in os.environ) else None
SLEEP_S = float(os.environ.get("BENCH_SLEEP_S", "0"))
FORWARD = os.environ.get("BENCH_FORWARD")
DEAD_LETTER = bool(os.environ.get("BENCH_DEAD_LETTER"))
counted = itertools.count(1)  # next() is atomic in CPython: the workers need no lock, as the raw loop needs none
first = None


def process_message(message) -> bool:
    global first
    if SLEEP_S:
        time.sleep(SLEEP_S)
    if FORWARD:
        main.send(FORWARD, message.value, key=message.key)
    if RECORD is not None:
        os.write(RECORD, f"{os.getpid()} {time.time_ns()}\n".encode())  # one write per line: whole, even shared
        return True
    seen = next(counted)
    if seen == 1:
        first = usage()
    elif seen == COUNT:
        Path(os.environ["BENCH_OUT"]).write_text(json.dumps({"first": first, "last": usage()}))
    if DEAD_LETTER:
        raise main.DeadLetter("benchmark")
    return True


if __name__ == "__main__":
    sys.exit(main.run_kernel(process_message, name="bench-kernel", default_topic="bench"))
