"""A Clustera kernel: consume Kafka topics and do one job per message.

Yours to edit: the part from "Your kernel" to "End of your kernel" just below (KERNEL_NAME,
DEFAULT_TOPIC, process_message, and the imports and helpers they need). The rest is the template's
machinery, the same in every kernel: leave it as it is and take its updates with git (README.md,
"Taking template updates"). Settings come from environment variables or a .env file beside this
one; README.md lists them all.

What process_message(message) decides:
  return True             done; committed once the messages it send()s are confirmed.
  return False            retriable; tried again after a backoff, never skipped.
  raise RetryLater(s)     the same, after s seconds (an API's retry-after), at most KERNEL_RETRY_MAX_MS.
  raise DeadLetter(why)   it can never succeed: it goes to KERNEL_DEAD_LETTER_TOPIC.
  raise anything else     fatal: the kernel commits what finished before it and exits with code 1.
For bulk work (database writes), define process_batch(messages) instead (docs/reference.md, "Batches").
Your own settings: define read_settings() reading each with setting("NAME", default, parse); the
kernel calls it at start-up and in `python main.py check`, so a bad one stops it (exit 2) at once.

Words of the machinery, each defined once, here:
  lane            records processed strictly one after another: those of one key in a partition
                  (KERNEL_ORDERING=key, with KERNEL_CONCURRENCY above 1), else those of a whole partition
  task            records of one or more lanes of a partition, given to a worker thread together (LaneTask)
  hand out        make tasks of the lanes that are ready and give them to the workers
  in flight       a task handed out and not settled yet; a lane has at most one, which keeps its order
  settle          take a task's outcome when its worker hands it back: done, retried, dead-lettered or fatal
  take back       what settling starts with: the task's unfinished records go back to the head of their lanes
  pass first      a lane's first record is dealt with without finishing: it was dead-lettered
  finished prefix a partition's records before its first unfinished one: what may be committed

The life of a message, in the core:
  ConsumerLoop.run_once()       the loop, one turn at a time, on the main thread
  ConsumerLoop.poll()           consumer.poll() brings records; Ledger.add() sorts them into lanes
  ConsumerLoop.hand_out()       Ledger.start_tasks() makes tasks of the ready lanes that have places; WorkerPool.give()
  process_task()                on a worker thread: process_message(record) for each record of the task,
                                one after another; what it send()s is confirmed (confirm_sends) before the
                                record counts as finished, as is its dead letter when it raised DeadLetter
                                (DeadLetterSent); False or another exception ends the task (TaskFailure)
  WorkerPool.work()             hands the task's outcome back whole (TaskOutcome), through a queue that
                                the loop reads with WorkerPool.next_back()
  ConsumerLoop.settle()         Ledger.take_back(); a failure goes to FailurePolicy.apply(): a retry after a
                                backoff (Ledger.retry_later), or the dead-letter topic (Ledger.pass_first:
                                what the workers did not dead-letter themselves)
  ConsumerLoop.commit()         Ledger.commits_due(): each partition's finished prefix, committed
With process_batch, process_batch_task() takes the place of process_task(): one call per task.

The file, in reading order:
  Start-up                       python main.py: the .env read, this file imported as `main`, run_kernel()
  (your part)                    from "Your kernel" to "End of your kernel"
Then the machinery's core, which every kernel runs:
  What process_message can use   DeadLetter, RetryLater, send(), json_object(), message_id()...
  How the kernel stops           exit codes and the errors behind them
  Settings                       the environment, read and checked once; setting() for your own
  Logging                        plain or JSON lines; repeating warnings throttled
  Signals                        SIGTERM and SIGINT: finish, commit, leave
  TLS material                   base64 certificates to private files, and back
  Health                         what /healthz and /readyz answer, and refused credentials
  kafka-python patches           every use of the client's internals, each with why and its test
  Connecting                     the consumer's and the producer's configuration
  Producing                      the kernel's one producer: send() and the dead-letter topic
  Processing                     worker threads calling process_message, in order per lane
  Bookkeeping                    lanes, retries and the offset to commit, per partition
  The consumer loop              failures, the watchdog, and the loop: poll, hand out, settle, commit
  Entry point                    run_kernel(): what python main.py and the examples call
  The options                    what only some kernels use, each importing its dependencies when switched on:
  Metrics and the HTTP server    /healthz, /readyz, /metrics (the kernel's metrics and yours): KERNEL_HTTP_PORT
  Tracing                        OpenTelemetry spans: OTEL_TRACES_EXPORTER
  OAuth tokens                   tokens from an OAuth token endpoint: KAFKA_SASL_MECHANISM=OAUTHBEARER
  Checking a deployment          python main.py check
  Checking your part             at import: the names your part must define, and those it must not (a name of
                                 Python's own is refused earlier, before any of the machinery runs)
Each section begins with a banner of '#' lines: search for "# Settings #" to find one.
"""

from __future__ import annotations

###############################################################################
# Start-up ####################################################################
###############################################################################

if __name__ == "__main__":
    # `python main.py`: read the .env beside this file (or KERNEL_DOTENV's; `none`: none) before your part
    # reads the environment (the real environment wins over it), then run this file as the module `main`,
    # the one the examples, the tests and your own modules import; as __main__ it would be a second copy,
    # with a DeadLetter and a send() of its own.
    import logging
    import os
    import sys

    import dotenv

    logging.getLogger("dotenv.main").disabled = True  # run_kernel() names a line it cannot read, in one line
    if (chosen := os.environ.get("KERNEL_DOTENV", "").strip()) != "none":
        dotenv.load_dotenv(chosen or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env"), override=False)
    import main

    sys.exit(main.run_kernel(getattr(main, "process_message", None), process_batch=getattr(main, "process_batch", None),
                             read_settings=getattr(main, "read_settings", None),
                             name=main.KERNEL_NAME, default_topic=main.DEFAULT_TOPIC))

# isort: split
# Your kernel: edit from here to "End of your kernel". Your imports go just below.
import logging

KERNEL_NAME = "hello-world"
DEFAULT_TOPIC = "clustera-hello-world"

log = logging.getLogger(KERNEL_NAME)

# process_message can use DeadLetter, RetryLater, send(), json_object(), coordinates(), message_id(),
# batch_coordinates(), describe_bytes() and describe_timestamp(): the machinery defines them below
# ("What process_message can use").


def process_message(message) -> bool:
    """Handle one Kafka record; return True when done, False to have it retried.

    `message` is a kafka-python ConsumerRecord: .topic, .partition, .offset, .key and .value
    (bytes or None), .headers (list of (str, bytes)), .timestamp (ms since the epoch).
    Delivery is at-least-once: after a crash a message can arrive again, so make the work
    idempotent (an upsert keyed by message_id(message), or by an id inside the message).
    It runs on worker threads (KERNEL_CONCURRENCY of them): share a connection pool, not a
    connection, and guard shared state with a lock. To forward results, call send(); to give up on
    a message that can never succeed, raise DeadLetter("why"). tests/test_process_message.py shows
    how to test it without a broker.
    """
    log.info(
        "Received %s key=%s value=%s timestamp=%s",
        coordinates(message),
        describe_bytes(message.key),
        describe_bytes(message.value),
        describe_timestamp(message.timestamp),
    )
    return True


# End of your kernel. The template's machinery follows.

# What the part above defines, for the checks below (none when the module is reloaded).
names_of_your_part = None if "names_of_your_part" in globals() else {**globals()}

import base64
import binascii
import bisect
import builtins
import contextlib
import dataclasses
import datetime as dt
import enum
import errno
import functools
import gc
import hashlib
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import deque, namedtuple
from typing import TYPE_CHECKING

import dotenv
import dotenv.parser
import kafka.client_async
import kafka.conn
import kafka.errors
import kafka.future
import kafka.sasl.oauth
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CommitFailedError, CorruptRecordError, KafkaError, NoBrokersAvailable
from kafka.record.memory_records import MemoryRecords

if TYPE_CHECKING:  # names only annotations use, so that your part may bind them as it likes
    from collections.abc import Callable, Iterator, Mapping

    import prometheus_client.metrics_core
    from kafka.future import Future

# Your part must not bind a name of Python's own (`type = "order"`): the machinery would call yours. It is
# refused here, before any of the machinery runs, so that none of it ever meets one (and this check calls
# Python's own through `builtins.`). The other names your part must define, or must not, are checked at the
# end of the file (check_your_part), once the machinery's are all known.
if names_of_your_part and (shadowed := builtins.sorted(name for name in names_of_your_part
                                                       if name in builtins.__dict__ and not name.startswith("__"))):
    raise builtins.ImportError(f"main.py: {', '.join(shadowed)} defined in your part of main.py is also a name of "
                               "the template's machinery, or of Python, which would replace yours: rename yours")

###############################################################################
# What process_message can use ################################################
###############################################################################


class DeadLetter(Exception):
    """Raise it from process_message for a message that can never succeed (invalid input, a 4xx
    answer): the kernel publishes it to KERNEL_DEAD_LETTER_TOPIC with the reason in its headers and
    moves on. Without a dead-letter topic the kernel stops instead, leaving the message uncommitted.
    From process_batch, name the message: DeadLetter("why", message=messages[i]); the messages before
    it count as done, and those after it come again in the next batch."""

    def __init__(self, reason: str = "", message=None):
        super().__init__(reason)
        self.message = message


class RetryLater(Exception):
    """Raise it from process_message (or process_batch) to have the message (the batch) tried again
    after `seconds`, as an API's retry-after asks (429, 503): an attempt like a False, counted against
    KERNEL_MAX_ATTEMPTS, holding only its lane (its key, or at KERNEL_CONCURRENCY=1 its partition), and
    waiting at most KERNEL_RETRY_MAX_MS. Seconds that are not a number (None, say) mean the usual backoff."""

    def __init__(self, seconds: float | str | None, reason: str = ""):
        super().__init__(reason)
        try:
            seconds = float(seconds)
        except (TypeError, ValueError):
            seconds = None
        self.seconds: float | None = None if seconds != seconds else seconds  # NaN too: the backoff


current_call = threading.local()  # on a worker thread, during a call: .producer and .sends


BYTES_OR_NONE = (bytes, bytearray, type(None))  # what send() takes as a key or a value


def send(topic: str, value: bytes | None, key: bytes | None = None,
         headers: list[tuple[str, bytes]] | None = None) -> None:
    """Publish a message to `topic` from process_message (say, a result to an output topic).

    It uses the kernel's producer (the same connection settings and certificates, acks=all), created
    on first use. The message being processed is committed only after the broker has confirmed every
    message its process_message call sent; if one cannot be delivered within KAFKA_PRODUCE_TIMEOUT_MS,
    the message is processed again, as if it had returned False. So outputs are at-least-once too.
    Broker trouble shows that way, in the confirmation; what no broker could take (a topic name Kafka
    does not allow, a value that is not bytes) is a bug in the handler, the same at every retry:
    ValueError or TypeError here, at once, which stops the kernel (exit 1) before this message.
    """
    sends = getattr(current_call, "sends", None)
    if sends is None:
        raise RuntimeError("send() works inside process_message while the kernel runs; "
                           "in a unit test, call process_message through tests/kit.py")
    if not isinstance(topic, str) or not topic:
        raise TypeError(f"send() topic must be a topic name, got {topic!r}")
    if not is_topic_name(topic):
        raise ValueError(f"send() topic {topic!r:.80} is not a Kafka topic name (letters, digits, '.', '_' and '-', "
                         "up to 249)")
    if not (isinstance(value, BYTES_OR_NONE) and isinstance(key, BYTES_OR_NONE)):
        name, data = ("value", value) if not isinstance(value, BYTES_OR_NONE) else ("key", key)
        raise TypeError(f"send() {name} must be bytes or None, got {type(data).__name__}: encode it first")
    if key is None and value is None:  # legal in Kafka, refused by kafka-python's producer: sent empty
        value = b""
    sends.append(current_call.producer.send(topic, key, value, producible_headers(headers) if headers else []))


def json_object(message, max_bytes: int = 1_048_576, required: tuple[str, ...] = ()) -> dict:
    """The message's value as a JSON object whose `required` fields are non-empty strings;
    DeadLetter saying what is wrong when it is not one (no value, empty, over `max_bytes`, not
    UTF-8, not JSON, JSON but not an object, a required field missing or not a string)."""
    value = message.value
    if not value:
        raise DeadLetter("the value is empty" if value is not None else "the message has no value (a tombstone)")
    if len(value) > max_bytes:
        raise DeadLetter(f"the value is {len(value)} bytes, over the {max_bytes} this kernel accepts")
    try:
        data = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DeadLetter(f"the value is not UTF-8 text (byte {error.start}: {value[error.start]:#04x})") from None
    except json.JSONDecodeError as error:
        raise DeadLetter(f"the value is not JSON ({error})") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise DeadLetter(f"the value is JSON but not an object ({kind})")
    for name in required:
        if not isinstance(data.get(name), str) or not data[name]:
            raise DeadLetter(f'field "{name}" must be a non-empty string, got {data.get(name)!r:.80}')
    return data


def coordinates(record) -> str:
    """Where a message sits, as every log line writes it: topic[partition]@offset."""
    return f"{record.topic}[{record.partition}]@{record.offset}"


def message_id(record) -> str:
    """An id of the record for deduplication, 32 hex digits: the same at every delivery of it, and
    different for any other record, even one at the same topic, partition and offset once the topic
    was created again (or a local broker started over, its offsets at 0 again), unless that one has
    the same timestamp, key, value and headers too, and so is the same message. Key stored work by it
    (a primary key, an Idempotency-Key header), not by topic/partition/offset alone."""
    topic, key, value = record.topic.encode(), record.key, record.value
    parts = [b"%d/%d/%d/%d/%d/%d/" % (record.partition, record.offset, record.timestamp, len(topic),
                                       -1 if key is None else len(key), -1 if value is None else len(value)),
             topic, key or b"", value or b""]
    for name, data in record.headers or ():  # each with its lengths too, so that no two records read alike
        name = name.encode()
        parts += (b"/%d/%d/" % (len(name), -1 if data is None else len(data)), name, data or b"")
    return hashlib.blake2b(b"".join(parts), digest_size=16).hexdigest()


def batch_coordinates(records: list) -> str:
    """Where a run of one partition's messages sits: topic[partition]@first..last."""
    return coordinates(records[0]) + (f"..{records[-1].offset}" if len(records) > 1 else "")


def describe_bytes(data: bytes | None, limit: int = 200) -> str:
    """Text for a log line: UTF-8 shown (truncated to `limit` characters), binary as a size."""
    if data is None:
        return "None"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(data)} bytes>"
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} characters)"
    return repr(text)


def describe_timestamp(timestamp_ms: int | None) -> str:
    """A record's timestamp (ms since the epoch) for a log line, in ISO 8601 UTC; "none" when it has none."""
    if timestamp_ms is None or timestamp_ms < 0:
        return "none"
    return dt.datetime.fromtimestamp(timestamp_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


###############################################################################
# How the kernel stops ########################################################
###############################################################################

EXIT_OK = 0
EXIT_FATAL = 1  # process_message raised, or returned something other than True or False
EXIT_CONFIG = 2  # a setting is missing or invalid
EXIT_BROKER = 3  # the broker was unreachable at start-up, or gave an unrecoverable error
EXIT_NO_DEAD_LETTER_TOPIC = 4  # a message was to be dead-lettered but KERNEL_DEAD_LETTER_TOPIC is not set
EXIT_REFUSED = 5  # the broker (or the OAuth token endpoint) refused the credentials, or denied access
EXIT_FORCED = 128  # + signal number: a second SIGTERM/SIGINT during shutdown
EXIT_CHECK_FAILED = 1  # `python main.py check` found something wrong


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable, never a secret value."""


class MessageFailed(Exception):
    """process_message (or process_batch) raised, or returned something other than True or False."""

    def __init__(self, handler_name: str, records: list):
        super().__init__(f"{handler_name} failed on {batch_coordinates(records)}")


class NoDeadLetterTopic(Exception):
    """A message is to be dead-lettered (KERNEL_MAX_ATTEMPTS reached, or DeadLetter raised) and
    KERNEL_DEAD_LETTER_TOPIC is not set."""

    def __init__(self, record, reason: str, way_on: str = ""):
        super().__init__(f"{coordinates(record)}: {reason}")
        self.way_on = way_on  # how to go on without it, when no restart mends it


class BrokerUnavailable(Exception):
    """The bootstrap servers could not be reached within KAFKA_BOOTSTRAP_TIMEOUT_MS (kind "network"),
    TLS with them failed (kind "TLS"), or the OAuth token endpoint gave no token in that time ("OAuth")."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class AccessRefused(BrokerUnavailable):
    """The broker refused the kernel's credentials (kind "authentication") or denied it access to its
    topics or group ("authorization"), or the OAuth token endpoint refused the client: a person must
    fix the settings or the ACLs."""


###############################################################################
# Settings ####################################################################
###############################################################################

CERT_VARIABLES = ("KAFKA_CA_CERT", "KAFKA_CLIENT_CERT", "KAFKA_CLIENT_KEY")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
OAUTH_VARIABLES = ("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
                   "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET")  # required with OAUTHBEARER; then two optional ones
OAUTH_OPTIONAL_VARIABLES = ("KAFKA_SASL_OAUTHBEARER_SCOPE", "KAFKA_SASL_OAUTHBEARER_EXTENSIONS")


def retry_delay_ms(attempts: int, initial_ms: int, maximum_ms: int) -> int:
    """Exponential backoff with up to 10% jitter, so replicas retrying together spread out."""
    delay = min(initial_ms * 2 ** min(attempts - 1, 32), maximum_ms)
    return int(delay * random.uniform(0.9, 1.0))


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """What happens after process_message returns False: KERNEL_RETRY_INITIAL_MS, KERNEL_RETRY_MAX_MS
    and KERNEL_MAX_ATTEMPTS."""

    initial_ms: int
    max_ms: int
    max_attempts: int  # 0: unlimited

    def __post_init__(self):
        if self.initial_ms > self.max_ms:
            raise ConfigError(f"KERNEL_RETRY_INITIAL_MS ({self.initial_ms}) must not exceed "
                              f"KERNEL_RETRY_MAX_MS ({self.max_ms})")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RetryPolicy:
        return cls(parse_int(env, "KERNEL_RETRY_INITIAL_MS", 500, minimum=1),
                   parse_int(env, "KERNEL_RETRY_MAX_MS", 30_000, minimum=1),
                   parse_int(env, "KERNEL_MAX_ATTEMPTS", 0, minimum=0))

    def exhausted(self, attempts: int) -> bool:
        return 0 < self.max_attempts <= attempts

    def delay_s(self, attempts: int, asked_s: float | None = None) -> float:
        """The backoff before the next attempt; or the wait RetryLater asked for, at most KERNEL_RETRY_MAX_MS."""
        if asked_s is None:
            return retry_delay_ms(attempts, self.initial_ms, self.max_ms) / 1000
        return min(max(asked_s, 0.0), self.max_ms / 1000)


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """How process_batch gets its messages: KERNEL_BATCH_MAX_MESSAGES and KERNEL_BATCH_MAX_WAIT_MS."""

    max_messages: int
    max_wait_s: float  # how long the first message of a batch that is not full waits for more

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BatchPolicy:
        return cls(parse_int(env, "KERNEL_BATCH_MAX_MESSAGES", 1_000, minimum=1),
                   parse_int(env, "KERNEL_BATCH_MAX_WAIT_MS", 100, minimum=0) / 1000)


@dataclasses.dataclass(frozen=True)
class OAuthClient:
    """OAUTHBEARER's client credentials (OAuth 2, RFC 6749 section 4.4): KAFKA_SASL_OAUTHBEARER_*."""

    token_endpoint_url: str
    client_id: str
    client_secret: str = dataclasses.field(repr=False)
    scope: str | None = None
    extensions: tuple[tuple[str, str], ...] = ()  # SASL extensions (Confluent Cloud: logicalCluster, identityPoolId)


@dataclasses.dataclass(frozen=True)
class SaslSettings:
    """KAFKA_SASL_MECHANISM and its credentials: a user and password, or an OAuth client."""

    mechanism: str
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    oauth: OAuthClient | None = None


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """Everything the kernel reads from the environment; load_settings holds the defaults."""

    kernel_name: str
    bootstrap_servers: list[str]
    topics: list[str]
    group_id: str
    client_id: str
    security_protocol: str  # one of SECURITY_PROTOCOLS
    sasl: SaslSettings | None  # with SASL_PLAINTEXT and SASL_SSL
    ca_cert: str | None  # base64 (or PEM) text as given; decoded by write_tls_material
    client_cert: str | None = dataclasses.field(repr=False)
    client_key: str | None = dataclasses.field(repr=False)
    ssl_check_hostname: bool
    group_instance_id: str | None
    auto_offset_reset: str
    max_poll_records: int
    buffer_max_bytes: int
    fetch_max_bytes: int
    max_partition_fetch_bytes: int
    check_crcs: bool
    session_timeout_ms: int
    heartbeat_interval_ms: int
    max_poll_interval_ms: int
    bootstrap_timeout_ms: int
    commit_timeout_ms: int
    produce_timeout_ms: int
    producer: str  # KERNEL_PRODUCER: "confluent-kafka" (librdkafka's) or "kafka-python"
    retry: RetryPolicy
    batch_policy: BatchPolicy  # used with process_batch
    dead_letter_topic: str | None
    concurrency: int
    ordering: str  # "key" or "partition"
    shutdown_timeout_ms: int
    http_port: int | None
    http_host: str | None  # None: every address, IPv4 and IPv6
    log_level: str
    log_format: str  # "plain" or "json"
    traces_exporters: tuple[str, ...] = ()  # OTEL_TRACES_EXPORTER, as the exporters' packages name them; (): no tracing

    def __post_init__(self):
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ConfigError(
                f"KAFKA_HEARTBEAT_INTERVAL_MS ({self.heartbeat_interval_ms}) must be lower than "
                f"KAFKA_SESSION_TIMEOUT_MS ({self.session_timeout_ms})"
            )
        if self.dead_letter_topic in self.topics:
            raise ConfigError(f"KERNEL_DEAD_LETTER_TOPIC ({self.dead_letter_topic}) must not be a consumed topic")
        if self.http_port is not None and self.http_port > 65535:
            raise ConfigError(f"KERNEL_HTTP_PORT (or PORT) must be a TCP port up to 65535, got {self.http_port}")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def security(self) -> str:
        """The protocol as log lines and `check` name it: SSL, or SASL_SSL/SCRAM-SHA-512, say."""
        return self.security_protocol + (f"/{self.sasl.mechanism}" if self.sasl else "")

    def check_batch_limit(self) -> None:
        """With process_batch: a batch larger than a partition ever buffers would never be full."""
        if self.batch_policy.max_messages > 2 * self.max_poll_records:
            raise ConfigError(f"KERNEL_BATCH_MAX_MESSAGES ({self.batch_policy.max_messages}) must not exceed twice "
                              f"KAFKA_MAX_POLL_RECORDS ({self.max_poll_records}): a partition stops fetching there, "
                              "so a batch would never be full")


def certificate_values(env: Mapping[str, str]) -> dict[str, str | None]:
    """The three certificate variables. The CA alone is TLS that checks the broker; a client
    certificate needs its key and the key its certificate (mutual TLS)."""
    certs = {name: env.get(name, "").strip() or None for name in CERT_VARIABLES}
    cert, key = certs["KAFKA_CLIENT_CERT"], certs["KAFKA_CLIENT_KEY"]
    if (cert is None) != (key is None):
        present, missing = ("KAFKA_CLIENT_CERT", "KAFKA_CLIENT_KEY") if key is None else ("KAFKA_CLIENT_KEY",
                                                                                           "KAFKA_CLIENT_CERT")
        raise ConfigError(f"{missing} not set: a client certificate for mutual TLS needs both KAFKA_CLIENT_CERT and "
                          f"KAFKA_CLIENT_KEY ({present} is set)")
    return certs


def loopback(host: str) -> bool:
    """Whether `host` is this machine: localhost, 127.0.0.0/8 or ::1."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def oauth_client(env: Mapping[str, str]) -> OAuthClient:
    """KAFKA_SASL_OAUTHBEARER_*: the token endpoint and the client's id and secret are required."""
    values = {name: env.get(name, "").strip() for name in OAUTH_VARIABLES}
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set: KAFKA_SASL_MECHANISM=OAUTHBEARER gets its tokens from "
                          "an OAuth token endpoint with a client id and secret")
    url = values["KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"]
    if "@" in urllib.parse.urlsplit(url).netloc:  # said without the URL: it would print the secret
        raise ConfigError("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL holds credentials (user:secret@host): remove "
                          "them; the client's id and secret go in KAFKA_SASL_OAUTHBEARER_CLIENT_ID and _CLIENT_SECRET")
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise ConfigError(f"KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL must be an https:// URL, got {url!r:.80}")
    if url.startswith("http://") and not loopback(urllib.parse.urlsplit(url).hostname or ""):
        raise ConfigError(f"KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL must be an https:// URL, got {url!r:.80}: "
                          "over http:// the client secret would cross the network in clear (allowed on a loopback "
                          "address only)")
    extensions = []
    for item in env.get("KAFKA_SASL_OAUTHBEARER_EXTENSIONS", "").split(","):
        if item.strip():
            name, equals, value = item.strip().partition("=")
            if not equals or not re.fullmatch(r"[A-Za-z]+", name.strip()) or name.strip() == "auth":
                raise ConfigError(f"KAFKA_SASL_OAUTHBEARER_EXTENSIONS must be name=value pairs separated by commas "
                                  f"(names of letters only, not auth), got {item.strip()!r:.80}")
            extensions.append((name.strip(), value.strip()))
    return OAuthClient(url, values["KAFKA_SASL_OAUTHBEARER_CLIENT_ID"], values["KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"],
                       env.get("KAFKA_SASL_OAUTHBEARER_SCOPE", "").strip() or None, tuple(extensions))


