"""MLflow conventions for drugprot studies, in one place (the tuner writes them, the ensemble reads them).

Everything goes through an explicit ``MlflowClient(tracking_uri)`` with explicit experiment and run ids: nothing
here calls ``mlflow.set_experiment`` or relies on ``MLFLOW_EXPERIMENT_ID`` / an active run, so a process that
inherited another experiment from its parent cannot log into the wrong place. During a study every write happens
in the Tune driver (see :mod:`drugprot.tuning.callbacks`), one call at a time.

Conventions (a study named ``NAME``):

Experiment
    one per study, named ``NAME``, tags ``drugprot.study = NAME`` and ``mlflow.experimentKind =
    custom_model_development`` (model training; the 3.17 UI still opens run pages on its GenAI view unless the link
    says ``?workflowType=machine_learning``, as :func:`drugprot.mlflow_store.run_link` does). With a ``sqlite:///PATH`` store its artifacts go
    to ``PATH's folder/mlartifacts/NAME``; with a server (``http://…``) the server decides (``mlflow-artifacts:/…``).

Every run carries MLflow's standard source tags (:func:`source_tags`: ``mlflow.user``, ``mlflow.source.name``,
``mlflow.source.git.commit`` of the drugprot checkout).

Parent run (exactly one per experiment; run name ``NAME``)
    tags   ``drugprot.kind = study``, ``drugprot.study``, ``drugprot.state`` (running / finished / interrupted),
           ``drugprot.space`` (space file), ``drugprot.storage`` (the study folder: Tune state, checkpoints),
           ``drugprot.optuna_storage`` (the Optuna study's storage URL, password masked),
           ``drugprot.best_trial_id``, ``drugprot.best_run_id``, and versions
           ``drugprot.version``, ``ray.version``, ``optuna.version``, ``mlflow.version``, ``torch.version``,
           ``transformers.version``, ``python.version``.
    params ``study.*`` (num_samples, max_concurrent, cpus_per_trial, gpus_per_trial, max_t), ``space.*`` (file,
           seed, each parameter's distribution, scheduler settings), ``config.<dotted key>`` (the base run config).
    metrics ``best_dev_f1_a`` (best trial's F1 on dev half A, the half every choice is made on) and the study's cost (:func:`drugprot.tuning.cost.study_cost`):
           ``device_hours``, ``asha_saved_share``, ``study_wall_s``, ``trial_wall_s``, ``evaluations``,
           ``asha_stopped``; at step = the number of trials when the study ends.
    artifacts ``space.yaml``, ``config.yaml`` (base config), ``trials.csv`` (one row per trial),
           ``plots/optimization_history.{html,png}``, ``plots/param_importances.{html,png}``,
           ``plots/parallel_coordinate.{html,png}``.

Child run (one per Ray trial; run name ``tNN`` and its values, e.g. ``t07 lr=3.1e-5 γ=1.8``, NN the Optuna trial number)
    tags   ``mlflow.parentRunId`` (the parent's run id), ``drugprot.kind = trial``, ``drugprot.study``,
           ``drugprot.trial_id`` (Ray trial id), ``drugprot.seed`` (train.seed), ``drugprot.state`` (running /
           finished / early-stopped / errored), ``drugprot.params`` (JSON of the sampled values, typed),
           ``drugprot.config`` (JSON of the trial's full RunConfig, ``RunConfig.dump()``), ``drugprot.node_id``,
           ``drugprot.node_ip``, ``drugprot.pid`` (where it last ran), ``drugprot.starts`` (times a process started
           it), ``drugprot.failures`` (crashes retried), ``drugprot.resumed_from_eval``, ``drugprot.best_eval``,
           ``drugprot.gpu_ids`` (the GPU ids Ray assigned the trial, comma-separated; empty without GPUs),
           ``drugprot.optuna_trial_number`` and ``drugprot.optuna_storage`` (the Optuna trial of the same study,
           in the study's storage, password masked; the Optuna trial holds the user attributes ``ray_trial_id``,
           ``mlflow_run_id`` and ``trial_folder`` in return).
    params the search-space parameters by name (``loss.gamma``, ``train.lr``, ``sampling.interval.lo``, …; a
           conditional one only where it was sampled) and ``train.seed`` (the trial's own seed).
    metrics at every evaluation, step = evaluation index (1, 2, …; one per half epoch by default):
           ``dev_precision_a``, ``dev_recall_a``, ``dev_f1_a`` (on dev half A, what ASHA, TPE and the best
           checkpoint go by), ``best_dev_f1_a`` (running best; its last value is the trial's final best),
           ``dev_precision_all``, ``dev_recall_all``, ``dev_f1_all`` (the whole development set, of a checkpoint
           selected on A; a report, never used to choose), ``train_loss``, ``lr``, ``epoch``, ``pairs_per_s``, ``nonfinite_steps`` (steps skipped so
           far because their loss or gradient norm was not finite), ``train_interval_recall`` and
           ``dev_interval_recall`` (the share of gold relations the trial's GENE interval keeps: its recall ceiling),
           ``wall_s`` and ``device_s`` (cost so far, :mod:`drugprot.tuning.cost`); when it ends, at its last
           evaluation's step: ``evaluations``, ``asha_stopped`` (1 or 0), ``train_pairs_per_s``.
    inputs the corpus splits it reads (:func:`log_corpus_inputs`: name = corpus folder, context = split, digest of the
           split's files, source = the split's folder).
    model  the best model folder (a verified drugprot artifact: ``manifest.json``, ``model.safetensors``,
           ``tokenizer/``, …) as a LoggedModel named :func:`trial_model_name`, the run's output at the best
           evaluation, its metrics the selection metrics there (:meth:`StudyTracker.log_trial_model`); tag
           ``drugprot.model_id`` names it. Studies tracked before kept it as the run's ``model/`` artifact.
    artifacts ``config.yaml`` (the trial's config), ``per_type.csv`` (type, f1 on the whole dev set at the best
           evaluation on half A),
           ``metrics.json`` (every evaluation and the best), ``dev_probabilities.safetensors`` (the best model's dev
           probabilities, see ``drugprot.model.dev_probabilities``), logged when the trial ends.

Final run (one per model of ``drugprot ensemble --reseed K --final``, :func:`log_final_member`; run name
``final-TRIAL-seedS``, nested under the parent run)
    tags   ``drugprot.kind = final`` (never read as a trial), ``drugprot.study``, ``drugprot.seed``,
           ``drugprot.final_of_trial`` and ``drugprot.final_of_run`` (the trial whose configuration it retrained),
           ``drugprot.dev_score = none (trained on train+dev)``, ``drugprot.config``.
    params ``train.seed``, ``train.max_steps``, ``data.final``, ``final.trained_on.<split>`` (documents),
           ``final.pairs``, ``final.documents_sha256``.
    inputs both corpus splits, each with role ``train``.
    artifacts ``metrics.json`` (its progress points and every document id it trained on), ``config.json``.

Reading: :func:`study_trials` lists a study's trials (best first), :func:`download_trial_model` fetches one
trial's ``model/`` folder and verifies its manifest, and :func:`trial_metrics` reads its ``metrics.json``. Which
store, and whether it answers, is :mod:`drugprot.mlflow_store`; registered models are :mod:`drugprot.registry`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drugprot.dev_halves import NO_DEV_SCORE, SELECTION_METRIC
from drugprot.mlflow_store import TrackingError, client, experiment_artifact_location, normalize_tracking_uri

TAG_KIND = "drugprot.kind"
TAG_STUDY = "drugprot.study"
TAG_STATE = "drugprot.state"
TAG_TRIAL_ID = "drugprot.trial_id"
TAG_SEED = "drugprot.seed"
TAG_PARAMS = "drugprot.params"
TAG_CONFIG = "drugprot.config"
TAG_NODE_ID = "drugprot.node_id"
TAG_NODE_IP = "drugprot.node_ip"
TAG_PID = "drugprot.pid"
TAG_STARTS = "drugprot.starts"
TAG_FAILURES = "drugprot.failures"
TAG_RESUMED_FROM = "drugprot.resumed_from_eval"
TAG_BEST_EVAL = "drugprot.best_eval"
TAG_GPU_IDS = "drugprot.gpu_ids"
TAG_SPACE = "drugprot.space"
TAG_BEST_TRIAL = "drugprot.best_trial_id"
TAG_BEST_RUN = "drugprot.best_run_id"
TAG_STORAGE = "drugprot.storage"
TAG_OPTUNA_STORAGE = "drugprot.optuna_storage"
TAG_OPTUNA_TRIAL = "drugprot.optuna_trial_number"
TAG_MODEL_ID = "drugprot.model_id"
TAG_SELECTED_ON = "drugprot.selected_on"
TAG_DEV_SCORE = "drugprot.dev_score"
TAG_FINAL_OF_TRIAL = "drugprot.final_of_trial"
TAG_FINAL_OF_RUN = "drugprot.final_of_run"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: The MLflow UI's name for model training (its other kind, genai_development, opens on traces and evaluations).
EXPERIMENT_KIND = "custom_model_development"

KIND_STUDY = "study"
KIND_TRIAL = "trial"
KIND_FINAL = "final"
STATES = ("running", "finished", "early-stopped", "errored")

#: Metrics logged at every evaluation (step = evaluation index).
EVAL_METRICS = ("dev_precision_a", "dev_recall_a", "dev_f1_a", "best_dev_f1_a", "dev_precision_all", "dev_recall_all",
                "dev_f1_all", "train_loss", "lr", "epoch", "pairs_per_s",
                "nonfinite_steps", "train_interval_recall", "dev_interval_recall", "wall_s", "device_s")
BEST_METRIC = "best_dev_f1_a"
MODEL_ARTIFACT = "model"
CONFIG_ARTIFACT = "config.yaml"
PER_TYPE_ARTIFACT = "per_type.csv"
METRICS_ARTIFACT = "metrics.json"
DEV_PROBABILITIES_ARTIFACT = "dev_probabilities.safetensors"  # drugprot.model.dev_probabilities.FILE
SPACE_ARTIFACT = "space.yaml"
TRIALS_ARTIFACT = "trials.csv"
PLOTS_ARTIFACT = "plots"


@dataclass
class TrialRecord:
    """One trial of a study as recorded in MLflow (see the module docstring for where each field comes from)."""

    run_id: str
    trial_id: str
    best_dev_f1_a: float | None
    params: dict[str, Any]
    seed: int | None
    config: dict[str, Any]
    state: str
    experiment_id: str = ""
    artifact_uri: str = ""
    start_time: int = 0  # ms since the epoch, when the child run was created
    tags: dict[str, str] = field(default_factory=dict, repr=False)


def versions() -> dict[str, str]:
    import platform as _platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python.version": _platform.python_version()}
    for package in ("drugprot", "ray", "optuna", "mlflow", "torch", "transformers"):
        try:
            found[f"{package}.version"] = version(package)
        except PackageNotFoundError:
            found[f"{package}.version"] = "absent"
    return found


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def source_tags() -> dict[str, str]:
    """MLflow's standard tags for a new run (``mlflow.user``, ``mlflow.source.name``/``type``), and the git commit,
    branch and repository of the drugprot code itself when it runs from a checkout (MLflow would take them from the
    entry script's folder, which for an installed console script is the virtual environment's)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    import drugprot

    code = str(Path(drugprot.__file__).parent)
    git = {MLFLOW_GIT_COMMIT: get_git_commit(code), MLFLOW_GIT_BRANCH: get_git_branch(code),
           MLFLOW_GIT_REPO_URL: get_git_repo_url(code)}
    tags = {k: v for k, v in resolve_tags().items() if k not in git}
    return {**tags, **{k: v for k, v in git.items() if v}}


