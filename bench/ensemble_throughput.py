"""Benchmark: ensemble inference throughput, one member vs a looped ensemble vs a stacked ensemble.

Run from the repository root:
``.venv/bin/python bench/ensemble_throughput.py [--encoder tiny-random|minilm|bert-base-random|PATH] [--members 5]
[--pairs 400] [--device cpu|cuda|auto] [--precision bf16|fp32] [--json]``

Timed path: ``Predictor.member_probabilities`` (the platform's inference path: marker encoding, token-budget
batches, forward, softmax) on the same candidate pairs of the bundled sample (documents repeated until
``--pairs`` is reached), for

* one member (the baseline, measured in the same run),
* M members looped (``execution="loop"``: each member encodes and runs every batch in turn),
* M members stacked (``execution="fold"``: one encoding, one folded forward per batch).

Each path runs once to warm up, then the paths run round-robin ``--repeats`` times (load on a shared machine
hits them alike); each path's best time gives pairs/s. Printed ratios are
``ensemble pairs/s ÷ one-member pairs/s`` (a perfect M-member ensemble would reach 1/M of the single member's
pairs/s when it is compute-bound; the issue's goal on a GPU is stacked ≥ 0.35× with 5 members, where a loop
gives about 0.2×). The largest difference between looped and stacked probabilities is printed as a check.
Members are randomly initialised copies of the encoder (different seeds for the heads), which costs the same
as trained ones. ``bert-base-random`` is a BERT-base-shaped random encoder with the MiniLM vocabulary, for
GPU-sized numbers without a download.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from drugprot.candidates import document_candidates
from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split
from drugprot.encoding import add_marker_tokens
from drugprot.inference import Predictor
from drugprot.model.artifacts import LoadedModel
from drugprot.model.encoder import TINY_DEFAULTS, build_encoder, load_tokenizer
from drugprot.model.heads import RelationModel

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


RANDOM_ENCODERS = {"tiny-random": TINY_DEFAULTS, "bert-base-random": BERT_BASE}


def make_members(encoder: str, count: int, max_length: int, tokenizer_source: str | None = None) -> list[LoadedModel]:
    """``count`` same-architecture members: copies of a pretrained encoder, or seeded random BERTs, each with its
    own randomly initialised head (seed = member index)."""
    from transformers import BertConfig, BertModel

    tokenizer = load_tokenizer(tokenizer_source or ("minilm" if encoder in RANDOM_ENCODERS else encoder))
    add_marker_tokens(tokenizer)
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        if encoder in RANDOM_ENCODERS:  # built here (not build_encoder) so any tokenizer folder works offline
            enc = BertModel(BertConfig(vocab_size=len(tokenizer), **{"max_position_embeddings": 512, **RANDOM_ENCODERS[encoder]}),
                            add_pooling_layer=False)
        else:
            enc = build_encoder(encoder, seed=seed)
            enc.resize_token_embeddings(len(tokenizer))
        model = RelationModel(enc, system="baseline", dropout=0.1)
        info = {"max_length": max_length, "markers": "coarse", "system": "baseline", "interval": [-10, 16], "encoder": encoder}
        members.append(LoadedModel(Path("."), model, tokenizer, info))
    return members


def workload(pairs: int, interval=(-10, 16)):
    """Sample documents (repeated under new PMIDs) until their candidates reach ``pairs``."""
    import dataclasses

    base = [*read_split(SAMPLE_DIR, "development").documents, *read_split(SAMPLE_DIR, "training").documents]
    documents, candidates, copy = [], [], 0
    while len(candidates) < pairs:
        for doc in base:
            clone = dataclasses.replace(doc, pmid=f"{doc.pmid}-{copy}") if copy else doc
            documents.append(clone)
            candidates.extend(document_candidates(clone, interval))
            if len(candidates) >= pairs:
                break
        copy += 1
    return documents, candidates


def best_times(predictors: dict[str, Predictor], documents, candidates, repeats: int) -> tuple[dict[str, float], dict]:
    """Warm every path up once, then time them round-robin ``repeats`` times (a shared machine's load hits all
    paths alike); the best time of each path, and each path's probabilities."""
    probs = {name: p.member_probabilities(documents, candidates) for name, p in predictors.items()}
    best = {name: float("inf") for name in predictors}
    for _ in range(repeats):
        for name, predictor in predictors.items():
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            predictor.member_probabilities(documents, candidates)
            best[name] = min(best[name], time.perf_counter() - started)
    return best, probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="tiny-random", help="tiny-random, minilm, bert-base-random or a local folder")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the encoder's; minilm for the random encoders)")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16 autocast on CUDA; CPU runs fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="also print one JSON line with every number")
    parser.add_argument("--json-out", type=Path, help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    documents, candidates = workload(args.pairs)
    members = make_members(args.encoder, args.members, args.max_length, args.tokenizer)
    common = {"device": args.device, "precision": args.precision, "interval": (-10, 16)}

    one = Predictor(members[:1], execution="loop", **common)
    predictors = {"one": one, "loop": Predictor(members, execution="loop", **common)}
    # stacking after the loop predictor exists: fold shares the members' storage
    predictors["fold"] = Predictor(members, execution="fold", **common)
    seconds, probs = best_times(predictors, documents, candidates, args.repeats)
    results = {name: len(candidates) / s for name, s in seconds.items()}
    differences = {"fold": float((probs["fold"] - probs["loop"]).abs().max())}

    device = one.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"ensemble throughput: encoder {args.encoder}, {args.members} members, {len(candidates)} pairs in "
          f"{len(documents)} documents, max_length {args.max_length}, {name}, precision "
          f"{args.precision if device.type == 'cuda' else 'fp32'}, best of {args.repeats}")
    print(f"{'path':<28} {'pairs/s':>10} {'× one member':>14}")
    print(f"{'one member':<28} {results['one']:>10.1f} {1.0:>14.3f}")
    print(f"{f'{args.members} members, loop':<28} {results['loop']:>10.1f} {results['loop'] / results['one']:>14.3f}")
    label = f"{args.members} members, stacked (fold)"
    print(f"{label:<28} {results['fold']:>10.1f} {results['fold'] / results['one']:>14.3f}"
          f"   max |Δp| vs loop {differences['fold']:.2e}")
    print("goal on a GPU: stacked ≥ 0.35× one member with 5 members (loop ≈ 0.2×); stacked ÷ loop = "
          f"{results['fold'] / results['loop']:.2f}×")
    summary = {"bench": "ensemble_throughput", "encoder": args.encoder, "members": args.members, "pairs": len(candidates),
               "device": name, "precision": args.precision if device.type == "cuda" else "fp32", "pairs_per_s": results,
               "ratio_to_one": {k: v / results["one"] for k, v in results.items()}, "max_abs_diff_vs_loop": differences}
    if args.json:
        print(json.dumps(summary))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