def sasl_settings(env: Mapping[str, str]) -> SaslSettings | None:
    """KAFKA_SASL_MECHANISM with its credentials; None without it. A credential of another mechanism,
    or one without the mechanism, is an error: it would be silently ignored."""
    mechanism = env.get("KAFKA_SASL_MECHANISM", "").strip().upper()
    user_variables = [name for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD") if env.get(name, "").strip()]
    oauth_variables = [name for name in OAUTH_VARIABLES + OAUTH_OPTIONAL_VARIABLES if env.get(name, "").strip()]
    if not mechanism:
        if user_variables or oauth_variables:
            raise ConfigError(f"{(user_variables + oauth_variables)[0]} is set but KAFKA_SASL_MECHANISM is not: "
                              f"set it to one of {', '.join(SASL_MECHANISMS)}")
        return None
    if mechanism not in SASL_MECHANISMS:
        raise ConfigError(f"KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, got "
                          f"{env['KAFKA_SASL_MECHANISM'].strip()!r}")
    if mechanism == "OAUTHBEARER":
        if user_variables:
            raise ConfigError(f"{user_variables[0]} is not used with KAFKA_SASL_MECHANISM=OAUTHBEARER: its credentials "
                              "are KAFKA_SASL_OAUTHBEARER_CLIENT_ID and KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET")
        return SaslSettings(mechanism, oauth=oauth_client(env))
    if oauth_variables:
        raise ConfigError(f"{oauth_variables[0]} is only used with KAFKA_SASL_MECHANISM=OAUTHBEARER, not {mechanism}")
    username, password = env.get("KAFKA_SASL_USERNAME", "").strip(), env.get("KAFKA_SASL_PASSWORD", "")
    missing = [name for name, value in (("KAFKA_SASL_USERNAME", username), ("KAFKA_SASL_PASSWORD", password.strip()))
               if not value]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} not set: KAFKA_SASL_MECHANISM={mechanism} needs a user name and "
                          "a password (an API key and secret on Confluent Cloud)")
    return SaslSettings(mechanism, username, password)


def security_protocol(env: Mapping[str, str], certs: dict[str, str | None], sasl: SaslSettings | None) -> str:
    """KAFKA_SECURITY_PROTOCOL, or when unset: SASL_SSL with a SASL mechanism, SSL with certificates,
    else PLAINTEXT. One that leaves a setting unused is an error."""
    given = env.get("KAFKA_SECURITY_PROTOCOL", "").strip()
    protocol = parse_choice(env, "KAFKA_SECURITY_PROTOCOL", "SASL_SSL" if sasl else "SSL" if any(certs.values())
                            else "PLAINTEXT", SECURITY_PROTOCOLS)
    certificates = [name for name, value in certs.items() if value]
    if protocol.startswith("SASL_") and sasl is None:
        raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_MECHANISM "
                          f"({', '.join(SASL_MECHANISMS)}) and its credentials")
    if sasl is not None and not protocol.startswith("SASL_"):
        raise ConfigError(f"KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL={given} does not use SASL: "
                          "set it to SASL_SSL (or SASL_PLAINTEXT)")
    if certificates and protocol not in ("SSL", "SASL_SSL"):
        raise ConfigError(f"{', '.join(certificates)} set but KAFKA_SECURITY_PROTOCOL={given} does not use TLS: "
                          "set it to SSL or SASL_SSL, or unset the certificates")
    return protocol


def parse_list(env: Mapping[str, str], name: str, default: str | None) -> list[str]:
    items = [item.strip() for item in (env.get(name) or default or "").split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{name} is required: a comma-separated list")
    return items


@functools.lru_cache(maxsize=1024)  # send() asks for each message: the regular expression cost a microsecond
def is_topic_name(topic: str) -> bool:
    """Whether Kafka allows it: up to 249 of a-z, A-Z, 0-9, '.', '_' and '-' (not '.' or '..')."""
    return re.fullmatch(r"[A-Za-z0-9._-]{1,249}", topic) is not None and topic not in (".", "..")


def topic_name(name: str, topic: str) -> str:
    """A topic name as Kafka allows it: up to 249 of a-z, A-Z, 0-9, '.', '_' and '-' (not '.' or '..')."""
    if not is_topic_name(topic):
        raise ConfigError(f"{name} holds {topic!r:.80}, which is not a Kafka topic name (letters, digits, '.', "
                          "'_' and '-', up to 249; no patterns)")
    return topic


def parse_topics(env: Mapping[str, str], name: str, default: str) -> list[str]:
    return [topic_name(name, topic) for topic in parse_list(env, name, default)]


def parse_topic(env: Mapping[str, str], name: str) -> str | None:
    """One topic name, or None when the variable is unset."""
    return topic_name(name, topic) if (topic := env.get(name, "").strip()) else None


def parse_bootstrap_servers(env: Mapping[str, str]) -> list[str]:
    """KAFKA_BOOTSTRAP_SERVERS: host:port entries ([IPv6]:port too), each port a number up to 65535."""
    servers = parse_list(env, "KAFKA_BOOTSTRAP_SERVERS", default=None)
    for server in servers:
        found = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})", server)
        if not found or not 0 < int(found.group(2)) <= 65535:
            raise ConfigError(f"KAFKA_BOOTSTRAP_SERVERS must be host:port entries separated by commas, "
                              f"got {server!r:.80}")
    return servers


INT32_MAX = 2**31 - 1  # what the protocol carries of a size or a timeout, and the most any setting here takes
MAX_CONCURRENCY = 1_000  # worker threads: more would not start under a container's memory limit


def parse_int(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int = INT32_MAX) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {text!r}")


def parse_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    text = env.get(name, "").strip() or default
    value = text.upper() if choices[0].isupper() else text.lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return value


def http_port(env: Mapping[str, str]) -> int | None:
    """KERNEL_HTTP_PORT, or else the platform's PORT (Railway, Heroku, Cloud Run), so that its health
    check finds the kernel; None for no HTTP server."""
    return parse_int(env, "KERNEL_HTTP_PORT", 0, minimum=0) or parse_int(env, "PORT", 0, minimum=0) or None


def traces_exporters(env: Mapping[str, str]) -> tuple[str, ...]:
    """OTEL_TRACES_EXPORTER, a comma-separated list: otlp (OTLP over HTTP, or over gRPC with
    OTEL_EXPORTER_OTLP_PROTOCOL=grpc and its package installed), console, or another exporter an installed
    package registers. Unset, none, or OTEL_SDK_DISABLED=true: no tracing."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "").strip()
    otlp = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    names = (name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(","))
    return tuple(otlp if name == "otlp" else name for name in names if name and name != "none")


DOTENV_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env")  # never one found further up


def dotenv_file(env: Mapping[str, str]) -> str | None:
    """The .env file to read: KERNEL_DOTENV's, none for `none` (the tests' kernels, whatever .env holds for a
    cluster), else the one beside this file."""
    chosen = env.get("KERNEL_DOTENV", "").strip()
    return None if chosen == "none" else chosen or DOTENV_PATH


def read_dotenv(path: str | None) -> None:
    """Put the settings of the .env file at `path`, if there is one, under those of the real environment.
    A line python-dotenv cannot read (an unclosed quote) is an error naming it, not a warning and a
    setting silently left at its default. (`python main.py` has read the file already, for your part.)"""
    if path is None or path == DOTENV_PATH and not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise ConfigError(f"KERNEL_DOTENV names no file: {path!r} (a .env file's path, or none to read none)")
    with open(path, encoding="utf-8") as file:
        for binding in dotenv.parser.parse_stream(file):
            if binding.error:
                name = re.match(r"\s*(?:export\s+)?([A-Za-z_][\w.]*)\s*=", binding.original.string)
                raise ConfigError(f".env line {binding.original.line}{f' ({name.group(1)})' if name else ''} cannot "
                                  "be read: check its quotes (a value with spaces or # needs them at both ends)")
    dotenv.load_dotenv(path, override=False)


def check_metrics_folder(env: Mapping[str, str]) -> None:
    """PROMETHEUS_MULTIPROC_DIR, when set, names a folder: prometheus_client would fail writing there."""
    if (metrics_folder := env.get("PROMETHEUS_MULTIPROC_DIR")) and not os.path.isdir(metrics_folder):
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR names {metrics_folder!r:.80}, which is not a folder: the metrics "
                          "library would fail writing there; unset it (a kernel is one process) or create it")


def load_settings(env: Mapping[str, str], kernel_name: str, default_topic: str) -> KernelSettings:
    """Build the settings from environment variables; raise ConfigError naming the bad one."""
    certs, sasl = certificate_values(env), sasl_settings(env)
    check_metrics_folder(env)
    session_timeout_ms = parse_int(env, "KAFKA_SESSION_TIMEOUT_MS", 45_000, minimum=1_000)
    return KernelSettings(
        kernel_name=kernel_name,
        bootstrap_servers=parse_bootstrap_servers(env),
        topics=parse_topics(env, "KAFKA_TOPIC", default_topic),
        group_id=env.get("KAFKA_CONSUMER_GROUP") or f"{kernel_name}-group",
        client_id=env.get("KAFKA_CLIENT_ID") or f"{kernel_name}-{socket.gethostname()}-{os.getpid()}",
        security_protocol=security_protocol(env, certs, sasl),
        sasl=sasl,
        ca_cert=certs["KAFKA_CA_CERT"],
        client_cert=certs["KAFKA_CLIENT_CERT"],
        client_key=certs["KAFKA_CLIENT_KEY"],
        ssl_check_hostname=parse_bool(env, "KAFKA_SSL_CHECK_HOSTNAME", True),
        group_instance_id=env.get("KAFKA_GROUP_INSTANCE_ID", "").strip() or None,
        auto_offset_reset=parse_choice(env, "KAFKA_AUTO_OFFSET_RESET", "earliest", ("earliest", "latest")),
        max_poll_records=parse_int(env, "KAFKA_MAX_POLL_RECORDS", 2_000, minimum=1),
        buffer_max_bytes=parse_int(env, "KERNEL_BUFFER_MAX_BYTES", 67_108_864, minimum=1024),
        fetch_max_bytes=parse_int(env, "KAFKA_FETCH_MAX_BYTES", 16_777_216, minimum=1024),
        max_partition_fetch_bytes=parse_int(env, "KAFKA_MAX_PARTITION_FETCH_BYTES", 1_048_576, minimum=1024),
        check_crcs=parse_bool(env, "KAFKA_CHECK_CRCS", True),
        session_timeout_ms=session_timeout_ms,
        # The client warns above a third of the session timeout; more often than 3 s is not needed.
        heartbeat_interval_ms=parse_int(env, "KAFKA_HEARTBEAT_INTERVAL_MS", min(3_000, session_timeout_ms // 3),
                                        minimum=100),
        max_poll_interval_ms=parse_int(env, "KAFKA_MAX_POLL_INTERVAL_MS", 300_000, minimum=1_000),
        bootstrap_timeout_ms=parse_int(env, "KAFKA_BOOTSTRAP_TIMEOUT_MS", 30_000, minimum=1_000),
        commit_timeout_ms=parse_int(env, "KAFKA_COMMIT_TIMEOUT_MS", 10_000, minimum=100),
        produce_timeout_ms=parse_int(env, "KAFKA_PRODUCE_TIMEOUT_MS", 10_000, minimum=100),
        producer=parse_choice(env, "KERNEL_PRODUCER", "confluent-kafka", ("confluent-kafka", "kafka-python")),
        retry=RetryPolicy.from_env(env),
        batch_policy=BatchPolicy.from_env(env),
        dead_letter_topic=parse_topic(env, "KERNEL_DEAD_LETTER_TOPIC"),
        concurrency=parse_int(env, "KERNEL_CONCURRENCY", 1, minimum=1, maximum=MAX_CONCURRENCY),
        ordering=parse_choice(env, "KERNEL_ORDERING", "key", ("key", "partition")),
        shutdown_timeout_ms=parse_int(env, "KERNEL_SHUTDOWN_TIMEOUT_MS", 30_000, minimum=0),
        http_port=http_port(env),
        http_host=env.get("KERNEL_HTTP_HOST", "").strip() or None,
        log_level=parse_choice(env, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=parse_choice(env, "LOG_FORMAT", "plain", ("plain", "json")),
        traces_exporters=traces_exporters(env),
    )


def setting(name: str, default=None, parse: Callable[[str], object] | None = None, secret: bool = False):
    """Your kernel's own environment variable `name`: its text, or what `parse(text)` makes of it;
    `default` when it is unset or blank (None: it is required). A missing one, or one `parse` refuses
    with ValueError("what is expected"), raises ConfigError naming it, never with its value (with
    `secret`, the value is cut out of the reason too). Call it in read_settings() of your part: the
    kernel calls that at start-up and in `python main.py check`, before the first message (exit 2)."""
    text = os.environ.get(name, "").strip()
    if not text:
        if default is None:
            raise ConfigError(f"{name} is not set: this kernel needs it")
        return default
    if parse is None:
        return text
    try:
        return parse(text)
    except ValueError as error:
        reason = str(error).replace(text, "...") if secret else str(error)
        raise ConfigError(f"{name}: {reason or 'not valid'}") from None


###############################################################################
# Logging #####################################################################
###############################################################################

kernel_log = logging.getLogger("kernel")  # the machinery's own; yours is named after the kernel
REPEATED_WARNING_INTERVAL_S = 30.0  # a warning that repeats is logged at most this often
REPEATING = {"repeating": True}  # extra= for such a warning (see RepeatFilter)
# Input reaches log lines (a header a library warns about, a key, an error body) and may be megabytes:
# each text argument of a line is cut at the first, the whole message at the second (in characters).
LOGGED_ARGUMENT_MAX_CHARS = 300
LOGGED_MESSAGE_MAX_CHARS = 2_000


def cut_for_log(text, limit: int):
    """`text` (str or bytes) cut at `limit` characters, saying how long it was; anything else as it is."""
    if isinstance(text, str | bytes | bytearray) and len(text) > limit:
        return f"{text[:limit]!s}... ({len(text):,} {'characters' if isinstance(text, str) else 'bytes'})"
    return text


def bounded_log_line(record: logging.LogRecord) -> bool:
    """A log filter: no line carries more than LOGGED_ARGUMENT_MAX_CHARS of any one argument, nor more
    than LOGGED_MESSAGE_MAX_CHARS in all (a message some library formatted itself)."""
    if isinstance(record.args, tuple):
        record.args = tuple(cut_for_log(argument, LOGGED_ARGUMENT_MAX_CHARS) for argument in record.args)
    elif isinstance(record.args, dict):
        record.args = {key: cut_for_log(argument, LOGGED_ARGUMENT_MAX_CHARS) for key, argument in record.args.items()}
    message = record.getMessage()
    if len(message) > LOGGED_MESSAGE_MAX_CHARS:
        record.msg, record.args = cut_for_log(message, LOGGED_MESSAGE_MAX_CHARS), ()
    return True


def log_fields(record) -> dict:
    """extra= for a log line about one message: JSON logs carry its coordinates as fields."""
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


class RepeatFilter(logging.Filter):
    """Lets a repeating warning through at most once per REPEATED_WARNING_INTERVAL_S, saying how
    many were left out: the Kafka client's own, OpenTelemetry's, and ours logged with extra=REPEATING.
    During a broker (or trace collector) outage they would otherwise repeat on every reconnect or poll."""

    def __init__(self):
        super().__init__()
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, template): (last, left out)

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name.split(".", 1)[0] in ("kafka", "opentelemetry") or getattr(record, "repeating", False)):
            return True
        key, now = (record.name, str(record.msg)), time.monotonic()
        last_s, left_out = self.seen.get(key, (-REPEATED_WARNING_INTERVAL_S, 0))
        if now - last_s < REPEATED_WARNING_INTERVAL_S:
            self.seen[key] = (last_s, left_out + 1)
            return False
        self.seen[key] = (now, 0)
        if left_out:
            record.msg = f"{record.msg} [{left_out} more like this in the last {now - last_s:.0f} s]"
        return True


class PlainFormatter(logging.Formatter):
    """LOG_FORMAT=plain: time, level, the kernel's name in brackets, the message. The logger's name
    is added only for other loggers (the Kafka client's, a library's), not the kernel's own."""

    def __init__(self, kernel_name: str):
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self.kernel_name = kernel_name

    def formatMessage(self, record: logging.LogRecord) -> str:
        origin = "" if record.name in (kernel_log.name, self.kernel_name) else f"{record.name}: "
        return f"{record.asctime} {record.levelname} [{self.kernel_name}] {origin}{record.message}"

    def format(self, record: logging.LogRecord) -> str:
        """A traceback is for a failure of the kernel or of your code. Another logger's (the Kafka client
        logs a dropped connection with one) is cut to its exception, on the line of its message."""
        if record.exc_info and record.name not in (kernel_log.name, self.kernel_name):
            error = record.exc_info[1]
            record = logging.makeLogRecord(vars(record) | {"exc_info": None, "exc_text": None})
            record.msg, record.args = (f"{record.getMessage()} ({type(error).__name__}: "
                                       f"{cut_for_log(str(error), LOGGED_ARGUMENT_MAX_CHARS)})"), ()
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line, for log pipelines that parse fields. With tracing on, a
    line logged during a call of the handler carries the trace_id and span_id of its span."""

    def __init__(self, kernel_name: str):
        super().__init__()
        self.kernel_name = kernel_name

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "kernel": self.kernel_name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: getattr(record, key) for key in ("topic", "partition", "offset", "trace_id", "span_id")
                      if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


QUIET_LIBRARIES = ("kafka", "librdkafka", "httpx", "httpcore", "anthropic", "psycopg", "urllib3", "opentelemetry")


def configure_logging(kernel_name: str) -> None:
    """Plain lines at INFO to stderr, until the settings say otherwise (apply_log_settings)."""
    stream = logging.StreamHandler()
    stream.setFormatter(PlainFormatter(kernel_name))
    stream.addFilter(bounded_log_line)
    stream.addFilter(RepeatFilter())
    logging.getLogger().addHandler(stream)
    logging.getLogger().setLevel(logging.INFO)


def apply_log_settings(settings: KernelSettings) -> None:
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    formatter = (JsonFormatter if settings.log_format == "json" else PlainFormatter)(settings.kernel_name)
    for log_handler in root.handlers:
        log_handler.setFormatter(formatter)
    # The Kafka client logs every connection step at INFO, and the libraries of the extras each request
    # (httpx a line per call): their warnings and errors still show, the rest with LOG_LEVEL=DEBUG.
    level = logging.getLevelName(settings.log_level)
    for library in QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(level if level == logging.DEBUG else max(logging.WARNING, level))


###############################################################################
# Signals #####################################################################
###############################################################################


class StopSignal:
    """SIGTERM/SIGINT handling: the first signal asks the loop to stop, a second one exits at once."""

    def __init__(self):
        self.requested = False
        self.cleanups: list[Callable[[], None]] = []  # what a second signal still does before exiting

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame) -> None:
        """Meant to be a signal handler: it only sets a flag, unless the stop was already asked."""
        if self.requested:
            for cleanup in self.cleanups:
                cleanup()
            os._exit(EXIT_FORCED + signum)
        self.requested = True
        kernel_log.info("Received %s: stopping after the message in hand", signal.Signals(signum).name)


###############################################################################
# TLS material ################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The decoded certificates: the CA (None: the system's trust store) and the client certificate
    and key (None: no client certificate)."""

    directory: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


def decode_pem(name: str, value: str, block: str) -> bytes:
    """The PEM blocks of a certificate variable, as people paste them: base64 (with line breaks or
    without padding) or PEM text, with literal \\n for line breaks (a platform's variable editor, a
    single-quoted .env value) or text before the first block (openssl pkcs12's "Bag Attributes")."""
    text = value.strip().replace("\\r\\n", "\n").replace("\\n", "\n")
    if "-----BEGIN" in text:
        pem = text.encode()
    else:
        compact = "".join(text.split())
        try:
            pem = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{name} is not valid base64 (nor PEM text)") from None
    found = list(PEM_BLOCK.finditer(pem))
    blocks = [match.group(0) for match in found if match.group(1).endswith(block.encode())]
    if not blocks:
        other = "CERTIFICATE" if block == "PRIVATE KEY" else "PRIVATE KEY"
        if any(match.group(1).endswith(other.encode()) for match in found):
            swapped = " (KAFKA_CLIENT_CERT and KAFKA_CLIENT_KEY swapped?)" if name != "KAFKA_CA_CERT" else ""
            raise ConfigError(f"{name} holds a {other.lower()}, not a {block.lower()}{swapped}")
        raise ConfigError(f"{name} does not decode to a PEM {block.lower()} ('-----BEGIN {block}...')")
    return b"\n".join(blocks) + b"\n"


