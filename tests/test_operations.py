"""Operations: /healthz, /readyz and /metrics through a kernel's life, JSON logs, and `check`."""

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import trustme

from devtools.broker import free_port
from devtools.tls_proxy import base64_lines
from tests.fixtures import MAIN, REPO, http_get, processed, wait_committed, wait_until

pytestmark = pytest.mark.both_brokers


def metric(text: str, name: str, **labels) -> float | None:
    """The value of the sample `name` with exactly these labels in a Prometheus text scrape."""
    for line in text.splitlines():
        found = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if found and dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or "")) == labels:
            return float(found.group(2))
    return None


def docker_healthcheck(port: int) -> int:
    """Run the Dockerfile's HEALTHCHECK command against a kernel serving on `port`."""
    dockerfile = (REPO / "Dockerfile").read_text()
    command = json.loads(dockerfile.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].split("\n\n")[0].strip())
    return subprocess.run(command, env={"KERNEL_HTTP_PORT": str(port), "PATH": os.environ["PATH"]},
                          capture_output=True, timeout=30).returncode


def test_health_and_readiness_through_starting_joined_stuck_and_stopping(cluster, kernels):
    topic, port = cluster.create_topic(partitions=1), free_port()
    env = kernels.env(topic, "health", KERNEL_HTTP_PORT=port, KAFKA_MAX_POLL_INTERVAL_MS=4000)
    kernel = kernels.start(env)
    status = wait_until(lambda: http_get(port, "/readyz")[0], 10, "the HTTP server")
    assert status == 503 and http_get(port, "/healthz")[0] == 200, "starting: alive, not ready"
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, 30, "readiness once joined")
    assert http_get(port, "/healthz") == (200, "ok\n")
    assert http_get(port, "/nowhere")[0] == 404
    assert docker_healthcheck(port) == 0

    cluster.produce(topic, [(0, None, b"sleep:7")])
    status, text = wait_until(lambda: (r := http_get(port, "/healthz"))[0] == 503 and r, 15, "liveness to fail")
    assert "process_message running for" in text, "a handler stuck past the max-poll interval is not alive"
    assert docker_healthcheck(port) != 0
    wait_until(lambda: (0, 0) in processed(kernels.attempts()), 15, "the slow message")
    # 7 s without a record fetched, more than the session timeout (6 s): heartbeats answered keep it ready
    assert http_get(port, "/readyz") == (200, "ok\n")
    wait_until(lambda: http_get(port, "/healthz")[0] == 200, 5, "liveness to recover")

    cluster.produce(topic, [(0, None, b"sleep:3")])
    time.sleep(1.5)  # the kernel picks it up within a poll (1 s) and is in the middle of it
    kernel.process.send_signal(signal.SIGTERM)
    wait_until(lambda: http_get(port, "/readyz")[0] == 503, 3, "not ready while stopping")
    assert kernel.wait() == 0
    assert (0, 1) in processed(kernels.attempts())


def test_metrics_move_with_the_stream_and_lag_matches_an_independent_client(cluster, kernels):
    topic, port = cluster.create_topic(partitions=1), free_port()
    produced = cluster.produce(topic, [(0, None, b"sleep:60" if i == 50 else f"m{i}".encode()) for i in range(100)])
    kernel = kernels.start(kernels.env(topic, "metrics", KERNEL_HTTP_PORT=port))
    wait_until(lambda: len(processed(kernels.attempts())) == 50, 30, "the messages before the blocking one")
    committed = wait_until(lambda: cluster.committed("metrics", topic, 1)[0] == 50 and 50, 10, "the commit")

    text = wait_until(lambda: (t := http_get(port, "/metrics")[1]) and metric(t, "kernel_consumer_lag", topic=topic,
                      partition="0") == produced[0] - committed and t, 15, "the lag gauge")
    assert metric(text, "kernel_messages_processed_total", topic=topic) == 50
    assert metric(text, "kernel_processing_seconds_count", topic=topic) >= 50
    assert metric(text, "kernel_assigned_partitions") == 1
    assert metric(text, "kernel_rebalances_total") >= 1
    assert metric(text, "kernel_commits_total") >= 1
    assert metric(text, "kernel_commit_failures_total") == 0
    print(f"\nlag: kernel {metric(text, 'kernel_consumer_lag', topic=topic, partition='0'):.0f}, "
          f"independent client {produced[0] - committed}")
    print("\n".join(line for line in text.splitlines() if line.startswith("kernel_") and "_bucket" not in line
                    and "_created" not in line))
    kernel.process.send_signal(signal.SIGKILL)


