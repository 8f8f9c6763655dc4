"""``drugprot predict``: relations for a split (official layout, one output file) or, with ``--input``, for a
corpus of any size in PubTator, BioC or DrugProt files (streamed into resumable output shards, see drugprot.bulk)."""

from __future__ import annotations

import json
from pathlib import Path

from drugprot.formats import INPUT_FORMATS, OUTPUT_FORMATS


def register(commands) -> None:
    from drugprot.inference.options import add_inference_arguments

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
    parser.add_argument("--threshold", type=float, default=0.0, help="drop relations scoring below this")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_inference_arguments(parser)
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
    from drugprot.inference.options import given_arguments, inference_options

    if args.shard_size < 1:
        raise DrugprotError(f"--shard-size must be at least 1, got {args.shard_size}")
    try:
        options = inference_options("flag", **given_arguments(args))
    except ValueError as error:
        raise DrugprotError(str(error)) from None
    from drugprot.registry import resolve_model_folder

    # once, before anything runs: a registry URI becomes its checked local folder for every path below
    args.model = str(resolve_model_folder(args.model, tracking_uri=args.tracking_uri, verify_key=args.verify_key))
    with tqdm(unit="pairs", desc="predict", disable=args.quiet, dynamic_ncols=True) as bar:
        summary = _predict_split(args, options, bar) if args.data else _predict_corpus(args, options, bar)
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


def _job(args, options, inputs: tuple[str, ...], shard_size: int, output_format: str):
    """The bulk job of this command (``args.model`` is a local folder by now, so Ray actors load from it)."""
    from drugprot.bulk import BulkJob

    return BulkJob(inputs, args.format, output_format, shard_size, args.model, args.threshold, options)


def _predict_split(args, options, bar) -> dict:
    from drugprot.bulk import predict_documents, predict_split_with_ray, write_atomic
    from drugprot.corpus import read_split, write_relations
    from drugprot.inference.loading import load_predictor, relation_rows

    if args.ray:
        job = _job(args, options, (), args.ray_batch_size, "tsv")
        documents = read_split(args.data, args.split).documents
        data, pairs = predict_split_with_ray(documents, job, device=args.device, actors=args.ray_actors,
                                             address=args.ray_address)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, data)
        relations = data.count(b"\n")
    else:
        predictor = load_predictor(args.model, device=args.device, options=options)
        documents = read_split(args.data, args.split).documents
        bar.total = predictor.plan.prepare(documents).pairs
        predictions, pairs = predict_documents(predictor, documents, threshold=args.threshold, on_pairs=bar.update)
        rows = relation_rows(documents, predictions)
        write_relations(args.out, rows)
        relations = len(rows)
    return {"out": str(args.out), "documents": len(documents), "pairs": pairs, "relations": relations}


def _predict_corpus(args, options, bar) -> dict:
    from drugprot.bulk import predict_corpus, predict_corpus_with_ray
    from drugprot.inference.loading import load_predictor

    job = _job(args, options, tuple(str(p) for p in args.input), args.shard_size, args.output_format)
    if args.ray:
        summary = predict_corpus_with_ray(job, args.out, device=args.device, actors=args.ray_actors,
                                          address=args.ray_address, on_pairs=bar.update)
    else:
        predictor = load_predictor(job.model, device=args.device, options=job.options)
        summary = predict_corpus(predictor, job, args.out, on_pairs=bar.update)
    return summary.as_dict()
