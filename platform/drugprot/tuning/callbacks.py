"""Tune callbacks that run in the driver: MLflow child runs per trial, and the live progress table.

Why the driver writes MLflow, not the trials: one process does every write, in order, so concurrent trials never
race on a SQLite store ("database is locked", UNIQUE constraint on experiment creation), no trial inherits a wrong
``MLFLOW_EXPERIMENT_ID``, and trials on cluster nodes need no route to the tracking server; the driver reads each
finished trial's best model from the study storage (where Tune persisted the trial's checkpoints) and uploads it.
A resumed study finds its runs again by tag, and :class:`~drugprot.tracking.StudyTracker` skips what is logged.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from drugprot import tracking
from drugprot.tracking import StudyTracker
from drugprot.tuning.cost import trial_cost
from drugprot.tuning.space import OPTUNA_TRIAL_KEY, SEED_KEY


#: Short labels of the usual parameters in run names (others: the last part of their key).
LABELS = {"loss.gamma": "γ", "loss.lambda": "λ", "train.lr": "lr", "sampling.interval.lo": "lo",
          "sampling.interval.hi": "hi"}


def run_name(number: int | None, values: dict[str, Any]) -> str | None:
    """A trial run's name: ``t07 lr=3.1e-5 γ=1.8`` (the Optuna trial number, then the searched values); None when
    the number is unknown (the run is then named by its Ray trial id)."""
    if number is None:
        return None
    parts = [f"t{number:02d}"]
    for name, value in values.items():
        text = f"{value:.2g}".replace("e-0", "e-").replace("e+0", "e+") if isinstance(value, float) else str(value)
        parts.append(f"{LABELS.get(name, name.rsplit('.', 1)[-1])}={text}")
    return " ".join(parts)


def trial_state(*, error: bool, stopped_by_scheduler: bool | None, last_eval: int, max_t: int) -> str:
    """finished / early-stopped / errored. ``stopped_by_scheduler`` None means unknown (decided by the eval count)."""
    if error:
        return "errored"
    if stopped_by_scheduler is False:
        return "finished"
    return "finished" if last_eval >= max_t else "early-stopped"


class OptunaLink:
    """Writes the other side of the link between an MLflow trial run and its Optuna trial: user attributes on the
    Optuna trial (``ray_trial_id``, ``mlflow_run_id``, ``trial_folder``), through Optuna's storage API."""

    def __init__(self, storage_url: str, study: str, *, shown: str):
        self.storage_url = storage_url
        self.study = study
        self.shown = shown  # the URL as logs show it (password masked)
        self._storage = None

    def tags(self, number: int) -> dict[str, str]:
        """The MLflow run's side: the Optuna trial number and the study's storage."""
        return {tracking.TAG_OPTUNA_TRIAL: str(number), tracking.TAG_OPTUNA_STORAGE: self.shown}

    def link(self, number: int, attributes: dict[str, str]) -> None:
        import optuna

        if self._storage is None:
            self._storage = optuna.storages.RDBStorage(self.storage_url)
        study_id = self._storage.get_study_id_from_name(self.study)
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, number)
        if self._storage.get_trial(trial_id).state.is_finished():
            return  # a resumed study restarting a trial that Optuna already closed: its attributes are there
        for key, value in attributes.items():
            self._storage.set_trial_user_attr(trial_id, key, value)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_storage": None}


