"""Apache Kafka for tests and for people: a pinned broker from Maven Central, in KRaft combined mode.

The jars (`org.apache.kafka:kafka_2.13` and its runtime dependencies) are fetched once with Maven into
a cache outside the repository (~/.cache/clustera-kernel, or KERNEL_KAFKA_CACHE); Java 17 and Maven
must be installed. Each node listens on 127.0.0.1 with:

  PLAINTEXT  between the brokers, and for administration
  SSL        the broker itself requires a client certificate signed by the test CA (ssl.client.auth=required)
  SASL_SSL   PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, and OAUTHBEARER validated against a JWKS URL when one is given
  SASL_MTLS  the same SASL, over TLS that requires a client certificate as well (clusters that ask for both)

Topics are never created automatically (auto.create.topics.enable=false), as production clusters set it.

    uv run devtools/apache_kafka.py             # one node; prints the addresses, Ctrl-C stops it
    uv run devtools/apache_kafka.py --nodes 3   # three nodes, replication factor 3, min.insync.replicas=2
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `devtools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.broker import die_with_parent, free_port

KAFKA_VERSION = "4.4.0"
# The broker logs through SLF4J 1.7; this binding sends its lines to log4j 2 (see LOG4J_CONFIG).
LOG4J_VERSION = "2.25.5"
HEAP = "-Xmx384m"  # a test broker's whole heap; Kafka's own scripts default to 1 GB
POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local</groupId><artifactId>kafka-broker</artifactId><version>1</version><packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{LOG4J_VERSION}</version></dependency>
  </dependencies>
</project>
"""
LOG4J_CONFIG = """status = error
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.noisy.name = org.apache.kafka.common.config
logger.noisy.level = WARN
"""


class KafkaUnavailable(Exception):
    """Java or Maven is missing, or the jars could not be fetched: Apache Kafka cannot run here."""


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clustera-kernel"
    return Path(os.environ.get("KERNEL_KAFKA_CACHE") or default)


def kafka_libs() -> Path:
    """The folder of the pinned broker's jars, fetched with Maven the first time (a lock keeps two
    test workers from fetching at once)."""
    libs = cache_root() / f"kafka-{KAFKA_VERSION}" / "libs"
    if (libs / ".complete").exists():
        return libs
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            raise KafkaUnavailable(f"{tool} is not installed: Apache Kafka runs on Java 17 and is fetched with Maven")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / ".complete").exists():
            return libs
        with tempfile.TemporaryDirectory(dir=libs.parent) as work:
            (Path(work) / "pom.xml").write_text(POM)
            fetched = subprocess.run(
                ["mvn", "-q", "-B", "dependency:copy-dependencies", "-DincludeScope=runtime", "-DoutputDirectory=libs"],
                cwd=work, capture_output=True, text=True, timeout=600)
            if fetched.returncode != 0:
                raise KafkaUnavailable(f"Maven could not fetch org.apache.kafka:kafka_2.13:{KAFKA_VERSION}:\n"
                                       f"{fetched.stdout[-2000:]}{fetched.stderr[-2000:]}")
            shutil.rmtree(libs, ignore_errors=True)
            (Path(work) / "libs").rename(libs)
        (libs / ".complete").touch()
    return libs


@dataclass(frozen=True)
class TlsMaterial:
    """PEM files for the brokers' SSL and SASL_SSL listeners: their certificate chain and key (the
    key in PKCS#8, which Kafka's PEM key store requires), and the CA that signs client certificates."""

    keystore: Path  # the key and the certificate chain, one PEM file
    truststore: Path


@dataclass
class Users:
    """SASL accounts of the SASL_SSL listener: name -> password, for PLAIN and for SCRAM."""

    plain: dict[str, str] = field(default_factory=dict)
    scram: dict[str, str] = field(default_factory=dict)


