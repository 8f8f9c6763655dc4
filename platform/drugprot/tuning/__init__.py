"""Hyper-parameter studies: search-space files, the Ray Tune trial, the study facade, plots.

``from drugprot.tuning import tune_study, load_space`` — names are imported lazily, so importing the package does
not start Ray; :mod:`drugprot.tuning.space` imports neither Ray nor MLflow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SearchSpace": "space", "SpaceError": "space", "load_space": "space", "parse_space": "space",
    "Resources": "study", "StudyError": "study", "StudyResult": "study", "StudyRuntime": "study",
    "StudySearch": "study", "tune_study": "study", "summary": "study",
    "run_trial": "trainable",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drugprot.tuning' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drugprot.tuning.{_EXPORTS[name]}"), name)
