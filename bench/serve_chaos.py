"""Chaos benchmark for the Serve application: what clients see while replicas are killed, the champion is swapped,
the server is stopped, stalled bodies are held open, under overload, and beside big requests.

    python bench/serve_chaos.py                               # tiny model trained on the spot; every phase, 60 s each
    python bench/serve_chaos.py --model DIR --phases kill,swap --seconds 60 --clients 32
    python bench/serve_chaos.py --seconds 15 --clients 8      # the short form the slow test runs

A private Ray (``drugprot.local_ray``, 127.0.0.1 only) with Serve on 127.0.0.1, its proxy running the middlewares
``drugprot serve`` gives it (``drugprot.serving.proxy.proxy_middlewares``). Clients run in a separate process and send
real development documents of the bundled sample, one per request, for ``--seconds``. In every phase ``failed``
counts any answer that is not 200 or a 503 refusal, and any transport error (the ``sigterm`` phase says which
requests it counts); p50/p99 are over the answered (200) requests.

* ``kill``: 2 model replicas and 2 ingress replicas. A quarter into the run one model replica process is SIGKILLed;
  halfway, one ingress replica process (whether or not the model replica has been replaced by then). Reports requests by status, ``failed`` and which kill each failure followed,
  the model calls retried on another replica, the requests the proxy sent again after their ingress replica died,
  and the seconds until each deployment had its two replicas running again.
* ``swap``: a SQLite MLflow registry in the scratch folder holds two versions of the model (an ensemble folder is
  registered as it is, a model folder as a one-member ensemble); the application follows ``@champion`` as
  ``drugprot serve --follow-alias --poll-s`` does (``serving.follow.AliasFollower``, 2 model and 2 ingress replicas)
  and a quarter into the run the alias moves from version 1 to 2. Clients keep sending until the roll is done
  (at most 300 s) and then for at least a quarter of ``--seconds`` more (``seconds`` in the line: the sending
  time). Reports ``failed``, the versions that answered (``X-Model-Version``), ``rolled_s`` (alias move until the
  follower saw Serve run version 2 alone) and ``switched_s``: seconds from the alias move until the last answer
  from version 1 (from then on version 2 answered everything; null if it never did before the end).
* ``sigterm``: ``drugprot serve`` in its own process (its own Ray; 2 model and 2 ingress replicas), clients sending;
  halfway, SIGTERM to that process alone (a SIGTERM to its process group would stop its Ray's GCS first).
  Classification: a request sent before the SIGTERM was accepted unless the server refused it at admission (a 503
  with a JSON body and Retry-After: it reached an ingress replica after the drain had begun, ``refused_before``)
  or its connection was refused (nothing listened any more: the server never received it, ``unreached_before``,
  with ``unreached_before_from_s``, seconds after the SIGTERM when the first of them failed); ``failed`` counts the
  requests sent before the SIGTERM that got none of 200, a refusal or a refused connection (a connection dropped,
  a timeout, any other status), by kind in ``failed_kinds``. Requests sent after the SIGTERM may get 200 (admitted before the
  drain began), a refusal (``refused_after``), or, once the server is gone, a refused connection (``gone_after``);
  anything else sent after the SIGTERM (a connection closed as the proxy stopped) is ``dropped_after``, reported
  and not counted as failed. Also reports ``exit_s``, seconds from SIGTERM to the process's exit, and its exit
  code.
* ``stalled``: 2 model replicas behind a bearer token and ``--stalled-clients`` clients sending valid requests with
  it. A quarter into the run 200 connections each send valid headers with the token, ``Content-Length: 1000`` and
  ``{"documents": [``, then nothing; each is opened again one second after the server answers or closes it, so 200
  stay stalled or being refused until the end. Reports ``failed`` among the valid requests, their p99 before and
  under the attack, how many took over a second under it, and what the stalled connections got.
* ``overload``: one run for each of ``--overload-replicas`` model replicas (default 1 and 2) and each of
  ``--overload-clients`` clients (default 64 and 256), the application's defaults otherwise (capacity sized from
  all model replicas, the latency objective ``--max-queue-wait-s``); each client waits the ``Retry-After`` of a
  refusal before its next request (as the API asks). Per run (``runs``): accepted p50/p99, one batch time
  (``max_batch_pairs`` at the pairs/s the replica measured), the bound objective + one batch, the refusals' p99 and
  the largest saturation ``/readyz`` showed. Over all runs: refusals (503), whether each carried ``Retry-After``
  and a JSON body, their p50/p99 (also apart: refused at the proxy by ``AdmissionAtProxy``, and in the
  application), ``failed`` among the accepted ones, and ``checks``: no failed request, every refusal JSON with
  Retry-After, every run's accepted p99 within its bound, the refusals' p99 under 100 ms.
* ``headers``: 2 model replicas behind a bearer token and ``--stalled-clients`` valid clients. A quarter into the
  run 200 connections each send 30 KB of headers (under the proxy's 32 KB limit) and then nothing, opened again a
  second after the server closes them, and 10 connections try to send 16 MB of headers each. Reports the valid
  requests' p99 under the attack, the proxy process's largest memory growth, what the stalled and the oversized
  connections got, and ``checks``: no failed request, that p99 under 1 s, growth under 20 MB, 408 for the stalled
  and 431 for the oversized.
* ``big``: one model replica (default batching: calls of at most 64 pairs). ``--small-clients`` send development
  documents the whole time; a quarter into the run ``--big-clients`` start sending one request of 4,040 pairs (one
  sentence, 40 chemicals amid 101 genes, ``"interval": [-50, 50]``), which the model replica cuts into chunks that
  take turns with the small requests. Reports the small requests' p50/p99 before the first big request was sent
  (the baseline) and while big ones ran (sent after the first, answered before the last big answer), their
  ratios, the big requests answered and their p50/p99, the big request's latency alone before the load, and the
  replica's batching counters (largest model call, chunks, requests split); ``p50_ms``/``p99_ms`` are the small
  requests', ``failed`` counts small and big.

Each phase prints one JSON line (``{"phase": ...}``); the baseline for the latencies is the same run's own p50
(``stalled``: the p99 before the attack). The script exits 1 when a phase's ``checks`` are not all met, unless
``--report-only``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "platform")]

from serve_load import percentile, request_bodies, train_default_model  # noqa: E402

from drugprot.polling import poll  # noqa: E402


# ---- clients (their own process) --------------------------------------------------------------------------------
def _load(url: str, bodies: list[dict], clients: int, seconds: float, headers: dict, queue, stop=None,
          honour_retry_after: bool = False) -> None:
    """Each client sends the next body until ``seconds`` have passed (or ``stop``, an Event, is set); every
    request's outcome is recorded as
    (start on the machine's monotonic clock, latency s, status or error name, refusal shape, X-Model-Version).
    A client whose connection is refused (nothing listens: a stopped server) waits 0.1 s before the next one; with
    ``honour_retry_after``, a client refused with 503 waits the ``Retry-After`` seconds, as the API asks."""
    import httpx

    from drugprot.serving.proxy import AdmissionAtProxy

    async def main():
        outcomes = []
        deadline = time.monotonic() + seconds
        counter = iter(range(10**9))
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as http:
            async def client():
                while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
                    body = bodies[next(counter) % len(bodies)]
                    sent = time.monotonic()
                    shape = version = None
                    try:
                        response = await http.post(url, json=body)
                        status = response.status_code
                        version = response.headers.get("x-model-version")
                        if status == 503:
                            is_json = response.headers.get("content-type", "").startswith("application/json")
                            detail = response.json().get("detail", "") if is_json else ""
                            shape = {"retry_after": "retry-after" in response.headers, "json": is_json,
                                     "at_proxy": detail.startswith(AdmissionAtProxy.AT_CAPACITY),
                                     "reason": detail.split(";")[0][:60]}
                    except httpx.HTTPError as error:
                        status = type(error).__name__
                    outcomes.append((sent, time.monotonic() - sent, status, shape, version))
                    if status == "ConnectError":
                        await asyncio.sleep(0.1)  # pacing: a client backs off from a server that is gone
                    elif status == 503 and honour_retry_after and shape["retry_after"]:  # pacing, as the API asks
                        await asyncio.sleep(min(float(response.headers["retry-after"]), 5.0))

            await asyncio.gather(*(client() for _ in range(clients)))
        return outcomes

    queue.put(asyncio.run(main()))


def start_load(url: str, clients: int, seconds: float, headers: dict | None = None, stop=None,
               honour_retry_after: bool = False, bodies=None):
    """``bodies``: what the clients send in turn (default: one development document per request)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_load, args=(url, bodies or request_bodies(), clients, seconds, headers or {},
                                                  queue, stop, honour_retry_after), daemon=True)
    process.start()
    return process, queue


