"""Choosing an ensemble's members from a study: the top-k trials, or K new seeds of the best configuration.

**Top-k** (:func:`select_top_k`): among the study's finished trials (best dev F1 known), ranked by their best F1 on
dev half A (``best_dev_f1_a``; half B stays held out from this choice too):

* when the search space searched the seed (a ``seed`` parameter, e.g. ``train.seed``), the members are the
  distinct seeds of the *best configuration* (all searched parameters but the seed equal to the best trial's),
  best first; if that configuration has fewer than k distinct seeds, the remaining places go to the next best
  trials (one per configuration-and-seed) and a note says so;
* otherwise the k best trials, skipping exact duplicates (same configuration and seed).

**Reseed** (:func:`reseed`): the best trial's configuration is trained again with K new seeds through Ray Tune:
the tuning package's own trainable (``drugprot.tuning.run_trial``) over a grid of the seeds, one trial each.
(``drugprot.tuning.tune_study`` samples its space with Optuna, which cannot promise K *distinct* seeds, so the
grid runs here; a ``drugprot.tuning.reseed`` facade, if the tuning package adds one, is used instead.) The
ensemble is then the K new models only. Their dev F1 still carries selection bias, through their checkpoints (each
its best evaluation) and their configuration (it won the search); both were chosen on half A, so their figures on
half B are the held-out ones.

**Final** (``reseed(..., final_steps=N)``, ``drugprot ensemble --reseed K --final``): the same K seeds, each trained on
the training and the development documents together (``data.final``) for exactly N optimizer steps
(``train.max_steps``): N is the step of the chosen trial's best checkpoint on half A (:func:`final_steps`), taken
as it is, not scaled to the larger corpus. Nothing of these members can be scored on development.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drugprot.ensemble_folder import EnsembleError

#: Trial states (``drugprot.state`` tag, see drugprot.tracking) whose best model is final: ASHA-stopped trials count.
FINISHED_STATES = frozenset({"finished", "early-stopped"})


@dataclass
class Selection:
    records: list[Any]  # TrialRecord-like objects, best first
    seeds_searched: bool
    note: str = ""
    candidates: int = 0  # finished trials considered


@dataclass
class ReseedResult:
    members: list[Any]  # MemberSource
    seeds: list[int]
    results: list[dict[str, Any]] = field(default_factory=list)


def is_seed_key(key: str) -> bool:
    return key == "seed" or key.endswith(".seed")


def is_finished(record) -> bool:
    state = str(getattr(record, "state", "") or "").lower()
    return state in FINISHED_STATES and getattr(record, "best_dev_f1_a", None) is not None


def configuration(record) -> str:
    params = getattr(record, "params", None) or {}
    return json.dumps({k: v for k, v in params.items() if not is_seed_key(k)}, sort_keys=True, default=str)


def _seed(record):
    seed = getattr(record, "seed", None)
    if seed is None:
        params = getattr(record, "params", None) or {}
        seed = next((v for k, v in params.items() if is_seed_key(k)), None)
    return seed


def select_top_k(records: Sequence, top_k: int, *, study: str = "") -> Selection:
    """The members for a top-k ensemble (see the module docstring), best F1 on dev half A first."""
    if top_k < 1:
        raise EnsembleError(f"--top-k must be at least 1, got {top_k}")
    label = f"study {study!r}" if study else "the study"
    finished = sorted((r for r in records if is_finished(r)), key=lambda r: float(r.best_dev_f1_a), reverse=True)
    if top_k > len(finished):
        states: dict[str, int] = {}
        for r in records:
            states[str(getattr(r, "state", "?"))] = states.get(str(getattr(r, "state", "?")), 0) + 1
        found = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no trials"
        raise EnsembleError(f"--top-k {top_k}: {label} has only {len(finished)} finished trial(s) with a dev F1 ({found}); "
                            f"lower --top-k to at most {len(finished)} or use --reseed {top_k}" if finished else
                            f"--top-k {top_k}: {label} has no finished trial with a dev F1 ({found}); "
                            "wait for the study to finish or check it with `drugprot tune`")
    seeds_searched = any(is_seed_key(k) for r in finished for k in (getattr(r, "params", None) or {}))
    chosen: list[Any] = []
    seen: set[tuple[str, Any]] = set()

    def take(record) -> None:
        key = (configuration(record), _seed(record))
        if key not in seen and len(chosen) < top_k:
            seen.add(key)
            chosen.append(record)

    note = ""
    if seeds_searched:
        best = configuration(finished[0])
        for record in finished:
            if configuration(record) == best:
                take(record)
        if len(chosen) < top_k:
            note = (f"the best configuration has {len(chosen)} distinct seed(s) among the finished trials; "
                    f"the other {top_k - len(chosen)} member(s) are the next best trials (use --reseed {top_k} "
                    "for seeds of the best configuration only)")
    for record in finished:
        take(record)
    if len(chosen) < top_k:
        raise EnsembleError(f"--top-k {top_k}: {label} has only {len(chosen)} distinct finished trial(s) "
                            f"(configuration and seed); lower --top-k or use --reseed {top_k}")
    return Selection(chosen, seeds_searched, note, len(finished))


def best_trial(records: Sequence, *, study: str = ""):
    finished = [r for r in records if is_finished(r)]
    if not finished:
        raise EnsembleError(f"study {study!r} has no finished trial with a dev F1 to reseed; wait for it to finish")
    return max(finished, key=lambda r: float(r.best_dev_f1_a))


def final_steps(metrics: dict[str, Any], record, *, study: str = "") -> int:
    """The optimizer steps of a trial's best checkpoint on dev half A (its ``metrics.json`` ``best.step``)."""
    step = (metrics.get("best") or {}).get("step")
    if not isinstance(step, int) or step < 1:
        raise EnsembleError(f"--final: trial {getattr(record, 'trial_id', '?')} of study {study!r} recorded no step "
                            f"for its best checkpoint (metrics.json best.step, got {step!r}); its step count cannot be "
                            f"reused: train a final model with `drugprot train --set data.final=true --set "
                            f"train.max_steps=N` instead")
    return step


