"""Pin the model of rendered KubeRay RayServices to the registry version its alias names now.

``serve/cluster.yaml`` (and so ``infra/kuberay/rayservice.yaml``) names ``models:/NAME@ALIAS``, which every replica
resolves when it starts: a pod restart after a promotion would change the model with no deploy and no record.
Rendering pins it: each application's ``args.model`` becomes ``models:/NAME/VERSION``, and annotations on the
RayService record the alias, the version and when it was read. Following the alias instead (each pod start reads
it) is an explicit choice, ``follow_alias``, which the annotations say as well. Pure YAML in, YAML out; the caller
resolves aliases (``drugprot manifest`` through :func:`drugprot.registry.resolve_model_version`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import yaml

from drugprot.errors import DrugprotError
from drugprot.registry import parse_model_uri

ANNOTATION = "drugprot.io/"
ALIAS, VERSION, RESOLVED_AT, POLICY = (f"{ANNOTATION}{key}" for key in
                                       ("model-alias", "model-version", "model-resolved-at", "model-policy"))
PINNED = "pinned: pods serve this version until the manifest is rendered and applied again"
FOLLOWING = ("follow-alias: each pod reads the alias when it starts, so a restart after a promotion serves the new "
             "version (rendered with --follow-alias)")


class ManifestError(DrugprotError):
    """Input that holds no RayService to pin, or one whose serve config does not parse."""


def pin_rayservices(docs: list[dict], resolve: Callable[[str], str], *, follow_alias: bool = False,
                    now: datetime | None = None) -> list[str]:
    """Pin (or, with ``follow_alias``, only record) every application's ``models:/NAME@ALIAS`` in the RayServices
    of ``docs``, in place; ``resolve`` maps the alias URI to the version it names. Returns one line per model."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    services = [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") == "RayService"]
    if not services:
        raise ManifestError("no RayService in the input (render infra/kuberay first: kubectl kustomize infra/kuberay)")
    done = []
    for service in services:
        name = service.get("metadata", {}).get("name", "?")
        try:
            config = yaml.safe_load(service["spec"]["serveConfigV2"])
        except (KeyError, TypeError, yaml.YAMLError) as error:
            raise ManifestError(f"RayService {name}: spec.serveConfigV2 is not a Serve config ({error})") from None
        records = {}
        for app in config.get("applications", []):
            uri = str(app.get("args", {}).get("model", ""))
            if not uri.startswith("models:/"):
                continue
            model, alias, _ = parse_model_uri(uri)
            if alias is None:
                raise ManifestError(f"RayService {name}: application {app.get('name')}: {uri} is already a version; "
                                    f"give models:/NAME@ALIAS in serve/cluster.yaml to render it")
            version = str(resolve(uri))
            if not follow_alias:
                app["args"]["model"] = f"models:/{model}/{version}"
            records[app.get("name", "default")] = (uri, version)
            done.append(f"RayService {name}, application {app.get('name')}: {uri} -> version {version} "
                        f"({'followed live' if follow_alias else 'pinned'})")
        if not records:
            raise ManifestError(f"RayService {name}: no application serves a registry model (args.model: models:/…)")
        service["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
        annotations = service.setdefault("metadata", {}).setdefault("annotations", {})
        annotations[ALIAS] = _per_app({app: uri for app, (uri, _) in records.items()})
        annotations[VERSION] = _per_app({app: version for app, (_, version) in records.items()})
        annotations[RESOLVED_AT] = stamp
        annotations[POLICY] = FOLLOWING if follow_alias else PINNED
    return done


def _per_app(values: dict[str, str]) -> str:
    """The value itself for one application, ``app=value, …`` for several."""
    if len(values) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{app}={value}" for app, value in sorted(values.items()))
