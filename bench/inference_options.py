"""Benchmark: does each execution and precision option of ``drugprot.inference`` pay on this machine? In one run,
on the same pairs, each against its baseline measured in the same run:

* ``fold`` vs ``loop``: an ensemble of ``--members`` members, stacked into one forward per batch or run in turn;
* bf16 alone (``cascade`` with margin 0) vs fp32 (what ``bf16`` computes on a CPU), one member;
* ``cascade`` (default margin) vs bf16 alone and vs fp32, one member.

    python bench/inference_options.py [--model MEMBER_DIR] [--limit DOCS] [--rounds N] [--members M]

Without ``--model`` a MiniLM member is trained first on the bundled sample (1 epoch, a weak model whose label scores
are often close: the demo model's kind), and the ensemble is that member loaded ``--members`` times (stacking times
the same work whatever the weights). Every path is warmed up, then each round runs every path once, in an order
that rotates by round, so a change of load hits every path alike. Prints each path's pairs/s, its ratio against
its baseline, its label agreement with fp32 (one member) or with the loop (ensemble), whether the CPU has AMX, and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni"))}


def train_member(out: Path) -> Path:
    from drugprot.config import load_config
    from drugprot.training import train

    overrides = ["encoder.name=minilm", "train.epochs=1", "train.lr=1e-4", f"train.threads={os.cpu_count()}"]
    train(load_config(REPO / "configs" / "smoke.yaml", overrides), out, progress=False, log=lambda _: None)
    return out / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a trained member folder (default: train a MiniLM one first)")
    parser.add_argument("--limit", type=int, default=40, help="development documents of the bundled sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", type=int, default=3)
    args = parser.parse_args()

    from drugprot.corpus import read_split
    from drugprot.inference import InferenceOptions, Predictor
    from drugprot.model.artifacts import load_artifact

    torch.manual_seed(0)
    model = args.model or train_member(Path(tempfile.mkdtemp(prefix="bench-options-")))
    documents = read_split(REPO / "platform" / "drugprot" / "sample_data", "development").documents[:args.limit]

    def one(**options) -> Predictor:
        return Predictor([load_artifact(model)], device="cpu", options=InferenceOptions(**options))

    def ensemble(execution: str) -> Predictor:
        return Predictor([load_artifact(model) for _ in range(args.members)], device="cpu",
                         options=InferenceOptions(precision="fp32", execution=execution))

    paths = {"fp32": one(precision="fp32"), "bf16_alone": one(precision="cascade", cascade_margin=0.0),
             "cascade": one(precision="cascade"), "loop": ensemble("loop"), "fold": ensemble("fold")}
    baselines = {"bf16_alone": "fp32", "cascade": "fp32", "fold": "loop"}
    candidates = paths["fp32"].candidates(documents)
    for predictor in paths.values():
        predictor.member_probabilities(documents[:4], predictor.candidates(documents[:4]))
    seconds = dict.fromkeys(paths, 0.0)
    probs: dict[str, torch.Tensor] = {}
    names = list(paths)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            started = time.perf_counter()
            probs[name] = paths[name].member_probabilities(documents, candidates)
            seconds[name] += time.perf_counter() - started
    rate = {name: round(args.rounds * len(candidates) / seconds[name], 1) for name in names}
    labels = {name: p.argmax(-1) for name, p in probs.items()}
    agreement = {name: round(float((labels[name] == labels[baselines.get(name, name)]).float().mean()), 4)
                 for name in names}
    flags = sorted(cpu_flags())
    print(f"{len(documents)} documents, {len(candidates)} pairs, {args.rounds} rounds, torch threads "
          f"{torch.get_num_threads()}, CPU flags: {', '.join(flags) or 'none of amx/avx512_bf16/avx512_vnni'} "
          f"(AMX: {'yes' if any(f.startswith('amx') for f in flags) else 'no'}), load average {os.getloadavg()[0]:.1f}")
    print(f"{'path':<12} {'pairs/s':>9} {'vs':>10} {'ratio':>7} {'labels agree':>13}")
    for name in names:
        base = baselines.get(name, name)
        print(f"{name:<12} {rate[name]:>9.1f} {base:>10} {rate[name] / rate[base]:>7.3f} {agreement[name]:>13.2%}")
    print(json.dumps({"bench": "inference_options", "documents": len(documents), "pairs": len(candidates),
                      "members": args.members, "rounds": args.rounds, "cpu_flags": flags, "pairs_per_s": rate,
                      "ratio": {n: round(rate[n] / rate[baselines[n]], 3) for n in baselines},
                      "label_agreement": agreement, "rescored_share": round(
                          paths["cascade"].rescored_pairs / max(1, paths["cascade"].scored_pairs), 4)}))


if __name__ == "__main__":
    main()
