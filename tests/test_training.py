"""One training run: reproducible from the seed, exact resume after a crash, the report contract, config refusal."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from drugprot.config import ConfigError, RunConfig, TrainConfig, load_config
from drugprot.errors import DrugprotError
from fixtures_models import REPO, smoke_config, train_smoke

TIMING_KEYS = {"pairs_per_s", "tokens_per_s", "save_s"}
SMALL = {"data.max_train_docs": 12, "data.max_dev_docs": 4, "train.epochs": 2, "train.eval_every": 0.5,
         "train.lr": "3e-3", "train.max_batch_pairs": 16}


def without_timing(evaluations: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in evaluations]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted SMALL run (4 evaluations) that the other tests compare against."""
    run = tmp_path_factory.mktemp("reference")
    return train_smoke(run, **SMALL)


def test_reference_run_layout(reference_run):
    run = reference_run.run_dir
    assert len(reference_run.evaluations) == 4
    assert [e["eval"] for e in reference_run.evaluations] == [1, 2, 3, 4]
    assert (run / "model" / "manifest.json").is_file() and (run / "checkpoint" / "state.json").is_file()
    assert load_config(run / "config.yaml").model_dump() == smoke_config(**SMALL).model_dump()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["evaluations"] == reference_run.evaluations and saved["best"] == reference_run.best
    assert reference_run.best["dev_f1_a"] == max(e["dev_f1_a"] for e in reference_run.evaluations)
    assert saved["dev_halves"]["seed"] == 0 and saved["dev_halves"]["A"]["documents"] == 2  # of SMALL's 4
    for e in reference_run.evaluations:
        assert 0.0 <= e["dev_f1_a"] <= 1.0 and 0.0 <= e["dev_f1_all"] <= 1.0 and e["train_loss"] > 0 and e["pairs_per_s"] > 0
        assert not any(key.endswith("_b") for key in e)  # half B is held out of every evaluation's metrics


def test_the_stored_checkpoint_is_the_first_best_on_dev_half_a(reference_run, sample_dir):
    """The model folder, its record and its dev probabilities all come from the evaluation best on half A, and
    decoding those probabilities gives back that evaluation's half-A and whole-set F1 and the recorded half-B F1."""
    from drugprot.candidates import corpus_candidates
    from drugprot.corpus import read_split
    from drugprot.dev_halves import score_halves, split_halves
    from drugprot.encoding import LABELS
    from drugprot.inference import decode
    from drugprot.model.dev_probabilities import FILE, load_dev_probabilities

    evaluations = reference_run.evaluations
    a_best = max(evaluations, key=lambda e: (e["dev_f1_a"], -e["eval"]))
    assert reference_run.best["eval"] == a_best["eval"]
    info = json.loads((reference_run.model_dir / "drugprot.json").read_text())
    assert info["dev"]["eval"] == a_best["eval"] and info["dev"]["dev_f1_a"] == a_best["dev_f1_a"]
    stored = load_dev_probabilities(reference_run.run_dir / FILE)
    assert (stored.eval, stored.selection_seed) == (a_best["eval"], 0)
    dev = read_split(sample_dir, "development").documents[:4]
    candidates, _ = corpus_candidates(dev, tuple(info["interval"]))
    assert stored.keys == [(c.pmid, c.chemical.id, c.gene.id) for c in candidates] and stored.labels == LABELS
    predicted = [(r.pmid, r.type, r.chemical, r.gene) for r in decode(candidates, stored.probabilities[None])]
    scores = score_halves(split_halves(dev, 0), predicted)
    assert scores["a"].f1 == pytest.approx(a_best["dev_f1_a"], abs=1e-3)
    assert scores["all"].f1 == pytest.approx(a_best["dev_f1_all"], abs=1e-3)
    assert scores["b"].f1 == pytest.approx(info["dev"]["dev_f1_b"], abs=1e-3)


def test_same_seed_same_metrics(tmp_path, reference_run):
    again = train_smoke(tmp_path / "again", **SMALL)
    assert without_timing(again.evaluations) == without_timing(reference_run.evaluations)
    assert (tmp_path / "again" / "model" / "model.safetensors").read_bytes() == \
        (reference_run.run_dir / "model" / "model.safetensors").read_bytes()


