"""Distillation, measured: train a student on a teacher's probabilities, then compare the two on dev half B.

The baseline is the teacher, measured in the same run on the same documents: the student's pairs/s as a ratio of
the teacher's, and both F1s. Prints a small table and one JSON line (also written to --json). Needs no Ray/MLflow
when the teacher is a folder (the GPU image has neither).

    python bench/distill.py --teacher runs/ensemble --config configs/minilm.yaml --set data.dir=… --out /tmp/student
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="model or ensemble folder (or models:/… with MLflow)")
    parser.add_argument("--config", type=Path, required=True, help="the student's run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True, help="the student's run folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", type=Path, help="also write the JSON line here")
    args = parser.parse_args(argv)

    from drugprot.config import load_config
    from drugprot.distillation import distill, measure
    from drugprot.dev_halves import split_halves
    from drugprot.inference import Predictor
    from drugprot.training import load_documents

    config = load_config(args.config, args.overrides)
    started = time.perf_counter()
    teacher, result = distill(args.teacher, config, args.out, device=args.device, progress=False,
                              log=lambda m: print("  " + m, flush=True))
    train_seconds = time.perf_counter() - started
    student = Predictor.from_path(result.model_dir, device=args.device)
    half_b = list(split_halves(load_documents(config)[1], config.data.selection_seed).b)
    rows = [measure("teacher", teacher, half_b), measure("student", student, half_b)]
    print(f"dev half B ({len(half_b)} documents, {rows[0].pairs} pairs): model, members, F1, pairs/s, × teacher")
    for row, members in zip(rows, (len(teacher.members), 1)):
        print(f"  {row.name:<8} {members:>3} {row.f1:.4f} {row.pairs_per_s:>10.1f} {row.pairs_per_s / rows[0].pairs_per_s:>7.2f}×")
    summary = {"bench": "distill", "teacher": args.teacher, "teacher_members": len(teacher.members),
               "student_encoder": config.encoder.name, "temperature": config.distill.temperature,
               "weight": config.distill.weight, "train_seconds": round(train_seconds, 1), "student_dev_f1_a": result.best_f1,
               "half_b": [r.as_dict() for r in rows],
               "speedup": round(rows[1].pairs_per_s / rows[0].pairs_per_s, 3) if rows[0].pairs_per_s else None}
    line = json.dumps(summary)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