#: Input tag saying what a run did with a dataset (``train`` or ``dev``); ``mlflow.data.context`` holds the split.
DATASET_ROLE_TAG = "drugprot.role"


def corpus_dataset(data_dir: str | os.PathLike, split: str, *, max_docs: int | None = None):
    """A corpus split as an MLflow dataset: named after the corpus folder, its digest the sha256 of the split's files
    (names and bytes; the first 16 hex digits, the whole one in the profile), its source the split's folder."""
    import hashlib

    from mlflow.entities import Dataset

    from drugprot.corpus import split_files

    folder = Path(data_dir).resolve()
    files = sorted(f for f in split_files(folder, split).values() if f is not None)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    profile = {"sha256": digest.hexdigest(), "files": [f.name for f in files], "split": split,
               **({"max_docs": max_docs} if max_docs else {})}
    # source as MLflow's local dataset source writes it (type "local", {"uri": ...})
    return Dataset(folder.name, digest.hexdigest()[:16], "local", json.dumps({"uri": (folder / split).as_uri()}),
                   profile=json.dumps(profile))


def log_corpus_inputs(mlflow_client, run_id: str, data: dict[str, Any], roles: Iterable[str] = ("train", "dev")) -> list:
    """Log the corpus splits a run read (a config's ``data`` section) as its dataset inputs; returns the datasets.
    A corpus that is not readable here (a folder on another node) is left out rather than guessed."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from drugprot.config import DataConfig

    settings = DataConfig(**data) if data else DataConfig()
    inputs = []
    for role in roles:
        split = settings.train_split if role == "train" else settings.dev_split
        role = "train" if settings.final else role  # a final model trained on the development split too
        try:
            dataset = corpus_dataset(settings.dir, split,
                                     max_docs=settings.max_train_docs if role == "train" else settings.max_dev_docs)
        except OSError:
            continue
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split), InputTag(DATASET_ROLE_TAG, role)]))
    if inputs:
        mlflow_client.log_inputs(run_id, datasets=inputs)
    return [i.dataset for i in inputs]


def dev_dataset(run):
    """The run's dataset input with role ``dev`` (what its metrics were scored on), or None."""
    return next((d.dataset for d in run.inputs.dataset_inputs
                 if any(t.key == DATASET_ROLE_TAG and t.value == "dev" for t in d.tags)), None)


