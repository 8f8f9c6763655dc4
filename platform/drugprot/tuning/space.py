"""Search spaces: a small YAML schema, checked against the run config when loaded, searched define-by-run by Optuna.

The schema is pydantic (:class:`SpaceFile`): each distribution is a model, the parameter's one key picks it (a
discriminated union), and every model forbids unknown keys; :func:`_format` phrases pydantic's errors as below.

A space file looks like this (``search_spaces/paper.yaml``)::

    description: the paper's search            # optional
    seed: 0                                    # seeds Optuna's TPE sampler and the trials' seeds (default 0)
    startup_trials: 10                         # random trials before TPE models the space (default 10)
    scheduler:                                 # ASHA; every key optional
      metric: dev_f1_a                         # a reported metric on dev half A (dev_f1_a, best_dev_f1_a, ...)
      mode: max
      grace_epochs: 3                          # no cut before 3 epochs; or grace_period: N evaluations (default 1)
      reduction_factor: 3
      max_t: null                              # default: evaluations in the config's budget
    sampler:                                   # Optuna's TPE; every key optional (see SamplerSpec)
      constant_liar: auto                      # auto: on whenever more than one trial runs at once
      multivariate: true                       # model the parameters jointly (lo and hi are coupled)
      group: true                              # ... per group of parameters sampled together
    trials:
      max_failures: 2                          # retries of a crashed trial, from its last checkpoint
      keep_checkpoints: 1                      # resumable states kept per trial in the storage (the newest)
      checkpoint_every: 2                      # evaluations between uploads of the resumable state (default: once
                                               # per epoch; it is 3x the model's size, so uploads are bounded)
    params:
      loss.gamma: {uniform: [0.0, 5.0]}
      loss.lambda: {uniform: [0.0, 1.0], when: {model.system: multitask}}   # sampled in multitask trials only
      train.lr: {loguniform: [1.0e-5, 1.0e-4]}
      sampling.interval:                       # a [lo, hi] pair: two int parameters mapped onto it
        lo: {int: [-16, -4]}
        hi: {int: [8, 24]}
      model.dropout: {fixed: 0.1}

Each parameter names a dotted config key (see :mod:`drugprot.config`) and one distribution: ``uniform: [low,
high]``, ``loguniform: [low, high]`` (low > 0), ``int: [low, high]`` (both ends included), ``choice: [a, b, ...]``
(scalars) or ``fixed: value``. Keys not listed come from the run config. Every bound and choice is validated
against the config model when the file is loaded, so a trial never starts with a value the config would refuse.
Errors name the file, the parameter and the key: ``paper.yaml: params.train.lrr: unknown config key 'train.lrr'``.

Rules a space obeys (checked at load):

* ``when: {KEY: VALUE or [VALUES]}`` beside a distribution makes it conditional: it is sampled (and logged) only in
  trials where KEY has one of the values. KEY is a ``choice`` of the space (the values among its choices) or a key
  the space leaves to the config (the values valid for it). Optuna searches define-by-run (:meth:`SearchSpace.suggest`).
* The seed is not a hyperparameter: unless the space sets ``train.seed``, trial N of a study gets
  :func:`trial_seed` (space seed, N).
* A GENE interval the space can sample keeps at least 99% of the development gold relations within reach of
  prediction (:func:`dev_interval_ceiling`, measured counts in ``drugprot/resources/dev_gold_by_interval.json``).

Optuna sees one parameter per searched value, named by its key (``loss.gamma``) or, for the interval,
``sampling.interval.lo`` / ``sampling.interval.hi``. These names are also the MLflow param names of each trial.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from drugprot.config import (ConfigError, RunConfig, build_config, config_keys, key_choices, merge, nearest_key,
                             read_yaml)

KINDS = ("uniform", "loguniform", "int", "choice", "fixed")
INTERVAL_KEY = "sampling.interval"
SEED_KEY = "train.seed"
#: Beside the values in a Tune trial's config: the trial's Optuna trial number (not a config key).
OPTUNA_TRIAL_KEY = "optuna.trial_number"
#: Metrics the trainable reports after every evaluation that a scheduler may rank trials by.
SCHEDULER_METRICS = ("dev_f1_a", "best_dev_f1_a", "dev_precision_a", "dev_recall_a", "train_loss")  # never B


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
    when: tuple[tuple[str, tuple], ...] = ()  # (config key, allowed values): sampled only when every key has one

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    def describe(self) -> str:
        if self.kind == "fixed":
            text = f"fixed {self.value!r}"
        elif self.kind == "choice":
            text = f"choice {list(self.choices)}"
        else:
            text = f"{self.kind} [{self.low}, {self.high}]"
        return text + "".join(f" when {key} in {list(allowed)}" for key, allowed in self.when)

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial (define-by-run) for this parameter's value, on the same distribution as
        :meth:`distribution`."""
        if self.kind in ("uniform", "loguniform"):
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.kind == "loguniform")
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        raise ValueError(f"{self.name}: a fixed parameter is not sampled")

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
    metric: str = "dev_f1_a"
    mode: str = "max"
    grace_period: int | None = None  # evaluations before the first cut (default 1); or, in epochs, grace_epochs
    grace_epochs: float | None = None
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

    @field_validator("constant_liar", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"expected auto, true or false, got {value!r}")

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
    checkpoint_every: int | None = None  # evaluations between uploads of the resumable state; None = once per epoch
    description: str = ""
    raw: dict = field(default_factory=dict, compare=False)

    @property
    def searched(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.searched)

    @property
    def fixed(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.searched)

    def optuna_distributions(self) -> dict[str, Any]:
        """``{name: optuna distribution}`` of every searched parameter, conditional ones included."""
        return {p.name: p.distribution() for p in self.searched}

    def suggest(self, trial, config: dict[str, Any]) -> dict[str, Any]:
        """Optuna's define-by-run search over this space for one trial of a study on ``config`` (a ``RunConfig.dump()``):
        the searched values by name, a conditional parameter only when its ``when`` holds, and, unless the space
        sets ``train.seed``, the trial's own seed (:func:`trial_seed`)."""
        values: dict[str, Any] = {}
        fixed = self.fixed_values()
        for param in sorted(self.searched, key=lambda p: bool(p.when)):  # conditions refer to unconditional params
            if all(_current(key, values, fixed, config) in allowed for key, allowed in param.when):
                values[param.name] = param.suggest(trial)
        if not self.sets_seed:
            values[SEED_KEY] = trial_seed(self.seed, trial.number)
        return values

    @property
    def sets_seed(self) -> bool:
        return any(p.key == SEED_KEY for p in self.params)

    def values(self, trial_config: dict[str, Any]) -> dict[str, Any]:
        """What this space chose for a trial (fixed values and the sampled ones, by name), out of a Tune trial's
        config; the derived seed is not among them (it is not a searched value)."""
        names = {p.name for p in self.params}
        return {**self.fixed_values(), **{k: trial_config[k] for k in sorted(trial_config) if k in names}}

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
        if SEED_KEY in values and not self.sets_seed:  # the trial's derived seed
            _set(updates, SEED_KEY, values[SEED_KEY])
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

    def grace_period(self, config: RunConfig) -> int:
        """Evaluations before ASHA's first cut: ``scheduler.grace_period``, or ``grace_epochs`` in evaluations of
        ``config`` (rounded up, so the cut never comes before that many epochs); at most :meth:`max_t`."""
        spec = self.scheduler
        if spec.grace_epochs is not None and "train.eval_every" in {p.key for p in self.searched}:
            raise SpaceError(f"{self.source}: scheduler.grace_epochs: give grace_period in evaluations when "
                             f"train.eval_every is searched (an epoch is a different number of evaluations per trial)")
        grace = spec.grace_period if spec.grace_epochs is None else \
            math.ceil(spec.grace_epochs / config.train.eval_every - 1e-9)
        return max(1, min(grace or 1, self.max_t(config)))

    def rungs(self, config: RunConfig) -> list[int]:
        """The evaluations at which ASHA may cut a trial, as Ray's ASHAScheduler places them (one bracket):
        ``grace * reduction_factor**k`` below ``max_t`` (a trial at ``max_t`` has ended anyway)."""
        grace, max_t, factor = self.grace_period(config), self.max_t(config), self.scheduler.reduction_factor
        count = int(math.log(max_t / grace) / math.log(factor) + 1)
        return [r for r in (grace * factor ** k for k in range(count)) if r < max_t]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def trial_seed(study_seed: int, number: int) -> int:
    """The seed of the study's trial ``number`` (Optuna's trial number, 0, 1, …): the first word of NumPy's
    ``SeedSequence((study_seed, number))``, below 2**31. Deterministic, and independent between trials, so the seed
    is noise the study averages over instead of a value TPE models."""
    import numpy

    return int(numpy.random.SeedSequence((study_seed, number)).generate_state(1)[0] % 2 ** 31)


