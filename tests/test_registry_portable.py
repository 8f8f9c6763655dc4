"""A registered ensemble works outside this checkout: in a fresh virtual environment holding only the model's own
``requirements.txt`` (pinned, all from the package registries; torch's CPU build via ``constraints.txt``), without
drugprot installed, ``mlflow models predict -m models:/NAME@champion`` answers exactly what ``drugprot predict`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drugprot.cli import main
from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split
from drugprot.records import document_record
from test_ensemble import biased_ensemble, biased_members  # noqa: F401
from test_registry import registered, store  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _clean_environment(tracking_uri: str) -> dict[str, str]:
    """This process's environment without anything that would make drugprot importable, plus the store."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "MLFLOW_REGISTRY_URI")}
    return {**env, "MLFLOW_TRACKING_URI": tracking_uri, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a fresh environment: torch, transformers and MLflow are installed from the wheels
def test_mlflow_models_predict_in_a_fresh_environment_equals_drugprot_predict(registered, store, tmp_path):  # noqa: F811
    import mlflow

    from drugprot import mlflow_store

    location = mlflow_store.client(mlflow_store.normalize_tracking_uri(store.uri)).get_model_version_download_uri("dp", "1")
    requirements = Path(mlflow.pyfunc.get_model_dependencies(location))
    pins = requirements.read_text().split()
    assert not any(p.startswith("drugprot") for p in pins) and all("==" in p for p in pins), pins

    env = _clean_environment(store.uri)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, cwd=tmp_path, timeout=300)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-compile", "-c", str(REPO / "constraints.txt"),
                                "-r", str(requirements)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert installed.returncode == 0, installed.stderr[-3000:]
    absent = subprocess.run([str(venv / "bin" / "python"), "-c", "import drugprot"], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert absent.returncode != 0 and "No module named 'drugprot'" in absent.stderr

    documents = read_split(SAMPLE_DIR, "development").documents
    records = [{**document_record(d), "entities": json.dumps(document_record(d)["entities"])} for d in documents]
    (tmp_path / "docs.json").write_text(json.dumps({"dataframe_records": records}))
    served = subprocess.run([str(venv / "bin" / "mlflow"), "models", "predict", "-m", "models:/dp@champion",
                             "-i", "docs.json", "-o", "out.json", "--env-manager", "local"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert served.returncode == 0, served.stderr[-3000:]
    answered = {(r["pmid"], r["type"], r["arg1"], r["arg2"])
                for r in json.loads((tmp_path / "out.json").read_text())["predictions"]}

    assert main(["predict", "--model", "models:/dp@champion", "--tracking-uri", store.uri, "--data", str(SAMPLE_DIR),
                 "--out", str(tmp_path / "pred.tsv"), "--device", "cpu"]) == 0
    rows = [line.split("\t") for line in (tmp_path / "pred.tsv").read_text().splitlines()]
    expected = {(pmid, rtype, arg1.removeprefix("Arg1:"), arg2.removeprefix("Arg2:")) for pmid, rtype, arg1, arg2 in rows}
    assert expected and answered == expected
