"""Where a GPU training step's time goes: our step timed in variants on the same batches, then torch.profiler.

The first H200 run (bench/gpu.sh, 2026-11-30) trained MiniLM at only ~770 pairs/s and timed our loop at 0.64x the
plain one on bert-base, at ~185 ms a step for ~4,900 tokens. This script separated the suspects; on that machine
page-locking each batch cost 21x the MiniLM step (343 ms against 16 ms), so training copies batches unpinned now:

* ``as trained``: what drugprot.training does (host batch copied as it is, fused AdamW, a new shape most steps);
* ``pinned``: the same batches page-locked first and copied non-blocking (what training did before);
* ``one shape``: the same batches padded to ``--max-length`` (every step the same shape);
* a profile of ``as trained``: the ops with the most host time and the most device time, and the device's busy
  share of the wall time.

    PYTHONPATH=platform:.gpu/site python bench/gpu_step_profile.py --encoder .gpu/minilm --data DIR [--json-out F]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from train_throughput import build_model, load_bench_tokenizer, select_pairs  # noqa: E402

from drugprot.encoding import Batch, collate, token_budget_batches  # noqa: E402
from drugprot.model.optim import build_optimizer  # noqa: E402
from drugprot.model.runtime import resolve_device  # noqa: E402
from drugprot.training import train_step  # noqa: E402


def padded_to(batch, length: int, pad_id: int):
    """The batch with its token axis padded to ``length`` (so every step has one shape)."""
    extra = length - batch.input_ids.size(1)
    pad = torch.nn.functional.pad
    return dataclasses.replace(batch, input_ids=pad(batch.input_ids, (0, extra), value=pad_id),
                          attention_mask=pad(batch.attention_mask, (0, extra), value=0))


def timed(name, model, optimizer, batches, device, *, pin: bool, warmup: int = 3) -> dict:
    pin = pin and device.type == "cuda"

    def to_device(host):
        if pin:
            host = Batch(*(getattr(host, f).pin_memory() for f in host.__slots__))
        return host.to(device, non_blocking=pin)

    for host in batches[:warmup]:
        train_step(model, to_device(host), optimizer, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for host in batches:
        train_step(model, to_device(host), optimizer, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    pairs = sum(b.input_ids.size(0) for b in batches)
    row = {"variant": name, "steps": len(batches), "ms_per_step": 1000 * seconds / len(batches),
           "pairs_per_s": pairs / seconds}
    print(f"  {name:<12} {row['ms_per_step']:8.1f} ms/step {row['pairs_per_s']:9.0f} pairs/s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="tiny-random", help="tiny-random, minilm, bert-base-random or a folder")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random encoders")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--max-docs", type=int, default=600)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    tokenizer = load_bench_tokenizer(args.encoder, args.tokenizer)
    _, _, encoded = select_pairs(args.data, "training", tokenizer, args.pairs, 0, args.max_length, args.max_docs)
    groups = token_budget_batches(encoded, token_budget=args.token_budget, max_pairs=64, shuffle_seed=0)
    batches = [collate([encoded[i] for i in g], tokenizer.pad_token_id) for g in groups]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    print(f"{args.encoder} on {device}: {len(encoded)} pairs in {len(batches)} batches, {tokens / len(batches):.0f} "
          f"real tokens a step, {len({b.input_ids.shape for b in batches})} distinct shapes", flush=True)
    initial = build_model(args.encoder, tokenizer, 0)

    rows = []
    variants = [("as trained", batches, False), ("pinned", batches, True),
                ("one shape", [padded_to(b, args.max_length, tokenizer.pad_token_id) for b in batches], False)]
    for name, variant_batches, pin in variants:
        model = copy.deepcopy(initial).to(device)
        optimizer = build_optimizer(model, lr=5e-5, weight_decay=0.01, device=device)
        rows.append(timed(name, model, optimizer, variant_batches, device, pin=pin))

    model = initial.to(device)
    optimizer = build_optimizer(model, lr=5e-5, weight_decay=0.01, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = batches[:8]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for host in steps:
            train_step(model, host.to(device), optimizer, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
    busy = None
    if device.type == "cuda":
        print(averages.table(sort_by="self_device_time_total", row_limit=10))
        busy = sum(e.self_device_time_total for e in averages) / 1e6 / wall
        print(f"device busy {100 * busy:.1f}% of {wall:.2f} s wall over {len(steps)} profiled steps")
    summary = {"bench": "gpu_step_profile", "encoder": args.encoder, "device": str(device), "rows": rows,
               "profiled_wall_s": wall, "device_busy_share": busy}
    print(json.dumps(summary))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
