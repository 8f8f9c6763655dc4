"""Log an ensemble to MLflow (a run in the study's experiment), register it as a pyfunc model from code, and
move the champion alias only when the new version's dev F1 beats the current champion's (or when forced; the rule
itself, and reading the registry back, are :mod:`drugprot.registry`).

The registered model version's files are the MLflow model folder: ``MLmodel``, the model code
(``pyfunc_model.py``, this package's model-from-code file), ``code/drugprot/`` (the package itself, so the model
loads where drugprot is not installed), ``requirements.txt`` (pinned, all on PyPI), an input example (one bundled
abstract), and ``artifacts/<folder name>/`` (the members' safetensors, tokenizers and JSON configs,
``ensemble.json`` and the sha256 manifest; ``MLmodel`` records it as the artifact ``ensemble``). Nothing is pickled.
Each version carries tags ``dev_f1``, ``vote``, ``members``, ``study``, ``run_id`` and ``manifest_sha256`` (the
digest every download must match), what made it (``model_id``, ``code_version``, ``code_commit``, ``data.SPLIT``,
:func:`provenance_tags`), and a description with its dev table; the comparison reads ``dev_f1`` from the champion's
tag (else its run's ``ensemble_f1``). An ensemble of final members (trained on train + dev) has no dev score: its
run and version are tagged ``drugprot.dev_score = none (trained on train+dev)``, its run records the steps and
documents they trained on (:func:`final_params`), and the promotion gate refuses it, saying why, unless forced.

Lineage: the run has the corpus splits it saw as dataset inputs and its members' LoggedModels (the trials' best
models, :mod:`drugprot.tracking`) as input models; the pyfunc is a LoggedModel named after the run, tagged with its
members' model ids, with the run's metrics as its own on the dev split's dataset (as a trial's best model). The
metrics are named ``ensemble_*`` (:func:`ensemble_metrics`) and the members are one table (:data:`MEMBERS_TABLE`), so
the study's charts of trials stay apart.

The ensemble run goes to the study's experiment, nested under the study's parent run and tagged
``drugprot.kind=ensemble`` (``drugprot.tracking.study_trials`` reads only ``kind=trial`` runs, so it is never
mistaken for a trial). Everything is written through an explicit ``MlflowClient``; only ``log_model`` needs the
fluent API, pointed at the store for that call and restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from drugprot.dev_halves import NO_DEV_SCORE
from drugprot.ensemble.build import member_info
from drugprot.ensemble_folder import EnsembleError, read_ensemble_json, verify_tree_manifest
from drugprot.environment import quiet_defaults
from drugprot.manifest import manifest_digest
from drugprot.mlflow_store import check_tracking_uri, client, experiment_artifact_location
from drugprot.registry import TAG_MANIFEST_SHA256, Gate, RegistrationResult, promote

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
DEFAULT_EXPERIMENT = "drugprot-ensembles"


@dataclass
class EnsembleRun:
    run_id: str
    experiment_id: str
    registration: RegistrationResult | None


@contextlib.contextmanager
def _tracking(uri: str | None) -> Iterator[None]:
    """Point the fluent MLflow API at ``uri`` for the duration (restored afterwards; no MLFLOW_EXPERIMENT_ID)."""
    import mlflow

    if uri is None:
        yield
        return
    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    # set_tracking_uri/set_registry_uri also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI: restore those exactly,
    # or every later command and child process of this one would take the previous default as the user's choice
    variables = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _experiment(registry, tracking_uri: str, name: str, study: str | None) -> tuple[str, str | None]:
    """``(experiment_id, parent run id or None)``: the study's experiment and parent run, or ``name``'s (created)."""
    from drugprot import tracking

    if study and name == study:
        experiment_id = tracking.study_experiment(study, tracking_uri)
        parents = registry.search_runs([experiment_id], f"tags.`{tracking.TAG_KIND}` = '{tracking.KIND_STUDY}'", max_results=1)
        return experiment_id, (parents[0].info.run_id if parents else None)
    experiment = registry.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise EnsembleError(f"MLflow experiment {name!r} is deleted; restore it or pick another --experiment")
        return experiment.experiment_id, None
    return registry.create_experiment(name, artifact_location=experiment_artifact_location(tracking_uri, name)), None


#: The gate's refusal of such an ensemble.
UNSCORED_FINAL = ("its members trained on train+dev, so no development score exists to pass the gate; the A/B "
                  "figures that chose their configuration and step count are the trial's")

#: The run's table of members (one row each: trial, run, LoggedModel, weight, dev scores), shown as a table in the
#: UI's Artifacts tab (``mlflow.log_table``'s JSON).
MEMBERS_TABLE = "members.json"
#: The ensemble LoggedModel's tag listing its members' LoggedModel ids, in member order (empty: a folder member).
TAG_MEMBER_MODELS = "drugprot.member_models"


def corpus_settings(folder: Path, meta: dict) -> dict:
    """The ``data`` settings the ensemble saw: its first member's (what it trained on), with the folder and dev
    split the evaluation used (``ensemble.json``: ``source.data_dir``, ``dev.split``) when they differ."""
    data = dict((member_info(folder / meta["members"][0]["path"]).get("config") or {}).get("data") or {})
    if (meta.get("source") or {}).get("data_dir"):
        data["dir"] = meta["source"]["data_dir"]
    if (meta.get("dev") or {}).get("split"):
        data["dev_split"] = meta["dev"]["split"]
    return data


def member_model_ids(registry, meta: dict) -> dict[str, str]:
    """``{member name: LoggedModel id}`` for members that came from a tracked trial that logged its model."""
    from drugprot import tracking

    found = {}
    for entry in meta["members"]:
        run_id = (entry.get("source") or {}).get("run_id")
        if run_id:
            model_id = registry.get_run(run_id).data.tags.get(tracking.TAG_MODEL_ID)
            if model_id:
                found[entry["name"]] = model_id
    return found


def ensemble_metrics(meta: dict) -> dict[str, float]:
    """The run's metrics, named ``ensemble_*`` so that a chart of the study's trials never mixes them in:
    ``ensemble_f1`` / ``_precision`` / ``_recall`` and ``ensemble_f1.<TYPE>`` on the whole dev split,
    ``ensemble_f1_b`` / ``_precision_b`` / ``_recall_b`` on dev half B (the half no choice saw), and the calibrated
    early exit (``early_exit_*``)."""
    metrics: dict[str, float] = {}
    dev = meta.get("dev") or {}
    if dev:
        ensemble = dev["ensemble"]
        metrics.update({"ensemble_f1": ensemble["f1"], "ensemble_precision": ensemble["precision"],
                        "ensemble_recall": ensemble["recall"]})
        metrics.update({f"ensemble_f1.{t}": f for t, f in ensemble["per_type"].items()})
        held_out = (dev.get("held_out_b") or {}).get("ensemble") or {}
        if held_out:  # the half of dev that no choice saw
            metrics.update({"ensemble_f1_b": held_out["f1"], "ensemble_precision_b": held_out["precision"],
                            "ensemble_recall_b": held_out["recall"]})
    calibrated = meta.get("early_exit") or {}
    metrics.update({f"early_exit_{key}": calibrated[key] for key in ("confidence", "agreement", "member_pair_share")
                    if key in calibrated})
    return metrics


def log_metrics(registry, run_id: str, metrics: dict[str, float], *, model_id: str | None, dataset) -> None:
    """The run's ``metrics`` at step 0; with ``model_id``, also the ensemble LoggedModel's own, on ``dataset`` (the
    dev split they were scored on, when the run has it as an input), as a trial's best model has its metrics."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    on = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if model_id and dataset is not None else {}
    registry.log_batch(run_id, metrics=[Metric(key, float(value), now, 0, model_id=model_id, **on)
                                        for key, value in metrics.items()], synchronous=True)


