"""Configuration errors: exit code 2, one line naming the variable, no traceback, no secret in the
output, and no certificate file left behind."""

import base64
import re
import shutil
import subprocess
import sys
import time

import pytest
import trustme

from devtools.tls_proxy import base64_lines
from tests.fixtures import MAIN


@pytest.fixture(scope="module")
def other_client(pki):
    return trustme.CA().issue_cert("someone-else")


def run_kernel(env: dict[str, str], cwd, script=MAIN) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script)], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=30)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


CASES = {
    "missing bootstrap servers": ({"KAFKA_BOOTSTRAP_SERVERS": ""}, "KAFKA_BOOTSTRAP_SERVERS is required"),
    "certificate without key": ({"KAFKA_CLIENT_KEY": ""}, "KAFKA_CLIENT_KEY not set: a client certificate for "
                                "mutual TLS needs both"),
    "key without certificate": ({"KAFKA_CLIENT_CERT": ""}, "KAFKA_CLIENT_CERT not set"),
    "key not base64": ({"KAFKA_CLIENT_KEY": "this is not base64 %%%"}, "KAFKA_CLIENT_KEY is not valid base64"),
    "CA not PEM": ({"KAFKA_CA_CERT": b64("hello world")}, "KAFKA_CA_CERT does not decode to a PEM certificate"),
    "certificate PEM garbage": (
        {"KAFKA_CLIENT_CERT": b64("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")},
        "KAFKA_CLIENT_CERT is not a valid PEM certificate",
    ),
    "key given as certificate": ({"KAFKA_CLIENT_KEY": "@client-cert"},
                                 "KAFKA_CLIENT_KEY holds a certificate, not a private key (KAFKA_CLIENT_CERT and "
                                 "KAFKA_CLIENT_KEY swapped?)"),
    "certificate given as key": ({"KAFKA_CLIENT_CERT": "@client-key"},
                                 "KAFKA_CLIENT_CERT holds a private key, not a certificate (KAFKA_CLIENT_CERT and "
                                 "KAFKA_CLIENT_KEY swapped?)"),
    "key of another certificate": ({"KAFKA_CLIENT_KEY": "@other-key"},
                                   "KAFKA_CLIENT_KEY does not match KAFKA_CLIENT_CERT"),
    "unreadable number": ({"KAFKA_MAX_POLL_RECORDS": "lots"}, "KAFKA_MAX_POLL_RECORDS must be a whole number, got 'lots'"),
    "number too small": ({"KAFKA_SESSION_TIMEOUT_MS": "0"}, "KAFKA_SESSION_TIMEOUT_MS must be at least"),
    "heartbeat above session": ({"KAFKA_HEARTBEAT_INTERVAL_MS": "7000"}, "KAFKA_HEARTBEAT_INTERVAL_MS (7000) must be lower"),
    "not a boolean": ({"KAFKA_SSL_CHECK_HOSTNAME": "maybe"}, "KAFKA_SSL_CHECK_HOSTNAME must be true or false"),
    "unknown offset reset": ({"KAFKA_AUTO_OFFSET_RESET": "middle"}, "KAFKA_AUTO_OFFSET_RESET must be one of earliest, latest"),
    "unknown log level": ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
    "port not a number": ({"KAFKA_BOOTSTRAP_SERVERS": "localhost:notaport"}, "KAFKA_BOOTSTRAP_SERVERS must be host:port"),
    "topic with a space": ({"KAFKA_TOPIC": "orders v2"}, "KAFKA_TOPIC holds 'orders v2', which is not a Kafka topic name"),
    "topic as a pattern": ({"KAFKA_TOPIC": "^sm.*"}, "KAFKA_TOPIC holds '^sm.*', which is not a Kafka topic name"),
    "unknown protocol": ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL"),
    "certificates over PLAINTEXT": ({"KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}, "KAFKA_CA_CERT, KAFKA_CLIENT_CERT, "
                                    "KAFKA_CLIENT_KEY set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS"),
    "mechanism without SASL": ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u",
                                "KAFKA_SASL_PASSWORD": "secret-1"}, "KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL=SSL does not use SASL"),
    "SASL without mechanism": ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SECURITY_PROTOCOL=SASL_SSL needs "
                               "KAFKA_SASL_MECHANISM"),
    "password without user": ({"KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_PASSWORD": "secret-2"},
                              "KAFKA_SASL_USERNAME not set: KAFKA_SASL_MECHANISM=SCRAM-SHA-512 needs"),
    "password without mechanism": ({"KAFKA_SASL_PASSWORD": "secret-3"}, "KAFKA_SASL_PASSWORD is set but "
                                   "KAFKA_SASL_MECHANISM is not"),
    "unknown mechanism": ({"KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM must be one of PLAIN, SCRAM-SHA-256"),
    "OAUTHBEARER without endpoint": ({"KAFKA_SASL_MECHANISM": "OAUTHBEARER", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "c",
                                      "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "secret-4"},
                                     "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL not set"),
    "OAUTHBEARER with a password": ({"KAFKA_SASL_MECHANISM": "OAUTHBEARER", "KAFKA_SASL_PASSWORD": "secret-5"},
                                    "KAFKA_SASL_PASSWORD is not used with KAFKA_SASL_MECHANISM=OAUTHBEARER"),
    "OAuth client with PLAIN": ({"KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "secret-6"},
                                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET is only used with KAFKA_SASL_MECHANISM=OAUTHBEARER"),
    "fetch size past int32": ({"KAFKA_FETCH_MAX_BYTES": "3000000000"},
                              "KAFKA_FETCH_MAX_BYTES must be at most 2147483647, got 3000000000"),
    "poll interval past int32": ({"KAFKA_MAX_POLL_INTERVAL_MS": "3000000000"},
                                 "KAFKA_MAX_POLL_INTERVAL_MS must be at most 2147483647"),
    "produce timeout past int32": ({"KAFKA_PRODUCE_TIMEOUT_MS": "3000000000"},
                                   "KAFKA_PRODUCE_TIMEOUT_MS must be at most 2147483647"),
    "too many workers": ({"KERNEL_CONCURRENCY": "5000"}, "KERNEL_CONCURRENCY must be at most 1000, got 5000"),
    "unknown producer": ({"KERNEL_PRODUCER": "librdkafka"}, "KERNEL_PRODUCER must be one of confluent-kafka, "
                         "kafka-python, got 'librdkafka'"),
    "unknown propagator": ({"OTEL_TRACES_EXPORTER": "console", "OTEL_PROPAGATORS": "bogus"},
                           "OTEL_PROPAGATORS refused by OpenTelemetry: Propagator bogus not found"),
    "empty span batches": ({"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "0"},
                           "OTEL_BSP_MAX_EXPORT_BATCH_SIZE refused by OpenTelemetry: max_export_batch_size must"),
}


@pytest.mark.parametrize("case", CASES)
def test_configuration_error(case, kernels, pki, other_client, tmp_path):
    overrides, expected = CASES[case]
    env = kernels.env("topic", "group")
    aliases = {"@client-cert": env["KAFKA_CLIENT_CERT"], "@client-key": env["KAFKA_CLIENT_KEY"],
               "@other-key": base64_lines(other_client.private_key_pem.bytes())}
    env.update({name: aliases.get(value, value) for name, value in overrides.items()})
    code, output, _ = run_kernel(env, tmp_path)

    assert code == 2, output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"Configuration error: {expected}" in errors[0], output
    assert "Traceback" not in output
    for secret in [value for value in overrides.values() if value.startswith("secret-")]:
        assert secret not in output, "a password appeared in the output"
    for secret in (pki.env["KAFKA_CLIENT_KEY"], aliases["@other-key"]):
        for line in secret.splitlines()[1:-1]:
            assert line not in output, "a secret appeared in the output"
    assert pki.client.private_key_pem.bytes().decode().splitlines()[1] not in output
    assert list(kernels.certificate_tmpdir.iterdir()) == []


def test_dotenv_fills_in_but_the_real_environment_wins(kernels, tmp_path):
    shutil.copy(MAIN, tmp_path / "main.py")  # .env is read from beside main.py
    (tmp_path / ".env").write_text("KAFKA_MAX_POLL_RECORDS=lots\nKAFKA_BOOTSTRAP_TIMEOUT_MS=1000\n")
    env = kernels.env("topic", "group", tls=False)
    env["KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:1"
    del env["KAFKA_BOOTSTRAP_TIMEOUT_MS"], env["KERNEL_DOTENV"]  # this test's .env is read

    code, output, _ = run_kernel(env, tmp_path, tmp_path / "main.py")
    assert code == 2 and "KAFKA_MAX_POLL_RECORDS must be a whole number" in output

    env["KAFKA_MAX_POLL_RECORDS"] = "600"  # valid for a process_batch kernel too (its batches take up to 1,000)
    code, output, _ = run_kernel(env, tmp_path, tmp_path / "main.py")
    assert code == 3 and "within 1000 ms" in output, output


def test_dotenv_is_read_before_your_part_runs(kernels, tmp_path):
    """Module-level code of the author's part (say DATABASE_URL = os.environ.get(...)) sees .env."""
    # Whatever the kernel is called, its name now comes from the environment, read at module level.
    text = re.sub(r"^KERNEL_NAME = .*$", 'import os\n\nKERNEL_NAME = os.environ.get("TEST_KERNEL_NAME", "x")',
                  MAIN.read_text(), count=1, flags=re.M)
    (tmp_path / "main.py").write_text(text)
    (tmp_path / ".env").write_text("TEST_KERNEL_NAME=named-in-dotenv\nKAFKA_BOOTSTRAP_TIMEOUT_MS=1000\n")
    env = kernels.env("topic", "group", tls=False, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    del env["KAFKA_BOOTSTRAP_TIMEOUT_MS"], env["KAFKA_CONSUMER_GROUP"], env["KERNEL_DOTENV"]
    code, output, _ = run_kernel(env, tmp_path, tmp_path / "main.py")
    assert code == 3 and "group=named-in-dotenv-group" in output, output


@pytest.mark.parametrize("command", [[], ["check"]])
def test_a_dotenv_line_that_cannot_be_read_is_named_not_skipped(kernels, tmp_path, command):
    shutil.copy(MAIN, tmp_path / "main.py")
    (tmp_path / ".env").write_text('KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1\nKAFKA_TOPIC="small\nKAFKA_SASL_PASSWORD="s3cret\n')
    env = kernels.env("topic", "group", tls=False)
    del env["KAFKA_TOPIC"], env["KAFKA_BOOTSTRAP_SERVERS"], env["KERNEL_DOTENV"]
    result = subprocess.run([sys.executable, str(tmp_path / "main.py"), *command], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and ".env line 2 (KAFKA_TOPIC) cannot be read: check its quotes" in output, output
    assert "Traceback" not in output and "could not parse" not in output and "s3cret" not in output
    assert len([line for line in output.splitlines() if line.strip() and not line.startswith("ok ")]) == 1, output  # check: its ok lines too


def test_a_kernel_name_with_a_slash_runs_over_tls(kernels, cluster, tmp_path):
    """The certificate folder's name does not come from KERNEL_NAME, so "orders/v2" works with TLS too."""
    text = MAIN.read_text().replace('KERNEL_NAME = "hello-world"', 'KERNEL_NAME = "orders/v2"', 1)
    (tmp_path / "main.py").write_text(text)
    env = kernels.env("unused", "group", KAFKA_BOOTSTRAP_TIMEOUT_MS=1000, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    code, output, _ = run_kernel(env, tmp_path, tmp_path / "main.py")
    assert code == 3 and "Cannot reach the broker (network)" in output and "Traceback" not in output, output


def test_a_metrics_folder_that_does_not_exist_is_a_configuration_error(kernels, tmp_path):
    env = kernels.env("topic", "group", tls=False, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", KERNEL_HTTP_PORT="0",
                      PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "missing"))
    code, output, _ = run_kernel(env, tmp_path)
    assert code == 2 and "PROMETHEUS_MULTIPROC_DIR names" in output and "Traceback" not in output, output


def test_a_dotenv_in_a_folder_above_is_not_read(kernels, tmp_path):
    """Only the .env beside main.py: one in a parent folder (or $HOME) must not set the cluster,
    the group or the certificates of a kernel below it."""
    kernel_folder = tmp_path / "kernel"
    kernel_folder.mkdir()
    shutil.copy(MAIN, kernel_folder / "main.py")
    (tmp_path / ".env").write_text("KAFKA_MAX_POLL_RECORDS=lots\n")
    env = kernels.env("topic", "group", tls=False, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", KAFKA_BOOTSTRAP_TIMEOUT_MS=1000)
    del env["KERNEL_DOTENV"]  # the default: the .env beside main.py, none there
    code, output, _ = run_kernel(env, kernel_folder, kernel_folder / "main.py")
    assert code == 3 and "within 1000 ms" in output, output


@pytest.mark.parametrize("command", [[], ["check"]])
def test_kernel_dotenv_chooses_the_dotenv_file_or_none(kernels, tmp_path, command):
    """KERNEL_DOTENV=none reads no .env (the tests' kernels: a .env meant for a cluster never reaches them),
    before your part runs too; a path reads that file instead; a path that is not a file is exit 2."""
    text = re.sub(r"^KERNEL_NAME = .*$", 'import os\n\nKERNEL_NAME = os.environ.get("TEST_KERNEL_NAME", "x")',
                  MAIN.read_text(), count=1, flags=re.M)
    (tmp_path / "main.py").write_text(text)
    (tmp_path / ".env").write_text("TEST_KERNEL_NAME=named-in-dotenv\nKAFKA_SECURITY_PROTOCOL=SASL_SSL\n"
                                   "KAFKA_SASL_MECHANISM=PLAIN\nKAFKA_SASL_USERNAME=u\nKAFKA_SASL_PASSWORD=s3cret\n")
    (tmp_path / "other.env").write_text("TEST_KERNEL_NAME=named-in-other\n")
    env = kernels.env("topic", "group", tls=False, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", KAFKA_BOOTSTRAP_TIMEOUT_MS=1000)
    del env["KAFKA_CONSUMER_GROUP"]
    main_py = str(tmp_path / "main.py")
    results = {}
    for chosen in ("none", str(tmp_path / "other.env"), str(tmp_path / "missing.env")):
        result = subprocess.run([sys.executable, main_py, *command], env={**env, "KERNEL_DOTENV": chosen}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=30)
        results[chosen] = (result.returncode, result.stdout + result.stderr)
    code, output = results["none"]
    assert code == (1 if command else 3) and "group=x-group" in output and "security=PLAINTEXT" in output, output
    code, output = results[str(tmp_path / "other.env")]
    assert code == (1 if command else 3) and "group=named-in-other-group" in output, output
    code, output = results[str(tmp_path / "missing.env")]
    assert code == 2 and f"KERNEL_DOTENV names no file: '{tmp_path / 'missing.env'}'" in output, output
    assert "Traceback" not in output and len([line for line in output.splitlines() if line.strip() and not line.startswith("ok ")]) == 1, output


@pytest.mark.brokers("kafka")  # Tansu left its JoinGroup unanswered for 30 s with this session timeout
def test_a_session_timeout_above_the_clients_request_timeout_runs(cluster, kernels):
    """KAFKA_SESSION_TIMEOUT_MS=310000, above kafka-python's default request timeout (305 s): the kernel joins."""
    topic = cluster.create_topic(partitions=1)
    kernel = kernels.start(kernels.env(topic, "long-session", KAFKA_SESSION_TIMEOUT_MS=310000), script=MAIN)
    kernel.wait_for_log("Partitions assigned")
    assert kernel.stop() == 0
