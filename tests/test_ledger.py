"""Unit tests of the Ledger, the kernel's pure bookkeeping: no broker, no threads, no clock. The test
plays the workers' part by saying how far each task got (its progress, and the TaskOutcome it hands back)."""

import random

import pytest
from kafka import TopicPartition

import main
from main import Consequence, TaskFailure
from tests.kit import make_message

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


def record(partition: TopicPartition, offset: int, key: bytes | None = None):
    return make_message(b"v", key, topic=partition.topic, partition=partition.partition, offset=offset)


def ledger(keyed: bool = False) -> main.Ledger:
    book = main.Ledger(keyed)
    book.assign({P0, P1})
    return book


def several_lanes_a_task() -> main.Ledger:
    """Keyed, with every ready lane of a partition in one task (as when many more are ready than the
    workers want)."""
    book = ledger(keyed=True)
    book.tasks_wanted, book.message_s = 1, 0.0
    return book


def back(book: main.Ledger, task: main.LaneTask, finished: int, failure: TaskFailure | None = None,
         seconds: float = 0.0) -> main.Lane | None:
    """The task comes back having finished `finished` records (in `seconds`)."""
    return book.take_back(main.TaskOutcome(task, finished, failure, seconds))


def test_the_commit_never_passes_an_unfinished_message():
    state = main.PartitionState(fetched_end=10)
    slow, fast = main.Lane(P0, b"slow"), main.Lane(P0, b"fast")
    slow.task = main.LaneTask(P0, [slow], [record(P0, 4), record(P0, 7)], progress=(1, 1.0))  # 4 done, 7 in process_message
    slow.end = 2
    fast.records.extend([record(P0, 9)])
    state.lanes = {b"slow": slow, b"fast": fast}
    state.active = dict.fromkeys(state.lanes.values())
    assert state.next_commit() == 7
    slow.task.progress = (2, 1.0)
    assert state.next_commit() == 9
    fast.records.clear()
    assert state.next_commit() == 10


def test_the_commit_reads_a_tasks_progress_once_while_its_worker_moves_it():
    """The loop computes the commit while workers run: a task's last record may finish between two
    reads of task.progress, which must not send the loop past the end of the task's records."""

    class Finishing(main.LaneTask):  # `progress` as the loop sees it: 1 of 2, then 2 of 2
        reads = iter([(1, 1.0), (2, 1.0), (2, 1.0), (2, 1.0)])
        progress = property(lambda self: next(self.reads), lambda self, value: None)

    lane = main.Lane(P0, None)
    lane.task, lane.end = Finishing(P0, [lane], [record(P0, 4), record(P0, 5)]), 2
    state = main.PartitionState(lanes={None: lane}, active={lane: None}, fetched_end=6)
    assert state.next_commit() in (5, 6)


def test_one_task_per_lane_and_lanes_by_key_only_when_keyed():
    by_partition, by_key = ledger(), ledger(keyed=True)
    for book in (by_partition, by_key):
        book.add(P0, [record(P0, 0, b"a"), record(P0, 1, b"b"), record(P0, 2, b"a")])
        book.add(P1, [record(P1, 0, b"a")])
    assert sorted(len(task.records) for task in by_partition.start_tasks(0)) == [1, 3]
    assert sorted(len(task.records) for task in by_key.start_tasks(0)) == [1, 1, 2]
    assert by_key.start_tasks(0) == [], "a lane with a task in flight gets no second one"


def test_with_many_lanes_ready_a_task_takes_several_of_one_partition_each_in_offset_order():
    book = main.Ledger(keyed=True, workers=2)  # up to 8 tasks wanted at a time
    book.assign({P0, P1})
    book.message_s = 0.0  # a quick handler
    book.add(P0, [record(P0, offset, b"k%d" % (offset % 20)) for offset in range(40)])
    book.add(P1, [record(P1, 0, b"k0")])
    tasks = book.start_tasks(0)
    assert [(task.partition, len(task.lanes)) for task in tasks] == [(P0, 3)] * 6 + [(P0, 2), (P1, 1)], \
        "21 lanes ready: three a task, never two partitions in one"
    for task in tasks:
        for lane in task.lanes:
            assert (lane.task, lane.records) == (task, [])
            part = task.records[lane.start:lane.end]
            assert {r.key for r in part} == {lane.key} and [r.offset for r in part] == sorted(r.offset for r in part)
    assert sum(len(task.records) for task in tasks) == 41 and book.start_tasks(0) == []


