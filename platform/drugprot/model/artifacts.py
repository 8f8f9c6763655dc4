"""Model artifacts: safetensors + tokenizer + JSON, with a sha256 manifest checked before anything is loaded.

A member folder holds ``model.safetensors``, ``encoder/config.json`` (the architecture, so no hub access is
needed to rebuild it), ``tokenizer/`` (with the marker tokens), ``drugprot.json`` (labels, markers, system and the
validated run config) and, for FGEMR, ``gene_typer/``. ``manifest.json`` lists the sha256 of every other file;
a missing, changed or unlisted file is refused with its name. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drugprot.manifest import FORMAT_VERSION, ArtifactError, verify_manifest, write_manifest  # noqa: F401  (re-exported)

INFO = "drugprot.json"


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
    trained = info.get("lowercase")
    if trained is not None and getattr(tokenizer, "do_lower_case", trained) != trained:
        raise ArtifactError(f"{folder / 'tokenizer'}: tokenizes with do_lower_case={tokenizer.do_lower_case}, but the "
                            f"model was trained with lowercase={trained} ({folder / INFO})")
    import torch

    definitions = info.get("definitions")
    model = RelationModel(
        encoder_from_config(folder / "encoder"), system=info["system"], dropout=info["dropout"],
        definition_ids=torch.zeros(definitions["shape"], dtype=torch.long) if definitions else None,
        definition_mask=torch.zeros(definitions["shape"], dtype=torch.long) if definitions else None,
        multilabel=bool(info.get("multilabel", False)),
    )
    load_model(model, str(folder / "model.safetensors"))
    model.to(device).eval()
    gene_typer = None
    if (folder / "gene_typer").is_dir():
        gene_typer = GeneTypeClassifier(encoder_from_config(folder / "gene_typer" / "encoder"))
        load_model(gene_typer, str(folder / "gene_typer" / "model.safetensors"))
        gene_typer.to(device).eval()
    return LoadedModel(folder, model, tokenizer, info, gene_typer)