def link_model_metrics(mlflow_client, run, model_id: str, names: Iterable[str], *, step: int) -> None:
    """Record the run's metrics ``names`` at ``step`` as the LoggedModel's own, on the run's dev dataset input (the
    LoggedModel page lists them with that dataset). Each is the very point already in the run's history (same key,
    time, step and value: MLflow keeps one copy), so the run's charts gain nothing."""
    from mlflow.entities import Metric

    dev = dev_dataset(run)
    linked = []
    for name in names:
        point = next((m for m in mlflow_client.get_metric_history(run.info.run_id, name) if m.step == step), None)
        if point is not None:
            linked.append(Metric(name, point.value, point.timestamp, step, model_id=model_id,
                                 dataset_name=dev.name if dev else None, dataset_digest=dev.digest if dev else None))
    if linked:
        mlflow_client.log_batch(run.info.run_id, metrics=linked, synchronous=True)


def trial_model_name(trial_id: str, number: str | int | None) -> str:
    """The LoggedModel name of a trial's best model: ``t07-<trial id>`` for Optuna trial 7, as its run is named
    (``trial-<id>`` when the number is unknown)."""
    return f"t{int(number):02d}-{trial_id}" if str(number or "").isdigit() else f"trial-{trial_id}"


# --- writing a study ------------------------------------------------------------------------------------------------

