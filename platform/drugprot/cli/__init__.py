"""``drugprot`` command line: thin shells over the stage modules, one file per command group.

Heavy libraries (torch, Ray, MLflow) are imported inside the handlers so ``drugprot --help`` stays instant.

Exit status, the same for every command: 0 done; 1 refused input or a failed run (a ``DrugprotError``, a missing
file, a failed check); 2 only for usage errors (argparse's own convention: unknown option, missing argument);
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from drugprot.errors import DrugprotError

COMMAND_MODULES = ("data", "encoder", "evaluate", "train", "predict", "tune", "ensemble", "distill", "serve",
                   "manifest")
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an option it does not know is refused with this subcommand's usage (argparse would
    hand it up and print the top level's ``drugprot [-h] COMMAND``)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    from drugprot import __version__

    parser = argparse.ArgumentParser(prog="drugprot", description="DrugProt chemical–gene relation extraction platform.")
    parser.add_argument("--version", action="version", version=f"drugprot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"drugprot.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"drugprot.cli.{name}":
                raise
            continue
        module.register(commands)
    return parser


def resolve_environment(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--tracking-uri`` and the Ray address from ``MLFLOW_TRACKING_URI`` / ``RAY_ADDRESS`` when not given.

    The tracking URI is resolved here, once, to an absolute store (``sqlite:///mlflow.db`` in this folder when
    nothing is set), so that Ray workers and Serve replicas, which may run elsewhere, use the very same store.
    """
    from drugprot.environment import RAY_ADDRESS_VARIABLE, quiet_defaults, setting

    quiet_defaults()
    if hasattr(args, "tracking_uri"):
        from drugprot.mlflow_store import normalize_tracking_uri

        args.tracking_uri = normalize_tracking_uri(args.tracking_uri)
    for attribute in ("address", "ray_address"):
        if hasattr(args, attribute):
            setattr(args, attribute, setting(getattr(args, attribute), RAY_ADDRESS_VARIABLE))
    return args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(resolve_environment(args).handler(args) or 0)
    except (DrugprotError, FileNotFoundError) as error:
        print(f"drugprot {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"drugprot {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