def test_lanes_queued_while_every_place_is_taken_wait_and_then_go_in_fewer_tasks():
    book = several_lanes_a_task()  # quick; one worker: four tasks in flight at most
    book.tasks_wanted = 4
    book.add(P0, [record(P0, offset, b"k%d" % offset) for offset in range(8)])
    tasks = book.start_tasks(0)
    assert [len(task.lanes) for task in tasks] == [2, 2, 2, 2]
    book.add(P0, [record(P0, offset, b"k%d" % offset) for offset in range(8, 20)])
    assert book.start_tasks(0) == [] and len(book.queued) == 12, "no place: they wait, queued"
    back(book, tasks[0], finished=2)
    [task] = book.start_tasks(0)
    assert [r.offset for r in task.records] == list(range(8, 20)), "one place: one task takes them all, in order"
    assert not book.queued and book.commits_due() == {P0: 2}


def test_a_task_takes_several_lanes_only_while_the_handler_is_quick():
    book = ledger(keyed=True)  # one worker: more than four lanes ready is many

    def lanes_a_task_for_ten_keys(message_s: float) -> list[int]:
        start = book.partitions[P0].fetched_end or 0
        book.add(P0, [record(P0, offset, b"k%d" % (offset % 10)) for offset in range(start, start + 20)])
        tasks = book.start_tasks(0)
        for task in tasks:
            back(book, task, finished=len(task.records), seconds=message_s * len(task.records))
        while more := book.start_tasks(0):  # the lanes left waiting for a place
            for task in more:
                back(book, task, finished=len(task.records), seconds=message_s * len(task.records))
        return [len(task.lanes) for task in tasks]

    assert lanes_a_task_for_ten_keys(0.00001) == [1, 1, 1, 1], "nothing seen yet: a lane a task, four in flight"
    assert lanes_a_task_for_ten_keys(0.00001) == [3, 3, 3, 1], "quick: three lanes a task"
    assert lanes_a_task_for_ten_keys(6.0) == [3, 3, 3, 1]
    assert lanes_a_task_for_ten_keys(0.00001) == [1, 1, 1, 1], "a slow message: a lane a task again"


def test_tasks_that_come_back_unstarted_say_nothing_of_the_handlers_pace():
    book = ledger(keyed=True)
    book.message_s, book.tasks_wanted = 0.05, 1000  # a 50 ms handler; places for every lane
    book.add(P1, [record(P1, offset, b"k%d" % offset) for offset in range(200)])
    for task in book.start_tasks(0):  # revoked while they waited for a worker
        back(book, task, finished=0, seconds=0.000002)
    book.tasks_wanted = 4
    book.add(P0, [record(P0, offset, b"k%d" % offset) for offset in range(20)])
    assert [len(task.lanes) for task in book.start_tasks(0)] == [1] * 4, "still slow: a lane a task"


def test_a_task_of_several_lanes_commits_below_each_lanes_first_unfinished_and_hands_back_the_rest():
    book = several_lanes_a_task()
    book.add(P0, [record(P0, offset, key) for offset, key in enumerate([b"a", b"b", b"c", b"a", b"b", b"c"])])
    [task] = book.start_tasks(0)
    assert [r.offset for r in task.records] == [0, 3, 1, 4, 2, 5], "a's, then b's, then c's"
    task.progress = (3, 1.0)  # a's both and b's first; b's second (4) in hand, c's not started
    assert book.commits_due() == {P0: 2}, "c's first (2) is unfinished, though later in the task"
    lane = back(book, task, finished=3, failure=TaskFailure(Consequence.RETRY, "False"))
    assert lane.key == b"b" and [r.offset for r in lane.records] == [4], "b's unfinished one, for its retry"
    c = book.partitions[P0].lanes[b"c"]
    assert [r.offset for r in c.records] == [2, 5] and c in book.queued, "the lanes after it go back, queued at once"
    assert book.unfinished == 3 and book.commits_due() == {P0: 2}
    book.retry_later(lane, attempts=1, due_s=10)
    book.requeue(lane)
    [task] = book.start_tasks(0)
    assert task.lanes == [c], "b waits for its retry; c goes on"


def test_a_traced_call_knows_its_records_attempt_in_a_task_of_several_lanes():
    first, retried = main.Lane(P0, b"a"), main.Lane(P0, b"b")
    retried.retry = main.PendingRetry(offset=3, attempts=2, due_s=0)
    task = main.LaneTask(P0, [first, retried], [record(P0, 1, b"a"), record(P0, 3, b"b")])
    assert [task.attempt(r) for r in task.records] == [1, 3]