def test_the_http_port_withstands_idle_clients_and_sigterm_still_works(cluster, kernels):
    """300 clients that connect and say nothing: probes still answer, the kernel holds no thread per
    client, SIGTERM stops it at once, and every line it wrote is JSON (no raw tracebacks)."""
    topic, port = cluster.create_topic(partitions=1), free_port()
    kernel = kernels.start(kernels.env(topic, "http-idle", KERNEL_HTTP_PORT=port, LOG_FORMAT="json"))
    kernel.wait_for_log("Partitions assigned", 30)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(300)]
    try:
        started = time.monotonic()
        assert http_get(port, "/healthz")[0] == 200 and http_get(port, "/readyz")[0] == 200
        assert time.monotonic() - started < 2, "a probe waited behind idle clients"
        threads = len(os.listdir(f"/proc/{kernel.process.pid}/task"))
        assert threads < 30, f"{threads} threads"
    finally:
        for connection in idle:
            connection.close()
    time.sleep(0.5)
    started = time.monotonic()
    assert kernel.stop(signal.SIGTERM) == 0 and time.monotonic() - started < 10
    lines = [line for line in kernel.log().splitlines() if line.strip()]
    assert all(json.loads(line) for line in lines), "a line that is not JSON"
    assert "Traceback" not in kernel.log()


@pytest.mark.skipif(not socket.has_ipv6, reason="this Python has no IPv6")
def test_the_http_port_binds_where_told_ipv6_included(cluster, kernels):
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
    topic, port = cluster.create_topic(partitions=1), free_port()
    kernel = kernels.start(kernels.env(topic, "http-v6", KERNEL_HTTP_PORT=port, KERNEL_HTTP_HOST="::1"))
    wait_until(lambda: ipv6_get(port, "/healthz") == 200, 30, "/healthz on [::1]")
    assert http_get(port, "/healthz")[0] == 0, "127.0.0.1 is not served when told ::1"
    assert kernel.stop() == 0


def ipv6_get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}{path}", timeout=5) as response:
            return response.status
    except OSError:
        return 0


def test_json_logs_parse_and_carry_the_message_coordinates(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"false:1")])
    kernel = kernels.start(kernels.env(topic, "json-logs", LOG_FORMAT="json", KERNEL_RETRY_INITIAL_MS=100))
    wait_until(lambda: (0, 0) in processed(kernels.attempts()), 30, "the retried message")
    assert kernel.stop() == 0
    entries = [json.loads(line) for line in kernel.log().splitlines()]
    assert all({"timestamp", "level", "kernel", "logger", "message"} <= set(e) for e in entries)
    retry = next(e for e in entries if "returned False" in e["message"])
    assert (retry["topic"], retry["partition"], retry["offset"], retry["level"]) == (topic, 0, 0, "WARNING")
    assert {e["kernel"] for e in entries} == {"recording-kernel"}, "the name run_kernel() is given, not main.py's"