def check_tls_material(files: TlsFiles) -> None:
    """Load the files the way the client will, so a bad one fails now with its variable's name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for name, path in (("KAFKA_CA_CERT", files.ca_file), ("KAFKA_CLIENT_CERT", files.cert_file)):
        try:
            if path is not None:
                context.load_verify_locations(cafile=path)
        except ssl.SSLError:
            raise ConfigError(f"{name} is not a valid PEM certificate") from None
    if files.cert_file is None:
        return

    def refuse_encrypted_key():
        raise ConfigError("KAFKA_CLIENT_KEY is encrypted: provide the key without a passphrase")

    try:
        context.load_cert_chain(files.cert_file, files.key_file, password=refuse_encrypted_key)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            raise ConfigError("KAFKA_CLIENT_KEY does not match KAFKA_CLIENT_CERT") from None
        raise ConfigError("KAFKA_CLIENT_KEY is not a valid PEM private key") from None


def write_tls_material(settings: KernelSettings) -> TlsFiles:
    """Write the decoded certificates that are set into a private directory (0700, files 0600) and
    check that they fit together; the caller removes the directory (tls_files does)."""
    given = (("KAFKA_CA_CERT", settings.ca_cert, "ca.pem", "CERTIFICATE"),
             ("KAFKA_CLIENT_CERT", settings.client_cert, "client.pem", "CERTIFICATE"),
             ("KAFKA_CLIENT_KEY", settings.client_key, "client.key", "PRIVATE KEY"))
    material = {file: decode_pem(name, value, block) for name, value, file, block in given if value is not None}
    directory = tempfile.mkdtemp(prefix="kernel-tls-")  # created 0700; a kernel's name may hold a "/"
    files = TlsFiles(directory, *(os.path.join(directory, file) if file in material else None
                                  for _, _, file, _ in given))
    try:
        for file, pem in material.items():
            descriptor = os.open(os.path.join(directory, file), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as output:
                output.write(pem)
        check_tls_material(files)
    except BaseException:
        files.remove()
        raise
    return files


@contextlib.contextmanager
def tls_files(settings: KernelSettings) -> Iterator[TlsFiles | None]:
    """The certificates, decoded into private files for the life of the block and removed however
    it ends; None without any (PLAINTEXT, or TLS with the system's trust store and no client certificate)."""
    if not any((settings.ca_cert, settings.client_cert)):
        yield None
        return
    tls = write_tls_material(settings)
    try:
        yield tls
    finally:
        tls.remove()


###############################################################################
# Health ######################################################################
###############################################################################


class HealthState:
    """What /healthz and /readyz answer, written by the loop and read by the HTTP thread."""

    def __init__(self, settings: KernelSettings, handler_name: str = "process_message"):
        self.max_poll_interval_s = settings.max_poll_interval_ms / 1000
        # Without a fetch or a heartbeat answered for a session timeout, the group has let the kernel go.
        self.out_of_touch_s = settings.session_timeout_ms / 1000
        self.handler_name = handler_name  # process_message, or process_batch
        self.last_poll_s = time.monotonic()  # starting counts as progress
        self.busy_since_s: float | None = None  # start of the longest-running call of the handler
        self.joined = False  # holds an assignment (possibly empty) from the group
        self.last_contact_s = time.monotonic()  # the last fetch that brought records, heartbeat answered, or join
        self.missing_topics: list[str] = []  # of KAFKA_TOPIC and KERNEL_DEAD_LETTER_TOPIC, the broker does not know
        self.missing_outputs: frozenset[str] = frozenset()  # topics sent to that the broker said do not exist
        self.dead_letter_trouble: str | None = None  # why the last dead letter could not be published
        self.refusal: AccessRefused | None = None  # the first refusal of the credentials since they were accepted
        self.refused_since_s = 0.0
        self.producer_failed: KafkaError | AccessRefused | None = None  # librdkafka's producer failed for good

    def refused(self, refusal: AccessRefused) -> None:
        """A broker, or the OAuth token endpoint, refused the credentials (from the client's threads)."""
        if self.refusal is None:
            self.refused_since_s = time.monotonic()  # first: the loop reads it once it sees the refusal
            self.refusal = refusal

    def accepted(self) -> None:
        self.refusal = None

    def alive(self) -> tuple[bool, str]:
        now = time.monotonic()
        if now - self.last_poll_s > self.max_poll_interval_s:
            return False, f"no poll for {now - self.last_poll_s:.0f} s"
        if self.busy_since_s is not None and now - self.busy_since_s > self.max_poll_interval_s:
            return False, f"{self.handler_name} running for {now - self.busy_since_s:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if (refusal := self.refusal) is not None:
            return False, f"credentials refused: {refusal}"
        if self.producer_failed is not None:
            return False, self.producer_failed.args[0]
        if self.missing_topics:
            return False, f"topic {', '.join(self.missing_topics)} does not exist"
        if self.dead_letter_trouble:
            return False, self.dead_letter_trouble
        if missing := self.missing_outputs:
            return False, f"topic {', '.join(sorted(missing))} does not exist: sends to it fail"
        if not self.joined:
            return False, "not in the group yet"
        if (silent_s := time.monotonic() - self.last_contact_s) > self.out_of_touch_s:
            return False, f"no fetch or heartbeat answered for {silent_s:.0f} s (KAFKA_SESSION_TIMEOUT_MS)"
        return True, "ok"


###############################################################################
# kafka-python patches ########################################################
###############################################################################

# Where the machinery reaches into kafka-python's internals (private attributes, its classes subclassed
# or rebound), all of it here. Each says what it works around, what upstream would make it unneeded, and
# the test that fails without it (rerun them all before upgrading: CLAUDE.md, docs/reference.md "About
# the Kafka client"). Written for the version pyproject.toml pins; run_kernel() says so in one warning
# line when another is installed.
KAFKA_PYTHON_PATCHED = "2.3.3"


def check_kafka_python_version() -> None:
    if kafka.__version__ != KAFKA_PYTHON_PATCHED:
        kernel_log.warning("kafka-python %s is installed, but main.py's kafka-python patches were written for %s: "
                           "run the tests each one names before trusting them", kafka.__version__,
                           KAFKA_PYTHON_PATCHED)


class WatchedClient(kafka.client_async.KafkaClient):
    """The consumer's and the producer's client, telling `health` when a broker (or the OAuth token
    endpoint) refuses the credentials, and when a connection is made again. kafka-python 2.3.3 only logs
    a refusal, as it closes the connection (BrokerConnection.close(error)), and connects again for ever:
    a password rotated or an OAuth client revoked while the kernel runs would leave it stuck, unnoticed.
    It also keeps the heartbeat thread off a connection while it authenticates (see below).
    Unneeded once: kafka-python raises a refusal on connect (dpkp/kafka-python#2994, merged into its new
    kafka.net layer; not tried here); for the lock, no upstream issue. Proven by: tests/test_sasl.py's
    test_an_oauth_client_revoked_while_running_is_not_ready_then_exits_5 and
    test_the_kernel_keeps_consuming_across_oauth_token_lifetimes."""

    def __init__(self, health: HealthState, **config):
        self.health = health  # first: the client connects from its __init__
        super().__init__(**config)

    def _conn_state_change(self, node_id, sock, conn):
        if conn.state is kafka.conn.ConnectionStates.AUTHENTICATING and "close" not in vars(conn):
            conn.close = functools.partial(self.closing, conn, conn.close)
            # The SaslHandshake answer's callback authenticates with blocking reads, and may run outside
            # the client's lock (from poll()'s pending completions): the heartbeat thread's poll then reads
            # the SaslAuthenticate answer off the socket first, and the callback waits request_timeout_ms
            # (305 s) for it. Under the lock, no poll runs meanwhile.
            conn._handle_sasl_handshake_response = self.locked(conn._handle_sasl_handshake_response)
        elif conn.state is kafka.conn.ConnectionStates.CONNECTED:
            self.health.accepted()
        super()._conn_state_change(node_id, sock, conn)

    def locked(self, function: Callable) -> Callable:
        def under_the_lock(*arguments):
            with self._lock:
                return function(*arguments)
        return under_the_lock

    def closing(self, conn: kafka.conn.BrokerConnection, close: Callable, error=None) -> None:
        if isinstance(error, AccessRefused):
            self.health.refused(error)
        elif isinstance(error, kafka.errors.SaslAuthenticationFailedError):
            self.health.refused(sasl_refusal(f"{conn.host}:{conn.port}", conn.config["sasl_mechanism"]))
        close(error)


class ProbeConnection(kafka.conn.BrokerConnection):
    """One connection made as the client makes them, keeping why it was closed: kafka-python only
    logs that, and tries again for ever, so a refused password would look like a slow broker.
    Unneeded once: as WatchedClient. Proven by: tests/test_sasl.py's
    test_refused_credentials_are_one_line_exit_5_and_check_says_authentication."""

    closed_by: BaseException | None = None  # the error of the first close of the last attempt
    closed_after_handshake = False  # ... when TLS was done and the broker's first answer was awaited

    def close(self, error=None):
        if error is not None and self.state is not kafka.conn.ConnectionStates.DISCONNECTED:
            self.closed_by = error
            self.closed_after_handshake = self._ssl_context is not None and self.state in (
                kafka.conn.ConnectionStates.API_VERSIONS_SEND, kafka.conn.ConnectionStates.API_VERSIONS_RECV)
        super().close(error)


def with_coordinator_backoff(consumer: KafkaConsumer) -> KafkaConsumer:
    """Works around a busy loop of kafka-python 2.3 while the group's coordinator is down: until the
    controller fences the dead broker (about 9 s on Apache Kafka), the others still name it, and the
    client marks it dead and asks again at once, some 500 times a second (since dpkp/kafka-python#2530;
    Java's client waits retry.backoff.ms there). It now waits retry_backoff_ms (100 ms) too.
    Unneeded once: no upstream issue (dpkp/kafka-python#2695, in 2.3.3, ended a like busy loop with no
    request pending, not this one). Proven by: tests/test_failover.py's
    test_leader_and_coordinator_killed_and_every_broker_restarted_loses_nothing (the CPU it may take)."""
    coordinator = consumer._coordinator
    mark_dead, backoff_s = coordinator.coordinator_dead, consumer.config["retry_backoff_ms"] / 1000

    def coordinator_dead(error) -> None:
        mark_dead(error)
        if error == "Node Disconnected":  # the one kafka-python retries at once
            time.sleep(backoff_s)

    coordinator.coordinator_dead = coordinator_dead
    return consumer


# A record the client cannot decode, in its place among the others: never handed to the handler, only
# dead-lettered (or the kernel stops, saying how to move past it); `undecodable` says why.
UndecodableRecord = namedtuple("UndecodableRecord", (*ConsumerRecord._fields, "undecodable"))


class LenientBuffer(bytearray):
    """A record batch's bytes whose slices decode header names that are not UTF-8 with surrogates
    (surrogateescape) instead of raising: DefaultRecordBatch._read_msg decodes them as
    buffer[start:end].decode("utf-8")."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return LenientSlice(item) if isinstance(index, slice) else item


class LenientSlice(bytearray):
    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return super().decode(encoding, "surrogateescape")


def escaped_name(name: str) -> str | None:
    """A header name read leniently, escaped (\\xff for a byte that is not UTF-8); None if it is UTF-8."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return name.encode(errors="surrogateescape").decode(errors="backslashreplace")
    return None


def lenient_record(tp: TopicPartition, leader_epoch: int, record) -> ConsumerRecord:
    """A record read leniently as the client would have read it; an UndecodableRecord if some of its
    header names are not UTF-8, with them escaped and a header counting them."""
    headers, escaped = [], 0
    for name, data in record.headers:
        if (escape := escaped_name(name)) is not None:
            name, escaped = escape, escaped + 1
        headers.append((name, data))
    if escaped:
        headers.append(("kernel-header-names-escaped", str(escaped).encode()))
    key, value = record.key, record.value
    fields = (tp.topic, tp.partition, leader_epoch, record.offset, record.timestamp, record.timestamp_type, key, value,
              headers, record.checksum, -1 if key is None else len(key), -1 if value is None else len(value),
              sum(len(name.encode()) + len(data or b"") for name, data in headers))
    if not escaped:
        return ConsumerRecord(*fields)
    return UndecodableRecord(*fields, f"{escaped} header name(s) not UTF-8, which kafka-python cannot read "
                             "(escaped as \\xNN in a dead letter)")


class LenientPartitionRecords(Fetcher.PartitionRecords):
    """Works around kafka-python 2.3.3 stopping for good at a record it cannot decode: a header name
    that is not UTF-8 (legal on the wire: brokers do not check it, and Go clients can write one), or a
    record batch that fails its CRC check or is otherwise corrupt, makes every poll() raise
    CorruptRecordError at it, so no replica ever reads past it. Here the batch it failed in is read
    again: its readable records as the client reads them, a record with header names that are not
    UTF-8 with them escaped, and what cannot be read at all as one UndecodableRecord per offset; the
    client then goes on with the next batch. Only after a failure: take(), once per partition and poll,
    is where the failure surfaces, so a fetch the client reads costs nothing more per record (a wrapper
    around _unpack_records cost 5% of a no-op kernel's throughput). (kafka-python's Fetcher makes its
    PartitionRecords through self.PartitionRecords.) Unneeded once: no upstream issue. Proven by:
    tests/test_undecodable.py (each of its tests)."""

    def __init__(self, fetch_offset, tp, records, *arguments, **options):
        super().__init__(fetch_offset, tp, records, *arguments, **options)
        self.fetched = records._buffer  # the partition's fetched bytes, for a batch read again

    def take(self, n=None):
        try:
            return super().take(n)
        except CorruptRecordError as error:  # the records' generator has ended there: go on past the batch
            batch, end = self.batch_at(self.fetched, self.next_fetch_offset)
            if batch is None:
                raise
            rest = MemoryRecords(memoryview(self.fetched)[end:])  # those before fetch_offset are skipped, as before
            self.record_iterator = itertools.dropwhile(self._maybe_skip_record, self.read_past(batch, rest, error))
            return super().take(n)

    def read_past(self, batch, rest: MemoryRecords, error: CorruptRecordError) -> Iterator[ConsumerRecord]:
        """The failed batch read leniently, then the client's own reading of the batches after it (no
        deserializers: the kernel's consumer has none)."""
        yield from self.read_leniently(self.topic_partition, batch, error)
        self.next_fetch_offset = batch.next_offset
        yield from self._unpack_records(self.topic_partition, rest, None, None)

    @staticmethod
    def batch_at(fetched: bytes, offset: int) -> tuple:
        """The record batch (of format v2) of `fetched` that holds `offset`, and where it ends; (None, 0)
        if none does."""
        batches, end = MemoryRecords(fetched), 0
        with contextlib.suppress(CorruptRecordError):
            while (batch := batches.next_batch()) is not None:
                end += batch.size_in_bytes
                if batch.magic >= 2 and batch.last_offset >= offset:
                    return batch, end
        return None, 0

    def read_leniently(self, tp, batch, error: CorruptRecordError) -> Iterator[ConsumerRecord]:
        """The records of `batch` from next_fetch_offset on, read leniently."""
        try:
            if self.check_crcs and not batch.validate_crc():
                raise error
            batch._maybe_uncompress()
            batch._buffer = LenientBuffer(batch._buffer)
            for record in batch:
                if record.offset >= self.next_fetch_offset:
                    yield lenient_record(tp, self.leader_epoch, record)
                    self.next_fetch_offset = record.offset + 1
        except Exception as unreadable:  # whatever the client raises on bytes it cannot read
            reason = f"kafka-python cannot read it ({type(unreadable).__name__}: {unreadable})"
            for offset in range(self.next_fetch_offset, batch.next_offset):
                yield UndecodableRecord(tp.topic, tp.partition, self.leader_epoch, offset, -1, 0, None, None, [], None,
                                        -1, -1, -1, reason)


def lenient(consumer: KafkaConsumer) -> KafkaConsumer:
    """`consumer` reading records it cannot decode as UndecodableRecord (LenientPartitionRecords)."""
    consumer._fetcher.PartitionRecords = LenientPartitionRecords
    return consumer


def mended(client: KafkaProducer) -> KafkaProducer:
    """Works around a kafka-python 2.3.3 bug that stops a partition's sends for good. A produce
    request that failed on the client's side (it timed out, or its connection broke) after its
    batch's delivery timeout (here equal to the request timeout: so after every timeout) reaches
    Sender._fail_batch with the exception where its class is expected: "TypeError:
    'RequestTimedOutError' object is not callable". The batch is never completed and its
    partition never unmuted (one request in flight keeps outputs in order), so every later send
    to it expires until the kernel restarts: a broker failover could stall a kernel for good.
    Passing the class and its message, as a broker's errors come, lets the batch fail and the
    partition go on. Came with PartitionResponse (dpkp/kafka-python#2661, 2.3.0). Unneeded once: 3.0,
    which fixed it (Sender._complete_batch_with_exception). Proven by: tests/test_failover.py's
    test_sends_go_on_after_a_produce_request_timed_out_on_a_frozen_leader."""
    sender = client._sender
    fail_batch = sender._fail_batch

    def fail_batch_with_class(batch, response):
        if isinstance(response.error, Exception):
            error = response.error
            response = response._replace(error=type(error), error_message=error.args[0] if error.args else None)
        fail_batch(batch, response)

    sender._fail_batch = fail_batch_with_class
    return client


def told_missing_topics(client: KafkaProducer, health: HealthState) -> KafkaProducer:
    """kafka-python 2.3.3 waits for a topic the broker does not have (a mistyped name, where topics
    are not created automatically) for the whole max_block_ms, asking again every retry_backoff_ms
    (about 9 times a second), then says only "Failed to update metadata". Here the topics each
    metadata answer calls unknown are kept (and shown by /readyz), and a send to one fails after
    MISSING_TOPIC_WAIT_MS, saying the topic does not exist and which variable holds its name.
    Unneeded once: dpkp/kafka-python#1467 (closed; 2.3.3 still waits max_block_ms). Proven by:
    tests/test_examples.py's test_transform_names_an_output_topic_that_does_not_exist."""
    metadata, update, wait = client._metadata, client._metadata.update_metadata, client._wait_on_metadata
    unknown = kafka.errors.UnknownTopicOrPartitionError.errno

    def update_metadata(answer) -> None:
        update(answer)
        missing = {topic[1] for topic in answer.topics if topic[0] == unknown}
        known = {topic[1] for topic in answer.topics if topic[0] == 0}
        health.missing_outputs = frozenset(health.missing_outputs - known | missing)

    def wait_on_metadata(topic: str, max_wait_ms: int):
        deadline_s = time.monotonic() + max_wait_ms / 1000
        while True:
            try:
                return wait(topic, max(1, min(MISSING_TOPIC_WAIT_MS, int((deadline_s - time.monotonic()) * 1000))))
            except kafka.errors.KafkaTimeoutError:
                if topic in health.missing_outputs:
                    raise kafka.errors.UnknownTopicOrPartitionError(
                        f"topic {topic} does not exist{named_by(topic)}: create it, or correct the name") from None
                if time.monotonic() >= deadline_s:
                    raise kafka.errors.KafkaTimeoutError(
                        f"Failed to update metadata after {max_wait_ms / 1000:.1f} secs.") from None

    metadata.update_metadata, client._wait_on_metadata = update_metadata, wait_on_metadata
    return client


def denied_topics(consumer: KafkaConsumer, topics: list[str], timeout_ms: int) -> set[str]:
    """Which of `topics` the broker refuses to show this client. Asked by name: a listing of all
    topics leaves them out silently. (kafka-python 2.3 has no public call for it.) Unneeded once: no
    upstream issue. Proven by: tests/test_sasl.py's test_denied_topic_is_one_line_and_exit_5."""
    client = consumer._client
    with client_logs_muted():
        for topic in topics:
            client.add_topic(topic)
        client.poll(future=client.cluster.request_update(), timeout_ms=timeout_ms)
    return set(topics) & client.cluster.unauthorized_topics


def last_heartbeat_answered_s(consumer: KafkaConsumer) -> float:
    """When the group's coordinator last answered a heartbeat (time.time(); -inf before the first): what
    /readyz counts as contact while no fetch brings records. kafka-python 2.3 has no public call for it.
    Unneeded once: no upstream issue. Proven by: tests/test_operations.py's
    test_health_and_readiness_through_starting_joined_stuck_and_stopping (ready through 7 s without a record)."""
    return consumer._coordinator.heartbeat.last_receive


def set_partition_fetch_bytes(consumer: KafkaConsumer, limit: int) -> None:
    """Change max_partition_fetch_bytes of a running consumer: kafka-python 2.3 reads it from its fetcher's
    configuration at every fetch, and has no public way to change it. Unneeded once: no upstream issue.
    Proven by: tests/test_memory.py's test_a_hundred_partitions_together_stay_within_the_byte_budget."""
    consumer._fetcher.config["max_partition_fetch_bytes"] = limit


###############################################################################
# Connecting ##################################################################
###############################################################################

PROBE_TIMEOUT_S = 5.0  # how long connect_consumer's test connection to one bootstrap server may take


def sasl_refusal(server: str, mechanism: str) -> AccessRefused:
    credentials = ("KAFKA_SASL_OAUTHBEARER_CLIENT_ID and the token's audience and issuer"
                   if mechanism == "OAUTHBEARER" else "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
    return AccessRefused(f"{server} refused the SASL {mechanism} credentials: check {credentials} (and "
                         "KAFKA_SASL_MECHANISM: the broker may know the user under another one)", "authentication")


def security_config(settings: KernelSettings, tls: TlsFiles | None) -> dict:
    """Connection settings shared by the consumer and the producer."""
    config = dict(bootstrap_servers=settings.bootstrap_servers, security_protocol=settings.security_protocol)
    if settings.uses_tls:  # without KAFKA_CA_CERT the client trusts the system's CAs, as hosted Kafka needs
        config.update(ssl_cafile=tls and tls.ca_file, ssl_certfile=tls and tls.cert_file,
                      ssl_keyfile=tls and tls.key_file, ssl_check_hostname=settings.ssl_check_hostname)
    sasl = settings.sasl
    if sasl is not None:
        config.update(sasl_mechanism=sasl.mechanism, sasl_plain_username=sasl.username,
                      sasl_plain_password=sasl.password,
                      sasl_oauth_token_provider=oauth_tokens(sasl.oauth) if sasl.oauth else None)
    return config


def consumer_config(settings: KernelSettings, tls: TlsFiles | None, health: HealthState | None = None) -> dict:
    """kafka-python KafkaConsumer arguments; see the KafkaConsumer docstring for each. With `health`, the
    client tells it of refused credentials (and the producer's client, which ConsumerLoop makes alike)."""
    return dict(
        security_config(settings, tls),
        kafka_client=functools.partial(WatchedClient, health) if health else kafka.client_async.KafkaClient,
        client_id=settings.client_id,
        group_id=settings.group_id,
        group_instance_id=settings.group_instance_id,
        # Offsets are committed by the loop, explicitly and only for finished messages.
        enable_auto_commit=False,
        # A mistyped KAFKA_TOPIC must not create a topic and wait on it forever: the loop waits for it.
        allow_auto_create_topics=False,
        auto_offset_reset=settings.auto_offset_reset,
        max_poll_records=settings.max_poll_records,
        fetch_max_bytes=settings.fetch_max_bytes,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
        # kafka-python 2.3.3 refuses network frames over receive_message_max_bytes (1 MB by default),
        # so a larger fetch response failed, dropped the connection and was fetched again (dpkp/kafka-python#3074).
        # A record batch larger than a whole fetch still comes whole (KIP-74): allow at least 50 MB.
        receive_message_max_bytes=max(settings.fetch_max_bytes, 52_428_800) + 1_048_576,
        check_crcs=settings.check_crcs,
        session_timeout_ms=settings.session_timeout_ms,
        # kafka-python requires a request timeout (305 s by default) above the session timeout, and
        # connections_max_idle_ms (540 s) above that.
        request_timeout_ms=max(305_000, settings.session_timeout_ms + 5_000),
        connections_max_idle_ms=max(540_000, settings.session_timeout_ms + 10_000),
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        # Bootstrap is retried by connect_consumer() in short attempts so that a stop request is honoured.
        api_version_auto_timeout_ms=min(settings.bootstrap_timeout_ms, 2_000),
    )


def producer_config(settings: KernelSettings, tls: TlsFiles | None, api_version: tuple | None) -> dict:
    """kafka-python KafkaProducer arguments; see the KafkaProducer docstring for each."""
    return dict(
        security_config(settings, tls),
        client_id=f"{settings.client_id}-producer",
        # The consumer's negotiated version: a producer probing on its own during a network blip can
        # settle on a pre-0.11 protocol, which cannot carry headers.
        api_version=api_version,
        acks="all",  # a send is confirmed once every in-sync replica has it
        # One request at a time per broker, so a retried batch cannot land after a later one: outputs
        # keep the order of their inputs per key. (enable_idempotence would allow five, but the broker
        # the tests run against refuses it.)
        max_in_flight_requests_per_connection=1,
        # send() waits at most this long for room in the buffer or for the topic's metadata, and the
        # producer gives up on a message when the kernel does, so an outage does not pile up copies
        # of outputs whose inputs are being processed again.
        max_block_ms=settings.produce_timeout_ms,
        request_timeout_ms=settings.produce_timeout_ms,
        delivery_timeout_ms=settings.produce_timeout_ms,
        # The largest message sent: what the kernel fetches at most. A dead letter larger than this (or
        # than the dead-letter topic takes) goes without its value; an output, is a dead letter itself.
        max_request_size=settings.fetch_max_bytes,
    )


@contextlib.contextmanager
def client_logs_muted() -> Iterator[None]:
    """Mutes kafka-python's own log lines during a request whose outcome the kernel reports itself:
    they would say it again, some with a traceback."""
    loggers = [logging.getLogger(f"kafka.{name}") for name in ("client", "cluster", "conn", "future")]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger in loggers:
            logger.disabled = False


def resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (socket.gaierror, UnicodeError):
        return False


def probe_connection(config: dict, server: str, timeout_s: float) -> tuple[str, str] | None:
    """Connect to one bootstrap server as the client will (TCP, TLS, API versions, SASL) and hang
    up; None if it worked, else the kind of failure ("network", "TLS" or "OAuth") and what it was. Refused
    credentials raise AccessRefused, a failed TLS handshake ssl.SSLError: neither mends by waiting."""
    host, port = server.rsplit(":", 1)
    host = host.strip("[]")
    if not resolves(host):
        return "network", f"{host} does not resolve (DNS)"
    config = dict(config, request_timeout_ms=int(timeout_s * 1000), api_version_auto_timeout_ms=int(timeout_s * 1000))
    connection = ProbeConnection(host, int(port), socket.AF_UNSPEC, **config)
    try:
        with client_logs_muted():
            if connection.connect_blocking(timeout_s):
                return None
    finally:
        connection.close()
    error = connection.closed_by
    if isinstance(error, AccessRefused):  # from the OAuth token endpoint
        raise error
    if isinstance(error, BrokerUnavailable):  # the token endpoint is down, slow or garbled: it may mend
        return error.kind, str(error)
    mechanism = config.get("sasl_mechanism")
    if isinstance(error, kafka.errors.SaslAuthenticationFailedError):
        raise sasl_refusal(server, mechanism)
    if isinstance(error, kafka.errors.UnsupportedSaslMechanismError):
        raise AccessRefused(f"{server} does not offer the SASL mechanism {mechanism}: {error}; check "
                            "KAFKA_SASL_MECHANISM", "authentication")
    if connection.closed_after_handshake:  # how a broker on TLS 1.3 turns away a client certificate
        return "TLS", (f"{server} closed the connection right after the TLS handshake, unanswered: it may not accept "
                       "the client certificate (KAFKA_CLIENT_CERT, signed by a CA it trusts)")
    return "network", f"{server}: {error or 'no answer'}"


def connect_consumer(settings: KernelSettings, tls: TlsFiles | None, stop: StopSignal,
                     health: HealthState | None = None) -> KafkaConsumer | None:
    """Create the consumer once a bootstrap server accepts a connection made as the consumer's are,
    retrying until KAFKA_BOOTSTRAP_TIMEOUT_MS; None if a stop was requested. Refused credentials and
    failed TLS end it at once: they do not mend by waiting."""
    config, servers = consumer_config(settings, tls, health), ",".join(settings.bootstrap_servers)
    if (tokens := config.get("sasl_oauth_token_provider")) is not None:
        tokens.stop = stop  # a SIGTERM is answered at once, not once a token endpoint's answer ends
    deadline = time.monotonic() + settings.bootstrap_timeout_ms / 1000
    failures: list[tuple[str, str]] = []  # (kind, what)
    while not stop.requested:
        try:
            for server in settings.bootstrap_servers:
                failure = probe_connection(config, server, timeout_s=PROBE_TIMEOUT_S)
                if failure is None:
                    return lenient(with_coordinator_backoff(KafkaConsumer(**config)))
                failures.append(failure)
        except NoBrokersAvailable:
            failures.append(("network", "the consumer found no broker"))
        except ssl.SSLCertVerificationError as error:
            raise BrokerUnavailable(
                f"TLS with {servers} failed verification of the broker's certificate ({error.verify_message}): "
                "check KAFKA_CA_CERT (the CA that signed the brokers' certificates; unset, the system's CAs are "
                "trusted) and the host names in KAFKA_BOOTSTRAP_SERVERS (or set KAFKA_SSL_CHECK_HOSTNAME=false)", "TLS"
            ) from None
        except ssl.SSLError as error:
            raise BrokerUnavailable(f"TLS with {servers} failed ({error.reason}): check KAFKA_CA_CERT, the client "
                                    "certificate (KAFKA_CLIENT_CERT, KAFKA_CLIENT_KEY), and that the port is a TLS "
                                    "listener", "TLS") from None
        if time.monotonic() >= deadline:
            kind, last = failures[-1]
            if kind == "OAuth":
                raise BrokerUnavailable(f"{last} (tried for {settings.bootstrap_timeout_ms} ms, "
                                        "KAFKA_BOOTSTRAP_TIMEOUT_MS)", kind)
            raise BrokerUnavailable(
                f"no broker of KAFKA_BOOTSTRAP_SERVERS={servers} answered within {settings.bootstrap_timeout_ms} ms "
                f"(KAFKA_BOOTSTRAP_TIMEOUT_MS) over {settings.security} (last: {last}): check the address and "
                "port, the network, and KAFKA_SECURITY_PROTOCOL", kind)
        time.sleep(0.5)
    return None


###############################################################################
# Producing ###################################################################
###############################################################################


# What no retry can deliver: a message larger than the producer's limit (KAFKA_FETCH_MAX_BYTES) or the
# topic's (its max.message.bytes, about 1 MB by default on Apache Kafka).
SIZE_ERRORS = (kafka.errors.MessageSizeTooLargeError, kafka.errors.RecordListTooLargeError)
DROPPABLE = ("value", "key")  # what a dead letter too large goes without, in turn


def smaller(dropped: tuple[str, ...], error: KafkaError | None) -> tuple[str, ...] | None:
    """What a dead letter sent without `dropped`, and refused with `error`, goes without next: one part
    more when it was too large, None when that is not why or nothing is left to drop."""
    if isinstance(error, SIZE_ERRORS) and len(dropped) < len(DROPPABLE):
        return DROPPABLE[:len(dropped) + 1]
    return None


def producible_headers(headers: list) -> list[tuple[str, bytes]]:
    """Headers as kafka-python's producer takes them: (str, bytes) pairs. A null value, which Kafka
    allows (and message.headers can hold) but the producer refuses, is sent empty; anything else
    that is not a header raises TypeError saying which."""
    producible = []
    for header in headers:
        if not (isinstance(header, tuple | list) and len(header) == 2 and isinstance(header[0], str)):
            raise TypeError(f"a header must be a (str, bytes) pair, got {header!r:.100}")
        name, value = header
        if value is None or isinstance(value, bytearray | memoryview):
            value = bytes(value or b"")
        elif not isinstance(value, bytes):
            raise TypeError(f"header {name!r} must have a bytes value (or None), got {type(value).__name__}")
        producible.append((name, value))
    return producible


def describe_size(data: bytes | None) -> str:
    return f"{len(data or b''):,} bytes"


MISSING_TOPIC_WAIT_MS = 1_000  # how long a send waits for a topic the broker said does not exist


def named_by(value: str) -> str:
    """" (NAME holds it)": which environment variables hold `value`, to say where a bad topic name came from."""
    names = [name for name, held in os.environ.items() if held.strip() == value]
    return f" ({', '.join(names)} holds it)" if names else ""


def delivery_error(future: Future, timeout_s: float) -> KafkaError | None:
    """Wait up to `timeout_s` for the broker to confirm a send; the error if it did not."""
    if not future.is_done:
        try:
            future.get(timeout=timeout_s)
        except KafkaError as error:
            return error
    return future.exception


class KernelProducer:
    """The kernel's one KafkaProducer, shared by send() and the dead-letter topic. Created on first
    use (most kernels never produce) from whichever thread needs it first; closed at shutdown."""

    def __init__(self, settings: KernelSettings, tls: TlsFiles | None, api_version: tuple | None = None,
                 metrics: KernelMetrics | None = None, tracing: Tracing | None = None,
                 health: HealthState | None = None):
        self.config = producer_config(settings, tls, api_version)
        self.metrics = metrics  # counts confirmed and failed sends when set
        self.tracing = tracing  # puts the trace context into what it sends, when set
        self.health = health or HealthState(settings)  # /readyz names a topic sent to that does not exist
        self.client: KafkaProducer | None = None
        self.lock = threading.Lock()
        self.timeout_s = settings.produce_timeout_ms / 1000

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list) -> Future:
        """Queue a message; broker trouble shows in the returned future, never as an exception here."""
        if self.tracing is not None:
            headers = self.tracing.with_context(headers)
        try:
            if self.client is None:  # the lock is taken only until the client exists
                with self.lock:
                    if self.client is None:
                        self.client = told_missing_topics(mended(KafkaProducer(**self.config)), self.health)
            future = self.client.send(topic, key=key, value=value, headers=headers)
        except KafkaError as error:  # no broker, the buffer stayed full, or the topic is unknown
            future = kafka.future.Future().failure(error)
        if (metrics := self.metrics) is not None:
            future.add_callback(lambda _: metrics.of_topic(metrics.sent, topic).inc())
            future.add_errback(lambda _: metrics.of_topic(metrics.send_failures, topic).inc())
        return future

    def close(self) -> None:
        if self.client is not None:
            self.client.close(timeout=self.timeout_s)

def librdkafka_config(settings: KernelSettings) -> dict:
    """confluent-kafka Producer settings (librdkafka's CONFIGURATION.md names) from the kernel's: the same
    broker, TLS and SASL as the consumer's; certificates as PEM text, so that no key is written to disk."""
    config = {
        "bootstrap.servers": ",".join(settings.bootstrap_servers),
        "security.protocol": settings.security_protocol,
        "client.id": f"{settings.client_id}-producer",
        "acks": "all",  # a send is confirmed once every in-sync replica has it
        # A retried request is never written twice nor after a later one: outputs keep their inputs' order per key.
        "enable.idempotence": True,
        "partitioner": "murmur2_random",  # a key's partition as Java's clients and kafka-python choose it
        # The producer gives up on a message when the kernel does (see producer_config).
        "message.timeout.ms": settings.produce_timeout_ms,
        "request.timeout.ms": settings.produce_timeout_ms,
        # A topic the broker says does not exist fails its sends after this long (UNKNOWN_TOPIC), not the timeout.
        "topic.metadata.propagation.max.ms": MISSING_TOPIC_WAIT_MS,
        # The largest message sent: what the kernel fetches at most (librdkafka takes up to 1,000,000,000).
        "message.max.bytes": min(settings.fetch_max_bytes, 1_000_000_000),
        # A task's sends (its dead letters among them) are awaited at its end, the loop's dead letters as it
        # publishes them: a batch lingering for more would only lengthen that wait (under load, batches still
        # fill while requests are in flight).
        "linger.ms": 0,
    }
    if settings.uses_tls:
        paths = ssl.get_default_verify_paths()  # without KAFKA_CA_CERT: the system's CAs, where Python's ssl has them
        if settings.ca_cert is None and (paths.cafile or paths.capath):  # (SSL_CERT_FILE too), as kafka-python does
            config["ssl.ca.location"] = paths.cafile or paths.capath
        for key, name, value, block in (
                ("ssl.ca.pem", "KAFKA_CA_CERT", settings.ca_cert, "CERTIFICATE"),
                ("ssl.certificate.pem", "KAFKA_CLIENT_CERT", settings.client_cert, "CERTIFICATE"),
                ("ssl.key.pem", "KAFKA_CLIENT_KEY", settings.client_key, "PRIVATE KEY")):
            if value is not None:
                config[key] = decode_pem(name, value, block).decode()
        if not settings.ssl_check_hostname:
            config["ssl.endpoint.identification.algorithm"] = "none"
    if (sasl := settings.sasl) is not None:
        config["sasl.mechanism"] = sasl.mechanism
        if sasl.oauth is None:
            config.update({"sasl.username": sasl.username, "sasl.password": sasl.password})
    return config


class Delivery:
    """A send through librdkafka as the kernel awaits one: is_done and exception, and get(timeout) as
    kafka-python's futures have them. Settled by its delivery report, on the producer's poll thread,
    which counts it for /metrics."""

    __slots__ = ("producer", "is_done", "exception")

    def __init__(self, producer: LibrdkafkaProducer):
        self.producer, self.is_done, self.exception = producer, False, None

    def report(self, error, message) -> None:
        """librdkafka's delivery report: confluent_kafka.KafkaError or None, and the message."""
        health = self.producer.health
        if error is None:
            if health.missing_outputs:  # the topic may exist now (/readyz)
                health.missing_outputs -= {message.topic()}
            if self.producer.refusal is not None:  # the credentials work again
                self.producer.refusal = None
                health.accepted()
            self.settle(None, message.topic())
            return
        if error.code() in (error._UNKNOWN_TOPIC, error.UNKNOWN_TOPIC_OR_PART):
            health.missing_outputs |= {message.topic()}
        self.settle(kafka_python_error(error, message.topic()), message.topic())

    def settle(self, error: KafkaError | None, topic: str) -> Delivery:
        self.exception = error  # before is_done: a worker reads is_done, then exception, with no lock
        self.is_done = True
        if (metrics := self.producer.metrics) is not None:
            metrics.of_topic(metrics.sent if error is None else metrics.send_failures, topic).inc()
        return self

    def get(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the delivery report, as FutureRecordMetadata.get does."""
        with self.producer.settled:
            self.producer.settled.wait_for(lambda: self.is_done, timeout)
        if not self.is_done:
            raise kafka.errors.KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")
        if self.exception is not None:
            raise self.exception


def kafka_python_error(error, topic: str) -> KafkaError:
    """librdkafka's error as kafka-python's producer would have raised it: the failure paths (SIZE_ERRORS,
    retries) and the lines that name them are the same with either producer."""
    code = error.code()
    if code in (error._UNKNOWN_TOPIC, error.UNKNOWN_TOPIC_OR_PART):
        return kafka.errors.UnknownTopicOrPartitionError(
            f"topic {topic} does not exist{named_by(topic)}: create it, or correct the name")
    if code == error._MSG_TIMED_OUT:
        return kafka.errors.KafkaTimeoutError(f"not confirmed within the delivery timeout ({error.str()})")
    return (kafka.errors.for_code(code) if code > 0 else KafkaError)(error.str())


def failed_for_good(error) -> KafkaError | AccessRefused:
    """What a fatal error of librdkafka's producer stops the kernel with, as every later send would fail:
    access refused (exit 5) when the broker's ACLs deny it (IDEMPOTENT_WRITE, say), else exit 3."""
    if "AUTHORIZATION" in error.name():
        return AccessRefused(f"the broker denied the producer ({error.name()}: {error.str()}): grant this kernel's "
                             "principal IDEMPOTENT_WRITE on the cluster and WRITE on its output topics",
                             "authorization")
    return KafkaError(f"the producer failed for good ({error.name()}: {error.str()}); no send can be delivered "
                      "without a new one")


class LibrdkafkaLog:
    """librdkafka's log lines (served on the producer's poll thread) as the kernel's own, under the logger
    "librdkafka": formatted, throttled and cut as the others, JSON under LOG_FORMAT=json, never on stderr."""

    logger = logging.getLogger("librdkafka")

    def log(self, level: int, _format: str, facility: str, _client: str, text: str) -> None:
        # Throttled per facility; a warning at most: what fails for good, the kernel's own lines say (a send not
        # delivered), while librdkafka logs every lost connection as an error, and connects again.
        self.logger.log(min(level, logging.WARNING), f"{facility}: %s", text, extra=REPEATING)


PRODUCER_POLL_S = 0.1  # how long the poll thread waits for an event before it looks for a stop
PRODUCER_END_S = 2.0  # how long a close waits for the poll thread to end, and again for the client's threads


class LibrdkafkaProducer:
    """The kernel's one producer through confluent-kafka (librdkafka), as KernelProducer is through
    kafka-python, with its interface: send() returns a future (a Delivery), close() flushes. One
    thread serves the delivery reports (and log lines and OAuth token requests), however many
    messages are in flight. Its client is created on first use, from whichever thread needs it first."""

    def __init__(self, settings: KernelSettings, metrics: KernelMetrics | None = None,
                 tracing: Tracing | None = None, health: HealthState | None = None):
        try:  # imported here (10 ms), so that KERNEL_PRODUCER=kafka-python runs where confluent-kafka has no wheel
            import confluent_kafka
        except ImportError:
            raise ConfigError("KERNEL_PRODUCER=confluent-kafka (the default) needs the confluent-kafka package: "
                              "install it, or set KERNEL_PRODUCER=kafka-python") from None
        self.config = librdkafka_config(settings) | {"logger": LibrdkafkaLog(), "error_cb": self.client_error}
        if settings.sasl is not None and settings.sasl.oauth is not None:
            self.config["oauth_cb"] = functools.partial(self.oauth_token, oauth_tokens(settings.sasl.oauth))
        self.new_client, self.refused = confluent_kafka.Producer, confluent_kafka.KafkaException
        self.mechanism = settings.sasl.mechanism if settings.sasl is not None else None
        self.last_error = None  # librdkafka's last error of the client as a whole (`check` says it)
        self.refusal: AccessRefused | None = None  # its refusal of the credentials, until a send is delivered
        self.metrics = metrics  # counts confirmed and failed sends when set
        self.tracing = tracing  # puts the trace context into what it sends, when set
        self.health = health or HealthState(settings)  # /readyz names a topic sent to that does not exist
        self.client = None
        self.poller: threading.Thread | None = None  # serves the client's events (serve_events)
        self.lock = threading.Lock()
        self.settled = threading.Condition()  # notified once delivery reports were served
        self.closing = False
        self.timeout_s = settings.produce_timeout_ms / 1000
        self.shutdown_timeout_s = settings.shutdown_timeout_ms / 1000

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list) -> Delivery:
        """Queue a message; broker trouble shows in the returned future, never as an exception here."""
        if self.tracing is not None:
            headers = self.tracing.with_context(headers)
        if self.client is None:
            self.connect()
        future = Delivery(self)
        deadline_s = None
        while True:
            try:
                self.client.produce(topic, value, key, headers=headers or None, on_delivery=future.report)
            except BufferError:  # the queue is full: wait for room as kafka-python's send() does, as long as a send may
                deadline_s = deadline_s or time.monotonic() + self.timeout_s
                if time.monotonic() < deadline_s:
                    with self.settled:
                        self.settled.wait(PRODUCER_POLL_S)
                    continue
                future.settle(kafka.errors.KafkaTimeoutError("the producer's queue stayed full"), topic)
            except self.refused as error:  # a message over message.max.bytes (KAFKA_FETCH_MAX_BYTES), say
                future.settle(kafka_python_error(error.args[0], topic), topic)
            return future

    def connect(self) -> None:
        with self.lock:  # taken only until the client exists
            if self.client is None:
                self.client = self.new_client(self.config)
                self.poller = threading.Thread(target=self.serve_events, name="producer-deliveries", daemon=True)
                self.poller.start()

    def client_error(self, error) -> None:
        """librdkafka's errors of the client as a whole (on the poll thread), which it recovers from or tries
        again for ever: logged as its other lines are; a refusal of the SASL credentials also turns /readyz to
        503 and, with no send delivered since, stops the kernel after KAFKA_SESSION_TIMEOUT_MS, as the
        consumer's client does (a password rotated, an OAuth client revoked). After a fatal error every later
        send would fail: the loop stops the kernel on it (failed_for_good)."""
        self.last_error = error
        LibrdkafkaLog.logger.warning(f"{error.name()}: %s", error.str(), extra=REPEATING)  # one repeat count per kind
        # Only while it has messages to deliver: a refusal while idle (a broker restarting) could mend unseen.
        if error.code() == error._AUTHENTICATION and self.mechanism is not None and len(self.client or ()):
            self.refusal = sasl_refusal("a broker (to the producer)", self.mechanism)
            self.health.refused(self.refusal)
        if error.fatal():
            self.health.producer_failed = failed_for_good(error)

    def serve_events(self) -> None:
        while not self.closing:
            try:
                served = self.client.poll(PRODUCER_POLL_S)
            except self.refused as fatal:  # confluent-kafka raises librdkafka's fatal errors here
                kernel_log.error("The producer failed: %s", fatal.args[0].str(), extra=REPEATING)
                served = 1
            except Exception:  # a fault of the kernel's own in a callback: said, and the reports go on being served
                kernel_log.exception("A callback of the producer failed", extra=REPEATING)
                served = 1
            if served:
                with self.settled:
                    self.settled.notify_all()

    @staticmethod
    def oauth_token(tokens: OAuthBearerTokens, _config: str) -> tuple[str, float, str, dict[str, str]]:
        """The token librdkafka asks for, from the consumer's provider: the token, its expiry in seconds
        since the epoch, the principal and the SASL extensions."""
        token = tokens.token()
        return token, time.time() + tokens.expires_at_s - time.monotonic(), tokens.client.client_id, tokens.extensions()

    def probe(self, timeout_s: float) -> str | None:
        """For `check`: connect as send() does and ask for the cluster's metadata; None if it answered, else why not."""
        self.config["error_cb"] = functools.partial(setattr, self, "last_error")  # quiet: `check` says it its way
        self.connect()
        try:
            self.client.list_topics(timeout=timeout_s)
            return None
        except self.refused as error:
            time.sleep(PRODUCER_POLL_S)  # the errors that say why, served (by the poll thread)
            return (self.last_error or error.args[0]).str()
        finally:
            self.end()

    def close(self) -> None:
        """Flush what is still queued, within KERNEL_SHUTDOWN_TIMEOUT_MS, and end the client."""
        self.closing = True
        if self.client is not None:
            self.client.flush(self.shutdown_timeout_s)
        self.end()

    def end(self) -> None:
        """Stop the poll thread, then destroy the client (confluent-kafka does once nothing refers to it),
        ending librdkafka's threads: left running into the process's exit, one over TLS crashed in the
        exit's clean-up (a segmentation fault after `check` had said ok). Each wait is bounded."""
        self.closing = True
        if self.poller is not None:
            self.poller.join(PRODUCER_END_S)
        if self.client is None:
            return
        holder, self.client = [self.client], None
        ending = threading.Thread(target=holder.clear, name="producer-end", daemon=True)  # drops the last reference
        ending.start()
        ending.join(PRODUCER_END_S)


AnyProducer = KernelProducer | LibrdkafkaProducer  # what send() and the dead letters go through


def kernel_producer(settings: KernelSettings, tls: TlsFiles | None, consumer_config: dict,
                    metrics: KernelMetrics | None = None, tracing: Tracing | None = None,
                    health: HealthState | None = None) -> AnyProducer:
    """The producer KERNEL_PRODUCER names; kafka-python's made as the consumer was (its version, its watched client)."""
    if settings.producer == "confluent-kafka":
        return LibrdkafkaProducer(settings, metrics, tracing, health)
    producer = KernelProducer(settings, tls, consumer_config["api_version"], metrics, tracing, health)
    producer.config["kafka_client"] = consumer_config.get("kafka_client", kafka.client_async.KafkaClient)
    return producer


def dead_letter_headers(record, attempts: int, group_id: str, exception: str, reason: str,
                        kernel_name: str) -> list[tuple[str, bytes]]:
    """Where the record came from and why it failed, under the header names (and encodings) of
    Spring Kafka's DeadLetterPublishingRecoverer, which existing tools read, plus our own."""
    return [
        ("kafka_dlt-original-topic", record.topic.encode()),
        ("kafka_dlt-original-partition", record.partition.to_bytes(4, "big", signed=True)),
        ("kafka_dlt-original-offset", record.offset.to_bytes(8, "big", signed=True)),
        ("kafka_dlt-original-timestamp", record.timestamp.to_bytes(8, "big", signed=True)),
        ("kafka_dlt-original-timestamp-type", b"LogAppendTime" if record.timestamp_type == 1 else b"CreateTime"),
        ("kafka_dlt-original-consumer-group", group_id.encode()),
        ("kafka_dlt-exception-fqcn", exception.encode()),
        ("kafka_dlt-exception-message", reason.encode()),
        ("kernel-attempts", str(attempts).encode()),
        ("kernel-name", kernel_name.encode()),
    ]


class DeadLetterTopic:
    """KERNEL_DEAD_LETTER_TOPIC: where a message that will never succeed goes, with its origin and
    the reason in its headers, published through the kernel's producer."""

    def __init__(self, settings: KernelSettings, producer: AnyProducer, metrics: KernelMetrics,
                 health: HealthState | None = None, tracing: Tracing | None = None):
        self.topic = settings.dead_letter_topic
        self.group_id = settings.group_id
        self.kernel_name = settings.kernel_name
        self.producer = producer
        self.metrics = metrics
        self.health = health or HealthState(settings)  # /readyz says so while dead letters cannot be published
        self.tracing = tracing  # publishes each dead letter in a span of its message's trace, when set

    def publish(self, records: list, attempts: int, reason: str, exception: str) -> tuple[int, KafkaError | None]:
        """Publish `records` (all sent before any confirmation is awaited, so a batch's take one round
        trip) and wait for the broker to confirm them (acks=all); how many, from the first, it did, and
        why not the next. One too large for the producer or the topic goes without its value, and if
        still too large without its key too: both stay in its own topic."""
        futures = [self.send(record, attempts, reason, exception) for record in records]
        deadline_s = time.monotonic() + self.producer.timeout_s
        for published, (record, future) in enumerate(zip(records, futures, strict=True)):
            error = delivery_error(future, max(0.0, deadline_s - time.monotonic()))
            dropped = ()
            while (fewer := smaller(dropped, error)) is not None:
                dropped = fewer
                future = self.send(record, attempts, reason, exception, without=dropped)
                error = delivery_error(future, self.producer.timeout_s)
            if error is not None:
                self.not_published(record, error)
                return published, error
            self.published(record, reason, dropped)
        return len(records), None

    def published(self, record, reason: str, dropped: tuple[str, ...] = ()) -> None:
        """Say that the broker confirmed the dead letter of `record` (sent without the parts `dropped`)."""
        self.health.dead_letter_trouble = None
        self.metrics.dead_lettered.labels(record.topic).inc()
        without = " and ".join(f"its {part} of {describe_size(getattr(record, part))}" for part in dropped)
        kernel_log.error("Dead-lettered %s to %s%s: %s", coordinates(record), self.topic,
                         f" (without {without}, too large for the dead-letter topic: {coordinates(record)} still "
                         "holds it)" if dropped else "", reason, extra=log_fields(record))

    def not_published(self, record, error: KafkaError) -> None:
        """Say that the dead letter of `record` was not delivered: /readyz answers 503 until one is."""
        kernel_log.warning("Could not publish %s to the dead-letter topic %s (%r); it stays uncommitted and "
                           "is retried", coordinates(record), self.topic, error, extra=log_fields(record) | REPEATING)
        self.health.dead_letter_trouble = f"dead letters cannot be published to {self.topic}: {error!r}"
        self.metrics.dead_letter_failures.inc()

    def send(self, record, attempts: int, reason: str, exception: str, without: tuple[str, ...] = ()) -> Future:
        """Send the record with its origin and the reason (without its value, or key, when too large:
        header kernel-value-dropped or kernel-key-dropped gives its size). What the producer cannot send
        as it is is adapted: a null header value is sent empty, a record with neither key nor value gets
        an empty value. Whatever else goes wrong shows in the future: the message stays put, named,
        rather than crash-loop the kernel."""
        headers = producible_headers(record.headers) + dead_letter_headers(record, attempts, self.group_id,
                                                                           exception, reason, self.kernel_name)
        key, value = record.key, b"" if record.key is None and record.value is None else record.value
        for part in without:
            headers.append((f"kernel-{part}-dropped", str(len(getattr(record, part) or b"")).encode()))
        if "value" in without:
            value = b""
        if "key" in without:
            key = None
        try:
            with (self.tracing.dead_letter_span(record, self.topic, attempts, reason) if self.tracing
                  else contextlib.nullcontext()):
                return self.producer.send(self.topic, key, value, headers)
        except Exception as unexpected:
            return kafka.future.Future().failure(unexpected)


###############################################################################
# Processing ##################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class KernelHandler:
    """What the kernel calls: process_message(message) on each message, or process_batch(messages)
    on runs of one partition's messages."""

    function: Callable
    takes_batches: bool = False  # process_batch

    @property
    def name(self) -> str:
        return "process_batch" if self.takes_batches else "process_message"


class Consequence(enum.Enum):
    """How a task ended early, at the record after its finished ones."""

    RETRY = "retry"  # it returned False or raised RetryLater, or what it sent was not confirmed
    DEAD_LETTER = "dead letter"  # it raised DeadLetter
    FATAL = "fatal"  # it raised something else, or returned neither True nor False


@dataclasses.dataclass(frozen=True)
class TaskFailure:
    consequence: Consequence
    reason: str
    # FATAL: what stops the kernel. DEAD_LETTER: why the dead letter its worker sent was not delivered
    # (the loop retries the record later, as when it cannot publish one itself).
    error: BaseException | None = None
    batch_size: int | None = None  # process_batch: how many records from the failed one go together
    exception: str = "DeadLetter"  # for Consequence.DEAD_LETTER: what the dead letter says it was
    delay_s: float | None = None  # RetryLater: the wait it asked for (None: the backoff)


@dataclasses.dataclass(eq=False, slots=True)
class LaneTask:
    """Records of one or more lanes of a partition handed to a worker thread, processed one after
    another: each lane's in offset order, lane after lane (its part is records[lane.start:lane.end]).

    The loop hands it out and the worker hands back a TaskOutcome; while it runs, the worker says
    how far it got in `progress`, one value written whole, which the loop reads to commit and to
    watch for slow messages. The loop sets `cancelled` to have the worker stop after the message in
    hand (a revocation, a shutdown)."""

    partition: TopicPartition
    lanes: list[Lane]
    records: list
    # (finished, started_s): records[:finished] are done (returned True with what they sent confirmed, or
    # dead-lettered), and the one in hand started at time.monotonic() started_s (0.0: none yet).
    progress: tuple[int, float] = (0, 0.0)
    warned_slow: int = -1  # the `finished` index a slowness warning was logged for (the loop's)
    cancelled: bool = False

    def attempt(self, record) -> int:
        """Which attempt at `record` this is: its lane keeps the count of a retried one while the task runs."""
        return max((lane.attempt(record.offset) for lane in self.lanes), default=1)


class TaskOutcome:
    """What a worker did with a task, made once it is done with it, handed back whole, never changed."""

    __slots__ = ("task", "finished", "failure", "seconds")  # a dataclass takes longer to make: it is once a task

    def __init__(self, task: LaneTask, finished: int, failure: TaskFailure | None = None, seconds: float = 0.0):
        self.task = task
        self.finished = finished  # task.records[:finished] are done
        self.failure = failure  # why records[finished] did not finish (None: all did, or it was cancelled)
        self.seconds = seconds  # how long the handler took over it (not the wait for its sends to be confirmed)


def start_sends(producer: AnyProducer | None) -> list[Future]:
    """From now until current_call.sends is None again, send() on this worker thread goes to
    `producer`, and its futures into the list returned, for the caller to take after each call. (Not
    a context manager: that costs a microsecond a task, and with many keys a task can be a message or two.)"""
    sends = current_call.sends = []
    current_call.producer = producer
    return sends


def fatal_failure(handler_name: str, records: list, error: BaseException) -> TaskFailure:
    """The kernel stops (exit 1) with MessageFailed, caused by `error`, which the handler raised on
    `records` or which says what it returned instead of True or False."""
    failed = MessageFailed(handler_name, records)
    failed.__cause__ = error  # as `raise failed from error` would
    return TaskFailure(Consequence.FATAL, str(failed), failed)


def failure_raised(handler_name: str, records: list, error: BaseException) -> TaskFailure:
    """What happens to `records` when the handler raised `error` on them: dead-lettered for
    DeadLetter, retried for RetryLater; for anything else (SystemExit and KeyboardInterrupt too) the
    kernel stops with exit code 1."""
    if isinstance(error, DeadLetter):
        return TaskFailure(Consequence.DEAD_LETTER, str(error) or f"{handler_name} raised DeadLetter",
                           batch_size=1 if handler_name == "process_batch" else None)
    if isinstance(error, RetryLater):
        return TaskFailure(Consequence.RETRY, str(error) or f"{handler_name} raised RetryLater",
                           batch_size=len(records) if handler_name == "process_batch" else None, delay_s=error.seconds)
    return fatal_failure(handler_name, records, error)


def failure_returned(handler_name: str, records: list, result) -> TaskFailure:
    """What happens to `records` when the handler returned `result`, which is not True."""
    if result is False:
        return TaskFailure(Consequence.RETRY, f"{handler_name} returned False",
                           batch_size=len(records) if handler_name == "process_batch" else None)
    return fatal_failure(handler_name, records, TypeError(f"{handler_name} must return True or False, got {result!r}"))


def undecodable(record: UndecodableRecord, batch_size: int | None = None) -> TaskFailure:
    """A record the client could not decode: dead-lettered, never handed to the handler."""
    return TaskFailure(Consequence.DEAD_LETTER, record.undecodable, batch_size=batch_size,
                       exception="CorruptRecordError")


class DeadLetterSent(list):
    """Among a task's unconfirmed sends, in the place of a record's: its dead letter, which its worker
    sent before going on, so that a topic whose messages all fail goes at the pace of sends, not of a
    round trip each. Too large, it goes again without its value, then without its key too, as
    DeadLetterTopic.publish sends one; confirmed, the record is done; not, it is retried later."""

    __slots__ = ("dead_letters", "record", "failure", "attempts", "dropped")

    def __init__(self, dead_letters: DeadLetterTopic, record, failure: TaskFailure, attempts: int):
        self.dead_letters, self.record, self.failure, self.attempts = dead_letters, record, failure, attempts
        self.dropped: tuple[str, ...] = ()
        super().__init__((self.send(),))

    def send(self) -> Future:
        return self.dead_letters.send(self.record, self.attempts, self.failure.reason, self.failure.exception,
                                      self.dropped)

    def sent_smaller(self, error: KafkaError) -> bool:
        """Whether, refused as too large, it went again without one more of its parts."""
        if (fewer := smaller(self.dropped, error)) is None:
            return False
        self.dropped = fewer
        self[0] = self.send()
        return True

    def confirmed(self) -> None:
        self.dead_letters.published(self.record, self.failure.reason, self.dropped)

    def not_confirmed(self, error: KafkaError) -> TaskFailure:
        """The record is retried later, as when the loop cannot publish a dead letter (FailurePolicy)."""
        self.dead_letters.not_published(self.record, error)
        return dataclasses.replace(self.failure, error=error)


def confirm_sends(task: LaneTask, unconfirmed: deque, finished: int,
                  timeout_s: float) -> tuple[int, TaskFailure | None]:
    """Advance `finished` over the records whose sends the broker confirmed, in order; with a zero
    timeout only as far as confirmations have already arrived, else waiting, each step published in
    task.progress for the loop to commit. A failed send stops the advance at its record, which is then
    tried again (the failure returned): its outputs may be sent twice, never lost. A dead letter refused
    as too large goes again smaller first, waited for as long as the first."""
    deadline_s = time.monotonic() + timeout_s if timeout_s else 0.0
    while unconfirmed:
        for future in unconfirmed[0]:  # once per message sent: checked inline, waited for only when it must
            if future.is_done:
                error = future.exception
            elif timeout_s:
                error = delivery_error(future, max(0.0, deadline_s - time.monotonic()))
            else:
                return finished, None
            if error is not None:
                break
        else:  # every send of the record confirmed (or it sent nothing)
            if type(sent := unconfirmed.popleft()) is DeadLetterSent:
                sent.confirmed()
            finished += 1
            if timeout_s:
                task.progress = (finished, task.progress[1])
            continue
        if type(sent := unconfirmed[0]) is not DeadLetterSent or not sent.sent_smaller(error):
            return finished, given_up(task, unconfirmed, finished, error, deadline_s)
        if timeout_s:
            deadline_s = time.monotonic() + timeout_s
    return finished, None


def given_up(task: LaneTask, unconfirmed: deque, finished: int, error: KafkaError, deadline_s: float) -> TaskFailure:
    """Why records[finished], the first of `unconfirmed`, is not finished: a send of it failed, or its
    dead letter. The records after it are processed again: what they sent may go twice, and so may
    their dead letters, each said if confirmed by `deadline_s` (0.0: within the delivery timeout)."""
    failed = unconfirmed.popleft()
    if later := [sent for sent in unconfirmed if type(sent) is DeadLetterSent]:
        deadline_s = deadline_s or time.monotonic() + later[0].dead_letters.producer.timeout_s
        for sent in later:
            if delivery_error(sent[0], max(0.0, deadline_s - time.monotonic())) is None:
                sent.confirmed()
    unconfirmed.clear()
    if type(failed) is DeadLetterSent:
        return failed.not_confirmed(error)
    return undelivered(task.records[finished:finished + 1], error, "process_message", None)


def undelivered(records: list, error: KafkaError, handler_name: str, batch_size: int | None) -> TaskFailure:
    """What `records` sent was not confirmed: they are processed again (together, as a batch of
    `batch_size`, with process_batch), after a backoff; or, when what they sent is too large ever to be
    delivered, dead-lettered saying so."""
    if isinstance(error, SIZE_ERRORS):
        return TaskFailure(Consequence.DEAD_LETTER, f"a message it sent is too large to be delivered ({error!r}): "
                           "raise the topic's max.message.bytes or KAFKA_FETCH_MAX_BYTES (the producer's limit), or "
                           "send less", batch_size=batch_size)
    kernel_log.warning("A message %s sent for %s was not delivered (%r); it is processed again", handler_name,
                       batch_coordinates(records), error, extra=log_fields(records[0]) | REPEATING)
    return TaskFailure(Consequence.RETRY, f"a message it sent was not delivered ({error!r})",
                       batch_size=batch_size)


def process_task(task: LaneTask, handler: Callable, stop: StopSignal, producer: AnyProducer | None = None,
                 metrics: KernelMetrics | None = None, dead_letters: DeadLetterTopic | None = None) -> TaskOutcome:
    """Call process_message on each record of `task` until one is not done (on a worker thread, and in
    tests/kit.py's call()); what came of it. A record is finished once the broker confirmed what its call
    sent, or its dead letter (sent here with `dead_letters`): seen without waiting as the records go by,
    waited for when the task ends. The innermost loop, which every kernel pays for: it looks nothing up twice."""
    if metrics is not None:
        handler = measured(handler, metrics.calls.tally(task.partition.topic))
    unconfirmed: deque[list[Future]] = deque()  # sends (or dead letter) of each record after records[finished]
    monotonic, finished, failure = time.monotonic, 0, None
    sends = start_sends(producer)
    began_s = monotonic()
    try:
        for record in task.records:
            if task.cancelled or stop.requested:
                break
            task.progress = (finished, monotonic())
            if type(record) is UndecodableRecord:
                failure = undecodable(record)
                break
            try:
                result = handler(record)
            except BaseException as error:
                failure = failure_raised("process_message", [record], error)
                if dead_letters is None or failure.consequence is not Consequence.DEAD_LETTER:
                    break
                sends.clear()  # what it sent is not awaited: it is dead-lettered
                unconfirmed.append(DeadLetterSent(dead_letters, record, failure, task.attempt(record)))
            else:
                if result is not True:  # what it sent is not awaited: it is retried or dead-lettered anyway
                    failure = failure_returned("process_message", [record], result)
                    break
                if not (sends or unconfirmed):  # it sent nothing, and no earlier record's sends are unconfirmed
                    finished += 1
                    continue
                unconfirmed.append(sends.copy())
                sends.clear()
            finished, failure = confirm_sends(task, unconfirmed, finished, timeout_s=0)
            if failure:
                break
    finally:
        current_call.sends = None
    seconds = monotonic() - began_s  # what the handler took: the wait below says nothing of it
    finished, failure = confirm_the_rest(task, unconfirmed, finished, failure, producer)
    return TaskOutcome(task, finished, failure, seconds)


def confirm_the_rest(task: LaneTask, unconfirmed: deque, finished: int, failure: TaskFailure | None,
                     producer: AnyProducer | None) -> tuple[int, TaskFailure | None]:
    """At the end of a task, wait for its sends still unconfirmed: how far it finished, and why not
    further. A send of an earlier record that failed comes first, before any failure but a fatal one."""
    if not unconfirmed:
        return finished, failure
    finished, unsent = confirm_sends(task, unconfirmed, finished, producer.timeout_s if producer else 0)
    if unsent and not (failure and failure.consequence is Consequence.FATAL):
        return finished, unsent
    return finished, failure


def measured(handler: Callable, tally: list) -> Callable:
    """`handler` timing each call, and counting those that return True, in this thread's `tally` of
    HandlerTallies, for /metrics."""
    count_call, monotonic, processed = HandlerTallies.count_call, time.monotonic, HandlerTallies.PROCESSED

    def measured_handler(record):
        started_s = monotonic()
        try:
            result = handler(record)
        finally:
            count_call(tally, monotonic() - started_s)
        if result is True:
            tally[processed] += 1
        return result

    return measured_handler


def process_batch_task(task: LaneTask, handler: Callable, stop: StopSignal, producer: AnyProducer | None = None,
                       metrics: KernelMetrics | None = None) -> TaskOutcome:
    """Call process_batch on the task's records, once (on a worker thread); what came of it. Those it
    says are done count as finished once the broker has confirmed what the call sent. The one path of
    a batch: the workers take it, and tests/kit.py's call_batch() too."""
    if task.cancelled or stop.requested:
        return TaskOutcome(task, 0)
    started_s = time.monotonic()
    task.progress = (0, started_s)
    # A record the client could not decode ends the batch before it; alone, it is dead-lettered.
    records = next((task.records[:i] for i, record in enumerate(task.records) if type(record) is UndecodableRecord),
                   task.records)
    if not records:
        return TaskOutcome(task, 0, undecodable(task.records[0], batch_size=1))
    try:
        done, sends, failure = process_as_batch(handler, records, producer)
    finally:
        if metrics is not None:
            HandlerTallies.count_call(metrics.calls.tally(task.partition.topic), time.monotonic() - started_s)
    error = first_delivery_error(sends, producer.timeout_s if producer else 0)
    if error is not None:
        return TaskOutcome(task, 0, undelivered(records, error, "process_batch", len(records)))
    if metrics is not None:
        metrics.calls.tally(task.partition.topic)[HandlerTallies.PROCESSED] += done
        metrics.batch_sizes.labels(task.partition.topic).observe(len(records))
    return TaskOutcome(task, done, failure)


def process_as_batch(handler: Callable, records: list,
                     producer: AnyProducer | None) -> tuple[int, list[Future], TaskFailure | None]:
    """Call process_batch on `records`: how many of them, from the first, count as done once the
    sends it made (also returned) are confirmed, and what happens to the others. True, all done;
    False (or RetryLater), the batch is tried again as it is; DeadLetter naming one of them, those
    before it are done and it is dead-lettered."""
    sends = start_sends(producer)
    try:  # a list of its own: a handler that filters or sorts it in place changes nothing of the kernel's
        result = handler(list(records))
    except BaseException as error:
        if not isinstance(error, DeadLetter):
            return 0, [], failure_raised("process_batch", records, error)
        index = next((i for i, record in enumerate(records) if record is error.message), None)
        if index is None:
            return 0, [], fatal_failure("process_batch", records, TypeError(
                "DeadLetter from process_batch must name one of its messages: DeadLetter(reason, message=messages[i])"))
        return index, sends, failure_raised("process_batch", records, error)
    finally:
        current_call.sends = None
    if result is True:
        return len(records), sends, None
    return 0, [], failure_returned("process_batch", records, result)


def first_delivery_error(sends: list[Future], timeout_s: float) -> KafkaError | None:
    """Wait up to `timeout_s` in all for the broker to confirm `sends`; the first error, if any."""
    deadline_s = time.monotonic() + timeout_s
    for future in sends:
        if (error := delivery_error(future, max(0.0, deadline_s - time.monotonic()))) is not None:
            return error
    return None


class WorkerPool:
    """KERNEL_CONCURRENCY threads that process the tasks they are given and hand back what came of
    each, a TaskOutcome, through one queue: the one point where a task passes back to the loop."""

    def __init__(self, count: int, name: str, process: Callable[[LaneTask], TaskOutcome]):
        self.count = count
        self.given: queue.SimpleQueue[LaneTask | None] = queue.SimpleQueue()  # None stops a worker
        self.handed_back: queue.SimpleQueue[TaskOutcome] = queue.SimpleQueue()
        self.back_early: deque[TaskOutcome] = deque()  # handed back while the loop waited for others; taken first
        for number in range(count):
            try:
                threading.Thread(target=self.work, args=(process,), daemon=True, name=f"{name}-{number}").start()
            except RuntimeError as error:  # "can't start new thread": a memory or thread limit
                raise ConfigError(f"KERNEL_CONCURRENCY={count}: worker thread {number + 1} could not start ({error}): "
                                  "lower it, or raise the container's memory (or thread) limit") from None

    def work(self, process: Callable[[LaneTask], TaskOutcome]) -> None:
        while (task := self.given.get()) is not None:
            try:
                outcome = process(task)
            except BaseException as error:  # a fault of the kernel's own: reported to the loop, which stops
                outcome = TaskOutcome(task, task.progress[0], TaskFailure(Consequence.FATAL, str(error), error))
            self.handed_back.put(outcome)

    def give(self, task: LaneTask) -> None:
        self.given.put(task)

    def next_back(self, timeout_s: float) -> TaskOutcome | None:
        """The next task handed back, waiting up to `timeout_s` for one; None if none came."""
        if self.back_early:
            return self.back_early.popleft()
        try:
            return self.handed_back.get(timeout=timeout_s) if timeout_s > 0 else self.handed_back.get_nowait()
        except queue.Empty:
            return None

    def wait_for(self, tasks: set[LaneTask], deadline_s: float) -> list[TaskOutcome]:
        """Wait until `tasks` are handed back or the deadline passes; what came of those that came
        back. Other tasks handed back meanwhile are kept in back_early, for next_back."""
        waiting = set(tasks)
        back = [outcome for outcome in self.back_early if outcome.task in waiting]
        self.back_early = deque(outcome for outcome in self.back_early if outcome.task not in waiting)
        waiting.difference_update(outcome.task for outcome in back)
        while waiting and (timeout_s := deadline_s - time.monotonic()) > 0:
            try:
                outcome = self.handed_back.get(timeout=timeout_s)
            except queue.Empty:
                break
            if outcome.task in waiting:
                waiting.discard(outcome.task)
                back.append(outcome)
            else:
                self.back_early.append(outcome)
        return back

    def stop(self) -> None:
        for _ in range(self.count):
            self.given.put(None)


###############################################################################
# Bookkeeping #################################################################
###############################################################################


@dataclasses.dataclass
class PendingRetry:
    """The first record of a lane is to be tried again at `due_s`."""

    offset: int
    attempts: int  # made so far
    due_s: float  # time.monotonic() of the next attempt
    batch_size: int | None = None  # process_batch: the records tried again together, from the first


@dataclasses.dataclass(eq=False, slots=True)
class Lane:
    """Records processed strictly one after another: those of one key in a partition, or of the
    whole partition. At most one task of a lane is in flight, which is what keeps the order."""

    partition: TopicPartition
    key: bytes | None
    records: list = dataclasses.field(default_factory=list)  # fetched, waiting for their turn
    task: LaneTask | None = None  # handed to a worker
    retry: PendingRetry | None = None  # records[0] failed and waits for its next attempt
    # When its oldest waiting record arrived: a batch that is not full waits for more until then plus
    # KERNEL_BATCH_MAX_WAIT_MS. 0.0 for records put back after a task: they have waited already.
    waiting_since_s: float | None = None
    start: int = 0  # while in flight, its records are task.records[start:end]
    end: int = 0

    def attempt(self, offset: int) -> int:
        """Which attempt at its record at `offset` this is, or was if it just failed: a retried record's
        count goes on, any other's is 1."""
        retry = self.retry
        return retry.attempts + 1 if retry is not None and retry.offset == offset else 1


RECORD_OVERHEAD_BYTES = 350  # what a fetched record holds besides its key, value and headers (tracemalloc)
HEADER_OVERHEAD_BYTES = 150  # and each of its headers besides its name and value


def memory_cost(records) -> int:
    """About what fetched records hold in memory: the sizes of their keys, values and headers, as the
    client counted them while decoding (-1 for none), and the objects around them. Counted when they
    are fetched, and again when they finish: a sum over records, so the two always match."""
    cost = RECORD_OVERHEAD_BYTES * len(records)
    for record in records:
        cost += record.serialized_key_size + record.serialized_value_size
        if record.headers:
            cost += record.serialized_header_size + HEADER_OVERHEAD_BYTES * len(record.headers)
    return cost


@dataclasses.dataclass
class PartitionState:
    lanes: dict[bytes | None, Lane] = dataclasses.field(default_factory=dict)
    # The lanes that may hold something: each lane that gets records while it holds none (and has no
    # task) is put here, and stays until the commit finds it holding nothing. So the commit looks at
    # these instead of every lane kept for its key.
    active: dict[Lane, None] = dataclasses.field(default_factory=dict)
    unfinished: int = 0  # fetched records not finished yet
    unfinished_bytes: int = 0  # what they hold in memory (memory_cost)
    fetched_bytes: int = 0  # what its last poll brought (memory_cost); 0 before the first
    fetched_end: int | None = None  # offset after the last fetched record
    committed: int | None = None  # the last offset this kernel committed

    def add_unfinished(self, count: int, nbytes: int) -> None:
        self.unfinished += count
        self.unfinished_bytes += nbytes

    def drop_unfinished(self, count: int, nbytes: int) -> None:
        self.unfinished -= count
        self.unfinished_bytes -= nbytes

    def next_commit(self) -> int | None:
        """The end of the longest finished prefix: never past an unfinished or failed message."""
        first = self.fetched_end  # every unfinished offset lies before it
        idle = []
        for lane in self.active:  # each lane's first unfinished: its task's, else its first waiting
            task = lane.task
            if task is not None and (finished := task.progress[0]) < lane.end:
                offset = task.records[finished if finished > lane.start else lane.start].offset
            elif lane.records:
                offset = lane.records[0].offset
            else:
                if task is None:
                    idle.append(lane)
                continue
            if offset < first:
                first = offset
        for lane in idle:
            del self.active[lane]
        return first


# Lanes that hold nothing are kept for their key's next records (with many keys, a lane made and
# dropped for each task cost a tenth of a no-op message), about 200 bytes each: dropped once there are
# this many lanes in all, or twice as many as hold something.
IDLE_LANES_KEPT = 8192
# At most TASKS_PER_WORKER tasks per worker are in flight (with process_message); lanes queued meanwhile
# wait for a place. While the handler is quick (recent tasks took under QUICK_MESSAGE_S a message), the
# lanes queued are shared among the places free, several a task: a task costs the loop a few
# microseconds, as much as a no-op message, a poll can bring hundreds of keys, and a task that sent
# something waits once for their confirmation (handed out as they came back, lanes made tasks of three or
# four records, and forwarding at concurrency 2 ran at a fifth of concurrency 1). A message then holds up
# only the lanes after it in its task, and by little; a failed one hands them back. A slower handler
# gains nothing from it: its tasks take one lane each, so a slow message holds up no other key.
TASKS_PER_WORKER = 4
QUICK_MESSAGE_S = 0.0001


class Ledger:
    """What the kernel holds of each assigned partition: its fetched records sorted into lanes, the
    tasks out on the workers, the retries waiting, and how far each partition may be committed.

    Pure bookkeeping: no consumer, no threads, and the time comes from the caller, so a unit test
    drives it directly. Each count is kept in one place, the partition's state."""

    def __init__(self, keyed: bool, batch_policy: BatchPolicy | None = None, workers: int = 1):
        self.keyed = keyed  # one lane per key (KERNEL_ORDERING=key above concurrency 1), else per partition
        self.batch_policy = batch_policy  # process_batch: tasks of up to its max_messages, after waiting for more
        self.tasks_wanted = TASKS_PER_WORKER * workers  # in flight at most (process_batch's are not counted)
        self.message_s = QUICK_MESSAGE_S  # what a message took lately (a moving average over tasks)
        self.partitions: dict[TopicPartition, PartitionState] = {}  # the assigned ones
        self.queued: dict[Lane, None] = {}  # lanes with records and nothing in flight or waiting, in order
        self.retrying: set[Lane] = set()  # lanes waiting for a retry to be due
        self.in_flight: set[LaneTask] = set()
        self.lanes = 0  # in all the partitions
        self.lanes_kept = IDLE_LANES_KEPT  # past this many, drop_idle_lanes()

    @property
    def unfinished(self) -> int:
        return sum(state.unfinished for state in self.partitions.values())

    @property
    def waiting_for_places(self) -> bool:
        """Whether lanes wait for a task to come back (their batches aside, which may wait for more)."""
        return bool(self.queued) and self.batch_policy is None

    @property
    def unfinished_bytes(self) -> int:
        return sum(state.unfinished_bytes for state in self.partitions.values())

    def assign(self, partitions: set[TopicPartition]) -> None:
        for partition in partitions:
            self.partitions.setdefault(partition, PartitionState())

    def add(self, partition: TopicPartition, records: list, now_s: float = 0.0) -> int:
        """Sort polled records into their lanes; ignored if the partition was revoked meanwhile. The
        memory they hold (memory_cost), 0 if ignored."""
        state = self.partitions.get(partition)
        if state is None:
            return 0
        if state.fetched_end is None:  # where the group's committed offset (or the reset) put us
            state.committed = records[0].offset
        state.fetched_end = records[-1].offset + 1
        # A lane that held nothing is queued for a task, and active. (One that holds some is queued
        # already, or in flight, or waits for a retry.)
        lanes, queued, active = state.lanes, self.queued, state.active
        if self.keyed:  # one record at a time, inline: a poll brings hundreds of keys of a few records each
            for record in records:
                if (lane := lanes.get(record.key)) is None:
                    lane = self.new_lane(partition, state, record.key)
                if not lane.records and lane.task is None:
                    queued[lane] = active[lane] = None
                lane.records.append(record)
        else:
            if (lane := lanes.get(None)) is None:
                lane = self.new_lane(partition, state, None)
            if not lane.records and lane.task is None:
                queued[lane] = active[lane] = None
            lane.records += records
            if lane.waiting_since_s is None:
                lane.waiting_since_s = now_s
        state.fetched_bytes = memory_cost(records)
        state.add_unfinished(len(records), state.fetched_bytes)
        return state.fetched_bytes

    def new_lane(self, partition: TopicPartition, state: PartitionState, key: bytes | None) -> Lane:
        if self.lanes >= self.lanes_kept:
            self.drop_idle_lanes()
        lane = state.lanes[key] = Lane(partition, key)
        self.lanes += 1
        return lane

    def drop_idle_lanes(self) -> None:
        """Drop the lanes that hold nothing; next time when there are twice as many lanes as now
        hold something (at least IDLE_LANES_KEPT), so the search costs little per lane made."""
        for state in self.partitions.values():
            for key in [key for key, lane in state.lanes.items() if not (lane.records or lane.task)]:
                state.active.pop(state.lanes.pop(key), None)  # in place: add() holds the dicts
        self.lanes = sum(len(state.lanes) for state in self.partitions.values())
        self.lanes_kept = max(IDLE_LANES_KEPT, 2 * self.lanes)

    def start_tasks(self, now_s: float) -> list[LaneTask]:
        """Tasks for the lanes that are queued (with process_batch, whose batch is full or has waited
        long enough), or whose retry is due by `now_s`; now in flight. With process_message, as many as there
        are places (tasks_wanted in flight at most), the other lanes staying queued; a task takes one lane,
        or while the handler is quick, its share of the lanes queued, several of a partition, lane after lane."""
        for lane in [lane for lane in self.retrying if lane.retry.due_s <= now_s]:
            self.retrying.discard(lane)
            self.queued[lane] = None
        if self.batch_policy is not None:
            return self.start_batches(now_s)
        if (places := self.tasks_wanted - len(self.in_flight)) <= 0:
            return []
        tasks, task = [], None
        lanes_per_task = -(-len(self.queued) // places) if self.message_s < QUICK_MESSAGE_S else 1
        for lane in self.queued:
            if task is None or len(task.lanes) == lanes_per_task or lane.partition != task.partition:
                if len(tasks) == places:
                    break
                task = LaneTask(lane.partition, [], [])
                tasks.append(task)
            task.lanes.append(lane)
            lane.task, lane.start = task, len(task.records)
            task.records += lane.records
            lane.end = len(task.records)
            lane.records = []
        self.in_flight.update(tasks)
        if (taken := sum(len(task.lanes) for task in tasks)) == len(self.queued):
            self.queued.clear()
        else:  # the first `taken` went out, in order; the others wait for a place
            for lane in list(itertools.islice(self.queued, taken)):
                del self.queued[lane]
        return tasks

    def start_batches(self, now_s: float) -> list[LaneTask]:
        """With process_batch: a task of up to batch_policy.max_messages records for each queued lane
        whose batch is full or has waited batch_policy.max_wait_s, and of a retried batch's records again."""
        tasks, policy = [], self.batch_policy
        for lane in list(self.queued):
            if lane.retry is not None:  # the same batch again
                size = lane.retry.batch_size
            elif len(lane.records) >= policy.max_messages or now_s >= lane.waiting_since_s + policy.max_wait_s:
                size = min(len(lane.records), policy.max_messages)
            else:
                continue  # not full, and may wait for more
            del self.queued[lane]
            records = lane.records[:size]
            del lane.records[:size]
            lane.task, lane.start, lane.end = LaneTask(lane.partition, [lane], records), 0, size
            if not lane.records:
                lane.waiting_since_s = None
            tasks.append(lane.task)
        self.in_flight.update(tasks)
        return tasks

    def next_batch_due_s(self) -> float | None:
        """When the oldest batch that is not full has waited long enough to be handed out."""
        if self.batch_policy is None:
            return None
        return min((lane.waiting_since_s + self.batch_policy.max_wait_s for lane in self.queued), default=None)

    def take_back(self, outcome: TaskOutcome) -> Lane | None:
        """A task came back: its finished records are done, the others go back to the head of their
        lanes. The lane of the first record not finished is returned, for its failure to be applied and
        then requeued; the task's other lanes are requeued here. None if every record finished, or if
        the partition was revoked meanwhile."""
        task, finished = outcome.task, outcome.finished
        self.in_flight.discard(task)
        for lane in task.lanes:
            lane.task = None
        # What its messages took: those it finished, and the one that failed. (One cancelled before it
        # started, by a revocation, says nothing of the handler.)
        if outcome.seconds and (attempted := finished + (outcome.failure is not None)):
            self.message_s += (outcome.seconds / attempted - self.message_s) / 8
        first = task.lanes[0]
        state = self.partitions.get(task.partition)
        if state is None or state.lanes.get(first.key) is not first:
            return None
        unfinished_lane = None
        state.drop_unfinished(finished, memory_cost(task.records if finished == len(task.records)
                                                    else task.records[:finished]))
        for lane in task.lanes:
            if finished > lane.start and lane.retry is not None:  # the retried message is done (or dead-lettered)
                lane.retry = None
            if finished < lane.end:  # some of its records go back
                lane.records[:0] = task.records[max(finished, lane.start):lane.end]
                lane.waiting_since_s = 0.0  # they have waited already: the next batch need not wait for more
                if unfinished_lane is None:
                    unfinished_lane = lane
                    continue
            self.requeue(lane)
        return unfinished_lane

    def retry_later(self, lane: Lane, attempts: int, due_s: float, batch_size: int | None = None) -> None:
        lane.retry = PendingRetry(lane.records[0].offset, attempts, due_s, batch_size)
        self.retrying.add(lane)

    def pass_first(self, lane: Lane) -> None:
        """The lane's first record is dealt with without finishing (it was dead-lettered)."""
        self.partitions[lane.partition].drop_unfinished(1, memory_cost((lane.records.pop(0),)))
        lane.retry = None

    def requeue(self, lane: Lane) -> None:
        """The lane has nothing in flight: queued if it has records and no retry pending."""
        if lane.records and lane not in self.retrying:
            self.queued[lane] = None
        elif not lane.records:  # idle, kept for its key: as a new lane
            lane.waiting_since_s = None

    def tasks_of(self, partitions: set[TopicPartition]) -> set[LaneTask]:
        return {task for task in self.in_flight if task.partition in partitions}

    def next_retry_due_s(self) -> float | None:
        return min((lane.retry.due_s for lane in self.retrying), default=None)

    def commits_due(self, partitions: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Each partition's finished prefix where it moved past the last commit."""
        due = {}
        for tp, state in self.partitions.items():
            offset = state.next_commit()
            if (partitions is None or tp in partitions) and offset is not None and offset != state.committed:
                due[tp] = offset
        return due

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self.partitions:
                self.partitions[tp].committed = offset

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Revoked: drop the partitions' records, lanes and retries; their tasks in flight are
        ignored when they come back."""
        for partition in partitions:
            state = self.partitions.pop(partition, None)
            for lane in state.lanes.values() if state is not None else ():
                self.queued.pop(lane, None)
                self.retrying.discard(lane)
            self.lanes -= len(state.lanes) if state is not None else 0


###############################################################################
# The consumer loop ###########################################################
###############################################################################

POLL_TIMEOUT_MS = 1000  # bounds how long a stop request waits for poll() to return
KEEPALIVE_INTERVAL_S = 1.0  # while every worker is busy, the group membership is renewed this often
BUSY_POLL_TIMEOUT_MS = 10  # poll() timeout while workers are busy: how soon their results are seen
COMMIT_INTERVAL_S = 0.1  # while workers are busy, finished prefixes are committed this often
LAG_REFRESH_S = 5.0  # how often kernel_consumer_lag is brought up to date
TOPIC_CHECK_INTERVAL_S = 1.0  # how often the loop looks again for a topic of KAFKA_TOPIC that does not exist
MIN_PARTITION_FETCH_BYTES = 16_384  # the least a fetch may bring of one partition, however many there are
FETCH_TURN_S = 1.0  # how long partitions fetch before those waiting for the memory budget go first


class FailurePolicy:
    """What happens to a message that failed: it is tried again after a backoff (RetryPolicy) or the wait
    RetryLater asked for, or goes to the dead-letter topic once it raised DeadLetter or used up
    KERNEL_MAX_ATTEMPTS."""

    def __init__(self, settings: KernelSettings, ledger: Ledger, dead_letters: DeadLetterTopic | None,
                 metrics: KernelMetrics):
        self.retry = settings.retry
        self.group_id = settings.group_id
        self.ledger = ledger
        self.dead_letters = dead_letters
        self.metrics = metrics

    def apply(self, lane: Lane, failure: TaskFailure) -> None:
        """The lane's first record (with process_batch, its first failure.batch_size records) failed:
        dead-letter it (each of them), or schedule the next attempt."""
        failed = list(itertools.islice(lane.records, failure.batch_size or 1))
        attempts, reason = lane.attempt(failed[0].offset), failure.reason
        dead = failure.consequence is Consequence.DEAD_LETTER
        if not dead and self.retry.exhausted(attempts):
            reason, dead = f"{reason} on all {attempts} attempts (KERNEL_MAX_ATTEMPTS)", True
        if dead:
            if self.dead_letters is None:
                others = f" (and the other {len(failed) - 1} messages of its batch)" if len(failed) > 1 else ""
                raise NoDeadLetterTopic(failed[0], reason + others, self.way_on(failed[0]))
            exception = failure.exception if failure.consequence is Consequence.DEAD_LETTER else "RetriesExhausted"
            published, error = ((0, failure.error) if failure.error is not None
                                else self.dead_letters.publish(failed, attempts, reason, exception))
            for _ in range(published):
                self.ledger.pass_first(lane)
            if published == len(failed):
                return
            failed, reason = failed[published:], f"it could not be dead-lettered ({error!r})"
        self.metrics.retried.labels(failed[0].topic).inc(len(failed))
        delay_s = self.retry.delay_s(attempts, failure.delay_s)
        # with process_batch: what is tried again together
        batch_size = None if failure.batch_size is None else len(failed)
        self.ledger.retry_later(lane, attempts, time.monotonic() + delay_s, batch_size)
        capped = (f" (RetryLater asked for {failure.delay_s:.1f} s: capped at KERNEL_RETRY_MAX_MS)"
                  if failure.delay_s is not None and failure.delay_s > delay_s else "")
        kernel_log.warning("%s for %s (attempt %d); retrying in %.1f s%s", reason, batch_coordinates(failed), attempts,
                           delay_s, capped, extra=log_fields(failed[0]))

    def way_on(self, record) -> str:
        """For a record the client cannot decode, which no restart mends: how to go on without it."""
        if type(record) is not UndecodableRecord:
            return ""
        return (f". To go on, set KERNEL_DEAD_LETTER_TOPIC, or skip it: with every kernel of the group stopped, "
                f"kafka-consumer-groups.sh --bootstrap-server BROKER --group {self.group_id} --topic "
                f"{record.topic}:{record.partition} --reset-offsets --to-offset {record.offset + 1} --execute")


class Watchdog:
    """What the loop reports about itself besides its metrics: once a second, when the
    longest-running message started (for /healthz) and a warning for one that runs long; every few
    seconds, each partition's lag."""

    def __init__(self, settings: KernelSettings, ledger: Ledger, health: HealthState, metrics: KernelMetrics,
                 kernel_handler: KernelHandler):
        self.kernel_handler = kernel_handler
        self.max_poll_interval_ms = settings.max_poll_interval_ms
        self.ledger = ledger
        self.health = health
        self.metrics = metrics
        self.last_slow_check_s = self.last_lag_s = 0.0

    def watch_in_flight(self) -> None:
        now = time.monotonic()
        if now - self.last_slow_check_s < KEEPALIVE_INTERVAL_S:
            return
        self.last_slow_check_s = now
        running = []  # (task, finished, started_s) of those with a message in hand
        for task in self.ledger.in_flight:
            finished, started_s = task.progress
            if started_s and finished < len(task.records):
                running.append((task, finished, started_s))
        self.health.busy_since_s = min((started_s for _, _, started_s in running), default=None)
        for task, finished, started_s in running:
            if task.warned_slow != finished and now - started_s > self.max_poll_interval_ms / 2000:
                task.warned_slow = finished
                in_hand = task.records[finished:] if self.kernel_handler.takes_batches else [task.records[finished]]
                kernel_log.warning(
                    "%s has been running for %.0f s on %s: a rebalance waits for it at most "
                    "KAFKA_MAX_POLL_INTERVAL_MS (%d ms) before the group moves its partitions on",
                    self.kernel_handler.name, now - started_s, batch_coordinates(in_hand), self.max_poll_interval_ms,
                    extra=log_fields(in_hand[0]),
                )

    def refresh_lag(self, consumer: KafkaConsumer) -> None:
        """End offset (the high watermark the last fetch reported) minus the committed offset, per
        partition. Both are known locally: no request to the broker."""
        now = time.monotonic()
        if now - self.last_lag_s < LAG_REFRESH_S:
            return
        self.last_lag_s = now
        for tp, state in self.ledger.partitions.items():
            end = consumer.highwater(tp)
            if end is not None and state.committed is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - state.committed))

    def forget(self, partitions: set[TopicPartition]) -> None:
        for partition in partitions:
            try:
                self.metrics.lag.remove(partition.topic, str(partition.partition))
            except KeyError:
                pass


COMMITTED_TIMEOUT_S = 10.0  # how long the offsets that are only said (in a log line, by `check`) are waited for
UNKNOWN = "unknown"  # a committed offset the group's coordinator did not tell in time


def committed_offsets(consumer: KafkaConsumer, partitions, timeout_s: float = COMMITTED_TIMEOUT_S) -> dict:
    """The group's committed offset of each partition (None: nothing committed), UNKNOWN for those its
    coordinator did not tell within timeout_s: kafka-python's committed() waits for ever without a timeout."""
    deadline_s, offsets = time.monotonic() + timeout_s, {}
    for tp in sorted(partitions):
        try:
            offsets[tp] = consumer.committed(tp, timeout_ms=max(0.0, deadline_s - time.monotonic()) * 1000)
        except kafka.errors.KafkaError:  # timed out, or refused: the offset is only said
            offsets[tp] = UNKNOWN
    return offsets


def format_partitions(partitions, offsets: Mapping | None = None) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]" + (f"@{offsets.get(tp)}" if offsets is not None else "")
        for tp in sorted(partitions)
    )


