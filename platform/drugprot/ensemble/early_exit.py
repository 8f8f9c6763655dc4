"""Calibrating the early exit when an ensemble is built: the lowest confidence at which members run in turn may
leave a pair that all of them so far call no relation, and still agree with the full vote on dev pairs.

The replay (:func:`run_in_turn`) computes from every member's probabilities what members in turn would output, so
one set of probabilities serves every confidence tried.
"""

from __future__ import annotations

import torch

from drugprot.inference.voting import NONE_INDEX, Decision, closed_pairs, combine

#: the confidences tried, lowest first, and the share of the full vote's relations an early exit must agree on
EXIT_CONFIDENCES = tuple(round(0.5 + i / 100, 2) for i in range(50))
EXIT_AGREEMENT = 0.999


def run_in_turn(member_probs: torch.Tensor, weights: torch.Tensor, mode: str, decision: Decision | None,
                early_exit: float | None) -> tuple[torch.Tensor, int]:
    """What members in turn would output, from every member's probabilities: (the (M, N, L) table with P(NONE) = 1
    where a member skipped a closed pair, member-pairs scored). Calibration replays it for each confidence."""
    filled = member_probs.clone()
    open_rows, scored = torch.arange(member_probs.size(1)), member_probs.size(1)
    for m in range(1, member_probs.size(0)):
        settled, exited = closed_pairs(member_probs[:m, open_rows], weights, mode, decision, early_exit)
        skipped = open_rows[settled | exited]
        filled[m:, skipped] = 0.0
        filled[m:, skipped, NONE_INDEX] = 1.0
        open_rows = open_rows[~(settled | exited)]
        scored += len(open_rows)
    return filled, scored


def calibrate_early_exit(member_probs: torch.Tensor, *, weights: torch.Tensor | None = None, mode: str = "hard",
                         decision: Decision | None = None, agreement: float = EXIT_AGREEMENT) -> dict | None:
    """The lowest confidence of :data:`EXIT_CONFIDENCES` whose early exit agrees with the full vote on at least
    ``agreement`` of the relations either outputs on these pairs (every member's (M, N, L) probabilities, dev pairs
    not used to train the members), with the share of member-pairs it leaves to score; None for one member or pairs
    without a relation. Focal-loss members put P(NONE) well below 1 on clear negatives, hence a grid from 0.5."""
    members, pairs = member_probs.shape[:2]
    weights = torch.ones(members) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    decision = decision or Decision()

    def relations(table: torch.Tensor) -> set[tuple[int, int]]:
        return set(decision.choose(combine(table, mode, weights)[0]))

    full = relations(member_probs)
    if members < 2 or not full:
        return None
    for confidence in EXIT_CONFIDENCES:
        filled, scored = run_in_turn(member_probs, weights, mode, decision, confidence)
        found = relations(filled)
        share = len(full & found) / len(full | found)
        if share >= agreement:
            return {"confidence": confidence, "agreement": round(share, 5), "relations": len(full), "pairs": pairs,
                    "member_pair_share": round(scored / (members * pairs), 4)}
    return None
