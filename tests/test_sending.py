"""send() from process_message: a message is committed only after what it sent is confirmed, so an
output the broker never got keeps its input uncommitted (and retried) instead of losing it."""

import json
import logging
import re
import ssl
import subprocess
import sys
import time
import uuid

import pytest
from kafka.errors import KafkaTimeoutError

import main
from devtools.broker import free_port
from tests.fixtures import REPO, http_get, settings_from, wait_committed

pytestmark = pytest.mark.both_brokers


def test_an_undelivered_output_keeps_its_input_uncommitted_until_it_is_delivered(cluster, kernels):
    source, output = cluster.create_topic(partitions=2), cluster.create_topic(partitions=2)
    group = f"sending-{uuid.uuid4().hex[:6]}"
    produced = cluster.produce(source, [(i % 2, None, json.dumps({"id": f"e-{i}", "type": "t", "n": i}).encode())
                                        for i in range(20)])
    port = free_port()
    env = kernels.env(source, group, TRANSFORM_OUTPUT_TOPIC=output, KAFKA_PRODUCE_TIMEOUT_MS=1000,
                      KERNEL_RETRY_INITIAL_MS=200, KERNEL_RETRY_MAX_MS=1000, KERNEL_HTTP_PORT=port)
    # The kernel's sends fail for a while; its consumer goes on.
    with cluster.outputs_refused(output):
        kernel = kernels.start(env, module="examples.transform")
        kernel.wait_for_log(r"was not delivered .*; it is processed again")
        time.sleep(3)
        assert cluster.committed(group, source, 2) == {0: None, 1: None}, "committed although its output was lost"
        assert re.search(r"a message it sent was not delivered .* \(attempt [2-9]\); retrying in", kernel.log())
        assert re.search(rf'kernel_send_failures_total{{topic="{output}"}} [1-9]', http_get(port, "/metrics")[1])

    wait_committed(cluster, kernel, group, source, produced, 2, timeout_s=60)
    assert f'kernel_messages_sent_total{{topic="{output}"}} 20.0' in http_get(port, "/metrics")[1]
    assert kernel.stop() == 0
    outputs = {json.loads(record.value())["n"] for record in cluster.read_topic(output, 2)}
    assert outputs == set(range(20)), "an input was committed without its output"


ODD_HANDLER = """import os, sys
sys.path.insert(0, {repo!r})
import main

def process_message(message):
    if message.key is None or message.key.startswith(b"dlt"):
        raise main.DeadLetter("odd on purpose")
    main.send(os.environ["TEST_OUTPUT_TOPIC"], message.value, key=message.key, headers=message.headers)
    return True

sys.exit(main.run_kernel(process_message, name="odd-records", default_topic="unused"))
"""


def test_odd_but_legal_records_are_dead_lettered_and_forwarded(cluster, kernels, tmp_path):
    """Null header values, tombstones, empty values, binary keys, many headers, and a record with
    neither key nor value: legal in Kafka, refused as they are by kafka-python's producer."""
    forward_and_dead_letter_odd_records(cluster, kernels, tmp_path)


@pytest.mark.brokers("tansu")
def test_kafka_pythons_producer_forwards_and_dead_letters_as_well(cluster, kernels, tmp_path):
    """KERNEL_PRODUCER=kafka-python, for a platform without confluent-kafka: the same outcome."""
    forward_and_dead_letter_odd_records(cluster, kernels, tmp_path, KERNEL_PRODUCER="kafka-python")


