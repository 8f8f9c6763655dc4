"""Search spaces: a small YAML schema, checked against the run config when loaded, converted to Optuna distributions.

A space file looks like this (``search_spaces/paper.yaml``)::

    description: the paper's search            # optional
    seed: 0                                    # seeds Optuna's TPE sampler (default 0)
    startup_trials: 10                         # random trials before TPE models the space (default 10)
    scheduler:                                 # ASHA; every key optional
      metric: dev_f1                           # a reported metric (dev_f1, best_dev_f1, dev_precision, ...)
      mode: max
      grace_period: 2                          # evaluations (half epochs with train.eval_every 0.5)
      reduction_factor: 3
      max_t: null                              # default: evaluations in the config's budget
    sampler:                                   # Optuna's TPE; every key optional (see SamplerSpec)
      constant_liar: auto                      # auto: on whenever more than one trial runs at once
      multivariate: true                       # model the parameters jointly (lo and hi are coupled)
      group: true                              # ... per group of parameters sampled together
    trials:
      max_failures: 2                          # retries of a crashed trial, from its last checkpoint
      keep_checkpoints: 1                      # best checkpoints (by dev_f1) kept per trial in the storage
    params:
      loss.gamma: {uniform: [0.0, 5.0]}
      train.lr: {loguniform: [1.0e-5, 1.0e-4]}
      sampling.interval:                       # a [lo, hi] pair: two int parameters mapped onto it
        lo: {int: [-16, 0]}
        hi: {int: [0, 24]}
      train.seed: {choice: [13, 42, 97]}
      model.dropout: {fixed: 0.1}

Each parameter names a dotted config key (see :mod:`drugprot.config`) and one distribution: ``uniform: [low,
high]``, ``loguniform: [low, high]`` (low > 0), ``int: [low, high]`` (both ends included), ``choice: [a, b, ...]``
(scalars) or ``fixed: value``. Keys not listed come from the run config. Every bound and choice is validated
against the config model when the file is loaded, so a trial never starts with a value the config would refuse.
Errors name the file, the parameter and the key: ``paper.yaml: params.train.lrr: unknown config key 'train.lrr'``.

Optuna sees one parameter per searched value, named by its key (``loss.gamma``) or, for the interval,
``sampling.interval.lo`` / ``sampling.interval.hi``. These names are also the MLflow param names of each trial.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, model_validator

from drugprot.config import ConfigError, RunConfig, build_config, merge, read_yaml

KINDS = ("uniform", "loguniform", "int", "choice", "fixed")
INTERVAL_KEY = "sampling.interval"
#: Metrics the trainable reports after every evaluation that a scheduler may rank trials by.
SCHEDULER_METRICS = ("dev_f1", "best_dev_f1", "dev_precision", "dev_recall", "train_loss")
TOP_LEVEL = ("description", "seed", "startup_trials", "sampler", "scheduler", "trials", "params")


class SpaceError(ConfigError):
    """A search-space file problem, phrased as ``FILE: params.KEY: what is wrong``."""


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) value. ``name`` is the Optuna/MLflow name, ``key`` the config key it sets."""

    name: str
    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()
    value: Any = None
    part: int | None = None  # 0 = lo, 1 = hi of sampling.interval

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed {self.value!r}"
        if self.kind == "choice":
            return f"choice {list(self.choices)}"
        return f"{self.kind} [{self.low}, {self.high}]"

    def distribution(self):
        """The Optuna distribution of a searched parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "uniform":
            return FloatDistribution(float(self.low), float(self.high))
        if self.kind == "loguniform":
            return FloatDistribution(float(self.low), float(self.high), log=True)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        raise ValueError(f"{self.name}: a fixed parameter has no distribution")

    def extremes(self) -> list:
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "choice":
            return list(self.choices)
        return [self.low, self.high]


@dataclass(frozen=True)
class SchedulerSpec:
    metric: str = "dev_f1"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 2
    max_t: int | None = None


class SamplerSpec(BaseModel):
    """The space file's ``sampler:`` section: how Optuna's TPE proposes trials when several run at once.

    Defaults, and why:
    - ``constant_liar: auto`` -- on whenever more than one trial can run at once. Without it TPE proposes the
      next trial as if the running ones did not exist, so concurrent trials land next to each other
      (``bench/tpe_concurrency.py`` counts the near-duplicates); the liar scores running trials as bad ones.
    - ``multivariate: true`` -- one joint density over the parameters instead of one per parameter: the
      interval's ``lo`` and ``hi`` (and learning rate with gamma) interact.
    - ``group: true`` -- joint densities per group of parameters that are always sampled together (all of ours
      are); needs ``multivariate``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    constant_liar: Literal["auto"] | StrictBool = "auto"
    multivariate: StrictBool = True
    group: StrictBool = True

    @model_validator(mode="after")
    def _group_needs_multivariate(self):
        if self.group and not self.multivariate:
            raise ValueError("group: true needs multivariate: true (set group: false for independent sampling)")
        return self

    def liar(self, concurrent: int) -> bool:
        """Whether TPE uses the constant liar when ``concurrent`` trials run at once."""
        return concurrent > 1 if self.constant_liar == "auto" else self.constant_liar

    def tpe(self, *, seed: int, startup_trials: int, concurrent: int):
        """The Optuna TPE sampler for a study that runs ``concurrent`` trials at once."""
        import warnings

        import optuna

        with warnings.catch_warnings():  # "group is experimental": we pin Optuna and test what it does
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials,
                                              constant_liar=self.liar(concurrent), multivariate=self.multivariate,
                                              group=self.group)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (picklable: it travels to every trial)."""

    source: str
    params: tuple[Param, ...]
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    seed: int = 0
    startup_trials: int = 10
    max_failures: int = 2
    keep_checkpoints: int = 1
    description: str = ""
    raw: dict = field(default_factory=dict, compare=False)

    @property
    def searched(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.searched)

    @property
    def fixed(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.searched)

    def optuna_distributions(self) -> dict[str, Any]:
        """``{name: optuna distribution}`` for OptunaSearch (fixed parameters are applied to the base config)."""
        return {p.name: p.distribution() for p in self.searched}

    def fixed_values(self) -> dict[str, Any]:
        return {p.name: p.value for p in self.fixed}

    def apply(self, config: RunConfig, values: dict[str, Any], source: str = "trial") -> RunConfig:
        """The config of one trial: ``config`` with the fixed parameters and ``values`` (param name -> value)."""
        values = {**self.fixed_values(), **values}
        raw = config.dump()
        updates: dict[str, Any] = {}
        interval = list(raw["sampling"]["interval"])
        for param in self.params:
            if param.name not in values:
                continue
            value = values[param.name]
            if param.part is not None:
                interval[param.part] = int(value)
            elif param.key == INTERVAL_KEY:
                interval = list(value)
            else:
                _set(updates, param.key, value)
        _set(updates, INTERVAL_KEY, interval)
        return build_config(merge(raw, updates), source)

    def max_t(self, config: RunConfig) -> int:
        """ASHA's budget in evaluations: the space's ``scheduler.max_t`` or ``ceil(epochs / eval_every)``."""
        if self.scheduler.max_t is not None:
            return self.scheduler.max_t
        searched_keys = {p.key for p in self.searched}
        for key in ("train.epochs", "train.eval_every"):
            if key in searched_keys:
                raise SpaceError(f"{self.source}: scheduler.max_t: required when {key} is searched "
                                 f"(the number of evaluations differs between trials)")
        return max(1, math.ceil(config.train.epochs / config.train.eval_every - 1e-9))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _set(nested: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = nested
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf config key (``"train.lr"``, ``"loss.lambda"``) with its annotation."""
    keys: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.update(config_keys(annotation, key + "."))
        else:
            keys[key] = annotation
    return keys


