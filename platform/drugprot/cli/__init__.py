"""``drugprot`` command line: thin shells over the stage modules, one file per command group.

Heavy libraries (torch, Ray, MLflow) are imported inside the handlers so ``drugprot --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from drugprot.errors import DrugprotError

COMMAND_MODULES = ("data", "evaluate", "train", "predict", "tune", "ensemble", "distill", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drugprot", description="DrugProt chemical–gene relation extraction platform.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"drugprot.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"drugprot.cli.{name}":
                raise
            continue
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except DrugprotError as error:
        print(f"drugprot {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"drugprot {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drugprot {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