class RebalanceListener(ConsumerRebalanceListener):
    """kafka-python 2.x calls these from inside poll(), on the loop's own thread."""

    def __init__(self, loop: ConsumerLoop):
        self.loop = loop

    def on_partitions_revoked(self, revoked):
        # Revocations may be partial (cooperative rebalancing): handle only the partitions named.
        self.loop.revoked(set(revoked))
        if revoked:
            kernel_log.info("Partitions revoked: %s", format_partitions(revoked))

    def on_partitions_assigned(self, assigned):
        self.loop.assigned(set(assigned))
        if assigned:
            kernel_log.info("Partitions assigned (committed offset): %s",
                            format_partitions(assigned, committed_offsets(self.loop.consumer, assigned)))
        else:
            kernel_log.info("No partitions assigned (the group has more members than partitions)")


class FetchBudget:
    """Back-pressure: which assigned partitions fetch. A partition stops fetching with two polls' worth
    of records unfinished, or when its next fetch could take it past its share of KERNEL_BUFFER_MAX_BYTES
    (the budget divided among the assigned partitions); it goes on once it holds half of that. So a
    partition whose messages wait for a retry never holds up the others. And the budget decides how many
    fetch at once: a fetch brings at least one whole record batch of each partition it names, however
    large (KIP-74; Tansu ignores the partition's fetch size too), so each partition that fetches reserves
    what its next fetch could bring (as much as its last poll did, or the largest any did while it brought
    nothing yet), and one whose fetch does not fit in what is left waits its turn, paused. Partitions that
    brought nothing yet join 1, 2, 4... a poll, their sizes unknown. With nothing held, the first in turn
    fetches whatever its size: a record larger than the whole budget is taken alone."""

    def __init__(self, consumer: KafkaConsumer, settings: KernelSettings, ledger: Ledger, metrics: KernelMetrics):
        self.consumer = consumer
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.paused: set[TopicPartition] = set()  # by back-pressure
        self.waiting: dict[TopicPartition, None] = {}  # paused until their next fetch fits in the budget
        self.newcomers = 1  # how many partitions that brought nothing yet may fetch at once
        self.turn_ends_s = 0.0  # when the partitions waiting for the budget go first
        self.size_fetches()  # .share and .fetch_limit, again at each assignment

    def apply(self) -> None:
        """Pause the partitions that are full or wait for the budget, resume the others."""
        partitions, budget = self.ledger.partitions, self.settings.buffer_max_bytes
        left = budget - self.ledger.unfinished_bytes
        largest = max(self.fetch_limit, max((state.fetched_bytes for state in partitions.values()), default=0))
        newcomers = self.newcomers
        # A turn lasts FETCH_TURN_S: fetching partitions keep their places until it ends, so that a fetch
        # in flight is not thrown away (kafka-python drops what comes for a paused partition).
        if self.waiting and time.monotonic() >= self.turn_ends_s:
            self.turn_ends_s, fetching = time.monotonic() + FETCH_TURN_S, ()
        else:
            fetching = (tp for tp in partitions if tp not in self.paused)
        now_full, waiting = set(), {}
        for tp in dict.fromkeys(itertools.chain(fetching, self.waiting, partitions)):
            state = partitions[tp]
            if self.full(tp, state):
                now_full.add(tp)
                continue
            next_fetch = max(self.fetch_limit, state.fetched_bytes) if state.fetched_bytes else largest
            if waiting or (next_fetch > left and left < budget) or (not state.fetched_bytes and not newcomers):
                waiting[tp] = None  # in the order they started waiting: the first goes first
                continue
            left -= next_fetch
            newcomers -= not state.fetched_bytes
        now_full.update(waiting)
        self.waiting = waiting
        if now_full - self.paused:
            self.consumer.pause(*(now_full - self.paused))
        if self.paused - now_full:
            self.consumer.resume(*(self.paused - now_full))
        self.paused = now_full
        self.metrics.buffered_bytes.set(self.ledger.unfinished_bytes)

    def full(self, tp: TopicPartition, state: PartitionState) -> bool:
        """Too much unfinished to fetch more: past the limits while fetching, or above half of them once paused."""
        records = 2 * self.settings.max_poll_records
        if tp in self.paused and tp not in self.waiting:
            return state.unfinished >= records / 2 or state.unfinished_bytes > self.share / 2
        return state.unfinished >= records or (
            state.unfinished_bytes > 0 and state.unfinished_bytes + self.fetch_limit > self.share)

    def size_fetches(self) -> None:
        """Each partition's share of KERNEL_BUFFER_MAX_BYTES, and what one fetch may bring of it: a
        quarter of the share, at most KAFKA_MAX_PARTITION_FETCH_BYTES, at least MIN_PARTITION_FETCH_BYTES.
        With many partitions, full-size fetches of every one of them would overrun the budget before
        back-pressure could pause any."""
        self.share = self.settings.buffer_max_bytes / max(1, len(self.ledger.partitions))
        self.fetch_limit = max(MIN_PARTITION_FETCH_BYTES,
                               min(self.settings.max_partition_fetch_bytes, int(self.share // 4)))
        set_partition_fetch_bytes(self.consumer, self.fetch_limit)

    def assigned(self) -> None:
        self.size_fetches()
        self.newcomers = 1
        self.apply()  # now: this very poll fetches, once the callback returns

    def polled(self) -> None:
        if self.newcomers < len(self.ledger.partitions):
            self.newcomers *= 2

    def revoked(self, partitions: set[TopicPartition]) -> None:
        self.size_fetches()
        self.paused -= partitions
        self.waiting = {tp: None for tp in self.waiting if tp not in partitions}


def exit_code_for(error: Exception, settings: KernelSettings) -> int:
    """What stops the loop, logged, and the exit code it means."""
    if isinstance(error, MessageFailed):
        kernel_log.error("%s; it stays uncommitted. Stopping", error, exc_info=error.__cause__)
        return EXIT_FATAL
    if isinstance(error, AccessRefused):
        kernel_log.error("Access refused (%s): %s", error.kind, error)
        return EXIT_REFUSED
    if isinstance(error, NoDeadLetterTopic):
        kernel_log.error("%s; no KERNEL_DEAD_LETTER_TOPIC is set, so it stays uncommitted. Stopping%s",
                         error, error.way_on)
        return EXIT_NO_DEAD_LETTER_TOPIC
    if isinstance(error, kafka.errors.InvalidSessionTimeoutError):
        kernel_log.error("Configuration error: the broker refused KAFKA_SESSION_TIMEOUT_MS (%d): it must lie "
                         "within the broker's group.min.session.timeout.ms and group.max.session.timeout.ms (6000 "
                         "and 1800000 by default)", settings.session_timeout_ms)
        return EXIT_CONFIG
    if isinstance(error, (kafka.errors.GroupAuthorizationFailedError, kafka.errors.TopicAuthorizationFailedError)):
        kernel_log.error("Access refused (authorization): the broker denied %s (%s): grant this kernel's principal "
                         "READ on them (and DESCRIBE on the group)",
                         f"the group {settings.group_id}" if isinstance(
                             error, kafka.errors.GroupAuthorizationFailedError) else
                         f"the topics {', '.join(settings.topics)}", type(error).__name__)
        return EXIT_REFUSED
    kernel_log.error("Unrecoverable Kafka error; stopping", exc_info=error)
    return EXIT_BROKER


def wait_for_topics(consumer: KafkaConsumer, settings: KernelSettings, stop: StopSignal, health: HealthState) -> bool:
    """Wait until every topic of KAFKA_TOPIC exists, and KERNEL_DEAD_LETTER_TOPIC, saying which does
    not: kafka-python 2.3.3 never assigns a subscribed topic that is created later, and a dead-letter
    topic missing would be found only when a message needs it. False if a stop came first."""
    wanted = {topic: "KAFKA_TOPIC" for topic in settings.topics}
    if settings.dead_letter_topic:
        wanted[settings.dead_letter_topic] = "KERNEL_DEAD_LETTER_TOPIC"
    while not stop.requested:
        missing = [topic for topic in wanted if not consumer.partitions_for_topic(topic)]
        health.missing_topics = missing
        health.last_poll_s = time.monotonic()  # waiting is not being stuck
        if not missing:
            return True
        consumed = [topic for topic in missing if topic in settings.topics]
        if consumed and (denied := denied_topics(consumer, consumed, settings.commit_timeout_ms)):
            raise kafka.errors.TopicAuthorizationFailedError(denied)
        kernel_log.warning("Topic %s does not exist (or this client may not see it): waiting for it to be created "
                           "(%s)", ", ".join(missing), ", ".join(sorted({wanted[topic] for topic in missing})),
                           extra=REPEATING)
        time.sleep(TOPIC_CHECK_INTERVAL_S)
    return False


def commit_offsets(consumer: KafkaConsumer, offsets: dict[TopicPartition, int], timeout_ms: int,
                   metrics: KernelMetrics) -> bool:
    """Commit `offsets`, synchronously; False, with a warning, if the broker did not take them."""
    try:
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()},
                        timeout_ms=timeout_ms)
    except CommitFailedError:
        # The group rebalanced: the partitions' next owners re-read from the last successful
        # commit (at-least-once); on_partitions_revoked forgets the ones we lost.
        metrics.commit_failures.inc()
        kernel_log.warning("Commit failed because the group rebalanced; the new owners re-read from the last "
                           "commit", extra=REPEATING)
        return False
    except KafkaError as error:
        metrics.commit_failures.inc()
        kernel_log.warning("Commit failed (%s); finished offsets are kept and committed later",
                           type(error).__name__, extra=REPEATING)
        return False
    metrics.commits.inc()
    return True


def warn_too_large(records: list, buffer_max_bytes: int) -> None:
    largest = max(records, key=lambda record: memory_cost((record,)))
    if memory_cost((largest,)) > buffer_max_bytes:
        kernel_log.warning("%s holds %s, more than KERNEL_BUFFER_MAX_BYTES (%d): it is taken alone, the other "
                           "partitions wait until it is done; set KERNEL_BUFFER_MAX_BYTES (and the memory limit) "
                           "above the largest message", coordinates(largest), describe_size(largest.value),
                           buffer_max_bytes, extra=log_fields(largest) | REPEATING)


class ConsumerLoop:
    """Polls, has the workers process each lane's records in order, commits the finished prefixes.

    Records are sorted into lanes (per key, or per partition) that KERNEL_CONCURRENCY worker
    threads process, at most one task per lane at a time (a task may take several lanes). This
    thread only polls, hands out tasks, settles them and commits, so however long a message takes,
    the member stays in its group, takes part in rebalances and commits progress. A lane whose
    message failed keeps it at its head until the retry is due: later messages of that lane wait,
    every other lane goes on. A partition with too many unfinished records is paused, which bounds
    memory.
    """

    def __init__(self, consumer: KafkaConsumer, settings: KernelSettings, kernel_handler: KernelHandler,
                 stop: StopSignal, tls: TlsFiles | None = None, health: HealthState | None = None,
                 metrics: KernelMetrics | None = None, tracing: Tracing | None = None):
        self.consumer = consumer
        self.settings = settings
        self.stop = stop
        self.kernel_handler = kernel_handler
        self.health = health or HealthState(settings, kernel_handler.name)
        self.metrics = metrics or KernelMetrics()
        takes_batches = kernel_handler.takes_batches
        keyed = settings.ordering == "key" and settings.concurrency > 1 and not takes_batches
        self.ledger = Ledger(keyed, settings.batch_policy if takes_batches else None, settings.concurrency)
        self.budget = FetchBudget(consumer, settings, self.ledger, self.metrics)
        self.failed_while_stopping = False  # process_message raised on a message in hand at shutdown
        # One poll's worth, and enough to keep every worker busy, is buffered before polling pauses.
        self.buffer_limit = max(settings.max_poll_records, 4 * settings.concurrency)
        self.last_commit_s = 0.0
        per_message = self.metrics if settings.http_port else None  # counting each message costs: only for /metrics
        self.producer = kernel_producer(settings, tls, consumer.config, per_message, tracing, self.health)
        dead_letters = (DeadLetterTopic(settings, self.producer, self.metrics, self.health, tracing)
                        if settings.dead_letter_topic else None)
        self.failures = FailurePolicy(settings, self.ledger, dead_letters, self.metrics)
        self.watchdog = Watchdog(settings, self.ledger, self.health, self.metrics, kernel_handler)
        # A worker dead-letters what process_message raised DeadLetter for; the loop, a batch's.
        process = process_batch_task if takes_batches else functools.partial(process_task, dead_letters=dead_letters)
        if tracing is not None:  # chosen once: without tracing, the workers call the handler as it is
            process = tracing.traced(process, takes_batches)
        handler = kernel_handler.function
        self.workers = WorkerPool(settings.concurrency, kernel_handler.name,
                                  lambda task: process(task, handler, stop, self.producer, per_message))

    def run(self) -> int:
        """Consume until stopped, or until a failure stops the kernel; the exit code."""
        try:
            code = self.process_until_stopped()
        finally:
            self.close()
        return EXIT_FATAL if code == EXIT_OK and self.failed_while_stopping else code

    def process_until_stopped(self) -> int:
        try:
            if wait_for_topics(self.consumer, self.settings, self.stop, self.health):
                self.consumer.subscribe(self.settings.topics, listener=RebalanceListener(self))
            while not self.stop.requested:
                self.run_once()
            kernel_log.info("Stop requested: finishing")
            return EXIT_OK
        except (MessageFailed, AccessRefused, NoDeadLetterTopic, KafkaError) as error:
            return exit_code_for(error, self.settings)

    def run_once(self) -> None:
        self.settle_handed_back(timeout_s=0)
        self.hand_out()
        if self.ledger.in_flight and self.ledger.unfinished >= self.buffer_limit:
            if not self.settle_handed_back(timeout_s=min(KEEPALIVE_INTERVAL_S, self.poll_timeout_ms() / 1000)):
                self.keep_membership()
        else:
            self.budget.apply()
            if self.ledger.waiting_for_places:  # the next task back frees one: wait for it, not for records
                self.poll(0)
                self.settle_handed_back(timeout_s=BUSY_POLL_TIMEOUT_MS / 1000)
            else:
                self.poll(BUSY_POLL_TIMEOUT_MS if self.ledger.in_flight else self.poll_timeout_ms())
        self.watchdog.watch_in_flight()
        self.check_contact()
        self.commit()
        self.watchdog.refresh_lag(self.consumer)

    def check_contact(self) -> None:
        """Count a heartbeat answered as contact (records fetched count in poll()); stop once the credentials
        were refused for KAFKA_SESSION_TIMEOUT_MS with none accepted since, or the producer failed for good."""
        health, now = self.health, time.monotonic()
        answered_s = last_heartbeat_answered_s(self.consumer)  # time.time(), -inf before the first
        health.last_contact_s = max(health.last_contact_s, now - (time.time() - answered_s))
        if (refusal := health.refusal) is not None and now - health.refused_since_s > health.out_of_touch_s:
            raise AccessRefused(f"{refusal}; refused for {now - health.refused_since_s:.0f} s while running "
                                f"(KAFKA_SESSION_TIMEOUT_MS {self.settings.session_timeout_ms})", refusal.kind)
        if health.producer_failed is not None:
            raise health.producer_failed

    def poll(self, timeout_ms: int) -> None:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        now_s = time.monotonic()  # when the records arrived: a batch waits for more from here
        for partition, records in polled.items():
            if self.ledger.add(partition, records, now_s) > self.settings.buffer_max_bytes:
                warn_too_large(records, self.settings.buffer_max_bytes)
        self.health.last_poll_s = now_s
        if polled:
            self.health.last_contact_s = now_s
        self.budget.polled()

    def poll_timeout_ms(self) -> int:
        """Poll no longer than until the next retry, or the next batch, is due."""
        due_s = [due for due in (self.ledger.next_retry_due_s(), self.ledger.next_batch_due_s()) if due is not None]
        if not due_s:
            return POLL_TIMEOUT_MS
        return max(0, min(POLL_TIMEOUT_MS, int((min(due_s) - time.monotonic()) * 1000)))

    def hand_out(self) -> None:
        for task in self.ledger.start_tasks(time.monotonic()):
            self.workers.give(task)

    def settle_handed_back(self, timeout_s: float) -> bool:
        """Settle the tasks the workers handed back, waiting up to `timeout_s` for the first."""
        if (outcome := self.workers.next_back(timeout_s)) is None:
            return False
        while outcome is not None:
            self.settle(outcome)
            outcome = self.workers.next_back(0)
        return True

    def settle(self, outcome: TaskOutcome) -> None:
        """Take what a task finished; a fatal failure stops the kernel, any other is retried or
        dead-lettered."""
        lane = self.ledger.take_back(outcome)
        failure = outcome.failure
        if failure is not None and failure.consequence is Consequence.FATAL:
            self.metrics.failed.labels(outcome.task.partition.topic).inc()
            raise failure.error
        if lane is None:
            return
        if failure is not None and not self.stop.requested:
            self.failures.apply(lane, failure)
        self.ledger.requeue(lane)

    def keep_membership(self) -> None:
        """Poll with every partition paused while the workers are busy: the group sees us alive, and
        a rebalance runs its callbacks here. Records can still come back, of partitions that very
        rebalance assigned (not paused): they are kept like any others, or the commit would skip them."""
        pausing = set(self.ledger.partitions) - self.consumer.paused()
        self.consumer.pause(*pausing)
        self.poll(timeout_ms=0)
        self.consumer.resume(*(pausing & set(self.ledger.partitions)))

    def commit(self, partitions: set[TopicPartition] | None = None, force: bool = False) -> None:
        """Commit each partition's finished prefix, synchronously: after every polled batch once
        the workers are idle, at least every COMMIT_INTERVAL_S while they are busy."""
        now = time.monotonic()
        if not force and self.ledger.in_flight and now - self.last_commit_s < COMMIT_INTERVAL_S:
            return
        self.metrics.calls.add_processed()  # first: what is committed has been counted, whatever comes next
        offsets = self.ledger.commits_due(partitions)
        if not offsets:
            return
        self.last_commit_s = now
        if commit_offsets(self.consumer, offsets, self.settings.commit_timeout_ms, self.metrics):
            self.ledger.mark_committed(offsets)
            kernel_log.debug("Committed %s", format_partitions(offsets, offsets))

    def assigned(self, partitions: set[TopicPartition]) -> None:
        self.ledger.assign(partitions)
        self.budget.assigned()
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(self.ledger.partitions))
        self.health.joined, self.health.last_contact_s = True, time.monotonic()

    def revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions are being revoked: stop their tasks after the messages in hand (waiting at
        most the max-poll interval, the group's rebalance timeout), commit their finished prefix,
        and forget them; the next owner starts from that commit, retries included."""
        failed = self.recall(self.ledger.tasks_of(partitions), self.settings.max_poll_interval_ms / 1000)
        # kafka-python swallows what this callback raises: the loop settles these once poll() returns.
        self.workers.back_early.extend(failed)
        self.commit(partitions, force=True)
        self.health.joined = False
        self.watchdog.forget(partitions)
        self.ledger.forget(partitions)
        self.budget.revoked(partitions)
        self.metrics.assigned.set(len(self.ledger.partitions))

    def recall(self, tasks: set[LaneTask], timeout_s: float) -> list[TaskOutcome]:
        """Have `tasks` stop after the message in hand, wait up to `timeout_s` for them, and take
        back what they finished; what came of those that failed fatally meanwhile."""
        for task in tasks:
            task.cancelled = True
        back = self.workers.wait_for(tasks, time.monotonic() + timeout_s)
        for outcome in back:
            self.ledger.take_back(outcome)
        return [outcome for outcome in back if outcome.failure and outcome.failure.consequence is Consequence.FATAL]

    def drain(self) -> None:
        """At shutdown: have the workers stop after the messages in hand, waiting at most
        KERNEL_SHUTDOWN_TIMEOUT_MS, and take their progress."""
        for outcome in self.recall(set(self.ledger.in_flight), self.settings.shutdown_timeout_ms / 1000):
            self.metrics.failed.labels(outcome.task.partition.topic).inc()
            error = outcome.failure.error
            kernel_log.error("%s while stopping; it stays uncommitted", error, exc_info=error.__cause__ or error)
            self.failed_while_stopping = True
        if self.ledger.in_flight:
            kernel_log.warning("%d %s still in %s after KERNEL_SHUTDOWN_TIMEOUT_MS: left uncommitted, to be processed "
                               "again", len(self.ledger.in_flight), "batch(es)" if self.kernel_handler.takes_batches
                               else "message(s)", self.kernel_handler.name)

    def close(self) -> None:
        """Finish: drain, commit what finished, stop the workers and the producer, leave the group."""
        self.health.joined = False
        self.drain()
        self.commit(force=True)
        if uncommitted := self.ledger.commits_due():  # the last word on it: a repeated warning may be throttled
            kernel_log.error("Could not commit before stopping: what finished before %s is processed again by the "
                             "partitions' next owner", format_partitions(uncommitted, uncommitted))
        self.workers.stop()
        self.producer.close()
        self.consumer.close(autocommit=False)  # leaves the group: the others rebalance at once
        kernel_log.info("Consumer closed")


###############################################################################
# Entry point #################################################################
###############################################################################


def consume_until_stopped(kernel_handler: KernelHandler, settings: KernelSettings, tls: TlsFiles | None,
                          stop: StopSignal, tracing: Tracing | None = None) -> int:
    health, metrics = HealthState(settings, kernel_handler.name), KernelMetrics() if settings.http_port else Uncounted()
    metrics.ready.set_function(lambda: health.ready()[0])  # asked at each scrape, as /readyz is
    if settings.http_port:
        serve_http(settings.http_host, settings.http_port, health, metrics)
        kernel_log.info("Serving /healthz, /readyz and /metrics on port %d", settings.http_port)
    kernel_log.info("Starting: topics=%s group=%s client=%s bootstrap=%s security=%s producer=%s",
                    ",".join(settings.topics), settings.group_id, settings.client_id,
                    ",".join(settings.bootstrap_servers), settings.security, settings.producer)
    consumer = connect_consumer(settings, tls, stop, health)
    if consumer is None:
        return EXIT_OK
    loop = ConsumerLoop(consumer, settings, kernel_handler, stop, tls, health, metrics, tracing)
    collect_garbage_less_often()
    return loop.run()


def collect_garbage_less_often() -> None:
    """Every poll makes thousands of records that live until they are processed. At CPython's default
    threshold (a collection per 700 new objects) they set off collections that go over every long-lived
    object (the modules, the client) several times a poll: some 13% of a no-op kernel's time. What lives at
    this point is frozen out of collections for good, and a collection waits for 10,000 new objects.
    (Objects are still freed as soon as nothing refers to them: only cycles wait for a collection.)"""
    gc.freeze()
    threshold, *older = gc.get_threshold()
    gc.set_threshold(max(threshold, 10_000), *older)


def run_kernel(process_message: Callable | None = None, *, process_batch: Callable | None = None,
               read_settings: Callable[[], object] | None = None, name: str, default_topic: str,
               argv: list[str] | None = None) -> int:
    """Run a kernel until it is stopped; its exit code. `python main.py` runs this file's own kernel
    (the first lines of the file); an example or a test passes its own handler and names: process_message,
    or process_batch, not both, and read_settings if it has settings of its own (called before the first
    message: a ConfigError stops it). With the argument "check" (`python main.py check`), it checks the
    deployment instead of consuming."""
    if (process_message is None) == (process_batch is None):
        raise TypeError("run_kernel() takes process_message or process_batch, one of them")
    kernel_handler = (KernelHandler(process_batch, takes_batches=True) if process_batch
                      else KernelHandler(process_message))
    argv = sys.argv if argv is None else argv
    if argv[1:] == ["check"]:
        return check_deployment(os.environ, name, default_topic, dotenv_file(os.environ), read_settings,
                                kernel_handler.takes_batches)
    if argv[1:]:
        print(f"usage: {argv[0]} [check]", file=sys.stderr)
        return EXIT_CONFIG
    stop = StopSignal()
    stop.install()
    configure_logging(name)
    check_kafka_python_version()
    try:
        read_dotenv(dotenv_file(os.environ))
        settings = load_settings(os.environ, name, default_topic)
        if kernel_handler.takes_batches:
            settings.check_batch_limit()
        if read_settings is not None:
            read_settings()
        apply_log_settings(settings)
        with tls_files(settings) as tls, tracing_for(settings) as tracing:
            if tls is not None:
                stop.cleanups.append(tls.remove)  # a second signal exits at once, but not leaving keys behind
            return consume_until_stopped(kernel_handler, settings, tls, stop, tracing)
    except ConfigError as error:
        kernel_log.error("Configuration error: %s", error)
        return EXIT_CONFIG
    except AccessRefused as error:
        kernel_log.error("Access refused (%s): %s", error.kind, error)
        return EXIT_REFUSED
    except BrokerUnavailable as error:
        kernel_log.error("Cannot reach the broker (%s): %s", error.kind, error)
        return EXIT_BROKER


###############################################################################
# The options #################################################################
###############################################################################
# What only some kernels use, each importing what it needs only once it is switched on; the core above
# reads without them.

###############################################################################
# Metrics and the HTTP server #################################################
###############################################################################


class HandlerTallies:
    """What the handler did, by topic, counted by each worker thread in tallies of its own, without a
    lock (a Histogram's observe() and a Counter's inc() take one each, and cost more than the rest of
    the kernel's work on a no-op message): the time of each call, served as kernel_processing_seconds
    when /metrics is read, and the messages it finished, added to the kernel_messages_processed
    counter by the loop before it commits, so that what is committed is counted (a Counter: the
    multiprocess mode of prometheus_client, which the local runner uses, sums it over restarts)."""

    # The buckets' upper bounds: prometheus_client.Histogram.DEFAULT_BUCKETS (tests/test_loop.py compares).
    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf)
    SECONDS, PROCESSED = len(BOUNDS), len(BOUNDS) + 1  # a tally's last two slots, after its calls per bucket

    def __init__(self, processed: prometheus_client.Counter):
        self.tallies: list[dict[str, list]] = []  # a thread's: topic → calls per bucket, seconds, processed
        self.local = threading.local()
        self.processed = processed
        self.added: dict[tuple[int, str], int] = {}  # (a thread's index, topic): processed added to the counter

    def tally(self, topic: str) -> list:
        """This thread's tally for `topic`, for count_call() and tally[PROCESSED] += messages."""
        if (mine := getattr(self.local, "tallies", None)) is None:
            mine = self.local.tallies = {}
            self.tallies.append(mine)
        if (tally := mine.get(topic)) is None:
            tally = mine[topic] = [0] * len(self.BOUNDS) + [0.0, 0]
        return tally

    @classmethod
    def count_call(cls, tally: list, seconds: float) -> None:
        tally[bisect.bisect_left(cls.BOUNDS, seconds)] += 1  # its bucket: the first bound >= seconds
        tally[cls.SECONDS] += seconds

    def add_processed(self) -> None:
        """Add what the workers finished since last time to the processed counter (on the loop's
        thread, the only one that does)."""
        for index, mine in enumerate(list(self.tallies)):
            for topic, tally in list(mine.items()):
                done = tally[self.PROCESSED]  # read once: the worker may count on meanwhile
                if done != (added := self.added.get((index, topic), 0)):
                    self.processed.labels(topic).inc(done - added)
                    self.added[index, topic] = done

    def collect(self) -> Iterator[prometheus_client.metrics_core.Metric]:
        import prometheus_client.metrics_core
        import prometheus_client.utils

        totals: dict[str, list] = {}  # list(): a copy, while the workers count on
        for mine in list(self.tallies):
            for topic, tally in list(mine.items()):
                total = totals.get(topic)
                totals[topic] = list(tally) if total is None else [a + b for a, b in zip(total, tally, strict=True)]
        family = prometheus_client.metrics_core.HistogramMetricFamily(
            "kernel_processing_seconds", "Time spent in each call of process_message or process_batch",
            labels=["topic"])
        for topic, total in sorted(totals.items()):
            bounds = map(prometheus_client.utils.floatToGoString, self.BOUNDS)
            buckets = list(zip(bounds, itertools.accumulate(total[:self.SECONDS]), strict=True))
            family.add_metric([topic], buckets, total[self.SECONDS])
        yield family


class KernelMetrics:
    """The kernel's Prometheus metrics, served at /metrics. A registry of its own, so that a test may
    run several loops in one process; yours (prometheus_client's Counter, Gauge and Histogram made in
    your part) go to prometheus_client's default registry, served beside it."""

    def __init__(self):
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry()
        self.children: dict[tuple, prometheus_client.Counter] = {}  # of_topic()'s
        counter, gauge, histogram = (self.metric(kind) for kind in (
            prometheus_client.Counter, prometheus_client.Gauge, prometheus_client.Histogram))
        topic = ("topic",)
        self.processed = counter("kernel_messages_processed", "Messages the handler finished", topic)
        self.failed = counter("kernel_messages_failed", "Messages on which the handler raised", topic)
        self.retried = counter("kernel_messages_retried", "Messages to be tried again", topic)
        self.dead_lettered = counter("kernel_messages_dead_lettered", "Messages sent to the dead-letter topic", topic)
        self.dead_letter_failures = counter("kernel_dead_letter_failures", "Dead letters the broker did not confirm "
                                            "(each stays uncommitted and is tried again)")
        self.sent = counter("kernel_messages_sent", "Messages the broker confirmed, sent with send() or dead-lettered, "
                            "by the topic they went to", topic)
        self.send_failures = counter("kernel_send_failures", "Messages the broker did not confirm, by the topic they "
                                     "were for", topic)
        self.calls = HandlerTallies(self.processed)
        self.registry.register(self.calls)
        self.batch_sizes = histogram("kernel_batch_size", "Messages per process_batch call", topic,
                                     buckets=(1, 10, 100, 500, 1000, 5000))
        self.commits = counter("kernel_commits", "Offset commits that succeeded")
        self.commit_failures = counter("kernel_commit_failures", "Offset commits that failed")
        self.rebalances = counter("kernel_rebalances", "Partition assignments received")
        self.assigned = gauge("kernel_assigned_partitions", "Partitions assigned to this kernel")
        self.lag = gauge("kernel_consumer_lag", "End offset minus committed offset", ("topic", "partition"))
        self.ready = gauge("kernel_ready", "1 while /readyz answers 200, else 0 (an alert rule cannot ask /readyz)")
        self.buffered_bytes = gauge("kernel_buffered_bytes", "Memory held by fetched messages not finished yet "
                                    "(estimated; a partition pauses at its share of KERNEL_BUFFER_MAX_BYTES)")

    def metric(self, kind: type) -> Callable:
        """A maker of metrics of `kind` in this registry: name, help text, label names, options."""
        return lambda name, text, labels=(), **options: kind(name, text, labelnames=labels, registry=self.registry,
                                                             **options)

    def of_topic(self, metric: prometheus_client.Counter, topic: str) -> prometheus_client.Counter:
        """metric.labels(topic), asked once: labels() costs as much as the kernel's work on a message."""
        if (child := self.children.get((metric, topic))) is None:
            child = self.children[metric, topic] = metric.labels(topic)
        return child


class Uncounted:
    """KernelMetrics, and each of its metrics, while no KERNEL_HTTP_PORT serves them: nothing counts, and
    prometheus_client is not even imported. Any attribute of it, and any call (labels, inc, set...), is
    itself again."""

    def __getattr__(self, name: str) -> Uncounted:
        return self

    def __call__(self, *arguments, **options) -> Uncounted:
        return self


HTTP_TIMEOUT_S = 5.0  # a client has this long to send its request, and to take the answer
HTTP_MAX_WAITING = 256  # connections waiting for their request at once; a new one closes the oldest
HTTP_MAX_REQUEST_BYTES = 8192  # request line and headers; a probe or a scrape needs a few hundred


def http_answer(path: str, health: HealthState, metrics: KernelMetrics) -> tuple[int, str, bytes]:
    """Status, content type and body for GET `path`."""
    import prometheus_client

    if path == "/metrics":  # the kernel's, then yours and the process's (prometheus_client's default registry)
        return 200, prometheus_client.CONTENT_TYPE_LATEST, b"".join(
            prometheus_client.generate_latest(registry) for registry in (metrics.registry, prometheus_client.REGISTRY))
    if path in ("/healthz", "/readyz"):
        ok, text = health.alive() if path == "/healthz" else health.ready()
        return (200 if ok else 503), "text/plain", f"{text}\n".encode()
    return 404, "text/plain", b"not found: try /healthz, /readyz or /metrics\n"


def serve_http(host: str | None, port: int, health: HealthState, metrics: KernelMetrics) -> None:
    """Serve /healthz (liveness), /readyz (readiness) and /metrics from a daemon thread: one event
    loop, so that idle or slow clients hold no thread each, with a timeout on every connection and a
    cap on how many may wait for their request (past it, the oldest is closed, so that a probe always
    gets in). Whoever reaches the port cannot starve the kernel, its probes or a SIGTERM, and nothing is
    written to stderr past the kernel's log format."""
    import asyncio
    import http

    loop = asyncio.new_event_loop()
    waiting: dict[asyncio.StreamWriter, None] = {}  # connections whose request has not come yet, oldest first

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        waiting[writer] = None
        if len(waiting) > HTTP_MAX_WAITING:
            oldest = next(iter(waiting))
            del waiting[oldest]
            oldest.transport.abort()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_TIMEOUT_S)
            waiting.pop(writer, None)
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, kind, body = (http_answer(path.split("?", 1)[0], health, metrics) if method == "GET"
                                  else (405, "text/plain", b"only GET\n"))
            reason = http.HTTPStatus(status).phrase
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            writer.close()  # once all of it is sent
            await asyncio.wait_for(writer.wait_closed(), HTTP_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away, took too long or sent no HTTP: nothing to answer
        finally:
            waiting.pop(writer, None)
            writer.transport.abort()  # whatever is left of a connection that did not end well

    try:
        loop.run_until_complete(asyncio.start_server(serve, host, port, limit=HTTP_MAX_REQUEST_BYTES))
    except OSError as error:
        loop.close()
        raise ConfigError(f"KERNEL_HTTP_PORT (or PORT) {port} cannot be served on KERNEL_HTTP_HOST "
                          f"{host or '(all addresses)'}: {error.strerror}") from None
    threading.Thread(target=loop.run_forever, name="http", daemon=True).start()


###############################################################################
# Tracing #####################################################################
###############################################################################

TRACES_FLUSH_TIMEOUT_S = 5.0  # at shutdown, how long the spans not exported yet may take (a collector may be down)


class Tracing:
    """OpenTelemetry traces of what the kernel does with each message, when OTEL_TRACES_EXPORTER names
    an exporter (the otel extra installs the SDK and OTLP over HTTP); without it nothing of OpenTelemetry
    is imported, and nothing of this runs. Each call of process_message is a span, a child of the trace
    context (W3C traceparent) in the message's headers; each call of process_batch one linked to its
    messages'. Named and described as OpenTelemetry's messaging conventions say, plus kernel.attempt
    and kernel.outcome (done, retried: False or RetryLater, dead_lettered, fatal). What send() publishes
    and the dead letters carry the trace on. The SDK reads the other OTEL_* variables (endpoint, sampler) itself."""

    def __init__(self, settings: KernelSettings):
        try:
            from importlib.metadata import entry_points

            from opentelemetry import propagate, trace
            from opentelemetry.sdk.resources import OTELResourceDetector, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ConfigError("OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed: uv sync --extra otel "
                              '(and build the image with EXTRAS="--extra otel")') from None
        exporters = {entry.name: entry for entry in entry_points(group="opentelemetry_traces_exporter")}
        if unknown := [name for name in settings.traces_exporters if name not in exporters]:
            raise ConfigError(f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}, which no installed package provides "
                              f"(installed: otlp, {', '.join(sorted(exporters))})")
        # Named after the kernel, unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says otherwise.
        resource = Resource.create({"service.name": settings.kernel_name}).merge(OTELResourceDetector().detect())
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # flush() ends it, in time
        for name in settings.traces_exporters:
            self.provider.add_span_processor(BatchSpanProcessor(exporters[name].load()()))
        trace.set_tracer_provider(self.provider)  # spans the handler makes itself, or its libraries, join in
        self.trace, self.tracer = trace, self.provider.get_tracer("clustera-kernel")
        self.propagator = propagate.get_global_textmap()  # OTEL_PROPAGATORS: W3C traceparent and baggage
        self.header_names = self.propagator.fields  # what it reads and writes: traceparent, tracestate, baggage
        self.process_attributes = {"messaging.system": "kafka", "messaging.operation.type": "process",
                         "messaging.operation.name": "process", "messaging.consumer.group.name": settings.group_id,
                         "messaging.client.id": settings.client_id}
        for log_handler in logging.getLogger().handlers:
            log_handler.addFilter(self.add_trace_ids)

    def context_of(self, record):
        """The trace context the record's headers carry (none: its span starts a trace)."""
        return self.propagator.extract({name: value.decode("latin-1") for name, value in record.headers or ()
                                        if name in self.header_names and value})

    def with_context(self, headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """`headers` with the trace context of the span in progress, in place of one they carry (a
        message's headers forwarded as they are carry its producer's)."""
        context: dict[str, str] = {}
        self.propagator.inject(context)
        return [header for header in headers if header[0] not in self.header_names] + [
            (name, value.encode()) for name, value in context.items()]

    def traced(self, process: Callable, takes_batches: bool) -> Callable:
        """process_task (process_batch_task with `takes_batches`) calling the handler in a span per call."""
        call = self.call_batch if takes_batches else self.call_message
        return lambda task, handler, *rest: process(task, functools.partial(call, handler, task), *rest)

    def call_message(self, handler: Callable, task: LaneTask, record):
        attributes = self.process_attributes | {
            "messaging.destination.name": record.topic, "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset, "messaging.message.body.size": len(record.value or b""),
            "kernel.attempt": task.attempt(record)}
        if record.value is None:
            attributes["messaging.kafka.message.tombstone"] = True
        if record.key is not None:
            with contextlib.suppress(UnicodeDecodeError):  # a key without a text form goes without
                attributes["messaging.kafka.message.key"] = record.key.decode()
        with self.tracer.start_as_current_span(f"process {record.topic}", self.context_of(record),
                                               self.trace.SpanKind.CONSUMER, attributes, record_exception=False,
                                               set_status_on_exception=False) as span:
            return self.call(span, handler, record)

    def call_batch(self, handler: Callable, task: LaneTask, records: list):
        first = records[0]
        links = [self.trace.Link(context, {"messaging.kafka.offset": record.offset}) for record in records
                 if (context := self.trace.get_current_span(self.context_of(record)).get_span_context()).is_valid]
        attributes = self.process_attributes | {
            "messaging.destination.name": first.topic, "messaging.destination.partition.id": str(first.partition),
            "messaging.batch.message_count": len(records), "kernel.attempt": task.attempt(first)}
        with self.tracer.start_as_current_span(f"process {first.topic}", None, self.trace.SpanKind.CONSUMER,
                                               attributes, links, record_exception=False,
                                               set_status_on_exception=False) as span:
            return self.call(span, handler, records)

    def call(self, span, handler: Callable, argument):
        """handler(argument), its outcome recorded on `span`."""
        try:
            result = handler(argument)
        except DeadLetter as rejection:
            self.failed(span, "dead_lettered", str(rejection), "DeadLetter")
            if rejection.message is not None:  # from process_batch: which message
                span.add_event("dead letter", {"messaging.kafka.offset": rejection.message.offset})
            raise
        except RetryLater as later:
            self.failed(span, "retried", f"raised RetryLater({later.seconds})", None)
            raise
        except BaseException as error:
            span.record_exception(error)
            self.failed(span, "fatal", repr(error), type(error).__qualname__)
            raise
        if result is True:
            span.set_attribute("kernel.outcome", "done")
        elif result is False:
            self.failed(span, "retried", "returned False", None)
        else:
            self.failed(span, "fatal", f"returned {result!r}, not True or False", "TypeError")
        return result

    def failed(self, span, outcome: str, description: str, error_type: str | None) -> None:
        span.set_attributes({"kernel.outcome": outcome} | ({"error.type": error_type} if error_type else {}))
        span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, description))

    def dead_letter_span(self, record, topic: str, attempts: int, reason: str):
        """A span for publishing `record` to the dead-letter topic, in its trace: the dead letter carries it."""
        attributes = {"messaging.system": "kafka", "messaging.operation.type": "send",
                      "messaging.operation.name": "send", "messaging.destination.name": topic,
                      "kernel.attempt": attempts, "kernel.reason": reason}
        return self.tracer.start_as_current_span(f"send {topic}", self.context_of(record),
                                                 self.trace.SpanKind.PRODUCER, attributes)

    def add_trace_ids(self, record: logging.LogRecord) -> bool:
        """A log filter: a line logged within a span carries its trace_id and span_id (JSON logs show them)."""
        context = self.trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id, record.span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
        return True

    def flush(self) -> None:
        """Export the spans not exported yet, waiting at most TRACES_FLUSH_TIMEOUT_S, and stop."""
        flushing = threading.Thread(target=self.provider.shutdown, name="traces", daemon=True)
        flushing.start()
        flushing.join(TRACES_FLUSH_TIMEOUT_S)


