"""``drugprot predict``: relations for a split (official layout, one output file) or, with ``--input``, for a
corpus of any size in PubTator, BioC or DrugProt files (streamed into resumable output shards, see drugprot.bulk)."""

from __future__ import annotations

import json
from pathlib import Path

from drugprot.formats import INPUT_FORMATS, OUTPUT_FORMATS


def register(commands) -> None:
    parser = commands.add_parser("predict", help="Predict relations for a split, or stream a corpus into output shards.")
    parser.add_argument("--model", required=True, help="model folder (train --out DIR, or DIR/model), ensemble folder, "
                                                       "or a registry URI models:/NAME@ALIAS")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="corpus folder in the official layout (with --split; --out is a file)")
    source.add_argument("--input", type=Path, nargs="+", metavar="PATH",
                        help="input files or folders, read lazily (with --format; --out is a folder of shards)")
    parser.add_argument("--split", default="development")
    parser.add_argument("--format", choices=INPUT_FORMATS, default="pubtator",
                        help="--input format: pubtator, bioc (XML or JSON) or drugprot (split folders)")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="tsv",
                        help="--input output: official tsv, jsonl (a document per line, scores and votes) or bioc XML")
    parser.add_argument("--shard-size", type=int, default=1000, help="documents per output shard (default 1000)")
    parser.add_argument("--out", type=Path, required=True,
                        help="predictions file (PMID, TYPE, Arg1:Tn, Arg2:Tm) with --data; a shard folder with --input")
    parser.add_argument("--interval", nargs=2, type=int, metavar=("LO", "HI"), help="GENE interval (default: the model's)")
    parser.add_argument("--threshold", type=float, default=0.0, help="drop relations scoring below this")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "int8", "cascade"),
                        help="bf16 (CUDA; CPU runs fp32), fp32; CPU only: cascade (bf16 weights, close calls "
                             "re-scored in fp32: the fast CPU path on CPUs with AMX/AVX512-BF16) or int8 (dynamic "
                             "int8 quantization)")
    parser.add_argument("--cascade-margin", type=float, help="--precision cascade: re-score in fp32 the pairs whose "
                        "bf16 top-2 probability margin is below this (default 0.01; 0: bf16 alone, the fastest)")
    parser.add_argument("--early-exit", nargs="?", const="calibrated", metavar="P",
                        help="an ensemble's members, run in turn, stop on a pair once all so far vote no relation with "
                             "mean P(NONE) >= P; without P, the confidence calibrated on dev when the ensemble was "
                             "built (it agreed with the full vote on >= 99.9%% of its dev relations). Approximate")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs")
    parser.add_argument("--verify-key", type=Path, metavar="PEM", help="ed25519 public key: refuse a model whose "
                        "manifest is not signed by it (drugprot ensemble --sign-key)")
    parser.add_argument("--ray", action="store_true", help="predict with Ray Data actors (one model copy per actor, "
                                                           "a GPU each when the cluster has them); same output")
    parser.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--ray-actors", type=int, default=1, help="actors holding the model (default 1)")
    parser.add_argument("--ray-batch-size", type=int, default=16, help="documents per actor call with --data (default 16)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_predict)


def _predict(args) -> int:
    from tqdm import tqdm

    from drugprot.errors import DrugprotError
    from drugprot.inference import early_exit_value

    if args.shard_size < 1:
        raise DrugprotError(f"--shard-size must be at least 1, got {args.shard_size}")
    if args.cascade_margin is not None and args.precision != "cascade":
        raise DrugprotError(f"--cascade-margin applies to --precision cascade only, got --precision {args.precision}")
    if args.cascade_margin is not None and not 0.0 <= args.cascade_margin <= 1.0:
        raise DrugprotError(f"--cascade-margin must be between 0 and 1 (a probability margin), got {args.cascade_margin}")
    try:
        args.early_exit = early_exit_value(args.early_exit)
    except ValueError as error:
        raise DrugprotError(f"--early-exit {error}, got {args.early_exit!r}") from None
    from drugprot.registry import resolve_model_folder

    # once, before anything runs: a registry URI becomes its checked local folder for every path below
    args.model = str(resolve_model_folder(args.model, tracking_uri=args.tracking_uri, verify_key=args.verify_key))
    interval = tuple(args.interval) if args.interval else None
    with tqdm(unit="pairs", desc="predict", disable=args.quiet, dynamic_ncols=True) as bar:
        summary = _predict_split(args, interval, bar) if args.data else _predict_corpus(args, interval, bar)
    if args.json:
        print(json.dumps(summary))
    elif args.data:
        print(f"{summary['relations']} relations for {summary['documents']} documents written to {args.out}")
    else:
        skipped = ", ".join(f"{n} {t}" for t, n in summary["skipped_types"].items()) or "none"
        print(f"{summary['relations']} relations for {summary['documents']} documents ({summary['pairs']} pairs) in "
              f"{args.out}: {summary['shards_written']} shard(s) written, {summary['shards_skipped']} already finished; "
              f"mentions of other types skipped: {skipped}")
    return 0


def _predict_split(args, interval, bar) -> dict:
    from drugprot.bulk import predict_documents
    from drugprot.corpus import read_split, write_relations
    from drugprot.inference import load_predictor, relation_rows, run_options

    if args.ray:
        from drugprot.ensemble.batch import predict_with_ray

        documents = read_split(args.data, args.split).documents
        predictions = predict_with_ray(args.model, documents, device=args.device, tracking_uri=args.tracking_uri,
                                       options=run_options(args.precision, args.cascade_margin, args.early_exit),
                                       interval=interval, threshold=args.threshold,
                                       batch_size=args.ray_batch_size, actors=args.ray_actors, address=args.ray_address)
        pairs = None
    else:
        predictor = load_predictor(args.model, device=args.device, tracking_uri=args.tracking_uri,
                                   **run_options(args.precision, args.cascade_margin, args.early_exit))
        documents = read_split(args.data, args.split).documents
        bar.total = len(predictor.candidates(documents, interval))
        predictions, pairs = predict_documents(predictor, documents, interval=interval, threshold=args.threshold,
                                               on_pairs=bar.update)
    rows = relation_rows(documents, predictions)
    write_relations(args.out, rows)
    return {"out": str(args.out), "documents": len(documents), "pairs": pairs, "relations": len(rows)}


def _predict_corpus(args, interval, bar) -> dict:
    from drugprot.bulk import BulkJob, predict_corpus, predict_corpus_with_ray

    model = str(args.model)
    job = BulkJob(tuple(str(p) for p in args.input), args.format, args.output_format, args.shard_size, model,
                  interval, args.threshold, args.precision, args.cascade_margin, args.early_exit)
    if args.ray:
        summary = predict_corpus_with_ray(job, args.out, device=args.device, actors=args.ray_actors,
                                          address=args.ray_address, on_pairs=bar.update)
    else:
        from drugprot.inference import load_predictor, run_options

        predictor = load_predictor(model, device=args.device, **run_options(job.precision, job.cascade_margin, job.early_exit))
        summary = predict_corpus(predictor, job, args.out, on_pairs=bar.update)
    return summary.as_dict()
