"""A cluster study rehearsed with faults: four Ray nodes, S3 trial storage, MLflow on PostgreSQL; nothing may be lost.

Set-up, all real and on 127.0.0.1: ``infra/local-cluster.sh`` (a head that takes no trials and three workers of one
CPU, each node with its own memory and object-store budget), an S3 API (``moto_server``; endpoint and credentials
reach Ray, pyarrow and boto3 through the standard ``AWS_*`` variables), ``mlflow server`` on PostgreSQL (the test
fixtures' servers). The study: the smoke config and space at ``--epochs`` epochs (default 2: 4 evaluations),
``--trials`` trials (default 12), ASHA, ``--max-concurrent`` (default 3).

Faults while trials run:
1. SIGKILL the raylet of the worker node that runs a trial past its evaluation ``--victim-eval`` (default 3, beyond
   the smoke space's last ASHA rung, so ASHA will not stop it): its trials must be retried from their last checkpoint
   on the other nodes. The head declares no CPU (``--head-cpus 0``), so every trial runs on a worker: the first
   trial to reach each rung always continues under ASHA, so some trial on a worker is sure to pass the victim
   evaluation. (With trials on the head too, the survivors could all run there and no fault came.)
2. Once that trial has been restarted, ``--kill-driver-after`` trials have ended (or every trial has started) and
   one is running, SIGKILL the driver, then ``drugprot tune --resume --name STUDY`` and let it finish.

Checks at the end: every trial finished or early-stopped (none errored); every evaluation that Ray recorded for a
trial (its ``result.json`` in the S3 storage) is in MLflow, with no duplicate runs and no duplicate steps;
restarts are tagged on the trial runs; every trial's best model comes back from S3 and verifies; the Optuna study
(SQLite next to the driver) survived the driver kill and holds every trial; ``drugprot ensemble --study`` builds
and registers an ensemble.

Baseline: the same study without faults, on the same cluster, in the same invocation (``--skip-baseline`` leaves it
out). Prints progress, then one JSON line with ``trials``, ``retries``, ``lost_metrics``, ``duplicate_runs``,
``duplicate_steps``, ``errored``, ``wall_s``, ``wall_s_without_faults``, the ratio of the two and the other checks;
exits 1 when a check fails.

    python bench/tune_chaos.py                                 # the issue's rehearsal (about 20 min on 2 cores)
    python bench/tune_chaos.py --trials 6 --skip-baseline      # the CI-sized one (tests/test_tune_chaos.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO / "platform", REPO / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from drugprot import mlflow_store, tracking  # noqa: E402
from drugprot.polling import poll  # noqa: E402
from fixtures_mlflow import mlflow_server_process  # noqa: E402
from fixtures_postgres import postgres_server  # noqa: E402

BUCKET = "drugprot-chaos"
PYTHON = sys.executable


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_block(size: int) -> int:
    """A first port such that ``size`` consecutive ports are free (local-cluster.sh derives ports from it)."""
    for _ in range(50):
        first = free_port()
        if first + size >= 65535:
            continue
        ok = True
        for port in range(first, first + size):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return first
    raise RuntimeError("no block of free ports found")


@contextlib.contextmanager
def moto_s3(root: Path):
    """An S3 API on 127.0.0.1 (moto_server) with one bucket; yields the AWS_* environment that reaches it."""
    port = free_port()
    out = open(root / "moto.log", "wb")
    process = subprocess.Popen([str(Path(PYTHON).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "chaos",
           "AWS_SECRET_ACCESS_KEY": "chaos", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import boto3

        def bucket_made() -> bool | None:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             aws_access_key_id="chaos", aws_secret_access_key="chaos").create_bucket(Bucket=BUCKET)
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                return False if process.poll() is not None else None  # False: it exited

        if not poll(bucket_made, timeout=60, interval=0.5):
            raise RuntimeError(f"moto_server did not come up: {(root / 'moto.log').read_text()[-2000:]}")
        yield env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        out.close()


class Cluster:
    """infra/local-cluster.sh: a head and workers, each `ray start` in a session of its own (recorded by the script)."""

    def __init__(self, env: dict[str, str], *, workers: int, cpus: int, head_cpus: int, memory: int,
                 object_store: int):
        self.env = env
        self.port = int(env["DRUGPROT_RAY_PORT"])
        self.address = f"127.0.0.1:{self.port}"
        self.options = ["--workers", str(workers), "--cpus-per-node", str(cpus), "--head-cpus", str(head_cpus),
                        "--memory-per-node", str(memory), "--object-store-memory", str(object_store)]

    def __enter__(self) -> Cluster:
        for attempt in (1, 2, 3):  # `ray start` gives a node 30 s to register: a busy machine can miss that
            up = subprocess.run(["bash", str(REPO / "infra" / "local-cluster.sh"), "up", *self.options], env=self.env,
                                capture_output=True, text=True, timeout=300)
            if up.returncode == 0:
                return self
            self.__exit__()
            log(f"local-cluster.sh up failed (attempt {attempt}): {up.stderr.strip().splitlines()[-1:]}")
        raise RuntimeError(f"local-cluster.sh up failed:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}")

    def __exit__(self, *exc) -> None:
        subprocess.run(["bash", str(REPO / "infra" / "local-cluster.sh"), "down"], env=self.env, capture_output=True,
                       text=True, timeout=120)

    def sessions(self) -> dict[int, str]:
        """``{session id: role}`` as the script recorded them (head, worker-1, ...)."""
        state = Path(self.env["RAY_TMPDIR"]) / f"drugprot-cluster-{self.port}.sessions"
        return {int(line.split()[0]): line.split()[1] for line in state.read_text().splitlines() if line.strip()}

    def raylet_of(self, role: str) -> int:
        sid = next(s for s, r in self.sessions().items() if r == role)
        for pid in session_members(sid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
        raise RuntimeError(f"no raylet in the session of {role}")


def session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def session_members(sid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and session_of(int(p.name)) == sid]


def tune_command(name: str, *, storage: str, address: str, tracking_uri: str, trials: int, max_concurrent: int,
                 epochs: float, resume: bool = False) -> list[str]:
    common = ["--name", name, "--storage", storage, "--address", address, "--json"]
    if resume:
        return [PYTHON, "-m", "drugprot", "tune", "--resume", *common]
    return [PYTHON, "-m", "drugprot", "tune", "--config", str(REPO / "configs" / "smoke.yaml"), "--space",
            str(REPO / "search_spaces" / "smoke.yaml"), "--set", f"train.epochs={epochs:g}", "--num-samples",
            str(trials), "--max-concurrent", str(max_concurrent), "--tracking-uri", tracking_uri, *common]


def run_to_end(command: list[str], *, env: dict[str, str], cwd: Path, log_file: Path, timeout: float) -> dict:
    with open(log_file, "ab") as err:
        done = subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=err, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:6])} exited {done.returncode}; see {log_file}")
    return json.loads(done.stdout)


def trial_runs(client, name: str, *, deleted: bool = False) -> list:
    from mlflow.entities import ViewType

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], f"tags.`{tracking.TAG_KIND}` = '{tracking.KIND_TRIAL}'",
                              run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY, max_results=1000)
    return list(runs)


def chaos_study(name: str, *, cluster: Cluster, env: dict, cwd: Path, storage: str, tracking_uri: str, trials: int,
                max_concurrent: int, epochs: float, kill_driver_after: int, victim_eval: int, timeout: float) -> dict:
    """Run the study with both faults; returns the resumed run's JSON summary and what was done."""
    client = mlflow_store.client(tracking_uri)
    command = tune_command(name, storage=storage, address=cluster.address, tracking_uri=tracking_uri, trials=trials,
                           max_concurrent=max_concurrent, epochs=epochs)
    err = open(cwd / f"{name}.log", "ab")
    start = time.monotonic()
    driver = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    worker_sessions = {sid: role for sid, role in cluster.sessions().items() if role.startswith("worker")}
    killed_raylet = killed_driver = None

    def inject_due_fault() -> bool | None:
        """One look at the trials, injecting the fault that is due; True once both are in or the driver exited."""
        nonlocal killed_raylet, killed_driver
        if driver.poll() is not None:
            return True
        runs = trial_runs(client, name)
        if killed_raylet is None:
            for run in runs:
                pid = int(run.data.tags.get(tracking.TAG_PID, "0") or 0)
                role = worker_sessions.get(session_of(pid)) if pid else None
                steps = [m.step for m in client.get_metric_history(run.info.run_id, "dev_f1_a")]
                running = run.data.tags.get(tracking.TAG_STATE) == "running"
                # past it, not at it: a poll can miss the moment a fast trial reports exactly that evaluation
                if role and running and max(steps, default=0) >= victim_eval:
                    raylet = cluster.raylet_of(role)
                    os.kill(raylet, signal.SIGKILL)
                    killed_raylet = {"node": role, "raylet_pid": raylet, "after_eval": victim_eval,
                                     "trial": run.data.tags[tracking.TAG_TRIAL_ID],
                                     "at_s": round(time.monotonic() - start, 1)}
                    log(f"fault 1: SIGKILL raylet {raylet} of {role} (its trial {killed_raylet['trial']} is past "
                        f"evaluation {victim_eval})")
                    break
        else:
            ended = [r for r in runs if r.data.tags.get(tracking.TAG_STATE) in ("finished", "early-stopped")]
            running = [r for r in runs if r.data.tags.get(tracking.TAG_STATE) == "running"
                       and client.get_metric_history(r.info.run_id, "dev_f1_a")]
            victim = next(r for r in runs if r.data.tags[tracking.TAG_TRIAL_ID] == killed_raylet["trial"])
            retried = int(victim.data.tags.get(tracking.TAG_STARTS, "1")) >= 2  # fault 1 handled first
            # once every trial has started, waiting for more to end could outlast the study
            if retried and running and (len(ended) >= kill_driver_after or len(runs) == trials):
                time.sleep(2)  # let Tune snapshot the study state once more
                os.kill(driver.pid, signal.SIGKILL)
                killed_driver = {"ended_trials": len(ended), "running_trials": len(running),
                                 "at_s": round(time.monotonic() - start, 1)}
                log(f"fault 2: SIGKILL the driver {driver.pid} ({len(ended)} trials ended, {len(running)} running)")
                return True
        return None

    try:
        poll(inject_due_fault, timeout=timeout - (time.monotonic() - start), interval=0.5)  # quiet machines end trials fast
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        err.close()
    if killed_raylet is None or killed_driver is None:
        tail = "".join((cwd / f"{name}.log").read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"the faults were not both injected (raylet: {killed_raylet}, driver: {killed_driver}); "
                           f"the driver exited {driver.returncode} after {time.monotonic() - start:.0f} s; the last "
                           f"lines of {cwd / f'{name}.log'}:\n{tail}")
    log("resuming: drugprot tune --resume")
    summary = run_to_end(tune_command(name, storage=storage, address=cluster.address, tracking_uri=tracking_uri,
                                      trials=trials, max_concurrent=max_concurrent, epochs=epochs, resume=True),
                         env=env, cwd=cwd, log_file=cwd / f"{name}.log", timeout=timeout)
    return {"summary": summary, "wall_s": time.monotonic() - start, "raylet": killed_raylet, "driver": killed_driver}


