"""Cross-request batching without a framework: concurrent requests' candidate pairs share one model call.

Each HTTP request becomes one :class:`Job` (its documents under replica-unique keys and their candidates). The
:class:`PairBatcher` queues jobs and hands a worker thread the longest FIFO prefix whose pairs fit in ``max_pairs``
(the first job always goes, even when it alone is larger); it waits at most ``wait_s`` after the oldest queued job
arrived for more company, and only while other requests are still being prepared. While one batch runs, new jobs
queue, so under load batches fill without waiting.
:func:`run_jobs` scores a batch with a single ``Predictor.member_probabilities`` call over the union of its
documents and splits the ``(M, N, L)`` result back per job, so a job that runs alone is computed exactly as
``Predictor.predict`` computes the same documents (other batch shapes change fp32 results by float rounding only).

Jobs are whole requests, never split: the encoder tokenizes a sentence once for all of its candidates, so splitting a
request's pairs across batches could change their token ids. Nothing here imports Ray; the Serve deployment, the
unit tests and the in-process GPU benchmark all use this one implementation.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from drugprot.candidates import Candidate
from drugprot.corpus import Document

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Job:
    """One request's work: documents keyed (``pmid``) uniquely within the replica, and their candidates in order."""

    documents: Sequence[Document]
    candidates: Sequence[Candidate]

    @property
    def pairs(self) -> int:
        return len(self.candidates)


def run_jobs(predictor, jobs: Sequence[Job]) -> list:
    """Score every job's candidates in one ``member_probabilities`` call; one ``(M, n_job, L)`` tensor per job."""
    documents = [d for job in jobs for d in job.documents]
    keys = [d.pmid for d in documents]
    if len(set(keys)) != len(keys):
        raise ValueError("run_jobs: document keys must be unique across the jobs of a batch")
    candidates = [c for job in jobs for c in job.candidates]
    probabilities = predictor.member_probabilities(documents, candidates)
    results, start = [], 0
    for job in jobs:
        results.append(probabilities[:, start:start + job.pairs])
        start += job.pairs
    return results


def plan_batch(sizes: Sequence[int], max_pairs: int) -> int:
    """How many queued items (FIFO) the next batch takes: at least one, then while the running total fits."""
    if not sizes:
        return 0
    total, count = sizes[0], 1
    for size in sizes[1:]:
        if total + size > max_pairs:
            break
        total += size
        count += 1
    return count


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    pairs: int = 0
    largest_pairs: int = 0
    cancelled: int = 0
    refused: int = 0  # by the latency objective (max_wait_s)
    failed_batches: int = 0
    sizes: list[int] = field(default_factory=list)  # pairs per batch, most recent 1000

    def record(self, items: int, pairs: int) -> None:
        self.batches += 1
        self.items += items
        self.pairs += pairs
        self.largest_pairs = max(self.largest_pairs, pairs)
        self.sizes.append(pairs)
        del self.sizes[:-1000]


class QueueWaitExceeded(RuntimeError):
    """An item refused by the latency objective: the queue ahead of it would take (or has taken) longer than
    ``max_wait_s``. ``expected_s`` is the estimate (or the wait so far) that decided it."""

    def __init__(self, expected_s: float, max_wait_s: float, *, waited: bool = False):
        self.expected_s = expected_s
        self.max_wait_s = max_wait_s
        what = "waited" if waited else "would wait about"
        super().__init__(f"the model is overloaded: this request {what} {expected_s:.1f} s in its queue, beyond the "
                         f"{max_wait_s:g} s objective (--max-queue-wait-s); retry later")


@dataclass
class _Pending(Generic[T]):
    item: T
    size: int
    future: asyncio.Future
    arrived: float


