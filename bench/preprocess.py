"""Benchmark: read + validate + sentence-split + pair the full DrugProt training split (budget: 10 s).

Run from the repository root:  ``.venv/bin/python bench/preprocess.py [--data DIR] [--split training]``

Timed path (the platform's): ``read_split`` (parse, every validation check) followed by ``corpus_candidates`` (blingfire
sentence spans merged so no entity is cut, CHEMICAL×GENE pairing, GENE interval filter, recall-ceiling counts). Each
path runs ``--repeats`` times (default 3) and the best wall-clock time is reported, with its ratio to the budget.

Baseline, measured in the same run on the same files: the naive preprocessing a quick script would do. It splits
lines on tabs without any validation (no offset, type, argument or encoding checks), cuts sentences with a regex
after every ". " / "? " / "! " followed by an upper-case letter or digit (no abbreviation handling, no repair of
cuts inside entities), and pairs same-sentence CHEMICAL×GENE mentions with the same interval rule and filter. It does
the same amount of pairing work, so ``platform / baseline`` is the price of validation plus blingfire plus the
entity-safe merge. The gold relations each path never pairs (arguments in different sentences, or overlapping
mentions) are printed too, because the naive split is cheaper but cuts entities and related pairs apart.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from bisect import bisect_left
from pathlib import Path

from drugprot.candidates import DEFAULT_INTERVAL, corpus_candidates
from drugprot.corpus import read_split, split_files

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (REPO_ROOT / "../shared/data/drugprot").resolve()
BUDGET_S = 10.0
NAIVE_BOUNDARY = re.compile(r"(?<=[.?!])\s+(?=[A-Z0-9])")


def platform_run(data: Path, split: str, interval: tuple[int, int]) -> dict:
    started = time.perf_counter()
    corpus = read_split(data, split)
    read_s = time.perf_counter() - started
    candidates, stats = corpus_candidates(corpus.documents, interval)
    return {"seconds": time.perf_counter() - started, "read_s": read_s, "documents": len(corpus),
            "pairs": stats.kept, "gold": stats.gold_relations, "unpaired": stats.lost_cross_sentence + stats.lost_overlap}


def baseline_run(data: Path, split: str, interval: tuple[int, int]) -> dict:
    started = time.perf_counter()
    files = split_files(data, split)
    texts: dict[str, str] = {}
    for line in files["abstracts"].read_text(encoding="utf-8").splitlines():
        pmid, title, abstract = line.split("\t")
        texts[pmid] = f"{title} {abstract}"
    entities: dict[str, list[tuple[int, int, str, str]]] = {}
    for line in files["entities"].read_text(encoding="utf-8").splitlines():
        pmid, eid, etype, start, end, _ = line.split("\t")
        entities.setdefault(pmid, []).append((int(start), int(end), eid, etype))
    gold: set[tuple[str, str, str, str]] = set()  # unique (pmid, type, chemical, gene)
    for line in files["relations"].read_text(encoding="utf-8").splitlines():
        pmid, rtype, arg1, arg2 = line.split("\t")
        gold.add((pmid, rtype, arg1[5:], arg2[5:]))
    read_s = time.perf_counter() - started

    lo, hi = interval
    kept = 0
    found: set[tuple[str, str, str]] = set()
    for pmid, text in texts.items():
        starts = [0] + [m.end() for m in NAIVE_BOUNDARY.finditer(text)]
        by_sentence: dict[int, list[tuple[int, int, str, str]]] = {}
        for mention in sorted(entities.get(pmid, ())):
            by_sentence.setdefault(bisect_left(starts, mention[0] + 1) - 1, []).append(mention)
        for members in by_sentence.values():
            genes = [m for m in members if m[3] != "CHEMICAL"]
            gene_starts = [g[0] for g in genes]
            for chem in (m for m in members if m[3] == "CHEMICAL"):
                before = bisect_left(gene_starts, chem[0])
                for rank, gene in enumerate(genes):
                    if chem[0] < gene[1] and gene[0] < chem[1]:
                        continue
                    found.add((pmid, chem[2], gene[2]))
                    if lo <= rank - before <= hi:
                        kept += 1
    unpaired = sum(1 for pmid, _, chem, gene in gold if (pmid, chem, gene) not in found)
    return {"seconds": time.perf_counter() - started, "read_s": read_s, "documents": len(texts), "pairs": kept,
            "gold": len(gold), "unpaired": unpaired}


def best_of(function, repeats: int, *args) -> dict:
    runs = [function(*args) for _ in range(repeats)]
    return min(runs, key=lambda r: r["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"corpus folder (default {DEFAULT_DATA})")
    parser.add_argument("--split", default="training")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds allowed (default 10)")
    args = parser.parse_args(argv)
    if not (args.data / args.split).is_dir():
        print(f"{args.data / args.split}: not found; get the corpus with `drugprot data download --dest DIR` "
              f"and pass --data DIR", file=sys.stderr)
        return 2
    interval = DEFAULT_INTERVAL
    platform = best_of(platform_run, args.repeats, args.data, args.split, interval)
    baseline = best_of(baseline_run, args.repeats, args.data, args.split, interval)

    print(f"DrugProt preprocessing benchmark: {args.split} split of {args.data} "
          f"({platform['documents']} documents), best of {args.repeats}, interval {list(interval)}")
    print(f"platform  (read+validate+blingfire+merge+pair): {platform['seconds']:.3f} s "
          f"(read+validate {platform['read_s']:.3f} s), {platform['pairs']} pairs kept, "
          f"{platform['unpaired']} of {platform['gold']} gold relations never paired")
    print(f"baseline  (no validation, naive '. ' split, pair):  {baseline['seconds']:.3f} s "
          f"(read {baseline['read_s']:.3f} s), {baseline['pairs']} pairs kept, "
          f"{baseline['unpaired']} of {baseline['gold']} gold relations never paired")
    ratio_budget = platform["seconds"] / args.budget
    ratio_baseline = platform["seconds"] / baseline["seconds"]
    print(f"budget    {args.budget:.1f} s: platform uses {ratio_budget:.3f}x of it "
          f"({'within' if ratio_budget <= 1 else 'OVER'} budget)")
    print(f"ratio     platform / baseline = {ratio_baseline:.2f}x")
    return 0 if ratio_budget <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
