"""Final models (``data.final``, ``drugprot ensemble --reseed K --final``): trained on train + dev for a fixed number
of steps, recorded as such, registered without a dev score and never promoted by the gate; and refusals that leave
no run folder behind."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from drugprot.config import ConfigError, SAMPLE_DIR
from drugprot.corpus import read_split
from drugprot.errors import DrugprotError
from fixtures_models import smoke_config

FINAL = {"data.max_train_docs": 12, "data.max_dev_docs": 4, "data.final": "true", "train.max_steps": 7,
         "train.batch_pairs": 64, "train.lr": "3e-3"}


def sample_pmids(split: str, count: int) -> list[str]:
    return [d.pmid for d in read_split(SAMPLE_DIR, split).documents[:count]]


@pytest.fixture(scope="module")
def final_run(tmp_path_factory):
    """One final run, watched where training consumes its data: the candidates it generates, the pairs of every
    batch it steps on, and every optimizer step."""
    import drugprot.training as training

    consumed = SimpleNamespace(candidates=None, batched=set(), steps=0)
    generate, batches, step = training.corpus_candidates, training.iterate_batches, training.train_step

    def candidates(documents, interval):
        found = generate(documents, interval)
        if consumed.candidates is None:  # the first call is the training documents'
            consumed.candidates = found[0]
        return found

    def iterate(pairs, members, pad_id):
        for group in members:
            consumed.batched.update(consumed.candidates[pairs[i].index].pmid for i in group)
            yield from batches(pairs, [group], pad_id)

    def counted_step(*args, **kwargs):
        consumed.steps += 1
        return step(*args, **kwargs)

    run = tmp_path_factory.mktemp("final") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "corpus_candidates", candidates)
        patch.setattr(training, "iterate_batches", iterate)
        patch.setattr(training, "train_step", counted_step)
        result = training.train(smoke_config(**FINAL), run, progress=False, log=lambda _: None)
    return SimpleNamespace(result=result, run=run, consumed=consumed)


def test_a_final_run_steps_on_the_development_documents(final_run):
    dev = sample_pmids("development", 4)
    with_pairs = {c.pmid for c in final_run.consumed.candidates}
    assert set(dev) & with_pairs  # the sample's dev documents give pairs …
    steps_per_epoch = final_run.result.evaluations[-1]["steps_per_epoch"]
    assert steps_per_epoch < FINAL["train.max_steps"]  # … and a whole epoch ran, so every one of them was stepped on
    assert final_run.consumed.batched == with_pairs
    assert set(dev) & with_pairs <= final_run.consumed.batched


def test_a_final_run_stops_at_exactly_max_steps_and_keeps_the_last_model(final_run):
    assert final_run.consumed.steps == 7
    state = json.loads((final_run.run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 7
    evaluations = final_run.result.evaluations
    assert evaluations[-1]["step"] == 7
    assert [e["model_saved"] for e in evaluations] == [False] * (len(evaluations) - 1) + [True]
    assert not any(key.startswith("dev_") for e in evaluations for key in e)  # nothing was scored
    assert final_run.result.best is None and not (final_run.run / "dev_probabilities.safetensors").exists()


def test_a_final_run_records_what_it_trained_on(final_run):
    train, dev = sample_pmids("training", 12), sample_pmids("development", 4)
    saved = json.loads((final_run.run / "metrics.json").read_text())
    record = saved["final"]
    assert record["trained_on"] == {"training": 12, "development": 4}
    assert record["documents"] == train + dev and record["steps"] == 7 and saved["best"] is None
    info = json.loads((final_run.run / "model" / "drugprot.json").read_text())
    assert info["dev"] is None and "documents" not in info["final"]
    assert info["final"]["documents_sha256"] == record["documents_sha256"] and info["final"]["steps"] == 7
    assert info["config"]["data"]["final"] is True and info["config"]["train"]["max_steps"] == 7


def test_a_final_run_resumes_to_the_uninterrupted_model(final_run, tmp_path):
    from drugprot.training import train

    class Crash(Exception):
        pass

    def crash_at_second(metrics, run_dir):
        if metrics["eval"] == 2:  # step 5, after the resumable state of the first epoch was written
            raise Crash()

    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(smoke_config(**FINAL), run, report=crash_at_second, progress=False, log=lambda _: None)
    assert not (run / "model").exists()  # a final run keeps only the last step's model
    messages: list[str] = []
    result = train(smoke_config(**FINAL), run, resume=True, progress=False, log=messages.append)
    assert any("resumed from" in m and "at step 5/7" in m for m in messages), messages
    assert result.final == json.loads((final_run.run / "metrics.json").read_text())["final"]
    assert (run / "model" / "model.safetensors").read_bytes() == \
        (final_run.run / "model" / "model.safetensors").read_bytes()


def test_max_steps_replaces_epochs_in_a_scored_run(tmp_path):
    from drugprot.training import train

    result = train(smoke_config(**{"data.max_train_docs": 4, "data.max_dev_docs": 2, "train.max_steps": 3,
                                   "train.epochs": 50}), tmp_path / "run", progress=False, log=lambda _: None)
    assert result.evaluations[-1]["step"] == 3 and "dev_f1_a" in result.evaluations[-1] and result.final is None


@pytest.mark.parametrize("overrides, message", [
    ({"data.final": "true"}, r"data\.final: true needs train\.max_steps \(the optimizer steps to train for, chosen on "
                             r"development: `drugprot ensemble --reseed K --final` takes the chosen trial's\)"),
    ({"data.final": "true", "train.max_steps": 5, "model.system": "fgemr", "model.markers": "fine"},
     r"data\.final: model\.system fgemr cannot train on the development documents: their genes carry no "
     r"GENE-Y/GENE-N types"),
    ({"train.max_steps": 0}, r"train\.max_steps: Input should be greater than or equal to 1, got 0"),
    ({"data.final": "maybe", "train.max_steps": 5}, r"data\.final: Input should be a valid boolean"),
])
def test_bad_final_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        smoke_config(**overrides)


@pytest.mark.parametrize("key, value, message", [
    ("train.gradient_checkpointing", "true", r"train\.gradient_checkpointing: encoder\.name 'tiny-random' "
                                             r"\(BertModel\) does not support gradient checkpointing"),
    ("train.layer_decay", 0.8, r"train\.layer_decay: cannot find the encoder's 99 layers"),
])
def test_an_encoder_refusal_leaves_no_run_folder(tmp_path, monkeypatch, key, value, message):
    """The encoder is a real tiny BERT made to lack the feature: refused before the run folder exists."""
    import drugprot.training as training

    build = training.build_encoder

    def lacking(*args, **kwargs):
        encoder = build(*args, **kwargs)
        encoder.supports_gradient_checkpointing = False
        encoder.config.num_hidden_layers = 99  # its parameter names hold 2 layers: no layer-wise decay found
        return encoder

    monkeypatch.setattr(training, "build_encoder", lacking)
    run = tmp_path / "runs" / "refused"
    with pytest.raises(DrugprotError, match=message):
        training.train(smoke_config(**{key: value, "data.max_train_docs": 4, "data.max_dev_docs": 2}), run,
                       progress=False, log=lambda _: None)
    assert not run.exists()


def test_the_trial_reporter_forwards_a_final_run_without_a_dev_score():
    from drugprot.tuning.trainable import TrialReporter

    sent = []
    reporter = TrialReporter(trial_id="t1", best=float("-inf"), resumed_from=0, where={"pid": 1},
                             report=lambda result, folder, **saved: sent.append((result, saved)))
    reporter({"eval": 1, "step": 7, "epoch": 1.0, "train_loss": 0.5, "model_saved": True, "state_saved": True},
             Path("."))
    (result, saved), = sent
    assert result["step"] == 7 and "best_dev_f1_a" not in result and "dev_per_type" not in result
    assert saved == {"model_saved": True, "state_saved": True}


def test_the_step_count_comes_from_the_trials_best_checkpoint():
    from drugprot.ensemble import EnsembleError
    from drugprot.ensemble.members import final_steps

    trial = SimpleNamespace(trial_id="t3")
    assert final_steps({"best": {"step": 42, "eval": 3}, "evaluations": []}, trial, study="s") == 42
    with pytest.raises(EnsembleError, match=r"--final: trial t3 of study 's' recorded no step for its best checkpoint "
                                            r"\(metrics\.json best\.step, got None\)"):
        final_steps({"best": None}, trial, study="s")


@pytest.mark.parametrize("argv, message", [
    (["--members", "MODEL", "--final"], "--final needs --study and --reseed K: it retrains the study's best "
                                        "configuration on train + dev with K seeds"),
    (["--members", "MODEL", "--final", "--top-k", "2"], "--final needs --study and --reseed K"),
    (["--study", "s", "--reseed", "2", "--final", "--data", "DATA"],
     "--data and --split choose the dev evaluation, and a --final ensemble has none"),
    (["--study", "s", "--reseed", "2", "--final", "--split", "development"], "drop them"),
])
def test_cli_final_bad_inputs_are_refused_before_anything_runs(smoke_model_dir, tmp_path, capsys, argv, message):
    from drugprot.cli import main

    argv = [str(smoke_model_dir) if a == "MODEL" else str(SAMPLE_DIR) if a == "DATA" else a for a in argv]
    assert main(["ensemble", "--out", str(tmp_path / "e"), "--tracking-uri", f"sqlite:///{tmp_path}/none.db", *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "none.db").exists()


@pytest.fixture(scope="module")
def final_ensemble(final_run, tmp_path_factory):
    from drugprot.ensemble import build_ensemble
    from drugprot.ensemble.build import MemberSource

    out = tmp_path_factory.mktemp("final-ensemble") / "ens"
    member = MemberSource(final_run.run / "model", name="final-seed13",
                          source={"study": "s", "reseed_of": "t3", "final": True, "steps": 7, "seed": 13})
    lines = []
    built = build_ensemble([member], out, log=lines.append)
    return SimpleNamespace(path=out, built=built, lines=lines)


def test_an_ensemble_of_final_members_has_no_dev_score(final_ensemble):
    built = final_ensemble.built
    assert built.evaluation is None and built.dev_f1 is None and built.meta["dev"] is None
    assert built.meta["trained_on_dev"] == ["final-seed13"] and built.meta["dev_score"] == "none (trained on train+dev)"
    assert "members final-seed13 trained on the development documents: no dev score is computed" in final_ensemble.lines


def test_a_final_ensemble_predicts_like_any_other(final_ensemble):
    from drugprot.inference import Predictor

    documents = read_split(SAMPLE_DIR, "development").documents[:3]
    predictions = Predictor.from_ensemble(final_ensemble.path, device="cpu").predict(documents)
    assert len(predictions) == 3  # a folder without a dev evaluation loads and answers (dev: null)


def test_a_final_ensemble_is_registered_as_unscored_and_the_gate_refuses_it(final_ensemble, tmp_path, monkeypatch):
    from drugprot import mlflow_store
    from drugprot.ensemble.publish import log_ensemble
    from drugprot.registry import Gate

    monkeypatch.setenv("DRUGPROT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines: list[str] = []
    # a scored gate passed by the caller cannot promote it: the final members' dev figures are not comparable
    run = log_ensemble(final_ensemble.path, tracking_uri=uri, register="dp-final", log=lines.append, gate=Gate(0.9))
    registration = run.registration
    assert not registration.alias_moved
    assert registration.reason == ("the new version has no dev F1 (its members trained on train+dev, so no development "
                                   "score exists to pass the gate; the A/B figures that chose their configuration and "
                                   "step count are the trial's); use --force to promote it anyway")
    client = mlflow_store.client(mlflow_store.normalize_tracking_uri(uri))
    version = client.get_model_version("dp-final", registration.version)
    assert version.tags["drugprot.dev_score"] == "none (trained on train+dev)" and version.tags["promotion"] == "refused"
    assert "dev_f1" not in version.tags
    logged = client.get_run(run.run_id).data
    assert logged.tags["drugprot.dev_score"] == "none (trained on train+dev)"
    assert logged.params["trained_on_dev"] == "final-seed13" and logged.params["final_steps"] == "7"
    assert logged.params["final_of_trial"] == "t3"
    assert json.loads(logged.params["final_trained_on"]) == {"training": 12, "development": 4}
    assert not any(name.startswith("ensemble_f1") for name in logged.metrics)
    assert any(line.startswith("registry dp-final: version 1 ") and "no development score" in line for line in lines)
    forced = log_ensemble(final_ensemble.path, tracking_uri=uri, register="dp-final", log=lines.append, force=True)
    assert forced.registration.alias_moved
    tags = client.get_model_version("dp-final", forced.registration.version).tags
    assert tags["promotion"] == "forced" and "its members trained on train+dev" in tags["forced_over"]


def test_a_study_of_final_runs_is_refused_before_anything_starts(tmp_path, capsys):
    import ray

    from drugprot.cli import main
    from fixtures_models import REPO

    code = main(["tune", "--config", str(REPO / "configs/smoke.yaml"), "--space", str(REPO / "search_spaces/smoke.yaml"),
                 "--name", "final", "--storage", str(tmp_path / "storage"), "--tracking-uri",
                 f"sqlite:///{tmp_path}/mlflow.db", "--dry-run", "1", "--set", "data.final=true",
                 "--set", "train.max_steps=3"])
    assert code != 0
    assert ("data.final: a study chooses on the development documents, which a final run trains on (it has no dev "
            "score); tune without it, then `drugprot ensemble --study NAME --reseed K --final`") in capsys.readouterr().err
    assert not (tmp_path / "storage").exists() and not ray.is_initialized()


def test_a_final_member_is_recorded_as_its_own_run_beside_its_trial(final_run, tmp_path, monkeypatch):
    import mlflow.artifacts

    from drugprot import mlflow_store, tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_store.normalize_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow_store.client(uri)
    experiment = client.create_experiment("s")
    trial = client.create_run(experiment, tags={tracking.TAG_KIND: tracking.KIND_TRIAL, tracking.TAG_STUDY: "s",
                                                tracking.TAG_TRIAL_ID: "t3", tracking.TAG_STATE: "finished"})
    (record,) = tracking.study_trials("s", uri)
    metrics = json.loads((final_run.run / "metrics.json").read_text())
    config = json.loads((final_run.run / "model" / "drugprot.json").read_text())["config"]
    run = client.get_run(tracking.log_final_member(record, uri, config=config, metrics=metrics, seed=13))
    tags, params = run.data.tags, run.data.params
    assert tags["drugprot.kind"] == "final" and tags["drugprot.final_of_trial"] == "t3"
    assert tags["drugprot.final_of_run"] == trial.info.run_id and tags["drugprot.seed"] == "13"
    assert tags["drugprot.dev_score"] == "none (trained on train+dev)" and run.info.status == "FINISHED"
    assert json.loads(tags["drugprot.config"])["data"]["final"] is True
    assert params["train.max_steps"] == "7" and params["data.final"] == "True"
    assert (params["final.trained_on.training"], params["final.trained_on.development"]) == ("12", "4")
    inputs = {(next(t.value for t in i.tags if t.key == "mlflow.data.context"),
               next(t.value for t in i.tags if t.key == "drugprot.role")) for i in run.inputs.dataset_inputs}
    assert inputs == {("training", "train"), ("development", "train")}  # the dev split was a training input
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="metrics.json", dst_path=str(tmp_path / "dl"), tracking_uri=uri)).read_text())
    assert set(sample_pmids("development", 4)) <= set(logged["final"]["documents"])
    assert [r.run_id for r in tracking.study_trials("s", uri)] == [trial.info.run_id]  # it is not read as a trial
