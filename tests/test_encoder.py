"""Encoder casing (encoder.lowercase): a cased vocabulary stays cased from training through prediction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from drugprot.model.encoder import EncoderError, load_tokenizer, minilm_path
from fixtures_models import smoke_config

PHRASE = "EGFR Aspirin Naïve"


def kept_case(tokens: list[str]) -> bool:
    """The word pieces spell the phrase with its case and accents (lowercased: 'egfraspirinnaive')."""
    return "".join(t.removeprefix("##") for t in tokens) == PHRASE.replace(" ", "")


def write_cased_bert(folder: Path, *, tokenizer_config: dict | None = None) -> Path:
    """A tiny random BERT folder as the paper's BioBERT ships: vocab.txt and config.json, no tokenizer_config.json.

    The vocabulary is MiniLM's (uncased) plus the capitalised and upper-case form of every alphabetic word, so it
    is cased the way BioBERT's is."""
    import torch
    from transformers import BertConfig, BertModel

    words = (minilm_path() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    words = [w for w in words if w]
    extra = []
    for word in words:
        stem = word.removeprefix("##")
        if stem.isalpha() and not (word.startswith("[") and word.endswith("]")):
            prefix = word[: len(word) - len(stem)]
            extra += [prefix + stem.capitalize(), prefix + stem.upper()]
    vocabulary = list(dict.fromkeys(words + extra + ["Naïve"]))
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    config = BertConfig(vocab_size=len(vocabulary), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert not (tokenizer_config is None and (folder / "tokenizer_config.json").exists())
    return folder


@pytest.fixture(scope="module")
def cased_bert(tmp_path_factory) -> Path:
    return write_cased_bert(tmp_path_factory.mktemp("bert") / "cased-bert")


def test_a_cased_vocabulary_without_tokenizer_config_keeps_case(cased_bert):
    said: list[str] = []
    tokenizer = load_tokenizer(str(cased_bert), say=said.append)
    assert kept_case(tokenizer.tokenize(PHRASE)), tokenizer.tokenize(PHRASE)
    assert len(said) == 1 and said[0].startswith("casing: case kept (no tokenizer_config.json, and the vocabulary has")
    assert "so it is cased" in said[0]


def test_transformers_alone_would_lowercase_that_folder(cased_bert):
    """The silent failure this guards against (transformers' default for a folder without tokenizer_config.json)."""
    from transformers import AutoTokenizer

    assert "".join(AutoTokenizer.from_pretrained(str(cased_bert)).tokenize(PHRASE)).replace("#", "") == "egfraspirinnaive"


def test_an_uncased_vocabulary_with_its_own_config_lowercases():
    said: list[str] = []
    tokenizer = load_tokenizer("minilm", say=said.append)
    assert tokenizer.tokenize("EGFR")[0].islower()
    assert said == ["casing: lowercase (its tokenizer_config.json says do_lower_case=True)"]


@pytest.mark.parametrize("lowercase, vocabulary", [(True, "cased"), (False, "uncased")])
def test_a_choice_against_the_vocabulary_is_refused(cased_bert, lowercase, vocabulary):
    name = str(cased_bert) if vocabulary == "cased" else "minilm"
    with pytest.raises(EncoderError, match=rf"encoder\.lowercase: .* so it is {vocabulary}: set encoder\.lowercase: "
                                           rf"{str(not lowercase).lower()} to match the vocabulary"):
        load_tokenizer(name, lowercase)


def test_a_lowercasing_tokenizer_config_on_a_cased_vocabulary_is_refused(tmp_path):
    folder = write_cased_bert(tmp_path / "bert", tokenizer_config={"do_lower_case": True})
    with pytest.raises(EncoderError, match=r"encoder\.lowercase: .* lowercased \(its tokenizer_config\.json says "
                                           r"do_lower_case=True\), but the vocabulary .* cased: set encoder\.lowercase: false"):
        load_tokenizer(str(folder))


def test_an_explicit_choice_that_matches_is_taken(cased_bert):
    said: list[str] = []
    assert kept_case(load_tokenizer(str(cased_bert), False, say=said.append).tokenize(PHRASE))
    assert said == ["casing: case kept (encoder.lowercase: false)"]


def test_cased_model_trains_and_predicts_with_case_kept(tmp_path, cased_bert, sample_dir):
    """Training records the casing in the artifact; prediction tokenizes exactly as training did."""
    from drugprot.corpus import read_split
    from drugprot.encoding import PairEncoder
    from drugprot.inference import load_predictor
    from drugprot.model.artifacts import ArtifactError, load_artifact
    from drugprot.training import train

    said: list[str] = []
    config = smoke_config(**{"encoder.name": str(cased_bert), "train.epochs": 0.5, "data.max_train_docs": 8,
                             "data.max_dev_docs": 2})
    result = train(config, tmp_path / "run", progress=False, log=said.append)
    assert any(line.startswith("casing: case kept") for line in said)
    member = load_artifact(result.model_dir)
    assert member.info["lowercase"] is False
    assert kept_case(member.tokenizer.tokenize(PHRASE))

    predictor = load_predictor(result.model_dir, device="cpu")  # the path drugprot predict and Serve load through
    (loaded,) = predictor.members
    docs = read_split(sample_dir, "development").documents[:2]
    pairs, _ = PairEncoder(loaded.tokenizer, max_length=128).encode(docs, predictor.candidates(docs))
    tokens = {t for pair in pairs for t in loaded.tokenizer.convert_ids_to_tokens(pair.input_ids)}
    assert {t for t in tokens if t.isalpha() and t != t.lower()}, "no upper-case word piece reached the model"
    assert len(predictor.predict(docs)) == 2

    # served: the replica loads the folder the same way, and the HTTP answer is the prediction's
    from fastapi.testclient import TestClient

    from drugprot.serving.api import create_api
    from drugprot.serving.options import parse_options
    from drugprot.serving.service import ModelService, RelationService

    options = parse_options({"model": str(result.model_dir), "warmup_rounds": 1})
    model = ModelService.load(options)
    model.start_warmup().result(timeout=120)
    assert kept_case(model.predictor.members[0].tokenizer.tokenize(PHRASE))
    doc = docs[0]
    entities = [{"id": e.id, "type": e.type, "start": e.start, "end": e.end, "text": e.text} for e in doc.entities.values()]
    with TestClient(create_api(RelationService(model, options))) as client:
        answer = client.post("/v1/relations", json={"documents": [{"id": doc.pmid, "title": doc.title,
                                                                   "abstract": doc.abstract, "entities": entities}]})
    assert answer.status_code == 200, answer.text
    served = [(r["chemical"], r["gene"], r["type"]) for r in answer.json()["documents"][0]["relations"]]
    assert served == [(r.chemical, r.gene, r.type) for r in predictor.predict([doc])[0]]

    # an artifact whose tokenizer disagrees with the recorded casing is refused, even with a valid manifest
    from drugprot.manifest import write_manifest

    tampered = tmp_path / "tampered"
    shutil.copytree(result.model_dir, tampered)
    settings = json.loads((tampered / "tokenizer" / "tokenizer_config.json").read_text())
    settings["do_lower_case"] = True
    (tampered / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(settings))
    (tampered / "manifest.json").unlink()
    write_manifest(tampered)
    with pytest.raises(ArtifactError, match=r"tokenizes with do_lower_case=True, but the model was trained with "
                                            r"lowercase=False"):
        load_artifact(tampered)
