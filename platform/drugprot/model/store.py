"""The encoder store: Hugging Face encoder folders imported once (:mod:`drugprot.model.encoder_import`), found again
by name offline, and refused by name when a file changed since the import (its sha256 manifest). Imports no torch.

The store is ``$DRUGPROT_ENCODER_STORE``, else ``~/.local/share/drugprot/encoders``: an absolute place, so Ray
trials (which run in their own working folders) find the same store. Copy the folder to the same place on every
node, or point the variable at a shared file system.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from drugprot.errors import DrugprotError
from drugprot.manifest import ArtifactError, verify_manifest

STORE_VARIABLE = "DRUGPROT_ENCODER_STORE"
RECORD = "drugprot-encoder.json"
RESERVED = ("minilm", "tiny-random")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class EncoderStoreError(DrugprotError):
    pass


def store_root() -> Path:
    configured = os.environ.get(STORE_VARIABLE)
    root = Path(configured) if configured else Path.home() / ".local" / "share" / "drugprot" / "encoders"
    return root.expanduser().resolve()


def stored_folder(name: str) -> Path | None:
    """The checked store folder of ``name``, or None when the store has no such encoder."""
    if not NAME_PATTERN.fullmatch(name):
        return None
    folder = store_root() / name
    if not (folder / RECORD).is_file():
        return None
    _verified(folder)
    return folder


_VERIFIED: dict[Path, tuple] = {}


def _verified(folder: Path) -> None:
    """Check the manifest, once per process while no file's size or time changes (a large encoder is GBs)."""
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    if _VERIFIED.get(folder) == stamp:
        return
    try:
        verify_manifest(folder, kind="encoder", label="encoder manifest",
                        hint=f"import it again with `drugprot encoder import SRC --name {folder.name}`")
    except ArtifactError as error:
        raise EncoderStoreError(f"encoder.name: {folder.name!r} in the encoder store is refused: {error}") from None
    _VERIFIED[folder] = stamp


def list_encoders() -> list[dict]:
    root = store_root()
    if not root.is_dir():
        return []
    return [json.loads((f / RECORD).read_text()) for f in sorted(root.iterdir()) if (f / RECORD).is_file()]