@dataclass
class Node:
    node_id: int
    directory: Path
    plaintext_port: int = field(default_factory=free_port)
    ssl_port: int = field(default_factory=free_port)
    sasl_ssl_port: int = field(default_factory=free_port)
    sasl_mtls_port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class KafkaCluster:
    """One or three Apache Kafka nodes, each broker and controller at once, on 127.0.0.1."""

    def __init__(self, directory: Path, nodes: int = 1, tls: TlsMaterial | None = None, users: Users | None = None,
                 jwks_url: str | None = None, issuer: str | None = None, extra: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.nodes = [Node(i, self.directory / f"node-{i}") for i in range(1, nodes + 1)]
        self.tls = tls
        self.users = users or Users()
        self.jwks_url = jwks_url  # OAUTHBEARER tokens are checked against its keys, and their "iss" against issuer
        self.issuer = issuer
        self.extra = extra or {}
        self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")

    # Addresses, as clients give them in their bootstrap list

    def bootstrap_of(self, listener: str) -> str:
        port = {"PLAINTEXT": "plaintext_port", "SSL": "ssl_port", "SASL_SSL": "sasl_ssl_port",
                "SASL_MTLS": "sasl_mtls_port"}[listener]
        return ",".join(f"127.0.0.1:{getattr(node, port)}" for node in self.nodes)

    @property
    def plaintext_bootstrap(self) -> str:
        return self.bootstrap_of("PLAINTEXT")

    @property
    def bootstrap(self) -> str:
        """The mutual-TLS listener when there are certificates, else PLAINTEXT."""
        return self.bootstrap_of("SSL" if self.tls else "PLAINTEXT")

    @property
    def sasl_bootstrap(self) -> str:
        return self.bootstrap_of("SASL_SSL")

    # Configuration

    def properties(self, node: Node) -> dict[str, str]:
        replicas = str(min(3, len(self.nodes)))
        listeners = {"PLAINTEXT": node.plaintext_port, "CONTROLLER": node.controller_port}
        if self.tls:
            listeners.update(SSL=node.ssl_port, SASL_SSL=node.sasl_ssl_port, SASL_MTLS=node.sasl_mtls_port)
        config = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listeners": ",".join(f"{name}://127.0.0.1:{port}" for name, port in listeners.items()),
            "advertised.listeners": ",".join(f"{name}://127.0.0.1:{port}" for name, port in listeners.items()
                                             if name != "CONTROLLER"),
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,"
                                              "SASL_MTLS:SASL_SSL",
            "log.dirs": str(node.directory / "data"),
            "auto.create.topics.enable": "false",  # as production clusters set it
            "num.partitions": "1",
            "default.replication.factor": replicas,
            "min.insync.replicas": "2" if len(self.nodes) >= 3 else "1",
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "10",  # 50 by default: slower to create, no use here
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": "2" if len(self.nodes) >= 3 else "1",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": "2" if len(self.nodes) >= 3 else "1",
            "group.initial.rebalance.delay.ms": "0",  # 3 s in production: a first join need not wait in tests
            "log.flush.interval.messages": str(2**62),  # leave flushing to the OS, as production does
        }
        if self.tls:
            config.update(self.tls_properties())
        config.update(self.extra)
        return config

    def tls_properties(self) -> dict[str, str]:
        config = {
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.tls.keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.tls.truststore),
            "listener.name.ssl.ssl.client.auth": "required",
            "listener.name.sasl_ssl.ssl.client.auth": "none",
            "listener.name.sasl_mtls.ssl.client.auth": "required",
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512" + (",OAUTHBEARER" if self.jwks_url else ""),
        }
        plain = " ".join(f'user_{name}="{password}"' for name, password in self.users.plain.items())
        for listener in ("sasl_ssl", "sasl_mtls"):
            prefix = f"listener.name.{listener}."
            config[prefix + "plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain};")
            for mechanism in ("scram-sha-256", "scram-sha-512"):
                config[prefix + f"{mechanism}.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;")
            if self.jwks_url:
                config.update({
                    prefix + "oauthbearer.sasl.jaas.config":
                        "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;",
                    prefix + "oauthbearer.sasl.server.callback.handler.class":
                        "org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler",
                    prefix + "oauthbearer.sasl.oauthbearer.jwks.endpoint.url": self.jwks_url,
                    prefix + "oauthbearer.sasl.oauthbearer.expected.audience": "kafka",
                    prefix + "oauthbearer.sasl.oauthbearer.expected.issuer": self.issuer,
                })
        return config

    def java(self, main_class: str, *arguments: str) -> list[str]:
        libs = kafka_libs()
        options = [HEAP, "-XX:+UseG1GC", "-Djava.awt.headless=true",
                   f"-Dlog4j2.configurationFile={self.directory / 'log4j2.properties'}"]
        if self.jwks_url:  # Kafka 4 fetches only from URLs it is told it may (CVE-2025-27817)
            options.append(f"-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls={self.jwks_url}")
        return ["java", *options, "-cp", f"{libs}/*", main_class, *arguments]

    # Life cycle

    def start(self, timeout_s: float = 90) -> KafkaCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "log4j2.properties").write_text(LOG4J_CONFIG)
        formats = [self.format(node) for node in self.nodes]  # in parallel: each is a JVM start
        for node, process in zip(self.nodes, formats, strict=True):
            output, _ = process.communicate(timeout=120)
            if process.returncode != 0:
                raise RuntimeError(f"formatting node {node.node_id}'s storage failed:\n{output[-3000:]}")
        for node in self.nodes:
            self.start_node(node)
        self.wait_ready(timeout_s)
        return self

    def format(self, node: Node) -> subprocess.Popen:
        node.directory.mkdir(parents=True, exist_ok=True)
        properties = node.directory / "server.properties"
        properties.write_text("".join(f"{key}={value}\n" for key, value in self.properties(node).items()))
        scram = [argument for name, password in self.users.scram.items()
                 for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
                 for argument in ("--add-scram", f"{mechanism}=[name={name},password={password}]")]
        command = self.java("kafka.tools.StorageTool", "format", f"--cluster-id={self.cluster_id}",
                            f"--config={properties}")
        return subprocess.Popen(
            [*command, *scram],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)

    def start_node(self, node: Node) -> None:
        """Start (or restart) a node's JVM; its data stays on disk between starts."""
        log = open(node.log_path, "ab")
        node.process = subprocess.Popen(
            self.java("kafka.Kafka", str(node.directory / "server.properties")),
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for a kernel does not stop the broker
            preexec_fn=die_with_parent,
        )

    def wait_ready(self, timeout_s: float = 90) -> None:
        """Wait until every live node is registered and serves requests on its PLAINTEXT listener."""
        from kafka.admin import KafkaAdminClient

        live = [node for node in self.nodes if node.alive]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None and node in live:
                    raise RuntimeError(f"Kafka node {node.node_id} exited with code {node.process.returncode}; "
                                       f"its log:\n{node.log_path.read_text(errors='replace')[-3000:]}")
            if all(port_open(node.plaintext_port) for node in live):
                try:
                    admin = KafkaAdminClient(bootstrap_servers=self.plaintext_bootstrap, request_timeout_ms=5000,
                                             api_version_auto_timeout_ms=5000)
                    try:
                        if len(admin.describe_cluster()["brokers"]) >= len(live):
                            return
                    finally:
                        admin.close()
                except Exception:  # not ready yet: the metadata is still settling
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"Apache Kafka was not ready within {timeout_s} s; see {self.directory}/node-*/server.log")

    def stop_node(self, node: Node, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        if node.alive:
            node.process.send_signal(sig)
            try:
                node.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.process.terminate()
        for node in self.nodes:
            self.stop_node(node, signal.SIGKILL)

    # Administration

    def admin(self):
        from kafka.admin import KafkaAdminClient

        return KafkaAdminClient(bootstrap_servers=self.plaintext_bootstrap, request_timeout_ms=30_000)

    def create_topic(self, name: str, partitions: int, replication_factor: int | None = None,
                     config: dict[str, str] | None = None, leader: int | None = None) -> None:
        """Create a topic and wait until every partition has a leader: `leader` (a node id) for all of
        them when given, else as the brokers choose."""
        from kafka.admin import NewTopic

        replicas = replication_factor or min(3, len(self.nodes))
        if leader is None:
            topic = NewTopic(name, partitions, replicas, topic_configs=config or {})
        else:  # the first replica listed is the preferred leader
            others = [node.node_id for node in self.nodes if node.node_id != leader][:replicas - 1]
            topic = NewTopic(name, -1, -1, {p: [leader, *others] for p in range(partitions)}, config or {})
        admin = self.admin()
        try:
            admin.create_topics([topic])
            self.wait_for_replicas(admin, [name], lambda p: p["leader"] >= 0, "a leader")
        finally:
            admin.close()

    def wait_in_sync(self, topics: list[str], timeout_s: float = 60) -> None:
        """Wait until every replica of every partition of `topics` is in sync (after a node came back)."""
        admin = self.admin()
        try:
            self.wait_for_replicas(admin, topics, lambda p: len(p["isr"]) == len(p["replicas"]), "all replicas in sync",
                                   timeout_s)
        finally:
            admin.close()

    @staticmethod
    def wait_for_replicas(admin, topics: list[str], condition, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            described = admin.describe_topics(topics)
            if all(t["partitions"] and all(condition(p) for p in t["partitions"]) for t in described):
                return
            time.sleep(0.2)
        raise RuntimeError(f"topics {', '.join(topics)}: not {what} within {timeout_s} s")

    def leaders(self, topic: str) -> dict[int, int]:
        """partition -> node id of its leader."""
        admin = self.admin()
        try:
            return {p["partition"]: p["leader"] for p in admin.describe_topics([topic])[0]["partitions"]}
        finally:
            admin.close()

    def node(self, node_id: int) -> Node:
        return next(node for node in self.nodes if node.node_id == node_id)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, choices=(1, 3), default=1)
    parser.add_argument("--directory", help="where the nodes keep their data (default: a new temporary folder)")
    arguments = parser.parse_args()
    directory = Path(arguments.directory or tempfile.mkdtemp(prefix="apache-kafka-"))
    try:
        started = time.monotonic()
        with KafkaCluster(directory, arguments.nodes) as cluster:
            print(f"Apache Kafka {KAFKA_VERSION}: {arguments.nodes} node(s) ready in "
                  f"{time.monotonic() - started:.1f} s; data in {directory}\n"
                  f"  KAFKA_BOOTSTRAP_SERVERS={cluster.plaintext_bootstrap}\nCtrl-C stops it.", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    except KafkaUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if not arguments.directory:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
