"""Chaos benchmark for the Serve application: what clients see while replicas are killed, and under overload.

    python bench/serve_chaos.py                               # tiny model trained on the spot; both phases, 60 s each
    python bench/serve_chaos.py --model DIR --phases kill --seconds 60 --clients 32
    python bench/serve_chaos.py --seconds 15 --clients 8      # the short form the slow test runs

A private Ray (``drugprot.local_ray``, 127.0.0.1 only) with Serve on 127.0.0.1. Clients run in a separate process
and send real development documents of the bundled sample, one per request, for ``--seconds``.

* ``kill``: 2 model replicas and 2 ingress replicas. A quarter into the run one model replica process is SIGKILLed;
  halfway, one ingress replica process. Reports requests by status, ``failed`` (any non-2xx other than a 503
  refusal, and any transport error) and which kill each failure followed, p50/p99 latency of the answered
  requests, the model calls retried on another replica, and the seconds until each deployment had its two
  replicas running again.
* ``overload``: one model replica admitting ``--capacity`` requests (half running, half queued) and twice
  ``--capacity`` clients. Reports refusals (503), whether each carried ``Retry-After`` and a JSON body, their p99
  latency, and ``failed`` among the accepted ones.

Each phase prints one JSON line (``{"phase": ...}``); the baseline for the latencies is the same run's own p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "platform")]

from serve_load import percentile, request_bodies, train_default_model  # noqa: E402


# ---- clients (their own process) --------------------------------------------------------------------------------
def _load(url: str, bodies: list[dict], clients: int, seconds: float, queue) -> None:
    """Each client sends the next body until ``seconds`` have passed; every request's outcome is recorded as
    (start on the machine's monotonic clock, latency s, status or error name, refusal shape)."""
    import httpx

    async def main():
        outcomes = []
        deadline = time.monotonic() + seconds
        counter = iter(range(10**9))
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:
            async def client():
                while time.monotonic() < deadline:
                    body = bodies[next(counter) % len(bodies)]
                    sent = time.monotonic()
                    shape = None
                    try:
                        response = await http.post(url, json=body)
                        status = response.status_code
                        if status == 503:
                            is_json = response.headers.get("content-type", "").startswith("application/json")
                            shape = {"retry_after": "retry-after" in response.headers, "json": is_json}
                    except httpx.HTTPError as error:
                        status = type(error).__name__
                    outcomes.append((sent, time.monotonic() - sent, status, shape))

            await asyncio.gather(*(client() for _ in range(clients)))
        return outcomes

    queue.put(asyncio.run(main()))


def start_load(url: str, clients: int, seconds: float):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_load, args=(url, request_bodies(), clients, seconds, queue), daemon=True)
    process.start()
    return process, queue


# ---- replicas ------------------------------------------------------------------------------------------------------
def replica_pids(app: str, deployment: str) -> list[int]:
    """Process ids of the app's replicas of ``deployment`` (their command line names them)."""
    tag = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if tag in cmdline.read_bytes():
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
    while time.monotonic() - killed < timeout:
        running = running_replicas(app, deployment)
        seen_down = seen_down or running < wanted
        alive = [pid for pid in replica_pids(app, deployment) if pid != victim]
        if seen_down and running >= wanted and len(alive) >= wanted:
            return killed, round(time.monotonic() - killed, 2)
        time.sleep(0.25)
    return killed, None


# ---- phases ----------------------------------------------------------------------------------------------------------
def summarize(phase: str, outcomes: list, **extra) -> dict:
    statuses = Counter(str(status) for _, _, status, _ in outcomes)
    answered = [latency * 1000 for _, latency, status, _ in outcomes if status == 200]
    failed = sum(count for status, count in statuses.items() if status not in ("200", "503"))
    return {"phase": phase, "sent": len(outcomes), "by_status": dict(statuses), "failed": failed,
            "p50_ms": round(percentile(answered, 50), 1), "p99_ms": round(percentile(answered, 99), 1), **extra}


