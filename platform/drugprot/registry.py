"""The model registry, read and written in one place: ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` resolved
to a local, verified ensemble folder; a new version's provenance tags; the champion alias moved by its gates.

Registering records the ensemble manifest's own sha256 on the version (tag ``manifest_sha256``). The registry sits in
the tracking database, apart from the artifact store that holds the files, so a download whose manifest digest
differs from the registered one is refused, naming both digests: replacing the files and their manifest together
in the artifact store is not enough to get them served. Every path read from the downloaded model's metadata is
checked to stay inside the download folder.

Logging the ensemble run and its pyfunc model is :mod:`drugprot.ensemble.publish`; this module imports no drugprot
stage above :mod:`drugprot.ensemble_folder`, so inference and the ensemble package both stand on it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drugprot.environment import quiet_defaults
from drugprot.manifest import ArtifactError, contained, manifest_digest, verify_signature
from drugprot.mlflow_store import TrackingError, check_tracking_uri, client, normalize_tracking_uri, safe_name, sqlite_path

#: The version tag that holds the sha256 of the registered ensemble's manifest file.
TAG_MANIFEST_SHA256 = "manifest_sha256"


class RegistryError(TrackingError):
    """A registry URI, model, alias or version that does not resolve; the message lists what exists."""


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    import re

    match = re.fullmatch(r"models:/([^/@]+)(?:@([A-Za-z0-9_-]+)|/(\d+))", uri.strip())
    if not match:
        raise RegistryError(f"{uri!r}: expected models:/NAME@ALIAS (e.g. models:/drugprot@champion) or models:/NAME/VERSION")
    return match.group(1), match.group(2), match.group(3)


def existing_store(tracking_uri: str | None) -> str:
    """The normalized URI of a store that exists: a missing SQLite file is refused (MLflow would create an empty one)."""
    uri = normalize_tracking_uri(tracking_uri)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise RegistryError(f"--tracking-uri {uri}: no MLflow database at {path}; pass the store the model was "
                            f"registered in (e.g. sqlite:///runs/mlflow.db or http://HOST:PORT)")
    return check_tracking_uri(uri)


def resolve_model_version(uri: str, *, tracking_uri: str | None = None):
    """The MLflow ``ModelVersion`` a registry URI names, or a :class:`RegistryError` listing what exists."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    store = existing_store(tracking_uri)
    registry = client(store)
    try:
        model = registry.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in registry.search_registered_models(max_results=50))
        raise RegistryError(f"{uri}: no registered model {name!r} in {store} (registered: {', '.join(names) or 'none'})") from None
    try:
        if alias is not None:
            return registry.get_model_version_by_alias(name, alias)
        return registry.get_model_version(name, version)
    except MlflowException:
        if alias is not None:
            aliases = ", ".join(f"@{a} -> version {v}" for a, v in sorted((model.aliases or {}).items()))
            raise RegistryError(f"{uri}: model {name!r} has no alias {alias!r} (aliases: {aliases or 'none'})") from None
        versions = sorted(int(v.version) for v in registry.search_model_versions(f"name = '{name}'"))
        raise RegistryError(f"{uri}: model {name!r} has no version {version} "
                            f"(versions: {', '.join(map(str, versions)) or 'none'})") from None


def registry_cache_dir() -> Path:
    return Path(os.environ.get("DRUGPROT_CACHE_DIR") or Path.home() / ".cache" / "drugprot") / "registry"


