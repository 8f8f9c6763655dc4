"""``drugprot manifest``: pin the RayService of rendered KubeRay manifests to the model version an alias names now
(drugprot.manifests)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "manifest", help="Pin a rendered RayService to the registry version its model alias names now.",
        description="Reads rendered manifests (a file, or - for stdin: `kubectl kustomize infra/kuberay | drugprot "
                    "manifest -`), resolves each RayService application's models:/NAME@ALIAS against --tracking-uri, "
                    "replaces it by models:/NAME/VERSION and records alias, version and time in annotations "
                    "(drugprot.io/model-*). With --follow-alias the alias stays (each pod start reads it) and the "
                    "annotations say so.")
    parser.add_argument("manifests", help="rendered YAML (one or more documents), or - for stdin")
    parser.add_argument("--tracking-uri", help="MLflow server of the registry (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--follow-alias", action="store_true",
                        help="keep models:/NAME@ALIAS, read at each pod start (a restart after a promotion changes "
                             "the model); the manifest records this choice")
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    parser.set_defaults(handler=_manifest)


def _manifest(args) -> int:
    import yaml

    from drugprot.manifests import ManifestError, pin_rayservices
    from drugprot.registry import resolve_model_version

    source = "stdin" if args.manifests == "-" else args.manifests
    text = sys.stdin.read() if args.manifests == "-" else Path(args.manifests).read_text(encoding="utf-8")
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise ManifestError(f"{source}: not YAML ({error})") from None
    lines = pin_rayservices(docs, lambda uri: resolve_model_version(uri, tracking_uri=args.tracking_uri).version,
                            follow_alias=args.follow_alias)
    rendered = yaml.safe_dump_all(docs, sort_keys=False)
    if args.out is not None:
        from drugprot.bulk import write_atomic

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, rendered.encode("utf-8"))
    else:
        sys.stdout.write(rendered)
    for line in lines:
        print(f"drugprot manifest: {line}", file=sys.stderr)
    return 0