class MlflowStudyCallback(Callback):
    """One MLflow child run per trial (nested under the study's parent run), written from Tune's events; with an
    :class:`OptunaLink`, each run and its Optuna trial name each other."""

    def __init__(self, tracker: StudyTracker, *, space, base_config: dict[str, Any], max_t: int,
                 optuna: OptunaLink | None = None):
        self.tracker = tracker
        self.space = space
        self.base_config = base_config
        self.max_t = max_t
        self.optuna = optuna
        self._stopped: dict[str, bool] = {}
        self._last_eval: dict[str, int] = {}
        self._closed: set[str] = set()

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        from drugprot.config import build_config

        return self.space.apply(build_config(self.base_config), params).dump()

    def start(self, trial) -> str:
        """Open (or reopen) the trial's run: the space's values as params (a conditional parameter only where it
        was sampled), and the trial's seed as the param ``train.seed`` too when the space derives it."""
        params = dict(trial.config)
        config = self.trial_config(params)
        values = self.space.values(params)
        number = params.get(OPTUNA_TRIAL_KEY)
        run_id = self.tracker.start_trial(trial.trial_id, params=values, config=config,
                                          run_name=run_name(number, {p.name: values[p.name] for p in self.space.searched
                                                                     if p.name in values}))
        if not self.space.sets_seed:
            self.tracker.log_params(run_id, {SEED_KEY: config["train"]["seed"]})
        if self.optuna is not None and number is not None:
            self.tracker.set_tags(run_id, self.optuna.tags(number))
            self.optuna.link(number, {"ray_trial_id": trial.trial_id, "mlflow_run_id": run_id,
                                      "trial_folder": str(trial.path)})
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.start(trial)
        self._stopped.pop(trial.trial_id, None)
        self._closed.discard(trial.trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.tracker.trial_failed_attempt(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "eval" not in result:
            return
        run_id = self.tracker.trial_run(trial.trial_id)
        if run_id is None:
            run_id = self.start(trial)
        self.tracker.log_evaluation(run_id, result)
        if trial.trial_id not in self._last_eval and "steps_per_epoch" in result:  # fixed for a trial: a param
            self.tracker.log_params(run_id, {"steps_per_epoch": int(result["steps_per_epoch"])})
        self._last_eval[trial.trial_id] = int(result["eval"])
        # A scheduler STOP marks the result done before callbacks see it; a natural end never does.
        self._stopped[trial.trial_id] = bool(result.get("done"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = int((trial.last_result or {}).get("eval", self._last_eval.get(trial.trial_id, 0)))
        state = trial_state(error=False, stopped_by_scheduler=self._stopped.get(trial.trial_id), last_eval=last,
                            max_t=self.max_t)
        self.close(trial.trial_id, state, trial.storage, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.close(trial.trial_id, "errored", trial.storage, trial.last_result)

    def close(self, trial_id: str, state: str, storage, last_result: dict | None) -> None:
        """Log the trial's cost, upload its best model (from ``<trial>/best`` in the study storage) and end it."""
        import tempfile
        from pathlib import Path

        from drugprot.tuning.trainable import best_model_store

        run_id = self.tracker.trial_run(trial_id)
        if run_id is None or trial_id in self._closed:
            return
        last_eval = int((last_result or {}).get("eval", self._last_eval.get(trial_id, 0)))
        self.tracker.log_totals(run_id, trial_cost(last_result or {}, state=state).metrics(), step=last_eval)
        with tempfile.TemporaryDirectory(prefix="drugprot-best-") as folder:
            found = best_model_store(storage.storage_filesystem, storage.trial_fs_path).download(Path(folder))
            self.tracker.finish_trial(run_id, state=state, run_folder=folder if found else None)
        self._closed.add(trial_id)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_stopped={}, _last_eval={}, _closed=set())
        return state


class ProgressTable(Callback):
    """Prints a table of trials (id, params, evaluations, best dev F1, state) when a trial starts or ends, and at
    most every ``every`` seconds while results arrive."""

    def __init__(self, *, space, study: str, num_samples: int, max_t: int, every: float = 20.0, stream=None):
        self.space = space
        self.study = study
        self.num_samples = num_samples
        self.max_t = max_t
        self.every = every
        self.stream = stream
        self._last = 0.0
        self._states: dict[str, str] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._states[trial.trial_id] = "running"
        self.show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done") and int(result.get("eval", 0)) < self.max_t:
            self._states[trial.trial_id] = "early-stopped"
        if time.monotonic() - self._last >= self.every:
            self.show(trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._states[trial.trial_id] = "retrying"
        self.show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = int((trial.last_result or {}).get("eval", 0))
        if self._states.get(trial.trial_id) != "early-stopped" or last >= self.max_t:
            self._states[trial.trial_id] = "finished"
        print(f"[{self.study}] trial {trial.trial_id} {self._states[trial.trial_id]}: best dev F1 A "
              f"{_f1((trial.last_result or {}).get('best_dev_f1_a'))} after {last} evaluations",
              file=self.stream or sys.stdout, flush=True)
        self.show(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._states[trial.trial_id] = "errored"
        self.show(trials)

    def show(self, trials) -> None:
        self._last = time.monotonic()
        print(render_table(trials, self._states, self.space, self.study, self.num_samples, self.max_t),
              file=self.stream or sys.stdout, flush=True)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(stream=None, _last=0.0)
        return state


MAX_ROWS = 12


def render_table(trials, states: dict[str, str], space, study: str, num_samples: int, max_t: int) -> str:
    names = [p.name for p in space.searched]
    short = {name: name.split(".", 1)[-1] for name in names}
    header = ["trial", *[short[n] for n in names], "evals", "best F1", "state"]
    rows = []
    best = None
    for trial in trials:
        result = trial.last_result or {}
        f1 = result.get("best_dev_f1_a")
        if isinstance(f1, (int, float)) and (best is None or f1 > best[1]):
            best = (trial.trial_id, f1)
        state = states.get(trial.trial_id) or trial.status.lower()
        if trial.status == "ERROR":
            state = "errored"
        rows.append([trial.trial_id, *[_value(trial.config.get(n)) for n in names],
                     f"{result.get('eval', 0)}/{max_t}", _f1(f1), state])
    ended = {"finished", "early-stopped", "errored"}
    done = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR") or states.get(t.trial_id) in ended)
    running = sum(1 for t in trials if t.status == "RUNNING" and states.get(t.trial_id) not in ended)
    title = (f"[{study}] {done}/{num_samples} done, {running} running; best dev F1 A "
             + (f"{best[1]:.4f} ({best[0]})" if best else "-"))
    hidden = 0
    if len(rows) > MAX_ROWS:  # a long study: the running trials and the best ones
        best_rows = sorted((r for r in rows if r[-1] not in ("running", "pending", "retrying")),
                           key=lambda r: r[-2] if r[-2] != "-" else "", reverse=True)[:5]
        keep = {id(r) for r in best_rows} | {id(r) for r in rows if r[-1] in ("running", "retrying")}
        hidden = len(rows) - len(keep)
        rows = [r for r in rows if id(r) in keep]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    if hidden:
        lines.append(f"({hidden} more trials not shown: pending, or ended below the best five)")
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def _f1(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
