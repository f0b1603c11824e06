"""Tests of the kernel's own process_message: extend these as you write yours.

The first tests need no broker: make_message builds the record the kernel would pass, and call()
runs process_message as a worker does, capturing what it send()s and whether it raised DeadLetter.
The last one runs the real `python main.py` against the embedded broker over mutual TLS, the way
the kernel will run in production; `uv run pytest tests/test_process_message.py` runs them all.
These test the template's hello-world handler: @hello_world skips them once KERNEL_NAME is yours.
Replace them with tests of your process_message (and drop the marker from the ones you adapt).
"""

import logging
import uuid

import pytest

import main
from tests.conftest import MAIN, hello_world, wait_until
from tests.kit import call, make_message


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


@hello_world
def test_the_kernel_end_to_end(cluster, kernels):
    """`cluster` is the embedded broker behind mutual TLS; kernels.start runs `python main.py` with
    kernels.env pointing it there (add your own variables as keyword arguments)."""
    topic, group = cluster.create_topic(partitions=2), f"end-to-end-{uuid.uuid4().hex[:6]}"
    produced = cluster.produce(topic, [(i % 2, f"user-{i}".encode(), b'{"event": "signup"}') for i in range(10)])
    kernel = kernels.start(kernels.env(topic, group), script=MAIN)
    wait_until(lambda: cluster.committed(group, topic, 2) == {0: produced[0], 1: produced[1]}, 60,
               f"every message committed\n{kernel.log()[-2000:]}")
    assert kernel.stop() == 0