def kill_phase(base: str, model: str, *, clients: int, seconds: float) -> dict:
    from ray import serve

    from drugprot.serving import build_app

    app = "chaos"
    serve.run(build_app({"model": model, "replicas": 2, "ingress_replicas": 2, "num_cpus": 0.5, "ingress_cpus": 0.25,
                         "token_env": None, "warmup_rounds": 2}), name=app, route_prefix=f"/{app}")
    process, queue = start_load(f"{base}/{app}/v1/relations", clients, seconds)
    replaced: dict[str, float | None] = {}
    kills: dict[str, float] = {}

    def chaos():
        began = time.monotonic()
        time.sleep(seconds / 4)
        kills["model"], replaced["model_replaced_s"] = kill_and_time_replacement(app, "DrugprotModel", 2)
        time.sleep(max(0.0, began + seconds / 2 - time.monotonic()))
        kills["ingress"], replaced["ingress_replaced_s"] = kill_and_time_replacement(app, "DrugprotIngress", 2)

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    outcomes = queue.get(timeout=seconds + 600)
    process.join(timeout=30)
    killer.join(timeout=600)
    ingress = serve.get_deployment_handle("DrugprotIngress", app)
    retries = sum(ingress.broadcast("model_retries").results())  # counted by the ingress replicas alive at the end
    serve.delete(app)
    # a failed request is put down to the last kill before it was answered (none: it failed before any kill)
    cause = Counter()
    for sent, latency, status, _ in outcomes:
        if status not in (200, 503):
            before = [name for name, at in kills.items() if at <= sent + latency]
            cause[max(before, key=kills.get) if before else "none"] += 1
    return summarize("kill", outcomes, clients=clients, seconds=seconds, model_retries=retries,
                     failed_before_kills=cause["none"], failed_after_model_kill=cause["model"],
                     failed_after_ingress_kill=cause["ingress"], **replaced)


def overload_phase(base: str, model: str, *, clients: int, seconds: float, capacity: int) -> dict:
    from ray import serve

    from drugprot.serving import build_app

    app = "overload"
    running = max(1, capacity // 2)
    serve.run(build_app({"model": model, "replicas": 1, "num_cpus": 1, "token_env": None, "warmup_rounds": 2,
                         "max_ongoing_requests": running, "max_queued_requests": capacity - running}),
              name=app, route_prefix=f"/{app}")
    process, queue = start_load(f"{base}/{app}/v1/relations", clients, seconds)
    outcomes = queue.get(timeout=seconds + 600)
    process.join(timeout=30)
    serve.delete(app)
    refusals = [(latency * 1000, shape) for _, latency, status, shape in outcomes if status == 503]
    return summarize("overload", outcomes, clients=clients, capacity=capacity, seconds=seconds,
                     refused=len(refusals), refused_p99_ms=round(percentile([r for r, _ in refusals], 99), 1),
                     refusals_with_retry_after=sum(1 for _, s in refusals if s and s["retry_after"]),
                     refusals_json=sum(1 for _, s in refusals if s and s["json"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model or ensemble folder (default: train a tiny one, see --encoder)")
    parser.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny", help="the default model's encoder")
    parser.add_argument("--phases", default="kill,overload", help="comma-separated: kill, overload")
    parser.add_argument("--seconds", type=float, default=60.0, help="sending time per phase")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients in the kill phase")
    parser.add_argument("--capacity", type=int, default=16, help="requests the overload phase's model admits; "
                                                                  "it gets twice as many clients")
    parser.add_argument("--port", type=int, default=8116, help="Serve HTTP port on 127.0.0.1")
    parser.add_argument("--gcs-port", type=int, default=6428, help="Ray GCS port of the private Ray")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - {"kill", "overload"}
    if unknown:
        parser.error(f"--phases: unknown phase(s) {', '.join(sorted(unknown))}; use kill, overload")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from drugprot.local_ray import local_serve

    scratch = Path(tempfile.mkdtemp(prefix="drugprot-serve-chaos-"))
    try:
        model = args.model or str(train_default_model(scratch / "model", args.encoder))
        base = f"http://127.0.0.1:{args.port}"
        with local_serve(args.port, root=scratch / "ray", gcs_port=args.gcs_port, num_cpus=4):
            for phase in phases:
                if phase == "kill":
                    result = kill_phase(base, model, clients=args.clients, seconds=args.seconds)
                else:
                    result = overload_phase(base, model, clients=2 * args.capacity, seconds=args.seconds,
                                            capacity=args.capacity)
                print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
