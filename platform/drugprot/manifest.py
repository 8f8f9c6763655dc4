"""sha256 manifests: every file of an artifact folder (a model, an ensemble) listed with its digest.

Loading checks the manifest before reading anything else and refuses a missing, modified or unlisted file by
name, so a tampered or half-copied artifact never reaches the loader. Imports nothing heavy (no torch).

The manifest only proves that the files match the manifest beside them; whoever can write both can replace both.
Two checks bind a folder to its publisher: the manifest's own digest (:func:`manifest_digest`, recorded in the model
registry at registration) and an optional ed25519 signature of the manifest (:func:`sign_manifest`, written to
``manifest.sig`` beside it, the only file besides the manifest that the manifest does not list).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from drugprot.errors import DrugprotError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT_VERSION = 1
KEY_HINT = ("create a key pair with `openssl genpkey -algorithm ed25519 -out sign.pem` and "
            "`openssl pkey -in sign.pem -pubout -out verify.pem`")


class ArtifactError(DrugprotError):
    """A model or ensemble folder that is not what its manifest says (or not an artifact folder at all)."""


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in (MANIFEST, SIGNATURE))


def contained(folder: str | Path, relative: str, where: str) -> Path:
    """``folder / relative``, refused unless it stays inside ``folder`` (no ``..``, no absolute path, no symlink
    out): ``relative`` came from metadata that whoever wrote the folder chose. ``where`` names that metadata."""
    base = Path(folder).resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise ArtifactError(f"{where}: path {relative!r} leads outside {folder}; refusing to load it")
    return path


def manifest_digest(folder: str | Path) -> str:
    """The sha256 of ``folder``'s manifest file: one digest that pins every file the manifest lists."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not a drugprot artifact folder")
    return sha256_file(path)


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
        contained(folder, name, f"{manifest}: {label} entry")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the {label} but missing; refusing to load the {kind}")
        found = sha256_file(path)
        if found != expected:
            raise ArtifactError(f"{path}: sha256 mismatch (manifest {expected[:12]}…, file {found[:12]}…): the file was "
                                f"modified after the {kind} was saved; refusing to load it")
    for path in _files(folder):
        if path.relative_to(folder).as_posix() not in listed:
            raise ArtifactError(f"{path}: file not listed in the {label}; refusing to load a modified {kind}")
    return listed


def read_key(path: str | Path, kind: str):
    """An ed25519 key from a PEM file (``kind``: ``private`` or ``public``), or an error naming the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    expected = ed25519.Ed25519PrivateKey if kind == "private" else ed25519.Ed25519PublicKey
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if kind == "private"
               else serialization.load_pem_public_key(data))
    except OSError as error:
        raise ArtifactError(f"{path}: cannot read the {kind} key ({error.strerror})") from None
    except (ValueError, TypeError) as error:
        raise ArtifactError(f"{path}: not an unencrypted PEM {kind} key ({error}); {KEY_HINT}") from None
    if not isinstance(key, expected):
        raise ArtifactError(f"{path}: a {type(key).__name__}, expected an ed25519 {kind} key; {KEY_HINT}")
    return key


def sign_manifest(folder: str | Path, key: str | Path) -> Path:
    """Sign ``folder``'s manifest with the ed25519 private key in ``key`` (PEM); writes :data:`SIGNATURE`."""
    import base64

    private = read_key(key, "private")
    manifest_digest(folder)  # a clear error when there is no manifest
    signature = Path(folder) / SIGNATURE
    signature.write_text(base64.b64encode(private.sign((Path(folder) / MANIFEST).read_bytes())).decode() + "\n")
    return signature


def verify_signature(folder: str | Path, key: str | Path) -> None:
    """Refuse ``folder`` unless :data:`SIGNATURE` is a valid signature of its manifest by the public key in ``key``."""
    import base64
    import binascii

    from cryptography.exceptions import InvalidSignature

    public = read_key(key, "public")
    path = Path(folder) / SIGNATURE
    if not path.is_file():
        raise ArtifactError(f"{folder}: unsigned (no {SIGNATURE}) but --verify-key {key} was given; refusing to load "
                            f"it (sign it with `drugprot ensemble --sign-key`)")
    try:
        public.verify(base64.b64decode(path.read_text().strip(), validate=True), (Path(folder) / MANIFEST).read_bytes())
    except (InvalidSignature, binascii.Error, ValueError):
        raise ArtifactError(f"{path}: not a valid signature of {MANIFEST} by --verify-key {key}; the model was "
                            f"changed or signed with another key, refusing to load it") from None
