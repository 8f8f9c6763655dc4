"""``drugprot encoder import|list``: bring Hugging Face encoders into the offline encoder store."""

from __future__ import annotations

import json


def register(commands) -> None:
    parser = commands.add_parser("encoder", help="Import encoders into the offline store; list what is there.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    importing = actions.add_parser("import", help="Check a Hugging Face folder (or hub id) and copy it into the store.")
    importing.add_argument("source", metavar="SRC", help="a local Hugging Face folder, or a hub id where a network is there")
    importing.add_argument("--name", required=True, help="the store name; then use `encoder.name: NAME` in a config")
    importing.add_argument("--lowercase", choices=["auto", "true", "false"], default="auto",
                           help="casing, as encoder.lowercase (auto: the tokenizer's config, else the vocabulary)")
    importing.set_defaults(handler=_import)
    listing = actions.add_parser("list", help="The encoders in the store.")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)


def _import(args) -> int:
    from drugprot.model.encoder_import import import_encoder

    lowercase = {"auto": "auto", "true": True, "false": False}[args.lowercase]
    import_encoder(args.source, args.name, lowercase=lowercase, say=print)
    return 0


def _list(args) -> int:
    from drugprot.model.store import list_encoders, store_root

    records = list_encoders()
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    print(f"encoder store: {store_root()}")
    if not records:
        print("(empty: `drugprot encoder import SRC --name NAME` adds one)")
    for r in records:
        print(f"{r['name']:<24} {r['architecture']:<10} {r['layers']} layers, hidden {r['hidden_size']}, "
              f"{r['vocabulary']} tokens, {'lowercased' if r['lowercase'] else 'cased' if r['lowercase'] is False else 'no casing switch'}"
              f"  from {r['source']}  ({r['imported_at']})")
    return 0