class StudyTracker:
    """Writes one study's experiment, parent run and child runs; every write is idempotent (safe on resume).

    Params are write-once in MLflow: :meth:`log_params` logs only the absent ones and refuses a changed value.
    Evaluation metrics are keyed by step (the evaluation index): a step already in ``dev_f1_a``'s history is skipped,
    so a trial that replays evaluations after a restore logs nothing twice.
    """

    def __init__(self, tracking_uri: str, study: str):
        self.tracking_uri = tracking_uri
        self.study = study
        self.client = client(tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._steps: dict[str, set[int]] = {}  # run id -> logged evaluation steps

    # experiment and parent -----------------------------------------------------------------------------------------

    def find_study(self) -> tuple[str, str] | None:
        """``(experiment_id, parent_run_id)`` of an existing study, else None."""
        experiment = self.client.get_experiment_by_name(self.study)
        if experiment is None:
            return None
        parents = self.client.search_runs([experiment.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_STUDY}'", max_results=2)
        return (experiment.experiment_id, parents[0].info.run_id) if parents else (experiment.experiment_id, "")

    def open_study(self, *, params: dict[str, Any], tags: dict[str, str], resume: bool) -> tuple[str, str]:
        """Create (or, with ``resume``, reopen) the experiment and its parent run."""
        found = self.find_study()
        if found and found[1] and not resume:
            raise TrackingError(f"study {self.study!r} already exists in {self.tracking_uri} (experiment {found[0]}); "
                                f"pass --resume to continue it or choose another --name")
        if found is None:
            if resume:
                raise TrackingError(f"--resume: no experiment named {self.study!r} in {self.tracking_uri}; was the "
                                    f"study tracked elsewhere (--tracking-uri)?")
            experiment_id = self._create_experiment()
        else:
            experiment_id = found[0]
        self.experiment_id = experiment_id
        if found and found[1]:
            self.parent_run_id = found[1]
            self.client.update_run(self.parent_run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=self.study,
                                         tags={**source_tags(), TAG_KIND: KIND_STUDY, TAG_STUDY: self.study})
            self.parent_run_id = run.info.run_id
        self.set_tags(self.parent_run_id, {**tags, TAG_STATE: "running"})
        self.log_params(self.parent_run_id, params)
        return experiment_id, self.parent_run_id

    def attach(self, experiment_id: str, parent_run_id: str) -> None:
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id

    def _create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        location = experiment_artifact_location(self.tracking_uri, self.study)
        try:
            # experimentKind opens the MLflow 3 UI on its "training runs" view (nested trials, metric charts).
            return self.client.create_experiment(self.study, artifact_location=location, tags={
                TAG_STUDY: self.study, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise
            return self.client.get_experiment_by_name(self.study).experiment_id

    def finish_study(self, *, state: str, best: TrialRecord | None, artifacts: dict[str, Path], trials: int) -> None:
        """Close the parent run: best trial tags and metric (at step ``trials``, the trials it was chosen among),
        artifacts (``{artifact_path: local file}``)."""
        run_id = self.parent_run_id
        for artifact_path, local in artifacts.items():
            folder = str(Path(artifact_path).parent) if Path(artifact_path).parent != Path(".") else None
            self.client.log_artifact(run_id, str(local), artifact_path=folder)
        tags = {TAG_STATE: state}
        if best is not None:
            tags.update({TAG_BEST_TRIAL: best.trial_id, TAG_BEST_RUN: best.run_id})
            if best.best_dev_f1_a is not None:
                self.log_totals(run_id, {BEST_METRIC: best.best_dev_f1_a}, step=trials)
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, "FINISHED" if state == "finished" else "KILLED")

    # trials --------------------------------------------------------------------------------------------------------

    def trial_run(self, trial_id: str) -> str | None:
        if trial_id not in self._runs:
            runs = self.client.search_runs(
                [self.experiment_id], f"tags.`{TAG_TRIAL_ID}` = '{trial_id}' and tags.`{TAG_KIND}` = '{KIND_TRIAL}'",
                max_results=5)
            if runs:
                self._runs[trial_id] = runs[0].info.run_id
        return self._runs.get(trial_id)

    def start_trial(self, trial_id: str, *, params: dict[str, Any], config: dict[str, Any],
                    run_name: str | None = None) -> str:
        """Get or create the child run of a trial (named ``run_name``, default the trial id), mark it running, count
        the start; returns its run id."""
        run_id = self.trial_run(trial_id)
        seed = (config.get("train") or {}).get("seed")
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name or trial_id, tags={
                **source_tags(), PARENT_TAG: self.parent_run_id, TAG_KIND: KIND_TRIAL, TAG_STUDY: self.study,
                TAG_TRIAL_ID: trial_id})
            run_id = run.info.run_id
            self._runs[trial_id] = run_id
            starts = 0
            log_corpus_inputs(self.client, run_id, config.get("data") or {})
        else:
            self.client.update_run(run_id, status="RUNNING")
            starts = int(self.client.get_run(run_id).data.tags.get(TAG_STARTS, "0"))
        self.set_tags(run_id, {TAG_STATE: "running", TAG_STARTS: str(starts + 1), TAG_SEED: str(seed),
                               TAG_PARAMS: json.dumps(params, sort_keys=True), TAG_CONFIG: json.dumps(config)})
        self.log_params(run_id, params)
        return run_id

    def trial_failed_attempt(self, trial_id: str) -> None:
        run_id = self.trial_run(trial_id)
        if run_id is not None:
            failures = int(self.client.get_run(run_id).data.tags.get(TAG_FAILURES, "0"))
            self.set_tags(run_id, {TAG_FAILURES: str(failures + 1)})

    def log_evaluation(self, run_id: str, result: dict[str, Any]) -> bool:
        """Log one evaluation's metrics at step ``result['eval']``; False when that step was already logged."""
        step = int(result["eval"])
        steps = self._logged_steps(run_id)
        if step in steps:
            return False
        metrics = {k: float(result[k]) for k in EVAL_METRICS if isinstance(result.get(k), (int, float))}
        self._log_metrics(run_id, metrics, step)
        steps.add(step)
        where = {TAG_NODE_ID: result.get("node_id"), TAG_NODE_IP: result.get("node_ip"), TAG_PID: result.get("pid"),
                 TAG_RESUMED_FROM: result.get("resumed_from_eval"), TAG_GPU_IDS: result.get("gpu_ids")}
        self.set_tags(run_id, {k: str(v) for k, v in where.items() if v is not None})
        return True

    def finish_trial(self, run_id: str, *, state: str, run_folder: Path | None) -> None:
        """Log the trial's artifacts from its run folder (best model, config, per-type table) and close it."""
        if state not in STATES:
            raise ValueError(f"state {state!r} not in {STATES}")
        tags = {TAG_STATE: state}
        if run_folder is not None and Path(run_folder).is_dir():
            folder = Path(run_folder)
            summary = _read_json(folder / METRICS_ARTIFACT)
            best = summary.get("best") or {}
            if best:
                tags[TAG_BEST_EVAL] = str(best.get("eval"))
            for name in (CONFIG_ARTIFACT, METRICS_ARTIFACT, DEV_PROBABILITIES_ARTIFACT):
                if (folder / name).is_file():
                    self.client.log_artifact(run_id, str(folder / name))
            with tempfile.TemporaryDirectory(prefix="drugprot-per-type-") as scratch:
                table = Path(scratch) / PER_TYPE_ARTIFACT
                table.write_text(per_type_csv(best.get("dev_per_type") or {}))
                self.client.log_artifact(run_id, str(table))
            if (folder / MODEL_ARTIFACT / "manifest.json").is_file():
                self.log_trial_model(run_id, folder / MODEL_ARTIFACT, best_eval=best.get("eval"))
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, "FAILED" if state == "errored" else "FINISHED")

    def log_trial_model(self, run_id: str, folder: Path, *, best_eval: int | None) -> str:
        """The trial's best model as a LoggedModel named after the trial (its files, the run's output at the best
        evaluation), linked to the metrics it was chosen on: the scheduler's metric and :data:`BEST_METRIC` at that
        evaluation, on the dev split's dataset. Done once: a run that already names its model keeps it."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        run = self.client.get_run(run_id)
        if run.data.tags.get(TAG_MODEL_ID):
            return run.data.tags[TAG_MODEL_ID]
        trial_id = run.data.tags.get(TAG_TRIAL_ID, run.info.run_name)
        selected_on = self.selection_metrics()
        model = self.client.create_logged_model(
            run.info.experiment_id, name=trial_model_name(trial_id, run.data.tags.get(TAG_OPTUNA_TRIAL)),
            source_run_id=run_id, model_type="drugprot-member",
            tags={TAG_STUDY: self.study, TAG_TRIAL_ID: trial_id, TAG_SELECTED_ON: ",".join(selected_on)},
            params={k: v[:6000] for k, v in run.data.params.items()})
        self.client.log_model_artifacts(model.model_id, str(folder))
        step = int(best_eval) if best_eval is not None else max(
            (m.step for m in self.client.get_metric_history(run_id, BEST_METRIC)), default=0)
        link_model_metrics(self.client, run, model.model_id, selected_on, step=step)
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.set_tags(run_id, {TAG_MODEL_ID: model.model_id})
        return model.model_id

    def selection_metrics(self) -> tuple[str, ...]:
        """What a trial is chosen on: the study's scheduler metric (its parent run's ``space.scheduler.metric``
        param) and :data:`BEST_METRIC` (what the search maximises)."""
        params = self.client.get_run(self.parent_run_id).data.params if self.parent_run_id else {}
        return tuple(dict.fromkeys(n for n in (params.get("space.scheduler.metric"), BEST_METRIC) if n))

    def log_totals(self, run_id: str, metrics: dict[str, float], *, step: int) -> None:
        """Log end-of-run totals at ``step``, where they were measured (a trial's last evaluation, a study's count of
        trials), so that a chart shows them at the end of the series; each once: a resumed study that closes a run
        again adds nothing."""
        logged = {name for name, history in ((n, self.client.get_metric_history(run_id, n)) for n in metrics)
                  if any(m.step == step for m in history)}
        fresh = {k: float(v) for k, v in metrics.items() if k not in logged}
        if fresh:
            self._log_metrics(run_id, fresh, step=step)

    # low level -----------------------------------------------------------------------------------------------------

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params that are absent; identical ones are skipped, a changed one is an error (params are write-once)."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        fresh = []
        for key, value in params.items():
            text = _param_text(value)
            if key in existing:
                if existing[key] != text:
                    raise TrackingError(f"run {run_id}: param {key} was logged as {existing[key]!r}, now {text!r}; "
                                        f"MLflow params cannot change (a resumed study must keep its settings)")
                continue
            fresh.append(Param(key, text))
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start:start + 100], synchronous=True)

    def _logged_steps(self, run_id: str) -> set[int]:
        if run_id not in self._steps:
            self._steps[run_id] = {m.step for m in self.client.get_metric_history(run_id, SELECTION_METRIC)}
        return self._steps[run_id]

    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], synchronous=True)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(client=None, _runs={}, _steps={})
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.client = client(self.tracking_uri)


def per_type_csv(per_type: dict[str, float]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["type", "f1"])
    for name, f1 in sorted(per_type.items()):
        writer.writerow([name, f1])
    return out.getvalue()


def trials_csv(records: Iterable[TrialRecord]) -> str:
    records = list(records)
    names = sorted({name for r in records for name in r.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial_id", "run_id", "state", "best_dev_f1_a", "seed", *names, "node_ip", "failures"])
    for r in records:
        writer.writerow([r.trial_id, r.run_id, r.state, "" if r.best_dev_f1_a is None else r.best_dev_f1_a,
                         "" if r.seed is None else r.seed, *[json.dumps(r.params.get(n)) if isinstance(r.params.get(n), list)
                                                             else r.params.get(n, "") for n in names],
                         r.tags.get(TAG_NODE_IP, ""), r.tags.get(TAG_FAILURES, "0")])
    return out.getvalue()


# --- reading a study ------------------------------------------------------------------------------------------------

def study_experiment(study: str, tracking_uri: str) -> str:
    """Experiment id of ``study``; a clear error listing what exists otherwise."""
    tracking_uri = normalize_tracking_uri(tracking_uri)
    experiment = client(tracking_uri).get_experiment_by_name(study)
    if experiment is None:
        names = [e.name for e in client(tracking_uri).search_experiments(max_results=20)]
        raise TrackingError(f"no study named {study!r} in {tracking_uri} (experiments there: {', '.join(names) or 'none'})")
    return experiment.experiment_id


def study_trials(study: str, tracking_uri: str) -> list[TrialRecord]:
    """Every trial of ``study``, sorted by ``best_dev_f1_a`` (descending; trials without one last)."""
    tracking_uri = normalize_tracking_uri(tracking_uri)
    experiment_id = study_experiment(study, tracking_uri)
    mlflow_client = client(tracking_uri)
    records = []
    token = None
    while True:
        page = mlflow_client.search_runs([experiment_id], f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'", max_results=1000,
                                         page_token=token)
        records.extend(_record(run) for run in page)
        token = page.token
        if not token:
            break
    return sorted(records, key=lambda r: (r.best_dev_f1_a is None, -(r.best_dev_f1_a or 0.0), r.trial_id))


def _record(run) -> TrialRecord:
    tags = dict(run.data.tags)
    seed = tags.get(TAG_SEED)
    best = run.data.metrics.get(BEST_METRIC)
    return TrialRecord(
        run_id=run.info.run_id, trial_id=tags.get(TAG_TRIAL_ID, run.info.run_name), best_dev_f1_a=best,
        params=json.loads(tags.get(TAG_PARAMS) or "{}"), seed=int(seed) if seed and seed.isdigit() else None,
        config=json.loads(tags.get(TAG_CONFIG) or "{}"), state=tags.get(TAG_STATE, "running"),
        experiment_id=run.info.experiment_id, artifact_uri=run.info.artifact_uri, start_time=run.info.start_time or 0,
        tags=tags)


def download_trial_model(record: TrialRecord, dest: str | os.PathLike, tracking_uri: str) -> Path:
    """Download a trial's best ``model/`` folder into ``dest`` (-> ``dest/model``) and verify its manifest."""
    import mlflow.artifacts

    from drugprot.model.artifacts import verify_manifest

    tracking_uri = normalize_tracking_uri(tracking_uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / MODEL_ARTIFACT
    if target.exists() and any(target.iterdir()):
        raise TrackingError(f"{target}: already exists and is not empty; pick another destination")
    model_id = record.tags.get(TAG_MODEL_ID)
    if model_id:  # the trial's LoggedModel
        location = client(tracking_uri).get_logged_model(model_id).artifact_location
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as staging:
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=staging, tracking_uri=tracking_uri)
            Path(local).rename(target)
        verify_manifest(target)
        return target
    names = [a.path for a in client(tracking_uri).list_artifacts(record.run_id)]
    if MODEL_ARTIFACT not in names:  # a study tracked before trial models were LoggedModels kept it here
        raise TrackingError(f"trial {record.trial_id} (run {record.run_id}, state {record.state}) has no logged model "
                            f"and no {MODEL_ARTIFACT}/ artifact (artifacts: {', '.join(names) or 'none'})")
    local = mlflow.artifacts.download_artifacts(run_id=record.run_id, artifact_path=MODEL_ARTIFACT, dst_path=str(dest),
                                                tracking_uri=tracking_uri)
    verify_manifest(Path(local))
    return Path(local)