def otel_variables_in(error: Exception) -> str:
    """The OTEL_* variables an error of OpenTelemetry's set-up is about: those whose value it quotes, or
    that end with a setting it names (max_export_batch_size: OTEL_BSP_MAX_EXPORT_BATCH_SIZE)."""
    text = str(error)
    settings = {word.upper() for word in re.findall(r"[a-z]+(?:_[a-z]+)+", text)}
    names = [name for name, value in os.environ.items() if name.startswith("OTEL_") and (
        len(value.strip()) > 2 and value.strip() in text or any(name.endswith(setting) for setting in settings))]
    return ", ".join(names) or "an OTEL_* variable"


@contextlib.contextmanager
def tracing_for(settings: KernelSettings) -> Iterator[Tracing | None]:
    """Tracing for the life of the block, its last spans flushed however it ends; None without
    OTEL_TRACES_EXPORTER. A setting the SDK refuses (it raises ValueError) is a configuration error."""
    if not settings.traces_exporters:
        yield None
        return
    try:
        tracing = Tracing(settings)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{otel_variables_in(error)} refused by OpenTelemetry: {error}") from None
    try:
        yield tracing
    finally:
        tracing.flush()


###############################################################################
# OAuth tokens ################################################################
###############################################################################


TOKEN_REQUEST_TIMEOUT_S = 10.0  # how long a request to the OAuth token endpoint may take