def test_the_commit_looks_at_the_lanes_that_hold_something_and_each_lane_that_gets_records_again():
    book = ledger(keyed=True)
    book.add(P0, [record(P0, offset, b"k%d" % offset) for offset in range(100)])
    while tasks := book.start_tasks(0):
        for task in tasks:
            back(book, task, finished=len(task.records))
    assert book.commits_due() == {P0: 100} and book.partitions[P0].active == {}, "all idle: none looked at"
    assert len(book.partitions[P0].lanes) == 100, "kept for their keys"
    book.add(P0, [record(P0, 100, b"k7"), record(P0, 101, b"k8")])
    seven, eight = book.start_tasks(0)
    back(book, eight, finished=1)
    back(book, seven, finished=0, failure=TaskFailure(Consequence.RETRY, "False"))
    assert book.commits_due() == {P0: 100}, "k7's lane, idle before, holds 100 now"


def test_a_key_seen_again_finds_its_lane_and_lanes_holding_nothing_are_dropped_past_a_bound(monkeypatch):
    monkeypatch.setattr(main, "IDLE_LANES_KEPT", 10)
    book = ledger(keyed=True)
    book.add(P0, [record(P0, 0, b"again")])
    [task] = book.start_tasks(0)
    assert back(book, task, finished=1) is None, "all finished: requeued already"
    [lane] = task.lanes
    book.add(P0, [record(P0, 1, b"again")])
    assert book.partitions[P0].lanes[b"again"] is lane and book.start_tasks(0)[0].lanes == [lane]

    busy = book.start_tasks(0)  # nothing: the key's task is in flight
    book.add(P1, [record(P1, offset, b"busy") for offset in range(3)])
    busy = book.start_tasks(0)
    for offset in range(2, 1_000):  # a new key each time: lanes made, emptied, dropped
        book.add(P0, [record(P0, offset, b"key-%d" % offset)])
        for task in book.start_tasks(0):
            back(book, task, finished=len(task.records))
        assert book.lanes == sum(len(state.lanes) for state in book.partitions.values()) <= 10
    assert book.partitions[P1].lanes[b"busy"].task is busy[0], "a lane with a task in flight is kept"
    assert book.partitions[P0].lanes[b"again"].task is not None
    book.forget({P1})
    assert book.lanes == len(book.partitions[P0].lanes)


def test_unfinished_records_are_counted_once_per_partition_and_the_commit_follows_the_prefix():
    book = ledger()
    book.add(P0, [record(P0, offset) for offset in range(5, 10)])
    assert book.unfinished == 5 and book.commits_due() == {}, "the fetch started where the group had committed"
    [task] = book.start_tasks(0)
    lane = back(book, task, finished=3, failure=TaskFailure(Consequence.RETRY, "False"))
    assert book.unfinished == 2 and book.commits_due() == {P0: 8}
    book.mark_committed({P0: 8})
    assert book.commits_due() == {}
    assert [r.offset for r in lane.records] == [8, 9], "the unfinished ones wait at the head of the lane"


def test_a_retry_is_handed_out_when_due_and_not_before():
    book = ledger()
    book.add(P0, [record(P0, 0), record(P0, 1)])
    [task] = book.start_tasks(0)
    lane = back(book, task, finished=0, failure=TaskFailure(Consequence.RETRY, "False"))
    assert lane.attempt(lane.records[0].offset) == 1
    book.retry_later(lane, attempts=1, due_s=10)
    book.requeue(lane)
    book.add(P0, [record(P0, 2)])  # more records for a waiting lane: still waiting
    assert book.start_tasks(now_s=9.9) == [] and book.next_retry_due_s() == 10
    [task] = book.start_tasks(now_s=10)
    assert [r.offset for r in task.records] == [0, 1, 2]
    lane = back(book, task, finished=0, failure=TaskFailure(Consequence.RETRY, "False"))
    assert lane.attempt(lane.records[0].offset) == 2, "the second attempt on the same offset"
    book.retry_later(lane, attempts=2, due_s=20)
    book.requeue(lane)
    [task] = book.start_tasks(now_s=20)
    back(book, task, finished=3)
    assert lane.retry is None and book.unfinished == 0 and book.commits_due() == {P0: 3}


def test_a_dead_lettered_record_is_passed_and_the_rest_go_on():
    book = ledger()
    book.add(P0, [record(P0, 0), record(P0, 1), record(P0, 2)])
    [task] = book.start_tasks(0)
    lane = back(book, task, finished=1, failure=TaskFailure(Consequence.DEAD_LETTER, "bad"))
    book.pass_first(lane)
    book.requeue(lane)
    assert book.commits_due() == {P0: 2} and book.unfinished == 1
    [task] = book.start_tasks(0)
    assert [r.offset for r in task.records] == [2]


