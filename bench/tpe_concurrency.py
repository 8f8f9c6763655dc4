"""Near-duplicate proposals of TPE when trials run at once: the space file's sampler settings against plain TPE.

A study runs ``--concurrency`` trials at once: Optuna is asked for that many trials before any of them is told its
value (exactly what OptunaSearch does inside Ray Tune with ``max_concurrent_trials``). Two proposals of the same
batch are near-duplicates when every parameter lies within ``--eps`` of the other's, measured in the unit cube of
the space (log scale for loguniform, index for choices). The objective is synthetic (a smooth bowl over the
space's parameters, optimum inside the box) so the bench needs neither Ray nor training.

Baseline: TPE with ``constant_liar=False, multivariate=False`` (Optuna's independent TPE). Ours: the space's
``sampler:`` section (default: constant liar on, multivariate, grouped). Same seeds, same space, same run.

    python bench/tpe_concurrency.py                               # search_spaces/paper.yaml, concurrency 4
    python bench/tpe_concurrency.py --space search_spaces/wide.yaml --seeds 10

Prints a table and one JSON line: near-duplicates of each, their ratio, and the mean best value reached.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "platform") not in sys.path:
    sys.path.insert(0, str(REPO / "platform"))

from drugprot.tuning.space import SamplerSpec, SearchSpace, load_space  # noqa: E402


def unit(param, value) -> float:
    """The position of ``value`` in ``param``'s range, in [0, 1]."""
    if param.kind == "choice":
        return param.choices.index(value) / max(1, len(param.choices) - 1)
    if param.kind == "loguniform":
        return (math.log(value) - math.log(param.low)) / (math.log(param.high) - math.log(param.low))
    return (value - param.low) / (param.high - param.low)


def objective(space: SearchSpace, params: dict) -> float:
    """A smooth bowl whose optimum sits at 0.3 of every range (numeric) or the second choice."""
    return -sum((unit(p, params[p.name]) - (0.3 if p.kind != "choice" else unit(p, p.choices[min(1, len(p.choices) - 1)]))) ** 2
                for p in space.searched)


def near_duplicates(space: SearchSpace, sampler: SamplerSpec, *, seed: int, trials: int, concurrency: int,
                    eps: float) -> tuple[int, float]:
    """(near-duplicate pairs within concurrent batches, best value) for one seeded study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize",
                                sampler=sampler.tpe(seed=seed, startup_trials=space.startup_trials,
                                                    concurrent=concurrency))
    distributions = space.optuna_distributions()
    duplicates = 0
    for _ in range(math.ceil(trials / concurrency)):
        batch = [study.ask(distributions) for _ in range(concurrency)]
        for first, second in itertools.combinations(batch, 2):
            if all(abs(unit(p, first.params[p.name]) - unit(p, second.params[p.name])) <= eps for p in space.searched):
                duplicates += 1
        for trial in batch:
            study.tell(trial, objective(space, trial.params))
    return duplicates, study.best_value


def measure(space: SearchSpace, *, seeds: int, trials: int, concurrency: int, eps: float) -> dict:
    variants = {"baseline": SamplerSpec(constant_liar=False, multivariate=False, group=False), "ours": space.sampler}
    summary: dict = {"space": space.source, "concurrency": concurrency, "trials": trials, "seeds": seeds, "eps": eps}
    for label, sampler in variants.items():
        runs = [near_duplicates(space, sampler, seed=seed, trials=trials, concurrency=concurrency, eps=eps)
                for seed in range(seeds)]
        summary[f"{label}_near_duplicates"] = sum(d for d, _ in runs)
        summary[f"{label}_mean_best"] = round(sum(b for _, b in runs) / seeds, 4)
    summary["ours_sampler"] = space.sampler.model_dump()
    summary["ratio_near_duplicates"] = round(summary["ours_near_duplicates"] / max(1, summary["baseline_near_duplicates"]), 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=REPO / "search_spaces" / "paper.yaml")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--trials", type=int, default=40, help="trials per study (default 40)")
    parser.add_argument("--seeds", type=int, default=5, help="studies per variant (default 5)")
    parser.add_argument("--eps", type=float, default=0.05, help="near-duplicate distance per parameter (default 0.05)")
    args = parser.parse_args(argv)
    summary = measure(load_space(args.space), seeds=args.seeds, trials=args.trials, concurrency=args.concurrency,
                      eps=args.eps)
    print(f"{'sampler':<10} {'near-duplicates':>16} {'mean best':>10}")
    for label in ("baseline", "ours"):
        print(f"{label:<10} {summary[f'{label}_near_duplicates']:>16} {summary[f'{label}_mean_best']:>10}")
    print(f"ratio ours/baseline near-duplicates: {summary['ratio_near_duplicates']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