def members_table(meta: dict, member_models: dict[str, str]) -> dict[str, list]:
    """One row per member: where it came from, its votes, the dev half-A F1 its trial was chosen on, and its scores
    on the ensemble's dev evaluation, whole and half B (one table rather than a metric name per member)."""
    dev = meta.get("dev") or {}
    scores, held_out = dev.get("members") or {}, (dev.get("held_out_b") or {}).get("members") or {}
    columns: dict[str, list] = {k: [] for k in ("member", "trial_id", "run_id", "model_id", "seed", "weight",
                                                "trial_dev_f1_a", "dev_f1", "dev_precision", "dev_recall", "dev_f1_b")}
    for entry in meta["members"]:
        source, score = entry.get("source") or {}, scores.get(entry["name"]) or {}
        row = {"member": entry["name"], "trial_id": source.get("trial_id", ""), "run_id": source.get("run_id", ""),
               "model_id": member_models.get(entry["name"], ""), "seed": entry.get("seed"), "weight": entry.get("weight", 1),
               "trial_dev_f1_a": entry.get("dev_f1_a"), "dev_f1": score.get("f1"), "dev_precision": score.get("precision"),
               "dev_recall": score.get("recall"), "dev_f1_b": (held_out.get(entry["name"]) or {}).get("f1")}
        for key, value in row.items():
            columns[key].append(value)
    return columns


