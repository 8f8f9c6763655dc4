"""Small requests beside big ones, with and without cutting big requests into chunks: the same batcher, same run.

    python bench/serve_fairness.py                      # tiny model trained on the spot; 40 s per schedule
    python bench/serve_fairness.py --model DIR --seconds 60 --small-clients 4 --big-clients 4

In this process, without Ray or HTTP (the path of ``bench/serve_load.py --in-process``: the pydantic request
model, limits, candidates, ``ModelService``'s ``PairBatcher``, decode). For each schedule, ``--small-clients``
asyncio clients send one development document per request the whole time; a quarter into it, ``--big-clients``
start sending the 4,040-pair request of ``bench/serve_chaos.py``'s ``big`` phase (one sentence, 40 chemicals amid
101 genes, ``"interval": [-50, 50]``). Schedules, one model and one set of bodies:

* ``chunked``: as served: a job over ``max_batch_pairs`` is cut into chunks that take turns with the other jobs;
* ``whole``: the batcher before chunking: jobs are never cut, batches are the FIFO prefix of whole jobs that fits
  ``max_batch_pairs`` (a bigger job runs alone in one model call).

Per schedule: the small requests' p50/p99 before the first big request (the baseline, same schedule) and while big
ones ran, their ratio, and the big requests answered with their p50/p99. The JSON line adds ``whole/chunked``
ratios of the small requests' latency under the big ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "platform")]

from serve_chaos import big_request  # noqa: E402
from serve_load import percentile, request_bodies, train_default_model  # noqa: E402

SCHEDULES = ("chunked", "whole")


async def _schedule(service, *, small_clients: int, big_clients: int, seconds: float) -> dict:
    """Small clients for ``seconds``, big ones from a quarter in; latencies (ms) of each kind before and under."""
    from drugprot.serving.schemas import RelationsRequest

    small_bodies = [RelationsRequest.model_validate(b) for b in request_bodies()]
    big_body = RelationsRequest.model_validate(big_request())
    began = time.monotonic()
    deadline = began + seconds
    small: list[tuple[float, float]] = []  # (sent, latency s)
    big: list[tuple[float, float]] = []
    failed = 0
    counter = iter(range(10**9))

    async def client(bodies, record, start_at: float):
        nonlocal failed
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))  # pacing: each client starts on schedule
        while time.monotonic() < deadline:
            body = bodies[next(counter) % len(bodies)]
            sent = time.monotonic()
            try:
                await service.relations(body)
            except Exception:  # counted, like a 5xx
                failed += 1
                continue
            record.append((sent, time.monotonic() - sent))

    await asyncio.gather(*(client(small_bodies, small, began) for _ in range(small_clients)),
                         *(client([big_body], big, began + seconds / 4) for _ in range(big_clients)))
    big_from = min(sent for sent, _ in big) if big else began + seconds / 4
    big_until = max(sent + latency for sent, latency in big) if big else deadline
    before = [latency * 1000 for sent, latency in small if sent < big_from]
    under = [latency * 1000 for sent, latency in small if big_from <= sent and sent + latency <= big_until]
    big_ms = [latency * 1000 for _, latency in big]
    return {"small_before": len(before), "small_p50_ms_before": round(percentile(before, 50), 1),
            "small_p99_ms_before": round(percentile(before, 99), 1), "small_under": len(under),
            "small_p50_ms_under": round(percentile(under, 50), 1), "small_p99_ms_under": round(percentile(under, 99), 1),
            "p99_ratio": round(percentile(under, 99) / percentile(before, 99), 2) if before and under else None,
            "big_answered": len(big_ms), "big_p50_ms": round(percentile(big_ms, 50), 1),
            "big_p99_ms": round(percentile(big_ms, 99), 1), "failed": failed}


def fairness_benchmark(model: str, *, small_clients: int, big_clients: int, seconds: float, max_batch_pairs: int,
                       threads: int) -> dict:
    from drugprot.inference import load_predictor
    from drugprot.serving.options import parse_options
    from drugprot.serving.service import ModelService, RelationService, configure_torch_threads

    configure_torch_threads(threads)
    predictor = load_predictor(model, device="cpu")
    options = parse_options({"model": model, "max_batch_pairs": max_batch_pairs, "warmup_rounds": 2})
    result: dict = {"bench": "serve_fairness", "small_clients": small_clients, "big_clients": big_clients,
                    "seconds": seconds, "max_batch_pairs": max_batch_pairs, "threads": threads}
    for schedule in SCHEDULES:
        model_service = ModelService(predictor, options)
        if schedule == "whole":
            model_service.batcher.split = model_service.batcher.join = None  # the batcher before chunking
        model_service.start_warmup().result()
        service = RelationService(model_service, options)
        result[schedule] = asyncio.run(_schedule(service, small_clients=small_clients, big_clients=big_clients,
                                                 seconds=seconds))
        result[schedule]["largest_batch_pairs"] = model_service.batcher.stats.largest_pairs
        asyncio.run(model_service.close())
        print(f"# {schedule}: {json.dumps(result[schedule])}", file=sys.stderr, flush=True)
    for q in ("p50", "p99"):
        key = f"small_{q}_ms_under"
        chunked, whole = result["chunked"][key], result["whole"][key]
        result[f"whole_over_chunked_{q}_under"] = round(whole / chunked, 2) if chunked else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model or ensemble folder (default: train a tiny one, see --encoder)")
    parser.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny", help="the default model's encoder")
    parser.add_argument("--seconds", type=float, default=40.0, help="sending time per schedule")
    parser.add_argument("--small-clients", type=int, default=4, help="clients sending one development document each")
    parser.add_argument("--big-clients", type=int, default=4, help="clients sending the 4,040-pair request")
    parser.add_argument("--max-batch-pairs", type=int, default=64, help="the batch budget (the serving default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="drugprot-serve-fairness-"))
    try:
        model = args.model or str(train_default_model(scratch / "model", args.encoder))
        print(json.dumps(fairness_benchmark(model, small_clients=args.small_clients, big_clients=args.big_clients,
                                            seconds=args.seconds, max_batch_pairs=args.max_batch_pairs,
                                            threads=args.threads)), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