def new_seeds(used: Sequence[int], k: int, *, start: int | None = None) -> list[int]:
    """K seeds not in ``used``, counting up from ``start`` (default: one past the largest used seed)."""
    taken = {int(s) for s in used if s is not None}
    seed = start if start is not None else (max(taken) + 1 if taken else 1)
    seeds: list[int] = []
    while len(seeds) < k:
        if seed not in taken:
            seeds.append(seed)
        seed += 1
    return seeds


def member_name(record) -> str:
    trial = re.sub(r"[^A-Za-z0-9._-]", "-", str(getattr(record, "trial_id", "") or getattr(record, "run_id", "")[:8]))
    seed = _seed(record)
    return (f"t{trial}" + (f"-seed{seed}" if seed is not None else ""))[:64]


def reseed(record, k: int, *, work_dir: str | Path, study: str = "", seeds: Sequence[int] | None = None,
           used_seeds: Sequence[int] = (), tracking_uri: str | None = None, cpus_per_trial: float = 1.0,
           gpus_per_trial: float = 0.0, address: str | None = None, final_steps: int | None = None,
           log: Callable[[str], None] | None = None) -> ReseedResult:
    """Train ``record``'s configuration with ``k`` new seeds through Ray Tune; the trained member folders.

    Uses ``drugprot.tuning.reseed(...)`` when the tuning package offers one. Otherwise: a Tune run of the tuning
    package's own trainable (``drugprot.tuning.run_trial``, the function every study trial runs) over a grid of the
    seeds, started like a study (``drugprot.tuning.study.connect_ray``), no scheduler (every seed trains fully),
    Tune state under ``work_dir/ray``; each member is the ``model/`` folder of its trial's last checkpoint.
    With ``final_steps``, each seed trains on train + dev for that many steps (``data.final``; the module docstring)
    and, given ``tracking_uri``, is recorded as its own MLflow run (:func:`drugprot.tracking.log_final_member`).
    """
    from drugprot.ensemble.build import MemberSource

    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if k < 1:
        raise EnsembleError(f"--reseed must be at least 1, got {k}")
    config = getattr(record, "config", None)
    if not config:
        raise EnsembleError(f"trial {getattr(record, 'trial_id', '?')} of study {study!r} has no recorded run config to retrain")
    seeds = list(seeds) if seeds is not None else new_seeds([*used_seeds, _seed(record)], k)
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    from drugprot import tuning

    facade = getattr(tuning, "reseed", None)
    if facade is not None and final_steps is None:
        say(f"reseeding trial {record.trial_id} with seeds {seeds} through drugprot.tuning.reseed")
        folders = facade(record, seeds, work_dir=work_dir, study=study, tracking_uri=tracking_uri)
        members = [MemberSource(Path(f), name=f"reseed-seed{s}", seed=s,
                                source={"study": study, "reseed_of": str(record.trial_id), "seed": s})
                   for f, s in zip(folders, seeds)]
        return ReseedResult(members, seeds)

    import shutil

    from ray import tune

    from drugprot.config import build_config, merge
    from drugprot.tuning import parse_space, run_trial
    from drugprot.tuning.study import connect_ray

    kind, origin = "reseed", {"study": study, "reseed_of": str(record.trial_id)}
    if final_steps is not None:
        config = merge(config, {"data": {"final": True}, "train": {"max_steps": final_steps}})
        kind, origin = "final", {**origin, "final": True, "steps": final_steps}
    base = build_config(config, f"trial {record.trial_id} config")
    space = parse_space({"description": f"reseed of {study} trial {record.trial_id}", "params": {"train.seed": {"choice": seeds}}},
                        f"reseed of {record.trial_id}", base)
    say(f"reseeding trial {record.trial_id} (dev F1 on half A {float(record.best_dev_f1_a):.4f}) with seeds {seeds}: "
        f"{k} Ray Tune trial(s) of drugprot.tuning.run_trial"
        + (f", each on train + dev for {final_steps} steps (no dev evaluation)" if final_steps is not None else ""))
    from drugprot.tuning.trainable import best_model_store

    started = connect_ray(address)
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.dump(), space=space,
                                                             threads=max(1, int(cpus_per_trial))),
                                        {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        tuner = tune.Tuner(trainable, param_space={"train.seed": tune.grid_search(seeds)},
                           tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False),
                           run_config=tune.RunConfig(name="reseed", storage_path=str(work_dir / "ray"), verbose=0,
                                                     failure_config=tune.FailureConfig(max_failures=1)))
        grid = tuner.fit()
        by_seed = {int(r.config["train.seed"]): r for r in grid}
        members, results = [], []
        for seed in seeds:
            result = by_seed.get(seed)
            folder = work_dir / "members" / f"seed-{seed}"
            best = work_dir / "best" / f"seed-{seed}"
            if result is None or result.error is not None or \
                    not best_model_store(result.filesystem, result.path).download(best):
                why = f": {str(result.error)[:300]}" if result is not None and result.error is not None else ""
                raise EnsembleError(f"reseed seed {seed}: training produced no model{why}")
            shutil.move(best / "model", folder)
            info = json.loads((folder / "drugprot.json").read_text())
            dev_f1_a = (info.get("dev") or {}).get("dev_f1_a")
            results.append({"seed": seed, "dev_f1_a": dev_f1_a})
            source = {**origin, "seed": seed}
            if final_steps is not None and tracking_uri is not None:  # its own run, beside the trial it retrains
                from drugprot.tracking import log_final_member

                source["run_id"] = log_final_member(record, tracking_uri, config=info["config"], seed=seed,
                                                    metrics=json.loads((best / "metrics.json").read_text()))
            members.append(MemberSource(folder, name=f"{kind}-seed{seed}", dev_f1_a=dev_f1_a, seed=seed, source=source))
        return ReseedResult(members, seeds, results)
    finally:
        if started:
            import ray

            ray.shutdown()
