"""Broker failover on a three-node Apache Kafka cluster (KRaft, replication factor 3,
min.insync.replicas=2): while the kernel consumes and forwards with send(), the leader of its
partitions is killed, then its group's coordinator, then every node is restarted in turn. The kernel
never restarts and loses nothing; each pause (kill -> the next output the brokers append) is printed.
And a leader that freezes for longer than the produce timeout: the kernel's sends go on after it."""

import json
import re
import signal
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.fixtures import wait_committed, wait_until
from tests.test_reliability import cpu_seconds

pytestmark = pytest.mark.brokers("kafka-3")

RATE = 200  # input messages a second, while the brokers fail


class SteadyProducer(threading.Thread):
    """Produces JSON events numbered from 0 at RATE a second until stopped, acks=all, through every
    failover (librdkafka retries until its message timeout); counts what was delivered per partition.
    Idempotent: a retry of a write that did land is not written twice, so each partition holds exactly
    what was delivered, which is what the group must end up committing."""

    def __init__(self, cluster, topic: str, partitions: int):
        super().__init__(daemon=True)
        self.producer = Producer(cluster.client_config(**{"acks": "all", "linger.ms": 5, "enable.idempotence": True}))
        self.topic, self.partitions = topic, partitions
        self.sent = 0
        self.delivered: dict[int, int] = {p: 0 for p in range(partitions)}
        self.failed: list[str] = []
        self.stopping = threading.Event()
        self.start()

    def on_delivery(self, error, message) -> None:
        if error is None:
            self.delivered[message.partition()] += 1
        else:
            self.failed.append(str(error))

    def run(self) -> None:
        while not self.stopping.is_set():
            value = json.dumps({"id": f"e-{self.sent}", "type": "t", "n": self.sent}).encode()
            self.producer.produce(self.topic, value, key=f"k{self.sent % 50}".encode(), on_delivery=self.on_delivery)
            self.sent += 1
            self.producer.poll(0)
            time.sleep(1 / RATE)

    def finish(self) -> dict[int, int]:
        self.stopping.set()
        self.join(timeout=10)
        assert self.producer.flush(120) == 0 and not self.failed, f"inputs not delivered: {self.failed[:3]}"
        return self.delivered


def appended_after(cluster, topic: str, partitions: int, since_ms: int) -> int | None:
    """The broker time (LogAppendTime) of the first record of `topic` appended after `since_ms`; None
    while there is none, or while the brokers cannot tell."""
    consumer = Consumer(cluster.client_config(**{"group.id": f"pause-{uuid.uuid4().hex[:6]}"}))
    try:
        found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms + 1) for p in range(partitions)],
                                           timeout=5)
        consumer.assign([tp for tp in found if tp.offset >= 0])
        times, deadline = [], time.monotonic() + 5
        while len(times) < len(consumer.assignment()) and time.monotonic() < deadline:
            record = consumer.poll(0.2)
            if record is not None and record.error() is None:
                times.append(record.timestamp()[1])
                consumer.pause([TopicPartition(topic, record.partition())])
        return min(times, default=None)
    except KafkaException:
        return None
    finally:
        consumer.close()


def coordinator(cluster, group: str) -> int:
    admin = AdminClient({"bootstrap.servers": cluster.broker.plaintext_bootstrap})
    return admin.describe_consumer_groups([group])[group].result(timeout=20).coordinator.id