def run_check(env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run([sys.executable, str(MAIN), "check"], env=env, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_check_passes_against_the_tls_broker(cluster, kernels):
    topic = cluster.create_topic(partitions=2)
    cluster.produce(topic, [(0, None, b"a"), (1, None, b"b")])
    code, output = run_check(kernels.env(topic, "check-ok"))
    print("\n" + output)
    assert code == 0, output
    assert "ok      KAFKA_CLIENT_CERT is signed by KAFKA_CA_CERT" in output
    assert re.search(r"ok +KAFKA_CA_CERT: subject .*; valid until", output)
    assert f"ok      topic {topic}: 2 partitions" in output
    assert "ok      the producer (confluent-kafka) connected" in output
    assert re.search(rf"{topic}\[1\]: nothing committed: would start at 0 \(KAFKA_AUTO_OFFSET_RESET=earliest\), "
                     "end 1, lag 1", output), output
    assert list(kernels.certificate_tmpdir.iterdir()) == []


def client_env(kernels, ca: trustme.CA, client: trustme.LeafCert, topic: str) -> dict[str, str]:
    env = kernels.env(topic, "check-bad")
    env.update(KAFKA_CA_CERT=base64_lines(ca.cert_pem.bytes()),
               KAFKA_CLIENT_CERT=base64_lines(client.cert_chain_pems[0].bytes()),
               KAFKA_CLIENT_KEY=base64_lines(client.private_key_pem.bytes()))
    return env


def test_check_reports_an_expired_certificate(cluster, kernels, pki):
    now = datetime.datetime.now(datetime.UTC)
    expired = pki.ca.issue_cert("old-client", not_before=now - datetime.timedelta(days=30),
                                not_after=now - datetime.timedelta(days=1))
    code, output = run_check(client_env(kernels, pki.ca, expired, cluster.create_topic(1)))
    assert code == 1 and re.search(r"error +KAFKA_CLIENT_CERT: .*EXPIRED; issue a new certificate", output), output


def test_check_warns_about_a_certificate_expiring_soon(cluster, kernels, pki):
    now = datetime.datetime.now(datetime.UTC)
    soon = pki.ca.issue_cert("soon-client", not_before=now - datetime.timedelta(days=1),
                             not_after=now + datetime.timedelta(days=5))
    code, output = run_check(client_env(kernels, pki.ca, soon, cluster.create_topic(1)))
    assert code == 0 and re.search(r"warning +KAFKA_CLIENT_CERT: .*expires in [45] days; renew it", output), output


def test_check_reports_a_client_certificate_from_another_ca(cluster, kernels, pki):
    other = trustme.CA().issue_cert("stranger")
    code, output = run_check(client_env(kernels, pki.ca, other, cluster.create_topic(1)))
    assert code == 1 and "warning KAFKA_CLIENT_CERT is not signed by KAFKA_CA_CERT" in output, output
    assert re.search(r"^error +TLS: ", output, re.M), "the broker refuses a certificate of a CA it does not trust"


def test_check_passes_a_client_certificate_of_the_clusters_own_client_ca(cluster, kernels, pki):
    """A cluster that signs its clients with a CA other than its brokers': a warning, and exit 0."""
    client = pki.client_ca.issue_cert("kernel-of-another-ca")
    code, output = run_check(client_env(kernels, pki.ca, client, cluster.create_topic(1)))
    assert code == 0 and "warning KAFKA_CLIENT_CERT is not signed by KAFKA_CA_CERT" in output, output
    assert "ok      connected to" in output


def test_check_reports_a_wrong_ca_for_the_broker(cluster, kernels):
    wrong = trustme.CA()
    client = wrong.issue_cert("client")
    code, output = run_check(client_env(kernels, wrong, client, "anything"))
    assert code == 1 and re.search(r"error +TLS: TLS with \S+ failed .*check KAFKA_CA_CERT", output), output


def test_check_reports_a_mismatched_key(cluster, kernels, pki):
    env = kernels.env("anything", "check-bad")
    env["KAFKA_CLIENT_KEY"] = base64_lines(trustme.CA().issue_cert("x").private_key_pem.bytes())
    code, output = run_check(env)
    assert code == 2 and "error   KAFKA_CLIENT_KEY does not match KAFKA_CLIENT_CERT" in output, output


def test_check_gives_up_at_once_when_every_server_refuses(kernels):
    env = kernels.env("anything", "check-refused")  # a bootstrap timeout of 10 s
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()},localhost:{free_port()}"
    started = time.monotonic()
    code, output = run_check(env)
    assert code == 1 and f"error   network: KAFKA_BOOTSTRAP_SERVERS={env['KAFKA_BOOTSTRAP_SERVERS']} refused the " \
                         "connection: nothing listens there" in output, output
    assert time.monotonic() - started < 8, "it waited for the bootstrap timeout"


def test_check_says_what_it_waits_for(kernels):
    """A server that accepts connections but never answers: `check` says what it waits for, and for how long."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        env = kernels.env("anything", "check-silent", KAFKA_BOOTSTRAP_TIMEOUT_MS=1000,
                          KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{silent.getsockname()[1]}")
        code, output = run_check(env)
    assert code == 1 and re.search(r"^wait +connecting to 127\.0\.0\.1:\d+ over SSL, for up to 1000 ms "
                                   r"\(KAFKA_BOOTSTRAP_TIMEOUT_MS\)\nerror +network: no broker", output, re.M), output


def test_check_reports_a_dead_letter_topic_that_does_not_exist_as_the_kernel_waits_for_it(cluster, kernels):
    topic, port = cluster.create_topic(partitions=1), free_port()
    dead_letters = f"t-no-dlt-{uuid.uuid4().hex[:8]}"
    env = kernels.env(topic, "check-dlt", KERNEL_DEAD_LETTER_TOPIC=dead_letters, KERNEL_HTTP_PORT=port)
    code, output = run_check(env)
    assert code == 1 and f"error   dead-letter topic {dead_letters} does not exist or is not visible to this " \
                         "client: create it, or correct KERNEL_DEAD_LETTER_TOPIC" in output, output

    kernel = kernels.start(env)
    kernel.wait_for_log(rf"Topic {dead_letters} does not exist .*waiting for it to be created \(KERNEL_DEAD_LETTER_TOPIC\)")
    assert http_get(port, "/readyz") == (503, f"topic {dead_letters} does not exist\n")
    cluster.broker.create_topic(dead_letters, 1)
    produced = cluster.produce(topic, [(0, None, b"m")])
    wait_committed(cluster, kernel, "check-dlt", topic, produced, 1)  # it goes on once the topic exists
    assert kernel.stop() == 0
    code, output = run_check(env)
    assert code == 0 and f"ok      dead-letter topic {dead_letters} exists" in output, output


@pytest.mark.parametrize("setting", [{"OTEL_PROPAGATORS": "bogus"}, {"KERNEL_CONCURRENCY": "5000"}])
def test_check_reports_what_start_up_would_refuse(kernels, setting):
    code, output = run_check(kernels.env("anything", "check-config", OTEL_TRACES_EXPORTER="console", **setting))
    assert code == 2 and re.search(rf"^error +{next(iter(setting))}", output, re.M), output
    assert "Traceback" not in output


def test_check_says_at_once_that_a_host_does_not_resolve(kernels):
    env = kernels.env("anything", "check-dns", KAFKA_BOOTSTRAP_SERVERS="kafka.invalid:9093")  # 30 s bootstrap timeout
    started = time.monotonic()
    code, output = run_check(env)
    assert code == 1 and "error   network: kafka.invalid of KAFKA_BOOTSTRAP_SERVERS does not resolve (DNS)" in output
    assert time.monotonic() - started < 25, "it waited for the bootstrap timeout"


@pytest.mark.parametrize("argument", ["chek", "check extra"])
def test_an_unknown_command_is_a_usage_error(argument):
    result = subprocess.run([sys.executable, str(MAIN), *argument.split()], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_a_topic_that_does_not_exist_is_waited_for_not_created(cluster, kernels):
    topic, port = f"t-missing-{uuid.uuid4().hex[:8]}", free_port()
    kernel = kernels.start(kernels.env(topic, "missing-topic", KERNEL_HTTP_PORT=port))
    status, text = wait_until(lambda: (r := http_get(port, "/readyz"))[0] == 503 and "exist" in r[1] and r, 15,
                              "readiness to name the missing topic")
    assert text == f"topic {topic} does not exist\n" and http_get(port, "/healthz")[0] == 200
    kernel.wait_for_log(rf"WARNING \[recording-kernel\] Topic {topic} does not exist .*waiting for it to be created")
    time.sleep(2)  # a few checks later: still not created by the kernel, still waiting
    assert topic not in cluster.topics() and kernel.process.poll() is None

    cluster.broker.create_topic(topic, 2)
    produced = cluster.produce(topic, [(p, None, b"m") for p in (0, 1, 1)])
    wait_committed(cluster, kernel, "missing-topic", topic, produced, 2)  # processing starts on its own
    assert http_get(port, "/readyz") == (200, "ok\n")
    assert kernel.stop() == 0


def test_check_finds_a_kernel_that_committed_everything_healthy(cluster, kernels):
    """100 messages produced in batches, processed and committed: lag 0, no error (Tansu's ListOffsets
    answers an end of 1 here; the high watermark of a fetch is right on both brokers)."""
    topic = cluster.create_topic(partitions=1)
    produced = cluster.produce(topic, [(0, None, f"m{i}".encode()) for i in range(100)])
    kernel = kernels.start(kernels.env(topic, "check-healthy"))
    wait_committed(cluster, kernel, "check-healthy", topic, produced, 1)
    assert kernel.stop() == 0
    code, output = run_check(kernels.env(topic, "check-healthy"))
    assert code == 0, output
    assert re.search(rf"ok +  {topic}\[0\]: committed 100, end 100, lag 0", output), output


def test_check_flags_a_committed_offset_past_the_end_of_its_partition(cluster, kernels):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"only")])
    cluster.commit("check-past-end", topic, {0: 5})  # as if the topic had been recreated
    code, output = run_check(kernels.env(topic, "check-past-end"))
    assert code == 1, output
    assert re.search(rf"error +  {topic}\[0\]: committed 5 is past the end 1: the topic was recreated", output), output


def test_check_of_a_batch_kernel_refuses_a_batch_it_would_never_fill(kernels):
    env = kernels.env("anything", "check-batch", KERNEL_BATCH_MAX_MESSAGES=10_000, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "examples.analytics", "check"], env=env, capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2 and "error   KERNEL_BATCH_MAX_MESSAGES (10000) must not exceed" in result.stdout, \
        result.stdout + result.stderr