def test_different_seed_different_losses(tmp_path, reference_run):
    other = train_smoke(tmp_path / "other", **SMALL, **{"train.seed": 14})
    assert [e["train_loss"] for e in other.evaluations] != [e["train_loss"] for e in reference_run.evaluations]


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, reference_run):
    from drugprot.training import train

    run = tmp_path / "crashed"
    seen: list[int] = []

    def crash_after_third(metrics, run_dir):
        seen.append(metrics["eval"])
        if metrics["eval"] == 3:
            raise Crash("simulated crash after evaluation 3")

    with pytest.raises(Crash):
        train(smoke_config(**SMALL), run, report=crash_after_third, progress=False, log=lambda _: None)
    assert seen == [1, 2, 3]
    assert len(json.loads((run / "metrics.json").read_text())["evaluations"]) == 3
    # the resumable state is written once per epoch (every 2nd evaluation here): evaluation 3 skipped it
    assert len(json.loads((run / "checkpoint" / "state.json").read_text())["evaluations"]) == 2

    resumed_reports: list[int] = []
    messages: list[str] = []
    result = train(smoke_config(**SMALL), run, resume=True, progress=False, log=messages.append,
                   report=lambda metrics, _: resumed_reports.append(metrics["eval"]))
    assert any("resumed from" in m and "2 evaluations done" in m for m in messages), messages
    assert resumed_reports == [3, 4]
    assert without_timing(result.evaluations) == without_timing(reference_run.evaluations)
    assert without_timing(json.loads((run / "metrics.json").read_text())["evaluations"]) == \
        without_timing(reference_run.evaluations)
    # the final training state (weights, optimizer moments, RNG) is the uninterrupted run's, bit for bit
    from safetensors.torch import load_file

    resumed_state = load_file(str(run / "checkpoint" / "state.safetensors"))
    reference_state = load_file(str(reference_run.run_dir / "checkpoint" / "state.safetensors"))
    assert resumed_state.keys() == reference_state.keys()
    assert all(torch.equal(resumed_state[k], reference_state[k]) for k in reference_state)


@pytest.mark.parametrize("every, states", [(None, [2, 4]), (1, [1, 2, 3, 4]), (3, [3, 4])])
def test_resumable_state_is_written_every_checkpoint_every_evaluations_and_at_the_end(tmp_path, every, states):
    from drugprot.training import train

    reports: list[dict] = []

    def report(metrics, run_dir):
        state = Path(run_dir) / "checkpoint" / "state.json"
        written = json.loads(state.read_text())["evaluations"] if state.is_file() else []
        reports.append({**metrics, "state_evals": len(written)})

    result = train(smoke_config(**SMALL), tmp_path / "run", report=report, progress=False, log=lambda _: None,
                   checkpoint_every=every)
    assert [r["eval"] for r in reports if r["state_saved"]] == states
    for r in reports:  # the state on disk is always the latest saved one
        assert r["state_evals"] == max((s for s in states if s <= r["eval"]), default=0)
    best_so_far = [max(e["dev_f1_a"] for e in result.evaluations[: i + 1]) for i in range(len(result.evaluations))]
    improved = [r["eval"] for r in reports if r["model_saved"]]
    assert improved == [1] + [i + 1 for i in range(1, len(best_so_far)) if best_so_far[i] > best_so_far[i - 1]]


def test_every_evaluation_reports_the_recall_ceiling_of_its_interval(tmp_path, sample_dir):
    from drugprot.candidates import corpus_candidates
    from drugprot.corpus import read_split

    result = train_smoke(tmp_path / "run", **{**SMALL, "sampling.interval": "[0, 0]", "train.epochs": 0.5})
    docs = read_split(sample_dir, "training").documents[:12]
    gold = sum(len(d.relations) for d in docs)
    kept = sum(len(d.relations) for d in docs) - corpus_candidates(docs, (0, 0))[1].lost_by_interval
    assert result.evaluations[-1]["train_interval_recall"] == pytest.approx(kept / gold)
    assert result.evaluations[-1]["train_interval_recall"] < 0.6  # [0, 0] drops a large share of the positives
    wide = train_smoke(tmp_path / "wide", **{**SMALL, "train.epochs": 0.5})
    assert wide.evaluations[-1]["train_interval_recall"] > 0.99


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, reference_run):
    messages: list[str] = []
    from drugprot.training import train

    result = train(smoke_config(**SMALL), tmp_path / "fresh", resume=True, progress=False, log=messages.append)
    assert any("no checkpoint" in m for m in messages)
    assert without_timing(result.evaluations) == without_timing(reference_run.evaluations)


