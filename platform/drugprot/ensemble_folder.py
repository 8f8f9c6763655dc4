"""The ensemble folder format, its sha256 manifest and its checks (no torch, no MLflow).

It sits below ``drugprot.inference`` (which loads such a folder as one Predictor) and the ``drugprot.ensemble``
package (which builds, selects and registers ensembles) sits above inference, so nothing imports in a circle.

::

    ENSEMBLE/
      ensemble.json        format_version, kind, vote, interval, encoder, members (name, path, dev_f1_a: F1 on
                           dev half A, seed, source trial/run, weight: votes it casts, default 1), decision
                           (optional: margin, thresholds, second_type; see drugprot.inference.voting), selection_seed (the
                           members' dev A/B split, drugprot.dev_halves), dev metrics (ensemble and each member, on
                           all documents and on the held-out half B), early_exit (calibrated on half A), source
                           (study, selection), selection (optional: the A/B table it was chosen from)
      manifest.json        {"format_version": 1, "files": {relative path: sha256}} for every other file in the
                           tree, the members' own manifest.json files included
      members/NAME/        a member folder exactly as ``drugprot train`` wrote it (model.safetensors,
                           encoder/config.json, tokenizer/, drugprot.json, manifest.json)

A missing, modified or unlisted file anywhere in the tree is refused with its path before anything is loaded;
nothing in the folder is ever unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from drugprot.errors import DrugprotError
from drugprot.manifest import MANIFEST, contained, verify_manifest, write_manifest  # noqa: F401  (MANIFEST re-exported)

FORMAT_VERSION = 1
KIND = "drugprot-ensemble"
ENSEMBLE_JSON = "ensemble.json"
MEMBERS_DIR = "members"
VOTE_MODES = ("hard", "soft")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class EnsembleError(DrugprotError):
    """A bad ensemble request or folder; the message names what was expected and what was found."""


def check_vote(mode: str, where: str = "vote") -> str:
    """``hard`` or ``soft``, or an :class:`EnsembleError` naming the value (``Hard``, ``hard,soft``…)."""
    if mode not in VOTE_MODES:
        raise EnsembleError(f"{where}: must be one of {', '.join(VOTE_MODES)} (one mode for the whole ensemble), got {mode!r}")
    return mode


def check_member_name(name: str) -> str:
    if not _NAME.match(name):
        raise EnsembleError(f"member name {name!r}: use letters, digits, '.', '_' or '-' (at most 64 characters)")
    return name


def write_tree_manifest(folder: Path) -> dict[str, str]:
    """List every file under ``folder`` (the members' own manifests included) with its sha256."""
    return write_manifest(folder)


def verify_tree_manifest(folder: Path) -> dict[str, str]:
    """Refuse an ensemble whose files differ from its manifest: missing, modified or unlisted, named by path."""
    return verify_manifest(folder, kind="ensemble", label="ensemble manifest",
                           hint="build one with `drugprot ensemble`")


def read_ensemble_json(folder: Path) -> dict[str, Any]:
    """``ensemble.json``, checked for kind, version, vote mode and member entries (after the manifest check)."""
    path = Path(folder) / ENSEMBLE_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise EnsembleError(f"{folder}: no {ENSEMBLE_JSON}; not an ensemble folder") from None
    except ValueError as error:
        raise EnsembleError(f"{path}: not valid JSON ({error})") from None
    if meta.get("kind") != KIND:
        raise EnsembleError(f"{path}: kind is {meta.get('kind')!r}, expected {KIND!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EnsembleError(f"{path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}; "
                            "rebuild the ensemble with this version of drugprot")
    check_vote(meta.get("vote"), f"{path}: vote")
    members = meta.get("members")
    if not isinstance(members, list) or not members:
        raise EnsembleError(f"{path}: 'members' must be a non-empty list")
    for entry in members:
        weight = entry.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise EnsembleError(f"{path}: member {entry.get('name')!r}: weight must be a positive integer (votes), got {weight!r}")
        member_dir = Path(folder) / str(entry.get("path", ""))
        contained(folder, str(entry.get("path", "")), f"{path}: member {entry.get('name')!r}")
        if not entry.get("path") or not (member_dir / "drugprot.json").is_file():
            raise EnsembleError(f"{path}: member {entry.get('name')!r} has no member folder at {member_dir}")
    return meta


def read_ensemble_folder(folder: Path) -> dict[str, Any]:
    """Verify every file's sha256, then read and check ``ensemble.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EnsembleError(f"{folder}: no such ensemble folder")
    verify_tree_manifest(folder)
    return read_ensemble_json(folder)
