"""Focal and multitask losses by hand, relation attention, every system learning, artifacts round trip and refusal."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from drugprot.encoding import ENTITY_CLASSES, IGNORE_INDEX, LABELS, PairEncoder, add_marker_tokens, collate
from drugprot.model.artifacts import ArtifactError, load_artifact, save_artifact
from drugprot.model.encoder import build_encoder, load_tokenizer
from drugprot.model.heads import RelationModel
from drugprot.model.loss import focal_loss
from fixtures_models import train_smoke

N_LABELS = len(LABELS)


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer("tiny-random")
    add_marker_tokens(tok)
    return tok


def tiny_model(tokenizer, system: str = "baseline", seed: int = 0) -> RelationModel:
    from drugprot.training import relation_definitions

    encoder = build_encoder("tiny-random", seed=seed)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids, mask = relation_definitions(tokenizer) if system == "relation_attention" else (None, None)
    torch.manual_seed(seed)
    return RelationModel(encoder, system=system, dropout=0.1, definition_ids=ids, definition_mask=mask)


@pytest.fixture(scope="module")
def sample_batch(tokenizer, sample_dir):
    from drugprot.candidates import corpus_candidates
    from drugprot.corpus import read_split

    docs = read_split(sample_dir, "training").documents[:3]
    candidates, _ = corpus_candidates(docs)
    pairs, _ = PairEncoder(tokenizer, max_length=128, markers="fine").encode(docs, candidates)
    return collate(pairs[:12], tokenizer.pad_token_id)


# --- focal loss -----------------------------------------------------------------------------------------------

def test_focal_loss_with_gamma_zero_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(32, N_LABELS) * 3
    classes = torch.randint(0, N_LABELS, (32,))
    target = F.one_hot(classes, N_LABELS).float()
    assert_close(focal_loss(logits, target, 0.0), F.cross_entropy(logits, classes))


def test_focal_loss_with_gamma_zero_on_soft_targets_is_soft_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(8, N_LABELS)
    target = torch.zeros(8, N_LABELS)
    target[:, 2] = target[:, 5] = 0.5
    assert_close(focal_loss(logits, target, 0.0), F.cross_entropy(logits, target))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_loss_matches_a_hand_computation(gamma):
    torch.manual_seed(2)
    logits = torch.randn(16, N_LABELS) * 2
    classes = torch.randint(0, N_LABELS, (16,))
    p = torch.softmax(logits.double(), -1)[torch.arange(16), classes]
    by_hand = (-(1 - p) ** gamma * torch.log(p)).mean().float()
    assert_close(focal_loss(logits, F.one_hot(classes, N_LABELS).float(), gamma), by_hand)


def test_focal_loss_down_weights_confident_examples():
    confident = torch.tensor([[6.0] + [0.0] * (N_LABELS - 1)])  # p(NONE) ≈ 0.94
    unsure = torch.tensor([[0.5] + [0.0] * (N_LABELS - 1)])  # p(NONE) ≈ 0.12
    target = F.one_hot(torch.tensor([0]), N_LABELS).float()
    for logits in (confident, unsure):
        p = torch.softmax(logits, -1)[0, 0]
        ce = focal_loss(logits, target, 0.0)
        assert_close(focal_loss(logits, target, 2.0), (1 - p) ** 2 * ce)  # the focal factor, by hand
    ratio = lambda logits: float(focal_loss(logits, target, 2.0) / focal_loss(logits, target, 0.0))  # noqa: E731
    assert ratio(confident) < 0.01 < 0.5 < ratio(unsure)


# --- multitask ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.99, 2.0, 5.0])
@pytest.mark.parametrize("margin", [0.0, 19.0, 30.0, 100.0])
def test_focal_loss_and_gradient_are_finite_for_confident_rows(gamma, margin):
    """One logit leading by ~19 or more rounds p to exactly 1 in fp32; (1 − p)^γ must not make the gradient NaN,
    with hard targets, soft multi-label targets, and a target on a class that has p ≈ 0."""
    torch.manual_seed(0)
    logits = torch.randn(6, N_LABELS)
    logits[:, 0] += margin
    logits.requires_grad_(True)
    target = F.one_hot(torch.tensor([0, 0, 3, 5, 0, 7]), N_LABELS).float()
    target[4] = 0.0
    target[4, 2] = target[4, 9] = 0.5  # a multi-label pair
    loss = focal_loss(logits, target, gamma)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # and it is still the focal loss: compare with the direct formula in float64, where p does not round to 1
    wide = logits.detach().double()
    p = wide.softmax(-1)
    by_hand = -(target.double() * (1 - p).clamp_min(0) ** gamma * wide.log_softmax(-1)).sum(-1).mean()
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("lambda_", [0.0, 0.3, 1.0])
def test_multitask_loss_is_lambda_weighted_sum(tokenizer, sample_batch, lambda_):
    model = tiny_model(tokenizer, "multitask").eval()
    b = sample_batch
    with torch.no_grad():
        out = model(b.input_ids, b.attention_mask, b.subject, b.object)
    assert out["entity_logits"].shape == (len(b.index), 2, len(ENTITY_CLASSES))
    # relation part by hand: focal loss with γ = 2
    log_p = torch.log_softmax(out["logits"].double(), -1)
    relation = (-(b.target.double() * (1 - log_p.exp()) ** 2 * log_p).sum(-1)).mean()
    # entity part by hand: mean −log p over the mentions whose type is known
    entity_log_p = torch.log_softmax(out["entity_logits"].double(), -1).reshape(-1, len(ENTITY_CLASSES))
    types = b.entity_types.reshape(-1)
    known = types != IGNORE_INDEX
    assert known.any() and (types[::2] == 0).all()  # subjects are CHEMICAL
    entity = -entity_log_p[known.nonzero()[:, 0], types[known]].mean()
    expected = (lambda_ * relation + (1 - lambda_) * entity).float()
    got = model.loss(out, b.target, b.entity_types, gamma=2.0, lambda_=lambda_)
    assert_close(got, expected)


def test_baseline_ignores_lambda(tokenizer, sample_batch):
    model = tiny_model(tokenizer).eval()
    b = sample_batch
    with torch.no_grad():
        out = model(b.input_ids, b.attention_mask, b.subject, b.object)
    assert set(out) == {"logits"}
    assert_close(model.loss(out, b.target, b.entity_types, gamma=0.0, lambda_=0.2), focal_loss(out["logits"], b.target, 0.0))


@pytest.mark.parametrize("system", ["baseline", "relation_attention"])
def test_markers_only_computes_the_last_layer_at_the_two_markers_with_the_same_logits(tokenizer, sample_batch, system):
    """The inference shortcut: the last layer's feed-forward sees two positions per pair, not the whole padded
    sequence, and the logits match the full encoder's (padding included: the batch has rows of several lengths)."""
    from drugprot.model.marker_states import supports_marker_states

    model = tiny_model(tokenizer, system).eval()
    b = sample_batch
    assert (b.attention_mask == 0).any() and supports_marker_states(model.encoder)
    shapes = []  # of the last feed-forward's input; relation attention also encodes its 13 definitions in full
    model.encoder.encoder.layer[-1].intermediate.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape[:2]))
    with torch.no_grad():
        full = model(b.input_ids, b.attention_mask, b.subject, b.object)["logits"]
        assert (len(b.index), b.input_ids.shape[1]) in shapes
        shapes.clear()
        short = model(b.input_ids, b.attention_mask, b.subject, b.object, markers_only=True)["logits"]
    assert (len(b.index), 2) in shapes and (len(b.index), b.input_ids.shape[1]) not in shapes
    assert_close(short, full, atol=1e-5, rtol=1e-5)
    assert not supports_marker_states(torch.nn.Linear(2, 2))  # other encoders run in full