def forward_and_dead_letter_odd_records(cluster, kernels, tmp_path, **settings) -> None:
    source, output, dlt = (cluster.create_topic(partitions=1) for _ in range(3))
    many = [(f"h{i}", bytes([i])) for i in range(100)]
    odd = [
        (0, b"dlt-null-header", b"v", [("a", None), ("b", b"1")]),
        (0, b"dlt-tombstone", None, []),
        (0, b"dlt-empty", b"", []),
        (0, b"dlt-binary-" + bytes(range(256)), b"v", []),
        (0, b"dlt-many-headers", b"v", many),
        (0, None, None, [("a", None)]),
        (0, b"forward", b"payload", [("a", None), ("b", b"2")]),
    ]
    produced = cluster.produce(source, odd)
    handler = tmp_path / "odd_handler.py"
    handler.write_text(ODD_HANDLER.format(repo=kernels.repo))
    kernel = kernels.start(kernels.env(source, "odd-records", KERNEL_DEAD_LETTER_TOPIC=dlt, TEST_OUTPUT_TOPIC=output,
                                       **settings), script=handler)
    wait_committed(cluster, kernel, "odd-records", source, produced, 1)
    assert kernel.stop() == 0, kernel.log()[-3000:]
    assert f"producer={settings.get('KERNEL_PRODUCER', 'confluent-kafka')}" in kernel.log()

    letters = {record.key(): record for record in cluster.read_topic(dlt, 1)}
    assert set(letters) == {key for _, key, _, _ in odd if key != b"forward"}
    own = {name: value for name, value in letters[b"dlt-null-header"].headers() if not name.startswith("kafka_dlt")}
    assert (own["a"], own["b"]) == (b"", b"1"), "a null header value is kept, empty"
    assert letters[b"dlt-tombstone"].value() is None and letters[b"dlt-empty"].value() == b""
    assert [h for h in letters[b"dlt-many-headers"].headers() if h[0].startswith("h")] == many
    assert letters[None].value() == b"", "neither key nor value: dead-lettered with an empty value"
    [forwarded] = cluster.read_topic(output, 1)
    assert (forwarded.key(), forwarded.value(), forwarded.headers()) == (b"forward", b"payload", [("a", b""), ("b", b"2")])


SIZE_HANDLER = """import os, sys
sys.path.insert(0, {repo!r})
import main

def process_message(message):
    if message.value.startswith(b"dead"):
        raise main.DeadLetter("too big to handle")
    main.send(os.environ["TEST_OUTPUT_TOPIC"], message.value, key=message.key)
    return True

sys.exit(main.run_kernel(process_message, name="sizes", default_topic="unused"))
"""


def test_what_is_too_large_for_the_producer_is_dead_lettered_without_looping(cluster, kernels, tmp_path):
    """A dead letter larger than the producer's limit (KAFKA_FETCH_MAX_BYTES) goes without its value; an
    output too large makes its input a dead letter naming the cause. Neither loops; what follows goes on."""
    too_large_to_publish(cluster, kernels, tmp_path, "producer")


@pytest.mark.brokers("kafka")  # Tansu takes no topic settings
def test_what_is_too_large_for_the_topic_is_dead_lettered_without_looping(cluster, kernels, tmp_path):
    """The same when the broker refuses it: topics whose max.message.bytes is 20,000."""
    too_large_to_publish(cluster, kernels, tmp_path, "topic")