def test_report_sees_every_evaluation_with_a_consistent_run_dir(tmp_path):
    from drugprot.training import train

    calls: list[tuple[dict, Path]] = []

    def report(metrics, run_dir):
        run_dir = Path(run_dir)
        assert {"dev_f1_a", "dev_precision_a", "dev_recall_a", "dev_f1_all", "step", "epoch", "train_loss"} <= set(metrics)
        assert (run_dir / "model" / "model.safetensors").is_file()
        on_disk = json.loads((run_dir / "metrics.json").read_text())
        assert on_disk["evaluations"][-1] == metrics
        calls.append((metrics, run_dir))

    result = train(smoke_config(**{**SMALL, "train.epochs": 1}), tmp_path / "run", report=report, progress=False,
                   log=lambda _: None)
    assert [m for m, _ in calls] == result.evaluations and len(calls) == 2
    assert all(run_dir == tmp_path / "run" for _, run_dir in calls)


# --- optimizer steps of batch_pairs pairs --------------------------------------------------------------------------

def encoded_training_pairs(sample_dir, documents: int, tokenizer=None):
    """The sample's first training documents as encoded pairs (max_length 128, the default interval) and the pad id."""
    from drugprot.candidates import corpus_candidates
    from drugprot.corpus import read_split
    from drugprot.encoding import PairEncoder, add_marker_tokens
    from drugprot.model.encoder import load_tokenizer

    if tokenizer is None:
        tokenizer = load_tokenizer("tiny-random")
        add_marker_tokens(tokenizer)
    docs = read_split(sample_dir, "training").documents[:documents]
    pairs, _ = PairEncoder(tokenizer, max_length=128).encode(docs, corpus_candidates(docs, (-10, 16))[0])
    return pairs, tokenizer


@pytest.mark.parametrize("budget", [128, 4096])
def test_steps_per_epoch_are_ceil_pairs_over_batch_pairs_whatever_the_token_budget(tmp_path, sample_dir, budget):
    from drugprot.training import train

    pairs, _ = encoded_training_pairs(sample_dir, SMALL["data.max_train_docs"])
    expected = math.ceil(len(pairs) / 8)
    messages: list[str] = []
    config = smoke_config(**{**SMALL, "train.batch_pairs": 8, "train.token_budget": budget, "train.epochs": 1})
    result = train(config, tmp_path / "run", progress=False, log=messages.append)
    assert [e["steps_per_epoch"] for e in result.evaluations] == [expected, expected]
    assert result.evaluations[-1]["step"] == expected and result.evaluations[-1]["epoch"] == 1.0
    assert any(m.startswith(f"{expected} optimizer steps per epoch of 8 pairs ({expected} in all)") for m in messages)


class GradientRecorder(torch.optim.Optimizer):
    """Keeps the gradients it is asked to apply (and applies none)."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self):
        self.gradients = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def tiny_step(batch, tokenizer, *, system: str = "baseline", multilabel: bool = False, dropout: float = 0.0,
              checkpointing: bool = False, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One train_step of a freshly seeded tiny model (fp32, CPU, no clipping): its loss and its gradients."""
    from drugprot.encoding import Batch
    from drugprot.model.encoder import build_encoder
    from drugprot.model.heads import RelationModel
    from drugprot.training import enable_gradient_checkpointing, train_step

    encoder = build_encoder("tiny-random", tiny={"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout},
                            seed=3)
    torch.manual_seed(3)  # the marker embeddings' and the heads' initialisation
    encoder.resize_token_embeddings(len(tokenizer))
    if checkpointing:
        enable_gradient_checkpointing(encoder, "tiny-random")
    model = RelationModel(encoder, system=system, dropout=dropout, multilabel=multilabel)
    optimizer = GradientRecorder(model.parameters())
    calls = []
    encoder.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))  # inside the checkpoint
    torch.manual_seed(4)  # the dropout masks
    loss, nonfinite = train_step(model, batch, optimizer, device=torch.device("cpu"), precision="fp32", gamma=2.0,
                                 lambda_=0.3, grad_clip=1e9, **options)
    assert not bool(nonfinite)
    passes = 1 if isinstance(batch, Batch) else len(batch)
    assert len(calls) == passes * (2 if checkpointing else 1)  # checkpointing runs each layer again in the backward
    return loss, optimizer.gradients


