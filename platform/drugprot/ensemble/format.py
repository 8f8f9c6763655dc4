"""The ensemble folder format, its sha256 manifest and its checks (no torch, no MLflow).

::

    ENSEMBLE/
      ensemble.json        format_version, kind, vote, interval, encoder, members (name, path, dev_f1, seed,
                           source trial/run), dev metrics (ensemble and each member), source (study, selection)
      manifest.json        {"format_version": 1, "files": {relative path: sha256}} for every other file in the
                           tree, the members' own manifest.json files included
      members/NAME/        a member folder exactly as ``drugprot train`` wrote it (model.safetensors,
                           encoder/config.json, tokenizer/, drugprot.json, manifest.json)

A missing, modified or unlisted file anywhere in the tree is refused with its path before anything is loaded;
nothing in the folder is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from drugprot.errors import DrugprotError

FORMAT_VERSION = 1
KIND = "drugprot-ensemble"
ENSEMBLE_JSON = "ensemble.json"
MANIFEST = "manifest.json"
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_tree_manifest(folder: Path) -> dict[str, str]:
    """List every file under ``folder`` (except the top-level manifest itself) with its sha256."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in _tree_files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))
    return files


def verify_tree_manifest(folder: Path) -> dict[str, str]:
    """Refuse a tree whose files differ from its manifest: missing, modified or unlisted, named by path."""
    from drugprot.model.artifacts import ArtifactError  # (drugprot.model imports torch)

    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not a drugprot ensemble folder (build one with `drugprot ensemble`)")
    try:
        listed = json.loads(manifest.read_text())["files"]
        if not isinstance(listed, dict):
            raise ValueError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{manifest}: unreadable manifest ({error}); refusing to load the ensemble") from None
    for name, expected in listed.items():
        path = folder / name
        if ".." in Path(name).parts or not path.is_file():
            raise ArtifactError(f"{path}: listed in the ensemble manifest but missing; refusing to load the ensemble")
        found = sha256(path)
        if found != expected:
            raise ArtifactError(f"{path}: sha256 mismatch (manifest {expected[:12]}…, file {found[:12]}…): the file was "
                                "modified after the ensemble was built; refusing to load it")
    for path in _tree_files(folder):
        if path.relative_to(folder).as_posix() not in listed:
            raise ArtifactError(f"{path}: file not listed in the ensemble manifest; refusing to load a modified ensemble")
    return listed


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
        member_dir = Path(folder) / str(entry.get("path", ""))
        if not entry.get("path") or not (member_dir / "drugprot.json").is_file():
            raise EnsembleError(f"{path}: member {entry.get('name')!r} has no member folder at {member_dir}")
    return meta
