"""``drugprot data check|stats|download``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from drugprot.candidates import DEFAULT_INTERVAL
from drugprot.config import SAMPLE_DIR


def register(commands) -> None:
    data = commands.add_parser("data", help="Validate, describe or download the corpus.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    check = sub.add_parser("check", help="Validate every split in a corpus folder; non-zero exit on errors.")
    check.add_argument("--data", type=Path, default=SAMPLE_DIR, help="corpus folder (default: bundled sample)")
    check.add_argument("--strict", action="store_true", help="treat warnings (duplicate relation lines) as errors")
    check.set_defaults(handler=_check)

    stats = sub.add_parser("stats", help="Counts per type, multi-label pairs, candidate and recall-ceiling figures.")
    stats.add_argument("--data", type=Path, default=SAMPLE_DIR)
    stats.add_argument("--split", action="append", help="split(s) to describe (default: all)")
    stats.add_argument("--interval", nargs=2, type=int, metavar=("LO", "HI"), default=list(DEFAULT_INTERVAL))
    stats.add_argument("--strict", action="store_true")
    stats.add_argument("--json", action="store_true", help="print one JSON object (a list for several splits)")
    stats.set_defaults(handler=_stats)

    download = sub.add_parser("download", help="Fetch the official v1.1 archive and verify its sha256.")
    download.add_argument("--dest", type=Path, default=Path("data/drugprot"))
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.add_argument("--url", default=None, help=argparse.SUPPRESS)
    download.add_argument("--sha256", default=None, help=argparse.SUPPRESS)
    download.set_defaults(handler=_download)


def _check(args) -> int:
    from drugprot.corpus import CorpusError, available_splits, read_split

    failed = False
    splits = available_splits(args.data)
    if not splits:
        print(f"{args.data}: no split folders with *_entities.tsv found")
        return 1
    for split in splits:
        try:
            corpus = read_split(args.data, split, strict=args.strict)
        except CorpusError as error:
            failed = True
            print(f"{split}: INVALID\n{error}")
            continue
        print(f"{split}: ok, {len(corpus)} documents, {len(corpus.warnings)} warning(s)")
        for warning in corpus.warnings[:10]:
            print(f"  warning: {warning}")
    return 1 if failed else 0


def _stats(args) -> int:
    from drugprot.corpus import available_splits
    from drugprot.stats import format_statistics, split_statistics

    from drugprot.errors import DrugprotError

    lo, hi = args.interval
    if not lo <= 0 <= hi:
        raise DrugprotError(f"--interval: must satisfy LO <= 0 <= HI, got {lo} {hi}")
    results = [split_statistics(args.data, split, (lo, hi), strict=args.strict) for split in (args.split or available_splits(args.data))]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        print("\n\n".join(format_statistics(r) for r in results))
    return 0


def _download(args) -> int:
    from drugprot.download import OFFICIAL_SHA256, OFFICIAL_URL, download_corpus

    dest = download_corpus(args.dest, url=args.url or OFFICIAL_URL, sha256=args.sha256 or OFFICIAL_SHA256,
                           quiet=args.quiet)
    print(f"DrugProt v1.1 training and development sets in {dest} (sha256 verified). Licence CC BY 4.0: cite Miranda et al. 2021.")
    return 0
