"""False means "try again": the message is retried with backoff, nothing after it in its partition
goes first, other partitions go on, and the partition delivers again once its wait ends even when
every other partition is idle (the kafka-python 3.0.12 pause defect: docs/reference.md, "About the Kafka client")."""

import signal

import pytest

from tests.fixtures import wait_until

pytestmark = pytest.mark.both_brokers


def test_false_is_retried_in_order_while_other_partitions_go_on(cluster, kernels):
    topic = cluster.create_topic(partitions=3)
    messages = [(0, None, b"false:2" if i == 2 else f"p0-{i}".encode()) for i in range(100)]
    messages += [(p, None, f"p{p}-{i}".encode()) for p in (1, 2) for i in range(5)]
    produced = cluster.produce(topic, messages)
    # Small polls leave records of partition 0 buffered in the client when it is paused: the
    # condition under which kafka-python 3.0.12 never delivers from it again.
    env = kernels.env(topic, "retries", KERNEL_RETRY_INITIAL_MS=1000, KERNEL_RETRY_MAX_MS=2000,
                      KAFKA_MAX_POLL_RECORDS=5)
    kernel = kernels.start(env)

    wait_until(lambda: any(r[3] == "false" for r in kernels.records()), 30, "the first False")
    # Produced while partition 0 waits: processed before the wait ends, then partition 1 is idle.
    produced += cluster.produce(topic, [(1, None, f"p1-late-{i}".encode()) for i in range(5)])
    wait_until(lambda: len({(r[0], r[1]) for r in kernels.records()}) == sum(produced.values()), 30,
               "every message processed")
    assert kernel.stop(signal.SIGTERM) == 0

    records = kernels.records()
    attempts = [r[3] for r in records if (r[0], r[1]) == (0, 2)]
    assert attempts == ["false", "false", "true"]
    success = records.index((0, 2, "false:2", "true"))
    assert not [r for r in records[:success] if r[0] == 0 and r[1] > 2], "a later message overtook the retry"
    late = [i for i, r in enumerate(records) if r[2].startswith("p1-late-")]
    assert len(late) == 5 and max(late) < success, "partition 1 was held up by partition 0's retry"
    assert [r[1] for r in records if r[0] == 0 and r[3] == "true"] == list(range(100))
    assert cluster.committed("retries", topic, 3) == {p: produced[p] for p in range(3)}
    assert "process_message returned False" in kernel.log() and "(attempt 2)" in kernel.log()


def test_exception_stops_the_kernel_without_committing_the_message(cluster, kernels):
    topic = cluster.create_topic(partitions=2)
    produced = cluster.produce(topic, [(0, None, b"a"), (0, None, b"b"), (0, None, b"raise"), (0, None, b"c"),
                                       (1, None, b"x"), (1, None, b"y")])
    kernel = kernels.start(kernels.env(topic, "fatal"))
    assert kernel.wait(timeout_s=30) == 1
    assert "RuntimeError: poison message" in kernel.log() and "@2; it stays uncommitted" in kernel.log()
    assert (0, 3) not in [(r[0], r[1]) for r in kernels.records()]
    committed = cluster.committed("fatal", topic, 2)
    assert committed[0] == 2, "the partition must be committed up to, not past, the failed message"
    assert list(kernels.certificate_tmpdir.iterdir()) == []

    restarted = kernels.start(kernels.env(topic, "fatal", TEST_RAISE="0"))
    wait_until(lambda: (0, 3, "c", "true") in kernels.records(), 30, "the restarted kernel to go on")
    assert restarted.stop() == 0
    assert (0, 2, "raise", "true") in kernels.records()
    assert cluster.committed("fatal", topic, 2) == {0: produced[0], 1: produced[1]}


def test_a_return_value_other_than_true_or_false_is_fatal(cluster, kernels, tmp_path):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"one")])
    handler = tmp_path / "returns_none.py"
    handler.write_text(
        f"import sys\nsys.path.insert(0, {kernels.repo!r})\nimport main\n"
        "sys.exit(main.run_kernel(lambda message: None, name='returns-none', default_topic='unused'))\n"
    )
    kernel = kernels.start(kernels.env(topic, "returns-none"), script=handler)
    assert kernel.wait(timeout_s=30) == 1
    assert "process_message must return True or False, got None" in kernel.log()
    assert cluster.committed("returns-none", topic, 1) == {0: None}


@pytest.mark.parametrize("raised", ["SystemExit(3)", "KeyboardInterrupt()"])
def test_system_exit_or_keyboard_interrupt_from_process_message_exits_with_code_1(cluster, kernels, tmp_path, raised):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"one")])
    handler = tmp_path / "exits.py"
    handler.write_text(
        f"import sys\nsys.path.insert(0, {kernels.repo!r})\nimport main\n\ndef process_message(message):\n"
        f"    raise {raised}\n\nsys.exit(main.run_kernel(process_message, name='exits', default_topic='unused'))\n"
    )
    kernel = kernels.start(kernels.env(topic, "exits"), script=handler)
    assert kernel.wait(timeout_s=30) == 1
    assert f"process_message failed on {topic}[0]@0; it stays uncommitted" in kernel.log()
    assert cluster.committed("exits", topic, 1) == {0: None}