# --- relation attention ---------------------------------------------------------------------------------------

def test_relation_attention_shapes_and_definition_buffer(tokenizer, sample_batch):
    model = tiny_model(tokenizer, "relation_attention").eval()
    hidden = model.encoder.config.hidden_size
    assert model.definition_ids.shape[0] == N_LABELS - 1  # one definition per relation type
    assert {"definition_ids", "definition_mask"} <= set(model.state_dict())  # saved with the weights
    assert model.classifier.in_features == 3 * hidden and model.query.in_features == 2 * hidden
    b = sample_batch
    with torch.no_grad():
        logits = model(b.input_ids, b.attention_mask, b.subject, b.object)["logits"]
        assert logits.shape == (len(b.index), N_LABELS)
        original = model.definition_ids.clone()
        model.definition_ids[:, 1:] = torch.flip(original[:, 1:], dims=[0])  # other definitions, same shape
        changed = model(b.input_ids, b.attention_mask, b.subject, b.object)["logits"]
        model.definition_ids.copy_(original)
        restored = model(b.input_ids, b.attention_mask, b.subject, b.object)["logits"]
    assert not torch.allclose(logits, changed)
    assert torch.equal(logits, restored)


def test_relation_attention_encodes_definitions_once_per_prediction_call(tokenizer, sample_dir):
    """In evaluation and prediction the weights do not change: R is encoded once per call, not once per batch,
    and the probabilities are those of recomputing it in every forward."""
    from drugprot.candidates import corpus_candidates
    from drugprot.corpus import read_split
    from drugprot.inference import pair_probabilities

    model = tiny_model(tokenizer, "relation_attention").eval()
    docs = read_split(sample_dir, "training").documents[:6]
    pairs, _ = PairEncoder(tokenizer, max_length=128).encode(docs, corpus_candidates(docs)[0])
    definitions = model.definition_ids.size(0)
    seen: list[int] = []
    # the embeddings see every encoder pass: the full encoder's (definitions) and the marker-states shortcut's (pairs)
    hook = model.encoder.embeddings.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(out.size(0)), with_kwargs=True)
    try:
        probs = pair_probabilities(model, pairs, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"),
                                   precision="fp32", token_budget=1024, max_pairs=8)
    finally:
        hook.remove()
    assert len(seen) >= 4, seen  # several batches of at most 8 pairs ...
    assert seen.count(definitions) == 1, seen  # ... and the 13 definitions encoded once
    with torch.no_grad():  # the per-forward way, batch by batch, gives the same probabilities
        batch = collate(pairs[:8], tokenizer.pad_token_id)
        expected = torch.softmax(model(batch.input_ids, batch.attention_mask, batch.subject, batch.object)["logits"], -1)
    assert_close(probs[:8], expected, atol=1e-6, rtol=1e-5)


