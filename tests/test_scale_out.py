"""Many replicas of one kernel in one group, on Apache Kafka, as deploy/kubernetes runs them: replicas
added and removed while messages flow (what KEDA does), and a static member restarted (what a rolling
update of the static-membership StatefulSet does). Nothing is lost, commits reach the ends, and a
partition never has two owners at once."""

import re
import signal
import time

import pytest
from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from tests.fixtures import COORDINATOR_MOVING, check_one_owner_at_a_time, processed, wait_committed, wait_until
from tests.test_reliability import report

pytestmark = pytest.mark.brokers("kafka")

PARTITIONS = 6
MAX_POLL_RECORDS = 200


def members(cluster, group: str) -> dict[str, tuple[str, list[int]]] | None:
    """The group as an independent admin client sees it once it is stable: per member, keyed by its
    group.instance.id (or its client id), its member id and partitions; None while it rebalances."""
    admin = AdminClient(cluster.client_config())
    try:
        description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except KafkaException as error:  # the group's coordinator is being chosen or loaded: not stable yet
        if error.args[0].code() not in (*COORDINATOR_MOVING, KafkaError.GROUP_ID_NOT_FOUND):
            raise
        return None
    if description.state != ConsumerGroupState.STABLE:
        return None
    return {member.group_instance_id or member.client_id: (
        member.member_id, sorted(tp.partition for tp in member.assignment.topic_partitions))
        for member in description.members}


def wait_for_group(cluster, group: str, replicas: int, timeout_s: float = 45) -> dict:
    """Wait until the group is stable with `replicas` members sharing every partition."""
    def settled():
        found = members(cluster, group)
        if found and len(found) == replicas and sorted(p for _, ps in found.values() for p in ps) == list(range(PARTITIONS)):
            return found
        return None
    return wait_until(settled, timeout_s, lambda: f"{replicas} members sharing {PARTITIONS} partitions: {members(cluster, group)}",
                      interval_s=0.5)


def coordinator_log(cluster) -> str:
    """What the Apache Kafka node (the group's coordinator) has logged so far."""
    return cluster.broker.nodes[0].log_path.read_text(errors="replace")


def rebalances(kernel) -> tuple[int, int]:
    """How often the kernel has had its partitions revoked and assigned (its log lines)."""
    log = kernel.log()
    return len(re.findall(r"Partitions revoked", log)), len(re.findall(r"Partitions assigned|No partitions assigned", log))


def test_scaling_one_to_six_to_two_replicas_while_messages_flow_loses_nothing(cluster, kernels):
    topic, group = cluster.create_topic(partitions=PARTITIONS), "scale-out"
    env = kernels.env(topic, group, TEST_SLEEP_S=0.002, KERNEL_CONCURRENCY=8, KAFKA_MAX_POLL_RECORDS=MAX_POLL_RECORDS,
                      KAFKA_SESSION_TIMEOUT_MS=cluster.shortest_session_timeout_ms)
    messages = [(i % PARTITIONS, f"key-{i % 100}".encode(), f"m{i}".encode()) for i in range(30_000)]
    replicas = [kernels.start(env)]
    wait_for_group(cluster, group, 1)
    producer = cluster.produce_in_background(topic, messages[:29_400], 20)
    replicas += [kernels.start(env) for _ in range(5)]  # KEDA scales out: 1 -> 6, one partition each
    six = wait_for_group(cluster, group, 6)
    assert all(len(partitions) == 1 for _, partitions in six.values())
    # 100 more a partition, however long the six took to settle on a busy machine: each replica gets some.
    last = cluster.produce(topic, messages[29_400:])
    pids = {kernel.process.pid for kernel in replicas}
    wait_until(lambda: {a.pid for a in kernels.attempts()} >= pids, 30, "every one of the six replicas to process")
    for kernel in replicas[2:]:  # and in: 6 -> 2, each leaving the group as Kubernetes stops it (SIGTERM)
        assert kernel.stop(signal.SIGTERM) == 0
    two = wait_for_group(cluster, group, 2)
    assert sorted(len(partitions) for _, partitions in two.values()) == [3, 3]
    produced = producer.result() + last
    wait_until(lambda: len(processed(kernels.attempts())) == 30_000, 120, "every message processed")
    wait_committed(cluster, replicas[0], group, topic, produced, PARTITIONS)
    for kernel in replicas[:2]:
        assert kernel.stop(signal.SIGTERM) == 0

    attempts = kernels.attempts()
    repeats = report("replicas 1 -> 6 -> 2 while 30,000 messages flow", produced, attempts)
    check_one_owner_at_a_time(attempts)
    # Finished work is committed before a partition moves, up to its first unfinished message: a
    # hand-over redoes what other keys' lanes had finished past it, at most what the partition buffers
    # (2 x KAFKA_MAX_POLL_RECORDS). 0 to 165 repeats over this test's dozen rebalances, in four runs.
    assert repeats <= PARTITIONS * 2 * MAX_POLL_RECORDS
    assert cluster.committed(group, topic, PARTITIONS) == {p: produced[p] for p in range(PARTITIONS)}