def download_registered_model(uri: str, tracking_uri: str | None = None, *, dest: str | os.PathLike | None = None) -> Path:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` and return the local ensemble folder.

    Each version is downloaded once into ``dest`` (default ``$DRUGPROT_CACHE_DIR/registry/…``, else
    ``~/.cache/drugprot/registry/…``, keyed by store, name and version); a cached copy that fails its sha256 manifest
    is downloaded again. A download whose manifest digest differs from the version's ``manifest_sha256`` tag is
    refused and not cached. Loading the folder verifies the manifest once more and refuses a modified file by name.
    """
    return _download(uri, tracking_uri, dest)[1]


def _download(uri: str, tracking_uri: str | None, dest: str | os.PathLike | None) -> tuple[Path, Path]:
    """``(MLflow model folder, ensemble folder inside it)`` of a registered version, downloaded and checked."""
    import hashlib
    import shutil

    import mlflow

    from drugprot.ensemble_folder import verify_tree_manifest

    version = resolve_model_version(uri, tracking_uri=tracking_uri)
    store = normalize_tracking_uri(tracking_uri)
    key = hashlib.sha256(store.encode()).hexdigest()[:12]
    target = Path(dest) if dest else registry_cache_dir() / key / safe_name(version.name) / str(version.version)
    if (target / "MLmodel").is_file():
        try:
            folder = _registered_folder(target, uri, version)
            verify_tree_manifest(folder)
            return target, folder
        except (ArtifactError, RegistryError) as error:
            print(f"cached copy of {uri} failed verification ({error}); downloading it again", file=sys.stderr, flush=True)
            shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        quiet_defaults()
        # models:/ URIs would resolve through the process-wide registry URI; ask this store for the location instead
        location = client(store).get_model_version_download_uri(version.name, str(version.version))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(staging), tracking_uri=store))
        _registered_folder(local, uri, version)
        try:
            local.rename(target)
        except OSError:  # another process finished the same download first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, _registered_folder(target, uri, version)


def _registered_folder(model_dir: Path, uri: str, version) -> Path:
    """The ensemble folder of a downloaded version, refused unless its manifest is the one that was registered."""
    folder = _ensemble_artifact(model_dir, uri, version.version)
    registered = (version.tags or {}).get(TAG_MANIFEST_SHA256)
    found = manifest_digest(folder)
    if registered is None:
        print(f"{uri} (version {version.version}): registered without a {TAG_MANIFEST_SHA256} tag, so its files cannot "
              f"be matched to the registry; register it again to pin them", file=sys.stderr, flush=True)
    elif found != registered:
        raise RegistryError(f"{uri} (version {version.version}): the downloaded manifest's sha256 is {found}, but "
                            f"the registry recorded {registered} at registration; the files in the artifact store were "
                            f"replaced, refusing to load them")
    return folder


def resolve_model_folder(model: str | os.PathLike, *, tracking_uri: str | None = None,
                         verify_key: str | os.PathLike | None = None) -> Path:
    """The local folder ``--model`` names: a folder, or a registry URI downloaded and checked against its registered
    manifest digest; with ``verify_key`` (an ed25519 public key, PEM), refused unless its manifest carries that key's
    signature."""
    from drugprot.errors import DrugprotError

    path = download_registered_model(str(model), tracking_uri) if str(model).startswith("models:/") else Path(model)
    if not path.exists():
        raise DrugprotError(f"--model {model}: no such folder")
    if verify_key is not None:
        verify_signature(path, verify_key)
    return path


def load_pyfunc(uri: str, *, tracking_uri: str | None = None, verify_key: str | os.PathLike | None = None,
                model_config: dict | None = None):
    """``mlflow.pyfunc.load_model`` for a registered drugprot ensemble, after the checks of :func:`resolve_model_folder`.

    Call this rather than ``mlflow.pyfunc.load_model("models:/…")``: MLflow runs the model's code as soon as it loads
    it, and that code sits in the artifact store too, so no check inside the model can vouch for it.
    """
    import mlflow

    model_dir, folder = _download(uri, tracking_uri, None)
    if verify_key is not None:
        verify_signature(folder, verify_key)
    return mlflow.pyfunc.load_model(str(model_dir), model_config=model_config)


def _ensemble_artifact(model_dir: Path, uri: str, version) -> Path:
    """The ensemble folder inside a downloaded pyfunc model: its ``ensemble`` artifact, where ``MLmodel`` records it."""
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        relative = Model.load(model_dir).flavors["python_function"]["artifacts"]["ensemble"]["path"]
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError, MlflowException):
        raise RegistryError(f"{uri} (version {version}): not a drugprot ensemble model (its MLmodel has no "
                            f"python_function artifact named 'ensemble')") from None
    folder = contained(model_dir, str(relative), f"{uri} (version {version}): MLmodel's ensemble artifact")
    if not (folder / "ensemble.json").is_file():
        raise RegistryError(f"{uri} (version {version}): the model's ensemble artifact {relative} has no ensemble.json")
    return folder


@dataclass
class RegistrationResult:
    name: str
    version: str
    alias: str
    dev_f1: float | None
    previous_version: str | None  # the version the alias pointed at before, if any
    previous_f1: float | None
    alias_moved: bool
    reason: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _version_f1(registry, version) -> float | None:
    raw = (version.tags or {}).get("dev_f1")
    if raw is not None:
        try:
            return float(raw)
        except ValueError:
            return None
    if version.run_id:
        try:
            return registry.get_run(version.run_id).data.metrics.get("ensemble_f1")  # drugprot.ensemble.publish
        except Exception:
            return None
    return None


@dataclass
class Gate:
    """What promotion compares, on the same held-out documents (dev half B, which no choice of checkpoint, trial,
    member, weight or threshold saw, as ``drugprot ensemble`` and ``drugprot distill`` pass it; a caller that passes
    none gets the whole dev set): the candidate, its own best single member and the current champion."""

    f1: float | None
    best_member_f1: float | None = None
    champion_f1: float | None = None  # None: the champion's recorded dev F1 is used
    relations: int | None = None  # relations the candidate predicts on dev; 0 is never promoted
    on: str = "dev"
    unscored: str = "built without evaluation"  # why f1 is None, in the refusal

    def as_tags(self) -> dict[str, str]:
        def fmt(value):
            return "" if value is None else f"{value:.6f}"

        return {"gate_on": self.on, "gate_f1": fmt(self.f1), "gate_best_member_f1": fmt(self.best_member_f1),
                "gate_champion_f1": fmt(self.champion_f1), "gate_relations": "" if self.relations is None else str(self.relations)}


def promote(registry, name: str, version: str, *, alias: str = "champion", dev_f1: float | None, force: bool = False,
            gate: Gate | None = None, min_gain: float = 0.0, log: Callable[[str], None] | None = None) -> RegistrationResult:
    """Point ``alias`` at ``version`` when it passes every gate, or with ``force``; print why, tag the version.

    Gates: the candidate predicts at least one relation on dev (never overridden: such a model is never promoted);
    it beats its own best single member by more than ``min_gain``; it beats the current alias by more than
    ``min_gain``. Scores come from ``gate`` (default: the recorded dev F1s). ``force`` overrides the last two and
    the version's tags say so (``promotion`` = ``forced``, ``forced_over`` = the gates it failed).
    """
    from mlflow.exceptions import MlflowException

    say = log or print
    gate = gate or Gate(dev_f1)
    try:
        current = registry.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    previous_version = str(current.version) if current is not None else None
    previous_f1 = _version_f1(registry, current) if current is not None else None
    champion_f1 = gate.champion_f1 if gate.champion_f1 is not None else previous_f1

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    failed: list[str] = []
    if gate.f1 is None:
        failed.append(f"the new version has no dev F1 ({gate.unscored})")
    else:
        if gate.best_member_f1 is not None and not gate.f1 > gate.best_member_f1 + min_gain:
            failed.append(f"F1 on {gate.on} {fmt(gate.f1)} does not beat its best single member's {fmt(gate.best_member_f1)} "
                          f"by more than --min-gain {min_gain:g}")
        if current is not None and champion_f1 is not None and not gate.f1 > champion_f1 + min_gain:
            failed.append(f"F1 on {gate.on} {fmt(gate.f1)} does not beat the champion's {fmt(champion_f1)} by more than "
                          f"--min-gain {min_gain:g}; ties keep the champion")
    tags: dict[str, str] = {**gate.as_tags(), "min_gain": f"{min_gain:g}"}
    if gate.relations == 0:
        move, reason = False, "it predicts no relation on dev; such a model is never promoted, not even with --force"
    elif current is not None and previous_version == str(version):
        move, reason = False, f"@{alias} already points at version {version}"
    elif failed and force:
        move, reason = True, "--force over: " + "; ".join(failed)
        tags.update(promotion="forced", forced_over="; ".join(failed))
    elif failed:
        move, reason = False, "; ".join(failed) + ("; use --force to promote it anyway" if gate.f1 is None else "")
    elif current is None:
        move, reason = True, f"no @{alias} yet"
    else:
        move, reason = True, (f"higher F1 on {gate.on}" if champion_f1 is not None
                              else f"@{alias} version {previous_version} has no dev F1")
    tags.setdefault("promotion", "promoted" if move else "refused")
    delta = f", {dev_f1 - previous_f1:+.4f}" if dev_f1 is not None and previous_f1 is not None else ""
    against = f"@{alias} version {previous_version} (dev F1 {fmt(previous_f1)})" if current is not None else f"no @{alias}"
    if move:
        registry.set_registered_model_alias(name, alias, str(version))
    for key, value in tags.items():
        if value:
            registry.set_model_version_tag(name, str(version), key, value)
    outcome = f"@{alias} -> version {version}" if move else f"@{alias} stays on version {previous_version}"
    say(f"registry {name}: version {version} (dev F1 {fmt(dev_f1)}) vs {against}{delta}: {outcome} ({reason})")
    return RegistrationResult(name, str(version), alias, dev_f1, previous_version, previous_f1, move, reason)