def _stall(host: str, port: int, head: bytes, connections: int, seconds: float, queue) -> None:
    """``connections`` stalled bodies: each connection sends ``head`` (headers and the start of a body) and then
    nothing; when the server answers or closes it, it is opened again a second later, until ``seconds`` have
    passed. Puts (monotonic time when all were first open, what the server answered, by status)."""

    async def main():
        answers: Counter[str] = Counter()
        deadline = time.monotonic() + seconds
        opened: list[float] = []

        async def attacker():
            while time.monotonic() < deadline:
                writer = None
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(head)
                    await writer.drain()
                    opened.append(time.monotonic())
                    line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
                    parts = line.split(b" ")
                    answers[parts[1].decode() if len(parts) > 2 else "closed without an answer"] += 1
                except TimeoutError:
                    answers["still stalled at the end"] += 1
                    break
                except OSError as error:
                    answers[type(error).__name__] += 1
                finally:
                    if writer is not None:
                        writer.close()
                # pacing: opened again a second later
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

        await asyncio.gather(*(attacker() for _ in range(connections)))
        return (opened[connections - 1] if len(opened) >= connections else None), dict(answers)

    queue.put(asyncio.run(main()))


# ---- replicas ------------------------------------------------------------------------------------------------------
def replica_pids(app: str, deployment: str) -> list[int]:
    """Process ids of the app's replicas of ``deployment`` in this bench's Ray: their command line names them, and
    they inherited this process's ``RAY_TMPDIR`` (another Ray on the machine may run an app of the same name)."""
    tag = f"ServeReplica:{app}:{deployment}".encode()
    ours = f"RAY_TMPDIR={os.environ['RAY_TMPDIR']}\0".encode()
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if tag in cmdline.read_bytes() and ours in (cmdline.parent / "environ").read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return sorted(pids)


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))


