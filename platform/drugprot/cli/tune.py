"""``drugprot tune``: a Ray Tune + Optuna + ASHA study over a search-space file, tracked in MLflow."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "tune", help="Search hyper-parameters with Ray Tune (Optuna TPE + ASHA); every trial is an MLflow run.",
        description="Run a study: each trial trains one model (drugprot train) with values from the search space; "
                    "ASHA stops weak trials early; the study, its trials, plots and best models land in MLflow.")
    parser.add_argument("--config", type=Path, help="base YAML run config (required unless --resume)")
    parser.add_argument("--space", type=Path, help="search-space YAML, e.g. search_spaces/paper.yaml (required unless --resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the base config, e.g. --set train.epochs=4 (repeatable)")
    parser.add_argument("--name", help="study name: the MLflow experiment and the folder in --storage "
                                       "(default: SPACE-DATE-TIME; required with --resume)")
    parser.add_argument("--num-samples", type=int, default=8, metavar="N", help="trials to run (default 8)")
    parser.add_argument("--max-concurrent", type=int, metavar="K", help="trials at once (default: as resources allow)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C", help="CPUs per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G",
                        help="GPUs per trial; fractions share a card, 0.5 = two trials per GPU (default 0)")
    parser.add_argument("--address", help="join a Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
                                          "(default: start a local Ray runtime)")
    parser.add_argument("--storage", default="runs/tune", help="folder or s3://… URI for trial checkpoints and the "
                                                               "resumable study state (default runs/tune)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db in this folder; "
                                               "any MLflow server http://HOST:PORT works)")
    parser.add_argument("--optuna-storage", metavar="URL",
                        help="database of the Optuna study, e.g. postgresql://USER:PASSWORD@HOST/DB for a team "
                             "(default: sqlite:///STORAGE/NAME/optuna.db, or ./NAME-optuna.db with s3:// storage); "
                             "browse it with `optuna-dashboard URL`")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study --name from --storage")
    parser.add_argument("--dry-run", nargs="?", type=int, const=5, metavar="N",
                        help="check config, space, storage (writable), tracking URI and Optuna storage (reachable) and "
                             "the cluster, print the first N proposed configurations (default 5), the resources per "
                             "trial and how many trials run at once; train nothing")
    parser.add_argument("--json", action="store_true", help="print the end summary (or the dry run) as one JSON object")
    parser.set_defaults(handler=_tune)


def _tune(args) -> int:
    from drugprot.config import load_config
    from drugprot.tuning.space import load_space
    from drugprot.tuning.study import (Resources, StudyError, StudyPlan, StudyRuntime, StudySearch, default_name,
                                       plan_json, plan_text, summary, summary_json, tune_study)

    if args.resume:
        if not args.name:
            raise StudyError("--resume needs --name (the study to continue)")
        search = None
        if args.config or args.space or args.overrides:
            print("note: --resume keeps the study's own config and space; --config/--space/--set are ignored")
    else:
        if args.config is None or args.space is None:
            raise StudyError("a new study needs --config FILE and --space FILE (or --resume --name STUDY)")
        config = load_config(args.config, args.overrides)
        search = StudySearch(config=config, space=load_space(args.space, config), num_samples=args.num_samples,
                             max_concurrent=args.max_concurrent)
    runtime = StudyRuntime(name=args.name or default_name(args.space), storage=args.storage,
                           tracking_uri=args.tracking_uri, optuna_storage=args.optuna_storage, address=args.address,
                           resources=Resources(cpus=args.cpus_per_trial, gpus=args.gpus_per_trial),
                           resume=args.resume, dry_run=args.dry_run)
    # With --json, stdout carries only the JSON object: progress (lines, the trial table) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = tune_study(search, runtime)
    if isinstance(result, StudyPlan):
        print(json.dumps(plan_json(result)) if args.json else plan_text(result), flush=True)
        return 0
    print(json.dumps(summary_json(result)) if args.json else summary(result), flush=True)
    return 0 if result.complete else 130