def assert_same_step(first, second) -> None:
    (loss_a, gradients_a), (loss_b, gradients_b) = first, second
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in gradients_a)
    for a, b in zip(gradients_a, gradients_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("system, multilabel, teacher_weight", [
    ("baseline", False, 0.0), ("multitask", False, 0.0), ("baseline", False, 0.5), ("baseline", True, 0.0)])
def test_micro_batches_give_the_gradients_of_one_batch(sample_dir, system, multilabel, teacher_weight):
    """A step over the token budget runs as micro-batches; its gradients (and loss) are those of one batch."""
    from drugprot.encoding import IGNORE_INDEX, LABELS, collate, step_batches

    pairs, tokenizer = encoded_training_pairs(sample_dir, 6)
    pairs = pairs[:24]
    (micro,) = step_batches(pairs, batch_pairs=24, token_budget=512, max_pairs=64)
    assert len(micro) >= 3 and len({len(m) for m in micro}) > 1  # uneven micro-batches: shares must be weighted
    whole = collate([pairs[i] for m in micro for i in m], tokenizer.pad_token_id)
    parts = [collate([pairs[i] for i in m], tokenizer.pad_token_id) for m in micro]
    for batch in (whole, *parts):  # genes of unknown type: multitask's entity mean is over the labelled ones only
        batch.entity_types[batch.index % 3 == 0, 1] = IGNORE_INDEX
    generator = torch.Generator().manual_seed(0)
    teacher = torch.softmax(torch.randn(len(pairs), len(LABELS), generator=generator), -1) if teacher_weight else None
    options = {"system": system, "multilabel": multilabel, "teacher": teacher, "temperature": 2.0,
               "teacher_weight": teacher_weight}
    assert_same_step(tiny_step(whole, tokenizer, **options), tiny_step(parts, tokenizer, **options))


@pytest.mark.parametrize("system", ["baseline", "multitask"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(sample_dir, system):
    """Recomputed activations (dropout on: its masks are replayed) give the step that kept activations gives."""
    from drugprot.encoding import collate

    pairs, tokenizer = encoded_training_pairs(sample_dir, 4)
    batch = collate(pairs[:12], tokenizer.pad_token_id)
    kept = tiny_step(batch, tokenizer, system=system, dropout=0.1)
    assert_same_step(kept, tiny_step(batch, tokenizer, system=system, dropout=0.1, checkpointing=True))
    with pytest.raises(AssertionError):  # the comparison sees a different dropout draw: it is not vacuous
        assert_same_step(kept, tiny_step(batch, tokenizer, system=system, dropout=0.2, checkpointing=True))


def test_gradient_checkpointing_refuses_an_encoder_without_it():
    from drugprot.training import enable_gradient_checkpointing

    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing: encoder\.name 'odd' \(Linear\) does not "
                                          r"support gradient checkpointing; set train\.gradient_checkpointing to false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "odd")


def test_a_run_with_checkpointing_and_layer_decay_trains_and_resumes_with_its_rates(tmp_path):
    from drugprot.training import train

    options = {**SMALL, "train.gradient_checkpointing": "true", "train.layer_decay": 0.5, "train.epochs": 1}
    result = train_smoke(tmp_path / "run", **options)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    peaks = sorted({group["initial_lr"] for group in state["param_groups"]}, reverse=True)
    assert peaks == pytest.approx([3e-3, 1.5e-3, 7.5e-4, 3.75e-4])  # heads, layer 1, layer 0, embeddings
    assert result.evaluations[-1]["lr"] == state["param_groups"][0]["lr"]  # the reported rate is the heads'
    again = train(smoke_config(**options), tmp_path / "run", resume=True, progress=False, log=lambda _: None)
    assert without_timing(again.evaluations) == without_timing(result.evaluations)  # already done: nothing changes


# --- configs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    if path.name.startswith("paper-") or path.name in ("minilm.yaml", "kebiolm-text-only.yaml"):
        assert config.train.eval_every == 0.5 and config.train.epochs == 10
        assert tuple(config.sampling.interval) == (-10, 16) and config.loss.gamma == 2.0
        assert config.train.precision == "bf16"
        assert config.train.batch_pairs == TrainConfig().batch_pairs == 16  # see the configs' comment


def test_paper_configs_follow_the_protocol():
    biobert = load_config(REPO / "configs" / "paper-biobert.yaml")
    assert biobert.encoder.name == "dmis-lab/biobert-base-cased-v1.1" and biobert.encoder.max_length == 256
    assert biobert.train.lr == 2e-5 and str(biobert.data.dir).endswith("data/drugprot")
    assert load_config(REPO / "configs" / "minilm.yaml").encoder.name == "minilm"
    assert load_config(REPO / "configs" / "kebiolm-text-only.yaml").encoder.name.endswith("kebiolm")


def test_the_kebiolm_config_says_it_is_not_the_papers_kebiolm():
    """Only KeBioLM's text layers load (no entity fusion, no UMLS linking): nobody should expect the paper's 0.768."""
    assert not (REPO / "configs" / "paper-kebiolm.yaml").exists()
    header = (REPO / "configs" / "kebiolm-text-only.yaml").read_text().split("data:")[0]
    assert "TEXT LAYERS ONLY, not the paper's KeBioLM system" in header and "0.768" in header


BAD_CONFIGS = [
    ("train:\n  lr: 1.0e-3\n  bogus: 1\n", r"train\.bogus: unknown key"),
    ("trian:\n  lr: 1.0e-3\n", r"trian: unknown key"),
    ("train:\n  lr: 0\n", r"train\.lr: Input should be greater than 0, got 0"),
    ("train:\n  lr: -1.0e-5\n", r"train\.lr: .*got -1e-05"),
    ("sampling:\n  interval: [2, 16]\n", r"sampling\.interval: must satisfy lo <= 0 <= hi, got \[2, 16\]"),
    ("model:\n  system: fgemr\n  markers: coarse\n", r"model: model\.system 'fgemr' .* set model\.markers to 'fine'"),
    # fine markers without FGEMR: trained on GENE-Y/GENE-N markers, the model would meet [O:GENE] at prediction
    ("model:\n  markers: fine\n", r"model: model\.markers 'fine' needs model\.system 'fgemr' \(got 'baseline'\)"),
    ("model:\n  system: multitask\n  markers: fine\n", r"model\.markers 'fine' needs model\.system 'fgemr' \(got 'multitask'\)"),
    ("model:\n  system: relation_attention\n  markers: fine\n", r"model\.markers 'fine' .*\(got 'relation_attention'\)"),
    ("encoder:\n  lowercase: sometimes\n", r"encoder\.lowercase: must be auto, true or false, got 'sometimes'"),
    ("encoding:\n  context: paragraph\n", r"encoding\.context: Input should be 'sentence' or 'abstract'"),
    ("train:\n  max_nonfinite_steps: 0\n", r"train\.max_nonfinite_steps: Input should be greater than or equal to 1"),
    ("train:\n  batch_pairs: 0\n", r"train\.batch_pairs: Input should be greater than or equal to 1, got 0"),
    ("train:\n  layer_decay: 0\n", r"train\.layer_decay: Input should be greater than 0, got 0"),
    ("train:\n  layer_decay: 1.5\n", r"train\.layer_decay: Input should be less than or equal to 1, got 1\.5"),
    ("train:\n  gradient_checkpointing: sometimes\n", r"train\.gradient_checkpointing: Input should be a valid boolean"),
    ("train:\n  lr: [1.0e-3\n  epochs: 2\n", r"bad\.yaml:3: not valid YAML"),
    ("- just\n- a list\n", r"bad\.yaml: expected a mapping of sections, got list"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_bad_config_is_refused_naming_the_key_and_nothing_is_written(tmp_path, capsys, text, message):
    from drugprot.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(bad)
    out = tmp_path / "run"
    assert main(["train", "--config", str(bad), "--out", str(out), "--quiet"]) == 1
    assert "drugprot train: error:" in capsys.readouterr().err
    assert not out.exists()


def test_train_revalidates_a_config_that_skipped_validation(tmp_path):
    from drugprot.training import train

    good = smoke_config()
    bad = good.model_copy(update={"train": TrainConfig.model_construct(**{**dict(good.train), "lr": -1.0})})
    with pytest.raises(ConfigError, match=r"train\.lr: .*got -1\.0"):
        train(bad, tmp_path / "run", progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_missing_corpus_is_refused_before_the_run_dir_exists(tmp_path):
    with pytest.raises((DrugprotError, FileNotFoundError), match="nowhere/training: no such split folder"):
        train_smoke(tmp_path / "run", **{"data.dir": str(tmp_path / "nowhere")})
    assert not (tmp_path / "run").exists()


def test_non_embedding_parameters_excludes_embeddings():
    from drugprot.model.encoder import build_encoder
    from drugprot.training import non_embedding_parameters

    encoder = build_encoder("tiny-random")
    total = sum(p.numel() for p in encoder.parameters())
    embeddings = sum(p.numel() for p in encoder.embeddings.parameters())
    assert non_embedding_parameters(encoder) == total - embeddings > 0


def test_train_step_drives_the_throughput_benchmark():
    """bench/train_throughput.py runs both loops through drugprot.training.train_step on the same pairs."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import train_throughput as bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    summary = bench.measure(encoder="tiny-random", pairs=24, device="cpu", max_seconds=30, max_docs=6, log=lambda _: None)
    plain, ours = summary["rows"]
    assert plain["pairs"] == ours["pairs"] == summary["pairs"] == 24  # one full pass each, the same pairs
    assert plain["padding_pct"] > ours["padding_pct"] and ours["useful_tflops"] > 0
    assert summary["ratio_pairs_per_s"] > 0 and "ratio" in bench.format_table(summary)
    # the plain pipeline's marker positions point at the markers it tokenized
    tokenizer = bench.load_bench_tokenizer("tiny-random", None)
    docs, candidates, _ = bench.select_pairs(REPO / "platform/drugprot/sample_data", "training", tokenizer, 8, 0, 256, 4)
    s_open, o_open = tokenizer.convert_tokens_to_ids(["[S:CHEMICAL]", "[O:GENE]"])
    batch = bench.plain_batch(docs, candidates, tokenizer, s_open, o_open)
    assert batch.input_ids.shape == (8, 256)
    rows = torch.arange(8)
    assert (batch.input_ids[rows, batch.subject] == s_open).all() and (batch.input_ids[rows, batch.object] == o_open).all()


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path, reference_run):
    from drugprot.training import train

    shutil.copytree(reference_run.run_dir, tmp_path / "run")
    with pytest.raises(DrugprotError, match=r"checkpoint does not fit this config's model \(missing \['entity_head"):
        train(smoke_config(**SMALL, **{"model.system": "multitask"}), tmp_path / "run", resume=True, progress=False,
              log=lambda _: None)
    assert load_config(tmp_path / "run" / "config.yaml").model.system == "baseline"  # still describes the checkpoint


# --- non-finite steps -----------------------------------------------------------------------------------------

@pytest.fixture
def poisoned_steps(monkeypatch):
    """Fault injection: the relation loss of the listed training steps (1-based, counted across calls) is NaN."""
    import drugprot.model.heads as heads

    steps: set[int] = set()
    calls = {"n": 0}
    real = heads.focal_loss

    def poisoned(logits, target, gamma):
        loss = real(logits, target, gamma)
        if logits.requires_grad:  # training steps only, not evaluation
            calls["n"] += 1
            if calls["n"] in steps:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(heads, "focal_loss", poisoned)
    return steps


def test_a_nonfinite_step_leaves_weights_and_optimizer_untouched(smoke_model_dir, sample_dir, poisoned_steps):
    from drugprot.candidates import corpus_candidates
    from drugprot.corpus import read_split
    from drugprot.encoding import PairEncoder, iterate_batches, token_budget_batches
    from drugprot.model.artifacts import load_artifact
    from drugprot.model.optim import build_optimizer
    from drugprot.training import train_step

    member = load_artifact(smoke_model_dir)
    model, cpu = member.model, torch.device("cpu")
    docs = read_split(sample_dir, "training").documents[:4]
    candidates, _ = corpus_candidates(docs, (-10, 16))
    pairs, _ = PairEncoder(member.tokenizer, max_length=128).encode(docs, candidates)
    batch = next(iter(iterate_batches(pairs, token_budget_batches(pairs, token_budget=2048, max_pairs=8),
                                      member.tokenizer.pad_token_id)))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01, device=cpu)

    def step():
        return train_step(model, batch, optimizer, device=cpu, precision="fp32")

    loss, nonfinite = step()
    assert bool(torch.isfinite(loss)) and not bool(nonfinite)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}
    poisoned_steps.add(2)
    loss, nonfinite = step()
    assert bool(nonfinite) and not bool(torch.isfinite(loss))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for name, param in model.named_parameters():  # moments and the step count are untouched too
        assert all(torch.equal(moments[name][k], v) for k, v in optimizer.state[param].items()), name
    loss, nonfinite = step()
    assert not bool(nonfinite)
    assert not all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # a finite step does move


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, poisoned_steps):
    poisoned_steps.update({3, 4, 9})
    result = train_smoke(tmp_path / "run", **SMALL)
    counts = [e["nonfinite_steps"] for e in result.evaluations]
    assert counts[-1] == 3 and counts == sorted(counts)
    assert all(math.isfinite(e["train_loss"]) for e in result.evaluations)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["evaluations"][-1]["nonfinite_steps"] == 3


def test_too_many_consecutive_nonfinite_steps_fail_the_run_naming_step_loss_and_config(tmp_path, poisoned_steps):
    from drugprot.training import NonFiniteTraining

    poisoned_steps.update(range(5, 1000))
    with pytest.raises(NonFiniteTraining, match=r"step 7: 3 consecutive steps had a non-finite loss or gradient norm "
                                                r"\(last loss nan; 3 skipped in all\), train\.max_nonfinite_steps is 3.*"
                                                r"loss\.gamma=2\.0.*train\.lr=0\.003"):
        train_smoke(tmp_path / "run", **SMALL, **{"train.max_nonfinite_steps": 3})


@pytest.mark.parametrize(("steps", "args", "message"), [
    ("1,7", [], "bench/gpu.sh: STEPS: unknown step '7' (steps: 1,1b,1c,2,2b,3,4,4b)"),
    ("1b,2b,2c", [], "bench/gpu.sh: STEPS: unknown step '2c' (steps: 1,1b,1c,2,2b,3,4,4b)"),
    ("2", ["--fast"], "usage: bench/gpu.sh [--dry-run]"),
])
def test_gpu_bench_refuses_an_unknown_step_or_option_before_doing_anything(tmp_path, steps, args, message):
    """bench/gpu.sh runs once per lease: a typo must stop it at once, not after minutes of GPU time."""
    import os
    import subprocess

    result = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", *args], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "STEPS": steps, "OUT": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert not list(tmp_path.iterdir())  # nothing written


def test_abstract_context_travels_with_the_model_into_prediction(tmp_path, sample_dir):
    from drugprot.corpus import read_split
    from drugprot.inference import Predictor

    result = train_smoke(tmp_path / "run", **{"encoding.context": "abstract", "train.epochs": 1,
                                             "data.max_train_docs": 6, "data.max_dev_docs": 3})
    assert json.loads((result.model_dir / "drugprot.json").read_text())["context"] == "abstract"
    predictor = Predictor.from_path(result.model_dir, device="cpu")
    assert [stage.encoder.context for stage in predictor.scorer.stages] == ["abstract"]
    documents = read_split(sample_dir, "development").documents[:3]
    assert len(predictor.predict(documents)) == 3