def kill_and_time_replacement(app: str, deployment: str, wanted: int, timeout: float = 300) -> tuple[float, float | None]:
    """SIGKILL one replica process of ``deployment``; when (monotonic clock), and the seconds until ``wanted``
    replicas run again (None: never)."""
    before = replica_pids(app, deployment)
    if not before:
        raise RuntimeError(f"no {deployment} replica process of /{app} found")
    victim = before[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    seen_down = False

    def replaced() -> float | None:
        nonlocal seen_down
        running = running_replicas(app, deployment)
        seen_down = seen_down or running < wanted
        alive = [pid for pid in replica_pids(app, deployment) if pid != victim]
        return round(time.monotonic() - killed, 2) if seen_down and running >= wanted and len(alive) >= wanted else None

    return killed, poll(replaced, timeout=timeout, interval=0.25)


def proxy_resends(ray_root: Path) -> int:
    """Requests the proxy's middleware sent again after their ingress replica died, so far (its log lines, written
    to the proxy's stderr log under the Ray session's folder)."""
    from drugprot.serving.proxy import ResendOnLostReplica

    mark = ResendOnLostReplica.LOG_MARK.encode()
    logs = {path.resolve() for path in ray_root.rglob("*.err")}  # session_latest links to the session's folder
    return sum(path.read_bytes().count(mark) for path in logs if path.is_file())


# ---- phases ----------------------------------------------------------------------------------------------------------
def summarize(phase: str, outcomes: list, **extra) -> dict:
    """Requests by status, ``failed`` (not 200, not a 503 refusal), p50/p99 of the answered ones; ``extra`` adds
    the phase's own fields (and may redefine ``failed``)."""
    statuses = Counter(str(outcome[2]) for outcome in outcomes)
    answered = [latency * 1000 for _, latency, status, *_ in outcomes if status == 200]
    failed = sum(count for status, count in statuses.items() if status not in ("200", "503"))
    return {"phase": phase, "sent": len(outcomes), "by_status": dict(statuses), "failed": failed,
            "p50_ms": round(percentile(answered, 50), 1), "p99_ms": round(percentile(answered, 99), 1), **extra}


def kill_phase(base: str, model: str, ray_root: Path, *, clients: int, seconds: float) -> dict:
    from ray import serve

    from drugprot.serving import build_app

    app = "chaos"
    serve.run(build_app({"model": model, "replicas": 2, "ingress_replicas": 2, "num_cpus": 0.5, "ingress_cpus": 0.25,
                         "token_env": None, "warmup_rounds": 2}), name=app, route_prefix=f"/{app}")
    resent = proxy_resends(ray_root)
    process, queue = start_load(f"{base}/{app}/v1/relations", clients, seconds)
    replaced: dict[str, float | None] = {}
    kills: dict[str, float] = {}

    began = time.monotonic()

    def kill(name: str, deployment: str, at: float):
        """Each kill at its own time, whether or not the other deployment is whole again by then."""
        time.sleep(max(0.0, began + at - time.monotonic()))
        kills[name], replaced[f"{name}_replaced_s"] = kill_and_time_replacement(app, deployment, 2)

    killers = [threading.Thread(target=kill, args=("model", "DrugprotModel", seconds / 4), daemon=True),
               threading.Thread(target=kill, args=("ingress", "DrugprotIngress", seconds / 2), daemon=True)]
    for killer in killers:
        killer.start()
    outcomes = queue.get(timeout=seconds + 600)
    process.join(timeout=30)
    for killer in killers:
        killer.join(timeout=600)
    killed_at = {f"{name}_killed_at_s": round(at - began, 2) for name, at in kills.items()}
    ingress = serve.get_deployment_handle("DrugprotIngress", app)
    retries = sum(ingress.broadcast("model_retries").results())  # counted by the ingress replicas alive at the end
    serve.delete(app)
    # a failed request is put down to the last kill before it was answered (none: it failed before any kill)
    cause = Counter()
    for sent, latency, status, *_ in outcomes:
        if status not in (200, 503):
            before = [name for name, at in kills.items() if at <= sent + latency]
            cause[max(before, key=kills.get) if before else "none"] += 1
    return summarize("kill", outcomes, clients=clients, seconds=seconds, model_retries=retries,
                     proxy_resends=proxy_resends(ray_root) - resent,
                     failed_before_kills=cause["none"], failed_after_model_kill=cause["model"],
                     failed_after_ingress_kill=cause["ingress"], **killed_at, **replaced)


def overload_phase(base: str, model: str, *, clients: list[int], replicas: list[int], seconds: float,
                   max_queue_wait_s: float | None) -> dict:
    """One run per (model replicas, clients), the application's defaults otherwise (capacity sized by the builder,
    the latency objective ``max_queue_wait_s``); the checks are over every run."""
    runs = [overload_run(base, model, replicas=r, clients=c, seconds=seconds, max_queue_wait_s=max_queue_wait_s)
            for r in replicas for c in clients]
    refusals = [refusal for run in runs for refusal in run.pop("_refusals")]
    outcomes = [outcome for run in runs for outcome in run.pop("_outcomes")]
    at_proxy = [r for r, shape in refusals if shape and shape["at_proxy"]]
    in_app = [r for r, shape in refusals if not (shape and shape["at_proxy"])]
    result = summarize("overload", outcomes, seconds=seconds, max_queue_wait_s=max_queue_wait_s, runs=runs,
                       refused=len(refusals), refused_p50_ms=round(percentile([r for r, _ in refusals], 50), 1),
                       refused_p99_ms=round(percentile([r for r, _ in refusals], 99), 1),
                       refused_at_proxy=len(at_proxy), refused_at_proxy_p99_ms=round(percentile(at_proxy, 99), 1),
                       refused_in_app=len(in_app), refused_in_app_p99_ms=round(percentile(in_app, 99), 1),
                       refused_in_app_why=Counter(s["reason"] for _, s in refusals if s and not s["at_proxy"]),
                       refusals_with_retry_after=sum(1 for _, s in refusals if s and s["retry_after"]),
                       refusals_json=sum(1 for _, s in refusals if s and s["json"]))
    result["checks"] = {
        "no_failed": result["failed"] == 0,
        "refusals_are_json_with_retry_after": result["refusals_json"] == result["refusals_with_retry_after"] == len(refusals),
        "accepted_p99_within_objective_plus_one_batch": all(run["p99_within_bound"] for run in runs),
        "refused_p99_under_100_ms": not refusals or result["refused_p99_ms"] < 100,
    }
    return result


def overload_run(base: str, model: str, *, replicas: int, clients: int, seconds: float,
                 max_queue_wait_s: float | None) -> dict:
    """``clients`` clients (each waiting a refusal's ``Retry-After``, as the API asks) against ``replicas`` model
    replicas; ``/readyz`` is read twice a second meanwhile for the saturation it shows. One batch time is
    ``max_batch_pairs`` at the pairs/s the replica measured under this load."""
    import requests
    from ray import serve

    from drugprot.serving import build_app

    app = f"overload{replicas}x{clients}"
    serve.run(build_app({"model": model, "replicas": replicas, "num_cpus": 1, "token_env": None, "warmup_rounds": 2,
                         "max_queue_wait_s": max_queue_wait_s}), name=app, route_prefix=f"/{app}")
    url = f"{base}/{app}"
    ratios, done = [], threading.Event()

    def watch():
        while not done.wait(0.5):
            try:
                saturation = requests.get(f"{url}/readyz", timeout=5).json().get("saturation") or {}
            except (requests.RequestException, ValueError):
                continue
            ratios.append(saturation.get("ratio"))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    process, queue = start_load(f"{url}/v1/relations", clients, seconds, honour_retry_after=True)
    outcomes = queue.get(timeout=seconds + 600)
    process.join(timeout=30)
    done.set()
    watcher.join(timeout=30)
    batching = requests.get(f"{url}/readyz", timeout=30).json()["batching"]
    serve.delete(app)
    batch_s = batching["max_pairs"] / batching["pairs_per_s"] if batching.get("pairs_per_s") else None
    refusals = [(latency * 1000, shape) for _, latency, status, shape, _ in outcomes if status == 503]
    accepted = [latency * 1000 for _, latency, status, *_ in outcomes if status == 200]
    bound_ms = (max_queue_wait_s + batch_s) * 1000 if max_queue_wait_s and batch_s else None
    seen = [r for r in ratios if r is not None]
    return {"replicas": replicas, "clients": clients, "sent": len(outcomes), "answered": len(accepted),
            "refused": len(refusals), "accepted_p50_ms": round(percentile(accepted, 50), 1),
            "accepted_p99_ms": round(percentile(accepted, 99), 1), "batch_ms": round(batch_s * 1000, 1) if batch_s else None,
            "bound_ms": round(bound_ms, 1) if bound_ms else None,
            "p99_within_bound": bound_ms is None or not accepted or percentile(accepted, 99) <= bound_ms,
            "refused_p99_ms": round(percentile([r for r, _ in refusals], 99), 1),
            "saturation_max_ratio": max(seen) if seen else None,
            "saturated_seen": any(r >= 1 for r in seen), "_refusals": refusals, "_outcomes": outcomes}


SWAP_MODEL = "drugprot-chaos"
SWAP_WAIT_S = 300  # the longest the swap phase waits for Serve to finish rolling onto version 2
TOKEN_ENV = "DRUGPROT_CHAOS_TOKEN"  # the stalled phase's bearer token; set before Ray starts, so replicas inherit it


def quiet(_message: str) -> None:
    pass


def registered_versions(model: str, scratch: Path) -> tuple[str, object]:
    """A SQLite registry in ``scratch`` holding ``model`` twice (versions 1 and 2), ``@champion`` on version 1;
    returns its URI and client."""
    from drugprot.ensemble import build_ensemble
    from drugprot.ensemble.publish import log_ensemble
    from drugprot.registry import promote
    from drugprot.ensemble_folder import ENSEMBLE_JSON
    from drugprot.mlflow_store import client

    ensemble = Path(model)
    if not (ensemble / ENSEMBLE_JSON).exists():
        ensemble = build_ensemble([model], scratch / "ensemble", evaluate_on_dev=False, log=quiet).path
    store = f"sqlite:///{scratch / 'mlflow.db'}"
    for _ in range(2):  # the alias is moved below, whatever the champion rule thinks of an untrained model
        log_ensemble(ensemble, tracking_uri=store, register=SWAP_MODEL, alias="registered", force=True, log=quiet)
    registry = client(store)
    promote(registry, SWAP_MODEL, "1", alias="champion", dev_f1=None, force=True, log=quiet)
    return store, registry


def swap_phase(base: str, model: str, scratch: Path, *, clients: int, seconds: float, poll_s: float) -> dict:
    from ray import serve

    from drugprot.registry import promote
    from drugprot.serving.follow import AliasFollower
    from drugprot.serving.options import parse_options

    app = "swap"
    store, registry = registered_versions(model, scratch)
    options = parse_options({"model": f"models:/{SWAP_MODEL}@champion", "tracking_uri": store, "follow_alias": True,
                             "poll_s": poll_s, "replicas": 2, "ingress_replicas": 2, "num_cpus": 0.5,
                             "ingress_cpus": 0.25, "token_env": None, "warmup_rounds": 2})
    follower = AliasFollower(options, app_name=app, route_prefix=f"/{app}", timeout_s=600,
                             say=lambda line: print(line, file=sys.stderr, flush=True))
    follower.deploy()
    stop = threading.Event()
    following = threading.Thread(target=follower.follow, args=(stop,), daemon=True)
    following.start()
    done = multiprocessing.get_context("spawn").Event()
    began = time.monotonic()
    process, queue = start_load(f"{base}/{app}/v1/relations", clients, seconds + SWAP_WAIT_S, stop=done)
    time.sleep(seconds / 4)  # pacing: version 1 alone for a quarter of the time
    moved = time.monotonic()
    promote(registry, SWAP_MODEL, "2", alias="champion", dev_f1=None, force=True, log=quiet)
    poll(lambda: follower.version == "2" or None, timeout=moved + SWAP_WAIT_S - time.monotonic(), interval=0.5)
    rolled = round(time.monotonic() - moved, 2) if follower.version == "2" else None
    time.sleep(max(seconds / 4, began + seconds - time.monotonic()))  # version 2 alone, then the rest of the time
    done.set()
    outcomes = queue.get(timeout=seconds + SWAP_WAIT_S + 600)
    process.join(timeout=30)
    stop.set()
    following.join(timeout=120)
    serve.delete(app)
    versions = Counter(str(version) for *_, version in outcomes)
    old_answers = [sent + latency for sent, latency, status, _, version in outcomes if version == "1"]
    new_answers = [sent + latency for sent, latency, status, _, version in outcomes if version == "2"]
    last_old = max(old_answers, default=moved)
    # version 2 answered everything from the last version-1 answer on, if it answered anything after it
    switched = round(last_old - moved, 2) if any(at > last_old for at in new_answers) else None
    return summarize("swap", outcomes, clients=clients, seconds=round(time.monotonic() - began, 1), poll_s=poll_s,
                     versions=dict(versions), switched_s=switched, rolled_s=rolled, serving_version=follower.version)


def is_refusal(outcome) -> bool:
    """A 503 with the JSON body and Retry-After: the server refused the request at admission (not accepted)."""
    shape = outcome[3]
    return outcome[2] == 503 and bool(shape) and shape["retry_after"] and shape["json"]


def sigterm_phase(model: str, scratch: Path, *, clients: int, seconds: float, port: int, gcs_port: int) -> dict:
    env = {**os.environ, "RAY_GCS_SERVER_PORT": str(gcs_port)}
    for key in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "DRUGPROT_API_TOKEN"):
        env.pop(key, None)  # its own Ray, set up by drugprot serve as for a user
    log_path = scratch / "sigterm-serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "drugprot", "serve", "--model", model, "--port", str(port),
                                   "--replicas", "2", "--ingress-replicas", "2", "--cpus-per-replica", "0.5",
                                   "--no-auth", "--run-dir", str(scratch / "sigterm-run")],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=scratch, start_new_session=True)
    try:
        def started() -> bool | None:
            if b"drugprot serve: ready at" in log_path.read_bytes():
                return True
            return False if server.poll() is not None else None  # False: it exited

        if not poll(started, timeout=600, interval=0.5):
            raise RuntimeError(f"drugprot serve did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        process, queue = start_load(f"http://127.0.0.1:{port}/v1/relations", clients, seconds)
        time.sleep(seconds / 2)  # pacing: half the time under load before the SIGTERM
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)  # the process alone, not its group
        code = server.wait(timeout=600)
        exit_s = round(time.monotonic() - signalled, 2)
        outcomes = queue.get(timeout=seconds + 600)
        process.join(timeout=30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=60)
    before = [outcome for outcome in outcomes if outcome[0] < signalled]
    after = [outcome for outcome in outcomes if outcome[0] >= signalled]
    refused = [outcome for outcome in after if outcome[2] == 503]
    refused_before = [outcome for outcome in before if is_refusal(outcome)]
    # a refused connection: nothing listened any more when the client connected (under load its event loop can
    # start a request well before it connects), so the server never received the request
    unreached = [sent + latency - signalled for sent, latency, status, *_ in before if status == "ConnectError"]
    lost = [outcome for outcome in before
            if outcome[2] not in (200, "ConnectError") and not is_refusal(outcome)]
    return summarize("sigterm", outcomes, failed=len(lost), clients=clients, seconds=seconds, sent_before=len(before),
                     refused_before=len(refused_before), unreached_before=len(unreached),
                     unreached_before_from_s=round(min(unreached), 2) if unreached else None,
                     failed_kinds=dict(Counter(str(status) for _, _, status, *_ in lost)),
                     answered_after=sum(1 for _, _, status, *_ in after if status == 200), refused_after=len(refused),
                     refused_with_retry_after=sum(1 for outcome in refused if is_refusal(outcome)),
                     gone_after=sum(1 for _, _, status, *_ in after if status == "ConnectError"),
                     dropped_after=sum(1 for _, _, status, *_ in after if status not in (200, 503, "ConnectError")),
                     exit_s=exit_s, exit_code=code)


