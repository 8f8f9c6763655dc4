"""The encoder store: import checks, offline lookup by name, refusal of changed files, and the three architectures the
DrugProt systems used (BERT, RoBERTa, ELECTRA) through marker encoding, on tiny local folders of each."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drugprot.candidates import document_candidates
from drugprot.corpus import read_split
from drugprot.encoding import MARKERS, PairEncoder, add_marker_tokens
from drugprot.model.encoder import build_encoder, load_tokenizer, minilm_path, resolve_encoder_name
from drugprot.model.encoder_import import import_encoder
from drugprot.model.store import RECORD, STORE_VARIABLE, EncoderStoreError, list_encoders
from fixtures_models import smoke_config

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv(STORE_VARIABLE, str(root))
    return root


def tiny_bert(folder: Path, *, safetensors: bool = True) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **TINY), add_pooling_layer=False)
    model.save_pretrained(folder)
    if not safetensors:  # as older hub folders ship: a pickled state dict (transformers 5 no longer writes one)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    return folder


def tiny_electra(folder: Path) -> Path:
    import torch
    from transformers import ElectraConfig, ElectraModel, ElectraTokenizerFast

    tokenizer = ElectraTokenizerFast.from_pretrained(minilm_path())
    torch.manual_seed(0)
    ElectraModel(ElectraConfig(vocab_size=len(tokenizer), embedding_size=32, max_position_embeddings=512,
                               **TINY)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_roberta(folder: Path, sample_dir: Path) -> Path:
    """A byte-level BPE trained on the sample's abstracts, as RoBERTa's (case kept, no lowercasing switch)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    texts = [d.text for d in read_split(sample_dir, "training").documents]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder.mkdir(parents=True)
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=514, pad_token_id=1, **TINY),
                 add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    from drugprot.config import SAMPLE_DIR

    root = tmp_path_factory.mktemp("hf")
    return {"bert": tiny_bert(root / "bert"), "electra": tiny_electra(root / "electra"),
            "roberta": tiny_roberta(root / "roberta", SAMPLE_DIR)}


@pytest.mark.parametrize("architecture, lowercase", [("bert", True), ("electra", True), ("roberta", None)])
def test_each_architecture_imports_and_marks_its_start_positions(sources, sample_dir, architecture, lowercase):
    folder = import_encoder(str(sources[architecture]), f"tiny-{architecture}")
    record = json.loads((folder / RECORD).read_text())
    assert record["architecture"] == architecture and record["source"] == str(sources[architecture])
    assert record["lowercase"] is lowercase
    assert resolve_encoder_name(f"tiny-{architecture}") == str(folder)

    tokenizer = load_tokenizer(f"tiny-{architecture}")
    add_marker_tokens(tokenizer)
    for marker in MARKERS:  # each marker stays one token
        assert tokenizer.tokenize(f"a {marker} b").count(marker) == 1
    documents = read_split(sample_dir, "development").documents[:3]
    candidates = [c for d in documents for c in document_candidates(d)]
    pairs, _ = PairEncoder(tokenizer, max_length=128).encode(documents, candidates)
    assert len(pairs) > 10
    ids = {m: tokenizer.convert_tokens_to_ids(m) for m in MARKERS}
    for pair in pairs:
        assert pair.input_ids[0] == tokenizer.cls_token_id and pair.input_ids[-1] == tokenizer.sep_token_id
        assert pair.input_ids[pair.subject] == ids["[S:CHEMICAL]"]
        assert pair.input_ids[pair.object] in {ids["[O:GENE]"], ids.get("[O:GENE-Y]"), ids.get("[O:GENE-N]")}

    encoder = build_encoder(f"tiny-{architecture}")
    assert encoder.config.model_type == architecture


def test_a_stored_encoder_trains_by_name(sources, tmp_path):
    from drugprot.training import train

    import_encoder(str(sources["roberta"]), "tiny-roberta")
    config = smoke_config(**{"encoder.name": "tiny-roberta", "train.epochs": 1, "data.max_train_docs": 4,
                             "data.max_dev_docs": 2})
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert json.loads((result.model_dir / "encoder" / "config.json").read_text())["model_type"] == "roberta"
    assert json.loads((result.model_dir / "drugprot.json").read_text())["encoder"] == "tiny-roberta"


def test_pytorch_bin_weights_are_converted_without_unpickling_code(tmp_path):
    from safetensors.torch import load_file
    import torch

    source = tiny_bert(tmp_path / "bin-bert", safetensors=False)
    assert (source / "pytorch_model.bin").exists() and not (source / "model.safetensors").exists()
    folder = import_encoder(str(source), "bin-bert")
    assert not list(folder.glob("*.bin"))
    original = torch.load(source / "pytorch_model.bin", weights_only=True)
    converted = load_file(folder / "model.safetensors")
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the pickle ran code"))


def test_a_bin_that_would_run_code_is_refused_and_nothing_is_stored(tmp_path, store):
    source = tiny_bert(tmp_path / "evil", safetensors=False)
    marker = tmp_path / "ran"
    (source / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _RunsCode(str(marker))}))
    with pytest.raises(EncoderStoreError, match=r"pytorch_model.bin: refused: the file holds more than tensors"):
        import_encoder(str(source), "evil")
    assert not marker.exists()
    assert not (store / "evil").exists() and not [p for p in store.iterdir() if p.name.startswith(".importing")]