def test_a_static_member_restarted_within_the_session_timeout_moves_no_partition(cluster, kernels):
    topic, group = cluster.create_topic(partitions=PARTITIONS), "static-membership"
    # Long enough for a restart, short enough to bound the test should the group wait it out.
    env = kernels.env(topic, group, TEST_SLEEP_S=0.001, KAFKA_SESSION_TIMEOUT_MS=20_000)
    replicas = {f"kernel-{i}": kernels.start({**env, "KAFKA_GROUP_INSTANCE_ID": f"kernel-{i}"}) for i in range(3)}
    before = wait_for_group(cluster, group, 3)
    assert set(before) == set(replicas), f"members are known by their instance ids: {before}"
    time.sleep(2)  # no rebalance is under way when the restart comes
    before = wait_for_group(cluster, group, 3)
    pids = {name: kernel.process.pid for name, kernel in replicas.items()}
    others = {name: rebalances(replicas[name]) for name in ("kernel-0", "kernel-2")}
    producer = cluster.produce_in_background(
        topic, [(i % PARTITIONS, f"key-{i % 60}".encode(), f"m{i}".encode()) for i in range(6_000)], 8)
    time.sleep(2)

    stopping, logged = time.monotonic(), len(coordinator_log(cluster))
    assert replicas["kernel-1"].stop(signal.SIGTERM) == 0  # a static member does not leave the group
    replicas["kernel-1"] = kernels.start({**env, "KAFKA_GROUP_INSTANCE_ID": "kernel-1"})
    replicas["kernel-1"].wait_for_log("Partitions assigned", 30)
    print(f"\nkernel-1 stopped and back with its partitions in {time.monotonic() - stopping:.1f} s")
    produced = producer.result()
    wait_until(lambda: len(processed(kernels.attempts())) == 6_000, 60, "every message processed")
    wait_committed(cluster, replicas["kernel-0"], group, topic, produced, PARTITIONS)

    after = wait_for_group(cluster, group, 3)
    # The coordinator took the new process in place of the old member, in the same generation (in the
    # words of Apache Kafka 4.4's group coordinator, the pinned broker's).
    coordinator = coordinator_log(cluster)
    generation = re.findall(rf"Stabilized group {group} generation (\d+)", coordinator[:logged])[-1]
    assert re.search(rf"groupInstanceId=kernel-1 and unknown member id joins group {group} in Stable state\. "
                     "Replacing previously mapped member", coordinator[logged:]), coordinator[logged:][-3000:]
    assert not re.search(rf"(Preparing to rebalance|Stabilized) group {group} ", coordinator[logged:]), (
        f"the group left generation {generation}")
    # The others kept their member ids and partitions and were never revoked or assigned again: no
    # rebalance reached them. The restarted member is a new one (a new member id) with the same partitions.
    assert {name: rebalances(replicas[name]) for name in others} == others
    assert {name: after[name] for name in others} == {name: before[name] for name in others}
    assert after["kernel-1"][1] == before["kernel-1"][1] and after["kernel-1"][0] != before["kernel-1"][0]
    for kernel in replicas.values():
        assert kernel.stop(signal.SIGTERM) == 0

    attempts = kernels.attempts()
    report("a static member restarted while 6,000 messages flow", produced, attempts)
    check_one_owner_at_a_time(attempts)
    assert len({a.pid for a in attempts}) == 4
    assert cluster.committed(group, topic, PARTITIONS) == {p: produced[p] for p in range(PARTITIONS)}
    # Each partition was processed by its own member only: kernel-1's by the stopped process and its
    # successor, nobody else's meanwhile.
    owners = {name: {pid} for name, pid in pids.items()}
    owners["kernel-1"].add(replicas["kernel-1"].process.pid)
    for name, (_, partitions) in before.items():
        assert {a.pid for a in attempts if a.partition in partitions} <= owners[name], f"{name}'s partitions moved"
