"""The kernel author's test kit: call process_message the way the kernel does, without a broker.

    from tests.kit import call, make_message

    outcome = call(make_message({"id": "e-1"}, key="user-1"))
    assert outcome.result is True
    assert outcome.sent == [Sent("output-topic", b"user-1", b'{"id": "e-1"}', [])]

make_message builds the kafka-python ConsumerRecord the kernel passes (topic, partition, offset,
key, value, headers, timestamp). call() runs a handler (main.process_message unless given) with
send() captured instead of produced, and reports what the kernel would do: commit (result True),
retry (False; retry_after the seconds RetryLater asked for) or dead-letter (DeadLetter raised, with
its reason). call_batch() does the same for a
process_batch and a list of messages, and says how many of them would be committed. Any other
exception propagates, as it would stop the kernel. tests/test_process_message.py shows call() and a
run end to end; tests/test_analytics.py uses call_batch() on the analytics example.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.future import Future

import main


class Sent(NamedTuple):
    """A message process_message passed to send()."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass
class Outcome:
    result: bool | None  # what process_message returned; None when it raised DeadLetter
    sent: list[Sent] = field(default_factory=list)
    dead_letter: str | None = None  # the DeadLetter reason
    retry_after: float | None = None  # the seconds RetryLater asked for (result False)

    @property
    def committed(self) -> bool:
        return self.result is True


def as_bytes(data: bytes | str | dict | list | None) -> bytes | None:
    """bytes as given, str as UTF-8, a dict or list as JSON."""
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    return json.dumps(data).encode()


def make_message(value: bytes | str | dict | list | None = b"", key: bytes | str | None = None, *,
                 topic: str = main.DEFAULT_TOPIC, partition: int = 0, offset: int = 0,
                 headers: list[tuple[str, bytes]] | None = None, timestamp_ms: int | None = None) -> ConsumerRecord:
    """A record as the kernel hands it to process_message (timestamp: now, CreateTime). Each call makes
    a new message, with a message_id() of its own, as a producer would; to deliver the same record
    twice, pass the same one again (or the same timestamp_ms)."""
    key_bytes, value_bytes = as_bytes(key), as_bytes(value)
    headers = list(headers or [])
    return ConsumerRecord(
        topic=topic, partition=partition, leader_epoch=0, offset=offset,
        timestamp=int(time.time() * 1000) if timestamp_ms is None else timestamp_ms, timestamp_type=0,
        key=key_bytes, value=value_bytes, headers=headers, checksum=None,
        serialized_key_size=-1 if key_bytes is None else len(key_bytes),
        serialized_value_size=-1 if value_bytes is None else len(value_bytes),
        serialized_header_size=sum(len(name) + len(data or b"") for name, data in headers) or -1,
    )


class CapturedProducer:
    """Stands in for the kernel's producer: every send is recorded and confirmed at once."""

    timeout_s = 0.0  # how long the kernel waits for a confirmation: none is awaited

    def __init__(self):
        self.sent: list[Sent] = []

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list) -> Future:
        self.sent.append(Sent(topic, key, value, headers))
        return Future().success(None)


@dataclass
class BatchOutcome:
    result: bool | None  # what process_batch returned; None when it raised DeadLetter
    done: int  # how many of the messages, from the first, the kernel would commit
    sent: list[Sent] = field(default_factory=list)
    dead_letter: tuple[ConsumerRecord, str] | None = None  # the message DeadLetter named, and the reason
    retry_after: float | None = None  # the seconds RetryLater asked for (result False)


def call(message: ConsumerRecord, handler: Callable[[Any], bool] | None = None) -> Outcome:
    """Run `handler` (default: main.process_message) on `message` as a kernel worker does: through
    main.process_task, the kernel's own path of a message, in a task of its own."""
    producer = CapturedProducer()
    task = main.LaneTask(TopicPartition(message.topic, message.partition), [], [message])
    failure = main.process_task(task, handler or main.process_message, main.StopSignal(), producer).failure
    if failure is None:
        return Outcome(True, producer.sent)
    if failure.consequence is main.Consequence.FATAL:  # the kernel would stop: the handler's exception, or a wrong result
        raise failure.error.__cause__ from None
    dead_letter = failure.reason if failure.consequence is main.Consequence.DEAD_LETTER else None
    return Outcome(None if dead_letter else False, producer.sent, dead_letter, failure.delay_s)


def call_batch(messages: list[ConsumerRecord], handler: Callable[[list], bool] | None = None) -> BatchOutcome:
    """Run `handler` (default: main.process_batch) on `messages` as a kernel worker would, with the
    kernel's own rules for what its result means (main.process_as_batch)."""
    handler = handler or getattr(main, "process_batch", None)
    if handler is None:
        raise TypeError("call_batch() needs a handler: main.py defines no process_batch")
    producer = CapturedProducer()
    done, _, failure = main.process_as_batch(handler, list(messages), producer)
    if failure is None:
        return BatchOutcome(True, done, producer.sent)
    if failure.consequence is main.Consequence.FATAL:  # the kernel would stop
        raise failure.error.__cause__ from None
    if failure.consequence is main.Consequence.DEAD_LETTER:
        return BatchOutcome(None, done, producer.sent, (messages[done], failure.reason))
    return BatchOutcome(False, 0, producer.sent, retry_after=failure.delay_s)
