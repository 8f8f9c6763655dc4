"""Voting ensembles: choosing members, building and verifying ensemble folders, stacked execution, registry.

Light to import (no torch, Ray or MLflow until a function needs them). The public face:

* :func:`load_ensemble` (``path, *, device, **overrides -> Predictor``), used by ``Predictor.from_path``;
* :func:`build_ensemble` and :class:`MemberSource` (``drugprot.ensemble.build``);
* :class:`EnsembleError` and ``VOTE_MODES`` (``drugprot.ensemble.format``);
* member selection in ``drugprot.ensemble.members``, the MLflow registry in ``drugprot.ensemble.registry``,
  the pyfunc model-from-code file ``drugprot/ensemble/pyfunc_model.py``, Ray Data batch prediction in
  ``drugprot.ensemble.batch``.
"""

from __future__ import annotations

from drugprot.ensemble.format import VOTE_MODES, EnsembleError


def load_ensemble(path, *, device: str = "auto", **overrides):
    """Verify an ensemble folder (sha256 of every file) and load it as one ``Predictor``."""
    from drugprot.ensemble.build import load_ensemble as _load

    return _load(path, device=device, **overrides)


def build_ensemble(members, out, **options):
    """Assemble, evaluate and write an ensemble folder; see :func:`drugprot.ensemble.build.build_ensemble`."""
    from drugprot.ensemble.build import build_ensemble as _build

    return _build(members, out, **options)


def __getattr__(name: str):
    if name == "MemberSource":
        from drugprot.ensemble.build import MemberSource

        return MemberSource
    raise AttributeError(f"module 'drugprot.ensemble' has no attribute {name!r}")


__all__ = ["VOTE_MODES", "EnsembleError", "MemberSource", "build_ensemble", "load_ensemble"]