def load_space(path: str | os.PathLike, config: RunConfig | None = None) -> SearchSpace:
    """Read and validate a space file; with ``config``, also check every bound and choice against it."""
    return parse_space(read_yaml(path, "search space", SpaceError), str(path), config)


def parse_space(raw: Any, source: str = "space", config: RunConfig | None = None) -> SearchSpace:
    """Validate a space given as a dict (what :func:`load_space` read)."""
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: expected a mapping with a 'params' section, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise SpaceError(f"{source}: {key}: unknown key (expected one of: {', '.join(TOP_LEVEL)})")
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise SpaceError(f"{source}: params: expected a non-empty mapping of config keys to distributions")

    known = config_keys()
    params: list[Param] = []
    for key, spec in params_raw.items():
        where = f"{source}: params.{key}"
        if key not in known:
            section, _, _ = str(key).partition(".")
            siblings = sorted(k.split(".", 1)[1] for k in known if k.startswith(section + "."))
            hint = f" ({section} has: {', '.join(siblings)})" if siblings else \
                f" (sections: {', '.join(sorted({k.split('.')[0] for k in known}))})"
            raise SpaceError(f"{where}: unknown config key '{key}'{hint}")
        if key == INTERVAL_KEY and isinstance(spec, dict) and set(spec) & {"lo", "hi"}:
            params.extend(_interval(spec, where))
        else:
            params.append(_param(str(key), str(key), spec, where))

    if not any(p.searched for p in params):
        raise SpaceError(f"{source}: params: nothing to search (every parameter is fixed)")

    scheduler = _scheduler(raw.get("scheduler") or {}, source)
    sampler = _sampler(raw.get("sampler") or {}, source)
    trials = raw.get("trials") or {}
    if not isinstance(trials, dict):
        raise SpaceError(f"{source}: trials: expected a mapping (max_failures, keep_checkpoints)")
    for key in trials:
        if key not in ("max_failures", "keep_checkpoints"):
            raise SpaceError(f"{source}: trials.{key}: unknown key (expected max_failures, keep_checkpoints)")
    max_failures = _int(trials.get("max_failures", 2), f"{source}: trials.max_failures", minimum=0)
    keep = _int(trials.get("keep_checkpoints", 1), f"{source}: trials.keep_checkpoints", minimum=1)
    seed = _int(raw.get("seed", 0), f"{source}: seed", minimum=0)
    startup = _int(raw.get("startup_trials", 10), f"{source}: startup_trials", minimum=1)
    description = raw.get("description") or ""
    space = SearchSpace(source=source, params=tuple(params), scheduler=scheduler, sampler=sampler, seed=seed,
                        startup_trials=startup, max_failures=max_failures, keep_checkpoints=keep, description=str(description), raw=raw)
    if config is not None:
        check_against(space, config)
    return space