def ray_reported(storage: str, name: str) -> dict[str, set[int]]:
    """``{trial id: evaluations}`` that Ray recorded: every ``result.json`` line of every trial in the storage."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(f"{storage}/{name}")
    reported: dict[str, set[int]] = {}
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=False)):
        leaf = info.path.rsplit("/", 1)[-1]
        if info.type != pyarrow.fs.FileType.Directory or not leaf.startswith("trial_"):
            continue
        evals = reported.setdefault(leaf[len("trial_"):], set())
        result = f"{info.path}/result.json"
        if filesystem.get_file_info(result).type != pyarrow.fs.FileType.File:
            continue
        with filesystem.open_input_stream(result) as stream:
            for line in stream.read().decode().splitlines():
                record = json.loads(line) if line.strip() else {}
                if "eval" in record:
                    evals.add(int(record["eval"]))
    return reported


def fetch_best_models(storage: str, name: str, trial_ids: list[str], dest: Path) -> int:
    """Copy each trial's best model (``<trial>/best``, drugprot.tuning.trainable) from S3 and verify its manifest;
    returns how many verified."""
    import pyarrow.fs

    from drugprot.manifest import verify_manifest
    from drugprot.tuning.trainable import best_model_store

    filesystem, root = pyarrow.fs.FileSystem.from_uri(f"{storage}/{name}")
    fetched = 0
    for trial_id in trial_ids:
        local = dest / trial_id
        if not best_model_store(filesystem, f"{root}/trial_{trial_id}").download(local):
            continue
        verify_manifest(local / "model")
        fetched += 1
    return fetched


def check(name: str, *, storage: str, tracking_uri: str, summary: dict, optuna_storage: str, work: Path) -> dict:
    """Compare what Ray recorded with MLflow and the storage (see the module docstring)."""
    import optuna

    client = mlflow_store.client(tracking_uri)
    active = trial_runs(client, name)
    every = trial_runs(client, name, deleted=True)
    by_trial: dict[str, list] = {}
    for run in every:
        by_trial.setdefault(run.data.tags[tracking.TAG_TRIAL_ID], []).append(run)
    known = {t["trial_id"] for t in summary["trials"]}
    folders = ray_reported(storage, name)
    # A trial the killed driver started after its last snapshot: the restored study does not know it (its run is
    # deleted as abandoned); counted apart, not as lost.
    reported = {trial_id: evals for trial_id, evals in folders.items() if trial_id in known}
    abandoned = {trial_id: evals for trial_id, evals in folders.items() if trial_id not in known}
    lost = duplicate_steps = 0
    for run in active:
        trial_id = run.data.tags[tracking.TAG_TRIAL_ID]
        for metric in tracking.EVAL_METRICS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric) if m.step > 0]
            duplicate_steps += len(steps) - len(set(steps))
        logged = {m.step for m in client.get_metric_history(run.info.run_id, "dev_f1_a")}
        lost += len(reported.get(trial_id, set()) - logged)
    active_ids = {r.data.tags[tracking.TAG_TRIAL_ID] for r in active}
    lost += sum(len(evals) for trial_id, evals in reported.items() if trial_id not in active_ids)
    starts = {r.data.tags[tracking.TAG_TRIAL_ID]: int(r.data.tags.get(tracking.TAG_STARTS, "1")) for r in active}
    failures = {r.data.tags[tracking.TAG_TRIAL_ID]: int(r.data.tags.get(tracking.TAG_FAILURES, "0")) for r in active}
    states = [t["state"] for t in summary["trials"]]
    study = optuna.load_study(study_name=name, storage=optuna_storage)
    return {
        "trials": len(summary["trials"]),
        "retries": sum(starts.values()) - len(starts),
        "failures_tagged": sum(failures.values()),
        "starts": starts,
        "lost_metrics": lost,
        "duplicate_runs": sum(len(runs) - 1 for runs in by_trial.values()),
        "duplicate_steps": duplicate_steps,
        "errored": states.count("errored"),
        "not_ended": sum(state not in ("finished", "early-stopped", "errored") for state in states),
        "early_stopped": states.count("early-stopped"),
        "ray_trials": len(reported),
        "ray_evaluations": sum(len(e) for e in reported.values()),
        "abandoned_trials": len(abandoned),
        "abandoned_evaluations": sum(len(e) for e in abandoned.values()),
        "models_from_s3": fetch_best_models(storage, name, [t["trial_id"] for t in summary["trials"]], work / "models"),
        "optuna_trials_complete": sum(t.state.name == "COMPLETE" for t in study.trials),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--max-concurrent", type=int, default=3)
    parser.add_argument("--kill-driver-after", type=int, default=None, metavar="N",
                        help="trials that must have ended before the driver is killed (default: a third)")
    parser.add_argument("--epochs", type=float, default=2, metavar="E",
                        help="train.epochs of every trial (default 2, the smoke config's: 4 evaluations; the CI test "
                             "uses 4, so that at 6 trials the retried trial still runs when the driver is killed)")
    parser.add_argument("--victim-eval", type=int, default=3, metavar="E",
                        help="kill the raylet of a worker whose trial has reported evaluation E (default 3: past the "
                             "smoke space's last ASHA rung at 2 epochs, so the trial is retried rather than stopped; "
                             "at 4 epochs the last rung is 4)")
    parser.add_argument("--workers", type=int, default=3, help="worker nodes (default 3)")
    parser.add_argument("--cpus-per-node", type=int, default=1,
                        help="CPUs of each worker (default 1: one trial a node, so the raylet kill meets no trial "
                             "that is still starting there)")
    parser.add_argument("--head-cpus", type=int, default=0,
                        help="CPUs the head declares (default 0: every trial runs on a worker that can be killed)")
    parser.add_argument("--memory-per-node", type=int, default=3 * 1024 ** 3, metavar="BYTES")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the study without faults")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per study run (default 1800)")
    parser.add_argument("--keep", type=Path, help="keep the working folder here (logs, SQLite, models)")
    args = parser.parse_args(argv)
    kill_after = args.kill_driver_after or max(1, args.trials // 3)

    work = Path(args.keep or tempfile.mkdtemp(prefix="drugprot-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="dpc-", dir="/tmp"))  # short: Unix socket paths
    stamp = time.strftime("%H%M%S")
    result: dict = {}
    with contextlib.ExitStack() as stack:
        log(f"working folder {work}")
        s3 = stack.enter_context(moto_s3(work))
        os.environ.update(s3)  # this process reads the storage too (checks, models)
        postgres = stack.enter_context(postgres_server("mlflow"))
        tracking_uri, _ = stack.enter_context(mlflow_server_process(work / "mlflow", port=free_port(),
                                                                    backend_store_uri=postgres))
        log(f"S3 {s3['AWS_ENDPOINT_URL']}, MLflow {tracking_uri} on {postgres.split('@')[-1]}")
        # Ray token auth, as local-cluster.sh starts it by default: the script writes the token, drivers read it.
        env = {**os.environ, **s3, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_tmp / "auth_token"),
               "RAY_USAGE_STATS_ENABLED": "0",
               "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp),
               "DRUGPROT_RAY_PORT": str(free_port_block(8)), "TUNE_GLOBAL_CHECKPOINT_S": "2",
               "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])}
        env.pop("RAY_ADDRESS", None)
        storage = f"s3://{BUCKET}/tune"
        cluster = stack.enter_context(Cluster(env, workers=args.workers, cpus=args.cpus_per_node,
                                              head_cpus=args.head_cpus, memory=args.memory_per_node,
                                              object_store=200 * 1024 ** 2))
        log(f"cluster up at {cluster.address}: head ({args.head_cpus} CPU) + {args.workers} workers, "
            f"{args.cpus_per_node} CPU and {args.memory_per_node / 1024 ** 3:g} GiB each")
        baseline_wall = None
        if not args.skip_baseline:
            log(f"baseline: {args.trials} trials without faults")
            start = time.monotonic()
            run_to_end(tune_command(f"calm-{stamp}", storage=storage, address=cluster.address, tracking_uri=tracking_uri,
                                    trials=args.trials, max_concurrent=args.max_concurrent, epochs=args.epochs),
                       env=env, cwd=work, log_file=work / f"calm-{stamp}.log", timeout=args.timeout)
            baseline_wall = time.monotonic() - start
        name = f"chaos-{stamp}"
        log(f"study {name}: {args.trials} trials, {args.max_concurrent} at once, faults on")
        chaos = chaos_study(name, cluster=cluster, env=env, cwd=work, storage=storage, tracking_uri=tracking_uri,
                            trials=args.trials, max_concurrent=args.max_concurrent, epochs=args.epochs,
                            kill_driver_after=kill_after,
                            victim_eval=args.victim_eval, timeout=args.timeout)
        summary = chaos["summary"]
        result = check(name, storage=storage, tracking_uri=tracking_uri, summary=summary, work=work,
                       optuna_storage=f"sqlite:///{work / f'{name}-optuna.db'}")
        log("drugprot ensemble --study")
        ensemble = subprocess.run([PYTHON, "-m", "drugprot", "ensemble", "--study", name, "--top-k", "3",
                                   "--tracking-uri", tracking_uri, "--register", f"drugprot-{name}",
                                   "--out", str(work / "ensemble")], env=env, cwd=work, capture_output=True, text=True,
                                  timeout=900)
        (work / "ensemble.log").write_text(ensemble.stdout + ensemble.stderr)
        versions = mlflow_store.client(tracking_uri).search_model_versions(f"name = 'drugprot-{name}'") \
            if ensemble.returncode == 0 else []
        result.update({
            "ensemble_registered": ensemble.returncode == 0 and len(versions) >= 1,
            # the trial on the killed node was retried (drugprot.starts) and its failure counted (drugprot.failures)
            "restarts_tagged": result["starts"].get(chaos["raylet"]["trial"], 0) >= 2 and result["failures_tagged"] >= 1,
            "raylet_killed": chaos["raylet"], "driver_killed": chaos["driver"],
            "wall_s": round(chaos["wall_s"], 1),
            "wall_s_without_faults": None if baseline_wall is None else round(baseline_wall, 1),
            "ratio_wall_faults_vs_calm": None if baseline_wall is None else round(chaos["wall_s"] / baseline_wall, 2),
            "cost": summary.get("cost"), "study": name, "max_concurrent": args.max_concurrent,
        })
    ok = (result["lost_metrics"] == result["duplicate_runs"] == result["duplicate_steps"] == result["errored"]
          == result["not_ended"] == 0 and result["trials"] == args.trials and result["ray_trials"] == args.trials
          and result["models_from_s3"] == args.trials and result["optuna_trials_complete"] == args.trials
          and result["restarts_tagged"] and result["ensemble_registered"])
    result["ok"] = ok
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
