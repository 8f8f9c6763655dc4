"""Training throughput of our loop against a plain loop, same encoder, same pairs, same run.

Ours: ids encoded once per corpus (drugprot.encoding), token-budget length-bucketed batches, bf16 autocast and
fused AdamW on a GPU. Plain: per-step tokenization of marked sentences with the tokenizer, fixed padding to 256,
a fixed batch size, fp32 on CPU / bf16 autocast on GPU, ordinary (foreach) AdamW. Both run the one optimisation
step of the package, ``drugprot.training.train_step``, on a RelationModel (baseline head) started from the same
weights, over the same pairs (each pass sees every pair once, up to ``--max-seconds``).

Useful TFLOP/s = 6 × non-embedding parameters × real (non-pad) tokens per second: the work that the
training signal needs; padding is waste and is not counted.

``--loops`` adds ``compiled`` (ours under ``torch.compile`` with shape buckets: each batch planned with and padded
to the next of 64, 128, 192, 256 tokens) and ``cuda-graphs`` (the same with mode reduce-overhead: each bucket's
shape replayed as one CUDA graph), both from ``drugprot.model.compiled`` as ``train.compile`` runs them. They see the
same pairs as ours, so the same useful FLOPs; compilation runs in an untimed warm-up, one batch of each shape.

    python bench/train_throughput.py --encoder minilm --pairs 256              # CPU, bundled sample
    python bench/train_throughput.py --encoder bert-base-random --tokenizer .gpu/minilm \\
        --data /tmp/drugprot-gpu/drugprot --pairs 8192 --device cuda          # GPU (corpus as bench/gpu.sh unpacks it)

``--encoder``: tiny-random (2 layers, 32 hidden), minilm (offline all-MiniLM-L6-v2), bert-base-random (BERT-base
shape 768/12/12/3072, random weights, no download), or a local Hugging Face folder. Random encoders take their
vocabulary from ``--tokenizer`` (default: the offline MiniLM; pass a folder where that package is absent).
Imports only torch, transformers and drugprot modules that avoid Ray, MLflow and Optuna.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "platform") not in sys.path:  # runs from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(REPO / "platform"))

import torch  # noqa: E402

from drugprot.candidates import DEFAULT_INTERVAL, Candidate, corpus_candidates  # noqa: E402
from drugprot.config import SAMPLE_DIR  # noqa: E402
from drugprot.corpus import CHEMICAL, Document, read_split  # noqa: E402
from drugprot.encoding import (  # noqa: E402
    LABEL_INDEX, LABELS, Batch, EncodedPair, PairEncoder, add_marker_tokens, collate, gene_marker_type, marker_tokens,
    token_budget_batches,
)
from drugprot.model.encoder import TINY_DEFAULTS, build_encoder, load_tokenizer  # noqa: E402
from drugprot.model.compiled import compiled_forward, planned_batches, to_bucket  # noqa: E402
from drugprot.model.heads import RelationModel  # noqa: E402
from drugprot.model.optim import build_optimizer  # noqa: E402
from drugprot.model.runtime import resolve_device  # noqa: E402
from drugprot.training import non_embedding_parameters, train_step  # noqa: E402

RANDOM_SHAPES = {
    "tiny-random": TINY_DEFAULTS,
    "bert-base-random": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072, "max_position_embeddings": 512},
}
PLAIN_LENGTH = 256
LOOPS = ("plain", "ours", "compiled", "cuda-graphs")


@dataclass
class LoopResult:
    name: str
    pairs: int
    steps: int
    seconds: float
    real_tokens: int
    padded_tokens: int
    final_loss: float

    def row(self, params: int) -> dict:
        return {"loop": self.name, "pairs": self.pairs, "steps": self.steps, "seconds": round(self.seconds, 3),
                "pairs_per_s": self.pairs / self.seconds, "real_tokens_per_s": self.real_tokens / self.seconds,
                "padded_tokens_per_s": self.padded_tokens / self.seconds,
                "real_tokens": self.real_tokens, "padding_pct": 100 * (1 - self.real_tokens / max(1, self.padded_tokens)),
                "useful_tflops": 6 * params * self.real_tokens / self.seconds / 1e12, "final_loss": self.final_loss}


def build_model(encoder_name: str, tokenizer, seed: int) -> RelationModel:
    if encoder_name in RANDOM_SHAPES:
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=len(tokenizer), **RANDOM_SHAPES[encoder_name])
        torch.manual_seed(seed)
        encoder = BertModel(config, add_pooling_layer=False)
    else:
        encoder = build_encoder(encoder_name, seed=seed)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.manual_seed(seed)
    return RelationModel(encoder, system="baseline", dropout=0.1)


def load_bench_tokenizer(encoder_name: str, tokenizer_source: str | None):
    source = tokenizer_source or ("minilm" if encoder_name in RANDOM_SHAPES else encoder_name)
    tokenizer = load_tokenizer(source)
    add_marker_tokens(tokenizer)
    return tokenizer


def select_pairs(data: Path, split: str, tokenizer, n: int, seed: int, max_length: int,
                 max_docs: int | None = None) -> tuple[dict[str, Document], list[Candidate], list[EncodedPair]]:
    """N encodable candidates drawn with the seed; their cached-id encodings index into the returned list."""
    documents = read_split(data, split).documents[:max_docs]
    candidates, _ = corpus_candidates(documents, DEFAULT_INTERVAL)
    random.Random(seed).shuffle(candidates)
    pairs, _ = PairEncoder(tokenizer, max_length=max_length, markers="coarse").encode(documents, candidates)
    pairs = pairs[:n]
    chosen = [candidates[p.index] for p in pairs]
    pairs = [EncodedPair(p.input_ids, p.subject, p.object, p.target, p.entity_types, i) for i, p in enumerate(pairs)]
    return {d.pmid: d for d in documents}, chosen, pairs


def marked_text(doc: Document, cand: Candidate) -> str:
    """The pair's sentence with marker strings inserted around both entities (what a plain pipeline feeds in)."""
    start, end = cand.sentence
    text = doc.text
    gene_kind = gene_marker_type(cand.gene.type, "coarse")
    inserts = [(cand.chemical.start, 1, marker_tokens(CHEMICAL, "S")[0]), (cand.chemical.end, 0, marker_tokens(CHEMICAL, "S")[1]),
               (cand.gene.start, 1, marker_tokens(gene_kind, "O")[0]), (cand.gene.end, 0, marker_tokens(gene_kind, "O")[1])]
    pieces, previous = [], start
    for offset, _, marker in sorted(inserts):
        pieces += [text[previous:offset], f" {marker} "]
        previous = offset
    pieces.append(text[previous:end])
    return "".join(pieces)