def stalled_phase(base: str, model: str, *, clients: int, seconds: float, port: int, stalled: int = 200) -> dict:
    from ray import serve

    from drugprot.serving import build_app

    app = "stalled"
    token = os.environ[TOKEN_ENV]
    serve.run(build_app({"model": model, "replicas": 2, "num_cpus": 0.5, "token_env": TOKEN_ENV,
                         "warmup_rounds": 2}), name=app, route_prefix=f"/{app}")
    process, queue = start_load(f"{base}/{app}/v1/relations", clients, seconds, {"Authorization": f"Bearer {token}"})
    time.sleep(seconds / 4)  # pacing: the load alone for a quarter of the time
    head = (f"POST /{app}/v1/relations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"documents\": [").encode()
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    attack = context.Process(target=_stall, args=("127.0.0.1", port, head, stalled, seconds * 3 / 4, answers),
                             daemon=True)
    attack.start()
    outcomes = queue.get(timeout=seconds + 600)
    held_from, stalled_answers = answers.get(timeout=600)
    process.join(timeout=30)
    attack.join(timeout=30)
    serve.delete(app)
    held_from = held_from or math.inf
    before = [latency * 1000 for sent, latency, status, *_ in outcomes if status == 200 and sent < held_from]
    under = [latency * 1000 for sent, latency, status, *_ in outcomes if status == 200 and sent >= held_from]
    baseline = percentile(before, 99)
    return summarize("stalled", outcomes, clients=clients, seconds=seconds, stalled=stalled,
                     all_held=held_from != math.inf, sent_under_attack=sum(1 for o in outcomes if o[0] >= held_from),
                     p99_ms_before_attack=round(baseline, 1), p50_ms_under_attack=round(percentile(under, 50), 1),
                     p99_ms_under_attack=round(percentile(under, 99), 1),
                     p99_ratio=round(percentile(under, 99) / baseline, 2) if before and under else None,
                     over_1s_under_attack=sum(1 for latency in under if latency > 1000),
                     stalled_answers=stalled_answers)


