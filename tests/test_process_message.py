"""Tests of the kernel's own process_message: extend these as you write yours (`uv run pytest -m author`
runs this file: every test here is marked `author`).

The first tests need no broker: make_message builds the record the kernel would pass, and call()
runs process_message as a worker does, capturing what it send()s and whether it raised DeadLetter.
Those marked @hello_world test the template's hello-world handler: they are deselected once
KERNEL_NAME is yours; replace them with tests of your process_message (without the marker).
The last two hold for any kernel: its name and default topic make valid settings, and the real
`python main.py` runs against the embedded broker over mutual TLS, the way the kernel will run in
production, with your sample messages.
"""

import logging
import uuid

import pytest

import main
from devtools.messages import read_messages
from tests.fixtures import MAIN, REPO, hello_world, settings_from, wait_until
from tests.kit import call, make_message

SAMPLE_MESSAGES = REPO / "devtools" / "sample_messages.jsonl"  # yours: run_local.py --messages takes them too


@hello_world
@pytest.mark.parametrize("value", [b'{"event": "signup"}', "plain text", bytes(range(256)), b"", None])
def test_every_kind_of_value_is_processed(value):
    outcome = call(make_message(value, key="user-1"))
    assert outcome.result is True and outcome.sent == [] and outcome.dead_letter is None


@hello_world
def test_the_message_is_logged_with_its_coordinates(caplog):
    with caplog.at_level(logging.INFO, logger=main.KERNEL_NAME):
        call(make_message({"event": "signup"}, key="user-1", partition=2, offset=41))
    assert f"Received {main.DEFAULT_TOPIC}[2]@41 key='user-1' value='{{\"event\": \"signup\"}}'" in caplog.text


@hello_world
def test_a_long_value_is_shortened_in_the_log(caplog):
    with caplog.at_level(logging.INFO, logger=main.KERNEL_NAME):
        call(make_message("x" * 5000))
    assert "... (5000 characters)" in caplog.text and "x" * 201 not in caplog.text


def test_your_kernel_runs_under_its_name_and_default_topic():
    """Without a broker: the settings your KERNEL_NAME and DEFAULT_TOPIC give (a topic name with a space,
    say, would stop the kernel at start with exit 2; the end-to-end test below names its own topic)."""
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "localhost:9092"})
    assert settings.topics == [t.strip() for t in main.DEFAULT_TOPIC.split(",")]
    assert settings.group_id == f"{main.KERNEL_NAME}-group"


def test_your_kernel_end_to_end(cluster, kernels):
    """What holds for any kernel: each sample message is committed (or dead-lettered, where
    process_message raises DeadLetter), and SIGTERM stops the kernel with 0. The fixtures are
    tests/fixtures.py's: `cluster` is the embedded broker behind mutual TLS; kernels.start runs
    `python main.py` with kernels.env pointing it there (your kernel's own variables go to kernels.env as
    keyword arguments: DATABASE_URL=...)."""
    messages = read_messages(SAMPLE_MESSAGES)
    topic, dead_letters = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1)
    group = f"end-to-end-{uuid.uuid4().hex[:6]}"
    cluster.produce(topic, [(0, m.key, m.value, m.headers) for m in messages])
    kernel = kernels.start(kernels.env(topic, group, KERNEL_DEAD_LETTER_TOPIC=dead_letters), script=MAIN)
    wait_until(lambda: kernel.process.poll() is not None or cluster.committed(group, topic, 1) == {0: len(messages)},
               60, lambda: f"all {len(messages)} sample messages committed\n{kernel.log()[-3000:]}")
    assert kernel.process.poll() is None, f"the kernel exited with code {kernel.process.poll()}\n{kernel.log()[-3000:]}"
    assert kernel.stop() == 0, kernel.log()[-3000:]
    for record in cluster.read_topic(dead_letters, 1, settle_s=0.5):  # where process_message raised DeadLetter
        headers = dict(record.headers())
        assert headers["kafka_dlt-original-topic"] == topic.encode() and headers["kafka_dlt-exception-message"]
