"""``drugprot ensemble``: build a voting ensemble from a study (top-k trials or K new seeds) or from folders,
evaluate it on dev next to its members, log it to MLflow and optionally register it (champion alias rule)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

DEFAULT_TOP_K = 5


def register(commands) -> None:
    parser = commands.add_parser(
        "ensemble", help="Build, evaluate, log and register a voting ensemble of a study's best models.",
        description="Members come from --study (the top-k trials by dev F1, or --reseed K new seeds of the best "
                    "configuration) or from --members folders. The ensemble folder is written to --out, evaluated on "
                    "dev (each member and the vote side by side), logged as a run of the study's MLflow experiment, "
                    "and with --register NAME registered as a pyfunc model whose --alias moves only when its dev F1 "
                    "beats the current one's (or with --force).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--study", help="study name (its MLflow experiment holds one child run per trial)")
    source.add_argument("--members", nargs="+", type=Path, metavar="DIR", help="member model folders, best first")
    parser.add_argument("--top-k", type=int, default=None, help=f"members from the study's best trials (default {DEFAULT_TOP_K})")
    parser.add_argument("--reseed", type=int, metavar="K", help="instead: retrain the best configuration with K new seeds")
    parser.add_argument("--vote", default="hard", help="hard (majority, ties to the highest mean probability) or soft (mean probability)")
    parser.add_argument("--register", metavar="NAME", help="register the ensemble as a new version of this MLflow model")
    parser.add_argument("--alias", default="champion", help="alias to move when the new version wins (default champion)")
    parser.add_argument("--force", action="store_true", help="move the alias even if the dev F1 does not improve")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default sqlite:///mlflow.db, as drugprot tune)")
    parser.add_argument("--experiment", help="MLflow experiment for the ensemble run (default: the study's; with "
                                             "--members, drugprot-ensembles)")
    parser.add_argument("--out", type=Path, help="ensemble folder to write (default runs/ensembles/NAME-TIMESTAMP)")
    parser.add_argument("--data", type=Path, help="corpus folder for the dev evaluation (default: the members' own)")
    parser.add_argument("--split", help="dev split name (default: the members' dev split)")
    parser.add_argument("--interval", nargs=2, type=int, metavar=("LO", "HI"),
                        help="GENE interval of the ensemble (default: the best member's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-log", action="store_true", help="do not log a run to MLflow (not allowed with --register)")
    parser.set_defaults(handler=_ensemble)


def _ensemble(args) -> int:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from drugprot.ensemble_folder import EnsembleError, check_vote

    check_vote(args.vote, "--vote")
    if args.reseed is not None and args.top_k is not None:
        raise EnsembleError("--top-k and --reseed are alternatives: --top-k K takes the K best trials, --reseed K "
                            "trains K new seeds of the best one")
    if args.members and args.reseed is not None:
        raise EnsembleError("--reseed needs --study (it retrains the study's best configuration)")
    if args.register and args.no_log:
        raise EnsembleError("--register logs the ensemble to MLflow; drop --no-log")
    top_k = args.top_k if args.top_k is not None else DEFAULT_TOP_K
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / "ensembles" / f"{args.study or 'ensemble'}-{stamp}"
    if out.exists() and any(out.iterdir()):
        raise EnsembleError(f"--out {out}: already exists and is not empty; choose another folder or remove it")
    work = out.parent / f".{out.name}.work"

    try:
        built = _build(args, top_k, out, work)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(built.evaluation.table())
    print(f"ensemble of {len(built.meta['members'])} members ({built.meta.get('execution')} execution) written to {out}")
    if not args.no_log:
        from drugprot.ensemble.registry import log_ensemble

        run = log_ensemble(out, tracking_uri=args.tracking_uri, experiment=args.experiment, register=args.register,
                           alias=args.alias, force=args.force, log=print,
                           run_name=f"ensemble-{args.study or 'folders'}-{stamp}")
        print(f"logged as MLflow run {run.run_id} (experiment {run.experiment_id})")
        if run.registration is not None:
            print(f"registered {run.registration.model_uri}; predict with "
                  f"`drugprot predict --model models:/{args.register}@{args.alias} ...`")
    return 0


def _build(args, top_k: int, out: Path, work: Path):
    from drugprot.ensemble.build import MemberSource, build_ensemble, dev_documents, member_info

    if args.study:
        sources, source = _from_study(args, top_k, work)
    else:
        sources = [MemberSource(Path(p)) for p in args.members]
        source = {"selection": "folders", "members": [str(p) for p in args.members]}
    documents, split = dev_documents(member_info(sources[0].path), data_dir=args.data, split=args.split)
    return build_ensemble(sources, out, vote=args.vote, documents=documents, split=split, source=source,
                          device=args.device, interval=tuple(args.interval) if args.interval else None)


def _from_study(args, top_k: int, work: Path):
    from drugprot import tracking
    from drugprot.ensemble.build import MemberSource
    from drugprot.ensemble.members import best_trial, member_name, reseed, select_top_k

    store = tracking.existing_store(args.tracking_uri)
    records = tracking.study_trials(args.study, store)  # unknown study: TrackingError listing the experiments
    if args.reseed is not None:
        best = best_trial(records, study=args.study)
        result = reseed(best, args.reseed, work_dir=work / "reseed", study=args.study,
                        used_seeds=[r.seed for r in records if r.seed is not None], tracking_uri=store)
        source = {"study": args.study, "selection": "reseed", "reseed": args.reseed, "reseed_of": str(best.trial_id),
                  "reseed_of_run": best.run_id, "seeds": result.seeds}
        return result.members, source
    selection = select_top_k(records, top_k, study=args.study)
    if selection.note:
        print(f"note: {selection.note}", file=sys.stderr)
    sources = []
    for record in selection.records:
        folder = tracking.download_trial_model(record, work / "trials" / member_name(record), store)
        sources.append(MemberSource(Path(folder), name=member_name(record), dev_f1=float(record.best_dev_f1),
                                    seed=record.seed,
                                    source={"study": args.study, "trial_id": str(record.trial_id), "run_id": record.run_id}))
    source = {"study": args.study, "selection": "top-k", "top_k": top_k, "seeds_searched": selection.seeds_searched,
              "trials": [str(r.trial_id) for r in selection.records]}
    return sources, source
