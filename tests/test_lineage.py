"""Lineage in MLflow 3 against a real ``mlflow server``: a trial's best model is a LoggedModel linked to its run, the
metrics it was chosen on and the corpus it saw; an ensemble's LoggedModel takes its members' as inputs; a registered
version names its code and data; runs carry the standard source tags; links open on the model-training view."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from drugprot import mlflow_store, tracking  # noqa: E402
from drugprot.config import SAMPLE_DIR  # noqa: E402
from drugprot.corpus import split_files  # noqa: E402
from fixtures_mlflow import mlflow_server  # noqa: E402,F401
from fixtures_models import smoke_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRIALS = (("ab12c_00007", 0.4), ("ab12c_00002", 0.3))  # Ray trial ids; Optuna trials 7 and 2


def git_head() -> str | None:
    found = subprocess.run(["git", "-C", str(REPO / "platform" / "drugprot"), "rev-parse", "HEAD"], capture_output=True,
                           text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def files_digest(split: str) -> str:
    """sha256 over the split's files (names and bytes), computed here independently of drugprot.tracking."""
    digest = hashlib.sha256()
    for file in sorted(f for f in split_files(SAMPLE_DIR, split).values() if f is not None):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def evaluation(step: int, f1: float) -> dict:
    return {"eval": step, "dev_f1_a": f1, "dev_precision_a": f1, "dev_recall_a": f1, "best_dev_f1_a": f1,
            "dev_f1_all": f1, "train_loss": 1.0, "wall_s": 10.0 * step, "device_s": 9.0 * step}


@pytest.fixture(scope="module")
def study(mlflow_server, smoke_model_dir, tmp_path_factory):  # noqa: F811
    """A study of two trials tracked the way the Tune driver does it: two evaluations each, the best at step 2."""
    root = tmp_path_factory.mktemp("lineage")
    folder = root / "run"
    shutil.copytree(smoke_model_dir, folder / "model")
    (folder / "metrics.json").write_text(json.dumps({"evaluations": [], "best": {"eval": 2, "dev_per_type": {}}}))
    tracker = tracking.StudyTracker(mlflow_server, "lineage")
    tracker.open_study(params={"space.scheduler.metric": "dev_f1_a"}, tags={}, resume=False)
    runs = {}
    for trial_id, f1 in TRIALS:
        run_id = tracker.start_trial(trial_id, params={"train.lr": 0.01}, config=smoke_config().dump())
        tracker.set_tags(run_id, {tracking.TAG_OPTUNA_TRIAL: str(int(trial_id[-2:]))})  # as the Tune callback does
        tracker.log_evaluation(run_id, evaluation(1, f1 / 2))
        tracker.log_evaluation(run_id, evaluation(2, f1))
        tracker.log_totals(run_id, {"evaluations": 2.0, "asha_stopped": 0.0, "wall_s": 21.0}, step=2)
        tracker.finish_trial(run_id, state="finished", run_folder=folder)
        runs[trial_id] = run_id
    return SimpleNamespace(tracker=tracker, client=tracker.client, uri=mlflow_server, runs=runs, root=root)


def test_trial_best_model_is_a_logged_model_named_after_the_trial(study, tmp_path):
    run_id = study.runs["ab12c_00007"]
    run = study.client.get_run(run_id)
    model = study.client.get_logged_model(run.data.tags[tracking.TAG_MODEL_ID])
    assert model.name == "t07-ab12c_00007" and model.source_run_id == run_id and model.status.value == "READY"
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 2)]  # the run's Models column
    assert model.tags[tracking.TAG_SELECTED_ON] == "dev_f1_a,best_dev_f1_a"  # the study's scheduler metric, Optuna's
    linked = {m.key: m for m in model.metrics}
    assert set(linked) == {"dev_f1_a", "best_dev_f1_a"}
    assert all((m.step, m.value) == (2, 0.4) for m in linked.values())
    assert {(m.dataset_name, m.dataset_digest) for m in linked.values()} == {("sample_data", files_digest("development")[:16])}
    # linking the metrics to the model added no second point to the run's charts
    assert sorted(m.step for m in study.client.get_metric_history(run_id, "dev_f1_a")) == [1, 2]
    record = next(r for r in tracking.study_trials("lineage", study.uri) if r.run_id == run_id)
    downloaded = tracking.download_trial_model(record, tmp_path, study.uri)  # the ensemble's members come from here
    assert downloaded == tmp_path / "model" and (downloaded / "model.safetensors").is_file()


def test_trial_run_shows_the_corpus_it_saw_and_who_ran_which_code(study):
    run = study.client.get_run(study.runs["ab12c_00002"])
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "development"}
    for split, dataset in inputs.items():
        assert (dataset.name, dataset.source_type) == ("sample_data", "local")
        assert dataset.digest == files_digest(split)[:16] and json.loads(dataset.profile)["sha256"] == files_digest(split)
        assert json.loads(dataset.source)["uri"] == (SAMPLE_DIR.resolve() / split).as_uri()
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags.get("mlflow.source.git.commit") == git_head()  # this suite runs from a checkout


def test_trial_totals_sit_at_the_step_where_they_were_measured(study):
    run_id = study.runs["ab12c_00007"]
    for name in ("evaluations", "asha_stopped", "wall_s"):
        assert [m.step for m in study.client.get_metric_history(run_id, name)][-1] == 2, name
        assert 0 not in {m.step for m in study.client.get_metric_history(run_id, name)}, name
    assert study.client.get_run(run_id).data.metrics["wall_s"] == 20.0  # the evaluation's own value stays