def test_leader_and_coordinator_killed_and_every_broker_restarted_loses_nothing(cluster, kernels):
    brokers = cluster.broker
    source, output = f"failover-in-{uuid.uuid4().hex[:6]}", f"failover-out-{uuid.uuid4().hex[:6]}"
    brokers.create_topic(source, 3, leader=1)
    brokers.create_topic(output, 3, leader=1, config={"message.timestamp.type": "LogAppendTime"})
    group = "failover"
    producer = SteadyProducer(cluster, source, 3)
    kernel = kernels.start(kernels.env(source, group, TRANSFORM_OUTPUT_TOPIC=output, KERNEL_CONCURRENCY=4),
                           module="examples.transform")
    kernel.wait_for_log("Partitions assigned", 60)
    wait_until(lambda: cluster.read_topic(output, 3, settle_s=0.5), 30, "the first outputs")
    pauses: list[tuple[str, float]] = []

    def fail(what: str, node_id: int, graceful: bool = False) -> None:
        """Stop a node (SIGKILL, or SIGTERM for a rolling restart), time the pause, start it again."""
        node = brokers.node(node_id)
        killed_ms, cpu_before = int(time.time() * 1000), cpu_seconds(kernel.process.pid)
        brokers.stop_node(node, signal.SIGTERM if graceful else signal.SIGKILL)
        resumed_ms = wait_until(lambda: appended_after(cluster, output, 3, killed_ms), 90,
                                lambda: f"outputs after {what}\n{kernel.log()[-3000:]}", interval_s=0.2)
        pause_s, cpu_s = (resumed_ms - killed_ms) / 1000, cpu_seconds(kernel.process.pid) - cpu_before
        pauses.append((f"{what} (node {node_id})", pause_s, cpu_s))
        # No busy loop while the brokers still name a dead coordinator: 2.7-6.2 s of CPU in such a
        # pause before the kernel backed off, 0.2-0.5 s after (with the input flowing all along).
        assert cpu_s < 2 + pause_s / 10, f"{cpu_s:.1f} s of CPU in a {pause_s:.1f} s pause after {what}"
        brokers.start_node(node)
        brokers.wait_in_sync([source, output, "__consumer_offsets"], timeout_s=90)
        assert kernel.process.poll() is None, f"the kernel exited after {what}\n{kernel.log()[-3000:]}"

    fail("leader of every partition killed", brokers.leaders(source)[0])
    fail("group coordinator killed", coordinator(cluster, group))
    for node in brokers.nodes:
        fail("rolling restart", node.node_id, graceful=True)

    produced = producer.finish()
    wait_committed(cluster, kernel, group, source, produced, 3, timeout_s=120)
    assert kernel.process.poll() is None, "the kernel restarted"
    assert kernel.stop() == 0
    outputs = {json.loads(record.value())["n"] for record in cluster.read_topic(output, 3)}
    assert outputs == set(range(producer.sent)), f"{producer.sent - len(outputs)} inputs without their output"
    print("\nfailover pauses (kill -> next output appended): "
          + "; ".join(f"{what}: {s:.1f} s ({cpu:.1f} s of CPU)" for what, s, cpu in pauses))


SLOW_FORWARDER = """import os, sys, time
sys.path.insert(0, {repo!r})
import main


def process_message(message):
    main.send(os.environ["TEST_OUTPUT_TOPIC"], message.value, key=message.key)
    time.sleep(0.05)  # so that records are still in hand while the broker is frozen
    return True


sys.exit(main.run_kernel(process_message, name="slow-forwarder", default_topic="unused"))
"""


def test_sends_go_on_after_a_produce_request_timed_out_on_a_frozen_leader(cluster, kernels, tmp_path):
    """A leader that stops answering but keeps its connections (a long GC pause, a hung disk: SIGSTOP
    here) times the kernel's produce request out on the client's side. kafka-python 2.3.3 then kept
    the output partition muted for good: every later send expired, and nothing was committed again
    until a restart (KernelProducer.mended). kafka-python's producer (KERNEL_PRODUCER), whose line says so."""
    brokers = cluster.broker
    source, output = f"frozen-in-{uuid.uuid4().hex[:6]}", f"frozen-out-{uuid.uuid4().hex[:6]}"
    brokers.create_topic(source, 1, leader=2)
    brokers.create_topic(output, 1, leader=3)
    produced = cluster.produce(source, [(0, None, f"m{i}".encode()) for i in range(200)])
    handler = tmp_path / "slow_forwarder.py"
    handler.write_text(SLOW_FORWARDER.format(repo=kernels.repo))
    kernel = kernels.start(kernels.env(source, "frozen", KAFKA_PRODUCE_TIMEOUT_MS=2000, TEST_OUTPUT_TOPIC=output,
                                       KERNEL_PRODUCER="kafka-python"), script=handler)
    kernel.wait_for_log("Partitions assigned", 60)
    time.sleep(1)  # sending: the 200 take 10 s
    leader = brokers.node(3).process
    leader.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: re.search(r"Error sending produce request .*RequestTimedOutError", kernel.log()), 20,
                   lambda: f"a produce request timed out\n{kernel.log()[-3000:]}")
    finally:
        leader.send_signal(signal.SIGCONT)
    wait_committed(cluster, kernel, "frozen", source, produced, 1, timeout_s=60)
    assert kernel.stop() == 0
    assert {record.value() for record in cluster.read_topic(output, 1)} == {f"m{i}".encode() for i in range(200)}
    brokers.wait_in_sync([source, output, "__consumer_offsets"], timeout_s=90)
