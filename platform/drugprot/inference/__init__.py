"""Inference: a torch-free :class:`Plan` (documents → jobs → relations), a :class:`Scorer` that holds the weights
(jobs → member probabilities), the :class:`InferenceOptions` that say how to run them, and the :class:`Predictor`
that loads and composes both.

| module | holds |
|---|---|
| ``options`` | ``InferenceOptions`` and every rule about them; the flags of ``predict`` and ``serve`` |
| ``plan`` | ``Job`` and ``Plan``: candidates, decoding (torch-free) |
| ``voting`` | votes, decision rules, which pairs are settled |
| ``scorers`` | the ways to compute member probabilities, one loop |
| ``loading`` | model / ensemble folder / registry URI → ``Predictor`` (a Plan and a Scorer) |

Names are imported on first use, so ``drugprot.inference.plan`` loads without torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "InferenceOptions": "options", "CASCADE_MARGIN": "options", "PRECISIONS": "options",
    "Job": "plan", "Plan": "plan",
    "Decision": "voting", "PredictedRelation": "voting", "VoteRule": "voting", "combine": "voting", "vote": "voting",
    "decode": "voting", "settled_as_none": "voting", "confident_none": "voting", "closed_pairs": "voting",
    "Scorer": "scorers", "pair_probabilities": "scorers",
    "Predictor": "loading", "load_predictor": "loading", "early_exit_for": "loading", "model_folder": "loading",
    "relation_rows": "loading",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
