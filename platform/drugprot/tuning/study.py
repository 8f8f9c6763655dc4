"""A tuning study: Ray Tune + OptunaSearch (TPE, seeded) + ASHA over :func:`drugprot.training.train`, tracked in MLflow.

:func:`tune_study` is the facade behind ``drugprot tune``. It checks everything that can be checked before a trial
starts (space against config, tracking store reachable, study name free or resumable, Ray cluster answering within
a bounded wait, enough resources), then runs the study and closes it in MLflow (plots, trials table, best trial).

Layout in the storage (``--storage``, default ``runs/tune``; local folder or ``s3://…``): ``NAME/`` is the Tune
experiment (``tuner.pkl``, experiment state with the Optuna sampler, one folder per trial with its kept checkpoints)
plus ``NAME/drugprot-study.json`` (what ``--resume`` needs: config, space, tracking URI, Optuna storage, MLflow ids)
and, for local storage, ``NAME/best_config.yaml`` and ``NAME/optuna.db``, the Optuna study (SQLite; with remote
storage it is ``./NAME-optuna.db`` unless ``--optuna-storage`` names a shared database such as PostgreSQL).

Resume: ``--resume`` goes through ``Tuner.restore`` (never a fresh Tuner): finished trials stay finished, running
ones continue from their latest checkpoint, errored ones restart, and the restored searcher keeps its Optuna state.
MLflow runs are found again by tag and logging skips what is already there.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, InstanceOf, ValidationInfo, field_validator

from drugprot.config import RunConfig, build_config
from drugprot.environment import quiet_defaults
from drugprot.errors import DrugprotError
from drugprot.polling import poll
from drugprot.tuning.space import OPTUNA_TRIAL_KEY, SearchSpace, parse_space

STUDY_FILE = "drugprot-study.json"
BEST_CONFIG = "best_config.yaml"
DEFAULT_STORAGE = "runs/tune"


class StudyError(DrugprotError):
    """A study cannot start or resume; the message says why and what to do."""


class Resources(BaseModel):
    """Per-trial resources; fractional GPUs share a card (0.5 -> two trials per GPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = 1.0
    gpus: float = 0.0

    @field_validator("cpus")
    @classmethod
    def _some_cpu(cls, value: float) -> float:
        if not value > 0:
            raise StudyError(f"--cpus-per-trial must be > 0, got {value:g}")
        return value

    @field_validator("gpus")
    @classmethod
    def _whole_gpus_above_one(cls, value: float) -> float:
        if value < 0:
            raise StudyError(f"--gpus-per-trial must be >= 0, got {value:g}")
        if value > 1 and value != int(value):
            raise StudyError(f"--gpus-per-trial above 1 must be a whole number, got {value:g}")
        return value

    def ray(self) -> dict[str, float]:
        return {"cpu": self.cpus, "gpu": self.gpus}


class StudySearch(BaseModel):
    """What a study searches (as Ray's ``TuneConfig``): the base run config, the search space (loaded against that
    config: :func:`~drugprot.tuning.space.load_space`), how many trials, and how many at once at most. A resumed
    study takes all of it from its own ``drugprot-study.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: InstanceOf[RunConfig]
    space: InstanceOf[SearchSpace]
    num_samples: int = 8
    max_concurrent: int | None = None

    @field_validator("num_samples", "max_concurrent")
    @classmethod
    def _some(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _at_least(value, 1, "--" + info.field_name.replace("_", "-"))


def _at_least(value: int | None, low: int, option: str) -> int | None:
    if value is not None and value < low:
        raise StudyError(f"{option} must be >= {low}, got {value}")
    return value


class StudyRuntime(BaseModel):
    """How a study runs (as Ray's ``RunConfig``): its name, where its state, MLflow runs and Optuna study live, the
    Ray cluster and each trial's resources, and whether it resumes or only checks (``dry_run`` N: print N proposals).

    ``storage``: folder or ``s3://…`` (default ``runs/tune``); ``tracking_uri``: MLflow (default ``sqlite:///mlflow.db``);
    ``optuna_storage``: the Optuna study's database (default :func:`default_optuna_storage`); ``address``: None starts
    a local Ray runtime (or reuses one initialised in this process), else ``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``; ``connect_timeout``: the wait for the tracking server and the cluster (default
    ``DRUGPROT_CONNECT_TIMEOUT`` or 15 s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    storage: str = DEFAULT_STORAGE
    tracking_uri: str | None = None
    optuna_storage: str | None = None
    address: str | None = None
    resources: Resources = Resources()
    connect_timeout: float | None = None
    resume: bool = False
    dry_run: int | None = None

    @field_validator("storage", mode="before")
    @classmethod
    def _path_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, os.PathLike) else (value or DEFAULT_STORAGE)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and _split_address(value) is None:
            raise StudyError(f"--address {value!r}: expected auto, HOST:PORT or ray://HOST:PORT")
        return value

    @field_validator("dry_run")
    @classmethod
    def _count(cls, value: int | None) -> int | None:
        return _at_least(value, 0, "--dry-run N: N")

    @property
    def timeout(self) -> float:
        if self.connect_timeout is not None:
            return self.connect_timeout
        return float(os.environ.get("DRUGPROT_CONNECT_TIMEOUT", "15"))


@dataclass
class StudyResult:
    name: str
    path: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    complete: bool
    trials: list = field(default_factory=list)  # TrialRecord, best first
    best_config: Path | None = None
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)  # drugprot.tuning.cost.study_cost
    optuna_storage: str = ""

    @property
    def best(self):
        return next((t for t in self.trials if t.best_dev_f1_a is not None), None)

    @property
    def link(self) -> str:
        from drugprot.mlflow_store import run_link

        best = self.best
        return run_link(self.tracking_uri, self.experiment_id, best.run_id if best else self.parent_run_id)

    @property
    def ui_command(self) -> str:
        from drugprot.mlflow_store import ui_command

        return ui_command(self.tracking_uri)


# --- names and storage ------------------------------------------------------------------------------------------------

def default_name(space_path: str | os.PathLike) -> str:
    return f"{Path(space_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise StudyError(f"--name {name!r}: use letters, digits, '-', '_' and '.' (it names a folder and an experiment)")
    return name


def _is_remote(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def resolve_storage(storage: str | os.PathLike | None) -> str:
    storage = str(storage or DEFAULT_STORAGE)
    if _is_remote(storage):
        return storage.rstrip("/")
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    return str(Path(storage).expanduser().resolve())


def _read_text(path: str) -> str | None:
    if not _is_remote(path):
        file = Path(path)
        return file.read_text(encoding="utf-8") if file.is_file() else None
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(inner) as stream:
        return stream.read().decode("utf-8")


def _write_text(path: str, text: str) -> None:
    if not _is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
        return
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as stream:
        stream.write(text.encode("utf-8"))


# --- Ray ------------------------------------------------------------------------------------------------------------

def _probe(host: str, port: int, deadline: float) -> str | None:
    """None when something accepts TCP connections on host:port before the deadline, else the last error."""
    reason = "no attempt"

    def connect() -> bool | None:
        nonlocal reason
        try:
            with socket.create_connection((host, port), timeout=max(0.2, min(2.0, deadline - time.monotonic()))):
                return True
        except OSError as error:
            reason = error.strerror or type(error).__name__
            return None

    return None if poll(connect, timeout=deadline - time.monotonic()) else reason


def _split_address(address: str) -> tuple[str, int] | None:
    bare = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def connect_ray(address: str | None, *, timeout: float = 15.0, num_cpus: int | None = None) -> bool:
    """Start a local Ray runtime (``address`` None) or join a cluster; True when this call started/joined Ray.

    An initialised Ray (a notebook, a test) is reused as it is. A cluster address is probed with TCP for at most
    ``timeout`` seconds before ``ray.init`` so that a wrong address is a quick, clear error instead of a long hang.
    """
    import ray

    if ray.is_initialized():
        if address is not None:
            raise StudyError(f"--address {address}: Ray is already initialised in this process; leave the address out "
                             f"to use that runtime, or call ray.shutdown() first")
        return False
    quiet_defaults()
    common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    if address is None:
        from drugprot.local_ray import start_local_ray

        cpus = num_cpus or int(os.environ.get("DRUGPROT_RAY_NUM_CPUS", "0")) or None
        start_local_ray(num_cpus=cpus, object_store_mb=256, logging_level=logging.WARNING)
        return True
    from drugprot.local_ray import keep_loopback_address

    keep_loopback_address(os.environ.get("RAY_ADDRESS") if address == "auto" else address)
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            target = canonicalize_bootstrap_address_or_die("auto")
        except Exception as error:  # noqa: BLE001 - Ray phrases "no cluster" as ConnectionError or ValueError
            raise StudyError(f"--address auto: no running Ray cluster found on this machine ({error}); start one "
                             f"with `ray start --head` or pass --address HOST:PORT") from None
    hostport = _split_address(target)
    if hostport is None:
        raise StudyError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    reason = _probe(*hostport, time.monotonic() + timeout)
    if reason is not None:
        raise StudyError(f"--address {address}: no Ray cluster answers at {hostport[0]}:{hostport[1]} ({reason}) "
                         f"after {timeout:.0f} s; check the address, or start the head with "
                         f"`ray start --head --port={hostport[1]}`")
    try:
        ray.init(address=address if address != "auto" else target, **common)
    except Exception as error:  # noqa: BLE001
        hint = ""
        if "auth" in str(error).lower() or "token" in str(error).lower():
            hint = "; Ray 2.60 needs the same RAY_AUTH_MODE (and token) in the cluster and in this shell"
        raise StudyError(f"--address {address}: cannot join the Ray cluster ({type(error).__name__}: "
                         f"{str(error)[:300]}){hint}") from None
    return True


def _check_resources(resources: Resources, *, local: bool, say: Callable[[str], None]) -> None:
    import ray

    total = ray.cluster_resources()
    missing = []
    if resources.cpus > total.get("CPU", 0):
        missing.append(f"{resources.cpus:g} CPU per trial but the cluster has {total.get('CPU', 0):g}")
    if resources.gpus > total.get("GPU", 0):
        missing.append(f"{resources.gpus:g} GPU per trial but the cluster has {total.get('GPU', 0):g}")
    if missing:
        message = "; ".join(missing)
        if local:
            raise StudyError(f"not enough resources: {message} (lower --cpus-per-trial / --gpus-per-trial)")
        say(f"warning: {message}; trials wait until the cluster grows (autoscaler) or forever")


def concurrency(resources: Resources, *, max_concurrent: int | None, num_samples: int) -> int:
    """How many trials the connected cluster can run at once (at least 1): its CPUs and GPUs divided by each
    trial's, capped by ``max_concurrent`` and the number of trials."""
    import ray

    total = ray.cluster_resources()
    fits = [int(total.get("CPU", 0) / resources.cpus + 1e-9)]
    if resources.gpus > 0:
        fits.append(int(total.get("GPU", 0) / resources.gpus + 1e-9))
    return max(1, min(fits + [max_concurrent or num_samples, num_samples]))


def trial_name(trial) -> str:
    return trial.trial_id


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# --- the study --------------------------------------------------------------------------------------------------------

def tune_study(search: StudySearch | None, runtime: StudyRuntime, *,
               say: Callable[[str], None] | None = None) -> StudyResult | StudyPlan:
    """Run (or resume) a study: ``search`` says what is searched, ``runtime`` how and where it runs; returns its
    MLflow records and outputs.

    With ``runtime.resume`` the search comes from the study's ``drugprot-study.json`` (pass None). With
    ``runtime.dry_run`` N, everything is checked (storage written to, tracking server and Optuna storage reached,
    cluster joined) and a :class:`StudyPlan` with the first N proposed configurations is returned instead of training.
    """
    from drugprot import mlflow_store, tracking

    say = say or (lambda message: print(message, flush=True))
    name = runtime.name
    storage = resolve_storage(runtime.storage)
    study_path = f"{storage}/{name}"
    study_file = f"{study_path}/{STUDY_FILE}"

    from ray import tune

    if runtime.resume:
        text = _read_text(study_file)
        if text is None or not tune.Tuner.can_restore(study_path):
            raise StudyError(f"--resume: no study {name!r} to resume in {storage} ({STUDY_FILE} or the Tune state is "
                             f"missing){_existing(storage)}")
        meta = json.loads(text)
        if search is not None:
            say("note: --resume keeps the study's own config and space; --config/--space/--set are ignored")
        config = build_config(meta["config"], f"{study_file}: config")
        search = StudySearch(config=config, space=parse_space(meta["space"], meta["space_source"], config),
                             num_samples=meta["num_samples"], max_concurrent=meta["max_concurrent"])
        if runtime.tracking_uri is not None and \
                mlflow_store.normalize_tracking_uri(runtime.tracking_uri) != meta["tracking_uri"]:
            say(f"note: --resume logs to the study's tracking URI {meta['tracking_uri']}, not {runtime.tracking_uri}")
        if runtime.optuna_storage is not None and runtime.optuna_storage != meta["optuna_storage"]:
            say(f"note: --resume keeps the study's Optuna storage {mask_url(meta['optuna_storage'])}")
        own = {"resources": Resources(**meta["resources"]), "tracking_uri": meta["tracking_uri"],
               "optuna_storage": meta["optuna_storage"]}
    else:
        if search is None:
            raise StudyError("a new study needs --config and --space")
        if tune.Tuner.can_restore(study_path):
            raise StudyError(f"study {name!r} already exists in {storage}; pass --resume to continue it or choose "
                             f"another --name")
        own = {"optuna_storage": runtime.optuna_storage or default_optuna_storage(storage, name)}
        meta = {}
    runtime = runtime.model_copy(update={**own, "storage": storage})
    space = search.space
    base = space.apply(search.config, {}, source="config with the space's fixed values")
    if base.data.final:
        raise StudyError("data.final: a study chooses on the development documents, which a final run trains on "
                         "(it has no dev score); tune without it, then `drugprot ensemble --study NAME --reseed K --final`")
    max_t = space.max_t(base)

    if runtime.dry_run is not None and not runtime.resume:
        check_storage_writable(study_path)
    runtime = runtime.model_copy(update={"tracking_uri": mlflow_store.check_tracking_uri(runtime.tracking_uri,
                                                                                     timeout=runtime.timeout)})
    tracker = tracking.StudyTracker(runtime.tracking_uri, name)
    found = tracker.find_study()
    if not runtime.resume and found and found[1]:
        raise StudyError(f"study {name!r} already exists in {runtime.tracking_uri} (experiment {found[0]}); pass "
                         f"--resume to continue it or choose another --name")
    check_optuna_storage(runtime.optuna_storage, name, resume=runtime.resume, create=runtime.dry_run is None)

    started = connect_ray(runtime.address, timeout=runtime.timeout)
    try:
        _check_resources(runtime.resources, local=runtime.address is None, say=say)
        at_once = concurrency(runtime.resources, max_concurrent=search.max_concurrent, num_samples=search.num_samples)
        study = _Study(search=search, runtime=runtime, base=base, path=study_path, tracker=tracker, max_t=max_t,
                       concurrent=at_once)
        if runtime.dry_run is not None:
            return plan(study)
        experiment_id, parent_run_id = tracker.open_study(params=_parent_params(study), tags={
            **tracking.versions(), tracking.TAG_SPACE: space.source, tracking.TAG_STORAGE: study_path,
            tracking.TAG_OPTUNA_STORAGE: mask_url(runtime.optuna_storage)}, resume=runtime.resume)
        if not runtime.resume:
            meta = {"name": name, "config": base.dump(), "space": space.raw, "space_source": space.source,
                    "num_samples": search.num_samples, "max_concurrent": search.max_concurrent,
                    "resources": runtime.resources.model_dump(), "tracking_uri": runtime.tracking_uri,
                    "optuna_storage": runtime.optuna_storage, "experiment_id": experiment_id,
                    "parent_run_id": parent_run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _write_text(study_file, json.dumps(meta, indent=1))
            with tempfile.TemporaryDirectory(prefix="drugprot-study-") as scratch:
                (Path(scratch) / "space.yaml").write_text(space.to_yaml())
                (Path(scratch) / "config.yaml").write_text(yaml.safe_dump(base.dump(), sort_keys=False))
                tracker.client.log_artifact(parent_run_id, str(Path(scratch) / "space.yaml"))
                tracker.client.log_artifact(parent_run_id, str(Path(scratch) / "config.yaml"))
        resources = runtime.resources
        say(f"study {name}: {search.num_samples} trials of {space.source} over "
            f"{', '.join(p.name for p in space.searched)}; {resources.cpus:g} CPU + {resources.gpus:g} GPU per trial, "
            f"{at_once} at once; storage {study_path}; tracking {runtime.tracking_uri} (experiment {experiment_id}); "
            f"Optuna {mask_url(runtime.optuna_storage)}")
        clock = time.monotonic()
        grid = _run(tune, study)
        complete = grid.num_terminated + grid.num_errors >= search.num_samples
        return _close(grid, study, complete=complete, wall_s=time.monotonic() - clock, say=say)
    finally:
        if started:
            import ray

            ray.shutdown()


@dataclass(frozen=True)
class _Study:
    """A study as it runs: its options (a resumed study's own; the runtime's storage, tracking URI and Optuna
    storage resolved), the base config with the space's fixed values, its folder, its MLflow tracker, ASHA's budget
    in evaluations and how many trials run at once."""

    search: StudySearch
    runtime: StudyRuntime
    base: RunConfig
    path: str
    tracker: Any
    max_t: int
    concurrent: int

    @property
    def space(self) -> SearchSpace:
        return self.search.space

    @property
    def name(self) -> str:
        return self.runtime.name


# --- checks and the dry run -------------------------------------------------------------------------------------------

OPTUNA_DB = "optuna.db"


@dataclass
class StudyPlan:
    """What ``drugprot tune --dry-run`` found: everything checked, nothing trained."""

    name: str
    path: str
    tracking_uri: str
    optuna_storage: str
    num_samples: int
    resources: Resources
    concurrent: int
    max_t: int
    constant_liar: bool
    resume: bool
    metric: str = ""  # what ASHA ranks trials by
    epochs_per_eval: float = 0.0
    rungs: list[float] = field(default_factory=list)  # evaluations at which ASHA may cut a trial
    params: dict[str, str] = field(default_factory=dict)  # each parameter's distribution, conditions included
    configurations: list[dict[str, Any]] = field(default_factory=list)


def plan(study: _Study) -> StudyPlan:
    """The dry run's report of a checked study."""
    space, base, runtime = study.space, study.base, study.runtime
    return StudyPlan(name=study.name, path=study.path, tracking_uri=runtime.tracking_uri,
                     optuna_storage=mask_url(runtime.optuna_storage), num_samples=study.search.num_samples,
                     resources=runtime.resources, concurrent=study.concurrent, max_t=study.max_t,
                     constant_liar=space.sampler.liar(study.concurrent), resume=runtime.resume,
                     metric=space.scheduler.metric, epochs_per_eval=base.train.eval_every, rungs=space.rungs(base),
                     params={p.name: p.describe() + _condition_in(p, space, base) for p in space.params},
                     configurations=proposals(space, base, runtime.dry_run, concurrent=study.concurrent))


def _condition_in(param, space: SearchSpace, base: RunConfig) -> str:
    """For a condition on a key the space leaves to the config: whether the config meets it."""
    names = {p.name for p in space.params}
    notes = []
    for key, allowed in param.when:
        if key not in names:
            value = base.dump()
            for part in key.split("."):
                value = value[part]
            notes.append(f"the config's {key} is {value}: " + ("always sampled" if value in allowed else "never sampled"))
    return f" ({'; '.join(notes)})" if notes else ""


def default_optuna_storage(storage: str, name: str) -> str:
    """The Optuna study's SQLite file: in the study folder for local storage; next to the working folder for remote
    storage (SQLite cannot live on S3; pass --optuna-storage postgresql://… to share it)."""
    if _is_remote(storage):
        return f"sqlite:///{Path.cwd() / f'{name}-{OPTUNA_DB}'}"
    return f"sqlite:///{Path(storage) / name / OPTUNA_DB}"


def mask_url(url: str) -> str:
    """``url`` without its password (for logs, MLflow tags and summaries)."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail.split("/", 1)[0]:
        credentials, host = tail.split("@", 1)
        if ":" in credentials:
            return f"{head}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


def check_optuna_storage(url: str, name: str, *, resume: bool, create: bool) -> None:
    """The Optuna storage answers and holds the study exactly when resuming. ``create`` False only reads (dry run)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise StudyError(f"--optuna-storage {url}: cannot create the SQLite file there "
                             f"({existing} is not a folder)")
        if not folder.is_dir():
            if not create:
                return  # a new local study: the folder (and the file) appear when it starts
            folder.mkdir(parents=True)
    try:
        names = optuna.get_all_study_names(storage=url)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy phrases each database's failure its own way
        raise StudyError(f"--optuna-storage {mask_url(url)}: cannot open the Optuna storage ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]})") from None
    if not resume and name in names:
        raise StudyError(f"study {name!r} already exists in the Optuna storage {mask_url(url)}; pass --resume to "
                         f"continue it or choose another --name")


def check_storage_writable(study_path: str) -> None:
    """Write and remove a probe file in the study folder; folders the probe had to create are removed again."""
    probe = f"{study_path}/.drugprot-write-probe"
    try:
        if not _is_remote(study_path):
            folder = Path(study_path)
            created = [p for p in (folder, *folder.parents) if not p.exists()]
            _write_text(probe, "probe")
            Path(probe).unlink()
            for path in created:  # innermost first
                path.rmdir()
            return
        import pyarrow.fs

        _write_text(probe, "probe")
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(probe)
        filesystem.delete_file(inner)
    except Exception as error:  # noqa: BLE001 - OSError locally, pyarrow's errors for S3/GCS
        raise StudyError(f"--storage {study_path.rsplit('/', 1)[0]}: cannot write there ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]})") from None


def proposals(space: SearchSpace, base: RunConfig, count: int, *, concurrent: int) -> list[dict[str, Any]]:
    """The first ``count`` configurations the study's seeded sampler proposes (asked in batches of ``concurrent``,
    as the study asks them), as the values that differ per trial: the sampled ones and the trial's seed."""
    import optuna

    study = optuna.create_study(direction="maximize", sampler=space.sampler.tpe(
        seed=space.seed, startup_trials=space.startup_trials, concurrent=concurrent))
    out = []
    for _ in range(count):
        trial = study.ask()
        values = space.suggest(trial, base.dump())
        space.apply(base, values, source=f"proposal {trial.number}")  # refused values fail here, not later
        out.append(values)
    return out


def plan_text(plan: StudyPlan) -> str:
    """What ``drugprot tune --dry-run`` prints."""
    evaluations = f"{plan.max_t} evaluations ({_epochs(plan.max_t, plan)})"
    if plan.rungs:
        cuts = ", ".join(f"{r:g} evaluations ({_epochs(r, plan)})" for r in plan.rungs)
        asha = f"ASHA ranks trials by {plan.metric} over {evaluations} and may cut them at {cuts}"
    else:
        asha = f"ASHA ranks trials by {plan.metric} over {evaluations}; its first cut would come at the end: no cut"
    lines = [f"dry run of study {plan.name}" + (" (resume)" if plan.resume else "") + ": config, space, storage, "
             "tracking and Optuna storage checked; nothing trained",
             f"storage {plan.path} (writable); tracking {plan.tracking_uri}; Optuna {plan.optuna_storage}",
             f"{plan.num_samples} trials, {plan.resources.cpus:g} CPU + {plan.resources.gpus:g} GPU each; the cluster "
             f"runs {plan.concurrent} at once (constant liar {'on' if plan.constant_liar else 'off'})", asha,
             "parameters:"]
    lines += [f"  {name}: {text}" for name, text in plan.params.items()]
    for number, values in enumerate(plan.configurations):
        lines.append(f"  proposal {number}: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(values.items())))
    return "\n".join(lines)


def _epochs(evaluations: float, plan: StudyPlan) -> str:
    return f"{evaluations * plan.epochs_per_eval:g} epochs"


def _existing(storage: str) -> str:
    if _is_remote(storage) or not Path(storage).is_dir():
        return ""
    names = sorted(p.parent.name for p in Path(storage).glob(f"*/{STUDY_FILE}"))
    return f"; studies there: {', '.join(names)}" if names else ""


def _parent_params(study: _Study) -> dict[str, Any]:
    from drugprot.tracking import flatten

    space, search, resources = study.space, study.search, study.runtime.resources
    params: dict[str, Any] = {"study.num_samples": search.num_samples, "study.max_concurrent": search.max_concurrent,
                              "study.max_t": study.max_t, "study.cpus_per_trial": resources.cpus,
                              "study.gpus_per_trial": resources.gpus}
    params.update({"space.file": space.source, "space.seed": space.seed, "space.startup_trials": space.startup_trials,
                   "space.max_failures": space.max_failures, "space.keep_checkpoints": space.keep_checkpoints,
                   "space.checkpoint_every": space.checkpoint_every or "once per epoch",
                   "space.trial_seed": "train.seed" if space.sets_seed else "numpy SeedSequence((space.seed, trial number))"})
    params.update({f"space.scheduler.{k}": v for k, v in asdict(space.scheduler).items()})
    params["space.scheduler.rungs"] = space.rungs(study.base)
    params.update({f"space.sampler.{k}": v for k, v in space.sampler.model_dump().items()})
    params.update({f"space.{p.name}": p.describe() for p in space.params})
    params.update({f"config.{k}": v for k, v in flatten(study.base.dump()).items()})
    return params


#: What Optuna optimises, as optuna-dashboard names it: a trial's best F1 on dev half A so far (its last value is the
#: trial's); TPE never sees half B.
OPTUNA_OBJECTIVE = "best_dev_f1_a"


def define_by_run(space: SearchSpace, config: dict[str, Any], trial) -> dict[str, Any]:
    """OptunaSearch's define-by-run function: the space's values for one trial, and its Optuna trial number (the
    MLflow callback links the two runs with it; no config key, so :meth:`SearchSpace.apply` ignores it)."""
    return {**space.suggest(trial, config), OPTUNA_TRIAL_KEY: trial.number}


def _run(tune, study: _Study):
    from drugprot.tuning.callbacks import MlflowStudyCallback, OptunaLink, ProgressTable
    from drugprot.tuning.trainable import FAULT_ENV, run_trial

    space, base, runtime = study.space, study.base, study.runtime
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # keep the resumable state fresh (a few ms per save here)
    # With num_to_keep set, Tune snapshots the study after each trial checkpoint (what --resume wants) and warns.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    threads = max(1, int(runtime.resources.cpus))
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.dump(), space=space, threads=threads,
                                                         fault_marker=os.environ.get(FAULT_ENV) or None,
                                                         checkpoint_every=space.checkpoint_every),
                                    runtime.resources.ray())
    if runtime.resume:
        tuner = tune.Tuner.restore(study.path, trainable=trainable, resume_unfinished=True, restart_errored=True)
        return tuner.fit()

    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The Optuna study lives in a real database (not only in Tune's pickled searcher state), so optuna-dashboard
    # and the plots read it, and a resumed searcher reconnects to it. It is created here to name its objective.
    storage = optuna.storages.RDBStorage(runtime.optuna_storage)
    with warnings.catch_warnings():  # set_metric_names is experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.create_study(study_name=study.name, storage=storage, direction="maximize",
                            load_if_exists=True).set_metric_names([OPTUNA_OBJECTIVE])
    # The space is define-by-run: a conditional parameter is asked for only in the trials where its condition holds,
    # and each trial gets its own seed.
    searcher = OptunaSearch(space=functools.partial(define_by_run, space, base.dump()), metric=OPTUNA_OBJECTIVE,
                            mode="max", study_name=study.name, storage=storage,
                            sampler=space.sampler.tpe(seed=space.seed, startup_trials=space.startup_trials,
                                                      concurrent=study.concurrent))
    scheduler = ASHAScheduler(time_attr="eval", metric=space.scheduler.metric, mode=space.scheduler.mode,
                              max_t=study.max_t, grace_period=space.grace_period(base),
                              reduction_factor=space.scheduler.reduction_factor)
    # Checkpoints are the trials' resumable states (the best model is kept apart: drugprot.tuning.trainable), kept
    # by recency. One more than the space asks for: the experiment snapshot a killed driver leaves behind may still name the
    # previous checkpoint (Tune deletes it before the next snapshot), and --resume restores from that one.
    checkpoints = tune.CheckpointConfig(num_to_keep=space.keep_checkpoints + 1)
    callbacks = [MlflowStudyCallback(study.tracker, space=space, base_config=base.dump(), max_t=study.max_t,
                                     optuna=OptunaLink(runtime.optuna_storage, study.name,
                                                       shown=mask_url(runtime.optuna_storage))),
                 ProgressTable(space=space, study=study.name, num_samples=study.search.num_samples, max_t=study.max_t)]
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=study.search.num_samples,
                                    max_concurrent_trials=study.search.max_concurrent, reuse_actors=False,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=study.name, storage_path=runtime.storage, callbacks=callbacks, verbose=0,
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            checkpoint_config=checkpoints))
    return tuner.fit()