def test_forgetting_a_revoked_partition_drops_its_lanes_and_ignores_its_task_coming_back():
    book = ledger()
    book.add(P0, [record(P0, 0)])
    book.add(P1, [record(P1, 0), record(P1, 1)])
    tasks = {task.partition: task for task in book.start_tasks(0)}
    assert book.tasks_of({P1}) == {tasks[P1]}
    book.forget({P1})
    assert back(book, tasks[P1], finished=2) is None
    assert set(book.partitions) == {P0} and book.unfinished == 1 and book.in_flight == {tasks[P0]}
    book.add(P1, [record(P1, 2)])  # fetched before the revocation, polled after it
    assert book.unfinished == 1 and book.start_tasks(0) == []


def test_the_memory_unfinished_records_hold_is_counted_with_them():
    book = ledger()
    small, large = record(P0, 0), make_message(b"x" * 10_000, b"k", topic="t", offset=1, headers=[("h", b"v")])
    book.add(P0, [small, large])
    assert book.unfinished_bytes == main.memory_cost([small, large])
    assert main.memory_cost([large]) == main.RECORD_OVERHEAD_BYTES + 1 + 10_000 + 2 + main.HEADER_OVERHEAD_BYTES
    [task] = book.start_tasks(0)
    back(book, task, finished=1)
    assert book.unfinished_bytes == main.memory_cost([large])
    book.forget({P0})
    assert book.unfinished_bytes == 0


def batches(max_messages=3, max_wait_s=1.0) -> main.Ledger:
    book = main.Ledger(keyed=False, batch_policy=main.BatchPolicy(max_messages, max_wait_s))
    book.assign({P0, P1})
    return book


def test_a_batch_waits_for_more_until_it_is_full_or_has_waited_long_enough():
    book = batches()
    book.add(P0, [record(P0, 0), record(P0, 1)], now_s=10)
    assert book.start_tasks(now_s=10.5) == [] and book.next_batch_due_s() == 11
    book.add(P0, [record(P0, 2), record(P0, 3)], now_s=10.6)  # full now: a batch of three goes at once
    [task] = book.start_tasks(now_s=10.6)
    assert [r.offset for r in task.records] == [0, 1, 2]
    back(book, task, finished=3)
    assert book.start_tasks(now_s=10.7) == [], "offset 3 waits for more, up to a second after the lane's oldest"
    [task] = book.start_tasks(now_s=11)
    assert [r.offset for r in task.records] == [3]
    back(book, task, finished=1)
    book.add(P1, [record(P1, 0)], now_s=20)
    assert book.start_tasks(now_s=20.9) == []
    assert [r.offset for r in book.start_tasks(now_s=21)[0].records] == [0]


def test_a_retried_batch_is_the_same_batch_and_what_follows_a_dead_letter_goes_in_the_next():
    book = batches(max_messages=2)
    book.add(P0, [record(P0, offset) for offset in range(5)], now_s=0)
    [task] = book.start_tasks(0)
    lane = back(book, task, finished=0, failure=TaskFailure(Consequence.RETRY, "False", batch_size=2))
    book.retry_later(lane, attempts=1, due_s=5, batch_size=2)
    book.requeue(lane)
    book.add(P0, [record(P0, 5)], now_s=1)
    [task] = book.start_tasks(now_s=5)
    assert [r.offset for r in task.records] == [0, 1], "the same two, however many are waiting"
    lane = back(book, task, finished=1, failure=TaskFailure(Consequence.DEAD_LETTER, "bad", batch_size=1))
    book.pass_first(lane)  # offset 1, dead-lettered
    book.requeue(lane)
    assert book.commits_due() == {P0: 2}
    [task] = book.start_tasks(now_s=5)
    assert [r.offset for r in task.records] == [2, 3]


def held(book: main.Ledger, partition: TopicPartition) -> list:
    """The records the partition holds: waiting in its lanes, and out in its tasks."""
    lanes = book.partitions[partition].lanes.values()
    return [r for lane in lanes for r in lane.records] + [r for lane in lanes if lane.task for r in lane.task.records]