def final_params(folder: Path, meta: dict) -> dict[str, str]:
    """Run params of an ensemble whose members trained on train + dev: which members, the steps and documents per
    split they trained on (their drugprot.json ``final`` records) and the trial whose configuration they retrained
    (``--reseed K --final``); {} for any other ensemble."""
    if not meta.get("trained_on_dev"):
        return {}
    records = [member_info(folder / m["path"]).get("final") or {} for m in meta["members"]]
    origin = {str(m["source"]["reseed_of"]) for m in meta["members"] if "reseed_of" in (m.get("source") or {})}
    params = {"trained_on_dev": ",".join(meta["trained_on_dev"]),
              "final_steps": ",".join(sorted({str(r["steps"]) for r in records if "steps" in r})),
              "final_trained_on": ",".join(sorted({json.dumps(r["trained_on"]) for r in records if "trained_on" in r})),
              "final_of_trial": ",".join(sorted(origin))}
    return {key: value for key, value in params.items() if value}


def provenance_tags(run, datasets) -> dict[str, str]:
    """What made a registered version: the code (drugprot version, git commit when built from a checkout) and the
    data (each corpus split the ensemble saw: name, digest, source)."""
    from importlib.metadata import version

    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = {"code_version": version("drugprot"), "code_commit": run.data.tags.get(MLFLOW_GIT_COMMIT, "")}
    for dataset in datasets:
        split = json.loads(dataset.profile or "{}").get("split", "")
        tags[f"data.{split}"] = f"{dataset.name}@{dataset.digest} ({json.loads(dataset.source).get('uri', dataset.source)})"
    return tags


#: The distributions that loading and running a registered ensemble imports; the drugprot code itself travels with
#: the model (``code_paths``), so the model installs from the public registries alone.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pydantic", "pyyaml", "blingfire",
                      "numpy", "pandas", "tqdm")