@pytest.fixture(scope="module")
def ensemble(study, tmp_path_factory):
    """The study's two trials as an ensemble, logged and registered as ``lineage``."""
    from drugprot.ensemble.build import MemberSource, build_ensemble
    from drugprot.ensemble.publish import log_ensemble

    root = tmp_path_factory.mktemp("lineage-ensemble")
    sources = []
    for record in tracking.study_trials("lineage", study.uri):
        folder = tracking.download_trial_model(record, root / record.trial_id, study.uri)
        sources.append(MemberSource(folder, name=f"{record.trial_id}-seed{record.seed}", dev_f1_a=record.best_dev_f1_a,
                                    source={"study": "lineage", "trial_id": record.trial_id, "run_id": record.run_id}))
    out = root / "ensemble"
    build_ensemble(sources, out, vote="hard", source={"study": "lineage", "selection": "top-k"}, log=lambda _: None,
                   progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRUGPROT_CACHE_DIR", str(root / "cache"))
        run = log_ensemble(out, tracking_uri=study.uri, register="lineage", run_name="ensemble-lineage-1",
                           log=lambda _: None)
    return run


def test_ensemble_logged_model_is_named_after_it_and_takes_its_members_models(study, ensemble):
    run = study.client.get_run(ensemble.run_id)
    members = [study.client.get_run(study.runs[t]).data.tags[tracking.TAG_MODEL_ID] for t, _ in TRIALS]
    assert sorted(m.model_id for m in run.inputs.model_inputs) == sorted(members)  # the trials' LoggedModels
    version = study.client.get_model_version("lineage", ensemble.registration.version)
    model = study.client.get_logged_model(version.tags["model_id"])
    assert version.source == f"models:/{model.model_id}"
    assert model.name == "ensemble-lineage-1" and model.source_run_id == ensemble.run_id
    assert model.tags["drugprot.member_models"] == ",".join(members)
    assert [(o.model_id) for o in run.outputs.model_outputs] == [model.model_id]
    # the run's metrics are the model's own, each once, on the dev split they were scored on (as a trial's model)
    assert sorted(m.key for m in model.metrics) == sorted(run.data.metrics) and "ensemble_f1" in run.data.metrics
    assert all((m.step, m.value) == (0, run.data.metrics[m.key]) for m in model.metrics)
    dev = ("sample_data", files_digest("development")[:16])
    assert {(m.dataset_name, m.dataset_digest) for m in model.metrics} == {dev}
    assert [len(study.client.get_metric_history(ensemble.run_id, k)) for k in run.data.metrics] == [1] * len(run.data.metrics)
    splits = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in run.inputs.dataset_inputs}
    assert splits == {"training", "development"}


def test_registered_version_says_which_code_and_data_made_it(study, ensemble):
    from importlib.metadata import version as installed

    tags = study.client.get_model_version("lineage", ensemble.registration.version).tags
    assert tags["code_version"] == installed("drugprot") and tags.get("code_commit", "") == (git_head() or "")
    dev = files_digest("development")[:16]
    assert tags["data.development"] == f"sample_data@{dev} ({(SAMPLE_DIR.resolve() / 'development').as_uri()})"
    assert tags["data.training"].startswith(f"sample_data@{files_digest('training')[:16]} ")


def test_ensemble_figures_are_one_table_and_never_mix_into_trial_charts(study, ensemble, tmp_path):
    import mlflow.artifacts

    run = study.client.get_run(ensemble.run_id)
    trial_metrics = set(study.client.get_run(study.runs["ab12c_00007"]).data.metrics)
    assert not set(run.data.metrics) & trial_metrics
    assert "ensemble_f1" in run.data.metrics and not [k for k in run.data.metrics if k.startswith("member")]
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=ensemble.run_id, artifact_path="members.json", dst_path=str(tmp_path), tracking_uri=study.uri)).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["trial_id"] for r in rows] == [t for t, _ in TRIALS]
    assert [r["trial_dev_f1_a"] for r in rows] == [f for _, f in TRIALS]
    assert all(r["model_id"] and r["run_id"] == study.runs[r["trial_id"]] for r in rows)


# -- the UI --------------------------------------------------------------------------------------------------------

def page_text(url: str, profile: Path) -> str:
    """The text of an MLflow UI page after its scripts ran (headless Chromium, virtual time: no fixed sleep)."""
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                          "--virtual-time-budget=20000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=180).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_links_open_the_model_training_view(study, tmp_path):
    experiment = study.tracker.experiment_id
    run_id = study.runs["ab12c_00007"]
    assert study.client.get_experiment(experiment).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    run_page = page_text(mlflow_store.run_link(study.uri, experiment, run_id), tmp_path / "p1")
    assert "ab12c_00007" in run_page, run_page[:2000]  # the page rendered
    assert "Evaluations" not in run_page and "Model registry" in run_page  # the model-training view, not GenAI
    assert "t07-ab12c_00007" in run_page and "sample_data" in run_page  # its LoggedModel and dataset
    runs = page_text(mlflow_store.run_link(study.uri, experiment), tmp_path / "p2")
    assert "Dataset" in runs and "Model registry" in runs and "Evaluations" not in runs, runs[:2000]
    assert "Run Name" in runs  # the runs table, not the GenAI overview
