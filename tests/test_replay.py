"""devtools/replay_dead_letters.py when the cause is not fixed yet, and when a dropped value's topic
holds other records: it ends, says so, and replays nothing it cannot vouch for."""

import subprocess
import sys
from types import SimpleNamespace

import main
from tests.fixtures import REPO

REPLAY = REPO / "devtools" / "replay_dead_letters.py"


def replay(env: dict, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPLAY), *arguments], env=env, capture_output=True, text=True,
                          timeout=60)


def test_a_replay_that_fails_again_comes_back_once_and_is_reported(cluster, kernels):
    topic, dead_letters = cluster.create_topic(1), cluster.create_topic(1)
    cluster.produce(topic, [(0, b"k", b"dead")])
    env = kernels.env(topic, "replay-again", KERNEL_DEAD_LETTER_TOPIC=dead_letters)
    kernel = kernels.start(env)
    kernel.wait_for_log("Dead-lettered", 30)

    first = replay(env, dead_letters)  # the kernel still dead-letters it: it must not loop
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"the replay of {dead_letters}[0]@0 came back: dead on purpose" in first.stderr
    assert "Replayed 1 message(s)" in first.stdout
    assert kernel.stop() == 0
    copies = [r for r in cluster.read_topic(topic, 1) if r.value() == b"dead"]
    assert [dict(r.headers() or []).get("kernel-replays") for r in copies] == [None, b"1"], "one replay, counted"

    second = replay(env, dead_letters)  # the letter that came back, replayed once more, saying so
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{dead_letters}[0]@1 -> {topic} (back after 1 replay(s))" in second.stdout
    assert "Replayed 1 message(s), 1 of them replayed before and dead-lettered again" in second.stdout
    copies = [r for r in cluster.read_topic(topic, 1) if r.value() == b"dead"]
    assert dict(copies[-1].headers())["kernel-replays"] == b"2" and len(copies) == 3


def test_a_dropped_value_is_not_taken_from_another_record_at_its_offset(cluster, kernels):
    """The topic created again: its offset 0 holds another record than the one the letter was made of."""
    source, dead_letters, replay_to = cluster.create_topic(1), cluster.create_topic(1), cluster.create_topic(1)
    cluster.produce(source, [(0, b"another", b"y" * 10, [("h", b"1")])])
    gone = SimpleNamespace(topic=source, partition=0, offset=0, timestamp=1_700_000_000_000, timestamp_type=0)
    letter = [*main.dead_letter_headers(gone, 3, "g", "RuntimeError", "too big", "k"),
              ("h", b"1"), ("kernel-value-dropped", b"10")]
    cluster.produce(dead_letters, [(0, b"mine", b"", letter)])
    env = kernels.env(source, "replay-other")

    replayed = replay(env, dead_letters, "--to", replay_to)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert f"its value was dropped and {source}[0]@0 holds another record (the key differs" in replayed.stderr
    assert cluster.read_topic(replay_to, 1, settle_s=0.5) == []
