"""A trained model's class probabilities on the development pairs, saved at its best evaluation (best on dev half A).

Ensembles are chosen and scored from these files without running any member again (``drugprot ensemble
--select greedy``). One file, ``dev_probabilities.safetensors``, written next to the best ``model/`` folder and
logged as an artifact of the trial's MLflow run:

* tensor ``probabilities``: ``(pairs, 14)`` float16, softmax over ``drugprot.encoding.LABELS`` (NONE first);
  pairs the model could not encode (too long) carry P(NONE) = 1, exactly as the evaluation scored them;
* metadata (safetensors' string map): ``kind`` = ``drugprot-dev-probabilities``, ``format_version`` = ``1``,
  ``labels`` (JSON list), ``keys`` (JSON list of ``[pmid, chemical id, gene id]``, one per row, in row order),
  ``split`` (the dev split name), ``eval`` and ``dev_f1_a`` (the evaluation the probabilities come from and its F1
  on half A, which chose it), ``selection_seed`` (``data.selection_seed``: the A/B split every later choice must
  keep, drugprot.dev_halves).

The file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from drugprot.errors import DrugprotError

FILE = "dev_probabilities.safetensors"
KIND = "drugprot-dev-probabilities"
FORMAT_VERSION = "1"

PairKey = tuple[str, str, str]  # pmid, chemical id, gene id


@dataclass(frozen=True)
class DevProbabilities:
    keys: list[PairKey]
    probabilities: torch.Tensor  # (len(keys), len(labels)) float32
    labels: tuple[str, ...]
    split: str
    eval: int | None = None
    dev_f1_a: float | None = None
    selection_seed: int | None = None  # None: written before the A/B split was stored


def save_dev_probabilities(folder: str | os.PathLike, candidates: Sequence, probabilities: torch.Tensor, *, labels: Sequence[str],
                           split: str, eval: int | None = None, dev_f1_a: float | None = None,
                           selection_seed: int | None = None) -> Path:
    """Write ``folder/dev_probabilities.safetensors`` for ``candidates`` (rows of ``probabilities`` in the same order)."""
    from safetensors.torch import save_file

    if probabilities.shape != (len(candidates), len(labels)):
        raise ValueError(f"probabilities {tuple(probabilities.shape)} do not match {len(candidates)} candidates × {len(labels)} labels")
    path = Path(folder) / FILE
    staging = path.with_name(f".{FILE}.tmp")
    metadata = {"kind": KIND, "format_version": FORMAT_VERSION, "labels": json.dumps(list(labels)), "split": split,
                "keys": json.dumps([[c.pmid, c.chemical.id, c.gene.id] for c in candidates]),
                "eval": "" if eval is None else str(eval), "dev_f1_a": "" if dev_f1_a is None else repr(float(dev_f1_a)),
                "selection_seed": "" if selection_seed is None else str(selection_seed)}
    save_file({"probabilities": probabilities.to(torch.float16).contiguous()}, str(staging), metadata=metadata)
    staging.replace(path)
    return path


def load_dev_probabilities(path: str | os.PathLike) -> DevProbabilities:
    """Read a file written by :func:`save_dev_probabilities`; a foreign or inconsistent file is refused by name."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("kind") != KIND:
                raise DrugprotError(f"{path}: not a drugprot dev-probabilities file (kind {metadata.get('kind')!r}, expected {KIND!r})")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise DrugprotError(f"{path}: format_version {metadata.get('format_version')!r} is not {FORMAT_VERSION}")
            probabilities = handle.get_tensor("probabilities").float()
    except FileNotFoundError:
        raise DrugprotError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise DrugprotError(f"{path}: not a readable safetensors file ({error})") from None
    keys = [tuple(k) for k in json.loads(metadata["keys"])]
    labels = tuple(json.loads(metadata["labels"]))
    if probabilities.shape != (len(keys), len(labels)):
        raise DrugprotError(f"{path}: probabilities {tuple(probabilities.shape)} do not match {len(keys)} keys × {len(labels)} labels")
    return DevProbabilities(keys, probabilities, labels, metadata.get("split", ""),
                            int(metadata["eval"]) if metadata.get("eval") else None,
                            float(metadata["dev_f1_a"]) if metadata.get("dev_f1_a") else None,
                            int(metadata["selection_seed"]) if metadata.get("selection_seed") else None)
