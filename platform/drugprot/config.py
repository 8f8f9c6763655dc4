"""Typed run configuration: the single source of truth for every default, loaded from YAML and ``--set`` overrides.

Every model forbids unknown keys. :func:`load_config` turns a pydantic ``ValidationError`` into one message per
problem that names the file, the dotted key and the value found, e.g. ``smoke.yaml: train.lr: must be > 0, got -1``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drugprot.candidates import DEFAULT_INTERVAL
from drugprot.errors import DrugprotError

PACKAGE_ROOT = Path(__file__).resolve().parent
SAMPLE_DIR = PACKAGE_ROOT / "sample_data"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dir: Path = Field(SAMPLE_DIR, description="Corpus folder in the official layout (one sub-folder per split).")
    train_split: str = Field("training", description="Split to train on.")
    dev_split: str = Field("development", description="Split to evaluate on.")
    max_train_docs: int | None = Field(None, gt=0, description="Use only the first N training documents.")
    max_dev_docs: int | None = Field(None, gt=0, description="Use only the first N development documents.")
    selection_seed: int = Field(0, description="Seed of the split of the development documents into half A, on "
                                               "which every choice is made (best checkpoint, ASHA, TPE, ensemble "
                                               "members, weights, thresholds), and half B, held out for reports and "
                                               "the promotion gate (drugprot.dev_halves).")
    final: bool = Field(False, description="Final model: train on the training and the development documents "
                                           "together for exactly train.max_steps steps (chosen on development "
                                           "beforehand) and keep the last step's model. Nothing is evaluated: the "
                                           "model has no development score.")


class EncoderConfig(Section):
    name: str = Field("minilm", description="A name in the encoder store (`drugprot encoder import`), a local folder, "
                                            "a Hugging Face id, 'minilm' (offline all-MiniLM-L6-v2) "
                                            "or 'tiny-random' (a small random BERT, for tests).")
    max_length: int = Field(256, ge=32, le=4096, description="Longest input window in word pieces.")
    tiny: dict[str, int] = Field(default_factory=dict, description="BertConfig overrides for 'tiny-random'.")
    lowercase: Literal["auto"] | bool = Field(
        "auto", description="Lowercase text before word pieces. auto: the tokenizer's own config when it has one, "
                            "else the vocabulary decides (upper-case word pieces mean a cased model). A choice that "
                            "contradicts the vocabulary is refused.")

    @field_validator("lowercase", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError("must be auto, true or false")


def check_markers(system: str, markers: str) -> None:
    """Fine GENE-Y/GENE-N markers need FGEMR, the only system that predicts them for dev and test genes.

    Any other system would train on fine markers and then meet ``[O:GENE]`` at prediction, a marker it never saw
    (and multitask's entity head would read its answer off the marker).
    """
    if system == "fgemr" and markers != "fine":
        raise ValueError("model.system 'fgemr' predicts GENE-Y/GENE-N markers: set model.markers to 'fine'")
    if system != "fgemr" and markers == "fine":
        raise ValueError(f"model.markers 'fine' needs model.system 'fgemr' (got {system!r}): only FGEMR predicts "
                         f"GENE-Y/GENE-N for dev and test genes; any other system would meet a marker it never "
                         f"trained on. Use model.markers: coarse, or model.system: fgemr")


class ModelConfig(Section):
    system: Literal["baseline", "relation_attention", "multitask", "fgemr"] = "baseline"
    markers: Literal["coarse", "fine"] = Field("coarse", description="fine = GENE-Y/GENE-N typed gene markers.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    multilabel: bool = Field(False, description="Give a pair every type whose logit beats NONE's, trained with an "
                                               "adaptive-threshold loss (ATLOP) instead of the focal loss (loss.gamma "
                                               "is then unused). 201 training pairs have two types; the official "
                                               "scorer scores each type on its own.")

    @model_validator(mode="after")
    def _fine_markers_only_with_fgemr(self) -> ModelConfig:
        check_markers(self.system, self.markers)
        return self


class LossConfig(Section):
    # The paper's best values (Sec. IV-C, Fig. 3): gamma = 2 for the focal loss, lambda = 0.1 for multitask.
    gamma: float = Field(2.0, ge=0.0, le=10.0, description="Focal-loss focusing parameter; 0 is cross-entropy. "
                                                           "Default 2: the paper's best (Sec. IV-C, Fig. 3).")
    lambda_: float = Field(0.1, alias="lambda", ge=0.0, le=1.0,
                           description="multitask: L = λ·L_relation + (1−λ)·L_entity. Default 0.1: the paper's best "
                                       "(Sec. IV-C, Fig. 3).")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class EncodingConfig(Section):
    context: Literal["sentence", "abstract"] = Field(
        "sentence", description="What a pair is encoded in. sentence: its sentence (the paper). abstract: its "
                                "sentence with as much of the surrounding abstract as fits in encoder.max_length, "
                                "centred on the pair (the first-placed DrugProt system). Candidate pairs stay the "
                                "same-sentence pairs either way.")


class SamplingConfig(Section):
    interval: tuple[int, int] = Field(DEFAULT_INTERVAL, description="GENE interval [lo, hi] kept for training and prediction.")

    @field_validator("interval")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not lo <= 0 <= hi:
            raise ValueError(f"must satisfy lo <= 0 <= hi, got [{lo}, {hi}]")
        return value


class FgemrConfig(Section):
    epochs: float = Field(2.0, gt=0, le=50, description="Epochs of the GENE-Y/GENE-N classifier.")
    lr: float = Field(5e-5, gt=0, le=1.0)
    holdout: float = Field(0.1, gt=0, lt=1, description="Share of training documents held out to report its accuracy.")


class DistillConfig(Section):
    """Used only by ``drugprot distill``: L = w·T²·KL(teacher_T ‖ student_T) + (1−w)·L_gold."""

    temperature: float = Field(2.0, gt=0, le=100, description="Softens teacher and student distributions alike.")
    weight: float = Field(0.5, ge=0.0, le=1.0, description="Share of the loss given to the teacher's probabilities.")
    teacher: str | None = Field(None, description="The teacher (registry URI or folder); set by drugprot distill.")


class TrainConfig(Section):
    lr: float = Field(2e-5, gt=0, le=1.0)
    epochs: float = Field(10.0, gt=0, le=1000)
    eval_every: float = Field(0.5, gt=0, le=1000, description="Evaluate on dev every this many epochs.")
    batch_pairs: int = Field(16, ge=1, description="Pairs per optimizer step (the batch size): an epoch is "
                                                   "ceil(training pairs / batch_pairs) steps. Default 16: the "
                                                   "first-place DrugProt system's batch size (the paper gives none).")
    token_budget: int = Field(8192, ge=64, description="Memory cap: padded tokens per forward pass. A step over it "
                                                       "runs as micro-batches with gradient accumulation (same step).")
    max_batch_pairs: int = Field(64, ge=1, description="Memory cap: pairs per forward pass (micro-batch).")
    gradient_checkpointing: bool = Field(False, description="Recompute the encoder's activations in the backward "
                                                            "pass instead of keeping them: less memory for a large "
                                                            "encoder, for a second forward pass through it.")
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="Layer-wise learning-rate decay: the heads train at "
                                                                "lr, the encoder's top layer at lr·layer_decay, each "
                                                                "layer below one more factor. 1: none.")
    warmup: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear warm-up.")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(42, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast on CUDA; CPU always runs fp32.")
    compile: bool = Field(False, description="torch.compile the model (GPU).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode with train.compile; reduce-overhead replays each shape bucket as "
                               "one CUDA graph (give train.shape_buckets, or every width is its own graph).")
    shape_buckets: list[int] | None = Field(
        None, description="Pad each batch to the next of these lengths (increasing; the last at least "
                          "encoder.max_length), so compiled graphs are reused; e.g. [64, 128, 192, 256].")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    max_steps: int | None = Field(None, ge=1, description="Train exactly this many optimizer steps instead of "
                                                          "train.epochs (evaluations still every train.eval_every "
                                                          "epochs). Needed by data.final.")
    max_nonfinite_steps: int = Field(10, ge=1, description="Fail the run after this many consecutive steps whose "
                                                           "loss or gradient norm is not finite (each one is skipped).")


    @field_validator("shape_buckets")
    @classmethod
    def _increasing_buckets(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or value[0] < 8 or any(b <= a for a, b in zip(value, value[1:]))):
            raise ValueError(f"must be increasing lengths of at least 8, e.g. [64, 128, 256], got {value}")
        return value

    @model_validator(mode="after")
    def _mode_needs_compile(self) -> TrainConfig:
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode {self.compile_mode} needs train.compile: true")
        return self


class RunConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    encoding: EncodingConfig = Field(default_factory=EncodingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    fgemr: FgemrConfig = Field(default_factory=FgemrConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _final_has_a_step_count(self) -> RunConfig:
        if self.data.final and self.train.max_steps is None:
            raise ValueError("data.final: true needs train.max_steps (the optimizer steps to train for, chosen on "
                             "development: `drugprot ensemble --reseed K --final` takes the chosen trial's)")
        if self.data.final and self.model.system == "fgemr":
            raise ValueError("data.final: model.system fgemr cannot train on the development documents: their genes "
                             "carry no GENE-Y/GENE-N types for its fine markers")
        return self

    @model_validator(mode="after")
    def _budget_holds_a_window(self) -> RunConfig:
        if self.train.token_budget < self.encoder.max_length:
            raise ValueError(f"train.token_budget ({self.train.token_budget}) must be at least encoder.max_length "
                             f"({self.encoder.max_length}), or a long pair could not fit in any batch")
        buckets = self.train.shape_buckets
        if buckets and buckets[-1] < self.encoder.max_length:
            raise ValueError(f"train.shape_buckets: the largest bucket ({buckets[-1]}) must hold encoder.max_length "
                             f"({self.encoder.max_length})")
        if buckets and buckets[-1] > self.train.token_budget:
            raise ValueError(f"train.shape_buckets: the largest bucket ({buckets[-1]}) must fit train.token_budget "
                             f"({self.train.token_budget})")
        return self

    def dump(self) -> dict[str, Any]:
        """Plain, YAML-safe dict (paths as strings, ``lambda`` under its YAML name)."""
        return self.model_dump(mode="json", by_alias=True)


class ConfigError(DrugprotError, ValueError):
    """A configuration problem, already phrased for the user (source, dotted key, value)."""


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, Any]:
    """Every leaf config key (``"train.lr"``, ``"loss.lambda"``) with its annotation."""
    keys: dict[str, Any] = {}
    for name, info in (model or RunConfig).model_fields.items():
        key = prefix + (info.alias or name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.update(config_keys(annotation, key + "."))
        else:
            keys[key] = annotation
    return keys


def nearest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key (or section) a typo most likely meant: ``train.lrr`` -> ``train.lr``, ``trian`` -> ``train``."""
    candidates = set(known) | {k.split(".", 1)[0] for k in known}
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.75)
    return close[0] if close else None