def _number(value: Any, where: str, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{where}: expected a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise SpaceError(f"{where}: expected an integer, got {value!r}")
    if not math.isfinite(value):
        raise SpaceError(f"{where}: expected a finite number, got {value!r}")
    return value


def _int(value: Any, where: str, *, minimum: int) -> int:
    value = _number(value, where, integer=True)
    if value < minimum:
        raise SpaceError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _param(name: str, key: str, spec: Any, where: str, part: int | None = None) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{where}: expected one distribution, e.g. {{uniform: [0.0, 1.0]}} "
                         f"(one of: {', '.join(KINDS)}), got {spec!r}")
    (kind, arg), = spec.items()
    if kind not in KINDS:
        raise SpaceError(f"{where}: unknown distribution '{kind}' (expected one of: {', '.join(KINDS)})")
    if kind == "fixed":
        return Param(name, key, "fixed", value=arg, part=part)
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SpaceError(f"{where}: choice: expected a non-empty list of values, got {arg!r}")
        for item in arg:
            if not (item is None or isinstance(item, (bool, int, float, str))):
                raise SpaceError(f"{where}: choice: values must be numbers, strings or booleans, got {item!r}")
        if len(set(map(repr, arg))) != len(arg):
            raise SpaceError(f"{where}: choice: repeated values in {arg!r}")
        return Param(name, key, "choice", choices=tuple(arg), part=part)
    if not isinstance(arg, list) or len(arg) != 2:
        raise SpaceError(f"{where}: {kind}: expected [low, high], got {arg!r}")
    low = _number(arg[0], f"{where}: {kind} low", integer=kind == "int")
    high = _number(arg[1], f"{where}: {kind} high", integer=kind == "int")
    if low > high:
        raise SpaceError(f"{where}: {kind}: low {low} > high {high}")
    if low == high:
        raise SpaceError(f"{where}: {kind}: empty range [{low}, {high}]; use {{fixed: {low}}} for a constant")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform: low must be > 0, got {low}")
    return Param(name, key, kind, low=low, high=high, part=part)