def _current(key: str, values: dict[str, Any], fixed: dict[str, Any], config: dict[str, Any]) -> Any:
    """The value ``key`` has in a trial so far: sampled, fixed by the space, or the study's config."""
    for source in (values, fixed):
        if key in source:
            return source[key]
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def _nested(dotted: str, value: Any) -> dict:
    nested: dict = {}
    _set(nested, dotted, value)
    return nested


def _set(nested: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = nested
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


# --- the file's schema (pydantic) -------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _pair(value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"expected [low, high], got {value!r}")
    return tuple(value)


Number = Annotated[Any, AfterValidator(_number)]
Integer = Annotated[Any, AfterValidator(_integer)]
NumberPair = Annotated[tuple[Number, Number], BeforeValidator(_pair)]
IntegerPair = Annotated[tuple[Integer, Integer], BeforeValidator(_pair)]


def _condition(value: Any) -> Any:
    """``when: {KEY: VALUE}`` or ``{KEY: [VALUE, …]}`` -> ``((KEY, (VALUE, …)), …)``; the keys are checked against the
    space and the config in :func:`parse_space`."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not value:
        raise ValueError(f"expected a mapping of config keys to values, e.g. {{model.system: multitask}}, got {value!r}")
    out = []
    for key, allowed in value.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        if not allowed or not all(v is None or isinstance(v, (bool, int, float, str)) for v in allowed):
            raise ValueError(f"{key}: expected a value or a non-empty list of values, got {value[key]!r}")
        out.append((str(key), tuple(allowed)))
    return tuple(out)


#: ``when:`` beside a distribution: the parameter is sampled only in trials where each key has one of its values.
When = Annotated[Any, AfterValidator(_condition)]


class _Range(_Strict):
    """``{KIND: [low, high]}`` with low < high; each subclass's only field is KIND."""

    @model_validator(mode="after")
    def _ordered(self):
        low, high = getattr(self, next(iter(type(self).model_fields)))
        if low > high:
            raise ValueError(f"low {low} > high {high}")
        if low == high:
            raise ValueError(f"empty range [{low}, {high}]; use {{fixed: {low}}} for a constant")
        return self


class Uniform(_Range):
    uniform: NumberPair
    when: When = None


class LogUniform(_Range):
    loguniform: NumberPair
    when: When = None

    @model_validator(mode="after")
    def _positive(self):
        if self.loguniform[0] <= 0:
            raise ValueError(f"low must be > 0, got {self.loguniform[0]}")
        return self


class IntRange(_Range):
    int: IntegerPair
    when: When = None


class Choice(_Strict):
    choice: list[Any]
    when: When = None

    @field_validator("choice", mode="before")
    @classmethod
    def _values(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a non-empty list of values, got {value!r}")
        for item in value:
            if not (item is None or isinstance(item, (bool, int, float, str))):
                raise ValueError(f"values must be numbers, strings or booleans, got {item!r}")
        if len(set(map(repr, value))) != len(value):
            raise ValueError(f"repeated values in {value!r}")
        return value


class Fixed(_Strict):
    fixed: Any


def _kind(value: Any) -> str | None:
    """The distribution's key (``uniform``, …); ``when`` may stand beside it."""
    keys = [k for k in value if k != "when"] if isinstance(value, dict) else []
    return keys[0] if len(keys) == 1 else None


_TAGGED = tuple(Annotated[model, Tag(kind)] for kind, model in zip(KINDS, (Uniform, LogUniform, IntRange, Choice, Fixed)))
#: One distribution, chosen by its only key (``{uniform: [0, 1]}``).
Distribution = Annotated[Union[_TAGGED], Discriminator(_kind)]


def _param(name: str, key: str, spec: BaseModel, part: int | None = None) -> Param:
    kind = next(iter(type(spec).model_fields))
    arg = getattr(spec, kind)
    when = getattr(spec, "when", None) or ()
    if kind == "fixed":
        return Param(name, key, kind, value=arg, part=part)
    if kind == "choice":
        return Param(name, key, kind, choices=tuple(arg), part=part, when=when)
    return Param(name, key, kind, low=arg[0], high=arg[1], part=part, when=when)


class IntervalPair(_Strict):
    """``sampling.interval: {lo: DIST, hi: DIST}``: two integer parameters, lo <= 0 <= hi."""

    lo: Distribution
    hi: Distribution

    @model_validator(mode="before")
    @classmethod
    def _both(cls, value: Any) -> Any:
        for sub in ("lo", "hi"):
            if isinstance(value, dict) and sub not in value:
                raise ValueError(f"missing '{sub}' (give both lo and hi, or {{fixed: [lo, hi]}})")
        return value

    @field_validator("lo", "hi")
    @classmethod
    def _integer_side(cls, spec: BaseModel, info: ValidationInfo) -> BaseModel:
        param = _param(info.field_name, INTERVAL_KEY, spec)
        if param.when:
            raise ValueError("when: the interval's sides are always sampled together; put no condition on them")
        if param.kind in ("uniform", "loguniform"):
            raise ValueError(f"the interval takes integers: use int, choice or fixed, not {param.kind}")
        for value in param.extremes():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected integers, got {value!r}")
        bad = [v for v in param.extremes() if (v > 0 if info.field_name == "lo" else v < 0)]
        if bad:
            need = "lo <= 0" if info.field_name == "lo" else "hi >= 0"
            raise ValueError(f"{param.describe()} allows {bad[0]}, but the interval needs lo <= 0 <= hi ({need})")
        return spec


def _config_key(key: str) -> str:
    known = config_keys()
    if key not in known:
        nearest = nearest_key(key, known)
        raise ValueError(f"unknown config key '{key}' ({key_choices(key, known)})"
                         + (f"; did you mean {nearest}?" if nearest else ""))
    return key


class SchedulerFile(_Strict):
    metric: Literal[SCHEDULER_METRICS] = "dev_f1_a"
    mode: Literal["max", "min"] = "max"
    grace_period: StrictInt | None = Field(None, ge=1)
    grace_epochs: Number | None = Field(None, gt=0)
    reduction_factor: Number = Field(2, gt=1)
    max_t: StrictInt | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_grace(self):
        if self.grace_period is not None and self.grace_epochs is not None:
            raise ValueError("give grace_period (evaluations) or grace_epochs (epochs), not both")
        return self

    @field_validator("max_t")
    @classmethod
    def _after_grace(cls, value: int | None, info: ValidationInfo) -> int | None:
        grace = info.data.get("grace_period")
        if value is not None and grace is not None and value < grace:
            raise ValueError(f"{value} is below grace_period {grace}")
        return value


class TrialsFile(_Strict):
    max_failures: StrictInt = Field(2, ge=0)
    keep_checkpoints: StrictInt = Field(1, ge=1)
    checkpoint_every: StrictInt | None = Field(None, ge=1)


def _spec_kind(value: Any) -> str | None:
    return "interval" if isinstance(value, dict) and set(value) & {"lo", "hi"} else _kind(value)


#: A parameter: one distribution, or (``sampling.interval`` only) a ``{lo, hi}`` pair of them.
ParamSpec = Annotated[Union[(*_TAGGED, Annotated[IntervalPair, Tag("interval")])], Discriminator(_spec_kind)]


class SpaceFile(_Strict):
    description: str | None = None
    seed: StrictInt = Field(0, ge=0)
    startup_trials: StrictInt = Field(10, ge=1)
    scheduler: SchedulerFile | None = None
    sampler: SamplerSpec | None = None
    trials: TrialsFile | None = None
    params: dict[Annotated[str, AfterValidator(_config_key)], ParamSpec] = Field(None, validate_default=True)

    @field_validator("params", mode="before")
    @classmethod
    def _mapping(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            raise ValueError("expected a non-empty mapping of config keys to distributions")
        return value

    @field_validator("params")
    @classmethod
    def _pairs_only_for_the_interval(cls, params: dict[str, BaseModel]) -> dict[str, BaseModel]:
        for key, spec in params.items():
            if isinstance(spec, IntervalPair) and key != INTERVAL_KEY:
                raise ValueError(f"{key}: only {INTERVAL_KEY} takes a {{lo, hi}} pair; give one distribution")
        return params


def _location(loc: tuple) -> str:
    """``('params', 'loss.gamma', 'uniform', 'uniform', 0)`` -> ``params.loss.gamma: uniform low``: the parameter
    (``params.sampling.interval.lo`` for a side of the interval), then the distribution and bound if any."""
    if loc[:1] != ("params",) or len(loc) < 2:
        return ".".join(str(p) for p in loc) or "(top level)"
    head, rest = f"params.{loc[1]}", list(loc[2:])
    if rest[:1] == ["interval"]:  # the pair itself, a side of it, or an unknown key beside lo and hi
        head, rest = (f"{head}.{rest[1]}", rest[2:]) if len(rest) > 1 else (head, [])
    detail: list[str] = []
    for part in rest:
        if part == "[key]" or (detail and part == detail[-1]):
            continue
        detail.append({0: "low", 1: "high"}.get(part, str(part)) if isinstance(part, int) else str(part))
    return head + (": " + " ".join(detail) if detail else "")


def _message(item: dict) -> str:
    kind, ctx, given = item["type"], item.get("ctx") or {}, item.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_invalid":
        return f"unknown distribution '{ctx['tag']}' (expected one of: {', '.join(KINDS)})"
    if kind == "union_tag_not_found":
        return f"expected one distribution, e.g. {{uniform: [0.0, 1.0]}} (one of: {', '.join(KINDS)}), got {given!r}"
    if kind == "literal_error":
        return f"expected one of {ctx['expected'].replace(chr(39), '')}, got {given!r}"
    if kind in ("greater_than", "greater_than_equal"):
        sign, bound = (">", ctx["gt"]) if kind == "greater_than" else (">=", ctx["ge"])
        return f"must be {sign} {bound}, got {given!r}"
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return f"expected an integer, got {given!r}"
    if kind == "bool_type":
        return f"expected true or false, got {given!r}"
    if kind == "model_type":
        return f"expected a mapping, got {given!r}"
    return item["msg"].removeprefix("Value error, ")


def _format(source: str, error: ValidationError) -> str:
    return "\n".join(f"{source}: {_location(item['loc'])}: {_message(item)}" for item in error.errors())


# --- loading ------------------------------------------------------------------------------------------------------

def load_space(path: str | os.PathLike, config: RunConfig | None = None) -> SearchSpace:
    """Read and validate a space file; with ``config``, also check every bound and choice against it."""
    return parse_space(read_yaml(path, "search space", SpaceError), str(path), config)


def parse_space(raw: Any, source: str = "space", config: RunConfig | None = None) -> SearchSpace:
    """Validate a space given as a dict (what :func:`load_space` read)."""
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: expected a mapping with a 'params' section, got {type(raw).__name__}")
    try:
        parsed = SpaceFile.model_validate(raw)
    except ValidationError as error:
        raise SpaceError(_format(source, error)) from None
    params: list[Param] = []
    for key, spec in parsed.params.items():
        if isinstance(spec, IntervalPair):
            params += [_param(f"{key}.{sub}", key, getattr(spec, sub), part) for part, sub in enumerate(("lo", "hi"))]
        else:
            params.append(_param(key, key, spec))
    if not any(p.searched for p in params):
        raise SpaceError(f"{source}: params: nothing to search (every parameter is fixed)")
    _check_conditions(params, source)
    _check_interval_ceiling(params, source)
    scheduler = parsed.scheduler or SchedulerFile()
    trials = parsed.trials or TrialsFile()
    space = SearchSpace(source=source, params=tuple(params), scheduler=SchedulerSpec(**scheduler.model_dump()),
                        seed=parsed.seed, startup_trials=parsed.startup_trials, max_failures=trials.max_failures,
                        keep_checkpoints=trials.keep_checkpoints,
                        checkpoint_every=trials.checkpoint_every, sampler=parsed.sampler or SamplerSpec(),
                        description=parsed.description or "", raw=raw)
    if config is not None:
        check_against(space, config)
    return space


def _check_conditions(params: list[Param], source: str) -> None:
    """Each ``when`` names a config key and values it can have: a choice of this space (its values among the
    choices), or a key the space leaves to the config (values checked in :func:`check_against`)."""
    by_name = {p.name: p for p in params}
    for param in (p for p in params if p.when):
        where = f"{source}: params.{param.name}: when: {{"
        for key, allowed in param.when:
            head = f"{where}{key}: {_listed(allowed)}}}"
            try:
                _config_key(key)
            except ValueError as error:
                raise SpaceError(f"{head}: {error}") from None
            if key == param.key:
                raise SpaceError(f"{head}: a parameter cannot be conditional on itself")
            if key == INTERVAL_KEY:
                raise SpaceError(f"{head}: a condition names a single value such as model.system, not the interval")
            other = by_name.get(key)
            if other is None:
                continue
            if other.when:
                raise SpaceError(f"{head}: {key} is conditional itself; a condition may only name an unconditional "
                                 f"parameter")
            if other.kind == "fixed":
                if other.value not in allowed:
                    raise SpaceError(f"{head}: {key} is fixed to {other.value!r} in this space, so {param.name} "
                                     f"would never be sampled")
            elif other.kind != "choice":
                raise SpaceError(f"{head}: {key} is searched as {other.kind}; a condition needs a choice parameter "
                                 f"(or a key the space leaves to the config)")
            else:
                outside = [v for v in allowed if v not in other.choices]
                if outside:
                    raise SpaceError(f"{head}: {outside[0]!r} is not one of {key}'s choices "
                                     f"{_listed(other.choices)}")


def _listed(values) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


#: The least share of the development gold relations a sampled GENE interval must keep within reach of prediction.
MIN_INTERVAL_CEILING = 0.99


@functools.cache
def _dev_gold_by_interval() -> tuple[int, dict[int, int]]:
    measured = json.loads(resources.files("drugprot.resources").joinpath("dev_gold_by_interval.json").read_text())
    return measured["gold_relations"], {int(k): v for k, v in measured["gold_by_interval"].items()}


def dev_interval_ceiling(lo: int, hi: int) -> float:
    """The share of DrugProt's development gold relations whose pair a model trained with the GENE interval
    ``[lo, hi]`` can predict at all: prediction scores the same interval (the measured counts are in
    ``drugprot/resources/dev_gold_by_interval.json``; the command is in docs/tuning.md)."""
    gold, by_index = _dev_gold_by_interval()
    return 1.0 - sum(n for index, n in by_index.items() if not lo <= index <= hi) / gold


def _check_interval_ceiling(params: list[Param], source: str) -> None:
    """Every interval the space can sample keeps at least MIN_INTERVAL_CEILING of the development gold within
    reach. The ceiling grows as the interval widens, so the narrowest one the space allows decides: its highest
    ``lo`` with its lowest ``hi``."""
    sides = {p.part: p for p in params if p.key == INTERVAL_KEY}
    if not sides:
        return
    if None in sides:  # {fixed: [lo, hi]}
        lo, hi = sides[None].value
    else:
        lo, hi = max(sides[0].extremes()), min(sides[1].extremes())
    if not lo <= 0 <= hi:
        return  # not an interval at all: the config refuses it (check_against)
    ceiling = dev_interval_ceiling(lo, hi)
    if ceiling >= MIN_INTERVAL_CEILING:
        return
    wider = sorted((hi_ - lo_, lo_, hi_) for lo_ in range(lo, lo - 32, -1) for hi_ in range(hi, hi + 32)
                   if dev_interval_ceiling(lo_, hi_) >= MIN_INTERVAL_CEILING)
    fixes = [f"hi from {h}" for _, v, h in wider if v == lo][:1] + [f"lo up to {v}" for _, v, h in wider if h == hi][:1]
    hint = f"; sample {' or '.join(fixes)}" if fixes else \
        f"; sample lo up to {wider[0][1]} and hi from {wider[0][2]}" if wider else ""
    raise SpaceError(f"{source}: params.{INTERVAL_KEY}: [{lo}, {hi}] is within the space, and keeps only "
                     f"{100 * ceiling:.1f}% of the development gold relations within reach of prediction (a trial "
                     f"predicts only pairs inside its interval); a space may only sample intervals that keep at "
                     f"least {100 * MIN_INTERVAL_CEILING:.0f}%{hint}")


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
    names = {p.name for p in space.params}
    raw = config.dump()
    for param in space.params:
        for key, allowed in param.when:
            for value in allowed if key not in names else ():
                try:
                    build_config(merge(raw, _nested(key, value)), "")
                except ConfigError as error:
                    reason = str(error).splitlines()[0].split(": ", 2)[-1]
                    raise SpaceError(f"{space.source}: params.{param.name}: when: {{{key}: {_listed(allowed)}}}: "
                                     f"{value!r} is not a valid {key}: {reason}") from None
    space.grace_period(config)  # and max_t
