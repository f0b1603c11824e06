"""How to reach a running `devtools/run_local.py`: a small JSON state file beside main.py.

The runner writes `.run_local.json` once its broker is up (and again when a reload changes the
kernel's topics) and removes it when it exits; `devtools/send.py` reads it, so nobody copies an
address or a certificate path by hand. It holds the broker's address, the kernel's topics and group,
the dead-letter topic and, with --tls, the paths of the run's throwaway client certificate.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from devtools.messages import Message

PROJECT = Path(__file__).resolve().parent.parent
STATE_FILE_NAME = ".run_local.json"


class LocalRunError(Exception):
    """No local run to talk to, or its broker did not answer; the text says why, in one line."""


@dataclass(frozen=True)
class LocalRun:
    pid: int  # the runner's
    bootstrap: str
    topics: list[str]
    group: str
    dead_letter_topic: str
    tls_files: dict[str, str] | None  # "ca", "cert", "key": PEM files for clients other than the kernel

    def kafka_config(self) -> dict:
        """kafka-python connection settings: through the TLS proxy with the client certificate, or PLAINTEXT."""
        if self.tls_files is None:
            return {"bootstrap_servers": self.bootstrap}
        return {"bootstrap_servers": self.bootstrap, "security_protocol": "SSL",
                "ssl_cafile": self.tls_files["ca"], "ssl_certfile": self.tls_files["cert"],
                "ssl_keyfile": self.tls_files["key"]}

    def write(self, project: Path) -> None:
        path = project / STATE_FILE_NAME
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        partial.replace(path)  # a reader never sees half a file

    def remove(self, project: Path) -> None:
        """Remove the state file, unless another runner has written its own over it since."""
        path = project / STATE_FILE_NAME
        try:
            if json.loads(path.read_text())["pid"] == self.pid:
                path.unlink()
        except (OSError, ValueError, KeyError):
            pass


def find_local_run(project: Path = PROJECT) -> LocalRun:
    path = project / STATE_FILE_NAME
    try:
        state = LocalRun(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise LocalRunError(f"no local run found ({path} does not exist): start `uv run devtools/run_local.py` "
                            "first") from None
    except (OSError, ValueError, TypeError) as error:
        raise LocalRunError(f"{path} cannot be read ({error}): restart `uv run devtools/run_local.py`") from None
    if not process_exists(state.pid):
        raise LocalRunError(f"the local run that wrote {path} (process {state.pid}) is no longer running: start "
                            "`uv run devtools/run_local.py` again")
    return state


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def existing_topics(config: dict) -> set[str]:
    consumer = KafkaConsumer(**config, allow_auto_create_topics=False)
    try:
        return consumer.topics()
    finally:
        consumer.close()


def produce(config: dict, topic: str, messages: list[Message], timeout_s: float = 30, create: bool = True) -> list[str]:
    """Send `messages` to `topic` with acks=all; "topic[partition]@offset" of each, in order. Without
    `create`, a topic the broker does not have is an error: a mistyped name must not become a topic."""
    try:
        producer = KafkaProducer(**config, acks="all", max_block_ms=int(timeout_s * 1000),
                                 allow_auto_create_topics=create)
    except KafkaError as error:
        raise LocalRunError(f"cannot reach the local broker at {config['bootstrap_servers']}: {error}") from None
    if not create and topic not in existing_topics(config):
        producer.close(timeout=5)
        raise LocalRunError(f"topic {topic} does not exist on the local broker: check --topic")
    try:
        futures = [producer.send(topic, key=m.key, value=m.value, headers=m.headers) for m in messages]
        placed = [future.get(timeout=timeout_s) for future in futures]
    except KafkaError as error:
        raise LocalRunError(f"the local broker at {config['bootstrap_servers']} did not take the messages for "
                            f"{topic}: {error}") from None
    finally:
        producer.close(timeout=5)
    return [f"{p.topic}[{p.partition}]@{p.offset}" for p in placed]
