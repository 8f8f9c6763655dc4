"""``drugprot encoder import``: check a Hugging Face folder and copy it into the encoder store.

Model hubs are unreachable on many clusters. The import copies a local folder (or a hub id, where a network is there)
into the store after checking it: the config loads, the weights are safetensors (a PyTorch ``.bin`` is converted
through ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only, or refused with the
reason), every encoder weight is present, the tokenizer loads, and its casing passes the vocabulary rule of
:func:`drugprot.model.encoder.load_tokenizer`. It records where the folder came from and a sha256 manifest; nothing
is left in the store when a check fails.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from drugprot.errors import DrugprotError
from drugprot.manifest import write_manifest
from drugprot.model.store import NAME_PATTERN, RECORD, RESERVED, EncoderStoreError, store_root

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index", "rust_model.ot")


def import_encoder(source: str, name: str, *, lowercase: bool | str = "auto",
                   say: Callable[[str], None] = lambda _: None) -> Path:
    """Check ``source`` and copy it into the store as ``name``; nothing is left in the store if any check fails."""
    if not NAME_PATTERN.fullmatch(name) or name in RESERVED:
        raise EncoderStoreError(f"--name: {name!r} is not a store name (letters, digits, '.', '_', '-'; not "
                                f"{' or '.join(RESERVED)})")
    root = store_root()
    target = root / name
    if target.exists():
        raise EncoderStoreError(f"--name: {name!r} is already in the encoder store ({target}); remove that folder "
                                f"or choose another name")
    origin = _local_or_downloaded(source, say)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".importing-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _copy_checked(origin, staging, source, say)
        record = _check(staging, source, name, lowercase, say)
        (staging / RECORD).write_text(json.dumps(record, indent=1))
        write_manifest(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"imported {source} as {name!r} into {target}")
    return target


def _local_or_downloaded(source: str, say: Callable[[str], None]) -> Path:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or source.startswith((".", "/", "~")):
        raise EncoderStoreError(f"SRC: {source} is not a folder")
    try:
        from huggingface_hub import snapshot_download

        say(f"downloading {source} from the Hugging Face hub")
        return Path(snapshot_download(repo_id=source, allow_patterns=["config.json", *TOKENIZER_FILES, *WEIGHT_PATTERNS]))
    except Exception as error:  # offline, unknown id, gated repo: all end the import the same way
        raise EncoderStoreError(f"SRC: {source!r} is neither a local folder nor a hub id that could be downloaded "
                                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                                f"Without a network, import on a connected machine and copy the store "
                                f"({store_root()}) here") from None


def _copy_checked(origin: Path, staging: Path, source: str, say: Callable[[str], None]) -> None:
    """Config, tokenizer files and safetensors weights into ``staging``; ``.bin`` weights converted safely."""
    if not (origin / "config.json").is_file():
        raise EncoderStoreError(f"SRC: {source}: no config.json (not a Hugging Face model folder)")
    safetensors = sorted(origin.glob("*.safetensors"))
    binaries = sorted(origin.glob("pytorch_model*.bin"))
    if not safetensors and not binaries:
        other = [n for n in OTHER_WEIGHTS if (origin / n).exists()]
        raise EncoderStoreError(f"SRC: {source}: no PyTorch weights (*.safetensors or pytorch_model*.bin)"
                                + (f"; found {', '.join(other)}, which drugprot does not convert" if other else ""))
    staging.mkdir(parents=True)
    for name in ("config.json", *TOKENIZER_FILES, "model.safetensors.index.json"):
        if (origin / name).is_file():
            shutil.copyfile(origin / name, staging / name)
    if safetensors:
        for path in safetensors:
            shutil.copyfile(path, staging / path.name)
        return
    for path in binaries:
        say(f"converting {path.name} to safetensors (tensors only, no code is unpickled)")
        _convert_bin(path, staging / path.name.replace("pytorch_model", "model").replace(".bin", ".safetensors"))
    index = origin / "pytorch_model.bin.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())
        mapping["weight_map"] = {k: v.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                                 for k, v in mapping.get("weight_map", {}).items()}
        (staging / "model.safetensors.index.json").write_text(json.dumps(mapping, indent=1))


def _convert_bin(path: Path, out: Path) -> None:
    import pickle

    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise EncoderStoreError(f"SRC: {path}: refused: the file holds more than tensors, and loading it would run "
                                f"code from the pickle ({str(error).splitlines()[0]}). Ask for safetensors weights, "
                                f"or convert them yourself where you trust the file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderStoreError(f"SRC: {path}: not a state dict of tensors")
    # safetensors refuses tensors that share memory (tied embeddings): store each as its own contiguous copy
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})


def _check(folder: Path, source: str, name: str, lowercase: bool | str, say: Callable[[str], None]) -> dict:
    """Load config, weights and tokenizer from the staged folder; returns the record kept beside them."""
    import torch
    from transformers import AutoConfig, AutoModel

    from drugprot.model.encoder import load_tokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise EncoderStoreError(f"SRC: {source}: config.json does not load ({error})") from None
    try:
        model, info = AutoModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise EncoderStoreError(f"SRC: {source}: the weights do not load into {type(config).__name__} ({error})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise EncoderStoreError(f"SRC: {source}: the weights lack {len(missing)} encoder tensors, e.g. {missing[:3]}: "
                                f"a head-only or partial checkpoint")
    told: list[str] = []
    try:
        tokenizer = load_tokenizer(str(folder), lowercase, say=told.append)
    except DrugprotError as error:
        raise EncoderStoreError(f"SRC: {source}: {error}") from None
    for line in told:
        say(line)
    return {"name": name, "source": str(source),
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "architecture": config.model_type, "model_class": type(model).__name__,
            "hidden_size": getattr(config, "hidden_size", None), "layers": getattr(config, "num_hidden_layers", None),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "vocabulary": len(tokenizer), "casing": told[-1] if told else "",
            "lowercase": getattr(tokenizer, "do_lower_case", None)}