def _close(grid, study: _Study, *, complete: bool, wall_s: float, say: Callable[[str], None]) -> StudyResult:
    """Reconcile trial runs with Tune's results, log the study's cost, draw the plots from the Optuna study, write
    the trials table and the best config."""
    from drugprot import tracking
    from drugprot.tuning.cost import study_cost, trial_cost
    from drugprot.tuning.plots import load_optuna_study, write_plots

    tracker, name, max_t, runtime = study.tracker, study.name, study.max_t, study.runtime
    known: set[str] = set()
    last_results: dict[str, dict] = {}
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        if not trial_id:
            continue
        known.add(trial_id)
        last_results[trial_id] = metrics
        if complete:
            _reconcile(tracker, result, trial_id, max_t=max_t)

    notes: list[str] = []
    records = tracking.study_trials(name, tracker.tracking_uri)
    if complete:
        for record in records:
            if record.trial_id not in known:
                tracker.set_tags(record.run_id, {tracking.TAG_STATE: "abandoned"})
                tracker.client.delete_run(record.run_id)
                notes.append(f"trial {record.trial_id}: started before an interruption but unknown to the restored "
                             f"Tune state; its run {record.run_id} was deleted (restorable in MLflow)")
        records = [r for r in records if r.trial_id in known]

    cost = study_cost([trial_cost(last_results.get(r.trial_id, {}), state=r.state) for r in records], max_t=max_t,
                      device="GPU" if runtime.resources.gpus > 0 else "CPU", wall_s=wall_s)
    tracker.log_totals(tracker.parent_run_id, {k: v for k, v in cost.items() if isinstance(v, (int, float))},
                       step=len(records))
    plots: list[Path] = []
    best_config = None
    best = next((r for r in records if r.best_dev_f1_a is not None), None)
    with tempfile.TemporaryDirectory(prefix="drugprot-plots-") as scratch:
        artifacts: dict[str, Path] = {}
        table = Path(scratch) / tracking.TRIALS_ARTIFACT
        table.write_text(tracking.trials_csv(records))
        artifacts[tracking.TRIALS_ARTIFACT] = table
        try:
            files, plot_notes = write_plots(load_optuna_study(name, runtime.optuna_storage, close_running=complete),
                                            Path(scratch) / "plots")
        except Exception as error:  # noqa: BLE001 - plots never fail a finished study
            files, plot_notes = [], [f"plots not drawn ({type(error).__name__}: {error})"]
        notes.extend(plot_notes)
        for file in files:
            artifacts[f"{tracking.PLOTS_ARTIFACT}/{file.name}"] = file
        if best is not None and best.config:
            text = yaml.safe_dump(best.config, sort_keys=False)
            best_file = Path(scratch) / BEST_CONFIG
            best_file.write_text(text)
            artifacts[BEST_CONFIG] = best_file
            remote = _is_remote(runtime.storage)
            local = Path.cwd() / f"{name}-{BEST_CONFIG}" if remote else Path(study.path) / BEST_CONFIG
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(text)
            best_config = local
        tracker.finish_study(state="finished" if complete else "interrupted", best=best, artifacts=artifacts,
                             trials=len(records))
        if not _is_remote(runtime.storage):
            plot_dir = Path(study.path) / "plots"
            plot_dir.mkdir(parents=True, exist_ok=True)
            for file in files:
                (plot_dir / file.name).write_bytes(file.read_bytes())
                plots.append(plot_dir / file.name)
            (Path(study.path) / tracking.TRIALS_ARTIFACT).write_text(table.read_text())
    for note in notes:
        say(f"note: {note}")
    return StudyResult(name=name, path=study.path, tracking_uri=tracker.tracking_uri,
                       experiment_id=tracker.experiment_id, parent_run_id=tracker.parent_run_id, complete=complete,
                       trials=records, best_config=best_config, plots=plots, notes=notes, cost=cost,
                       optuna_storage=runtime.optuna_storage)