def pip_requirements() -> list[str]:
    """:data:`MODEL_REQUIREMENTS` pinned to this environment's versions (a CPU/CUDA local tag like +cpu dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def package_code(staging: Path) -> Path:
    """A copy of the ``drugprot`` package without byte code, for ``code_paths`` (MLflow puts it on ``sys.path``)."""
    import shutil

    import drugprot

    return Path(shutil.copytree(Path(drugprot.__file__).parent, staging / "drugprot",
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc")))


def input_example():
    """One bundled development abstract in the model's input format (logged as the model's example)."""
    from drugprot.config import SAMPLE_DIR
    from drugprot.corpus import read_split
    from drugprot.records import documents_to_frame

    document = min(read_split(SAMPLE_DIR, "development").documents, key=lambda d: len(d.title) + len(d.abstract))
    frame = documents_to_frame([document])
    frame["entities"] = frame["entities"].map(json.dumps)  # the signature's string column
    return frame


def model_description(meta: dict) -> str:
    """Markdown for the registry: members, vote, and the dev table (per-type F1, micro P/R/F1, members beside)."""
    dev = meta.get("dev")
    members = ", ".join(m["name"] for m in meta["members"])
    head = f"drugprot voting ensemble ({meta['vote']} vote) of {len(meta['members'])} members: {members}."
    if meta.get("trained_on_dev"):
        return head + f"\n\nDevelopment score: {NO_DEV_SCORE}."
    if not dev:
        return head + "\n\nBuilt without a dev evaluation."
    scores = {**dev["members"], "ensemble": dev["ensemble"]}
    types = list(dict.fromkeys(t for result in scores.values() for t in result["per_type"]))
    lines = [head, "", f"Dev ({dev['split']}, {dev['documents']} documents): per-type F1, then micro P/R/F1.", "",
             "| type | " + " | ".join(scores) + " |", "|---" * (len(scores) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(f"{r['per_type'].get(t, 0.0):.4f}" for r in scores.values()) + " |" for t in types]
    lines += [f"| micro {label} | " + " | ".join(f"{r[key]:.4f}" for r in scores.values()) + " |"
              for label, key in (("P", "precision"), ("R", "recall"), ("F1", "f1"))]
    return "\n".join(lines)


def model_signature():
    """Input: documents (pmid, title, abstract, entities as a JSON string or list); output: relations."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "pmid"), ColSpec("string", "title"), ColSpec("string", "abstract"),
                     ColSpec("string", "entities")])
    outputs = Schema([ColSpec("string", "pmid"), ColSpec("string", "type"), ColSpec("string", "arg1"),
                      ColSpec("string", "arg2"), ColSpec("double", "score"), ColSpec("string", "votes")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("threshold", "double", 0.0)]))