class OAuthBearerTokens(kafka.sasl.oauth.AbstractTokenProvider):
    """OAUTHBEARER tokens from the OAuth client credentials grant, fetched when a connection first
    needs one and again once 80% of a token's lifetime has passed (Kafka's own default refresh
    window), so that no connection presents an expired token. kafka-python 2.3 cannot re-authenticate
    an open connection (KIP-368): a broker that enforces token expiry (connections.max.reauth.ms)
    closes it, and the client connects again with a fresh token."""

    def __init__(self, client: OAuthClient):
        super().__init__()
        self.client = client
        self.lock = threading.Lock()  # the consumer's and the producer's connections share one token
        self.current: str | None = None
        self.stop: StopSignal | None = None  # a stop requested cuts a request short (connect_consumer sets it)
        self.refresh_at_s = self.expires_at_s = 0.0  # time.monotonic()

    def token(self) -> str:
        """A valid token; called by the client at each connection's authentication."""
        with self.lock:
            now = time.monotonic()
            if self.current is None or now >= self.refresh_at_s:
                try:
                    self.fetch(now)
                except (OSError, ValueError) as error:  # unreachable, or an answer that is not a token
                    if self.current is None or now >= self.expires_at_s:
                        raise BrokerUnavailable(f"the OAuth token endpoint (KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL) "
                                                f"gave no token: {error}", "OAuth") from None
                    kernel_log.warning("Could not refresh the OAuth token (%s); the current one is valid for %.0f s "
                                       "more", error, self.expires_at_s - now, extra=REPEATING)
            return self.current

    def extensions(self) -> dict[str, str]:
        return dict(self.client.extensions)

    def fetch(self, now: float) -> None:
        client = self.client
        form = {"grant_type": "client_credentials"} | ({"scope": client.scope} if client.scope else {})
        basic = f"{urllib.parse.quote(client.client_id, safe='')}:{urllib.parse.quote(client.client_secret, safe='')}"
        headers = {"Authorization": "Basic " + base64.b64encode(basic.encode()).decode(),
                   "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        status, reason, body = post_within(client.token_endpoint_url, urllib.parse.urlencode(form).encode(), headers,
                                           TOKEN_REQUEST_TIMEOUT_S, self.stop)
        if status in (400, 401, 403):
            with contextlib.suppress(Exception):  # the OAuth error code, as RFC 6749 section 5.2 names it
                reason = f"{reason}, {json.loads(body)['error']}"
            raise AccessRefused(f"the OAuth token endpoint refused the client (HTTP {status} {reason}): "
                                "check KAFKA_SASL_OAUTHBEARER_CLIENT_ID, KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET and "
                                "KAFKA_SASL_OAUTHBEARER_SCOPE", "authentication")
        if 300 <= status < 400:  # followed, it would carry the client secret wherever it points
            raise OSError(f"it redirected (HTTP {status} {reason}), and redirects are not followed: set "
                          "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL to the address that answers")
        if status != 200:
            raise OSError(f"HTTP {status} {reason}")
        try:
            answer = json.loads(body)
        except ValueError:
            raise ValueError(f"its answer is not JSON: {describe_bytes(body, 80)}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise ValueError("its answer holds no access_token")
        lifetime_s = answer.get("expires_in")
        lifetime_s = float(lifetime_s) if isinstance(lifetime_s, int | float) and lifetime_s > 0 else 300.0
        lifetime_s = min(lifetime_s, jwt_expiry_s(answer["access_token"]) - time.time())
        self.current, self.refresh_at_s, self.expires_at_s = (answer["access_token"], now + 0.8 * lifetime_s,
                                                              now + lifetime_s)


def jwt_expiry_s(token: str) -> float:
    """The `exp` of a token that is a JWT, in seconds since the epoch, read without checking its signature
    (the broker does): an endpoint's expires_in may say longer. Infinity for a token that is no JWT."""
    try:
        payload = token.split(".")[1]
        expiry = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
    except (IndexError, ValueError, KeyError, TypeError):  # binascii.Error and JSON errors are ValueErrors
        return math.inf
    return float(expiry) if isinstance(expiry, int | float) and not isinstance(expiry, bool) else math.inf


def post_within(url: str, body: bytes, headers: dict[str, str], timeout_s: float,
                stop: StopSignal | None = None) -> tuple[int, str, bytes]:
    """POST `body` to `url`: the answer's status, reason and body (up to 1 MB), all of it within `timeout_s`
    (a socket's timeout bounds each read only: an answer trickled a byte at a time would hold on for ever)
    and before a stop is requested, else OSError. Redirects are not followed."""
    import http.client

    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection, started_s = kind(parts.hostname, parts.port, timeout=timeout_s), time.monotonic()
    done, cut = threading.Event(), []  # why the request was cut short, if it was

    def cut_when_due() -> None:  # shutdown, not close, is what wakes a read blocked in the caller's thread
        while not done.wait(0.1):
            if time.monotonic() - started_s >= timeout_s:
                cut.append(f"no whole answer within {timeout_s:.0f} s")
            elif stop is not None and stop.requested:
                cut.append("a stop was requested")
            if cut:
                with contextlib.suppress(OSError, TypeError):  # TypeError: not connected yet
                    socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)

    threading.Thread(target=cut_when_due, name="token-deadline", daemon=True).start()
    try:
        connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
        response = connection.getresponse()
        answer = response.status, response.reason, response.read(1_048_576)
    except (OSError, http.client.HTTPException) as error:
        answer = OSError(str(error) or type(error).__name__)
    finally:
        done.set()
        connection.close()
    if cut:  # whatever the client made of what came before
        raise OSError(cut[0])
    if isinstance(answer, OSError):
        raise answer
    return answer


