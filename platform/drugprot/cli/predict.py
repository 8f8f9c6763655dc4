"""``drugprot predict``: official-format predictions for a corpus split, through the shared inference path."""

from __future__ import annotations

from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser("predict", help="Predict relations for a split and write them in the official format.")
    parser.add_argument("--model", required=True, help="model folder (train --out DIR, or DIR/model), ensemble folder, "
                                                       "or a registry URI models:/NAME@ALIAS")
    parser.add_argument("--data", type=Path, required=True, help="corpus folder in the official layout")
    parser.add_argument("--split", default="development")
    parser.add_argument("--out", type=Path, required=True, help="predictions file (PMID, TYPE, Arg1:Tn, Arg2:Tm)")
    parser.add_argument("--interval", nargs=2, type=int, metavar=("LO", "HI"), help="GENE interval (default: the model's)")
    parser.add_argument("--threshold", type=float, default=0.0, help="drop relations scoring below this")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs")
    parser.add_argument("--ray", action="store_true", help="predict with Ray Data actors (one model copy per actor, "
                                                           "a GPU each when the cluster has them); same output")
    parser.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--ray-actors", type=int, default=1, help="actors holding the model (default 1)")
    parser.add_argument("--ray-batch-size", type=int, default=16, help="documents per actor call (default 16)")
    parser.set_defaults(handler=_predict)


def _predict(args) -> int:
    from drugprot.corpus import read_split, write_relations
    from drugprot.inference import load_predictor, relation_rows

    if args.ray:
        from drugprot.ensemble.batch import predict_with_ray

        documents = read_split(args.data, args.split).documents
        predictions = predict_with_ray(args.model, documents, device=args.device, tracking_uri=args.tracking_uri,
                                       interval=tuple(args.interval) if args.interval else None, threshold=args.threshold,
                                       batch_size=args.ray_batch_size, actors=args.ray_actors, address=args.ray_address)
    else:
        predictor = load_predictor(args.model, device=args.device, tracking_uri=args.tracking_uri)
        documents = read_split(args.data, args.split).documents
        predictions = predictor.predict(documents, interval=tuple(args.interval) if args.interval else None,
                                        threshold=args.threshold)
    rows = relation_rows(documents, predictions)
    write_relations(args.out, rows)
    print(f"{len(rows)} relations for {len(documents)} documents written to {args.out}")
    return 0