@pytest.mark.brokers("kafka")  # Apache Kafka's default max.message.bytes (1,048,588); Tansu has no limit
def test_a_key_too_large_for_the_dead_letter_topic_goes_without_it(cluster, kernels, tmp_path):
    """A key that fits its own topic but not the dead-letter topic with the dead-letter headers: the
    letter goes without its value and key, saying so, rather than being retried for ever."""
    source, dlt = cluster.create_topic(1), cluster.create_topic(1)
    key = b"K" * 1_048_450
    produced = cluster.produce(source, [(0, key, b"dead"), (0, b"after", b"small")])
    handler = tmp_path / "size_handler.py"
    handler.write_text(SIZE_HANDLER.format(repo=kernels.repo))
    env = kernels.env(source, "sizes-key", KERNEL_DEAD_LETTER_TOPIC=dlt, TEST_OUTPUT_TOPIC=cluster.create_topic(1))
    kernel = kernels.start(env, script=handler)
    wait_committed(cluster, kernel, "sizes-key", source, produced, 1, timeout_s=60)
    assert kernel.stop() == 0, kernel.log()[-3000:]

    [letter] = cluster.read_topic(dlt, 1)
    headers = dict(letter.headers())
    assert (letter.key(), letter.value()) == (None, b"")
    assert headers["kernel-key-dropped"] == b"1048450" and headers["kernel-value-dropped"] == b"4"
    assert headers["kafka_dlt-exception-message"] == b"too big to handle"
    assert "retrying in" not in kernel.log(), "nothing looped"
    assert re.search(r"Dead-lettered \S+\[0\]@0 to \S+ \(without its value of 4 bytes and its key of 1,048,450 bytes",
                     kernel.log())
    # The replay reads both again from where they came from.
    replay_to = cluster.create_topic(1)
    replayed = subprocess.run([sys.executable, str(REPO / "devtools" / "replay_dead_letters.py"), dlt, "--to", replay_to],
                              env=env, capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 0, replayed.stderr
    assert [(r.key(), r.value()) for r in cluster.read_topic(replay_to, 1)] == [(key, b"dead")]


def test_a_dead_letter_too_large_even_without_key_and_value_is_retried_naming_the_true_reason(cluster, kernels, tmp_path):
    """Headers alone over the producer's limit (KAFKA_FETCH_MAX_BYTES): no part the kernel drops makes it
    fit, so it stays uncommitted, and the retries say why, not that the topic could not be reached."""
    source, dlt = cluster.create_topic(1), cluster.create_topic(1)
    cluster.produce(source, [(0, b"k", b"dead", [("big", b"h" * 40_000)])])
    handler = tmp_path / "size_handler.py"
    handler.write_text(SIZE_HANDLER.format(repo=kernels.repo))
    env = kernels.env(source, "sizes-headers", KERNEL_DEAD_LETTER_TOPIC=dlt, TEST_OUTPUT_TOPIC=cluster.create_topic(1),
                      KAFKA_FETCH_MAX_BYTES=32_768, KERNEL_RETRY_INITIAL_MS=100, KERNEL_RETRY_MAX_MS=200)
    kernel = kernels.start(env, script=handler)
    kernel.wait_for_log(r"it could not be dead-lettered \(MessageSizeTooLargeError.* for \S+\[0\]@0 \(attempt 2\)")
    assert kernel.stop() == 0, kernel.log()[-3000:]
    assert "could not be reached" not in kernel.log()
    assert cluster.committed("sizes-headers", source, 1) == {0: None} and cluster.read_topic(dlt, 1) == []


def too_large_to_publish(cluster, kernels, tmp_path, limit: str) -> None:
    small = {"max.message.bytes": "20000"} if limit == "topic" else None
    source, output, dlt = cluster.create_topic(1), cluster.create_topic(1, small), cluster.create_topic(1, small)
    big = 50_000
    produced = cluster.produce(source, [(0, b"dead-big", b"dead" + b"x" * big), (0, b"out-big", b"out" + b"y" * big),
                                        (0, b"after", b"small")])
    handler = tmp_path / "size_handler.py"
    handler.write_text(SIZE_HANDLER.format(repo=kernels.repo))
    env = kernels.env(source, f"sizes-{limit}", KERNEL_DEAD_LETTER_TOPIC=dlt, TEST_OUTPUT_TOPIC=output,
                      KERNEL_RETRY_INITIAL_MS=100, KERNEL_RETRY_MAX_MS=200,
                      **({"KAFKA_FETCH_MAX_BYTES": 32_768} if limit == "producer" else {}))
    kernel = kernels.start(env, script=handler)
    wait_committed(cluster, kernel, f"sizes-{limit}", source, produced, 1, timeout_s=60)
    assert kernel.stop() == 0, kernel.log()[-3000:]

    letters = {record.key(): record for record in cluster.read_topic(dlt, 1)}
    assert set(letters) == {b"dead-big", b"out-big"}
    dropped = letters[b"dead-big"]
    headers = dict(dropped.headers())
    assert dropped.value() == b"" and headers["kernel-value-dropped"] == str(big + 4).encode()
    assert headers["kafka_dlt-exception-message"] == b"too big to handle"
    assert int.from_bytes(headers["kafka_dlt-original-offset"], "big") == 0, "where the value still is"
    reason = dict(letters[b"out-big"].headers())["kafka_dlt-exception-message"].decode()
    assert "a message it sent is too large to be delivered" in reason and "max.message.bytes" in reason
    assert letters[b"out-big"].value() == b"out" + b"y" * big or dict(letters[b"out-big"].headers()).get(
        "kernel-value-dropped"), "the input itself dead-lettered, whole if it fits"
    # What follows goes on (its output may come twice: sent before the failure was known, then again).
    assert {record.key() for record in cluster.read_topic(output, 1)} == {b"after"}
    assert "retrying in" not in kernel.log(), "nothing looped"
    # The replay reads the dropped value again from where it came from.
    replay_to = cluster.create_topic(1)
    replayed = subprocess.run([sys.executable, str(REPO / "devtools" / "replay_dead_letters.py"), dlt, "--to", replay_to],
                              env=env, capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 0, replayed.stderr
    values = {record.key(): record.value() for record in cluster.read_topic(replay_to, 1)}
    assert values[b"dead-big"] == b"dead" + b"x" * big
    assert re.search(r"Dead-lettered \S+\[0\]@0 to \S+ \(without its value of 50,004 bytes", kernel.log())


def test_the_librdkafka_producer_takes_the_kernels_settings_with_certificates_as_pem_text(pki):
    """One set of settings for both clients: librdkafka's names, certificates as text (no key file on disk)."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": "a:1,b:2", **pki.env, "KAFKA_SSL_CHECK_HOSTNAME": "false", "KAFKA_CLIENT_ID": "c",
           "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "secret-7",
           "KAFKA_PRODUCE_TIMEOUT_MS": "2500", "KAFKA_FETCH_MAX_BYTES": "32768"}
    config = main.librdkafka_config(settings_from(env))
    pem = {name: config.pop(name) for name in ("ssl.ca.pem", "ssl.certificate.pem", "ssl.key.pem")}
    assert pem["ssl.ca.pem"] == main.decode_pem("KAFKA_CA_CERT", pki.env["KAFKA_CA_CERT"], "CERTIFICATE").decode()
    assert pem["ssl.certificate.pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert pem["ssl.key.pem"].startswith("-----BEGIN") and "PRIVATE KEY-----" in pem["ssl.key.pem"]
    assert config == {
        "bootstrap.servers": "a:1,b:2", "security.protocol": "SASL_SSL", "client.id": "c-producer", "acks": "all",
        "enable.idempotence": True, "partitioner": "murmur2_random", "message.timeout.ms": 2500,
        "request.timeout.ms": 2500, "topic.metadata.propagation.max.ms": main.MISSING_TOPIC_WAIT_MS,
        "message.max.bytes": 32768, "linger.ms": 0, "ssl.endpoint.identification.algorithm": "none",
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u", "sasl.password": "secret-7"}
    system_store = main.librdkafka_config(settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SECURITY_PROTOCOL": "SSL"}))
    paths = ssl.get_default_verify_paths()
    assert [(name, value) for name, value in system_store.items() if name.startswith("ssl.")] == [
        ("ssl.ca.location", paths.cafile or paths.capath)], "without KAFKA_CA_CERT: the system's CAs, as Python's ssl has them"


def test_librdkafkas_lines_go_through_the_kernels_logging_without_secrets(caplog, capfd):
    """A producer whose broker is not there: its send fails within KAFKA_PRODUCE_TIMEOUT_MS, librdkafka's
    complaints are the kernel's log lines (not raw on stderr), and none holds the password."""
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "KAFKA_SASL_MECHANISM": "PLAIN",
                              "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u",
                              "KAFKA_SASL_PASSWORD": "secret-8", "KAFKA_PRODUCE_TIMEOUT_MS": "1000"})
    producer = main.LibrdkafkaProducer(settings)
    with caplog.at_level(logging.DEBUG):
        future = producer.send("t", b"k", b"v", [])
        with pytest.raises(KafkaTimeoutError):
            future.get(timeout=5)
        producer.close()
    assert future.is_done and isinstance(future.exception, KafkaTimeoutError), future.exception
    assert any(record.name in ("kernel", "librdkafka") and "127.0.0.1" in record.getMessage() for record in caplog.records)
    assert "secret-8" not in caplog.text and "rdkafka" not in capfd.readouterr().err