def plain_batch(docs: dict[str, Document], candidates: list[Candidate], tokenizer, s_open: int, o_open: int) -> Batch:
    """Per-step tokenization, fixed padding to 256; a marker cut off by truncation points at [CLS] (position 0)."""
    encoded = tokenizer([marked_text(docs[c.pmid], c) for c in candidates], padding="max_length", truncation=True,
                        max_length=PLAIN_LENGTH, return_tensors="pt")
    ids = encoded["input_ids"]
    target = torch.zeros(len(candidates), len(LABELS))
    for row, cand in enumerate(candidates):
        for label in cand.labels or ("NONE",):
            target[row, LABEL_INDEX[label]] = 1.0 / max(1, len(cand.labels))
    return Batch(ids, encoded["attention_mask"], (ids == s_open).int().argmax(1), (ids == o_open).int().argmax(1),
                 target, torch.zeros(len(candidates), 2, dtype=torch.long), torch.arange(len(candidates)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(name: str, model: RelationModel, optimizer, batches, *, device: torch.device, precision: str,
             max_seconds: float, warmup: int = 2, forward=None, warm_every_shape: bool = False) -> LoopResult:
    """Warm up on the first ``warmup`` batches (untimed), then time one pass (or ``max_seconds``) of ``batches``.

    ``warm_every_shape``: warm up on one batch of each shape instead (a compiled forward compiles each once)."""
    batches = list(batches)
    warm = batches[:warmup]
    if warm_every_shape:
        shapes = {}
        for make in batches:
            shapes.setdefault(tuple(make().input_ids.shape), make)
        warm = list(shapes.values())
    for make in warm:
        train_step(model, make().to(device), optimizer, device=device, precision=precision, forward=forward)
    _sync(device)
    pairs = steps = real = padded = 0
    loss = torch.zeros(())
    start = time.perf_counter()
    for make in batches:
        host = make()  # built on the host: counting its tokens never waits for the device
        pairs += host.input_ids.size(0)
        real += int(host.attention_mask.sum())
        padded += host.input_ids.numel()
        loss, _ = train_step(model, host.to(device), optimizer, device=device, precision=precision, forward=forward)
        steps += 1
        if time.perf_counter() - start > max_seconds:
            break
    _sync(device)
    return LoopResult(name, pairs, steps, time.perf_counter() - start, real, padded, float(loss))


def measure(*, encoder: str = "minilm", tokenizer_source: str | None = None, data: Path = SAMPLE_DIR,
            split: str = "training", pairs: int = 256, device: str = "auto", batch_size: int | None = None,
            token_budget: int | None = None, max_batch_pairs: int = 64, max_length: int = PLAIN_LENGTH,
            lr: float = 5e-5, max_seconds: float | None = None, seed: int = 0, max_docs: int | None = None,
            loops=("plain", "ours"), log=print) -> dict:
    """Run the loops; returns the summary that :func:`format_table` prints (defaults depend on the device)."""
    unknown = sorted(set(loops) - set(LOOPS))
    if unknown:
        raise ValueError(f"loops: unknown {unknown} (known: {', '.join(LOOPS)})")
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    token_budget = token_budget or (8192 if gpu else 1024)  # the paper config on GPU; small steps on CPU
    max_seconds = max_seconds or (40.0 if gpu else 25.0)
    warmup = 3 if gpu else 1
    tokenizer = load_bench_tokenizer(encoder, tokenizer_source)
    docs, candidates, encoded = select_pairs(Path(data), split, tokenizer, pairs, seed, max_length, max_docs)
    initial = build_model(encoder, tokenizer, seed)
    params = non_embedding_parameters(initial)
    batch_size = batch_size or (32 if gpu else 4)  # CPU: 4 × 256 = the same 1024 padded tokens a step as ours
    precision = "bf16"  # autocast on CUDA only; CPU runs fp32 (drugprot.model.runtime.autocast)
    s_open = tokenizer.convert_tokens_to_ids(marker_tokens(CHEMICAL, "S")[0])
    o_open = tokenizer.convert_tokens_to_ids(marker_tokens("GENE", "O")[0])
    log(f"encoder {encoder}: {params / 1e6:.1f}M non-embedding parameters; {len(encoded)} pairs from {data}/{split}; "
        f"device {dev}{'' if dev.type == 'cuda' else f', {torch.get_num_threads()} threads'}")

    buckets = [*range(64, max_length, 64), max_length]
    results = []
    for loop in loops:
        model = copy.deepcopy(initial).to(dev)
        forward = None
        if loop == "plain":
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
            order = list(range(len(candidates)))
            random.Random(seed).shuffle(order)
            chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            makers = [lambda c=chunk: plain_batch(docs, [candidates[i] for i in c], tokenizer, s_open, o_open) for chunk in chunks]
            name = f"plain (pad {PLAIN_LENGTH}, batch {batch_size}, per-step tokenize)"
        else:
            optimizer = build_optimizer(model, lr=lr, weight_decay=0.01, device=dev)
            groups = token_budget_batches(encoded, token_budget=token_budget, max_pairs=max_batch_pairs, shuffle_seed=seed)
            makers = [lambda g=group: collate([encoded[i] for i in g], tokenizer.pad_token_id) for group in groups]
            name = f"ours (cached ids, budget {token_budget}{', bf16, fused AdamW' if gpu else ''})"
            if loop != "ours":
                mode = "reduce-overhead" if loop == "cuda-graphs" else "default"
                groups = planned_batches(encoded, token_budget=token_budget, max_pairs=max_batch_pairs, buckets=buckets,
                                         shuffle_seed=seed)
                makers = [lambda g=group: to_bucket(collate([encoded[i] for i in g], tokenizer.pad_token_id), buckets,
                                                    tokenizer.pad_token_id) for group in groups]
                forward = compiled_forward(model, enabled=True, mode=mode, buckets=buckets)
                name = f"ours + torch.compile {mode}, buckets {buckets[0]}..{buckets[-1]}"
        results.append(run_loop(name, model, optimizer, makers, device=dev, precision=precision, max_seconds=max_seconds,
                                warmup=warmup, forward=forward, warm_every_shape=forward is not None))
        del model, optimizer
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rows = [r.row(params) for r in results]
    summary = {"encoder": encoder, "device": str(dev), "non_embedding_parameters": params, "pairs": len(encoded),
               "rows": rows}
    if len(rows) >= 2:  # every loop against the first (the baseline measured in this run)
        summary["ratio_pairs_per_s"] = rows[1]["pairs_per_s"] / rows[0]["pairs_per_s"]
        summary["ratio_useful_tflops"] = rows[1]["useful_tflops"] / rows[0]["useful_tflops"]
        summary["ratios"] = {r["loop"]: {"pairs_per_s": r["pairs_per_s"] / rows[0]["pairs_per_s"],
                                         "useful_tflops": r["useful_tflops"] / rows[0]["useful_tflops"]} for r in rows[1:]}
    return summary


def format_table(summary: dict) -> str:
    header = f"{'loop':<58}{'pairs':>7}{'steps':>7}{'s':>8}{'pairs/s':>10}{'real tok/s':>12}{'pad %':>7}{'useful TFLOP/s':>16}"
    lines = [header, "-" * len(header)]
    for r in summary["rows"]:
        lines.append(f"{r['loop']:<58}{r['pairs']:>7}{r['steps']:>7}{r['seconds']:>8.2f}{r['pairs_per_s']:>10.1f}"
                     f"{r['real_tokens_per_s']:>12.0f}{r['padding_pct']:>7.1f}{r['useful_tflops']:>16.4f}")
    first = summary["rows"][0]["loop"].split(" (")[0]
    for loop, ratio in summary.get("ratios", {}).items():
        lines.append(f"ratio {loop.split(' (')[0]} / {first}: pairs/s x{ratio['pairs_per_s']:.2f}, "
                     f"useful TFLOP/s x{ratio['useful_tflops']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="minilm", help="tiny-random | minilm | bert-base-random | local folder")
    parser.add_argument("--tokenizer", help="tokenizer folder for random encoders (default: the offline MiniLM)")
    parser.add_argument("--pairs", type=int, default=256, help="pairs per pass (the same ones for both loops)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--data", type=Path, default=SAMPLE_DIR, help="corpus folder (default: the bundled sample)")
    parser.add_argument("--split", default="training")
    parser.add_argument("--max-docs", type=int, help="read only the first N documents of the split")
    parser.add_argument("--batch-size", type=int, help="plain loop batch size (default 32 on GPU, 4 on CPU)")
    parser.add_argument("--token-budget", type=int, help="our padded tokens per batch (default 8192 on GPU, 1024 on CPU)")
    parser.add_argument("--max-batch-pairs", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, help="time cap per timed pass (default 40 on GPU, 25 on CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loops", default="plain,ours", help=f"loops to time, the first is the baseline "
                                                              f"(default plain,ours; known: {','.join(LOOPS)})")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no load reports or resize notices in the table
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = measure(encoder=args.encoder, tokenizer_source=args.tokenizer, data=args.data, split=args.split,
                      pairs=args.pairs, device=args.device, batch_size=args.batch_size, token_budget=args.token_budget,
                      max_batch_pairs=args.max_batch_pairs, max_seconds=args.max_seconds, seed=args.seed,
                      max_docs=args.max_docs, loops=tuple(args.loops.split(",")))
    print(format_table(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
