"""Voting ensembles: choosing members, building and verifying ensemble folders, greedy selection on held-out dev halves, registry.

Light to import (no torch, Ray or MLflow until a function needs them). The package sits above
``drugprot.inference``: the folder format it writes is ``drugprot.ensemble_folder`` and loading one is
``drugprot.inference.loading.Predictor.from_ensemble``, both below it. The public face:

* :func:`build_ensemble` and :class:`MemberSource` (``drugprot.ensemble.build``);
* :class:`EnsembleError` and ``VOTE_MODES`` (``drugprot.ensemble_folder``);
* member selection in ``drugprot.ensemble.members``, logging and registering in ``drugprot.ensemble.publish``,
  the pyfunc model-from-code file ``drugprot/ensemble/pyfunc_model.py``, the early exit's calibration in
  ``drugprot.ensemble.early_exit``.
"""

from __future__ import annotations

from drugprot.ensemble_folder import VOTE_MODES, EnsembleError


def build_ensemble(members, out, **options):
    """Assemble, evaluate and write an ensemble folder; see :func:`drugprot.ensemble.build.build_ensemble`."""
    from drugprot.ensemble.build import build_ensemble as _build

    return _build(members, out, **options)


def __getattr__(name: str):
    if name == "MemberSource":
        from drugprot.ensemble.build import MemberSource

        return MemberSource
    raise AttributeError(f"module 'drugprot.ensemble' has no attribute {name!r}")


__all__ = ["VOTE_MODES", "EnsembleError", "MemberSource", "build_ensemble"]
