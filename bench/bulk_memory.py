"""Peak memory of streaming prediction (``drugprot predict --input``) as the corpus grows, plus documents/s and pairs/s.

A synthetic PubTator corpus is generated for each multiplier: the real development abstracts, repeated with new
PMIDs (copy k gets PMIDs prefixed by k). Each run is a fresh ``drugprot predict`` process; its peak RSS comes from
``os.wait4`` (that process alone). Prints a table and one JSON line; the ratio largest/smallest peak should be ≈ 1.

    python bench/bulk_memory.py --model runs/minilm/model --multipliers 1 20 --limit 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DEV = REPO.parent / "shared" / "data" / "drugprot"


def run_predict(model: str, corpus: Path, out: Path, args) -> dict:
    command = [sys.executable, "-m", "drugprot", "predict", "--model", model, "--input", str(corpus), "--format", "pubtator",
               "--out", str(out), "--shard-size", str(args.shard_size), "--device", "cpu", "--precision", args.precision,
               "--quiet", "--json", *(["--interval", *map(str, args.interval)] if args.interval else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as handle:  # a file, not a pipe: os.wait4 must reap the child (and get its rusage) itself
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    output = log.read_text()
    if process.returncode != 0:
        sys.exit(f"drugprot predict failed:\n{output[-3000:]}")
    summary = json.loads(output.splitlines()[-1])
    return {"documents": summary["documents"], "pairs": summary["pairs"], "seconds": round(seconds, 2),
            "documents_per_s": round(summary["documents"] / seconds, 2), "pairs_per_s": round(summary["pairs"] / seconds, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=SHARED_DEV if SHARED_DEV.is_dir() else None,
                        help="corpus folder with a development split (default: ../shared/data/drugprot, else the sample)")
    parser.add_argument("--limit", type=int, help="use only the first N development documents")
    parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "cascade"))
    parser.add_argument("--interval", type=int, nargs=2, metavar=("LO", "HI"),
                        help="GENE interval passed to predict (an empty one, e.g. 99 99, times reading and writing alone)")
    parser.add_argument("--work", type=Path, help="folder for the corpora and outputs (default: a temporary one)")
    args = parser.parse_args()

    from drugprot.config import SAMPLE_DIR
    from drugprot.corpus import read_split
    from drugprot.formats import write_pubtator

    documents = read_split(args.data or SAMPLE_DIR, "development").documents[: args.limit]
    work = args.work or Path(tempfile.mkdtemp(prefix="bulk-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for times in args.multipliers:
        corpus = work / f"dev-x{times}.pubtator"
        write_pubtator(corpus, [dataclasses.replace(d, pmid=f"{k}{d.pmid}") for k in range(1, times + 1) for d in documents])
        runs.append({"multiplier": times, **run_predict(args.model, corpus, work / f"out-x{times}", args)})
    print(f"{'corpus':>8} {'docs':>8} {'pairs':>9} {'s':>8} {'docs/s':>8} {'pairs/s':>9} {'peak RSS MB':>12}")
    for run in runs:
        print(f"{run['multiplier']:>7}x {run['documents']:>8} {run['pairs']:>9} {run['seconds']:>8} "
              f"{run['documents_per_s']:>8} {run['pairs_per_s']:>9} {run['peak_rss_mb']:>12}")
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    print(f"peak RSS {runs[-1]['multiplier']}x / {runs[0]['multiplier']}x = {ratio:.3f}")
    print(json.dumps({"bench": "bulk_memory", "model": args.model, "precision": args.precision, "shard_size": args.shard_size,
                      "cores": os.cpu_count(), "load": os.getloadavg()[0], "runs": runs, "peak_rss_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