def test_relation_attention_needs_definitions(tokenizer):
    with pytest.raises(ValueError, match="relation definitions"):
        RelationModel(build_encoder("tiny-random"), system="relation_attention")


# --- every system learns --------------------------------------------------------------------------------------

OVERFIT = {"data.max_train_docs": 8, "data.max_dev_docs": 2, "train.epochs": 4, "train.eval_every": 1,
           "train.lr": "5e-3", "train.warmup": 0.0, "train.max_batch_pairs": 16, "fgemr.epochs": 1}


@pytest.mark.parametrize("system", ["baseline", "relation_attention", "multitask", "fgemr"])
def test_every_system_training_loss_decreases(tmp_path, system):
    markers = "fine" if system == "fgemr" else "coarse"
    result = train_smoke(tmp_path / system, **OVERFIT, **{"model.system": system, "model.markers": markers})
    losses = [e["train_loss"] for e in result.evaluations]
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0], losses
    assert (tmp_path / system / "model" / "model.safetensors").is_file()
    loaded = load_artifact(tmp_path / system / "model")
    assert loaded.info["system"] == system and (loaded.gene_typer is not None) == (system == "fgemr")


# --- artifacts ------------------------------------------------------------------------------------------------

def artifact_info(model: RelationModel, system: str) -> dict:
    defs = getattr(model, "definition_ids", None)
    return {"system": system, "markers": "fine", "dropout": 0.1, "max_length": 128, "interval": [-10, 16],
            "encoder": "tiny-random", "labels": list(LABELS), "config": {},
            "definitions": {"shape": list(defs.shape)} if defs is not None else None}


@pytest.mark.parametrize("system", ["baseline", "relation_attention", "multitask"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tokenizer, sample_batch, system):
    model = tiny_model(tokenizer, system, seed=5).eval()
    save_artifact(tmp_path / "member", model=model, tokenizer=tokenizer, info=artifact_info(model, system))
    loaded = load_artifact(tmp_path / "member")
    b = sample_batch
    with torch.no_grad():
        before = model(b.input_ids, b.attention_mask, b.subject, b.object)
        after = loaded.model(b.input_ids, b.attention_mask, b.subject, b.object)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert loaded.tokenizer.convert_tokens_to_ids("[O:GENE-Y]") == tokenizer.convert_tokens_to_ids("[O:GENE-Y]")
    assert loaded.info["system"] == system and not loaded.model.training


def test_trained_member_reloads_to_identical_logits(tmp_path, smoke_model_dir, sample_batch):  # noqa: F811
    first = load_artifact(smoke_model_dir)
    save_artifact(tmp_path / "copy", model=first.model, tokenizer=first.tokenizer,
                  info={k: v for k, v in first.info.items() if k != "format_version"})
    second = load_artifact(tmp_path / "copy")
    b = sample_batch
    with torch.no_grad():
        assert torch.equal(first.model(b.input_ids, b.attention_mask, b.subject, b.object)["logits"],
                           second.model(b.input_ids, b.attention_mask, b.subject, b.object)["logits"])


@pytest.fixture
def member_copy(tmp_path, smoke_model_dir) -> Path:  # noqa: F811
    return Path(shutil.copytree(smoke_model_dir, tmp_path / "member"))


def test_modified_weights_are_refused(member_copy):
    weights = member_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: sha256 mismatch"):
        load_artifact(member_copy)


@pytest.mark.parametrize("listed", ["tokenizer/tokenizer_config.json", "encoder/config.json", "drugprot.json"])
def test_missing_listed_file_is_refused(member_copy, listed):
    (member_copy / listed).unlink()
    with pytest.raises(ArtifactError, match=rf"{listed}: listed in the manifest but missing"):
        load_artifact(member_copy)


def test_unlisted_file_is_refused(member_copy):
    (member_copy / "tokenizer" / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ArtifactError, match=r"extra\.pkl: file not listed in the manifest"):
        load_artifact(member_copy)


def test_missing_manifest_is_refused(member_copy):
    (member_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json; not a drugprot model folder"):
        load_artifact(member_copy)


def test_artifact_holds_no_pickles_and_loading_never_unpickles(smoke_model_dir, monkeypatch):  # noqa: F811
    files = [p for p in smoke_model_dir.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".txt"}, sorted(map(str, files))
    assert {p.name for p in files} >= {"model.safetensors", "manifest.json", "drugprot.json", "config.json"}
    for path in files:  # no pickle protocol header hiding under a harmless suffix
        assert not path.read_bytes().startswith(b"\x80"), path

    def refuse(*args, **kwargs):
        raise AssertionError("load_artifact unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = load_artifact(smoke_model_dir)
    assert loaded.model is not None
