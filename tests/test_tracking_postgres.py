"""MLflow on a real PostgreSQL database: a study of four concurrent trials logs every metric, and the registry works.

This is the team set-up (``infra/mlflow``): concurrent writers go through one ``mlflow server`` whose backend
store is PostgreSQL. Metric counts are checked against what each trial reported to Ray Tune (its ``result.json``
in the study storage), value for value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures_mlflow import mlflow_server_process
from fixtures_models import smoke_config
from fixtures_postgres import postgres_uri  # noqa: F401  (fixture)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_on_postgres(postgres_uri, tmp_path_factory):  # noqa: F811
    with mlflow_server_process(tmp_path_factory.mktemp("mlflow-pg"), backend_store_uri=postgres_uri) as (uri, _):
        yield uri


@pytest.fixture(scope="module")
def study(server_on_postgres, tmp_path_factory):
    from drugprot.tuning.space import load_space
    from drugprot.tuning.study import Resources, StudyRuntime, StudySearch, tune_study

    storage = tmp_path_factory.mktemp("pg-study")
    search = StudySearch(config=smoke_config(), space=load_space(REPO / "search_spaces" / "smoke.yaml", smoke_config()),
                         num_samples=4, max_concurrent=4)
    result = tune_study(search, StudyRuntime(name="pg-study", resources=Resources(cpus=0.5), storage=storage,
                                             tracking_uri=server_on_postgres), say=lambda _: None)
    return result, storage


def _reported(storage: Path, trial_id: str) -> list[dict]:
    lines = (storage / "pg-study" / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_every_reported_metric_arrives_in_postgres(study, server_on_postgres):
    from mlflow import MlflowClient

    result, storage = study
    client = MlflowClient(server_on_postgres)
    assert result.complete and len(result.trials) == 4
    total = 0
    for record in result.trials:
        reported = [r for r in _reported(storage, record.trial_id) if "dev_f1_a" in r]
        logged = sorted(client.get_metric_history(record.run_id, "dev_f1_a"), key=lambda m: m.step)
        assert [m.step for m in logged] == [r["eval"] for r in reported], record.trial_id
        assert [m.value for m in logged] == pytest.approx([r["dev_f1_a"] for r in reported]), record.trial_id
        for name in ("dev_precision_a", "dev_recall_a", "dev_f1_all", "train_loss"):
            assert len(client.get_metric_history(record.run_id, name)) == len(reported), (record.trial_id, name)
        total += len(reported)
    assert total >= 4 + 3  # four trials, at least one ran past its first evaluation
    runs = client.search_runs([result.experiment_id], max_results=100)
    assert len(runs) == 5  # the study's parent run and one child per trial, nothing duplicated


def test_registry_on_postgres(study, server_on_postgres, tmp_path):
    from mlflow import MlflowClient

    from drugprot import tracking
    from drugprot.model.artifacts import verify_manifest

    result, _ = study
    client = MlflowClient(server_on_postgres, registry_uri=server_on_postgres)
    best = result.best
    model_id = best.tags[tracking.TAG_MODEL_ID]  # the trial's best model, a LoggedModel
    client.create_registered_model("pg-smoke")
    version = client.create_model_version("pg-smoke", f"models:/{model_id}", run_id=best.run_id, model_id=model_id)
    client.set_registered_model_alias("pg-smoke", "champion", version.version)
    resolved = client.get_model_version_by_alias("pg-smoke", "champion")
    assert resolved.version == version.version and resolved.run_id == best.run_id
    folder = tracking.download_trial_model(best, tmp_path, server_on_postgres)
    verify_manifest(folder)  # the trial's model came back whole through the server
