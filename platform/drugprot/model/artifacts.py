"""Model artifacts: safetensors + tokenizer + JSON, with a sha256 manifest checked before anything is loaded.

A member folder holds ``model.safetensors``, ``encoder/config.json`` (the architecture, so no hub access is
needed to rebuild it), ``tokenizer/`` (with the marker tokens), ``drugprot.json`` (labels, markers, system and the
validated run config) and, for FGEMR, ``gene_typer/``. ``manifest.json`` lists the sha256 of every other file;
a missing, changed or unlisted file is refused with its name. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drugprot.errors import DrugprotError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INFO = "drugprot.json"


class ArtifactError(DrugprotError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> dict[str, str]:
    files = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))
    return files


def verify_manifest(folder: Path) -> None:
    """Refuse a folder whose files differ from its manifest (missing, modified or unlisted)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not a drugprot model folder (train one with `drugprot train`)")
    try:
        listed = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as error:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({error})") from None
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        found = _sha256(path)
        if found != expected:
            raise ArtifactError(f"{path}: sha256 mismatch (manifest {expected[:12]}…, file {found[:12]}…): the artifact was modified; refusing to load it")
    for path in folder.rglob("*"):
        if path.is_file() and path.name != MANIFEST and str(path.relative_to(folder)) not in listed:
            raise ArtifactError(f"{path}: file not listed in the manifest; refusing to load a modified artifact")


def _save_module(module, folder: Path) -> None:
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(module, str(folder / "model.safetensors"))
    (folder / "encoder").mkdir(exist_ok=True)
    module.encoder.config.save_pretrained(folder / "encoder")


def save_artifact(out: Path, *, model, tokenizer, info: dict[str, Any], gene_typer=None) -> Path:
    """Write a member folder atomically (staged beside ``out``, then renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _save_module(model, staging)
        tokenizer.save_pretrained(staging / "tokenizer")
        if gene_typer is not None:
            _save_module(gene_typer, staging / "gene_typer")
        (staging / INFO).write_text(json.dumps({"format_version": FORMAT_VERSION, **info}, indent=1))
        write_manifest(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@dataclass
class LoadedModel:
    path: Path
    model: Any  # RelationModel
    tokenizer: Any
    info: dict[str, Any]
    gene_typer: Any = None  # GeneTypeClassifier for FGEMR members
    extra: dict[str, Any] = field(default_factory=dict)


def load_artifact(folder: str | Path, *, device: str = "cpu") -> LoadedModel:
    """Verify and load a member folder onto ``device`` (eval mode)."""
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    from drugprot.model.encoder import encoder_from_config
    from drugprot.model.heads import GeneTypeClassifier, RelationModel

    folder = Path(folder)
    verify_manifest(folder)
    info = json.loads((folder / INFO).read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder / INFO}: format_version {info.get('format_version')} is not {FORMAT_VERSION}")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    import torch

    definitions = info.get("definitions")
    model = RelationModel(
        encoder_from_config(folder / "encoder"), system=info["system"], dropout=info["dropout"],
        definition_ids=torch.zeros(definitions["shape"], dtype=torch.long) if definitions else None,
        definition_mask=torch.zeros(definitions["shape"], dtype=torch.long) if definitions else None,
    )
    load_model(model, str(folder / "model.safetensors"))
    model.to(device).eval()
    gene_typer = None
    if (folder / "gene_typer").is_dir():
        gene_typer = GeneTypeClassifier(encoder_from_config(folder / "gene_typer" / "encoder"))
        load_model(gene_typer, str(folder / "gene_typer" / "model.safetensors"))
        gene_typer.to(device).eval()
    return LoadedModel(folder, model, tokenizer, info, gene_typer)
