"""FGEMR: the GENE-Y/GENE-N typer, marker replacement, and fine markers on dev genes in training and prediction."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from drugprot.corpus import read_split
from drugprot.encoding import PairEncoder, add_marker_tokens
from drugprot.fgemr import apply_gene_types, gene_examples, predict_gene_types
from drugprot.model.encoder import build_encoder, load_tokenizer
from drugprot.model.heads import GeneTypeClassifier
from drugprot.training import NonFiniteTraining, train_gene_typer
from fixtures_models import smoke_config, train_smoke

FGEMR = {"model.system": "fgemr", "model.markers": "fine", "data.max_train_docs": 12, "data.max_dev_docs": 4,
         "train.epochs": 1, "fgemr.epochs": 1, "fgemr.holdout": 0.25}


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer("tiny-random")
    add_marker_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def docs(sample_dir):
    return read_split(sample_dir, "training").documents[:12], read_split(sample_dir, "development").documents[:4]


TYPER = {"train.seed": 3, "train.precision": "fp32", "fgemr.epochs": 2, "fgemr.lr": 3e-3, "fgemr.holdout": 0.25}


def tiny_encoder(tokenizer):
    encoder = build_encoder("tiny-random", seed=3)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return encoder


@pytest.fixture(scope="module")
def typer(tokenizer, docs):
    torch.manual_seed(3)
    return train_gene_typer(smoke_config(**TYPER), tiny_encoder(tokenizer), tokenizer, docs[0], device=torch.device("cpu"))


def test_sample_dev_genes_are_plain_gene(docs):
    train_docs, dev_docs = docs
    assert {e.type for d in train_docs for e in d.entities.values() if e.is_gene} == {"GENE-Y", "GENE-N"}
    assert {e.type for d in dev_docs for e in d.entities.values() if e.is_gene} == {"GENE"}


def test_gene_examples_mark_the_gene(tokenizer, docs):
    examples = gene_examples(docs[0][:2], tokenizer, max_length=64)
    genes = [(d.pmid, e) for d in docs[0][:2] for e in d.entities.values() if e.is_gene]
    assert [ex.key for ex in examples] == [(pmid, e.id) for pmid, e in genes]
    open_id, close_id = (tokenizer.convert_tokens_to_ids(t) for t in ("[O:GENE]", "[/O:GENE]"))
    for ex, (_, gene) in zip(examples, genes):
        assert len(ex.input_ids) <= 64 and ex.input_ids[ex.position] == open_id and close_id in ex.input_ids
        assert ex.label == GeneTypeClassifier.CLASSES.index(gene.type)


def test_gene_typer_reports_held_out_accuracy(typer):
    model, report = typer
    assert isinstance(model, GeneTypeClassifier)
    assert report["gene_typer_holdout_docs"] == 3  # 25% of 12 training documents, chosen from the seed
    assert report["gene_typer_holdout_genes"] > 0
    assert 0.0 <= report["gene_typer_accuracy"] <= 1.0
    assert report["gene_typer_steps"] > 0


def test_gene_typer_steps_through_train_step_with_the_configs_optimizer_settings(tokenizer, docs, monkeypatch):
    from drugprot import training

    seen = []
    real_step = training.train_step

    def spy(model, batch, optimizer, scheduler=None, **options):
        seen.append((optimizer.param_groups[0]["weight_decay"], options["grad_clip"], scheduler.get_last_lr()[0]))
        return real_step(model, batch, optimizer, scheduler, **options)

    monkeypatch.setattr(training, "train_step", spy)
    config = smoke_config(**{**TYPER, "train.weight_decay": 0.2, "train.grad_clip": 0.5, "train.warmup": 0.5})
    _, report = train_gene_typer(config, tiny_encoder(tokenizer), tokenizer, docs[0], device=torch.device("cpu"))
    assert len(seen) == report["gene_typer_steps"] >= 4
    assert {(decay, clip) for decay, clip, _ in seen} == {(0.2, 0.5)}
    rates = [rate for _, _, rate in seen]
    warm = report["gene_typer_steps"] // 2  # half the steps warm up from 0 to fgemr.lr
    assert rates[0] == 0.0 and rates[:warm + 1] == sorted(rates[:warm + 1]) and max(rates) == pytest.approx(3e-3)


def test_gene_typer_stops_on_non_finite_steps_like_the_relation_model(tokenizer, docs):
    encoder = tiny_encoder(tokenizer)
    with torch.no_grad():
        encoder.get_input_embeddings().weight.fill_(float("nan"))
    config = smoke_config(**{**TYPER, "train.max_nonfinite_steps": 2})
    with pytest.raises(NonFiniteTraining, match=r"FGEMR gene typer \(its rate is fgemr\.lr=0\.003\): step 2: 2 consecutive steps had a "
                                           r"non-finite loss .*max_nonfinite_steps is 2"):
        train_gene_typer(config, encoder, tokenizer, docs[0], device=torch.device("cpu"))


def test_predicted_types_cover_every_plain_gene(tokenizer, docs, typer):
    dev_docs = docs[1]
    predicted = predict_gene_types(typer[0], tokenizer, dev_docs, device=torch.device("cpu"), max_length=128,
                                   precision="fp32")
    plain = {(d.pmid, e.id) for d in dev_docs for e in d.entities.values() if e.type == "GENE"}
    assert set(predicted) == plain
    assert set(predicted.values()) <= {"GENE-Y", "GENE-N"}
    # genes whose type is already known are left alone
    assert predict_gene_types(typer[0], tokenizer, docs[0], device=torch.device("cpu"), max_length=128) == {}


def test_apply_gene_types_changes_only_the_listed_genes(docs):
    dev = docs[1][0]
    genes = sorted(e.id for e in dev.entities.values() if e.type == "GENE")
    chosen = {(dev.pmid, genes[0]): "GENE-Y", (dev.pmid, genes[-1]): "GENE-N", ("other-pmid", genes[0]): "GENE-N"}
    (typed,) = apply_gene_types([dev], chosen)
    assert typed.entities[genes[0]].type == "GENE-Y" and typed.entities[genes[-1]].type == "GENE-N"
    for eid, entity in dev.entities.items():
        if eid not in (genes[0], genes[-1]):
            assert typed.entities[eid] == entity
        assert dataclasses.replace(typed.entities[eid], type=entity.type) == entity  # offsets and text unchanged
    assert typed.relations == dev.relations and typed.text == dev.text
    assert dev.entities[genes[0]].type == "GENE"  # the input is not modified
    assert typed.relations is not dev.relations


@pytest.fixture
def recorded_encodings(monkeypatch):
    """Every PairEncoder.encode call as (pmids, pairs, encoder)."""
    calls = []
    original = PairEncoder.encode

    def recording(self, documents, candidates):
        pairs, stats = original(self, documents, candidates)
        calls.append(({d.pmid for d in documents}, pairs, self))
        return pairs, stats

    monkeypatch.setattr(PairEncoder, "encode", recording)
    return calls


def gene_markers(pairs, encoder: PairEncoder) -> set[str]:
    names = {encoder.marker_ids[m]: m for m in ("[O:GENE]", "[O:GENE-Y]", "[O:GENE-N]")}
    return {names[p.input_ids[p.object]] for p in pairs}


def test_training_dev_pairs_carry_predicted_fine_markers(tmp_path, docs, recorded_encodings):
    result = train_smoke(tmp_path / "fgemr", **FGEMR)
    dev_pmids = {d.pmid for d in docs[1]}
    (dev_call,) = [(pairs, enc) for pmids, pairs, enc in recorded_encodings if pmids == dev_pmids]
    pairs, encoder = dev_call
    assert pairs and encoder.scheme == "fine"
    assert "[O:GENE]" not in gene_markers(pairs, encoder)
    assert encoder.marker_ids["[O:GENE]"] not in {t for p in pairs for t in p.input_ids}
    assert gene_markers(pairs, encoder) <= {"[O:GENE-Y]", "[O:GENE-N]"}
    assert 0.0 <= result.evaluations[-1]["gene_typer_accuracy"] <= 1.0  # reported with every evaluation
    assert (tmp_path / "fgemr" / "model" / "gene_typer" / "model.safetensors").is_file()

    # the same member at prediction time types the plain dev genes before encoding them
    from drugprot.inference import Predictor

    recorded_encodings.clear()
    predictor = Predictor.from_path(tmp_path / "fgemr", device="cpu")
    predictor.predict(docs[1])
    ((_, predicted_pairs, predict_encoder),) = recorded_encodings
    assert predicted_pairs and gene_markers(predicted_pairs, predict_encoder) <= {"[O:GENE-Y]", "[O:GENE-N]"}


def test_fgemr_resume_restores_the_typer(tmp_path):
    from drugprot.training import train

    reference = train_smoke(tmp_path / "reference", **FGEMR)

    def crash(metrics, _):
        if metrics["state_saved"]:  # once the first resumable state is on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(smoke_config(**FGEMR), tmp_path / "run", report=crash, progress=False, log=lambda _: None)
    messages: list[str] = []
    resumed = train(smoke_config(**FGEMR), tmp_path / "run", resume=True, progress=False, log=messages.append)
    assert not any("gene typer: held-out accuracy" in m for m in messages)  # restored, not retrained
    strip = lambda evaluations: [{k: v for k, v in e.items() if k not in ("pairs_per_s", "tokens_per_s", "save_s")}  # noqa: E731
                                 for e in evaluations]
    assert strip(resumed.evaluations) == strip(reference.evaluations)