def proxy_rss_mb() -> float | None:
    """Resident memory of Serve's proxy (the ``ray::ProxyActor`` process of the bench's Ray), from /proc."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::ProxyActor"):
                return int((entry / "status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        except (OSError, IndexError):
            continue
    return None


def _oversized(port: int, count: int, megabytes: int, queue) -> None:
    """``count`` connections each try to send ``megabytes`` MB of one header line; puts what each got back."""
    import socket

    def one() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            try:
                connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
                for _ in range(megabytes * 16):
                    connection.sendall(b"h" * 65536)
            except OSError:
                pass  # the server answered and closed: read what it said
            try:
                line = connection.recv(64).split(b" ")
            except OSError as error:
                return type(error).__name__
            return line[1].decode() if len(line) > 2 else "closed without an answer"

    queue.put(dict(Counter(one() for _ in range(count))))


def headers_phase(base: str, model: str, *, clients: int, seconds: float, port: int, stalled: int = 200) -> dict:
    """Valid clients with the token; a quarter in, ``stalled`` connections each send 30 KB of headers (just under
    the proxy's 32 KB limit) and then nothing, opened again a second after the server closes them, and 10 more
    try to send 16 MB of headers each. The proxy must answer 408 and 431, grow by under 20 MB, and keep the valid
    requests' p99 under 1 s."""
    from ray import serve

    from drugprot.serving import build_app
    from drugprot.serving.options import ProxyLimits

    app = "headers"
    token = os.environ[TOKEN_ENV]
    serve.run(build_app({"model": model, "replicas": 2, "num_cpus": 0.5, "token_env": TOKEN_ENV,
                         "warmup_rounds": 2}), name=app, route_prefix=f"/{app}")
    process, queue = start_load(f"{base}/{app}/v1/relations", clients, seconds, {"Authorization": f"Bearer {token}"})
    time.sleep(seconds / 4)  # pacing: the load alone for a quarter of the time
    memory_before = proxy_rss_mb()
    head = (f"POST /{app}/v1/relations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1_000) for i in range(30)))
    context = multiprocessing.get_context("spawn")
    answers, big_answers = context.Queue(), context.Queue()
    attack = context.Process(target=_stall, args=("127.0.0.1", port, head, stalled, seconds * 3 / 4, answers),
                             daemon=True)
    attack.start()
    big = context.Process(target=_oversized, args=(port, 10, 16, big_answers), daemon=True)
    big.start()
    grown = 0.0
    while attack.is_alive() and memory_before is not None:
        grown = max(grown, (proxy_rss_mb() or memory_before) - memory_before)
        attack.join(timeout=0.5)
    outcomes = queue.get(timeout=seconds + 600)
    held_from, stalled_answers = answers.get(timeout=600)
    oversized_answers = big_answers.get(timeout=600)
    process.join(timeout=30)
    attack.join(timeout=30)
    big.join(timeout=30)
    serve.delete(app)
    held_from = held_from or math.inf
    under = [latency * 1000 for sent, latency, status, *_ in outcomes if status == 200 and sent >= held_from]
    result = summarize("headers", outcomes, clients=clients, seconds=seconds, stalled=stalled,
                       header_timeout_s=ProxyLimits().header_timeout_s, all_held=held_from != math.inf,
                       sent_under_attack=sum(1 for o in outcomes if o[0] >= held_from),
                       p99_ms_under_attack=round(percentile(under, 99), 1),
                       proxy_growth_mb=round(grown, 1) if memory_before is not None else None,
                       stalled_answers=stalled_answers, oversized_answers=oversized_answers)
    result["checks"] = {
        "no_failed": result["failed"] == 0,
        "valid_p99_under_1_s": bool(under) and percentile(under, 99) < 1000,
        "proxy_growth_under_20_mb": memory_before is not None and grown < 20,
        "stalled_headers_get_408": set(stalled_answers) <= {"408", "still stalled at the end"} and "408" in stalled_answers,
        "oversized_headers_get_431": set(oversized_answers) == {"431"},
    }
    return result


BIG_INTERVAL = (-50, 50)


def big_request(chemicals: int = 40, genes: int = 101) -> dict:
    """One sentence with ``chemicals`` CHEMICAL and ``genes`` GENE mentions, the chemicals amid the genes so that
    every pair falls in the GENE interval ``BIG_INTERVAL``: ``chemicals * genes`` pairs (4,040 by default, legal
    under the default limits)."""
    text, entities = "", []

    def mention(surface: str, kind: str) -> None:
        nonlocal text
        if text:
            text += " , "
        entities.append({"id": f"T{len(entities) + 1}", "type": kind, "start": len(text),
                         "end": len(text) + len(surface), "text": surface})
        text += surface

    before = (genes - 1) // 2
    for i in range(before):
        mention(f"GENE{i}", "GENE-Y")
    for i in range(chemicals):
        mention(f"chemical{i}", "CHEMICAL")
    for i in range(before, genes):
        mention(f"GENE{i}", "GENE-N")
    return {"documents": [{"id": "big", "text": text + " .", "entities": entities}], "interval": list(BIG_INTERVAL)}


def big_phase(base: str, model: str, *, small_clients: int, big_clients: int, seconds: float) -> dict:
    import httpx
    from ray import serve

    from drugprot.serving import build_app

    app = "big"
    serve.run(build_app({"model": model, "replicas": 1, "num_cpus": 1, "token_env": None, "warmup_rounds": 2}),
              name=app, route_prefix=f"/{app}")
    url = f"{base}/{app}/v1/relations"
    body = big_request()
    started = time.monotonic()
    alone = httpx.post(url, json=body, timeout=300)
    alone_ms = (time.monotonic() - started) * 1000
    if alone.status_code != 200:
        raise RuntimeError(f"the big request was refused: {alone.status_code} {alone.text[:500]}")
    pairs = alone.json()["documents"][0]["candidates"]
    small, small_queue = start_load(url, small_clients, seconds)
    time.sleep(seconds / 4)  # pacing: the small requests alone for a quarter of the time
    big, big_queue = start_load(url, big_clients, seconds * 3 / 4, bodies=[body])
    small_outcomes = small_queue.get(timeout=seconds + 600)
    big_outcomes = big_queue.get(timeout=seconds + 600)
    small.join(timeout=30)
    big.join(timeout=30)
    batching = httpx.get(f"{base}/{app}/readyz", timeout=60).json().get("batching", {})
    serve.delete(app)
    big_from = min((sent for sent, *_ in big_outcomes), default=math.inf)  # the first big request sent
    big_until = max((sent + latency for sent, latency, *_ in big_outcomes), default=math.inf)
    before = [latency * 1000 for sent, latency, status, *_ in small_outcomes if status == 200 and sent < big_from]
    under = [latency * 1000 for sent, latency, status, *_ in small_outcomes
             if status == 200 and big_from <= sent and sent + latency <= big_until]
    big_ms = [latency * 1000 for _, latency, status, *_ in big_outcomes if status == 200]

    def ratio(q: float) -> float | None:
        return round(percentile(under, q) / percentile(before, q), 2) if before and under else None

    small_ms = before + under
    return summarize("big", small_outcomes + big_outcomes, small_clients=small_clients, big_clients=big_clients,
                     seconds=seconds, big_pairs=pairs, big_alone_ms=round(alone_ms, 1),
                     p50_ms=round(percentile(small_ms, 50), 1), p99_ms=round(percentile(small_ms, 99), 1),
                     small_before=len(before), small_p50_ms_before=round(percentile(before, 50), 1),
                     small_p99_ms_before=round(percentile(before, 99), 1), small_under=len(under),
                     small_p50_ms_under=round(percentile(under, 50), 1),
                     small_p99_ms_under=round(percentile(under, 99), 1), p50_ratio=ratio(50), p99_ratio=ratio(99),
                     big_answered=len(big_ms), big_p50_ms=round(percentile(big_ms, 50), 1),
                     big_p99_ms=round(percentile(big_ms, 99), 1),
                     batching={key: batching.get(key) for key in ("max_pairs", "batches", "largest_batch_pairs",
                                                                  "chunks", "split_requests")})


PHASES = ("kill", "swap", "sigterm", "stalled", "overload", "headers", "big")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model or ensemble folder (default: train a tiny one, see --encoder)")
    parser.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny", help="the default model's encoder")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated: {', '.join(PHASES)}")
    parser.add_argument("--seconds", type=float, default=60.0, help="sending time per phase")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients in the kill, swap and sigterm "
                                                                "phases")
    parser.add_argument("--stalled-clients", type=int, default=4, help="clients sending valid requests in the "
                                                                       "stalled phase")
    parser.add_argument("--max-queue-wait-s", type=float, default=2.0, help="the overload phase's latency objective "
                                                                        "(drugprot serve --max-queue-wait-s)")
    parser.add_argument("--overload-clients", default="64,256", help="the overload phase's client counts, each "
                                                                      "run against each --overload-replicas")
    parser.add_argument("--overload-replicas", default="1,2", help="the overload phase's model replica counts")
    parser.add_argument("--report-only", action="store_true", help="print the phases' checks without failing on "
                        "them (a shared machine, whose timings measure the neighbours)")
    parser.add_argument("--small-clients", type=int, default=4, help="clients sending one development document "
                                                                     "each in the big phase")
    parser.add_argument("--big-clients", type=int, default=4, help="clients sending the 4,040-pair request in the "
                                                                   "big phase")
    parser.add_argument("--poll-s", type=float, default=1.0, help="the swap phase's alias poll interval")
    parser.add_argument("--port", type=int, default=8116, help="Serve HTTP port on 127.0.0.1 (the sigterm phase's "
                                                               "server: this + 10)")
    parser.add_argument("--gcs-port", type=int, default=6428, help="Ray GCS port of the private Ray (the sigterm "
                                                                   "phase's Ray: this + 10)")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"--phases: unknown phase(s) {', '.join(sorted(unknown))}; use {', '.join(PHASES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from drugprot.local_ray import local_serve
    from drugprot.serving.proxy import PROXY_CALLBACK

    scratch = Path(tempfile.mkdtemp(prefix="drugprot-serve-chaos-"))
    broken: list[str] = []  # the phases' checks that failed
    # what drugprot serve gives its Ray, inherited by the proxy and the replicas: the proxy's middlewares, the
    # stalled phase's token, a registry cache in the scratch folder
    os.environ.setdefault(*PROXY_CALLBACK)
    os.environ[TOKEN_ENV] = secrets.token_urlsafe(16)
    os.environ["DRUGPROT_CACHE_DIR"] = str(scratch / "cache")
    try:
        model = args.model or str(train_default_model(scratch / "model", args.encoder))
        base = f"http://127.0.0.1:{args.port}"
        with local_serve(args.port, root=scratch / "ray", gcs_port=args.gcs_port, num_cpus=4):
            for phase in phases:
                if phase == "kill":
                    result = kill_phase(base, model, scratch / "ray", clients=args.clients, seconds=args.seconds)
                elif phase == "swap":
                    result = swap_phase(base, model, scratch, clients=args.clients, seconds=args.seconds,
                                        poll_s=args.poll_s)
                elif phase == "sigterm":
                    result = sigterm_phase(model, scratch, clients=args.clients, seconds=args.seconds,
                                           port=args.port + 10, gcs_port=args.gcs_port + 10)
                elif phase == "stalled":
                    result = stalled_phase(base, model, clients=args.stalled_clients, seconds=args.seconds,
                                           port=args.port)
                elif phase == "big":
                    result = big_phase(base, model, small_clients=args.small_clients, big_clients=args.big_clients,
                                       seconds=args.seconds)
                elif phase == "headers":
                    result = headers_phase(base, model, clients=args.stalled_clients, seconds=args.seconds,
                                           port=args.port)
                else:
                    result = overload_phase(base, model, clients=counts(args.overload_clients),
                                            replicas=counts(args.overload_replicas), seconds=args.seconds,
                                            max_queue_wait_s=args.max_queue_wait_s)
                print(json.dumps(result), flush=True)
                broken += [f"{phase}: {name}" for name, ok in result.get("checks", {}).items() if not ok]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if broken:
        print(f"serve_chaos: checks not met: {', '.join(broken)}", file=sys.stderr, flush=True)
    return 1 if broken and not args.report_only else 0


def counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


if __name__ == "__main__":
    sys.exit(main())
