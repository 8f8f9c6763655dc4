"""``drugprot distill``: train one student on a teacher's (an ensemble's) probabilities, compare the two on dev half
B (F1 and pairs/s), and optionally register the student with its teacher recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "distill", help="Train one model on an ensemble's soft probabilities (cheap serving at close to its quality).",
        description="The teacher's probabilities over the training pairs (the one inference path) join the gold labels "
                    "in the student's loss: w·T²·KL(teacher_T ‖ student_T) + (1−w)·L_gold, with w = distill.weight and "
                    "T = distill.temperature of --config. The student is then compared with its teacher on dev half B.")
    parser.add_argument("--teacher", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a model/ensemble folder")
    parser.add_argument("--config", type=Path, required=True, help="the student's YAML run config (encoder, data, distill, …)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set distill.temperature=4 (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="run folder of the student (OUT/model, as drugprot train)")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default sqlite:///mlflow.db)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the teacher runs")
    parser.add_argument("--register", metavar="NAME", help="register the student as a new version of this MLflow model")
    parser.add_argument("--alias", default="champion", help="alias the promotion gates may move (default champion)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_distill)


def _distill(args) -> int:
    from drugprot.config import load_config
    from drugprot.distillation import distill, measure
    from drugprot.dev_halves import split_halves
    from drugprot.errors import DrugprotError
    from drugprot.inference.loading import Predictor
    from drugprot.training import load_documents

    say = (lambda message: print(message, file=sys.stderr, flush=True)) if args.json else print
    if args.out.exists() and any(args.out.iterdir()):
        raise DrugprotError(f"--out {args.out}: already exists and is not empty; choose another folder or remove it")
    config = load_config(args.config, args.overrides)
    teacher, result = distill(args.teacher, config, args.out, tracking_uri=args.tracking_uri, device=args.device,
                              progress=not args.quiet, log=say)
    student = Predictor.from_path(result.model_dir, device=args.device)
    _, dev = load_documents(config)
    seed = config.data.selection_seed  # the student's checkpoint was chosen on half A of it, and the teacher's
    half_b = list(split_halves(dev, seed).b)
    rows = [measure("teacher", teacher, half_b), measure("student", student, half_b)]
    summary = {"teacher": args.teacher, "student": str(result.model_dir), "temperature": config.distill.temperature,
               "weight": config.distill.weight, "dev_f1_a": result.best_f1, "half_b": [r.as_dict() for r in rows],
               "registration": None}
    say(f"dev half B (data.selection_seed {seed}, {len(half_b)} documents, held out from every choice): model, F1, pairs/s")
    for row in rows:
        say(f"{row.name:<8} {row.f1:.4f} {row.pairs_per_s:>10.1f}")
    if args.register:
        summary["registration"] = _register(args, result.model_dir, dev, half_b, rows, say)
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


def _register(args, model_dir: Path, dev, half_b, rows, say) -> dict:
    """Register the student as a one-member ensemble folder, its teacher in ensemble.json and in the version tags."""
    from drugprot import mlflow_store
    from drugprot.cli.ensemble import champion_f1_on
    from drugprot.ensemble.build import build_ensemble
    from drugprot.ensemble.publish import log_ensemble
    from drugprot.registry import Gate

    teacher, student = rows
    built = build_ensemble([model_dir], args.out / "registered", documents=dev, device="cpu", log=say,
                           source={"selection": "distilled", "teacher": args.teacher}, progress=not args.quiet)
    relations = built.evaluation.ensemble.micro.tp + built.evaluation.ensemble.micro.fp
    run = log_ensemble(built.path, tracking_uri=args.tracking_uri, register=args.register, alias=args.alias, log=say,
                       gate=Gate(student.f1, None, champion_f1_on(args, half_b, say), relations, "dev half B"), tags={"drugprot.teacher": args.teacher})
    r = run.registration
    mlflow_store.client(mlflow_store.check_tracking_uri(args.tracking_uri)).set_model_version_tag(r.name, r.version, "teacher",
                                                                                          args.teacher)
    return {"name": r.name, "version": r.version, "alias": r.alias, "alias_moved": r.alias_moved, "reason": r.reason}