def test_bytes_counted_at_fetch_stay_equal_to_what_the_records_hold():
    """memory_cost counts records when they are fetched and again when they finish or are passed.
    Through keyed lanes, tasks of several lanes, batches, tasks that stop part way and dead letters,
    the count stays exact."""
    def sized(offset, key=None, size=100):
        return make_message(b"x" * size, key, topic="t", offset=offset)

    for book in (ledger(), ledger(keyed=True), several_lanes_a_task(), batches(max_messages=2, max_wait_s=0)):
        book.assign({P0})
        book.add(P0, [sized(0, b"a", 10), sized(1, b"b", 2000), sized(2, b"a", 30)])
        book.add(P0, [sized(3, b"b", 400), sized(4, None, 5000)])
        for round_ in range(12):
            assert book.partitions[P0].unfinished_bytes == book.unfinished_bytes == main.memory_cost(held(book, P0))
            tasks = book.start_tasks(1.0)
            if not tasks:
                break
            for task in tasks:
                # first half-way, a dead letter now and then, then all the way
                lane = back(book, task, finished=len(task.records) // 2 if round_ < 4 else len(task.records))
                if lane is not None and lane.records and round_ % 2:
                    book.pass_first(lane)
                if lane is not None:
                    book.requeue(lane)
        assert book.unfinished == 0 and book.unfinished_bytes == 0, "everything done: nothing held"


@pytest.mark.parametrize("seed", range(40))
def test_random_histories_never_commit_past_an_unfinished_message_and_count_memory_exactly(seed, monkeypatch):
    """Polls, hand-outs, tasks back part way, retries, dead letters and revocations in a random order:
    after each step no partition's commit passes a record not yet done, what it holds in memory is
    counted exactly, and each key's records are done in offset order."""
    rng = random.Random(seed)
    monkeypatch.setattr(main, "IDLE_LANES_KEPT", rng.choice([2, 8, 8192]))
    book = main.Ledger(keyed=rng.random() < 0.8, workers=rng.choice([1, 2]))
    book.message_s = rng.choice([0.0, 1.0])  # quick: several lanes a task; or one lane each
    book.assign({P0, P1})
    ends, held, tasks, now = {P0: 0, P1: 0}, {}, [], 0.0  # held: (partition, offset) -> record, not done yet
    revoked_tasks, failures = set(), {}  # failures: (partition, offset) -> how many times it failed

    def done(record):
        same_key = [r.offset for (tp, _), r in held.items() if tp.partition == record.partition and r.key == record.key]
        assert record.offset == min(same_key), "a key's records are done in offset order"
        del held[TopicPartition(record.topic, record.partition), record.offset]

    for _ in range(150):
        action, partition = rng.random(), rng.choice([P0, P1])
        if action < 0.3 and partition in book.partitions:
            polled = [make_message(key=rng.choice([b"a", b"b", b"c", b"d", None]), value=b"v" * rng.randint(0, 50),
                                   topic="t", partition=partition.partition, offset=ends[partition] + i)
                      for i in range(rng.randint(1, 6))]
            ends[partition] += len(polled)
            book.add(partition, polled)
            held.update(((partition, r.offset), r) for r in polled)
        elif action < 0.55:
            tasks += book.start_tasks(now)
        elif action < 0.9 and tasks:
            task = tasks.pop(rng.randrange(len(tasks)))
            finished = rng.randint(0, len(task.records))
            failure = None if finished == len(task.records) or rng.random() < 0.3 else \
                TaskFailure(rng.choice([Consequence.RETRY, Consequence.DEAD_LETTER]), "random")
            lane = back(book, task, finished, failure)
            if task in revoked_tasks:
                assert lane is None
                continue
            for record in task.records[:finished]:
                done(record)
            if lane is not None:
                assert lane.records[0] is task.records[finished], "the lane of the first record not done"
                if failure is not None and failure.consequence is Consequence.DEAD_LETTER:
                    done(lane.records[0])
                    book.pass_first(lane)
                elif failure is not None:
                    failed = (task.partition, lane.records[0].offset)
                    failures[failed] = failures.get(failed, 0) + 1
                    attempts = lane.attempt(lane.records[0].offset)
                    assert attempts == failures[failed], "attempts are counted per message"
                    book.retry_later(lane, attempts, now + rng.choice([0.0, 1.0]))
                book.requeue(lane)
        elif action < 0.95:
            now += 0.5
        elif partition in book.partitions:  # revoked, and assigned again from where it was committed
            if (committed := book.partitions[partition].next_commit()) is not None:
                ends[partition] = committed
            revoked_tasks.update(task for task in tasks if task.partition == partition)
            book.forget({partition})
            held = {(tp, offset): r for (tp, offset), r in held.items() if tp != partition}
            failures = {(tp, offset): n for (tp, offset), n in failures.items() if tp != partition}  # counted anew
            book.assign({partition})
        for tp, state in book.partitions.items():
            unfinished = [r for (held_tp, _), r in held.items() if held_tp == tp]
            commit = state.next_commit()
            assert commit is None or commit <= min((r.offset for r in unfinished), default=commit)
            assert (state.unfinished, state.unfinished_bytes) == (len(unfinished), main.memory_cost(unfinished))
