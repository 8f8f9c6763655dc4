"""``drugprot ensemble``: build a voting ensemble from a study (top-k trials, greedy selection or K new seeds) or
from folders, evaluate it on dev next to its members, log it to MLflow and optionally register it (promotion gates).

With ``--study``, the trials' stored dev probabilities give the A/B table first (drugprot.ensemble.selection):
every candidate chosen on dev half A and scored on half B. The halves are the study's own (``data.selection_seed``,
drugprot.dev_halves): members, weights, thresholds and the early exit are chosen on A; B is for the report and the
promotion gate.

With ``--reseed K --final`` the K seeds train on train + dev for the step count of the best trial's best checkpoint:
that ensemble has no dev score, is registered with a tag saying so and is never promoted by the gate (only by
``--force``, recorded)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

DEFAULT_TOP_K = 5


def register(commands) -> None:
    parser = commands.add_parser(
        "ensemble", help="Build, evaluate, log and register a voting ensemble of a study's best models.",
        description="Members come from --study (the top-k trials by F1 on dev half A, or --reseed K new seeds of the "
                    "best configuration) or from --members folders. Every choice is made on dev half A (the split of "
                    "the members' data.selection_seed); half B is held out. The ensemble folder is written to --out, "
                    "evaluated on dev and on half B (each member and the vote side by side), logged as a run of the "
                    "study's MLflow experiment, and with --register NAME registered as a pyfunc model whose --alias "
                    "moves only when its F1 on half B beats the current one's (or with --force).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--study", help="study name (its MLflow experiment holds one child run per trial)")
    source.add_argument("--members", nargs="+", type=Path, metavar="DIR", help="member model folders, best first")
    parser.add_argument("--select", choices=("top-k", "greedy"), default="top-k",
                        help="top-k: the study's best trials by F1 on dev half A; greedy: forward selection with replacement over "
                             "all finished trials, with calibrated decisions, chosen on dev half A (default top-k)")
    parser.add_argument("--top-k", type=int, default=None, help=f"members from the study's best trials (default {DEFAULT_TOP_K})")
    parser.add_argument("--max-size", type=int, default=None, help="greedy: at most this many votes (default 10)")
    parser.add_argument("--multi-label", action="store_true",
                        help="greedy: allow a second relation type per pair when it passes its calibrated threshold")
    parser.add_argument("--min-gain", type=float, default=0.0,
                        help="promotion gate: the new version must beat the champion and its own best member on dev "
                             "half B by more than this F1 (default 0)")
    parser.add_argument("--reseed", type=int, metavar="K", help="instead: retrain the best configuration with K new seeds")
    parser.add_argument("--final", action="store_true",
                        help="--reseed: train the seeds on training + development documents for as many optimizer "
                             "steps as the best trial's best checkpoint (chosen on dev half A); the ensemble has no "
                             "dev score: it is registered with a tag saying so, and only --force promotes it")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C",
                        help="--reseed: CPUs per retraining trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G",
                        help="--reseed: GPUs per retraining trial; fractions share a card (default 0: CPU)")
    parser.add_argument("--vote", default="hard", help="hard (majority, ties to the highest mean probability) or soft (mean probability)")
    parser.add_argument("--register", metavar="NAME", help="register the ensemble as a new version of this MLflow model")
    parser.add_argument("--alias", default="champion", help="alias to move when the new version wins (default champion)")
    parser.add_argument("--force", action="store_true",
                        help="move the alias even when a gate fails (recorded in the version's tags); a model that "
                             "predicts no relation is never promoted")
    parser.add_argument("--sign-key", type=Path, metavar="PEM", help="ed25519 private key (unencrypted PEM): sign the "
                        "ensemble's manifest (manifest.sig), for `drugprot serve/predict --verify-key`")
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
    parser.add_argument("--json", action="store_true", help="print the summary (A/B table, dev scores, registration) "
                                                            "as one JSON object on stdout; messages go to stderr")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_ensemble)


def _ensemble(args) -> int:
    from drugprot.ensemble_folder import EnsembleError, check_vote

    check_vote(args.vote, "--vote")
    if args.reseed is not None and args.top_k is not None:
        raise EnsembleError("--top-k and --reseed are alternatives: --top-k K takes the K best trials, --reseed K "
                            "trains K new seeds of the best one")
    if args.final and args.reseed is None:
        raise EnsembleError("--final needs --study and --reseed K: it retrains the study's best configuration on "
                            "train + dev with K seeds")
    if args.final and (args.data is not None or args.split is not None):
        raise EnsembleError("--data and --split choose the dev evaluation, and a --final ensemble has none: its "
                            "members train on the study's own training and development documents; drop them")
    if args.members and args.reseed is not None:
        raise EnsembleError("--reseed needs --study (it retrains the study's best configuration)")
    if args.select == "greedy" and (args.members or args.reseed is not None):
        raise EnsembleError("--select greedy needs --study (it chooses among the study's trials) and excludes --reseed")
    if args.register and args.no_log:
        raise EnsembleError("--register logs the ensemble to MLflow; drop --no-log")
    if args.sign_key is not None:
        from drugprot.manifest import read_key

        read_key(args.sign_key, "private")  # a bad key fails before the build, not after
    top_k = args.top_k if args.top_k is not None else DEFAULT_TOP_K
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / "ensembles" / f"{args.study or 'ensemble'}-{stamp}"
    if out.exists() and any(out.iterdir()):
        raise EnsembleError(f"--out {out}: already exists and is not empty; choose another folder or remove it")
    work = out.parent / f".{out.name}.work"
    say = _stderr if args.json else print

    try:
        # with --json stdout holds the JSON alone: what Ray Tune prints while reseeding goes to stderr
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            built, comparison, documents = _build(args, top_k, out, work, say)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    summary = {"out": str(out), "select": "reseed" if args.reseed is not None else args.select if args.study else "folders",
               "dev_score": built.meta.get("dev_score"),
               "vote": built.meta["vote"], "decision": built.meta.get("decision"), "execution": built.meta.get("execution"),
               "early_exit": built.meta.get("early_exit"),
               "members": [{"name": m["name"], "weight": m["weight"], "dev_f1_a": m["dev_f1_a"]} for m in built.meta["members"]],
               "selection": comparison.as_dict() if comparison else None,
               "dev": built.evaluation.as_dict() if built.evaluation else None,
               "run_id": None, "registration": None}
    if comparison is not None:
        say(comparison.table())
    if built.evaluation is not None:
        say(built.evaluation.table())
    else:
        say(f"no dev score: members {', '.join(built.meta.get('trained_on_dev') or [])} trained on the development "
            f"documents")
    say(f"ensemble of {len(built.meta['members'])} members ({built.meta.get('execution')} execution) written to {out}")
    if args.sign_key is not None:
        from drugprot.manifest import sign_manifest

        say(f"manifest signed with {args.sign_key}: {sign_manifest(out, args.sign_key)}")
    calibrated = built.meta.get("early_exit")
    if calibrated:
        say(f"early exit calibrated on dev half A: confidence {calibrated['confidence']} keeps {calibrated['agreement']:.2%} "
            f"of the relations with {calibrated['member_pair_share']:.1%} of the member-pairs scored "
            f"(`drugprot predict --early-exit`)")
    if not args.no_log:
        from drugprot.ensemble.publish import log_ensemble

        gate = _gate(args, built, documents, say) if args.register and built.evaluation is not None else None
        run = log_ensemble(out, tracking_uri=args.tracking_uri, experiment=args.experiment, register=args.register,
                           alias=args.alias, force=args.force, gate=gate, min_gain=args.min_gain, log=say,
                           run_name=f"ensemble-{args.study or 'folders'}-{stamp}")
        summary["run_id"] = run.run_id
        say(f"logged as MLflow run {run.run_id} (experiment {run.experiment_id})")
        if run.registration is not None:
            r = run.registration
            summary["registration"] = {"name": r.name, "version": r.version, "alias": r.alias, "alias_moved": r.alias_moved,
                                       "reason": r.reason, "previous_version": r.previous_version}
            target = f"models:/{args.register}@{args.alias}" if r.alias_moved else r.model_uri
            say(f"registered {r.model_uri}; predict with `drugprot predict --model {target} ...`")
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _gate(args, built, documents, say):
    """What promotion compares, all on dev half B (held out from every choice): the built ensemble, its best member
    and the current champion run on the same documents."""
    from drugprot.dev_halves import split_halves
    from drugprot.registry import Gate

    dev = built.evaluation
    relations = dev.ensemble.micro.tp + dev.ensemble.micro.fp
    members = [r.f1 for name, r in dev.held_out.items() if name != "ensemble"]
    half_b = split_halves(documents, built.meta["selection_seed"]).b
    return Gate(dev.held_out["ensemble"].f1, max(members) if len(members) > 1 else None,
                champion_f1_on(args, list(half_b), say), relations, "dev half B")


def champion_f1_on(args, documents, say) -> float | None:
    """The current ``--alias`` version run on ``documents`` (the one inference path), or None when there is none."""
    from drugprot.inference.loading import load_predictor, relation_rows
    from drugprot.scoring import score
    from drugprot.registry import RegistryError

    uri = f"models:/{args.register}@{args.alias}"
    try:
        predictor = load_predictor(uri, device=args.device, tracking_uri=args.tracking_uri)
    except RegistryError:
        return None
    rows = relation_rows(documents, predictor.predict(documents))
    result = score(documents, [(pmid, r.type, r.chemical, r.gene) for pmid, r in rows])
    say(f"current {uri} on dev half B: F1 {result.f1:.4f}")
    return result.f1


def _build(args, top_k: int, out: Path, work: Path, say):
    from drugprot.ensemble.build import MemberSource, build_ensemble, dev_documents, member_info

    comparison, decision, vote = None, None, args.vote
    if args.study:
        sources, source, comparison = _from_study(args, top_k, work, say)
        if comparison is not None and args.select == "greedy":
            decision, vote = comparison.chosen.recipe.decision, comparison.chosen.recipe.vote
    else:
        sources = [MemberSource(Path(p)) for p in args.members]
        source = {"selection": "folders", "members": [str(p) for p in args.members]}
    documents, split = (None, "") if args.final else \
        dev_documents(member_info(sources[0].path), data_dir=args.data, split=args.split)
    if args.data is not None:  # the ensemble run's dataset input names the corpus it was evaluated on
        source = {**source, "data_dir": str(args.data.resolve())}
    built = build_ensemble(sources, out, vote=vote, documents=documents, split=split, source=source, device=args.device,
                           interval=tuple(args.interval) if args.interval else None, log=say, decision=decision,
                           selection=comparison.as_dict() if comparison else None, progress=not args.quiet,
                           evaluate_on_dev=not args.final)
    return built, comparison, documents


def _from_study(args, top_k: int, work: Path, say):
    from drugprot import tracking
    from drugprot.registry import existing_store
    from drugprot.ensemble.build import MemberSource, dev_documents
    from drugprot.ensemble.members import best_trial, final_steps, member_name, reseed, select_top_k
    from drugprot.ensemble.selection import DEFAULT_MAX_SIZE, compare, study_trial_probabilities

    store = existing_store(args.tracking_uri)
    records = tracking.study_trials(args.study, store)  # unknown study: TrackingError listing the experiments
    if args.reseed is not None:
        best = best_trial(records, study=args.study)
        steps = final_steps(tracking.trial_metrics(best, store), best, study=args.study) if args.final else None
        result = reseed(best, args.reseed, work_dir=work / "reseed", study=args.study,
                        used_seeds=[r.seed for r in records if r.seed is not None], tracking_uri=store,
                        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, final_steps=steps)
        source = {"study": args.study, "selection": "reseed", "reseed": args.reseed, "reseed_of": str(best.trial_id),
                  "reseed_of_run": best.run_id, "seeds": result.seeds}
        if steps is not None:
            source.update(final=True, steps=steps)
        return result.members, source, None
    if args.select == "top-k":
        selection = select_top_k(records, top_k, study=args.study)  # a too-large --top-k fails before any download
    trials = study_trial_probabilities(records, store, work / "probabilities", log=say)
    comparison = None
    if trials:
        documents, _ = dev_documents({"config": trials[0].record.config}, data_dir=args.data, split=args.split)
        from tqdm import tqdm

        max_size = args.max_size if args.max_size is not None else DEFAULT_MAX_SIZE
        with tqdm(total=4 * max_size, unit="step", desc="greedy selection", disable=args.quiet, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            comparison = compare(trials, documents, select=args.select, top=top_k,
                                 max_size=max_size, multi_label=args.multi_label, progress=bar.update)
    elif args.select == "greedy":
        from drugprot.ensemble_folder import EnsembleError

        raise EnsembleError(f"--select greedy: no finished trial of study {args.study!r} has stored dev probabilities "
                            "(dev_probabilities.safetensors); run the study with this version of drugprot")
    if args.select == "greedy":
        by_index = [(trials[i].record, n) for i, n in comparison.chosen.recipe.members.items()]
        source = {"study": args.study, "selection": "greedy", "vote": comparison.chosen.recipe.vote,
                  "trials": {str(r.trial_id): n for r, n in by_index}}
    else:
        if selection.note:
            _stderr(f"note: {selection.note}")
        by_index = [(r, 1) for r in selection.records]
        source = {"study": args.study, "selection": "top-k", "top_k": top_k, "seeds_searched": selection.seeds_searched,
                  "trials": [str(r.trial_id) for r in selection.records]}
    sources = []
    for record, weight in by_index:
        folder = tracking.download_trial_model(record, work / "trials" / member_name(record), store)
        sources.append(MemberSource(Path(folder), name=member_name(record), dev_f1_a=float(record.best_dev_f1_a),
                                    seed=record.seed, weight=weight,
                                    source={"study": args.study, "trial_id": str(record.trial_id), "run_id": record.run_id}))
    return sources, source, comparison