def _reconcile(tracker, result, trial_id: str, *, max_t: int) -> None:
    """Close a trial's run that the callback could not close (the driver was killed while the trial ended):
    the state from Tune's verdict and the evaluations MLflow holds, the artifacts from its best model."""
    from drugprot import tracking
    from drugprot.tuning.callbacks import trial_state
    from drugprot.tuning.trainable import best_model_store

    run_id = tracker.trial_run(trial_id)
    if run_id is None or tracker.client.get_run(run_id).data.tags.get(tracking.TAG_STATE, "running") != "running":
        return
    from drugprot.tuning.cost import trial_cost

    logged = [m.step for m in tracker.client.get_metric_history(run_id, "dev_f1_a")]
    last_eval = int((result.metrics or {}).get("eval") or max(logged, default=0))
    state = trial_state(error=result.error is not None, stopped_by_scheduler=None, last_eval=last_eval, max_t=max_t)
    tracker.log_totals(run_id, trial_cost({**(result.metrics or {}), "eval": last_eval}, state=state).metrics(),
                       step=last_eval)
    with tempfile.TemporaryDirectory(prefix="drugprot-best-") as folder:
        found = best_model_store(result.filesystem, result.path).download(Path(folder))
        tracker.finish_trial(run_id, state=state, run_folder=Path(folder) if found else None)