def test_a_file_changed_after_import_is_refused_by_name(sources):
    folder = import_encoder(str(sources["bert"]), "changed")
    assert resolve_encoder_name("changed") == str(folder)
    with open(folder / "tokenizer.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(EncoderStoreError, match=r"'changed' in the encoder store is refused: .*tokenizer.json: sha256 mismatch"):
        resolve_encoder_name("changed")


@pytest.mark.parametrize("name, message", [("minilm", "not a store name"), ("../up", "not a store name"),
                                           ("has space", "not a store name")])
def test_bad_names_are_refused(sources, name, message):
    with pytest.raises(EncoderStoreError, match=f"--name: .*{message}"):
        import_encoder(str(sources["bert"]), name)


def test_a_name_is_imported_once(sources):
    import_encoder(str(sources["bert"]), "once")
    with pytest.raises(EncoderStoreError, match="'once' is already in the encoder store"):
        import_encoder(str(sources["electra"]), "once")


def test_a_folder_without_weights_or_config_is_refused(tmp_path, sources):
    partial = tmp_path / "partial"
    shutil.copytree(sources["bert"], partial)
    (partial / "model.safetensors").unlink()
    (partial / "tf_model.h5").write_bytes(b"")
    with pytest.raises(EncoderStoreError, match=r"no PyTorch weights .*found tf_model.h5"):
        import_encoder(str(partial), "partial")
    (partial / "config.json").unlink()
    with pytest.raises(EncoderStoreError, match="no config.json"):
        import_encoder(str(partial), "partial")


def test_a_casing_against_the_vocabulary_is_refused_at_import(sources, store):
    with pytest.raises(EncoderStoreError, match="encoder.lowercase: .*set encoder.lowercase: true"):
        import_encoder(str(sources["bert"]), "wrong-case", lowercase=False)
    assert not (store / "wrong-case").exists()


def test_an_unknown_hub_id_offline_says_how_to_import(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderStoreError, match=r"SRC: 'no-such-org/no-such-model' is neither a local folder nor a hub "
                                                 r"id .*import on a connected machine and copy the store"):
        import_encoder("no-such-org/no-such-model", "missing")


def test_cli_import_and_list(sources, store):
    env_python = [sys.executable, "-m", "drugprot"]
    done = subprocess.run([*env_python, "encoder", "import", str(sources["electra"]), "--name", "cli-electra"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listed = subprocess.run([*env_python, "encoder", "list", "--json"], capture_output=True, text=True)
    assert [r["name"] for r in json.loads(listed.stdout)] == ["cli-electra"] == [r["name"] for r in list_encoders()]
    again = subprocess.run([*env_python, "encoder", "import", str(sources["electra"]), "--name", "cli-electra"],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "already in the encoder store" in again.stderr


ENCODER_CONFIGS = {  # config -> (tiny folder of the same architecture and casing, lowercased?)
    "biobert-v1.1": ("cased-bert", False), "pubmedbert-base": ("bert", True), "biolinkbert-base": ("bert", True),
    "biolinkbert-large": ("bert", True), "biom-electra-large": ("electra", True),
    "roberta-large-pm-m3-voc": ("roberta", None)}


def test_every_encoder_config_is_covered():
    configs = {p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "encoders").glob("*.yaml")}
    assert configs == set(ENCODER_CONFIGS)


@pytest.mark.parametrize("config_name", sorted(ENCODER_CONFIGS))
def test_each_encoder_config_loads_through_the_store(sources, tmp_path, config_name):
    """A tiny stand-in of the config's architecture, imported under the config's encoder.name: the config's whole
    loading path (store lookup, casing, marker tokens, start-marker positions) runs as it would on the real one."""
    from drugprot.config import load_config
    from drugprot.config import SAMPLE_DIR
    from test_encoder import write_cased_bert

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "encoders" / f"{config_name}.yaml")
    kind, lowercased = ENCODER_CONFIGS[config_name]
    source = write_cased_bert(tmp_path / "cased") if kind == "cased-bert" else sources[kind]
    import_encoder(str(source), config.encoder.name)
    tokenizer = load_tokenizer(config.encoder.name, config.encoder.lowercase)
    assert getattr(tokenizer, "do_lower_case", None) is lowercased
    text = "Aspirin inhibits EGFR."
    assert (tokenizer.tokenize(text) == tokenizer.tokenize(text.lower())) is (lowercased is True)
    add_marker_tokens(tokenizer)
    documents = read_split(SAMPLE_DIR, "development").documents[:2]
    candidates = [c for d in documents for c in document_candidates(d)]
    pairs, _ = PairEncoder(tokenizer, max_length=config.encoder.max_length).encode(documents, candidates)
    chemical_marker = tokenizer.convert_tokens_to_ids("[S:CHEMICAL]")
    assert pairs and all(p.input_ids[p.subject] == chemical_marker for p in pairs)
