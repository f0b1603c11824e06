"""The real kernel (main.run_kernel) with a test process_message, run as `python tests/recording_kernel.py`.

It hands main.run_kernel its own process_message under a name of its own (recording-kernel), the
way an example kernel does, and records every call, one line per attempt, "topic partition offset
value result pid start_ns end_ns", to $TEST_RECORD_PATH (appended and flushed per line, so it
survives SIGKILL). What the handler does depends on the
message value (the part before a "|", if any; what follows is a label for the test):
  "false:N"  return False for the first N attempts in this process, then True
  "raise"    raise RuntimeError while $TEST_RAISE is not "0"
  "dead"     raise DeadLetter
  "later:S"  raise RetryLater(S) the first time in this process ("later:S:N": the first N times), then True
  "send:T"   send() the message (its key, value and headers) on to topic T, log "Sent ... to T", then True
  "sleep:S"  sleep S seconds, then True
  anything   True, after sleeping $TEST_SLEEP_S seconds (default 0)
With $TEST_BATCH=1 it is a process_batch instead, recording each message of a call with the call's
start time (so a test tells the batches apart): "false:N" in a batch makes the whole batch return
False for its first N attempts; "dead" raises DeadLetter naming that message (after the ones before
it are done); "raise" and "sleep:S" as above, for the whole batch.
"""

import logging
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
log = logging.getLogger("recording-kernel")


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
    if value == "dead":
        record(message, "dead", started_ns)
        raise main.DeadLetter("dead on purpose")
    if value.startswith("later:"):
        seconds, times = (value.split(":") + ["1"])[1:3]
        if attempts[message.topic, message.partition, message.offset] <= int(times):
            record(message, "later", started_ns)
            raise main.RetryLater(seconds, "asked to wait")
    if value.startswith("send:"):
        main.send(value.split(":")[1], message.value, key=message.key, headers=message.headers)
        log.info("Sent %s to %s", main.coordinates(message), value.split(":")[1])
    time.sleep(float(value.split(":")[1]) if value.startswith("sleep:") else SLEEP_S)
    record(message, "true", started_ns)
    return True


def process_batch(messages) -> bool:
    started_ns = time.time_ns()
    batch = (messages[0].topic, messages[0].partition, messages[0].offset, len(messages))
    attempts[batch] += 1
    values = [message.value.decode().split("|")[0] for message in messages]
    if any(v.startswith("false:") and attempts[batch] <= int(v.split(":")[1]) for v in values):
        for message in messages:
            record(message, "false", started_ns)
        return False
    if "raise" in values and os.environ.get("TEST_RAISE") != "0":
        for message in messages:
            record(message, "raise", started_ns)
        raise RuntimeError("poison batch")
    time.sleep(sum(float(v.split(":")[1]) for v in values if v.startswith("sleep:")) or SLEEP_S)
    for message, value in zip(messages, values, strict=True):
        if value == "dead":
            record(message, "dead", started_ns)
            raise main.DeadLetter("dead on purpose", message=message)
        record(message, "true", started_ns)
    return True


if __name__ == "__main__":
    handler = {"process_batch": process_batch} if os.environ.get("TEST_BATCH") == "1" else {
        "process_message": process_message}
    sys.exit(main.run_kernel(**handler, name="recording-kernel", default_topic="unused"))
