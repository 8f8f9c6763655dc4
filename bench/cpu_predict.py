"""Benchmark: CPU prediction, a plain Hugging Face fp32 loop vs the project's fp32 and cascade paths (in one
process, and in one single-threaded process per core), and their label agreement with fp32; a 5-member ensemble vs
one member. All measured in one run, on the same pairs.

    python bench/cpu_predict.py --model runs/minilm/model [--data ../shared/data/drugprot] [--limit DOCS]
                                [--ensemble MEMBER_DIR ... --ensemble-limit DOCS --exit-calibration DOCS]

* plain loop (the baseline): what a user writes: candidates in corpus order, each pair's sentence with the four
  marker strings inserted, ``tokenizer(batch of 32, padding=True, truncation=True)``, the same model under
  ``torch.no_grad``, torch's default threads;
* project fp32: ``Predictor.member_probabilities`` (marker encoding from cached pieces, length-bucketed
  token-budget batches, torch threads = cores);
* project cascade: a bf16 copy of the model scores every pair (oneDNN's AMX/AVX512-BF16 kernels), then the fp32
  model re-scores the pairs whose top-2 margin is below ``--cascade-margin``; its time includes the re-scoring;
  project bf16 = the cascade with margin 0 (the bf16 copy alone), to show what the re-scoring costs and buys;
* ``*_per_core``: the same path in one process per core with one torch thread each, each process scoring a share
  of each chunk's documents (what ``drugprot predict --ray --ray-actors CORES`` runs on a CPU node: one
  single-threaded model per actor); the time is the wall clock from handing out a chunk to the last share back;
* ensemble (``--ensemble``: trained members, which disagree as real seeds do; without it the model is loaded 5 times,
  which times the stacked forward but no disagreement): on the first ``--ensemble-limit`` documents, the members
  stacked (``fold``: every member scores every pair), and the members in turn skipping the pairs that earlier
  members settled as no relation (``member_probabilities(skip_settled=True)``, what ``predict`` and Serve run), in
  fp32 and in cascade, each vs the first member alone on the same path and documents. The relations decoded with
  and without skipping are compared (they must be equal). Exact skipping cannot beat 1/3 of one member with 5
  equal hard-voting members (three votes settle a pair at best), so the early exit rows add what
  ``--early-exit`` runs: a pair also leaves once the members so far all vote no relation with a mean P(NONE) at the
  confidence that ``calibrate_early_exit`` picks on the next ``--exit-calibration`` development documents; their
  relation agreement with the stacked vote is printed.

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

import multiprocessing
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


def timed_probabilities(predictor, documents, candidates, **options) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    probs = predictor.member_probabilities(documents, candidates, **options)
    return time.perf_counter() - started, probs


_WORKER = None  # a per-core worker's Predictor


def _start_worker(model: str, precision: str, margin: float, barrier) -> None:
    global _WORKER
    from drugprot.inference import Predictor
    from drugprot.model.artifacts import load_artifact

    torch.set_num_threads(1)
    _WORKER = Predictor([load_artifact(model)], device="cpu", precision=precision, cascade_margin=margin)
    barrier.wait()


def _worker_probabilities(documents) -> torch.Tensor:
    return _WORKER.member_probabilities(documents, _WORKER.candidates(documents))


class PerCore:
    """One single-threaded process per core, each with its own copy of the model; a chunk of documents is cut into
    one contiguous share per process, balanced by candidate pairs. (Three smaller shares each, handed out as
    processes freed up, measured slower: 221.5 bf16 pairs/s against 268.2.)"""

    def __init__(self, model: str, precision: str, margin: float, cores: int, warm_documents):
        context = multiprocessing.get_context("spawn")
        self.cores = cores
        self.pool = context.Pool(cores, _start_worker, (model, precision, margin, context.Barrier(cores)))
        self.pool.map(_worker_probabilities, [warm_documents] * cores, chunksize=1)

    def shares(self, documents, counts: list[int]) -> list:
        total, shares, start, running = sum(counts), [], 0, 0
        for i, count in enumerate(counts):
            running += count
            if running >= total * (len(shares) + 1) / self.cores and len(shares) < self.cores - 1:
                shares.append(documents[start:i + 1])
                start = i + 1
        return shares + [documents[start:]]

    def timed(self, documents, counts: list[int]) -> tuple[float, torch.Tensor]:
        shares = self.shares(documents, counts)
        started = time.perf_counter()
        parts = self.pool.map(_worker_probabilities, shares, chunksize=1)
        return time.perf_counter() - started, torch.cat(parts, dim=1)


def ensemble_rows(args, documents, calibration_documents, margin: float) -> tuple[dict, dict, dict]:
    """The ensemble rows: pairs/s of each way to run the members and of the first member alone, on the same path;
    the early exit's confidence is calibrated first, on other development documents."""
    from drugprot.ensemble.early_exit import calibrate_early_exit
    from drugprot.inference import Predictor, decode
    from drugprot.model.artifacts import load_artifact

    paths = args.ensemble or [args.model] * args.members
    loaded = lambda: [load_artifact(p) for p in paths]  # noqa: E731
    common = {"device": "cpu", "vote": args.vote}
    calibrator = Predictor(loaded(), precision="cascade", cascade_margin=margin, **common)
    calibration = calibrate_early_exit(calibrator.member_probabilities(
        calibration_documents, calibrator.candidates(calibration_documents)), mode=args.vote)
    del calibrator
    runs = {"ensemble_fp32_stacked": (Predictor(loaded(), precision="fp32", execution="fold", **common), False),
            "ensemble_fp32_settled": (Predictor(loaded(), precision="fp32", execution="loop", **common), True),
            "ensemble_cascade_settled": (Predictor(loaded(), precision="cascade", cascade_margin=margin, **common), True),
            "member_fp32": (Predictor([load_artifact(paths[0])], precision="fp32", **common), False),
            "member_cascade": (Predictor([load_artifact(paths[0])], precision="cascade", cascade_margin=margin, **common), False)}
    if calibration is not None:
        exit_ = {"early_exit": calibration["confidence"]}
        runs["ensemble_fp32_exit"] = (Predictor(loaded(), precision="fp32", execution="loop", **exit_, **common), True)
        runs["ensemble_cascade_exit"] = (Predictor(loaded(), precision="cascade", cascade_margin=margin, **exit_, **common),
                                         True)
    for predictor, skip in runs.values():
        predictor.member_probabilities(documents[:4], predictor.candidates(documents[:4]), skip_settled=skip)
        predictor.scored_pairs = predictor.rescored_pairs = predictor.exited_pairs = 0
    seconds = dict.fromkeys(runs, 0.0)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in runs}
    size = -(-len(documents) // args.rounds)
    for round_, at in enumerate(range(0, len(documents), size)):
        chunk = documents[at:at + size]
        chunk_candidates = runs["member_fp32"][0].candidates(chunk)
        names = list(runs)[round_ % len(runs):] + list(runs)[:round_ % len(runs)]
        for name in names:
            predictor, skip = runs[name]
            took, probs = timed_probabilities(predictor, chunk, chunk_candidates, skip_settled=skip)
            seconds[name] += took
            parts[name].append(probs)
        print(f"ensemble round {round_ + 1}: load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    candidates = runs["member_fp32"][0].candidates(documents)
    pairs, members = len(candidates), len(paths)
    results = {f"{name}{'' if name.startswith('member') else members}": pairs / seconds[name] for name in runs}
    probs = {name: torch.cat(chunks, dim=1) for name, chunks in parts.items()}

    def labels(member_probs) -> dict:
        """(pmid, chemical, gene) -> type for every relation the ensemble outputs."""
        relations = decode(candidates, member_probs, args.vote, decision=runs["ensemble_fp32_stacked"][0].decision)
        return {(r.pmid, r.chemical, r.gene): r.type for r in relations}

    reference = labels(probs["ensemble_fp32_stacked"])

    def agreement(found: dict) -> float:
        return sum(reference.get(k) == found.get(k) for k in {*reference, *found}) / max(1, len({*reference, *found}))

    settled32, settled_cascade = labels(probs["ensemble_fp32_settled"]), labels(probs["ensemble_cascade_settled"])
    details = {"members": members, "member_folders": [str(p) for p in paths], "vote": args.vote,
               "documents": len(documents), "pairs": pairs, "relations_stacked": len(reference),
               "settled_fp32_equal_relations": settled32 == reference,
               "settled_fp32_relation_agreement": round(agreement(settled32), 5),
               "settled_cascade_relation_agreement": round(agreement(settled_cascade), 5),
               "settled_fp32_member_pair_share": round(runs["ensemble_fp32_settled"][0].scored_pairs / (members * pairs), 4),
               "settled_cascade_member_pair_share": round(runs["ensemble_cascade_settled"][0].scored_pairs / (members * pairs), 4),
               "stacked_execution": runs["ensemble_fp32_stacked"][0].execution,
               "early_exit_calibration": {**(calibration or {}), "documents": len(calibration_documents)}}
    ratios = {f"ensemble_{name}_vs_one_member": results[f"ensemble_{name}{members}"] / results[f"member_{name.split('_')[0]}"]
              for name in ("fp32_stacked", "fp32_settled", "cascade_settled", "fp32_exit", "cascade_exit")
              if f"ensemble_{name}" in runs}
    for name in ("fp32_exit", "cascade_exit"):
        if f"ensemble_{name}" in runs:
            predictor = runs[f"ensemble_{name}"][0]
            found = labels(probs[f"ensemble_{name}"])
            details[f"{name}_relation_agreement"] = round(agreement(found), 5)
            differ = sum(reference.get(k) != found.get(k) for k in {*reference, *found})
            details[f"{name}_pair_agreement"] = round(1 - differ / pairs, 5)
            details[f"{name}_member_pair_share"] = round(predictor.scored_pairs / (members * pairs), 4)
            details[f"{name}_exited_share"] = round(predictor.exited_pairs / pairs, 4)
    return results, ratios, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained member folder (DIR/model)")
    parser.add_argument("--data", type=Path, default=SHARED, help="corpus folder with a development split")
    parser.add_argument("--limit", type=int, help="only the first N development documents (quick runs)")
    parser.add_argument("--rounds", type=int, default=5, help="document chunks; every path runs on each in turn")
    parser.add_argument("--cascade-margin", type=float, default=None, help="default: the Predictor's CASCADE_MARGIN")
    parser.add_argument("--workers", type=int, default=None, help="processes of the per-core rows (default: the "
                        "cores; below 2 skips them)")
    parser.add_argument("--ensemble", type=Path, nargs="+", help="trained member folders for the ensemble rows")
    parser.add_argument("--members", type=int, default=5, help="without --ensemble: load --model this many times")
    parser.add_argument("--ensemble-limit", type=int, default=150, help="development documents for the ensemble rows")
    parser.add_argument("--vote", choices=("hard", "soft"), default="hard", help="the ensemble's vote")
    parser.add_argument("--exit-calibration", type=int, default=300, help="development documents after the ensemble "
                        "rows' on which the early exit is calibrated (default 300)")
    parser.add_argument("--skip-ensemble", action="store_true")
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
    workers = cores if args.workers is None else args.workers
    margin = CASCADE_MARGIN if args.cascade_margin is None else args.cascade_margin
    settings = {"project_fp32": ("fp32", margin), "project_cascade": ("cascade", margin),
                "project_bf16": ("cascade", 0.0)}
    paths = {name: fp32 if name == "project_fp32" else
             Predictor([load_artifact(args.model)], device="cpu", precision=precision, cascade_margin=m)
             for name, (precision, m) in settings.items()}
    per_core = {}
    if workers > 1:
        for name in ("project_fp32", "project_cascade", "project_bf16"):
            per_core[f"{name}_per_core"] = PerCore(str(args.model), *settings[name], workers, documents[:4])
    plain_loop(member, documents, candidates[:32])  # warm-ups
    for predictor in paths.values():
        predictor.member_probabilities(documents[:4], predictor.candidates(documents[:4]))
    paths["project_cascade"].scored_pairs = paths["project_cascade"].rescored_pairs = 0
    seconds = dict.fromkeys(["plain_fp32", *paths, *per_core], 0.0)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in [*paths, *per_core]}
    size = -(-len(documents) // args.rounds)
    for round_, at in enumerate(range(0, len(documents), size)):
        # interleaved rounds in a rotating order: a change of load on a shared machine hits every path alike
        chunk = documents[at:at + size]
        chunk_candidates = fp32.candidates(chunk)
        counts = [len(fp32.candidates([d])) for d in chunk]
        names = list(seconds)[round_ % len(seconds):] + list(seconds)[:round_ % len(seconds)]
        for name in names:
            if name == "plain_fp32":
                torch.set_num_threads(default_threads)
                seconds[name] += plain_loop(member, chunk, chunk_candidates)
                continue
            if name in per_core:
                took, probs = per_core[name].timed(chunk, counts)
            else:
                torch.set_num_threads(cores)  # one thread per core (the default here too, set for machines where it is not)
                took, probs = timed_probabilities(paths[name], chunk, chunk_candidates)
            seconds[name] += took
            parts[name].append(probs)
        done = sum(p.size(1) for p in parts["project_fp32"])
        print(f"round {round_ + 1}: {done} pairs, load average {os.getloadavg()[0]:.2f}, pairs/s so far: "
              + ", ".join(f"{name} {done / took:.1f}" for name, took in seconds.items()), file=sys.stderr)
    for pool in per_core.values():
        pool.pool.terminate()
    results: dict = {name: pairs / seconds[name] for name in seconds}
    labels = {name: torch.cat(chunks, dim=1)[0].argmax(-1) for name, chunks in parts.items()}
    probs32, probs16 = (torch.cat(parts[name], dim=1) for name in ("project_fp32", "project_bf16"))
    labels32 = labels["project_fp32"]
    agreements = {name: float((labels32 == found).float().mean()) for name, found in labels.items()}
    cascade = paths["project_cascade"]
    rescored = cascade.rescored_pairs / cascade.scored_pairs
    bf16_change = float((probs16 - probs32).abs().max())
    labels_cascade = labels["project_cascade"]

    best = max((path for path, share in agreements.items() if share >= AGREEMENT_TARGET), key=results.get)
    ratios = {"best_vs_plain": results[best] / results["plain_fp32"],
              **{f"{name.removeprefix('project_')}_vs_plain": results[name] / results["plain_fp32"]
                 for name in [*paths, *per_core]}}
    ensemble = {}
    if not args.skip_ensemble:
        torch.set_num_threads(cores)
        calibration = read_split(args.data, "development").documents[args.ensemble_limit:][: args.exit_calibration]
        ensemble_results, ensemble_ratios, ensemble = ensemble_rows(args, documents[: args.ensemble_limit], calibration,
                                                                    margin)
        results.update(ensemble_results)
        ratios.update(ensemble_ratios)

    print(f"{len(documents)} development documents, {pairs} pairs, {cores} cores, load average {load[0]:.2f} "
          f"(default torch threads {default_threads}; per-core rows: {workers if per_core else 0} processes)")
    for name, value in results.items():
        agrees = f"   label agreement with fp32 {agreements[name]:.4%}" if name in agreements else ""
        print(f"  {name:<32} {value:>10.1f} pairs/s{agrees}")
    for name, value in ratios.items():
        print(f"  {name:<40} {value:>8.3f}x")
    print(f"  best path with >= {AGREEMENT_TARGET:.1%} label agreement with fp32: {best}")
    print(f"  cascade: {int((labels_cascade != 0).sum())} relations ({int((labels32 != 0).sum())} fp32); margin {margin}: {rescored:.2%} of pairs "
          f"re-scored in fp32; bf16 alone moved a probability by at most {bf16_change:.4f}")
    if ensemble:
        print(f"  ensemble: {ensemble['members']} members, {ensemble['vote']} vote, {ensemble['documents']} documents, "
              f"{ensemble['pairs']} pairs; members in turn scored {ensemble['settled_fp32_member_pair_share']:.1%} of "
              f"the member-pairs (fp32) and {ensemble['settled_cascade_member_pair_share']:.1%} (cascade); relations "
              f"with skipping equal to stacked: {ensemble['settled_fp32_equal_relations']} (fp32), cascade agreement "
              f"{ensemble['settled_cascade_relation_agreement']:.4%}")
        calibrated = ensemble["early_exit_calibration"]
        if "fp32_exit_relation_agreement" in ensemble:
            print(f"  early exit: confidence {calibrated['confidence']} calibrated on {calibrated['documents']} other "
                  f"documents ({calibrated['agreement']:.2%} relation agreement there); here it left "
                  f"{ensemble['fp32_exit_exited_share']:.1%} of the pairs early, members scored "
                  f"{ensemble['fp32_exit_member_pair_share']:.1%} of the member-pairs, relation agreement with the "
                  f"stacked vote {ensemble['fp32_exit_relation_agreement']:.4%} (fp32), "
                  f"{ensemble['cascade_exit_relation_agreement']:.4%} (cascade); label agreement on all pairs "
                  f"{ensemble['fp32_exit_pair_agreement']:.4%} (fp32)")
    print(json.dumps({"bench": "cpu_predict", "model": str(args.model), "documents": len(documents), "pairs": pairs,
                      "cores": cores, "load_average": [round(x, 2) for x in load], "pairs_per_s": results,
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}, "best": best,
                      "label_agreement": {k: round(v, 5) for k, v in agreements.items()},
                      "fp32_relations": int((labels32 != 0).sum()), "cascade_margin": margin,
                      "cascade_rescored_share": round(rescored, 5), "cascade_relations": int((labels_cascade != 0).sum()),
                      "bf16_max_probability_change": round(bf16_change, 5), "ensemble": ensemble}))


if __name__ == "__main__":
    main()