class PairBatcher(Generic[T, R]):
    """Collects items from concurrent callers into batches bounded by a pair budget; one batch runs at a time.

    ``run(items) -> results`` (same length and order) runs in ``executor`` (a one-thread pool by default), so the
    event loop keeps accepting requests while the model works. ``await submit(item)`` returns that item's result or
    raises the batch's exception; a caller that is cancelled before its batch starts is dropped from it.
    ``announced()``, when given, counts callers that are preparing an item but have not submitted it yet: with none
    on the way the batcher does not wait for company, so a lone request pays no ``wait_s``.
    ``max_wait_s``, when given, is a latency objective: an item whose expected wait (the pairs queued ahead of it and
    in the running batch, at the pairs/s the recent model calls achieved) exceeds it is refused at submit with
    :class:`QueueWaitExceeded`, and an item still queued after ``max_wait_s`` is refused instead of run late. Until
    a model call has been timed there is no estimate, and items are admitted.
    """

    def __init__(self, run: Callable[[list[T]], list[R]], *, max_pairs: int, wait_s: float,
                 size: Callable[[T], int] = lambda item: item.pairs, executor: Executor | None = None,
                 announced: Callable[[], int] | None = None, clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[int, list[float], int], None] | None = None, max_wait_s: float | None = None):
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        if max_wait_s is not None and max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be > 0, got {max_wait_s}")
        self.max_wait_s = max_wait_s
        self.pairs_per_s: float | None = None  # moving average over the timed model calls
        self._running_pairs = 0
        self.run = run
        self.max_pairs = max_pairs
        self.wait_s = wait_s
        self.size = size
        self.announced = announced
        self.on_batch = on_batch  # (pairs, each item's wait in the queue, items still queued) per batch taken
        self.stats = BatchStats()
        self._clock = clock
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="drugprot-batch")
        self._queue: deque[_Pending[T]] = deque()
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def expected_wait_s(self) -> float:
        """Seconds a new item would wait: the pairs queued and running, at the recent pairs/s (0 before any call)."""
        if not self.pairs_per_s:
            return 0.0
        return (sum(p.size for p in self._queue) + self._running_pairs) / self.pairs_per_s

    async def submit(self, item: T) -> R:
        if self._closed:
            raise RuntimeError("the batcher is shut down")
        loop = asyncio.get_running_loop()
        if self._loop is not loop and self._loop is not None and self._loop.is_running():
            raise RuntimeError("a PairBatcher serves one event loop at a time")
        if self._worker is None or self._worker.done() or self._loop is not loop:
            if self._loop is not loop:
                self._queue.clear()  # futures of a finished loop can never be awaited again
            self._loop = loop
            self._arrival = asyncio.Event()
            self._worker = loop.create_task(self._work(), name="drugprot-pair-batcher")
        size = int(self.size(item))
        expected = self.expected_wait_s()
        if self.max_wait_s is not None and expected > self.max_wait_s:
            self.stats.refused += 1
            raise QueueWaitExceeded(expected, self.max_wait_s)
        future = loop.create_future()
        self._queue.append(_Pending(item, size, future, self._clock()))
        self._arrival.set()
        return await future

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            items = [p.item for p in batch]
            pairs = sum(p.size for p in batch)
            if self.on_batch is not None:
                now = self._clock()
                self.on_batch(pairs, [now - p.arrived for p in batch], len(self._queue))
            started = self._clock()
            self._running_pairs = pairs
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
                self._timed(pairs, self._clock() - started)
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(RuntimeError("the batcher was shut down"))
                raise
            except Exception as error:  # the error belongs to this batch's callers; the worker goes on
                self._running_pairs = 0
                self.stats.failed_batches += 1
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            self._running_pairs = 0
            self.stats.record(len(batch), pairs)
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)

    async def _gather(self) -> None:
        """Wait until the queue's FIFO prefix fills the budget or the oldest item has waited ``wait_s``."""
        while True:
            self._drop_cancelled()
            if not self._queue:
                return
            sizes = [p.size for p in self._queue]
            count = plan_batch(sizes, self.max_pairs)
            if count < len(sizes) or sum(sizes[:count]) >= self.max_pairs:
                return  # full: the next item would not fit, or the budget is reached
            remaining = self._queue[0].arrived + self.wait_s - self._clock()
            if remaining <= 0 or (self.announced is not None and self.announced() <= 0):
                return  # waited long enough, or nobody is on the way: waiting would only add latency
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                return

    def _timed(self, pairs: int, seconds: float) -> None:
        if seconds > 0:
            rate = pairs / seconds
            self.pairs_per_s = rate if self.pairs_per_s is None else 0.7 * self.pairs_per_s + 0.3 * rate

    def _drop_cancelled(self) -> None:
        """Forget callers that gave up, and refuse those that waited past the latency objective."""
        kept = [p for p in self._queue if not p.future.done()]
        self.stats.cancelled += len(self._queue) - len(kept)
        if self.max_wait_s is not None:
            now = self._clock()
            overdue = [p for p in kept if now - p.arrived > self.max_wait_s]
            for pending in overdue:
                pending.future.set_exception(QueueWaitExceeded(now - pending.arrived, self.max_wait_s, waited=True))
            self.stats.refused += len(overdue)
            kept = [p for p in kept if not p.future.done()]
        if len(kept) != len(self._queue):
            self._queue = deque(kept)

    def _take(self) -> list[_Pending[T]]:
        self._drop_cancelled()
        count = plan_batch([p.size for p in self._queue], self.max_pairs)
        return [self._queue.popleft() for _ in range(count)]

    async def close(self) -> None:
        """Fail queued callers, stop the worker, and release the executor if the batcher created it."""
        self._closed = True
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the batcher was shut down"))
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        sizes = self.stats.sizes
        return {"max_pairs": self.max_pairs, "wait_ms": self.wait_s * 1000, "batches": self.stats.batches,
                "requests": self.stats.items, "pairs": self.stats.pairs, "largest_batch_pairs": self.stats.largest_pairs,
                "mean_batch_pairs": round(sum(sizes) / len(sizes), 2) if sizes else 0.0, "queued": self.queued,
                "cancelled": self.stats.cancelled, "refused_by_wait_objective": self.stats.refused,
                "max_wait_s": self.max_wait_s, "expected_wait_s": round(self.expected_wait_s(), 3),
                "failed_batches": self.stats.failed_batches}