def _interval(spec: dict, where: str) -> list[Param]:
    for sub in spec:
        if sub not in ("lo", "hi"):
            raise SpaceError(f"{where}.{sub}: unknown key (the interval takes lo and hi)")
    params = []
    for part, sub in enumerate(("lo", "hi")):
        if sub not in spec:
            raise SpaceError(f"{where}: missing '{sub}' (give both lo and hi, or {{fixed: [lo, hi]}})")
        param = _param(f"{INTERVAL_KEY}.{sub}", INTERVAL_KEY, spec[sub], f"{where}.{sub}", part)
        if param.kind in ("uniform", "loguniform"):
            raise SpaceError(f"{where}.{sub}: the interval takes integers: use int, choice or fixed, not {param.kind}")
        values = param.extremes()
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpaceError(f"{where}.{sub}: expected integers, got {value!r}")
        bad = [v for v in values if (v > 0 if sub == "lo" else v < 0)]
        if bad:
            need = "lo <= 0" if sub == "lo" else "hi >= 0"
            raise SpaceError(f"{where}.{sub}: {param.describe()} allows {bad[0]}, but the interval needs "
                             f"lo <= 0 <= hi ({need})")
        params.append(param)
    return params


def _scheduler(spec: Any, source: str) -> SchedulerSpec:
    if not isinstance(spec, dict):
        raise SpaceError(f"{source}: scheduler: expected a mapping, got {spec!r}")
    allowed = ("metric", "mode", "grace_period", "reduction_factor", "max_t")
    for key in spec:
        if key not in allowed:
            raise SpaceError(f"{source}: scheduler.{key}: unknown key (expected one of: {', '.join(allowed)})")
    metric = spec.get("metric", "dev_f1")
    if metric not in SCHEDULER_METRICS:
        raise SpaceError(f"{source}: scheduler.metric: expected one of {', '.join(SCHEDULER_METRICS)}, got {metric!r}")
    mode = spec.get("mode", "max")
    if mode not in ("max", "min"):
        raise SpaceError(f"{source}: scheduler.mode: expected max or min, got {mode!r}")
    grace = _int(spec.get("grace_period", 1), f"{source}: scheduler.grace_period", minimum=1)
    factor = _number(spec.get("reduction_factor", 2), f"{source}: scheduler.reduction_factor")
    if factor <= 1:
        raise SpaceError(f"{source}: scheduler.reduction_factor: must be > 1, got {factor}")
    max_t = spec.get("max_t")
    if max_t is not None:
        max_t = _int(max_t, f"{source}: scheduler.max_t", minimum=1)
        if max_t < grace:
            raise SpaceError(f"{source}: scheduler.max_t: {max_t} is below grace_period {grace}")
    return SchedulerSpec(metric=metric, mode=mode, grace_period=grace, reduction_factor=factor, max_t=max_t)


def _sampler(spec: Any, source: str) -> SamplerSpec:
    if not isinstance(spec, dict):
        raise SpaceError(f"{source}: sampler: expected a mapping (constant_liar, multivariate, group), got {spec!r}")
    try:
        return SamplerSpec(**spec)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("literal[", "bool")))
        where = f"sampler.{key}" if key else "sampler"
        if first["type"] == "extra_forbidden":
            raise SpaceError(f"{source}: {where}: unknown key (expected one of: "
                             f"{', '.join(SamplerSpec.model_fields)})") from None
        if first["type"] == "value_error":
            raise SpaceError(f"{source}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
        allowed = "auto, true or false" if key == "constant_liar" else "true or false"
        raise SpaceError(f"{source}: {where}: expected {allowed}, got {first['input']!r}") from None


def check_against(space: SearchSpace, config: RunConfig) -> None:
    """Apply every bound and choice of every parameter to ``config``; the first refused value is an error."""
    for param in space.params:
        for value in param.extremes():
            try:
                space.apply(config, {param.name: value}, source="")
            except ConfigError as error:
                reason = str(error).splitlines()[0].split(": ", 2)[-1]
                label = "value" if param.kind == "fixed" else "choice" if param.kind == "choice" else \
                    ("low" if value == param.low else "high")
                raise SpaceError(f"{space.source}: params.{param.name}: {label} {value!r} is not a valid "
                                 f"{param.key}: {reason}") from None
    space.max_t(config)