def download_trial_dev_probabilities(record: TrialRecord, dest: str | os.PathLike, tracking_uri: str) -> Path | None:
    """Download a trial's ``dev_probabilities.safetensors`` into ``dest``; None when the trial has none."""
    import mlflow.artifacts

    tracking_uri = normalize_tracking_uri(tracking_uri)
    names = [a.path for a in client(tracking_uri).list_artifacts(record.run_id)]
    if DEV_PROBABILITIES_ARTIFACT not in names:
        return None
    Path(dest).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=record.run_id, artifact_path=DEV_PROBABILITIES_ARTIFACT,
                                                    dst_path=str(dest), tracking_uri=tracking_uri))


def log_final_member(record: TrialRecord, tracking_uri: str, *, config: dict[str, Any], metrics: dict[str, Any],
                     seed: int) -> str:
    """Record one final model (``--reseed K --final``) as its own run beside the trial it retrains: tagged
    ``drugprot.kind = final`` (so never read as a trial), ``drugprot.final_of_trial``/``_run``, ``drugprot.seed`` and
    ``drugprot.dev_score = none (trained on train+dev)``; params ``train.seed``, ``train.max_steps``, ``data.final``
    and ``final.*`` (documents per split, pairs, the sha256 of the document ids); both corpus splits as training
    inputs; artifacts ``metrics.json`` (every document id) and ``config.json``. Returns the run id."""
    tracking_uri = normalize_tracking_uri(tracking_uri)
    mlflow_client = client(tracking_uri)
    final = metrics["final"]
    tags = {**source_tags(), TAG_KIND: KIND_FINAL, TAG_STUDY: record.tags.get(TAG_STUDY, ""), TAG_SEED: str(seed),
            TAG_FINAL_OF_TRIAL: str(record.trial_id), TAG_FINAL_OF_RUN: record.run_id, TAG_DEV_SCORE: NO_DEV_SCORE,
            TAG_CONFIG: json.dumps(config)}
    if record.tags.get(PARENT_TAG):
        tags[PARENT_TAG] = record.tags[PARENT_TAG]
    run = mlflow_client.create_run(record.experiment_id, run_name=f"final-{record.trial_id}-seed{seed}"[:250],
                                   tags={k: v for k, v in tags.items() if v})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        log_corpus_inputs(mlflow_client, run_id, config.get("data") or {})
        params = {"train.seed": seed, "train.max_steps": final["steps"], "data.final": True, "final.pairs": final["pairs"],
                  "final.documents_sha256": final["documents_sha256"],
                  **{f"final.trained_on.{split}": count for split, count in final["trained_on"].items()}}
        for key, value in params.items():
            mlflow_client.log_param(run_id, key, _param_text(value))
        mlflow_client.log_dict(run_id, metrics, METRICS_ARTIFACT)
        mlflow_client.log_dict(run_id, config, "config.json")
        status = "FINISHED"
    finally:
        mlflow_client.set_terminated(run_id, status)
    return run_id


def trial_metrics(record: TrialRecord, tracking_uri: str) -> dict[str, Any]:
    """A trial's ``metrics.json`` artifact (every evaluation and the best); {} when it logged none."""
    import mlflow.artifacts

    tracking_uri = normalize_tracking_uri(tracking_uri)
    names = [a.path for a in client(tracking_uri).list_artifacts(record.run_id)]
    if METRICS_ARTIFACT not in names:
        return {}
    with tempfile.TemporaryDirectory() as staging:
        return _read_json(Path(mlflow.artifacts.download_artifacts(
            run_id=record.run_id, artifact_path=METRICS_ARTIFACT, dst_path=staging, tracking_uri=tracking_uri)))


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
