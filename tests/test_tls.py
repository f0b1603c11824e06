"""The kernel over mutual TLS: a whole stream processed and committed, certificate files private and
removed, and TLS that really fails without the right certificates. The runs that consume use the
recording handler (tests/recording_kernel.py), so they hold whatever process_message becomes."""

import base64
import signal
import stat
import subprocess
import sys
import time

import pytest
import trustme

from devtools.broker import free_port
from tests.fixtures import MAIN, check_client_certificate_required, processed, wait_until

pytestmark = pytest.mark.both_brokers


def test_stream_over_mutual_tls_is_processed_committed_and_cleaned_up(cluster, kernels):
    topic = cluster.create_topic(partitions=4)
    produced = cluster.produce(topic, [(i % 4, f"k{i}".encode(), f"message-{i}".encode()) for i in range(2000)])
    kernel = kernels.start(kernels.env(topic, "tls-stream"))

    wait_until(lambda: len(processed(kernels.attempts())) == 2000, 60, "2,000 messages processed")
    tls_dirs = list(kernels.certificate_tmpdir.iterdir())
    assert len(tls_dirs) == 1 and stat.S_IMODE(tls_dirs[0].stat().st_mode) == 0o700
    assert sorted(f.name for f in tls_dirs[0].iterdir()) == ["ca.pem", "client.key", "client.pem"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in tls_dirs[0].iterdir())

    assert kernel.stop(signal.SIGTERM) == 0
    assert sorted(processed(kernels.attempts())) == [(p, o) for p in range(4) for o in range(produced[p])]
    assert cluster.committed("tls-stream", topic, 4) == {p: produced[p] for p in range(4)}
    assert list(kernels.certificate_tmpdir.iterdir()) == [], "the certificate directory was left behind"
    assert "security=SSL" in kernel.log()


def test_sigint_stops_cleanly_too(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"one")])
    kernel = kernels.start(kernels.env(topic, "tls-sigint"))
    wait_until(lambda: processed(kernels.attempts()) == {(0, 0)}, 30, "the message processed")
    started = time.monotonic()
    assert kernel.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 5
    assert "Consumer closed" in kernel.log()
    assert list(kernels.certificate_tmpdir.iterdir()) == []


def test_proxy_rejects_a_client_without_a_certificate(cluster, pki):
    check_client_certificate_required(cluster.bootstrap, str(pki.ca_file), str(pki.client_cert_file),
                                      str(pki.client_key_file))


def test_wrong_ca_fails_with_a_clear_error_instead_of_hanging(cluster, kernels):
    wrong_ca = trustme.CA()
    env = kernels.env("unused", "tls-wrong-ca", KAFKA_BOOTSTRAP_TIMEOUT_MS=3000)
    env["KAFKA_CA_CERT"] = wrong_ca.cert_pem.bytes().decode()  # raw PEM is accepted too
    started = time.monotonic()
    kernel = kernels.start(env, script=MAIN)
    assert kernel.wait(timeout_s=30) == 3
    assert time.monotonic() - started < 20
    log = kernel.log()
    assert "Cannot reach the broker (TLS)" in log and "failed verification" in log and "KAFKA_CA_CERT" in log
    assert "Traceback" not in log
    assert list(kernels.certificate_tmpdir.iterdir()) == []


def test_hostname_checking_is_on_by_default_and_can_be_turned_off(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"hello")])
    env = kernels.env(topic, "hostname-check", KAFKA_BOOTSTRAP_TIMEOUT_MS=3000)
    env["KAFKA_BOOTSTRAP_SERVERS"] = cluster.bootstrap_by_another_name
    kernel = kernels.start(env, script=MAIN)
    assert kernel.wait(timeout_s=30) == 3
    assert "failed verification" in kernel.log() and "KAFKA_SSL_CHECK_HOSTNAME" in kernel.log()

    env["KAFKA_SSL_CHECK_HOSTNAME"] = "false"
    kernel = kernels.start(env)
    wait_until(lambda: processed(kernels.attempts()) == {(0, 0)}, 30, "the message processed")
    assert kernel.stop() == 0


def test_unreachable_broker_ends_start_up_after_the_bootstrap_timeout(kernels):
    env = kernels.env("unused", "unreachable", KAFKA_BOOTSTRAP_TIMEOUT_MS=2000)
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    kernel = kernels.start(env, script=MAIN)
    assert kernel.wait(timeout_s=30) == 3
    assert 2 <= time.monotonic() - started < 15
    assert "Cannot reach the broker (network)" in kernel.log() and "KAFKA_BOOTSTRAP_TIMEOUT_MS" in kernel.log()
    assert list(kernels.certificate_tmpdir.iterdir()) == []


def pasted(pki) -> dict[str, str]:
    """The certificates as people paste them: PEM with literal \\n (a platform's variable editor), PEM
    after openssl pkcs12's Bag Attributes, and the base64 of such a file."""
    bag = "Bag Attributes\n    localKeyID: 8A 11 F3\n    friendlyName: kernel-client\nsubject=/CN=kernel-client\n"
    return {
        "KAFKA_CA_CERT": pki.ca.cert_pem.bytes().decode().replace("\n", "\\n"),
        "KAFKA_CLIENT_CERT": bag + pki.client.cert_chain_pems[0].bytes().decode(),
        "KAFKA_CLIENT_KEY": base64.b64encode(bag.encode() + pki.client.private_key_pem.bytes()).decode(),
    }


def test_certificates_are_accepted_as_pasted_by_the_kernel_and_by_check(cluster, kernels, pki):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"hello")])
    env = {**kernels.env(topic, "pasted-certificates"), **pasted(pki)}
    check = subprocess.run([sys.executable, str(MAIN), "check"], env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "ok      KAFKA_CLIENT_CERT is signed by KAFKA_CA_CERT" in check.stdout, check.stdout
    kernel = kernels.start(env)
    wait_until(lambda: processed(kernels.attempts()) == {(0, 0)}, 30, "the message processed over TLS")
    assert kernel.stop() == 0 and "security=SSL" in kernel.log()