ENDING = """import glob, sys
sys.path.insert(0, {repo!r})
import main
from tests.fixtures import settings_from

def threads():  # librdkafka names its threads rdk:main, rdk:broker-1...
    return sum(open(comm).read().startswith("rdk:") for comm in glob.glob("/proc/self/task/*/comm"))

settings = settings_from({{"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:{port}", "KAFKA_PRODUCE_TIMEOUT_MS": "500",
                          "KERNEL_SHUTDOWN_TIMEOUT_MS": "100"}})
for use in (lambda producer: producer.probe(0.3), lambda producer: (producer.send("t", b"k", b"v", []),
                                                                    producer.close())):
    producer = main.LibrdkafkaProducer(settings)
    producer.connect()
    running = threads()
    use(producer)
    print(running, threads(), producer.client is None and not producer.poller.is_alive())
"""


def test_a_closed_producer_and_the_probe_of_check_leave_no_thread_of_librdkafkas(tmp_path):
    """Left running into the process's exit, librdkafka's threads crashed it once over TLS (a segmentation
    fault after `check` had said ok): closing the producer destroys its client, and so does `check`'s
    probe. In a process of its own: another test's producer would have threads of its own."""
    script = tmp_path / "ending.py"
    script.write_text(ENDING.format(repo=str(REPO), port=free_port()))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    lines = [line.split() for line in run.stdout.splitlines()]
    assert run.returncode == 0 and len(lines) == 2, run.stdout + run.stderr[-2000:]
    for running, left, ended in lines:
        assert int(running) > 0 and (left, ended) == ("0", "True"), run.stdout