def _trial_id_from_path(path: str | None) -> str | None:
    leaf = str(path or "").rstrip("/").rsplit("/", 1)[-1]
    return leaf[len("trial_"):] if leaf.startswith("trial_") else None


def summary(result: StudyResult) -> str:
    """What ``drugprot tune`` prints at the end."""
    lines = []
    finished = sum(1 for t in result.trials if t.state == "finished")
    stopped = sum(1 for t in result.trials if t.state == "early-stopped")
    errored = sum(1 for t in result.trials if t.state == "errored")
    lines.append(f"study {result.name}: {len(result.trials)} trials ({finished} finished, {stopped} early-stopped, "
                 f"{errored} errored)" + ("" if result.complete else " - INTERRUPTED"))
    best = result.best
    if best is not None:
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(best.params.items()))
        lines.append(f"best trial {best.trial_id}: dev F1 on half A {best.best_dev_f1_a:.4f} ({best.state}, seed {best.seed}); {params}")
        if result.best_config is not None:
            lines.append(f"best config: {result.best_config}")
    else:
        lines.append("no trial reported a dev F1")
    cost = result.cost
    if cost:
        lines.append(f"cost: {cost['device_hours']:.4f} {cost['device']} device-hours over {cost['evaluations']} "
                     f"evaluations ({cost['trial_wall_s']:.0f} s of trial wall time, study wall {cost['study_wall_s']:.0f} s); "
                     f"ASHA stopped {cost['asha_stopped']} trials and saved {100 * cost['asha_saved_share']:.1f}% "
                     f"against running every trial to its last evaluation")
    lines.append(f"MLflow run: {result.link}")
    if result.optuna_storage:
        lines.append(f"Optuna study: optuna-dashboard {mask_url(result.optuna_storage)}")
    if result.tracking_uri.startswith("sqlite:"):
        lines.append(f"browse the study: {result.ui_command}  (then open the link above)")
    if not result.complete:
        lines.append(f"resume with: drugprot tune --resume --name {result.name} --storage {result.path.rsplit('/', 1)[0]}")
    return "\n".join(lines)


def summary_json(result: StudyResult) -> dict[str, Any]:
    """What ``drugprot tune --json`` prints: the summary as one JSON object."""
    best = result.best
    return {"study": result.name, "complete": result.complete, "storage": result.path,
            "tracking_uri": result.tracking_uri, "experiment_id": result.experiment_id,
            "parent_run_id": result.parent_run_id, "link": result.link,
            "optuna_storage": mask_url(result.optuna_storage) if result.optuna_storage else None,
            "best": None if best is None else {"trial_id": best.trial_id, "run_id": best.run_id,
                                               "dev_f1_a": best.best_dev_f1_a, "params": best.params},
            "best_config": str(result.best_config) if result.best_config else None,
            "trials": [{"trial_id": t.trial_id, "run_id": t.run_id, "state": t.state, "best_dev_f1_a": t.best_dev_f1_a,
                        "params": t.params} for t in result.trials],
            "cost": result.cost, "plots": [str(p) for p in result.plots], "notes": result.notes}


def plan_json(plan: StudyPlan) -> dict[str, Any]:
    """What ``drugprot tune --dry-run --json`` prints."""
    return {**asdict(plan), "resources": plan.resources.model_dump()}


def _short(value: Any) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.4g}"
    return str(value)