def log_ensemble(folder: str | Path, *, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, register: str | None = None, alias: str = "champion", force: bool = False,
                 gate: Gate | None = None, min_gain: float = 0.0, tags: dict[str, str] | None = None,
                 log: Callable[[str], None] | None = None) -> EnsembleRun:
    """Log the ensemble's dev evaluation as a run; with ``register``, also log the folder as a pyfunc model from
    code, register a new version of that name and apply the champion rule to ``alias``.

    The run goes to the study's experiment, nested under the study's parent run, when the ensemble was built from a
    study (``ensemble.json`` source) and ``experiment`` is that study or None; otherwise to ``experiment`` (default
    ``drugprot-ensembles``, created beside a SQLite store like the studies' experiments).
    """
    import mlflow

    from drugprot import tracking

    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    quiet_defaults()
    folder = Path(folder).resolve()
    verify_tree_manifest(folder)
    digest = manifest_digest(folder)  # before the upload: what is registered is what was verified
    meta = read_ensemble_json(folder)
    dev = meta.get("dev") or {}
    dev_f1 = (dev.get("ensemble") or {}).get("f1")
    study = (meta.get("source") or {}).get("study")
    uri = check_tracking_uri(tracking_uri)
    registry = client(uri)
    experiment_id, parent = _experiment(registry, uri, experiment or study or DEFAULT_EXPERIMENT, study)
    run_tags = {tracking.TAG_KIND: "ensemble", **{k: str(v) for k, v in (tags or {}).items()}}
    unscored = bool(meta.get("trained_on_dev"))
    if unscored:
        run_tags[tracking.TAG_DEV_SCORE] = NO_DEV_SCORE
    if study:
        run_tags[tracking.TAG_STUDY] = str(study)
    if parent:
        run_tags[tracking.PARENT_TAG] = parent
    names = ",".join(m["name"] for m in meta["members"])
    run_name = run_name or f"ensemble-{len(meta['members'])}-{meta['vote']}"
    run = registry.create_run(experiment_id, run_name=run_name, tags={**tracking.source_tags(), **run_tags})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        datasets = tracking.log_corpus_inputs(registry, run_id, corpus_settings(folder, meta))
        member_models = member_model_ids(registry, meta)
        if member_models:  # the members' LoggedModels are this run's input models
            from mlflow.entities import LoggedModelInput

            registry.log_inputs(run_id, models=[LoggedModelInput(m) for m in dict.fromkeys(member_models.values())])
        params = {"vote": meta["vote"], "members": len(meta["members"]), "member_names": names,
                  "interval": json.dumps(meta["interval"]), "encoder": json.dumps(meta["encoder"]),
                  "selection": (meta.get("source") or {}).get("selection", "folders"), "execution": meta.get("execution", ""),
                  **final_params(folder, meta)}
        for key, value in params.items():
            registry.log_param(run_id, key, value)
        registry.log_table(run_id, members_table(meta, member_models), MEMBERS_TABLE)
        registry.log_dict(run_id, meta, "ensemble/ensemble.json")
        model_id = None
        if register:  # the model before the metrics: log_model links those it finds to it, without their dataset
            with _tracking(uri), mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as staging:
                info = mlflow.pyfunc.log_model(
                    name=run_name, python_model=str(PYFUNC_MODEL_FILE), artifacts={"ensemble": str(folder)},
                    code_paths=[str(package_code(Path(staging)))], registered_model_name=register,
                    pip_requirements=pip_requirements(), signature=model_signature(), input_example=input_example(),
                    metadata={"drugprot_kind": "ensemble", "vote": meta["vote"]}, model_type="drugprot-ensemble",
                    params={"vote": meta["vote"], "members": names},
                    tags={TAG_MEMBER_MODELS: ",".join(member_models.get(m["name"], "") for m in meta["members"])})
            model_id = info.model_id
        log_metrics(registry, run_id, ensemble_metrics(meta), model_id=model_id,
                    dataset=tracking.dev_dataset(registry.get_run(run_id)))
        registration = None
        if register:
            version = str(info.registered_model_version)
            registry.update_model_version(register, version, description=model_description(meta))
            version_tags = {"dev_f1": "" if dev_f1 is None else f"{dev_f1:.6f}", "vote": meta["vote"], "members": names,
                            "study": str(study or ""), "run_id": run_id, TAG_MANIFEST_SHA256: digest,
                            "model_id": info.model_id, **provenance_tags(registry.get_run(run_id), datasets)}
            if unscored:
                version_tags[tracking.TAG_DEV_SCORE] = NO_DEV_SCORE
            for key, value in version_tags.items():
                if value:
                    registry.set_model_version_tag(register, version, key, value)
            if unscored:  # whatever a caller passed: no dev figure of these members may be compared
                gate = Gate(None, unscored=UNSCORED_FINAL)
            elif gate is None:
                relations = (dev.get("ensemble") or {}) if dev else {}
                gate = Gate(dev_f1, relations=relations["tp"] + relations["fp"] if "tp" in relations else None)
            registration = promote(registry, register, version, alias=alias, dev_f1=dev_f1, force=force, gate=gate,
                                   min_gain=min_gain, log=say)
            registry.set_tag(run_id, "drugprot.registered", f"{register}/{version}")
        status = "FINISHED"
    finally:
        registry.set_terminated(run_id, status)
    return EnsembleRun(run_id, experiment_id, registration)


__all__ = ["DEFAULT_EXPERIMENT", "EnsembleRun", "MODEL_REQUIREMENTS", "PYFUNC_MODEL_FILE", "input_example",
           "log_ensemble", "model_description", "model_signature", "package_code", "pip_requirements"]