def test_a_refusal_of_the_producers_credentials_is_not_ready_until_a_send_is_delivered():
    """librdkafka says a broker refused the SASL credentials as an error of the client as a whole, never of
    a send (those only time out): while it has messages to deliver, /readyz turns 503 on it, and the loop
    stops the kernel with exit 5 after KAFKA_SESSION_TIMEOUT_MS, as for the consumer's client; a send
    delivered since says they work again. Idle, a refusal (a broker restarting) could mend unseen: ignored."""
    from confluent_kafka import KafkaError

    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "KAFKA_SECURITY_PROTOCOL":
                              "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "KAFKA_SASL_USERNAME": "u",
                              "KAFKA_SASL_PASSWORD": "p", "KAFKA_PRODUCE_TIMEOUT_MS": "2000",
                              "KERNEL_SHUTDOWN_TIMEOUT_MS": "100"})
    health = main.HealthState(settings)
    health.joined = True
    producer = main.LibrdkafkaProducer(settings, health=health)
    report_error = producer.config["error_cb"]  # what librdkafka calls
    refused = KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: Authentication failed")
    report_error(refused)
    assert health.ready() == (True, "ok"), "nothing to deliver: not counted"
    producer.send("out", b"k", b"v", [])  # to a broker that is not there: it stays queued
    report_error(KafkaError(KafkaError._TRANSPORT, "Connect to ipv4#127.0.0.1 failed"))
    assert health.ready() == (True, "ok"), "a lost connection is tried again, as the consumer's"
    report_error(refused)
    report_error(refused)  # librdkafka says it again at each attempt, and for each broker
    ready, reason = health.ready()
    assert not ready and "refused the SASL SCRAM-SHA-256 credentials: check KAFKA_SASL_USERNAME" in reason, reason
    assert health.refusal is not None, "the loop stops the kernel once it lasts a session timeout"

    class Delivered:
        def topic(self):
            return "out"

    main.Delivery(producer).report(None, Delivered())
    assert health.ready() == (True, "ok")
    producer.close()


def test_a_fatal_error_of_the_producer_is_not_ready_and_stops_the_kernel():
    """A fatal error of librdkafka's leaves every later send failing: /readyz says so, and the loop stops
    the kernel (exit 3, its line naming the error; 5 when the broker's ACLs deny the producer), to be
    started again with a new producer, rather than retry, then dead-letter, messages that did nothing wrong."""
    from confluent_kafka import KafkaError

    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1"})
    for error, said, code in (
            (KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, "broker: producer fenced", fatal=True),
             "the producer failed for good (INVALID_PRODUCER_EPOCH", main.EXIT_BROKER),
            (KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED, "InitProducerId denied", fatal=True),
             "the broker denied the producer (CLUSTER_AUTHORIZATION_FAILED", main.EXIT_REFUSED)):
        health = main.HealthState(settings)
        health.joined = True
        producer = main.LibrdkafkaProducer(settings, health=health)
        producer.config["error_cb"](error)
        ready, reason = health.ready()
        assert not ready and reason.startswith(said), reason
        assert main.exit_code_for(health.producer_failed, settings) == code
