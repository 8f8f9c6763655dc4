"""Training near the hardware's speed: ``torch.compile`` with shape buckets, and CUDA graphs where they apply.

A compiled graph is specialised to its input shapes. Token-budget batches come in nearly every width, so without
buckets the compiler either recompiles or runs dynamic shapes, and a CUDA graph (one capture per shape) is never
replayed. With ``train.shape_buckets`` each batch is planned with the width of its bucket and padded to it, so an
epoch sees one width per bucket: each compiled once (the pairs per batch stay dynamic: a step's last micro-batch
holds what is left) and, under ``train.compile_mode: reduce-overhead``, replayed as CUDA graphs instead of about a
thousand kernel launches a step.
Padding columns are masked, so the loss is the eager loop's; their cost is counted as waste by the throughput bench.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from drugprot.encoding import Batch, EncodedPair, token_budget_batches


class _Width(NamedTuple):
    """What :func:`token_budget_batches` reads of a pair: its length (here its bucket's)."""

    input_ids: range


def bucket_width(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens (the config checks the largest holds encoder.max_length)."""
    index = bisect_left(buckets, length)
    if index == len(buckets):
        raise ValueError(f"a pair of {length} tokens is longer than the largest shape bucket {buckets[-1]}")
    return buckets[index]


def bucketed(pairs: Sequence[EncodedPair], buckets: Sequence[int] | None) -> Sequence:
    """``pairs`` as the batch planners (``token_budget_batches``, ``step_batches``) should see them: each as long as
    its bucket, so batches are planned with the width they are padded to and the budget holds after padding."""
    if not buckets:
        return pairs
    return [_Width(range(bucket_width(len(p.input_ids), buckets))) for p in pairs]


def planned_batches(pairs: Sequence[EncodedPair], *, token_budget: int, max_pairs: int,
                    buckets: Sequence[int] | None, shuffle_seed: int | None = None) -> list[list[int]]:
    """Token-budget batches of the bucketed pairs (a bucket's full batches then share one shape)."""
    return token_budget_batches(bucketed(pairs, buckets), token_budget=token_budget, max_pairs=max_pairs,
                                shuffle_seed=shuffle_seed)


def to_bucket(batch: Batch, buckets: Sequence[int] | None, pad_id: int) -> Batch:
    """``batch`` with its token columns padded (masked) to its bucket's width; unchanged without buckets."""
    if not buckets:
        return batch
    extra = bucket_width(batch.input_ids.shape[1], buckets) - batch.input_ids.shape[1]
    if extra == 0:
        return batch
    pad = torch.nn.functional.pad
    return Batch(pad(batch.input_ids, (0, extra), value=pad_id), pad(batch.attention_mask, (0, extra), value=0),
                 batch.subject, batch.object, batch.target, batch.entity_types, batch.index)


def compiled_forward(model: torch.nn.Module, *, enabled: bool, mode: str = "default",
                     buckets: Sequence[int] | None = None) -> Callable:
    """The callable a training step runs: ``model`` itself, or its compiled form.

    Without buckets the graph is compiled for dynamic shapes. With buckets each width gets its own graph, static
    but for the number of pairs; ``mode`` 'reduce-overhead' captures CUDA graphs (on CUDA; elsewhere the compiler
    leaves them out, one recorded per number of pairs seen), and every call marks a new step.
    """
    if not enabled:
        return model
    if not buckets:
        return torch.compile(model, mode=None if mode == "default" else mode, dynamic=True)
    limit = 2 * len(buckets) + 8  # one graph per bucket's width, in training and evaluation modes
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)

    def forward(input_ids, attention_mask, subject, object_, **kwargs):
        # the pairs per micro-batch vary (a step's last one holds what is left): only the width is a bucket's
        for tensor in (input_ids, attention_mask, subject, object_):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a replay may overwrite the last step's outputs
        return compiled(input_ids, attention_mask, subject, object_, **kwargs)

    return forward
