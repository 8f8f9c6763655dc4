"""Single model, top-k and reseeded ensembles side by side on dev half B (the half no selection looked at).

    python bench/ensemble_half_b.py --ensemble top-k=DIR --ensemble reseed=DIR [--device cuda] [--json FILE]

The single model is the first (best) member of the first ensemble. Half B is the ensembles' own split (the
``selection_seed`` in their ``ensemble.json``, ``drugprot.dev_halves``; ensembles of different splits are refused),
so the top-k row can be read next to that command's A/B table. Each row runs the one inference path (``load_predictor``) and the official scorer,
timed as bench/distill.py times its teacher and student.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "platform") not in sys.path:
    sys.path.append(str(REPO / "platform"))


def split_seed(ensembles: dict[str, Path]) -> int:
    """The ensembles' common ``selection_seed``: half B is held out only for ensembles chosen on the same half A."""
    seeds = {name: json.loads((folder / "ensemble.json").read_text()).get("selection_seed", 0)
             for name, folder in ensembles.items()}
    if len(set(seeds.values())) > 1:
        raise SystemExit(f"ensemble_half_b.py: the ensembles were chosen on different dev splits (selection_seed {seeds})")
    return next(iter(seeds.values()))


def half_b_rows(ensembles: dict[str, Path], *, device: str, split_seed: int) -> list[dict]:
    """F1 and pairs/s on dev half B (``drugprot.distillation.measure``) of the single model and each ensemble."""
    from drugprot.dev_halves import split_halves
    from drugprot.distillation import measure
    from drugprot.ensemble.build import dev_documents
    from drugprot.inference import load_predictor

    first = next(iter(ensembles.values()))
    single = first / json.loads((first / "ensemble.json").read_text())["members"][0]["path"]
    documents, _ = dev_documents(json.loads((single / "drugprot.json").read_text()))
    half_b = list(split_halves(documents, split_seed).b)
    rows = []
    for name, folder in [("single", single), *ensembles.items()]:
        predictor = load_predictor(folder, device=device)
        rows.append({**measure(name, predictor, half_b).as_dict(), "members": len(predictor.members),
                     "folder": str(folder)})
        print(f"| {name} | {rows[-1]['members']} | {rows[-1]['f1']:.4f} | {rows[-1]['pairs_per_s']:.1f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ensemble", action="append", required=True, metavar="NAME=DIR",
                        help="an ensemble folder to score (repeatable; the first gives the single model)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    ensembles = {}
    for item in args.ensemble:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "ensemble.json").is_file():
            parser.error(f"--ensemble {item!r}: expected NAME=DIR with DIR an ensemble folder (ensemble.json)")
        ensembles[name] = Path(folder)
    seed = split_seed(ensembles)
    print(f"dev half B (selection_seed {seed}):\n| model | members | F1 | pairs/s |\n|---|---:|---:|---:|")
    summary = {"bench": "ensemble_half_b", "split_seed": seed,
               "half_b": half_b_rows(ensembles, device=args.device, split_seed=seed)}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
