"""Load benchmark for the relation service: batched against unbatched, in the same run, over HTTP on Ray Serve.

    python bench/serve_load.py                          # tiny model trained on the spot; about 2-3 minutes here
    python bench/serve_load.py --model runs/minilm/model --seconds 20 --levels 1,8,32
    python bench/serve_load.py --in-process --device cuda --model DIR    # GPU machine: no Ray, no HTTP

Serve mode starts a private Ray (``drugprot.local_ray``) with Serve on 127.0.0.1, deploys the same model twice
(``/batched``: cross-request batching up to ``--batched-pairs`` pairs; ``/unbatched``: ``max_batch_pairs`` 1, i.e.
one request per model call), and sends each a concurrency sweep (1, 8, 32, 64 clients) of real development
documents, one document per request, from a separate process for a bounded time per level. Every request sent is
accounted for (200 / 4xx / 5xx / transport error). It prints requests/s, pairs/s (candidate pairs scored), p50/p95/p99
latency, and the batched/unbatched ratio per level.

``--in-process`` measures the same batched execution path (``RelationService`` → ``PairBatcher`` → ``Predictor``)
without Ray Serve and without HTTP, for machines that have no Ray (the GPU machine); call
:func:`in_process_benchmark` from another script to get the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "platform") not in sys.path:  # runs from a checkout without `pip install -e .` too
    sys.path.append(str(REPO / "platform"))

from drugprot.polling import poll  # noqa: E402

LEVELS = (1, 8, 32, 64)


@dataclass
class Row:
    config: str
    clients: int
    seconds: float
    sent: int
    ok: int
    client_errors: int  # 4xx
    server_errors: int  # 5xx
    transport_errors: int  # timeouts, refused connections
    pairs: int  # candidate pairs in 200 answers
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def summarize(config: str, clients: int, seconds: float, outcomes: list[tuple[object, float, int]]) -> Row:
    """``outcomes``: (HTTP status or error name, latency s, pairs) for every request sent."""
    ok = [o for o in outcomes if o[0] == 200]
    latencies = [o[1] * 1000 for o in ok]
    statuses = [o[0] for o in outcomes]
    return Row(config, clients, seconds, len(outcomes), len(ok),
               sum(1 for s in statuses if isinstance(s, int) and 400 <= s < 500),
               sum(1 for s in statuses if isinstance(s, int) and s >= 500),
               sum(1 for s in statuses if not isinstance(s, int)), sum(o[2] for o in ok),
               percentile(latencies, 50), percentile(latencies, 95), percentile(latencies, 99))


def request_bodies(limit: int | None = None) -> list[dict]:
    """One request per development document of the bundled sample (the documents' own text and entities)."""
    from drugprot.config import SAMPLE_DIR
    from drugprot.corpus import read_split

    documents = read_split(SAMPLE_DIR, "development").documents[:limit]
    return [{"documents": [{"id": d.pmid, "title": d.title, "abstract": d.abstract,
                            "entities": [{"id": e.id, "type": e.type, "start": e.start, "end": e.end, "text": e.text}
                                         for e in d.entities.values()]}]} for d in documents]


# ---- the load generator (its own process in Serve mode) -----------------------------------------------------------
async def _drive(send, bodies: list[dict], clients: int, seconds: float) -> tuple[float, list]:
    """``clients`` loops, each sending the next body until ``seconds`` have passed; in-flight requests finish."""
    outcomes: list[tuple[object, float, int]] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def client():
        while time.monotonic() < deadline:
            body = bodies[next(counter) % len(bodies)]
            started = time.monotonic()
            status, pairs = await send(body)
            outcomes.append((status, time.monotonic() - started, pairs))

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.monotonic() - started, outcomes


def _http_load(url: str, bodies: list[dict], clients: int, seconds: float, timeout: float, queue) -> None:
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            async def send(body):
                try:
                    response = await http.post(url, json=body)
                except httpx.HTTPError as error:
                    return type(error).__name__, 0
                pairs = sum(d["candidates"] for d in response.json()["documents"]) if response.status_code == 200 else 0
                return response.status_code, pairs

            return await _drive(send, bodies, clients, seconds)

    queue.put(asyncio.run(main()))


def http_sweep(url: str, config: str, bodies: list[dict], levels, seconds: float, timeout: float = 60.0) -> list[Row]:
    rows = []
    context = multiprocessing.get_context("spawn")
    for clients in levels:
        queue = context.Queue()
        process = context.Process(target=_http_load, args=(url, bodies, clients, seconds, timeout, queue))
        process.start()
        elapsed, outcomes = queue.get(timeout=seconds + timeout + 120)
        process.join(timeout=30)
        rows.append(summarize(config, clients, elapsed, outcomes))
        print_row(rows[-1])
    return rows


# ---- in-process: the same batched path without Serve or HTTP --------------------------------------------------------
def in_process_benchmark(model: str, *, levels=LEVELS, seconds: float = 10.0, device: str = "auto",
                         batched_pairs: int = 64, wait_ms: float = 5.0, configs=("batched", "unbatched"),
                         threads: int = 1) -> list[Row]:
    """Rows for ``RelationService`` → ``ModelService`` (``PairBatcher`` + ``Predictor``) driven by asyncio clients in this process.

    No Ray and no HTTP: the JSON bodies are validated by the same pydantic request model, then go through the same
    limits, candidates, batcher and decode as a Serve replica. ``device`` 'cuda' runs bf16 autocast (the Predictor's
    default precision); 'cpu' runs fp32.
    """
    import torch

    from drugprot.inference import load_predictor
    from drugprot.serving.options import parse_options
    from drugprot.serving.schemas import RelationsRequest
    from drugprot.serving.service import ModelService, RelationService, configure_torch_threads

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    configure_torch_threads(threads)
    predictor = load_predictor(model, device=device)
    bodies = request_bodies()
    rows = []
    for config in configs:
        pairs = batched_pairs if config == "batched" else 1
        options = parse_options({"model": model, "max_batch_pairs": pairs, "batch_wait_ms": wait_ms, "warmup_rounds": 3,
                                 "gpus_per_replica": 1 if device == "cuda" else 0})
        model_service = ModelService(predictor, options)
        model_service.start_warmup().result()
        service = RelationService(model_service, options)
        for clients in levels:
            async def send(body, service=service):
                try:
                    response, _ = await service.relations(RelationsRequest.model_validate(body))
                except Exception as error:  # counted, like a 5xx
                    return type(error).__name__, 0
                return 200, sum(d.candidates for d in response.documents)

            elapsed, outcomes = asyncio.run(_drive(send, bodies, clients, seconds))
            rows.append(summarize(config, clients, elapsed, outcomes))
            print_row(rows[-1])
        asyncio.run(model_service.close())
    return rows


# ---- Serve mode ---------------------------------------------------------------------------------------------------------
def serve_benchmark(model: str, *, levels=LEVELS, seconds: float = 8.0, port: int = 8115, gcs_port: int = 6427,
                    batched_pairs: int = 64, wait_ms: float = 5.0, gpus_per_replica: float = 0.0) -> list[Row]:
    import requests
    from ray import serve

    from drugprot.local_ray import local_serve
    from drugprot.serving import build_app

    rows: list[Row] = []
    # two model replicas of 1 CPU and two ingresses of 0.25: with fewer logical CPUs one app never starts
    with local_serve(port, root=tempfile.mkdtemp(prefix="drugprot-serve-bench-"), gcs_port=gcs_port, num_cpus=3):
        common = {"model": model, "num_cpus": 1, "token_env": None, "batch_wait_ms": wait_ms,
                  "max_queued_requests": 4 * max(levels), "warmup_rounds": 3, "gpus_per_replica": gpus_per_replica}
        serve.run_many([
            serve.RunTarget(build_app({**common, "max_batch_pairs": batched_pairs}), name="batched", route_prefix="/batched"),
            serve.RunTarget(build_app({**common, "max_batch_pairs": 1}), name="unbatched", route_prefix="/unbatched"),
        ])
        for app in ("batched", "unbatched"):
            url = f"http://127.0.0.1:{port}/{app}/readyz"
            if not poll(lambda: requests.get(url, timeout=10).status_code == 200 or None, timeout=120, interval=0.2):
                raise RuntimeError(f"/{app} not ready after 120 s")
        bodies = request_bodies()
        for app in ("batched", "unbatched"):
            rows += http_sweep(f"http://127.0.0.1:{port}/{app}/v1/relations", app, bodies, levels, seconds)
        for app in ("batched", "unbatched"):
            stats = requests.get(f"http://127.0.0.1:{port}/{app}/readyz", timeout=10).json()["batching"]
            print(f"# /{app}: {stats['batches']} model calls for {stats['requests']} requests, "
                  f"mean {stats['mean_batch_pairs']} pairs per call, largest {stats['largest_batch_pairs']}")
    return rows


# ---- output -----------------------------------------------------------------------------------------------------------
HEADER = ("| config | clients | sent | 200 | 4xx | 5xx | errors | requests/s | pairs/s | p50 ms | p95 ms | p99 ms |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def print_row(row: Row) -> None:
    accounted = row.ok + row.client_errors + row.server_errors + row.transport_errors
    if accounted != row.sent:
        raise RuntimeError(f"{row.config}/{row.clients}: {row.sent} sent but {accounted} accounted for")
    print(f"| {row.config} | {row.clients} | {row.sent} | {row.ok} | {row.client_errors} | {row.server_errors} | "
          f"{row.transport_errors} | {row.rps:.1f} | {row.pairs_per_s:.0f} | {row.p50_ms:.0f} | {row.p95_ms:.0f} | "
          f"{row.p99_ms:.0f} |", flush=True)


def print_ratios(rows: list[Row]) -> None:
    by = {(r.config, r.clients): r for r in rows}
    print("\n| clients | batched requests/s | unbatched requests/s | ratio | batched p50 ms | unbatched p50 ms |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for clients in sorted({r.clients for r in rows}):
        batched, unbatched = by.get(("batched", clients)), by.get(("unbatched", clients))
        if batched and unbatched:
            ratio = batched.rps / unbatched.rps if unbatched.rps else float("inf")
            print(f"| {clients} | {batched.rps:.1f} | {unbatched.rps:.1f} | {ratio:.2f}x | {batched.p50_ms:.0f} | "
                  f"{unbatched.p50_ms:.0f} |")


def train_default_model(folder: Path, encoder: str) -> Path:
    """A model to load-test when none is given: the smoke config (tiny random BERT) or MiniLM, briefly trained."""
    from drugprot.config import SAMPLE_DIR, load_config
    from drugprot.training import train

    overrides = [f"data.dir={SAMPLE_DIR}", "train.epochs=1", "train.device=cpu", "train.threads=1"]
    if encoder == "minilm":
        config = load_config(REPO / "configs" / "minilm.yaml", overrides + ["data.max_train_docs=4", "data.max_dev_docs=2"])
    else:
        config = load_config(REPO / "configs" / "smoke.yaml", overrides + ["train.lr=3e-3"])
    train(config, folder, progress=False, log=lambda _: None)
    return folder / "model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model or ensemble folder (default: train one, see --encoder)")
    parser.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny", help="the default model's encoder")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="client counts (default 1,8,32,64)")
    parser.add_argument("--seconds", type=float, default=8.0, help="sending time per level and configuration")
    parser.add_argument("--batched-pairs", type=int, default=64, help="max_batch_pairs of the batched configuration")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="batch_wait_ms of both configurations")
    parser.add_argument("--port", type=int, default=8115, help="Serve HTTP port on 127.0.0.1")
    parser.add_argument("--gcs-port", type=int, default=6427, help="Ray GCS port of the private Ray")
    parser.add_argument("--in-process", "--gpu", dest="in_process", action="store_true",
                        help="no Ray, no HTTP: the same RelationService + PairBatcher + Predictor path in this process")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="--in-process device")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0,
                        help="Serve mode: GPUs per model replica of each configuration (> 0: CUDA, bf16; 0.5 puts "
                             "both on one card)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    levels = tuple(int(x) for x in args.levels.split(","))
    scratch = None
    model = args.model
    started = time.monotonic()
    if model is None:
        scratch = Path(tempfile.mkdtemp(prefix="drugprot-serve-bench-model-"))
        model = str(train_default_model(scratch, args.encoder))
        print(f"# model: {args.encoder} encoder trained for the benchmark ({time.monotonic() - started:.0f} s)")
    try:
        print(f"# {len(request_bodies())} development documents, one per request; {args.seconds:g} s per level; "
              f"batched = up to {args.batched_pairs} pairs per model call, wait {args.wait_ms:g} ms; unbatched = 1 request per call")
        if args.in_process:
            import torch

            device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            print(f"# IN-PROCESS (no Ray Serve, no HTTP): RelationService + PairBatcher + Predictor on {device}"
                  f"{' (bf16)' if device == 'cuda' else ' (fp32)'}")
            print(HEADER)
            rows = in_process_benchmark(model, levels=levels, seconds=args.seconds, device=device,
                                        batched_pairs=args.batched_pairs, wait_ms=args.wait_ms)
        else:
            where = (f"{args.gpus_per_replica:g} GPU (bf16)" if args.gpus_per_replica
                     else "1 CPU, 1 torch thread")
            print(f"# Ray Serve over HTTP on 127.0.0.1, one replica per configuration ({where}); "
                  "load generator in a separate process")
            print(HEADER)
            rows = serve_benchmark(model, levels=levels, seconds=args.seconds, port=args.port, gcs_port=args.gcs_port,
                                   batched_pairs=args.batched_pairs, wait_ms=args.wait_ms,
                                   gpus_per_replica=args.gpus_per_replica)
        print_ratios(rows)
        print(f"# total {time.monotonic() - started:.0f} s")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Row", "in_process_benchmark", "serve_benchmark"]
