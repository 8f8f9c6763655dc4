"""MLflow conventions without Ray: the tracker's idempotent writes, the study reader, the driver callback's glue."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from drugprot import mlflow_store, tracking  # noqa: E402
from drugprot.tracking import StudyTracker
from drugprot.mlflow_store import TrackingError  # noqa: E402
from fixtures_models import smoke_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds of migrations); tests use their own study names."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.fixture
def name(request) -> str:
    return request.node.name.replace("[", "-").replace("]", "")


@pytest.fixture
def run_folder(tmp_path, smoke_model_dir) -> Path:
    """A trial run folder as training leaves it: model/, metrics.json, config.yaml."""
    folder = tmp_path / "run"
    shutil.copytree(smoke_model_dir, folder / "model")
    (folder / "metrics.json").write_text(json.dumps({"evaluations": [], "best": {
        "eval": 2, "dev_f1_a": 0.5, "dev_f1_all": 0.4, "dev_per_type": {"INHIBITOR": 0.6, "AGONIST": 0.0}}}))
    (folder / "config.yaml").write_text("train:\n  seed: 7\n")
    return folder


def evaluation(step: int, f1: float) -> dict:
    return {"eval": step, "dev_f1_a": f1, "dev_precision_a": f1, "dev_recall_a": f1, "best_dev_f1_a": f1,
            "dev_f1_all": f1, "dev_precision_all": f1, "dev_recall_all": f1, "train_loss": 1.0,
            "lr": 1e-3, "epoch": step / 2, "pairs_per_s": 10.0, "node_id": "n1", "node_ip": "10.0.0.1", "pid": 123,
            "resumed_from_eval": 0}


def open_tracker(store: str, name: str, resume: bool = False) -> StudyTracker:
    tracker = StudyTracker(store, name)
    tracker.open_study(params={"study.num_samples": 2}, tags={"drugprot.space": "x.yaml"}, resume=resume)
    return tracker


def test_normalize_makes_sqlite_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # no choice made: the default store (order: test_environment)
    assert mlflow_store.normalize_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow_store.normalize_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(TrackingError, match=r"--tracking-uri 'mlflow.db': not a URI"):
        mlflow_store.normalize_tracking_uri("mlflow.db")


def test_unreachable_server_is_a_quick_clear_error():
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"--tracking-uri http://127.0.0.1:5109: no MLflow server answers .* after 1 s"):
        mlflow_store.check_tracking_uri("http://127.0.0.1:5109", timeout=1)
    assert time.monotonic() - start < 10


def test_sqlite_store_in_a_missing_folder(tmp_path):
    with pytest.raises(TrackingError, match=r"folder .*/missing does not exist"):
        mlflow_store.check_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")


def test_study_parent_run_and_resume(store, name):
    tracker = open_tracker(store, name)
    experiment_id, parent = tracker.experiment_id, tracker.parent_run_id
    with pytest.raises(TrackingError, match=rf"study '{name}' already exists .* pass --resume"):
        open_tracker(store, name)
    again = open_tracker(store, name, resume=True)
    assert (again.experiment_id, again.parent_run_id) == (experiment_id, parent)
    with pytest.raises(TrackingError, match=r"--resume: no experiment named 'other'"):
        open_tracker(store, "other", resume=True)
    parent_run = tracker.client.get_run(parent)
    assert parent_run.data.tags[tracking.TAG_KIND] == "study"
    assert tracker.client.get_experiment(experiment_id).name == name
    # artifacts of a sqlite store live beside the database, whatever the working folder
    assert tracker.client.get_experiment(experiment_id).artifact_location.endswith(f"/mlartifacts/{name}")


def test_params_are_logged_once_and_never_changed(store, name):
    tracker = open_tracker(store, name)
    run_id = tracker.start_trial("t1", params={"loss.gamma": 1.5, "train.seed": 3}, config={"train": {"seed": 3}})
    tracker.log_params(run_id, {"loss.gamma": 1.5})  # identical: skipped, no MLflow error
    with pytest.raises(TrackingError, match=r"param loss.gamma was logged as '1.5', now '2.0'"):
        tracker.log_params(run_id, {"loss.gamma": 2.0})


def test_evaluations_are_logged_once_per_step(store, name):
    tracker = open_tracker(store, name)
    run_id = tracker.start_trial("t1", params={"loss.gamma": 1.5}, config={"train": {"seed": 3}})
    assert tracker.log_evaluation(run_id, evaluation(1, 0.1))
    assert tracker.log_evaluation(run_id, evaluation(2, 0.2))
    assert not tracker.log_evaluation(run_id, evaluation(2, 0.2))
    fresh = StudyTracker(store, name)  # a resumed driver: knows nothing, reads the history
    fresh.attach(tracker.experiment_id, tracker.parent_run_id)
    assert not fresh.log_evaluation(run_id, evaluation(1, 0.1))
    assert fresh.log_evaluation(run_id, evaluation(3, 0.3))
    history = tracker.client.get_metric_history(run_id, "dev_f1_a")
    assert sorted(m.step for m in history) == [1, 2, 3]
    tags = tracker.client.get_run(run_id).data.tags
    assert (tags[tracking.TAG_NODE_IP], tags[tracking.TAG_PID]) == ("10.0.0.1", "123")


def test_restarted_trial_reuses_its_run(store, name):
    tracker = open_tracker(store, name)
    first = tracker.start_trial("t1", params={"loss.gamma": 1.5}, config={"train": {"seed": 3}})
    tracker.trial_failed_attempt("t1")
    fresh = StudyTracker(store, name)
    fresh.attach(tracker.experiment_id, tracker.parent_run_id)
    assert fresh.start_trial("t1", params={"loss.gamma": 1.5}, config={"train": {"seed": 3}}) == first
    tags = tracker.client.get_run(first).data.tags
    assert (tags[tracking.TAG_STARTS], tags[tracking.TAG_FAILURES]) == ("2", "1")


def test_finished_trials_are_read_back_best_first(store, name, run_folder, tmp_path):
    tracker = open_tracker(store, name)
    runs = {}
    for trial_id, f1, seed in (("t1", 0.2, 1), ("t2", 0.5, 2), ("t3", None, 3)):
        run_id = tracker.start_trial(trial_id, params={"loss.gamma": 1.0, "sampling.interval.lo": -3},
                                     config=smoke_config(**{"train.seed": seed}).dump())
        if f1 is not None:
            tracker.log_evaluation(run_id, evaluation(1, f1))
        runs[trial_id] = run_id
    tracker.finish_trial(runs["t1"], state="early-stopped", run_folder=None)
    tracker.finish_trial(runs["t2"], state="finished", run_folder=run_folder)
    tracker.finish_trial(runs["t3"], state="errored", run_folder=None)

    records = tracking.study_trials(name, store)
    assert [r.trial_id for r in records] == ["t2", "t1", "t3"]
    best = records[0]
    assert (best.best_dev_f1_a, best.seed, best.state, best.run_id) == (0.5, 2, "finished", runs["t2"])
    assert best.params == {"loss.gamma": 1.0, "sampling.interval.lo": -3}
    assert best.config["train"]["seed"] == 2 and best.tags[tracking.PARENT_TAG] == tracker.parent_run_id
    assert records[2].best_dev_f1_a is None and records[2].state == "errored"
    assert tracker.client.get_run(runs["t3"]).info.status == "FAILED"
    artifacts = {a.path for a in tracker.client.list_artifacts(best.run_id)}
    assert {"config.yaml", "metrics.json", "per_type.csv"} <= artifacts and "model" not in artifacts  # a LoggedModel
    import mlflow.artifacts

    per_type = Path(mlflow.artifacts.download_artifacts(run_id=best.run_id, artifact_path="per_type.csv",
                                                        dst_path=str(tmp_path / "pt"), tracking_uri=store)).read_text()
    assert per_type.splitlines()[:2] == ["type,f1", "AGONIST,0.0"]

    model = tracking.download_trial_model(best, tmp_path / "member", store)
    assert model == tmp_path / "member" / "model" and (model / "manifest.json").is_file()
    with pytest.raises(TrackingError, match=r"trial t1 .* has no logged model and no model/ artifact"):
        tracking.download_trial_model(records[1], tmp_path / "other", store)
    with pytest.raises(TrackingError, match=r"no study named 'nope'"):
        tracking.study_trials("nope", store)


def test_trials_csv_has_one_row_per_trial():
    records = [tracking.TrialRecord("r1", "t1", 0.5, {"a": 1, "b": [1, 2]}, 3, {}, "finished"),
               tracking.TrialRecord("r2", "t2", None, {"a": 2}, None, {}, "errored")]
    lines = tracking.trials_csv(records).splitlines()
    assert lines[0] == "trial_id,run_id,state,best_dev_f1_a,seed,a,b,node_ip,failures"
    assert lines[1].startswith("t1,r1,finished,0.5,3,1,") and lines[2].startswith("t2,r2,errored,,,2,")


# --- the driver callback, driven with stand-in trials (no Ray runtime) -------------------------------------------------

def fake_trial(trial_id: str, params: dict, trial_path: Path | None = None, status: str = "RUNNING"):
    """A Tune trial as the callback sees it; its storage is a local folder (``<trial_path>/best`` its best model)."""
    import pyarrow.fs

    storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(trial_path))
    return SimpleNamespace(trial_id=trial_id, config=params, last_result={}, storage=storage, status=status)


def store_best_model(run_folder: Path, trial_path: Path) -> None:
    """What a trial uploads when its model improves (drugprot.tuning.trainable)."""
    import pyarrow.fs

    from drugprot.tuning.trainable import best_model_store

    best_model_store(pyarrow.fs.LocalFileSystem(), str(trial_path)).upload(
        run_folder, ("model", "metrics.json", "config.yaml"), evaluation=2)


def test_callback_logs_a_trial_from_start_to_early_stop(store, name, run_folder, tmp_path):
    from drugprot.tuning.callbacks import MlflowStudyCallback
    from drugprot.tuning.space import load_space

    config = smoke_config()
    space = load_space(REPO / "search_spaces" / "smoke.yaml", config)
    tracker = open_tracker(store, name)
    callback = MlflowStudyCallback(tracker, space=space, base_config=config.dump(), max_t=4)
    params = {"loss.gamma": 0.5, "loss.lambda": 0.5, "train.lr": 0.01, "sampling.interval.lo": -9,
              "sampling.interval.hi": 13, "train.seed": 13}
    store_best_model(run_folder, tmp_path / "trial_abc")
    trial = fake_trial("abc", params, tmp_path / "trial_abc")
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_result(0, [trial], trial, {**evaluation(1, 0.3), "steps_per_epoch": 38})
    trial.last_result = {**evaluation(2, 0.1), "steps_per_epoch": 38, "done": True}  # ASHA's STOP marks it done
    callback.on_trial_result(0, [trial], trial, trial.last_result)
    callback.on_trial_complete(0, [trial], trial)

    (record,) = tracking.study_trials(name, store)
    assert (record.trial_id, record.state, record.seed) == ("abc", "early-stopped", 13)
    assert tracker.client.get_run(record.run_id).data.params["steps_per_epoch"] == "38"
    assert record.config["sampling"]["interval"] == [-9, 13] and record.params["train.lr"] == 0.01
    model = tracker.client.get_logged_model(record.tags[tracking.TAG_MODEL_ID])
    assert (model.name, model.source_run_id, model.status.value) == ("trial-abc", record.run_id, "READY")


def test_trial_run_names_say_the_optuna_trial_and_its_values():
    from drugprot.tuning.callbacks import run_name

    assert run_name(7, {"train.lr": 3.1e-5, "loss.gamma": 1.8}) == "t07 lr=3.1e-5 γ=1.8"
    assert run_name(12, {"model.system": "multitask", "loss.lambda": 0.25, "sampling.interval.lo": -9}) == \
        "t12 system=multitask λ=0.25 lo=-9"
    assert run_name(None, {"train.lr": 1e-3}) is None  # no Optuna trial: the run keeps the Ray trial id


@pytest.mark.parametrize("stopped, last, state", [(False, 3, "finished"), (True, 4, "finished"),
                                                   (True, 2, "early-stopped"), (None, 4, "finished"),
                                                   (None, 1, "early-stopped")])
def test_trial_state(stopped, last, state):
    from drugprot.tuning.callbacks import trial_state

    assert trial_state(error=False, stopped_by_scheduler=stopped, last_eval=last, max_t=4) == state
    assert trial_state(error=True, stopped_by_scheduler=stopped, last_eval=last, max_t=4) == "errored"


def test_progress_table_lists_params_and_best():
    from drugprot.tuning.callbacks import render_table
    from drugprot.tuning.space import load_space

    space = load_space(REPO / "search_spaces" / "smoke.yaml", smoke_config())
    trials = [fake_trial("t1", {"loss.gamma": 1.0, "train.lr": 0.01}), fake_trial("t2", {"loss.gamma": 2.0}, status="TERMINATED")]
    trials[0].last_result = {"eval": 2, "best_dev_f1_a": 0.25}
    trials[1].last_result = {"eval": 4, "best_dev_f1_a": 0.5}
    table = render_table(trials, {"t2": "finished"}, space, "demo", 4, 4)
    lines = table.splitlines()
    assert lines[0] == "[demo] 1/4 done, 1 running; best dev F1 A 0.5000 (t2)"
    assert lines[1].split()[:3] == ["trial", "gamma", "lambda"]
    assert "2/4" in lines[2] and "0.2500" in lines[2] and lines[3].rstrip().endswith("finished")


def test_progress_table_of_a_long_study_shows_running_and_best_trials():
    from drugprot.tuning.callbacks import render_table
    from drugprot.tuning.space import load_space

    space = load_space(REPO / "search_spaces" / "smoke.yaml", smoke_config())
    trials = [fake_trial(f"t{i:02d}", {"loss.gamma": 1.0}, status="TERMINATED") for i in range(20)]
    for i, trial in enumerate(trials):
        trial.last_result = {"eval": 4, "best_dev_f1_a": i / 100}
    trials[0].status = "RUNNING"
    lines = render_table(trials, {}, space, "long", 20, 4).splitlines()
    shown = [line.split()[0] for line in lines[2:-1]]
    assert shown == ["t00", "t15", "t16", "t17", "t18", "t19"]
    assert lines[-1] == "(14 more trials not shown: pending, or ended below the best five)"


def test_a_trial_left_running_by_a_killed_driver_is_closed_at_the_end(store, name, run_folder, tmp_path):
    """Tune says the trial ended, but the driver died before the callback closed its run: the study's closing pass
    takes the state from the evaluations MLflow holds and the artifacts from the trial's best model in the storage."""
    from drugprot.tuning.study import _reconcile

    tracker = open_tracker(store, name)
    run_id = tracker.start_trial("t9", params={"loss.gamma": 1.0}, config={"train": {"seed": 1}})
    for step in (1, 2):
        tracker.log_evaluation(run_id, evaluation(step, 0.1 * step))
    import pyarrow.fs

    trial_path = tmp_path / "study" / "trial_t9"
    store_best_model(run_folder, trial_path)
    result = SimpleNamespace(metrics={}, error=None, filesystem=pyarrow.fs.LocalFileSystem(), path=str(trial_path))
    _reconcile(tracker, result, "t9", max_t=4)
    (record,) = tracking.study_trials(name, store)
    assert record.state == "early-stopped"  # 2 of 4 evaluations, no error
    assert tracking.TAG_MODEL_ID in record.tags  # its best model, a LoggedModel
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
