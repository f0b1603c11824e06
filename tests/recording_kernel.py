"""The real kernel (main.run_kernel) with a test process_message, run as `python tests/recording_kernel.py`.

It hands main.run_kernel its own process_message under a name of its own (recording-kernel), the
way an example kernel does, and records every call, one line per attempt, "topic partition offset
value result pid start_ns end_ns", to $TEST_RECORD_PATH (appended and flushed per line, so it
survives SIGKILL). What the handler does depends on the
message value (the part before a "|", if any; what follows is a label for the test):
  "false:N"  return False for the first N attempts in this process, then True
  "raise"    raise RuntimeError while $TEST_RAISE is not "0"
  "sleep:S"  sleep S seconds, then True
  anything   True, after sleeping $TEST_SLEEP_S seconds (default 0)
"""

import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import main  # noqa: E402

RECORD = os.open(os.environ["TEST_RECORD_PATH"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
SLEEP_S = float(os.environ.get("TEST_SLEEP_S", "0"))
attempts: Counter = Counter()


def record(message, result: str, started_ns: int) -> None:
    value = message.value[:100].decode()  # large test messages need not be written out whole
    line = f"{message.topic} {message.partition} {message.offset} {value} {result} {os.getpid()} {started_ns} {time.time_ns()}"
    os.write(RECORD, f"{line}\n".encode())


def process_message(message) -> bool:
    started_ns = time.time_ns()
    value = message.value.decode().split("|")[0]
    attempts[message.topic, message.partition, message.offset] += 1
    if value.startswith("false:"):
        done = attempts[message.topic, message.partition, message.offset] > int(value.split(":")[1])
        record(message, "true" if done else "false", started_ns)
        return done
    if value == "raise" and os.environ.get("TEST_RAISE") != "0":
        record(message, "raise", started_ns)
        raise RuntimeError("poison message")
    time.sleep(float(value.split(":")[1]) if value.startswith("sleep:") else SLEEP_S)
    record(message, "true", started_ns)
    return True


if __name__ == "__main__":
    sys.exit(main.run_kernel(process_message, name="recording-kernel", default_topic="unused"))
