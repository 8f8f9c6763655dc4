"""The Ray Tune trial: one :func:`drugprot.training.train` run whose evaluations go to ``tune.report``.

Every evaluation reports the training metrics (minus the per-type table, which stays nested under ``dev_per_type``)
plus ``best_dev_f1`` (running maximum, what Optuna optimises), ``resumed_from_eval`` (0 for a fresh start), its cost
so far (``wall_s``, ``device_s``; see :mod:`drugprot.tuning.cost`), and where the trial runs (``node_id``, ``node_ip``,
``pid``, ``gpu_ids``: the GPUs Ray assigned it, comma-separated), with ``Checkpoint.from_directory(run_dir)``: at that moment the run
folder holds the best model so far (``model/``), ``metrics.json`` and the exact-resumption state (``checkpoint/``).

Restoring (a retried trial after a crash, or a resumed study): Tune hands back the latest reported checkpoint through
``tune.get_checkpoint()``; it is copied into the trial's run folder and training continues with ``resume=True``, so
the evaluations already reported are not repeated. The run folder is node-local scratch (``DRUGPROT_SCRATCH``),
removed when the trial ends; its checkpoints live on in the study storage.

Each trial is its own Ray actor (a separate process; ``reuse_actors=False``), so when ASHA stops a trial its process
exits and whatever GPU memory it held is released.

Test-only fault injection: with ``DRUGPROT_FAULT_ONCE=/some/marker`` in the environment of the process that calls
:func:`drugprot.tuning.study.tune_study` (the driver hands the path to every trial), the first trial to reach its
second evaluation creates that file (holding its trial id) and raises *before* reporting it, so Tune retries it from
the checkpoint of its first evaluation. Never set it outside tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from drugprot.config import build_config
from drugprot.tuning.cost import TrialClock

FAULT_ENV = "DRUGPROT_FAULT_ONCE"


class InjectedFault(RuntimeError):
    """Raised once by the DRUGPROT_FAULT_ONCE test hook."""


def run_trial(params: dict[str, Any], *, base: dict[str, Any], space, threads: int | None = None,
              fault_marker: str | None = None) -> None:
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
    resumed_from = 0
    best = float("-inf")
    checkpoint = tune.get_checkpoint()
    gpus = context.get_trial_resources().required_resources.get("GPU", 0.0)
    clock = TrialClock(gpus=gpus)
    if checkpoint is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
        checkpoint.to_directory(str(run_dir))
        state = _read_json(run_dir / "metrics.json")
        evaluations = state.get("evaluations", [])
        resumed_from = evaluations[-1]["eval"] if evaluations else 0
        best = max((e["dev_f1"] for e in evaluations), default=best)
        clock = TrialClock.resume(run_dir, gpus=gpus)
    elif run_dir.exists():
        shutil.rmtree(run_dir)

    reporter = TrialReporter(
        trial_id=context.get_trial_id(), best=best, resumed_from=resumed_from, fault_marker=fault_marker, clock=clock,
        where={"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
               "pid": os.getpid(), "gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())},
        report=lambda metrics, folder: tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder))))
    log_file = open(trial_dir / "train.log", "a", encoding="utf-8")
    try:
        train(config, run_dir, report=reporter, resume=checkpoint is not None, progress=False,
              log=lambda message: print(message, file=log_file, flush=True))
    finally:
        log_file.close()
        shutil.rmtree(run_dir, ignore_errors=True)


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
        self.best = max(self.best, float(metrics["dev_f1"]))
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        result["dev_per_type"] = dict(metrics.get("dev_per_type") or {})
        result.update(best_dev_f1=self.best, resumed_from_eval=self.resumed_from, **self.where)
        if self.clock is not None:
            result.update(self.clock.save(run_dir))
        if metrics["eval"] >= 2 and self.fault_marker:
            maybe_inject_fault(self.fault_marker, self.trial_id)
        self._report(result, run_dir)


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
