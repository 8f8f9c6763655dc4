"""Benchmark: CPU prediction, a plain Hugging Face fp32 loop vs the project's fp32, int8 and cascade paths, and their
label agreement with fp32; a 5-member stacked ensemble vs one member. All measured in one run, on the same pairs.

    python bench/cpu_predict.py --model runs/minilm/model [--data ../shared/data/drugprot] [--limit DOCS]

* plain loop (the baseline): what a user writes: candidates in corpus order, each pair's sentence with the four
  marker strings inserted, ``tokenizer(batch of 32, padding=True, truncation=True)``, the same model under
  ``torch.no_grad``, torch's default threads;
* project fp32 / int8: ``Predictor.member_probabilities`` (marker encoding from cached pieces, length-bucketed
  token-budget batches, one torch thread per core), int8 = dynamic quantization of the Linear layers;
* project cascade: a bf16 copy of the model scores every pair (oneDNN's AMX/AVX512-BF16 kernels), then the fp32
  model re-scores the pairs whose top-2 margin is below ``--cascade-margin``; its time includes the re-scoring;
  project bf16 = the cascade with margin 0 (the bf16 copy alone), to show what the re-scoring costs and buys;
* ensemble: the model loaded 5 times as an ensemble (stacked in fp32; int8 members run in turn), vs one member
  with the same precision. Copies cost what trained members cost.

Every path is warmed up, then the documents are split into ``--rounds`` chunks and every single-model path runs on
each chunk in turn, in an order that rotates by round: on a shared machine a change of load then hits every path
alike (the load average is printed). Its pairs/s is all pairs over the sum of its times.
Prints a table, the ratios, the fastest path whose labels agree with fp32 on >= 99.5% of the pairs ("best"), and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AGREEMENT_TARGET = 0.995  # issue 15: the best path counts only if its labels agree with fp32 on this share of pairs
SHARED = REPO.parent / "shared" / "data" / "drugprot"


def plain_loop(member, documents, candidates, batch_size: int = 32) -> float:
    """The baseline: seconds to score every candidate, the way a user would write it."""
    from drugprot.encoding import gene_marker_type, marker_tokens

    tokenizer, model, scheme = member.tokenizer, member.model, member.info["markers"]
    texts = {d.pmid: d.text for d in documents}

    def marked(c) -> str:
        start, end = c.sentence
        inserts = sorted([(c.chemical.start, c.chemical.end, *marker_tokens("CHEMICAL", "S")),
                          (c.gene.start, c.gene.end, *marker_tokens(gene_marker_type(c.gene.type, scheme), "O"))])
        text, out, at = texts[c.pmid], [], start
        for a, b, open_, close in inserts:
            out += [text[at:a], f" {open_} ", text[a:b], f" {close} "]
            at = b
        return "".join(out + [text[at:end]])

    subject_id = tokenizer.convert_tokens_to_ids(marker_tokens("CHEMICAL", "S")[0])
    object_ids = torch.tensor([tokenizer.convert_tokens_to_ids(marker_tokens(k, "O")[0]) for k in ("GENE", "GENE-Y", "GENE-N")])
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(candidates), batch_size):
            batch = tokenizer([marked(c) for c in candidates[i:i + batch_size]], padding=True, truncation=True,
                              max_length=member.info["max_length"], return_tensors="pt")
            ids = batch["input_ids"]
            subject = (ids == subject_id).int().argmax(1)
            obj = torch.isin(ids, object_ids).int().argmax(1)
            torch.softmax(model(ids, batch["attention_mask"], subject, obj)["logits"], -1)
    return time.perf_counter() - started


def timed_probabilities(predictor, documents, candidates) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    probs = predictor.member_probabilities(documents, candidates)
    return time.perf_counter() - started, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained member folder (DIR/model)")
    parser.add_argument("--data", type=Path, default=SHARED, help="corpus folder with a development split")
    parser.add_argument("--limit", type=int, help="only the first N development documents (quick runs)")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--skip-ensemble", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="document chunks; every path runs on each in turn")
    parser.add_argument("--cascade-margin", type=float, default=None, help="default: the Predictor's CASCADE_MARGIN")
    args = parser.parse_args()

    from drugprot.corpus import read_split
    from drugprot.inference import CASCADE_MARGIN, Predictor
    from drugprot.model.artifacts import load_artifact

    documents = read_split(args.data, "development").documents[: args.limit]
    load = os.getloadavg()
    default_threads = torch.get_num_threads()
    member = load_artifact(args.model)
    member.model.eval()
    fp32 = Predictor([member], device="cpu", precision="fp32")
    candidates = fp32.candidates(documents)
    pairs = len(candidates)
    cores = os.cpu_count() or 1
    margin = CASCADE_MARGIN if args.cascade_margin is None else args.cascade_margin
    paths = {"project_fp32": fp32,
             "project_int8": Predictor([load_artifact(args.model)], device="cpu", precision="int8"),
             "project_cascade": Predictor([load_artifact(args.model)], device="cpu", precision="cascade",
                                          cascade_margin=margin),
             "project_bf16": Predictor([load_artifact(args.model)], device="cpu", precision="cascade", cascade_margin=0.0)}
    plain_loop(member, documents, candidates[:32])  # warm-ups
    for predictor in paths.values():
        predictor.member_probabilities(documents[:4], predictor.candidates(documents[:4]))
    paths["project_cascade"].scored_pairs = paths["project_cascade"].rescored_pairs = 0
    seconds = dict.fromkeys(["plain_fp32", *paths], 0.0)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in paths}
    size = -(-len(documents) // args.rounds)
    for round_, at in enumerate(range(0, len(documents), size)):
        # interleaved rounds in a rotating order: a change of load on a shared machine hits every path alike
        chunk = documents[at:at + size]
        chunk_candidates = fp32.candidates(chunk)
        names = list(seconds)[round_ % len(seconds):] + list(seconds)[:round_ % len(seconds)]
        for name in names:
            if name == "plain_fp32":
                torch.set_num_threads(default_threads)
                seconds[name] += plain_loop(member, chunk, chunk_candidates)
                continue
            torch.set_num_threads(cores)  # one thread per core (the default here too, set for machines where it is not)
            took, probs = timed_probabilities(paths[name], chunk, chunk_candidates)
            seconds[name] += took
            parts[name].append(probs)
        done = sum(p.size(1) for p in parts["project_fp32"])
        print(f"round {round_ + 1}: {done} pairs, load average {os.getloadavg()[0]:.2f}, pairs/s so far: "
              + ", ".join(f"{name} {done / took:.1f}" for name, took in seconds.items()), file=sys.stderr)
    results = {name: pairs / seconds[name] for name in seconds}
    probs32, probs8, probs_cascade, probs16 = (torch.cat(parts[name], dim=1) for name in paths)
    cascade = paths["project_cascade"]
    rescored = cascade.rescored_pairs / cascade.scored_pairs
    labels32, labels8 = probs32[0].argmax(-1), probs8[0].argmax(-1)
    agreement = float((labels32 == labels8).float().mean())
    bf16_agreement = float((labels32 == probs16[0].argmax(-1)).float().mean())
    bf16_change = float((probs16 - probs32).abs().max())
    labels_cascade = probs_cascade[0].argmax(-1)
    cascade_agreement = float((labels32 == labels_cascade).float().mean())
    relations32, relations8 = int((labels32 != 0).sum()), int((labels8 != 0).sum())
    either = (labels32 != 0) | (labels8 != 0)
    agreement_on_relations = float((labels32[either] == labels8[either]).float().mean()) if either.any() else 1.0

    if not args.skip_ensemble:
        for precision in ("fp32", "int8"):
            ensemble = Predictor([load_artifact(args.model) for _ in range(args.members)], device="cpu", precision=precision)
            ensemble.member_probabilities(documents[:4], ensemble.candidates(documents[:4]))  # warm-up
            seconds, _ = timed_probabilities(ensemble, documents, candidates)
            results[f"ensemble{args.members}_{precision}"] = pairs / seconds
            results[f"ensemble{args.members}_{precision}_execution"] = ensemble.execution

    agreements = {"project_fp32": 1.0, "project_int8": agreement, "project_cascade": cascade_agreement,
                  "project_bf16": bf16_agreement}
    best = max((path for path, share in agreements.items() if share >= AGREEMENT_TARGET), key=results.get)
    ratios = {"best_vs_plain": results[best] / results["plain_fp32"],
              "fp32_vs_plain": results["project_fp32"] / results["plain_fp32"],
              "int8_vs_plain": results["project_int8"] / results["plain_fp32"],
              "cascade_vs_plain": results["project_cascade"] / results["plain_fp32"],
              "bf16_vs_plain": results["project_bf16"] / results["plain_fp32"]}
    if not args.skip_ensemble:
        for precision in ("fp32", "int8"):
            ratios[f"ensemble_{precision}_vs_one_member"] = (results[f"ensemble{args.members}_{precision}"]
                                                             / results[f"project_{precision}"])
    print(f"{len(documents)} development documents, {pairs} pairs, {cores} cores, load average {load[0]:.2f} "
          f"(default torch threads {default_threads})")
    for name, value in results.items():
        print(f"  {name:<28} {value:>10.1f} pairs/s" if isinstance(value, float) else f"  {name:<28} {value:>10}")
    for name, value in ratios.items():
        print(f"  {name:<28} {value:>10.3f}x")
    print(f"  best path with >= {AGREEMENT_TARGET:.1%} label agreement with fp32: {best}")
    print(f"  int8 vs fp32 label agreement {agreement:.4%} on {pairs} pairs ({relations32} fp32 relations, "
          f"{relations8} int8; {agreement_on_relations:.4%} on pairs either calls a relation)")
    print(f"  cascade vs fp32 label agreement {cascade_agreement:.4%} ({int((labels_cascade != 0).sum())} cascade "
          f"relations; margin {margin}: {rescored:.2%} of pairs re-scored in fp32)")
    print(f"  bf16 alone vs fp32 label agreement {bf16_agreement:.4%} (largest probability change {bf16_change:.4f})")
    print(json.dumps({"bench": "cpu_predict", "model": str(args.model), "documents": len(documents), "pairs": pairs,
                      "cores": cores, "load_average": [round(x, 2) for x in load], "pairs_per_s": results,
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}, "best": best,
                      "int8_label_agreement": round(agreement, 5), "fp32_relations": relations32,
                      "int8_relations": relations8, "int8_agreement_on_relations": round(agreement_on_relations, 5),
                      "cascade_label_agreement": round(cascade_agreement, 5), "cascade_margin": margin,
                      "cascade_rescored_share": round(rescored, 5),
                      "cascade_relations": int((labels_cascade != 0).sum()),
                      "bf16_label_agreement": round(bf16_agreement, 5), "bf16_max_probability_change": round(bf16_change, 5)}))


if __name__ == "__main__":
    main()