@functools.cache
def oauth_tokens(client: OAuthClient) -> OAuthBearerTokens:
    """One token cache per OAuth client, shared by the consumer's and the producer's connections."""
    return OAuthBearerTokens(client)


###############################################################################
# Checking a deployment #######################################################
###############################################################################


CHECK_FETCH_TIMEOUT_S = 10.0  # how long `check` waits for the fetches that tell each partition's end


class CheckReport:
    """`python main.py check` prints one line per check: ok, warning or error, and what to fix."""

    def __init__(self):
        self.errors = 0

    def say(self, level: str, text: str) -> None:
        self.errors += level == "error"
        print(f"{level:<7} {text}", flush=True)


def openssl_time(moment: dt.datetime) -> str:
    """A time as OpenSSL prints certificate dates: 'Jan  1 00:00:00 3000 GMT'."""
    return f"{moment:%b} {moment.day:2d} {moment:%H:%M:%S} {moment.year} GMT"


def distinguished_name(name) -> str:
    """A certificate's subject or issuer as OpenSSL writes it: organizationName=..., commonName=..."""
    from cryptography.x509.oid import NameOID

    # NameOID.ORGANIZATIONAL_UNIT_NAME is OpenSSL's organizationalUnitName, and so on for each attribute.
    long_names = {oid: re.sub(r"_(\w)", lambda m: m.group(1).upper(), constant.lower())
                  for constant, oid in vars(NameOID).items() if not constant.startswith("_")}
    return ", ".join(f"{long_names.get(attribute.oid, attribute.oid.dotted_string)}={attribute.value}"
                     for attribute in name)


