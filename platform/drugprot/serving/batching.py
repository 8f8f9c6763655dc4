"""Cross-request batching without a framework: concurrent requests' candidate pairs share one model call.

Each HTTP request becomes one :class:`Job` (its documents under replica-unique keys and their candidates). A job
of more than ``max_pairs`` pairs is cut (:func:`split_job`) into chunks of at most ``max_pairs``, so no model call
is larger than the budget and one big request cannot hold the model for seconds. The :class:`PairBatcher` queues
jobs and schedules their chunks round-robin: each batch takes the next chunk of the queued jobs in turn (FIFO
prefix whose pairs fit in ``max_pairs``; the first always goes), and a job with chunks left goes back to the end
of the queue once its chunk has run, behind the jobs that arrived meanwhile. A small request therefore waits for
about one chunk per job ahead of it, not for whole big requests. The batcher waits at most ``wait_s`` after the
oldest queued job arrived for more company, and only while other requests are still being prepared; while one
batch runs, new jobs queue, so under load batches fill without waiting.
:func:`run_jobs` scores a batch with a single ``Scorer.probabilities`` call over the union of its documents
and splits the ``(M, N, L)`` result back per job; a split job's result is its chunks' results joined in
candidate order (:func:`join_results`). A job that runs alone in one call is computed exactly as
``Predictor.predict`` computes the same documents; other call shapes (shared batches, chunks) change fp32 results
by float rounding only, because the encoder gives a pair the same token ids whichever other pairs share its call.

Nothing here imports Ray; the Serve deployment, the unit tests and the in-process GPU benchmark all use this one
implementation.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Generic, TypeVar

import torch

from drugprot.inference.plan import Job

T = TypeVar("T")
R = TypeVar("R")


def run_jobs(scorer, jobs: Sequence[Job]) -> list:
    """Score every job's candidates in one ``Scorer.probabilities`` call; one ``(M, n_job, L)`` tensor per job.
    Pairs settled as no relation skip the remaining members: the ingress decodes only relations."""
    documents = [d for job in jobs for d in job.documents]
    keys = [d.pmid for d in documents]
    if len(set(keys)) != len(keys):
        raise ValueError("run_jobs: document keys must be unique across the jobs of a batch")
    candidates = [c for job in jobs for c in job.candidates]
    probabilities = scorer.probabilities(Job(documents, candidates), skip_settled=True)
    results, start = [], 0
    for job in jobs:
        results.append(probabilities[:, start:start + job.pairs])
        start += job.pairs
    return results


def split_job(job: Job, max_pairs: int) -> list[Job]:
    """Consecutive chunks of at most ``max_pairs`` candidates, each with only the documents its candidates need."""
    chunks = []
    for start in range(0, job.pairs, max_pairs):
        candidates = job.candidates[start:start + max_pairs]
        needed = {c.pmid for c in candidates}
        chunks.append(Job([d for d in job.documents if d.pmid in needed], candidates))
    return chunks


def join_results(results: Sequence[Any]) -> Any:
    """A split job's ``(M, n_job, L)`` probabilities from its chunks' results, in candidate order."""
    return torch.cat(list(results), dim=1)


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
    items: int = 0  # items answered (every chunk run)
    chunks: int = 0  # pieces run in batches: items, or their chunks when split
    split_items: int = 0  # items cut into more than one chunk
    pairs: int = 0
    largest_pairs: int = 0
    cancelled: int = 0  # callers that gave up while work of theirs was still queued
    refused: int = 0  # by the latency objective (max_wait_s)
    failed_batches: int = 0
    sizes: list[int] = field(default_factory=list)  # pairs per batch, most recent 1000

    def record(self, chunks: int, pairs: int) -> None:
        self.batches += 1
        self.chunks += chunks
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
    """One submitted item: its chunks not yet run (with their pair counts) and the results of those that ran."""

    chunks: deque[T]
    sizes: deque[int]
    future: asyncio.Future
    arrived: float  # when it was submitted
    ready: float  # when its next chunk joined the queue
    results: list[Any] = field(default_factory=list)

    @property
    def started(self) -> bool:
        return bool(self.results)


class PairBatcher(Generic[T, R]):
    """Collects items from concurrent callers into batches bounded by a pair budget; one batch runs at a time.

    ``run(items) -> results`` (same length and order) runs in ``executor`` (a one-thread pool by default), so the
    event loop keeps accepting requests while the model works. ``await submit(item)`` returns that item's result or
    raises the exception of a batch it was in; a caller that is cancelled is dropped from the queue (with whatever
    chunks of its item have not run).
    ``split(item, max_pairs)``, when given, cuts an item larger than ``max_pairs`` into chunks of at most that many
    pairs, and ``join(chunk results)`` makes the item's result from them; chunks are scheduled round-robin with the
    other items (see the module docstring). Without ``split`` items run whole (one larger than the budget alone).
    ``announced()``, when given, counts callers that are preparing an item but have not submitted it yet: with none
    on the way the batcher does not wait for company, so a lone request pays no ``wait_s``.
    ``max_wait_s``, when given, is a latency objective: an item whose expected wait (:meth:`expected_wait_s`, at
    the pairs/s the recent model calls achieved) exceeds it is refused at submit with :class:`QueueWaitExceeded`,
    and an item none of whose chunks has started after ``max_wait_s`` is refused instead of run late (one that has
    started is finished). Until a model call has been timed there is no estimate, and items are admitted.
    """

    def __init__(self, run: Callable[[list[T]], list[R]], *, max_pairs: int, wait_s: float,
                 size: Callable[[T], int] = lambda item: item.pairs, executor: Executor | None = None,
                 split: Callable[[T, int], Sequence[T]] | None = None, join: Callable[[Sequence[R]], R] | None = None,
                 announced: Callable[[], int] | None = None, clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[int, list[float], int], None] | None = None, max_wait_s: float | None = None):
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        if max_wait_s is not None and max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be > 0, got {max_wait_s}")
        if (split is None) != (join is None):
            raise ValueError("split and join go together: give both or neither")
        self.max_wait_s = max_wait_s
        self.pairs_per_s: float | None = None  # moving average over the timed model calls
        self._running: list[_Pending[T]] = []
        self._running_pairs = 0
        self.run = run
        self.max_pairs = max_pairs
        self.wait_s = wait_s
        self.size = size
        self.split = split
        self.join = join
        self.announced = announced
        self.on_batch = on_batch  # (pairs, each chunk's wait in the queue, items still queued) per batch taken
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

    def expected_wait_s(self, chunks: int = 1) -> float:
        """Seconds until an item of ``chunks`` chunks would finish waiting, at the recent pairs/s (0 before any call).

        Round-robin: it waits for the running batch and, in each of its ``chunks`` rounds, one chunk of every
        queued item (the items of the running batch queue again behind it, so they count one round less)."""
        if not self.pairs_per_s:
            return 0.0
        ahead = self._running_pairs + sum(sum(islice(p.sizes, chunks)) for p in self._queue)
        ahead += sum(sum(islice(p.sizes, chunks - 1)) for p in self._running)
        return ahead / self.pairs_per_s

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
        chunks = [item]
        if self.split is not None and int(self.size(item)) > self.max_pairs:
            chunks = list(self.split(item, self.max_pairs))
        expected = self.expected_wait_s(len(chunks))
        if self.max_wait_s is not None and expected > self.max_wait_s:
            self.stats.refused += 1
            raise QueueWaitExceeded(expected, self.max_wait_s)
        self.stats.split_items += len(chunks) > 1
        future = loop.create_future()
        now = self._clock()
        self._queue.append(_Pending(deque(chunks), deque(int(self.size(c)) for c in chunks), future, now, now))
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
            chunks = [p.chunks.popleft() for p in batch]
            pairs = sum(p.sizes.popleft() for p in batch)
            now = self._clock()
            if self.on_batch is not None:
                self.on_batch(pairs, [now - p.ready for p in batch], len(self._queue))
            self._running, self._running_pairs = batch, pairs
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, chunks)
                if len(results) != len(chunks):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(chunks)} items")
                self._timed(pairs, self._clock() - now)
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(RuntimeError("the batcher was shut down"))
                raise
            except Exception as error:  # the error belongs to this batch's callers (their other chunks are dropped)
                self.stats.failed_batches += 1
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            finally:
                self._running, self._running_pairs = [], 0
            self.stats.record(len(batch), pairs)
            self._finish(batch, results)

    def _finish(self, batch: list[_Pending[T]], results: list[R]) -> None:
        """Answer the items whose last chunk ran; queue the others again, behind the items that came meanwhile."""
        now = self._clock()
        for pending, result in zip(batch, results):
            pending.results.append(result)
            if pending.future.done():  # the caller gave up while its chunk ran
                self.stats.cancelled += bool(pending.chunks)
            elif pending.chunks:
                pending.ready = now
                self._queue.append(pending)
            else:
                self.stats.items += 1
                done = pending.results
                pending.future.set_result(done[0] if len(done) == 1 else self.join(done))

    async def _gather(self) -> None:
        """Wait until the next chunks of the queue's FIFO prefix fill the budget or the oldest waited ``wait_s``."""
        while True:
            self._drop_cancelled()
            if not self._queue:
                return
            sizes = [p.sizes[0] for p in self._queue]
            count = plan_batch(sizes, self.max_pairs)
            if count < len(sizes) or sum(sizes[:count]) >= self.max_pairs:
                return  # full: the next chunk would not fit, or the budget is reached
            remaining = self._queue[0].ready + self.wait_s - self._clock()  # ready times rise along the queue
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
        """Forget callers that gave up, and refuse those not started after waiting past the latency objective."""
        kept = [p for p in self._queue if not p.future.done()]
        self.stats.cancelled += len(self._queue) - len(kept)
        if self.max_wait_s is not None:
            now = self._clock()
            overdue = [p for p in kept if not p.started and now - p.arrived > self.max_wait_s]
            for pending in overdue:
                pending.future.set_exception(QueueWaitExceeded(now - pending.arrived, self.max_wait_s, waited=True))
            self.stats.refused += len(overdue)
            kept = [p for p in kept if not p.future.done()]
        if len(kept) != len(self._queue):
            self._queue = deque(kept)

    def _take(self) -> list[_Pending[T]]:
        """The items whose next chunk goes into this batch (each item at most once)."""
        self._drop_cancelled()
        count = plan_batch([p.sizes[0] for p in self._queue], self.max_pairs)
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
                "chunks": self.stats.chunks, "split_requests": self.stats.split_items,
                "cancelled": self.stats.cancelled, "refused_by_wait_objective": self.stats.refused,
                "max_wait_s": self.max_wait_s, "expected_wait_s": round(self.expected_wait_s(), 3),
                "pairs_per_s": round(self.pairs_per_s, 1) if self.pairs_per_s else None,
                "failed_batches": self.stats.failed_batches}
