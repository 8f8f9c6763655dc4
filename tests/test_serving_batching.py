"""serving.batching without a framework: the pair budget, round-robin chunks, the latency objective, the wait for
company (on a loop whose clock the test drives), and ``run_jobs`` against ``predict``."""

from __future__ import annotations

import asyncio
import selectors
import threading

import pytest
import torch

from drugprot.serving.batching import Job, PairBatcher, QueueWaitExceeded, plan_batch, run_jobs
from fixtures_serving import ensemble, until  # noqa: F401 - fixture ensemble


# ---- the batcher without a framework --------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, budget, taken", [
    ([], 8, 0), ([3], 8, 1), ([3, 5], 8, 2), ([3, 5, 1], 8, 2), ([20, 1], 8, 1), ([1] * 10, 4, 4), ([4, 4, 4], 8, 2),
])
def test_plan_batch_takes_the_fifo_prefix_that_fits(sizes, budget, taken):
    assert plan_batch(sizes, budget) == taken


class Item:
    def __init__(self, name: str, pairs: int):
        self.name, self.pairs = name, pairs


class Gate:
    """A batch function that records its batches and can hold the first one until released."""

    def __init__(self, hold_first: bool = False, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, items):
        self.started.set()
        self.release.wait(10)
        names = [i.name for i in items]
        self.batches.append(names)
        if self.fail_on in names:
            raise ValueError(f"cannot score {self.fail_on}")
        return [f"result:{name}" for name in names]

    async def wait_started(self) -> None:
        """Until a batch has reached the batch function (in the batcher's thread)."""
        assert await asyncio.to_thread(self.started.wait, 10), "no batch started"


