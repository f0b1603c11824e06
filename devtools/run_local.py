"""Run the kernel end to end on an embedded broker: `uv run devtools/run_local.py`.

Starts Tansu on a free port, creates the kernel's topic and a dead-letter topic beside it, produces a
few sample messages and runs `main.py` against it over PLAINTEXT (so a kernel that raises DeadLetter
for a sample shows it dead-lettered rather than stopping). Ctrl-C stops the kernel (gracefully), then
the broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka import KafkaProducer  # noqa: E402

import main  # noqa: E402
from devtools.broker import Broker  # noqa: E402

SAMPLES = [
    (b"user-1", json.dumps({"event": "signup", "user": "user-1"}).encode()),
    (b"user-2", json.dumps({"event": "login", "user": "user-2"}).encode()),
    (None, b"plain text without a key"),
    (b"sensor-7", bytes(range(256))),  # binary: logged as a byte count
    (b"user-1", json.dumps({"event": "note", "text": "x" * 500}).encode()),  # truncated in the log
]


def local_environment(bootstrap: str, topic: str, dead_letter_topic: str) -> dict[str, str]:
    """The kernel's environment for the embedded broker; overrides a .env meant for a cluster."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "KERNEL_DEAD_LETTER_TOPIC": dead_letter_topic,
        "KAFKA_CA_CERT": "",
        "KAFKA_CLIENT_CERT": "",
        "KAFKA_CLIENT_KEY": "",
        # Tansu's first join waits about half the session timeout: keep it short locally.
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    }


def produce_samples(bootstrap: str, topic: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in SAMPLES:
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=10)
    producer.close()


def run() -> int:
    topic = os.environ.get("KAFKA_TOPIC") or main.DEFAULT_TOPIC
    dead_letter_topic = f"{topic}-dead-letters"
    with Broker() as broker:
        broker.create_topic(topic, partitions=3)
        broker.create_topic(dead_letter_topic, partitions=1)
        produce_samples(broker.bootstrap, topic)
        print(f"Broker on {broker.bootstrap}, {len(SAMPLES)} sample messages in '{topic}', dead letters to "
              f"'{dead_letter_topic}'. Ctrl-C stops.", flush=True)
        kernel = subprocess.Popen(
            [sys.executable, str(Path(main.__file__))],
            env=local_environment(broker.bootstrap, topic, dead_letter_topic),
            start_new_session=True,  # Ctrl-C reaches us; we pass exactly one SIGINT on
        )
        while True:
            try:
                return kernel.wait()
            except KeyboardInterrupt:  # a first one stops gracefully, a second one at once
                kernel.send_signal(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(run())