def key_choices(key: str, known: Iterable[str]) -> str:
    """What exists beside an unknown key: its section's keys (``train has: …``), else the sections."""
    known = list(known)
    section = key.partition(".")[0]
    siblings = sorted(k.split(".", 1)[1] for k in known if k.startswith(section + "."))
    if siblings:
        return f"{section} has: {', '.join(siblings)}"
    return f"sections: {', '.join(sorted({k.split('.')[0] for k in known}))}"


def format_validation_error(source: str, error: ValidationError, known_keys: Iterable[str] | None = None) -> str:
    """One ``SOURCE: KEY: problem`` line per error; with ``known_keys``, an unknown key names the nearest one."""
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
            nearest = nearest_key(key, known_keys) if known_keys is not None else None
            if nearest:
                message += f"; did you mean {nearest}?"
        elif "input" in item and item["type"] != "missing" and item["loc"]:
            message = f"{message}, got {item['input']!r}"
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "sampling.interval=[-5,8]"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. train.lr=1e-4")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is both a value and a section")
        node[leaf] = yaml.safe_load(raw)
    return nested


def merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error, config_keys())) from None


def read_yaml(path: str | os.PathLike, what: str, error: type[ConfigError] = ConfigError) -> Any:
    """Parse a YAML file; an unreadable file or bad YAML raises ``error`` naming the file (and line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as problem:
        raise error(f"{path}: cannot read {what} ({problem.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise error(f"{path}{where}: not valid YAML ({getattr(problem, 'problem', problem)})") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Load a YAML config (or defaults when ``path`` is None), apply overrides, validate.

    Relative ``data.dir`` / ``encoder.name`` paths in a file resolve against the file's folder when they exist there.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_yaml(path, "config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        data_dir = (raw.get("data") or {}).get("dir") if isinstance(raw.get("data"), dict) else None
        if isinstance(data_dir, str) and not Path(data_dir).is_absolute():
            candidate = (Path(path).parent / data_dir).resolve()
            if candidate.exists() and not Path(data_dir).exists():
                raw["data"]["dir"] = str(candidate)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        source = f"{source} (with --set)"
        raw = merge(raw, extra)
    return _absolute_paths(build_config(raw, source))


def _absolute_paths(config: RunConfig) -> RunConfig:
    """Pin relative paths to the current folder now: Ray trials and Serve replicas run elsewhere."""
    if not config.data.dir.is_absolute():
        config.data.dir = config.data.dir.resolve()
    encoder = Path(config.encoder.name).expanduser()
    if not encoder.is_absolute() and encoder.exists():
        config.encoder.name = str(encoder.resolve())
    return config


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.dump(), sort_keys=False), encoding="utf-8")
