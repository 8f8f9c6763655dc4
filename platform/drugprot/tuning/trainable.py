"""The Ray Tune trial: one :func:`drugprot.training.train` run whose evaluations go to ``tune.report``.

Every evaluation reports the training metrics (minus the per-type table, which stays nested under ``dev_per_type``)
plus ``best_dev_f1_a`` (running maximum of ``dev_f1_a``, the F1 on dev half A, what Optuna optimises and ASHA
ranks; ``dev_f1_all`` is the whole development set, reported only), ``resumed_from_eval`` (0 for a fresh start), its cost
so far (``wall_s``, ``device_s``; see :mod:`drugprot.tuning.cost`, carried in ``cost.json``), and where the trial runs
(``node_id``, ``node_ip``, ``pid``, ``gpu_ids``: the GPUs Ray assigned it, comma-separated). What goes to the study storage is bounded, because for BERT-base
the resumable state is 1.3 GB and a study has dozens of trials:

* the resumable state: every ``trials.checkpoint_every`` evaluations (default once per epoch) and at the end, as
  the Tune checkpoint (``checkpoint/``, ``metrics.json``, ``cost.json``; ``keep_checkpoints`` of them kept, the
  newest). Tune's checkpoints are what it restores a trial from, and with its iteration count, so ASHA's rungs and
  Optuna's steps stay aligned with the evaluations after a retry;
* the best model: only when it improves, under ``<trial>/best/eval-NNNNNN/`` (``model/``, its dev probabilities
  ``dev_probabilities.safetensors``, ``metrics.json``, ``config.yaml``) with a pointer ``best/latest.json`` written
  last (one object, so a reader never sees half a model); the previous one is deleted. The driver logs it to MLflow
  when the trial ends, and ensembles are built from there.

Restoring (a retried trial after a crash, or a resumed study): Tune hands back the latest state through
``tune.get_checkpoint()``; the best model is fetched beside it and training continues with ``resume=True``.
Evaluations between that state and the crash run again (bit-identically) and are reported again; the MLflow
callback logs each evaluation step once. The run folder is node-local scratch (``DRUGPROT_SCRATCH``), removed when
the trial ends.

Each trial is its own Ray actor (a separate process; ``reuse_actors=False``), so when ASHA stops a trial its process
exits and whatever GPU memory it held is released.

Test-only fault injection: with ``DRUGPROT_FAULT_ONCE=/some/marker`` in the environment of the process that calls
:func:`drugprot.tuning.study.tune_study` (the driver hands the path to every trial), the first trial to reach its
third evaluation creates that file (holding its trial id) and raises *before* reporting it, so Tune retries it from
the resumable state of its second evaluation (uploaded once per epoch; the third was not). Never set it outside
tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drugprot.config import build_config
from drugprot.dev_halves import SELECTION_METRIC
from drugprot.model.dev_probabilities import FILE as DEV_PROBABILITIES
from drugprot.tuning.cost import COST_FILE, TrialClock

FAULT_ENV = "DRUGPROT_FAULT_ONCE"


class InjectedFault(RuntimeError):
    """Raised once by the DRUGPROT_FAULT_ONCE test hook."""


def run_trial(params: dict[str, Any], *, base: dict[str, Any], space, threads: int | None = None,
              fault_marker: str | None = None, checkpoint_every: int | None = None) -> None:
    """Ray Tune function trainable. ``params`` are Optuna's values by parameter name; ``base`` is the study's config."""
    import ray
    from ray import tune

    from drugprot.training import train

    config = space.apply(build_config(base, "study config"), params, source=f"trial {params}")
    if config.train.threads is None and threads:
        config.train.threads = threads
    context = tune.get_context()
    trial_dir = Path(context.get_trial_dir())
    # The run folder lives outside the trial folder: Ray uploads the trial folder to the storage as it changes, and
    # would copy a model while training replaces it. What must persist goes through tune.report's checkpoints.
    run_dir = scratch_dir() / f"{context.get_experiment_name()}-{context.get_trial_id()}"
    storage = context.get_storage()
    best_models = best_model_store(storage.storage_filesystem, storage.trial_fs_path)
    shutil.rmtree(run_dir, ignore_errors=True)
    resumed_from = 0
    best = float("-inf")
    checkpoint = tune.get_checkpoint()
    gpus = context.get_trial_resources().required_resources.get("GPU", 0.0)
    clock = TrialClock(gpus=gpus)
    if checkpoint is not None:
        checkpoint.to_directory(str(run_dir))
        with tempfile.TemporaryDirectory(dir=run_dir.parent, prefix=f".{run_dir.name}.best.") as staging:
            if best_models.download(Path(staging)):  # the state's metrics.json stays: it is the state's history
                for name in (MODEL, DEV_PROBABILITIES):
                    if (Path(staging) / name).exists():
                        shutil.move(Path(staging) / name, run_dir / name)
        evaluations = _read_json(run_dir / "metrics.json").get("evaluations", [])
        resumed_from = evaluations[-1]["eval"] if evaluations else 0
        best = max((e[SELECTION_METRIC] for e in evaluations if SELECTION_METRIC in e), default=best)
        clock = TrialClock.resume(run_dir, gpus=gpus)

    reporter = TrialReporter(
        trial_id=context.get_trial_id(), best=best, resumed_from=resumed_from, fault_marker=fault_marker, clock=clock,
        where={"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
               "pid": os.getpid(), "gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())},
        report=lambda metrics, folder, **saved: upload_evaluation(metrics, folder, **saved, best_models=best_models,
                                                                  report=_tune_report))
    log_file = open(trial_dir / "train.log", "a", encoding="utf-8")
    try:
        train(config, run_dir, report=reporter, resume=checkpoint is not None, progress=False, checkpoint_every=checkpoint_every,
              log=lambda message: print(message, file=log_file, flush=True))
    finally:
        log_file.close()
        shutil.rmtree(run_dir, ignore_errors=True)


MODEL = "model"
BEST_FOLDER = "best"


def upload_evaluation(metrics: dict[str, Any], run_dir: Path, *, model_saved: bool, state_saved: bool,
                      best_models: LatestFolder, report: Callable[[dict[str, Any], str | None], None]) -> None:
    """Upload what changed at one evaluation; ``report(metrics, folder)`` persists ``folder`` as the Tune checkpoint.

    The best model goes first, so that when the report lets ASHA stop the trial, its best model is already there."""
    if model_saved:
        best_models.upload(run_dir, (MODEL, DEV_PROBABILITIES, "metrics.json", "config.yaml"), int(metrics["eval"]))
    if not state_saved:
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory(dir=run_dir.parent, prefix=f".{run_dir.name}.state.") as staging:
        for name in ("checkpoint", "metrics.json", COST_FILE):
            if (run_dir / name).exists():  # cost.json: only where a clock runs (trials, not benchmarks)
                _link_tree(run_dir / name, Path(staging) / name)
        report(metrics, staging)


def _tune_report(metrics: dict[str, Any], folder: str | None) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)


def best_model_store(filesystem, trial_path: str) -> LatestFolder:
    """Where a trial keeps its best model: ``<trial>/best`` in the study storage (a trial's ``storage`` gives
    ``storage_filesystem`` and ``trial_fs_path``, a Tune ``Result`` its ``filesystem`` and ``path``)."""
    return LatestFolder(filesystem, f"{trial_path}/{BEST_FOLDER}")


class LatestFolder:
    """The latest of a series of folders in a pyarrow file system (local or S3): ``eval-NNNNNN/`` plus a pointer
    ``latest.json`` written after the folder, so readers never see half a folder; the previous one is deleted."""

    POINTER = "latest.json"

    def __init__(self, filesystem, root: str):
        self.fs = filesystem
        self.root = root

    def upload(self, source: Path, names: tuple[str, ...], evaluation: int) -> None:
        import pyarrow.fs

        name = f"eval-{evaluation:06d}"
        previous = self.latest()
        with tempfile.TemporaryDirectory(dir=source.parent, prefix=f".{source.name}.upload.") as staging:
            for entry in names:
                if (source / entry).exists():
                    _link_tree(source / entry, Path(staging) / entry)
            self.fs.create_dir(f"{self.root}/{name}")
            pyarrow.fs.copy_files(staging, f"{self.root}/{name}", destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{self.root}/{self.POINTER}") as out:
            out.write(json.dumps({"folder": name, "eval": evaluation}).encode())
        if previous and previous != name:
            self.fs.delete_dir(f"{self.root}/{previous}")

    def download(self, dest: Path) -> bool:
        """Copy the latest folder's contents into ``dest``; False when there is none yet."""
        import pyarrow.fs

        name = self.latest()
        if name is None:
            return False
        dest.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(f"{self.root}/{name}", str(dest), source_filesystem=self.fs)
        return True

    def latest(self) -> str | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{self.POINTER}") as handle:
                return json.loads(handle.read())["folder"]
        except FileNotFoundError:
            return None


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link ``source`` (a file or folder) at ``target``: staging an upload copies no bytes locally."""
    if source.is_dir():
        shutil.copytree(source, target, copy_function=os.link)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)


def scratch_dir() -> Path:
    """Node-local working space for trial run folders (``DRUGPROT_SCRATCH``, default the temporary folder)."""
    return Path(os.environ.get("DRUGPROT_SCRATCH") or tempfile.gettempdir()) / "drugprot-trials"


class TrialReporter:
    """The ``report`` callback handed to training: flattens the metrics and forwards them with the run folder."""

    def __init__(self, *, trial_id: str, best: float, resumed_from: int, where: dict[str, Any], report,
                 fault_marker: str | None = None, clock: TrialClock | None = None):
        self.trial_id = trial_id
        self.fault_marker = fault_marker
        self.best = best
        self.resumed_from = resumed_from
        self.where = where
        self.clock = clock
        self._report = report

    def __call__(self, metrics: dict[str, Any], run_dir: Path) -> None:
        saved = {"model_saved": bool(metrics.get("model_saved")), "state_saved": bool(metrics.get("state_saved"))}
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if SELECTION_METRIC in metrics:  # a final model (data.final) trains on dev and reports no dev score
            self.best = max(self.best, float(metrics[SELECTION_METRIC]))
            result.update(dev_per_type=dict(metrics.get("dev_per_type") or {}), best_dev_f1_a=self.best)
        result.update(resumed_from_eval=self.resumed_from, **self.where)
        if self.clock is not None:
            result.update(self.clock.save(run_dir))
        if metrics["eval"] >= 3 and self.fault_marker:
            maybe_inject_fault(self.fault_marker, self.trial_id)
        self._report(result, run_dir, **saved)


def maybe_inject_fault(marker: str, trial_id: str) -> None:
    """Test hook (see the module docstring): raise once per marker file, from the first trial that gets here."""
    try:
        handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(handle, "w") as out:
        out.write(trial_id)
    raise InjectedFault(f"{FAULT_ENV}: injected fault in trial {trial_id} (test hook; the trial is retried from its checkpoint)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