def describe_certificate(name: str, path: str) -> tuple[str, str]:
    """Subject, issuer and validity of the (first) certificate in `path`, and whether it is usable now."""
    from cryptography import x509  # only `check` reads certificates: the running kernel leaves them to OpenSSL

    with open(path, "rb") as file:
        try:
            certificate = x509.load_pem_x509_certificate(file.read())
        except ValueError as error:
            return "error", f"{name}: OpenSSL loads it, but its fields cannot be read ({error})"
    subject, issuer = (distinguished_name(dn) for dn in (certificate.subject, certificate.issuer))
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    text = f"{name}: subject {subject}; issuer {issuer}; valid until {openssl_time(not_after)}"
    now = dt.datetime.now(dt.UTC)
    if now < not_before:
        return "error", f"{text}: not valid before {openssl_time(not_before)}; check the machine's clock"
    if now > not_after:
        return "error", f"{text}: EXPIRED; issue a new certificate"
    if (not_after - now).total_seconds() < 14 * 86400:
        return "warning", f"{text}: expires in {(not_after - now).total_seconds() / 86400:.0f} days; renew it"
    return "ok", text


def check_chain(tls: TlsFiles) -> tuple[str, str]:
    """Verify the client certificate against the CA the way a broker does: a TLS handshake in
    memory in which the 'broker' side requires a client certificate signed by KAFKA_CA_CERT. Only a
    warning if not: some clusters sign their clients with another CA than their brokers."""
    broker = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    broker.load_cert_chain(tls.cert_file, tls.key_file)
    broker.load_verify_locations(tls.ca_file)
    broker.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.load_cert_chain(tls.cert_file, tls.key_file)
    to_broker, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ends = (client.wrap_bio(to_client, to_broker), broker.wrap_bio(to_broker, to_client, server_side=True))
    try:
        for _ in range(10):
            done = 0
            for end in ends:
                try:
                    end.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            if done == 2:
                return "ok", "KAFKA_CLIENT_CERT is signed by KAFKA_CA_CERT"
    except ssl.SSLError as error:
        reason = getattr(error, "verify_message", None) or error.reason
        return "warning", (f"KAFKA_CLIENT_CERT is not signed by KAFKA_CA_CERT ({reason}): right if the cluster "
                           "signs its clients with a CA of its own; otherwise use the CA that issued it")
    return "warning", "KAFKA_CLIENT_CERT could not be verified against KAFKA_CA_CERT"


def high_watermarks(consumer: KafkaConsumer, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    """Each partition's end as fetch responses report it (the high watermark), not as a ListOffsets
    request does: some brokers answer that one wrongly (Tansu, after a batched produce)."""
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    deadline = time.monotonic() + CHECK_FETCH_TIMEOUT_S
    while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in partitions):
        consumer.poll(timeout_ms=100, max_records=1)
    return {tp: consumer.highwater(tp) for tp in partitions}


def describe_topic(consumer: KafkaConsumer, topic: str, report: CheckReport, auto_offset_reset: str) -> None:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        report.say("error", f"topic {topic} does not exist or is not visible to this client: check KAFKA_TOPIC")
        return
    report.say("ok", f"topic {topic}: {len(partitions)} partitions")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    ends = high_watermarks(consumer, tps)
    starts = consumer.beginning_offsets(tps) if auto_offset_reset == "earliest" else ends
    for tp, committed in committed_offsets(consumer, tps).items():
        end = ends[tp]
        if committed is UNKNOWN:
            report.say("warning", f"  {topic}[{tp.partition}]: committed offset unknown (the group's coordinator did "
                                  f"not answer within {COMMITTED_TIMEOUT_S:.0f} s), end {end}")
            continue
        if committed is None and end is not None:  # where the group would start, and all from there is lag
            report.say("ok", f"  {topic}[{tp.partition}]: nothing committed: would start at {starts[tp]} "
                             f"(KAFKA_AUTO_OFFSET_RESET={auto_offset_reset}), end {end}, lag {end - starts[tp]}")
            continue
        lag = end - committed if committed is not None and end is not None else None
        if lag is not None and lag < 0:
            report.say("error", f"  {topic}[{tp.partition}]: committed {committed} is past the end {end}: "
                                "the topic was recreated or truncated; the group will restart where "
                                "KAFKA_AUTO_OFFSET_RESET says")
        elif end is None:
            report.say("warning", f"  {topic}[{tp.partition}]: committed {committed}, end unknown (no fetch "
                                  f"answered within {CHECK_FETCH_TIMEOUT_S:.0f} s)")
        else:
            report.say("ok", f"  {topic}[{tp.partition}]: committed {committed}, end {end}, lag {lag}")


def refuses(server: str) -> bool:
    """Whether every address of `server` (host:port) turns a TCP connection away at once: nothing listens there."""
    host, port = server.rsplit(":", 1)
    try:
        for family, kind, protocol, _, address in socket.getaddrinfo(host.strip("[]"), int(port),
                                                                      type=socket.SOCK_STREAM):
            with socket.socket(family, kind, protocol) as connection:
                connection.settimeout(1.0)
                if connection.connect_ex(address) != errno.ECONNREFUSED:
                    return False
    except (OSError, UnicodeError):
        return False
    return True


def refused_twice(servers: list[str]) -> bool:
    """Whether every server refuses the connection, and again a second later (a broker restarting may, once)."""
    if not all(refuses(server) for server in servers):
        return False
    time.sleep(1.0)
    return all(refuses(server) for server in servers)


def check_broker(settings: KernelSettings, tls: TlsFiles | None, report: CheckReport) -> None:
    """Connect as the kernel does, then list each topic's partitions with the group's committed
    offset, the end offset and the lag, and look for the dead-letter topic. When no host name
    resolves, or every server refuses the connection (twice, a second apart), say so at once: the
    kernel would try for KAFKA_BOOTSTRAP_TIMEOUT_MS, in case its DNS is late or its broker starting."""
    hosts = {server.rsplit(":", 1)[0].strip("[]") for server in settings.bootstrap_servers}
    servers = ",".join(settings.bootstrap_servers)
    if not any(resolves(host) for host in hosts):
        report.say("error", f"network: {', '.join(sorted(hosts))} of KAFKA_BOOTSTRAP_SERVERS does not resolve (DNS)")
        return
    if refused_twice(settings.bootstrap_servers):
        report.say("error", f"network: KAFKA_BOOTSTRAP_SERVERS={servers} refused the connection: nothing listens "
                            "there; check the host and port")
        return
    report.say("wait", f"connecting to {servers} over {settings.security}, for up to "
                       f"{settings.bootstrap_timeout_ms} ms (KAFKA_BOOTSTRAP_TIMEOUT_MS)")
    try:
        consumer = connect_consumer(settings, tls, StopSignal())
    except BrokerUnavailable as error:  # AccessRefused too: "authentication: ...", "TLS: ...", "network: ..."
        report.say("error", f"{error.kind}: {error}")
        return
    try:
        report.say("ok", f"connected to {','.join(settings.bootstrap_servers)} over {settings.security}")
        for topic in settings.topics:
            describe_topic(consumer, topic, report, settings.auto_offset_reset)
        if (dead_letters := settings.dead_letter_topic) and not consumer.partitions_for_topic(dead_letters):
            report.say("error", f"dead-letter topic {dead_letters} does not exist or is not visible to this client: "
                                "create it, or correct KERNEL_DEAD_LETTER_TOPIC (the kernel waits for it at start)")
        elif dead_letters:
            report.say("ok", f"dead-letter topic {dead_letters} exists")
        if settings.producer == "confluent-kafka":  # kafka-python's producer connects as the consumer did
            if failure := LibrdkafkaProducer(settings).probe(CHECK_FETCH_TIMEOUT_S):
                report.say("error", f"the producer (confluent-kafka) could not connect: {failure}")
            else:
                report.say("ok", "the producer (confluent-kafka) connected")
    finally:
        consumer.close(autocommit=False)


MACHINERY_STAMP = "MACHINERY_SHA256 = "  # how the last line of this file begins


def machinery_digest(text: str) -> str:
    """SHA-256 of the machinery in main.py's `text`: from the line "# End of your kernel" to the stamp line."""
    machinery = text.replace("\r\n", "\n").split("\n# End of your kernel", 1)[1].split(f"\n{MACHINERY_STAMP}", 1)[0]
    return hashlib.sha256(machinery.encode()).hexdigest()


def machinery_report(path: str = __file__) -> tuple[str, str]:
    """Whether the machinery is as the template shipped it (the stamp at the end of the file says what
    it was), so that an edit meant for your part that reached it (a whole-file search and replace) shows."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if f'\n{MACHINERY_STAMP}"{machinery_digest(text)}"' in text:
        return "ok", "machinery: as the template shipped it (below '# End of your kernel')"
    return "warning", ("machinery: main.py below '# End of your kernel' is not as the template shipped it; "
                       "`git diff template/main -- main.py` shows how (README.md, \"Taking template updates\")")


def check_deployment(env: Mapping[str, str], kernel_name: str, default_topic: str,
                     dotenv_path: str | None = None, read_settings: Callable[[], object] | None = None,
                     takes_batches: bool = False) -> int:
    """Validate settings (after reading the .env at `dotenv_path` into the environment; the kernel's own
    with `read_settings`; with `takes_batches`, for process_batch) as start-up does, tracing's set-up too,
    certificates and the connection, consuming nothing. Exit code 0 when nothing is wrong, 1 when
    something is, 2 for a configuration error."""
    report = CheckReport()
    report.say(*machinery_report())
    try:
        if dotenv_path is not None:
            read_dotenv(dotenv_path)
        settings = load_settings(env, kernel_name, default_topic)
        if takes_batches:
            settings.check_batch_limit()
        with tracing_for(settings):  # what the SDK refuses; its exporters are stopped again at once
            pass
        with tls_files(settings) as tls:
            report.say("ok", f"settings: topics={','.join(settings.topics)} group={settings.group_id} "
                             f"security={settings.security}")
            if read_settings is not None:
                read_settings()
                report.say("ok", "the kernel's own settings (read_settings)")
            if settings.uses_tls and (tls is None or tls.ca_file is None):
                report.say("ok", "KAFKA_CA_CERT not set: the broker's certificate is checked against the system's CAs")
            for name, path in (("KAFKA_CA_CERT", tls and tls.ca_file), ("KAFKA_CLIENT_CERT", tls and tls.cert_file)):
                if path is not None:
                    report.say(*describe_certificate(name, path))
            if tls is not None and tls.cert_file is not None:
                report.say("ok", "KAFKA_CLIENT_KEY matches KAFKA_CLIENT_CERT")
                if tls.ca_file is not None:
                    report.say(*check_chain(tls))
            check_broker(settings, tls, report)
    except ConfigError as error:
        report.say("error", str(error))
        return EXIT_CONFIG
    return EXIT_CHECK_FAILED if report.errors else EXIT_OK


###############################################################################
# Checking your part ##########################################################
###############################################################################


def check_your_part(names: dict | None) -> None:
    """Refuse at import what would break a kernel later and less clearly: a name the machinery needs
    missing from your part (or both handlers there), or a name your part defines (or imports) that the
    machinery also defines: the machinery's own would silently replace yours, in your code too. (A name of
    Python's own was refused before the machinery ran, at its top.)"""
    if names is None:  # importlib.reload: the machinery's names of the first import are still there
        return
    handlers = [name for name in ("process_message", "process_batch") if name in names]
    missing = [name for name in ("KERNEL_NAME", "DEFAULT_TOPIC") if name not in names]
    if not handlers:
        missing.append("process_message (or process_batch)")
    if missing:
        raise ImportError(f"main.py: your part must define {', '.join(missing)}")
    if len(handlers) == 2:
        raise ImportError("main.py: your part defines both process_message and process_batch: keep the one to call")
    clashes = sorted(name for name, value in names.items()
                     if not name.startswith("__") and globals()[name] is not value)
    if clashes:
        raise ImportError(f"main.py: {', '.join(clashes)} defined in your part of main.py is also a name of the "
                          "template's machinery, or of Python, which would replace yours: rename yours")


check_your_part(names_of_your_part)


# The machinery's digest as the template shipped it (devtools/stamp_machinery.py writes it): `check` and
# tests/test_template.py compare it with what is above, from "# End of your kernel" on.
MACHINERY_SHA256 = "4402fb1f0a111e1c6d3ab617a392132a2beba8c8d1f4d7c2858ac7b86232bc61"