class JumpingSelector(selectors.DefaultSelector):
    """Polls the loop's sockets; where the loop would sleep until its next timer, it moves the loop's clock there."""

    def __init__(self, loop: DrivenClockLoop):
        super().__init__()
        self.loop = loop

    def select(self, timeout=None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer: only another thread (the batch's executor) can wake the loop
            return super().select(None)
        self.loop.now += timeout
        return []


class DrivenClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a clock of its own that only timers move: nothing ready, it jumps to the next timer instead of
    waiting for it. A batcher given ``clock=loop.time`` then waits ``wait_s`` exactly, and no test waits for it.
    (Time the batch function spends in the batcher's thread is not counted unless a timer is due meanwhile.)"""

    def __init__(self):
        self.now = 0.0
        super().__init__(selector=JumpingSelector(self))

    def time(self) -> float:
        return self.now


def on_driven_clock(scenario):
    with asyncio.Runner(loop_factory=DrivenClockLoop) as runner:
        return runner.run(scenario)


async def running_held(first: Item, *, max_pairs: int, **gate_options) -> tuple[Gate, PairBatcher, asyncio.Task]:
    """A batcher whose first batch (``first`` alone) has reached the batch function and is held there until released."""
    gate = Gate(hold_first=True, **gate_options)
    batcher = PairBatcher(gate, max_pairs=max_pairs, wait_s=0.0)
    task = asyncio.create_task(batcher.submit(first))
    await gate.wait_started()
    return gate, batcher, task


def test_batcher_fills_batches_from_concurrent_callers_while_one_runs():
    async def scenario():
        gate, batcher, first = await running_held(Item("a", 3), max_pairs=8)
        rest = [asyncio.create_task(batcher.submit(Item(name, pairs))) for name, pairs in
                [("b", 3), ("c", 5), ("d", 20), ("e", 1)]]
        await until(lambda: batcher.queued == 4)
        gate.release.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return gate.batches, results, batcher.stats

    batches, results, stats = asyncio.run(scenario())
    assert batches == [["a"], ["b", "c"], ["d"], ["e"]]  # budget 8, FIFO, an oversized item runs alone
    assert results == ["result:a", "result:b", "result:c", "result:d", "result:e"]
    assert (stats.batches, stats.items, stats.pairs, stats.largest_pairs) == (4, 5, 32, 20)


def test_batcher_waits_at_most_wait_s_for_company():
    async def scenario():
        loop = asyncio.get_running_loop()
        gate = Gate()
        batcher = PairBatcher(gate, max_pairs=100, wait_s=0.05, clock=loop.time)
        started = loop.time()
        one = await batcher.submit(Item("alone", 1))
        waited = loop.time() - started
        together = await asyncio.gather(*(batcher.submit(Item(f"x{i}", 1)) for i in range(5)))
        await batcher.close()
        return one, waited, together, gate.batches

    one, waited, together, batches = on_driven_clock(scenario())
    assert one == "result:alone" and waited == pytest.approx(0.05, abs=1e-9)  # waited wait_s for company, no longer
    assert batches[1] == [f"x{i}" for i in range(5)] and len(together) == 5


def test_batcher_waits_only_while_requests_are_on_their_way():
    async def scenario(on_the_way: int):
        loop = asyncio.get_running_loop()
        batcher = PairBatcher(Gate(), max_pairs=100, wait_s=0.5, announced=lambda: on_the_way, clock=loop.time)
        started = loop.time()
        await batcher.submit(Item("lone", 1))
        await batcher.close()
        return loop.time() - started

    assert on_driven_clock(scenario(0)) == 0.0  # nobody coming: no wait
    assert on_driven_clock(scenario(1)) == pytest.approx(0.5, abs=1e-9)  # someone coming (who never arrives): wait_s


def test_batcher_reports_a_failed_batch_to_its_callers_and_goes_on():
    async def scenario():
        gate, batcher, first = await running_held(Item("first", 1), max_pairs=10, fail_on="bad")
        pair = [asyncio.create_task(batcher.submit(Item(n, 1))) for n in ("ok", "bad")]
        await until(lambda: batcher.queued == 2)
        gate.release.set()
        outcomes = await asyncio.gather(first, *pair, return_exceptions=True)
        after = await batcher.submit(Item("later", 1))
        await batcher.close()
        return outcomes, after, batcher.stats.failed_batches

    outcomes, after, failed = asyncio.run(scenario())
    assert outcomes[0] == "result:first"
    assert all(isinstance(o, ValueError) and "cannot score bad" in str(o) for o in outcomes[1:])
    assert after == "result:later" and failed == 1


def test_batcher_drops_callers_that_gave_up_and_checks_result_length():
    async def scenario():
        gate, batcher, first = await running_held(Item("first", 1), max_pairs=10)
        gone = asyncio.create_task(batcher.submit(Item("gone", 1)))
        kept = asyncio.create_task(batcher.submit(Item("kept", 1)))
        await until(lambda: batcher.queued == 2)
        gone.cancel()
        gate.release.set()
        await asyncio.gather(first, kept)
        short = PairBatcher(lambda items: [], max_pairs=10, wait_s=0.0)
        with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
            await short.submit(Item("x", 1))
        await short.close()
        await batcher.close()
        with pytest.raises(RuntimeError, match="shut down"):
            await batcher.submit(Item("late", 1))
        return gate.batches, batcher.stats.cancelled

    batches, cancelled = asyncio.run(scenario())
    assert batches == [["first"], ["kept"]] and cancelled == 1


def test_batcher_refuses_what_would_wait_past_the_latency_objective():
    """max_wait_s: refused at submit when the pairs ahead (queued and running) at the measured pairs/s would take
    longer; refused instead of run when an admitted item has waited longer all the same."""
    async def scenario():
        now = [0.0]
        gate = Gate(hold_first=True)
        batcher = PairBatcher(gate, max_pairs=10, wait_s=0.0, clock=lambda: now[0], max_wait_s=1.5)
        first = asyncio.create_task(batcher.submit(Item("a", 10)))
        await gate.wait_started()
        assert batcher.expected_wait_s() == 0.0  # no call timed yet: no estimate, everything admitted
        gate.started.clear()
        now[0] = 1.0  # the first call takes one second: 10 pairs/s
        gate.release.set()
        await first
        rate = batcher.pairs_per_s
        gate.release.clear()
        second = asyncio.create_task(batcher.submit(Item("b", 10)))
        await gate.wait_started()  # b runs (10 pairs ahead of anything new)
        third = asyncio.create_task(batcher.submit(Item("c", 10)))  # expects 1 s: admitted
        await until(lambda: batcher.queued == 1)
        with pytest.raises(QueueWaitExceeded, match=r"would wait about 2\.0 s in its queue, beyond the 1\.5 s objective"):
            await batcher.submit(Item("d", 1))  # (10 queued + 10 running) / 10 pairs/s = 2 s
        now[0] = 3.0  # b ends two seconds later: c has waited 2 s
        gate.release.set()
        answer = await second
        with pytest.raises(QueueWaitExceeded, match=r"this request waited 2\.0 s in its queue"):
            await third
        described = batcher.describe()
        await batcher.close()
        return rate, answer, gate.batches, batcher.stats, described

    rate, answer, batches, stats, described = asyncio.run(scenario())
    assert rate == 10.0 and answer == "result:b" and batches == [["a"], ["b"]]  # c never ran
    assert (stats.refused, stats.cancelled) == (2, 0)
    assert described["refused_by_wait_objective"] == 2 and described["max_wait_s"] == 1.5


def split_item(item: Item, max_pairs: int) -> list[Item]:
    return [Item(f"{item.name}#{i}", min(max_pairs, item.pairs - start))
            for i, start in enumerate(range(0, item.pairs, max_pairs))]


def join_names(results) -> str:
    return "+".join(results)


def split_batcher(gate: Gate, **options) -> PairBatcher:
    return PairBatcher(gate, max_pairs=10, wait_s=0.0, split=split_item, join=join_names, **options)


def test_big_items_are_cut_into_bounded_chunks_that_take_turns_with_small_ones():
    """Round-robin: after each chunk a big item queues again behind what came meanwhile, so the small item that
    arrived last waits for one chunk of each big one, not for both whole; results are joined in chunk order."""
    async def scenario():
        gate = Gate(hold_first=True)
        batcher = split_batcher(gate)
        first = asyncio.create_task(batcher.submit(Item("w", 1)))
        await gate.wait_started()
        big = asyncio.create_task(batcher.submit(Item("B", 25)))
        other = asyncio.create_task(batcher.submit(Item("C", 20)))
        small = asyncio.create_task(batcher.submit(Item("s", 3)))
        await until(lambda: batcher.queued == 3)
        batcher.pairs_per_s = 10.0  # as if measured: the estimate follows the turns, not the whole queue
        waits = batcher.expected_wait_s(1), batcher.expected_wait_s(3)
        finished = []
        for task in (big, other, small):
            task.add_done_callback(lambda t: finished.append(t.result()))
        gate.release.set()
        results = await asyncio.gather(first, big, other, small)
        await batcher.close()
        return gate.batches, results, finished, waits, batcher.stats

    batches, results, finished, waits, stats = asyncio.run(scenario())
    assert batches == [["w"], ["B#0"], ["C#0"], ["s"], ["B#1"], ["C#1"], ["B#2"]]
    assert results == ["result:w", "result:B#0+result:B#1+result:B#2", "result:C#0+result:C#1", "result:s"]
    assert finished[0] == "result:s"  # submitted after both big items, answered before either
    assert waits == (pytest.approx(2.4), pytest.approx(4.9))  # 1 running + (10 + 10 + 3) or (25 + 20 + 3) pairs, 10/s
    assert (stats.items, stats.chunks, stats.split_items, stats.batches, stats.largest_pairs) == (4, 7, 2, 7, 10)


def test_a_failed_or_abandoned_chunk_ends_its_item_and_drops_its_other_chunks():
    async def scenario():
        gate = Gate(hold_first=True, fail_on="B#1")
        batcher = split_batcher(gate)
        abandoned = asyncio.create_task(batcher.submit(Item("C", 30)))
        await gate.wait_started()
        failing = asyncio.create_task(batcher.submit(Item("B", 30)))
        kept = asyncio.create_task(batcher.submit(Item("k", 2)))
        await until(lambda: batcher.queued == 2)
        abandoned.cancel()  # while its first chunk runs: its other two never run
        gate.release.set()
        outcomes = await asyncio.gather(failing, kept, return_exceptions=True)
        await batcher.close()
        return gate.batches, outcomes, batcher.stats

    batches, (failed, kept), stats = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and "cannot score B#1" in str(failed) and kept == "result:k"
    assert batches == [["C#0"], ["B#0"], ["k"], ["B#1"]]
    assert (stats.failed_batches, stats.cancelled, stats.items) == (1, 1, 1)


def test_batcher_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_pairs must be at least 1, got 0"):
        PairBatcher(lambda items: items, max_pairs=0, wait_s=0)
    with pytest.raises(ValueError, match="wait_s must be >= 0, got -1"):
        PairBatcher(lambda items: items, max_pairs=1, wait_s=-1)
    with pytest.raises(ValueError, match="max_wait_s must be > 0, got 0"):
        PairBatcher(lambda items: items, max_pairs=1, wait_s=0, max_wait_s=0)
    with pytest.raises(ValueError, match="split and join go together"):
        PairBatcher(lambda items: items, max_pairs=1, wait_s=0, split=split_item)


# ---- the one inference path, batched -------------------------------------------------------------------------
def test_a_job_alone_is_exactly_predict(ensemble, dev_documents):
    candidates = ensemble.candidates(dev_documents)
    (alone,) = run_jobs(ensemble.scorer, [Job(dev_documents, candidates)])
    assert torch.equal(alone, ensemble.member_probabilities(dev_documents, candidates, skip_settled=True))


def test_jobs_batched_together_match_predict_up_to_float_rounding(ensemble, dev_documents):
    jobs = []
    for i, doc in enumerate(dev_documents):
        keyed = [type(doc)(f"job{i}", doc.title, doc.abstract, doc.entities)]
        jobs.append(Job(keyed, ensemble.candidates(keyed)))
    batched = run_jobs(ensemble.scorer, jobs)
    for doc, job, probabilities in zip(dev_documents, jobs, batched):
        alone = ensemble.member_probabilities([doc], ensemble.candidates([doc]), skip_settled=True)
        assert probabilities.shape == alone.shape
        assert torch.allclose(probabilities, alone, atol=1e-5, rtol=0)
        assert torch.equal(probabilities.mean(0).argmax(-1), alone.mean(0).argmax(-1))
    with pytest.raises(ValueError, match="document keys must be unique"):
        run_jobs(ensemble.scorer, [jobs[0], jobs[0]])
