"""``drugprot evaluate``: official-equivalent scoring of a prediction file."""

from __future__ import annotations

import json
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser("evaluate", help="Score official-format predictions against a gold split.")
    parser.add_argument("--gold", type=Path, required=True, help="corpus folder holding the gold split")
    parser.add_argument("--split", default="development")
    parser.add_argument("--pred", type=Path, required=True, help="predictions: PMID<TAB>TYPE<TAB>Arg1:Tn<TAB>Arg2:Tm")
    parser.add_argument("--pmids", type=Path, help="file of PMIDs (one per line) that filters the predictions")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args) -> int:
    from drugprot.corpus import read_split
    from drugprot.scoring import read_predictions, score

    gold = read_split(args.gold, args.split)
    pmids = args.pmids.read_text().split() if args.pmids else None
    result = score(gold.documents, read_predictions(args.pred), pmids)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(result.table())
        print(f"\nmicro precision {result.precision:.4f}  recall {result.recall:.4f}  f1 {result.f1:.4f}")
    return 0
