"""The author's loop holds whatever the author's kernel and .env are: a .env meant for a cluster reaches
neither a test's kernel nor, for its connection settings, the local run (tests/test_local_run.py runs
one with it); and the author's tests (`uv run pytest -m author`) still run their kernel end to end, with
nothing skipped, once KERNEL_NAME is theirs."""

import os
import re
import subprocess
import sys
import uuid

import pytest

from devtools.run_local import CONNECTION_SETTINGS
from tests.fixtures import MAIN, RECORDING_KERNEL, copy_repository, wait_committed

# What main.py reads about Kafka that is no connection setting: tuning a cluster's .env may set and a
# local run may keep. A KAFKA_ variable of main.py in neither list fails the test below.
TUNING = {"KAFKA_MAX_POLL_RECORDS", "KAFKA_FETCH_MAX_BYTES", "KAFKA_MAX_PARTITION_FETCH_BYTES", "KAFKA_CHECK_CRCS",
          "KAFKA_SESSION_TIMEOUT_MS", "KAFKA_HEARTBEAT_INTERVAL_MS", "KAFKA_MAX_POLL_INTERVAL_MS",
          "KAFKA_BOOTSTRAP_TIMEOUT_MS", "KAFKA_COMMIT_TIMEOUT_MS", "KAFKA_PRODUCE_TIMEOUT_MS"}
# A .env for a SASL cluster (Confluent Cloud's form), beside main.py.
SASL_DOTENV = """\
KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9
KAFKA_SECURITY_PROTOCOL=SASL_SSL
KAFKA_SASL_MECHANISM=PLAIN
KAFKA_SASL_USERNAME=API-KEY-1
KAFKA_SASL_PASSWORD=api-secret
KAFKA_GROUP_INSTANCE_ID=orders-0
"""


def test_the_local_run_sets_every_connection_setting_main_reads():
    read = set(re.findall(r'"(KAFKA_[A-Z_]+)"', MAIN.read_text()))
    assert "KAFKA_SASL_PASSWORD" in read and len(read) > 20
    unsorted = read - set(CONNECTION_SETTINGS) - TUNING
    assert not unsorted, f"main.py reads {sorted(unsorted)}: add each to run_local.py's CONNECTION_SETTINGS, or here to TUNING"
    assert "KERNEL_DEAD_LETTER_TOPIC" in CONNECTION_SETTINGS


def test_a_dotenv_meant_for_a_cluster_does_not_reach_the_kernels_of_the_tests(cluster, kernels, tmp_path):
    """kernels.env runs a kernel with KERNEL_DOTENV=none: a SASL .env beside the main.py it imports is
    not read. Without it, the same kernel reads that .env, and fails (so the .env is a real one)."""
    project = copy_repository(tmp_path / "project")
    (project / ".env").write_text(SASL_DOTENV)
    topic, group = cluster.create_topic(partitions=1), f"dotenv-{uuid.uuid4().hex[:6]}"
    produced = cluster.produce(topic, [(0, b"k", b"v")])
    script = project / "tests" / RECORDING_KERNEL.name  # whatever the author's handler is; it imports the copy's main.py
    kernel = kernels.start(kernels.env(topic, group), script=script)
    wait_committed(cluster, kernel, group, topic, produced, 1, timeout_s=60)
    assert kernel.stop() == 0 and "security=SSL" in kernel.log(), kernel.log()[-3000:]

    env = kernels.env(topic, group, KAFKA_BOOTSTRAP_TIMEOUT_MS=2000)
    del env["KERNEL_DOTENV"]
    reading = kernels.start(env, script=script)
    assert reading.wait(30) in (3, 5) and "security=SASL_SSL/PLAIN" in reading.log(), reading.log()[-3000:]
    assert "api-secret" not in reading.log()


@pytest.mark.broker  # the tests it runs start one
@pytest.mark.timeout(240)
def test_the_authors_tests_survive_a_rename_and_a_cluster_dotenv(tmp_path):
    """In a copy whose KERNEL_NAME and DEFAULT_TOPIC are an author's, with a SASL .env beside main.py,
    `pytest -m author` runs the end-to-end test of the kernel, skips nothing, and deselects the
    hello-world handler's tests, saying so in its header."""
    project = copy_repository(tmp_path / "project")
    text = MAIN.read_text()
    text = re.sub(r'^KERNEL_NAME = ".*"$', 'KERNEL_NAME = "orders-kernel"', text, count=1, flags=re.M)
    text = re.sub(r'^DEFAULT_TOPIC = ".*"$', 'DEFAULT_TOPIC = "orders"', text, count=1, flags=re.M)
    (project / "main.py").write_text(text)
    (project / ".env").write_text(SASL_DOTENV)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "KERNEL_", "PYTEST_"))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "author", "-n", "0", "-p", "no:cacheprovider", "-rA"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "KERNEL_NAME is 'orders-kernel': the tests of the template's hello-world handler are deselected" in output
    passed = re.findall(r"^PASSED (\S+)$", output, re.M)
    assert "tests/test_process_message.py::test_your_kernel_end_to_end" in passed, output[-4000:]
    assert all(name.startswith("tests/test_process_message.py::") for name in passed), passed
    assert "SKIPPED" not in output and "skipped" not in output and re.search(r"\d+ deselected", output), output[-4000:]
