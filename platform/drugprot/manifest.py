"""sha256 manifests: every file of an artifact folder (a model, an ensemble) listed with its digest.

Loading checks the manifest before reading anything else and refuses a missing, modified or unlisted file by
name, so a tampered or half-copied artifact never reaches the loader. Imports nothing heavy (no torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from drugprot.errors import DrugprotError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(DrugprotError):
    """A model or ensemble folder that is not what its manifest says (or not an artifact folder at all)."""


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: str | Path) -> dict[str, str]:
    """List every file under ``folder`` (except the manifest itself) with its sha256."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))
    return files


def verify_manifest(folder: str | Path, *, kind: str = "model", label: str = "manifest",
                    hint: str = "train one with `drugprot train`") -> dict[str, str]:
    """Refuse a folder whose files differ from its manifest; ``kind``/``label``/``hint`` only shape the messages."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not a drugprot {kind} folder ({hint})")
    try:
        listed = json.loads(manifest.read_text())["files"]
        if not isinstance(listed, dict):
            raise ValueError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{manifest}: unreadable manifest ({error}); refusing to load the {kind}") from None
    for name, expected in listed.items():
        path = folder / name
        if ".." in Path(name).parts or not path.is_file():
            raise ArtifactError(f"{path}: listed in the {label} but missing; refusing to load the {kind}")
        found = sha256_file(path)
        if found != expected:
            raise ArtifactError(f"{path}: sha256 mismatch (manifest {expected[:12]}…, file {found[:12]}…): the file was "
                                f"modified after the {kind} was saved; refusing to load it")
    for path in _files(folder):
        if path.relative_to(folder).as_posix() not in listed:
            raise ArtifactError(f"{path}: file not listed in the {label}; refusing to load a modified {kind}")
    return listed
