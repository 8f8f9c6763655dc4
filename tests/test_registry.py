"""The MLflow registry side of ensembles, against a real SQLite store in a temporary folder: registration as a
pyfunc model from code, loading back by alias, the champion rule, refused tampering, clear errors for bad URIs,
``mlflow.pyfunc.load_model(...).predict(DataFrame)``, and (slow) the whole path from a smoke study:
``drugprot tune`` → ``drugprot ensemble --study`` (top-k and --reseed) → ``predict --model models:/…@champion`` →
``evaluate``; plus one registration through a real ``mlflow server``."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from drugprot.cli import main
from drugprot.config import SAMPLE_DIR
from drugprot.encoding import LABELS, PairEncoder
from drugprot.ensemble import build_ensemble
from drugprot.records import documents_to_frame, relations_to_frame
from drugprot.ensemble.publish import log_ensemble
from drugprot.inference import Predictor, load_predictor, pair_probabilities
from drugprot.model.artifacts import ArtifactError, load_artifact
from drugprot.registry import Gate, RegistryError, download_registered_model, load_pyfunc, promote
from test_ensemble import biased_ensemble, biased_members, flip_first_byte, hand_vote  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store and a registry download cache in one temporary folder.

    The working directory moves to an empty folder beside it, so nothing can silently use MLflow's default store
    (``sqlite:///mlflow.db`` in the working directory) instead of the one passed explicitly.
    """
    root = tmp_path_factory.mktemp("registry")
    (root / "elsewhere").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRUGPROT_CACHE_DIR", str(root / "cache"))
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(root / "elsewhere")
        yield SimpleNamespace(root=root, uri=f"sqlite:///{root}/mlflow.db")


@contextlib.contextmanager
def fluent(uri: str):
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


@pytest.fixture(scope="module")
def registered(store, biased_ensemble):  # noqa: F811
    """The biased 3-member ensemble registered once as ``dp`` (version 1, @champion)."""
    lines: list[str] = []
    run = log_ensemble(biased_ensemble, tracking_uri=store.uri, register="dp", log=lines.append)
    return SimpleNamespace(run=run, lines=lines, name="dp")


def _relations(predictions):
    return [(r.pmid, r.chemical, r.gene, r.type) for preds in predictions for r in preds]


# -- register, load back, vote by hand -------------------------------------------------------------------------


def test_registered_ensemble_loads_by_alias_and_matches_a_hand_vote(registered, store, biased_members, dev_documents):  # noqa: F811
    assert registered.run.registration.version == "1" and registered.run.registration.alias_moved
    predictor = load_predictor("models:/dp@champion", device="cpu", tracking_uri=store.uri)
    candidates = predictor.candidates(dev_documents)
    table = torch.zeros((3, len(candidates), len(LABELS)))
    table[:, :, 0] = 1.0
    for m, folder in enumerate(biased_members):  # each member on its own, straight from its training folder
        member = load_artifact(folder)
        pairs, _ = PairEncoder(member.tokenizer, max_length=member.info["max_length"],
                               markers=member.info["markers"]).encode(dev_documents, candidates)
        table[m, [p.index for p in pairs]] = pair_probabilities(member.model, pairs, pad_id=member.tokenizer.pad_token_id,
                                                                device=torch.device("cpu"))
    labels = hand_vote(table)
    expected = [(c.pmid, c.chemical.id, c.gene.id, LABELS[label]) for c, label in zip(candidates, labels) if label != 0]
    assert len(expected) > 10 and len({t for *_, t in expected}) >= 2
    assert _relations(predictor.predict(dev_documents)) == expected
    assert _relations(load_predictor("models:/dp/1", device="cpu", tracking_uri=store.uri).predict(dev_documents)) == expected


def test_registered_version_holds_weights_tokenizers_configs_and_manifest(registered, store):
    folder = download_registered_model("models:/dp@champion", tracking_uri=store.uri)
    model_dir = folder.parent.parent
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "mlflow.pyfunc.loaders.code_model" in mlmodel and "pyfunc_model.py" in mlmodel
    assert (model_dir / "pyfunc_model.py").is_file()
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]  # nothing pickled
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    for member in ("m1-seed1", "m2-seed2", "m3-seed3"):
        for name in ("model.safetensors", "encoder/config.json", "tokenizer/tokenizer.json", "drugprot.json", "manifest.json"):
            assert len(listed[f"members/{member}/{name}"]) == 64
    assert set(listed) == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    from drugprot import mlflow_store

    version = mlflow_store.client(mlflow_store.normalize_tracking_uri(store.uri)).get_model_version("dp", "1")
    assert float(version.tags["dev_f1"]) > 0 and version.tags["vote"] == "hard"
    assert version.tags["members"] == "m1-seed1,m2-seed2,m3-seed3"


def test_ensemble_run_is_logged_with_member_and_ensemble_metrics(registered, store):
    from drugprot import mlflow_store

    uri = mlflow_store.normalize_tracking_uri(store.uri)
    run = mlflow_store.client(uri).get_run(registered.run.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["drugprot.kind"] == "ensemble"
    metrics = run.data.metrics
    assert metrics["ensemble_f1"] > 0 and "ensemble_f1.INHIBITOR" in metrics
    with tempfile.TemporaryDirectory() as scratch:
        table = json.loads(Path(mlflow_store.client(uri).download_artifacts(registered.run.run_id, "members.json",
                                                                            scratch)).read_text())
    members = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [m["member"] for m in members] == ["m1-seed1", "m2-seed2", "m3-seed3"] and all(m["dev_f1"] >= 0 for m in members)
    assert run.data.params["vote"] == "hard" and run.data.params["members"] == "3"
    assert 0.5 <= metrics["early_exit_confidence"] < 1 and metrics["early_exit_agreement"] >= 0.999
    assert 0 < metrics["early_exit_member_pair_share"] <= 1


# -- pyfunc ------------------------------------------------------------------------------------------------------


def test_pyfunc_load_model_predicts_a_dataframe(registered, store, biased_ensemble, dev_documents):  # noqa: F811
    expected = relations_to_frame(dev_documents, Predictor.from_ensemble(biased_ensemble, device="cpu").predict(dev_documents))
    assert len(expected) > 10
    with fluent(store.uri) as mlflow:
        model = mlflow.pyfunc.load_model("models:/dp@champion")
        found = model.predict(documents_to_frame(dev_documents))
        frame = documents_to_frame(dev_documents)
        frame["entities"] = [json.dumps(e) for e in frame["entities"]]  # entities as JSON strings work too
        as_json = model.predict(frame)
        strict = model.predict(documents_to_frame(dev_documents), params={"threshold": 0.99})
        with pytest.raises(mlflow.exceptions.MlflowException, match="missing inputs \\['title'\\]"):
            model.predict(documents_to_frame(dev_documents).drop(columns=["title"]))
    assert found.to_dict("records") == expected.to_dict("records")
    assert as_json.to_dict("records") == expected.to_dict("records")
    assert list(found.columns) == ["pmid", "type", "arg1", "arg2", "score", "votes"]
    assert len(strict) == int((expected["score"] >= 0.99).sum()) < len(expected)


def test_pyfunc_model_class_without_mlflow_loading(biased_ensemble, dev_documents):  # noqa: F811
    """The model-from-code class called directly (load_context + predict), as MLflow would."""
    import importlib

    module = importlib.import_module("drugprot.ensemble.pyfunc_model")
    model = module.DrugprotEnsembleModel()
    model.load_context(SimpleNamespace(artifacts={"ensemble": str(biased_ensemble)},
                                       model_config={"device": "cpu", "vote": "soft"}))
    assert model.predictor.vote_mode == "soft"
    frame = model.predict(None, documents_to_frame(dev_documents[:4]), params={"threshold": 0.0})
    expected = Predictor.from_ensemble(biased_ensemble, device="cpu", vote="soft").predict(dev_documents[:4])
    assert frame.to_dict("records") == relations_to_frame(dev_documents[:4], expected).to_dict("records")
    from drugprot.records import InputError

    with pytest.raises(InputError, match=r"row 0: entity T1: offsets \[5, 999999\) outside the text"):
        bad = documents_to_frame(dev_documents[:1])
        bad.at[0, "entities"] = [{"id": "T1", "type": "CHEMICAL", "start": 5, "end": 999999, "text": "x"}]
        model.predict(None, bad)


# -- the champion rule ---------------------------------------------------------------------------------------------


def test_champion_alias_moves_only_through_the_gates_or_force(store, biased_ensemble, smoke_members, tmp_path):  # noqa: F811
    from drugprot import mlflow_store

    plain = build_ensemble(smoke_members, tmp_path / "plain", log=lambda _: None)  # untrained-looking: no relation
    assert plain.dev_f1 == 0.0 and plain.meta["dev"]["ensemble"]["tp"] + plain.meta["dev"]["ensemble"]["fp"] == 0
    better = json.loads((biased_ensemble / "ensemble.json").read_text())["dev"]["ensemble"]["f1"]
    client = mlflow_store.client(mlflow_store.normalize_tracking_uri(store.uri))
    lines: list[str] = []

    def register(folder, **options):
        result = log_ensemble(folder, tracking_uri=store.uri, register="dp-champ", log=lines.append, **options).registration
        try:
            champion = str(client.get_model_version_by_alias("dp-champ", "champion").version)
        except Exception:
            champion = None
        return result.version, result.alias_moved, champion

    assert register(tmp_path / "plain") == ("1", False, None)  # predicts nothing: never, not even the first
    assert register(tmp_path / "plain", force=True) == ("2", False, None)  # … not even with --force
    assert register(biased_ensemble) == ("3", True, "3")  # no champion yet
    assert register(biased_ensemble) == ("4", False, "3")  # equal: ties keep the champion
    assert register(biased_ensemble, min_gain=-0.01) == ("5", True, "5")  # the gate is "more than champion + min_gain"
    assert register(biased_ensemble, force=True) == ("6", True, "6")  # forced over the tie, and the tags say so
    assert "predicts no relation on dev; such a model is never promoted, not even with --force" in lines[1]
    assert "no @champion yet" in lines[2] and "ties keep the champion" in lines[3]
    forced = client.get_model_version("dp-champ", "6").tags
    assert forced["promotion"] == "forced" and "does not beat the champion's" in forced["forced_over"]
    assert client.get_model_version("dp-champ", "4").tags["promotion"] == "refused"
    assert client.get_model_version("dp-champ", "3").tags["gate_f1"] == f"{better:.6f}"


class FakeRegistry:
    def __init__(self, champion: str | None, champion_f1: str | None):
        self.versions = {}
        if champion:
            self.versions[champion] = SimpleNamespace(version=champion, tags={"dev_f1": champion_f1} if champion_f1 else {},
                                                      run_id="")
        self.alias = champion
        self.tags: dict[str, str] = {}

    def get_model_version_by_alias(self, name, alias):
        from mlflow.exceptions import MlflowException

        if self.alias is None:
            raise MlflowException("no alias")
        return self.versions[self.alias]

    def set_registered_model_alias(self, name, alias, version):
        self.alias = version

    def set_model_version_tag(self, name, version, key, value):
        self.tags[key] = value


@pytest.mark.parametrize("champion, champion_f1, new_f1, force, moved, reason", [
    (None, None, 0.3, False, True, "no @champion yet"),
    ("1", "0.5", 0.6, False, True, "higher F1 on dev"),
    ("1", "0.5", 0.5, False, False, "ties keep the champion"),
    ("1", "0.5", 0.4, False, False, "does not beat"),
    ("1", "0.5", 0.4, True, True, "--force"),
    ("1", "0.5", None, False, False, "no dev F1"),
    ("1", None, 0.1, False, True, "has no dev F1"),
    ("2", "0.5", 0.9, False, False, "already points at version 2"),
])
def test_promote_rule(champion, champion_f1, new_f1, force, moved, reason):
    registry = FakeRegistry(champion, champion_f1)
    lines: list[str] = []
    result = promote(registry, "m", "2", dev_f1=new_f1, force=force, log=lines.append)
    assert result.alias_moved is moved and reason in result.reason
    assert registry.alias == ("2" if moved else champion)
    assert lines[0].startswith("registry m: version 2")


@pytest.mark.parametrize("gate, min_gain, force, moved, reason, tag", [
    (Gate(0.60, best_member_f1=0.62, relations=9, on="dev half B"), 0.0, False, False,
     "F1 on dev half B 0.6000 does not beat its best single member's 0.6200 by more than --min-gain 0", "refused"),
    (Gate(0.60, best_member_f1=0.62, relations=9), 0.0, True, True, "--force over: F1 on dev 0.6000 does not beat its best", "forced"),
    (Gate(0.60, best_member_f1=0.55, champion_f1=0.58, relations=9), 0.0, False, True, "higher F1 on dev", "promoted"),
    (Gate(0.60, best_member_f1=0.55, champion_f1=0.58, relations=9), 0.03, False, False,
     "does not beat the champion's 0.5800 by more than --min-gain 0.03", "refused"),
    (Gate(0.60, best_member_f1=0.59, champion_f1=0.50, relations=9), 0.02, False, False, "its best single member's 0.5900", "refused"),
    (Gate(0.0, relations=0), 0.0, True, False, "never promoted, not even with --force", "refused"),
])
def test_promotion_gates(gate, min_gain, force, moved, reason, tag):
    registry = FakeRegistry("1", "0.9")  # the champion's recorded dev F1; a gate's champion_f1 (same documents) wins
    result = promote(registry, "m", "2", dev_f1=gate.f1, force=force, gate=gate, min_gain=min_gain, log=lambda _: None)
    assert result.alias_moved is moved and reason in result.reason
    assert registry.tags["promotion"] == tag and registry.tags["min_gain"] == f"{min_gain:g}"
    assert ("forced_over" in registry.tags) is (tag == "forced")


# -- refused and unknown ---------------------------------------------------------------------------------------------


def test_tampered_registered_artifact_is_refused_naming_the_file(store, biased_ensemble, capsys):  # noqa: F811
    log_ensemble(biased_ensemble, tracking_uri=store.uri, register="dp-tamper", log=lambda _: None)
    folder = download_registered_model("models:/dp-tamper/1", tracking_uri=store.uri)
    # a modified cached copy is noticed and downloaded again
    flip_first_byte(folder / "members/m1-seed1/model.safetensors")
    assert load_predictor("models:/dp-tamper@champion", device="cpu", tracking_uri=store.uri).members
    assert "failed verification" in capsys.readouterr().err
    # a modified file in the registry's artifact store is refused by name
    from drugprot import mlflow_store

    from urllib.parse import urlparse

    location = mlflow_store.client(mlflow_store.normalize_tracking_uri(store.uri)).get_model_version_download_uri("dp-tamper", "1")
    stored = Path(urlparse(location).path)
    [target] = stored.rglob("members/m2-seed2/model.safetensors")
    flip_first_byte(target)
    shutil.rmtree(folder.parent.parent)  # the cached copy
    with pytest.raises(ArtifactError, match=r"members/m2-seed2/model\.safetensors: sha256 mismatch"):
        load_predictor("models:/dp-tamper@champion", device="cpu", tracking_uri=store.uri)


@pytest.mark.parametrize("uri, message", [
    ("models:/nope@champion", r"no registered model 'nope' in .* \(registered: .*dp"),
    ("models:/dp@nope", r"model 'dp' has no alias 'nope' \(aliases: @champion -> version 1\)"),
    ("models:/dp/99", r"model 'dp' has no version 99 \(versions: 1\)"),
    ("models:/dp", r"expected models:/NAME@ALIAS"),
])
def test_unknown_registry_uris_are_clear_errors(registered, store, uri, message):
    with pytest.raises(RegistryError, match=message):
        load_predictor(uri, device="cpu", tracking_uri=store.uri)


def test_nothing_used_the_default_store(registered, store):
    assert not list((store.root / "elsewhere").iterdir())


def test_missing_store_is_not_created(tmp_path, capsys):
    missing = tmp_path / "nowhere.db"
    code = main(["predict", "--model", "models:/dp@champion", "--tracking-uri", f"sqlite:///{missing}",
                 "--data", str(SAMPLE_DIR), "--out", str(tmp_path / "p.tsv")])
    assert code == 1
    assert f"no MLflow database at {missing}" in capsys.readouterr().err
    assert not missing.exists()


# -- CLI: ensemble from folders → register → predict → evaluate -------------------------------------------------------


def test_cli_register_predict_evaluate(store, biased_members, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ens"
    assert main(["ensemble", "--members", *map(str, biased_members), "--register", "dp-cli", "--tracking-uri", store.uri,
                 "--out", str(out), "--device", "cpu", "--force"]) == 0
    printed = capsys.readouterr().out
    # the disagreeing test members' vote does not beat its best member on dev: only --force promotes it
    assert "registry dp-cli: version 1" in printed
    assert "@champion -> version 1 (--force over: F1 on dev" in printed and "its best single member's" in printed
    pred = tmp_path / "pred.tsv"
    assert main(["predict", "--model", "models:/dp-cli@champion", "--tracking-uri", store.uri, "--data", str(SAMPLE_DIR),
                 "--out", str(pred), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--gold", str(SAMPLE_DIR), "--pred", str(pred), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["f1"] == pytest.approx(json.loads((out / "ensemble.json").read_text())["dev"]["ensemble"]["f1"], abs=1e-6)


# -- only the registered model, signed when asked ------------------------------------------------------------------


def _stored_ensemble(store, name: str) -> Path:
    """The ensemble folder of ``name`` version 1 inside the registry's artifact store (not the download cache)."""
    from urllib.parse import urlparse

    from drugprot import mlflow_store

    location = mlflow_store.client(mlflow_store.normalize_tracking_uri(store.uri)).get_model_version_download_uri(name, "1")
    [ensemble_json] = Path(urlparse(location).path).rglob("ensemble.json")
    return ensemble_json.parent


def _replace_weights_and_manifest(folder: Path) -> None:
    """What a writer of the artifact store can do: change a weight file and write a manifest that matches it."""
    from drugprot.ensemble_folder import write_tree_manifest

    flip_first_byte(folder / "members/m2-seed2/model.safetensors")
    write_tree_manifest(folder)


def test_registration_records_the_manifest_digest(registered, store, biased_ensemble):  # noqa: F811
    from drugprot import mlflow_store
    from drugprot.manifest import sha256_file

    version = mlflow_store.client(mlflow_store.normalize_tracking_uri(store.uri)).get_model_version("dp", "1")
    assert version.tags["manifest_sha256"] == sha256_file(biased_ensemble / "manifest.json")


def test_files_replaced_with_their_manifest_are_refused_naming_both_digests(store, biased_ensemble, tmp_path, capsys):  # noqa: F811
    from drugprot.manifest import sha256_file
    from drugprot.serving.options import ServeOptions
    from drugprot.serving.service import ModelService

    log_ensemble(biased_ensemble, tracking_uri=store.uri, register="dp-swap", log=lambda _: None)
    stored = _stored_ensemble(store, "dp-swap")
    registered_digest = sha256_file(stored / "manifest.json")
    _replace_weights_and_manifest(stored)
    replaced = sha256_file(stored / "manifest.json")
    message = (rf"models:/dp-swap(@champion|/1) \(version 1\): the downloaded manifest's sha256 is {replaced}, but the registry "
               rf"recorded {registered_digest} at registration")
    with pytest.raises(RegistryError, match=message):  # predict, bulk and the Ray Data path
        load_predictor("models:/dp-swap@champion", device="cpu", tracking_uri=store.uri)
    assert not (store.root / "cache").exists() or not list((store.root / "cache").rglob("dp-swap/1"))  # nothing cached
    with pytest.raises(RegistryError, match=message):  # each serving replica
        ModelService.load(ServeOptions(model="models:/dp-swap@champion", tracking_uri=store.uri))
    with pytest.raises(RegistryError, match=message):  # the pyfunc
        load_pyfunc("models:/dp-swap@champion", tracking_uri=store.uri)
    assert main(["predict", "--model", "models:/dp-swap@champion", "--tracking-uri", store.uri, "--data", str(SAMPLE_DIR),
                 "--out", str(tmp_path / "p.tsv")]) == 1
    assert f"registry recorded {registered_digest}" in capsys.readouterr().err
    assert not (tmp_path / "p.tsv").exists()


def test_load_pyfunc_checks_then_predicts_like_the_model(registered, store, biased_ensemble, dev_documents, tmp_path):  # noqa: F811
    expected = relations_to_frame(dev_documents, Predictor.from_ensemble(biased_ensemble, device="cpu").predict(dev_documents))
    model = load_pyfunc("models:/dp@champion", tracking_uri=store.uri)
    assert model.predict(documents_to_frame(dev_documents)).to_dict("records") == expected.to_dict("records")
    _, verify = _key_pair(tmp_path, "publisher")
    with pytest.raises(ArtifactError, match=r"unsigned \(no manifest\.sig\) but --verify-key .*publisher\.pub\.pem was given"):
        load_pyfunc("models:/dp@champion", tracking_uri=store.uri, verify_key=verify)


def test_a_path_in_the_model_metadata_that_leaves_the_download_is_refused(store, biased_ensemble):  # noqa: F811
    import yaml

    log_ensemble(biased_ensemble, tracking_uri=store.uri, register="dp-escape", log=lambda _: None)
    mlmodel = _stored_ensemble(store, "dp-escape").parents[1] / "MLmodel"
    meta = yaml.safe_load(mlmodel.read_text())
    meta["flavors"]["python_function"]["artifacts"]["ensemble"]["path"] = "../../../../elsewhere"
    mlmodel.write_text(yaml.safe_dump(meta))
    with pytest.raises(ArtifactError, match=r"MLmodel's ensemble artifact: path '\.\./\.\./\.\./\.\./elsewhere' leads "
                                            r"outside .*; refusing to load it"):
        download_registered_model("models:/dp-escape/1", tracking_uri=store.uri)


def test_paths_in_ensemble_and_manifest_json_stay_inside_the_folder(biased_ensemble, tmp_path):  # noqa: F811
    from drugprot.ensemble_folder import read_ensemble_folder, write_tree_manifest
    from drugprot.manifest import verify_manifest

    copy = Path(shutil.copytree(biased_ensemble, tmp_path / "ens"))
    shutil.copytree(copy / "members/m1-seed1", tmp_path / "outside")
    meta = json.loads((copy / "ensemble.json").read_text())
    meta["members"][0]["path"] = "../outside"
    (copy / "ensemble.json").write_text(json.dumps(meta))
    write_tree_manifest(copy)
    with pytest.raises(ArtifactError, match=r"ensemble\.json: member 'm1-seed1': path '\.\./outside' leads outside"):
        read_ensemble_folder(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../outside/drugprot.json"] = manifest["files"].pop("ensemble.json")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest\.json: ensemble manifest entry: path '\.\./outside/drugprot\.json' "
                                            r"leads outside"):
        verify_manifest(copy, label="ensemble manifest")


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_signed_ensemble_is_served_only_with_the_right_key(store, biased_members, biased_ensemble, tmp_path, capsys):  # noqa: F811
    sign, verify = _key_pair(tmp_path, "publisher")
    _, other = _key_pair(tmp_path, "someone-else")
    out = tmp_path / "signed"
    # a public key is no signing key: refused before anything is built
    assert main(["ensemble", "--members", *map(str, biased_members), "--out", str(out), "--sign-key", str(verify),
                 "--no-log", "--device", "cpu", "--quiet"]) == 1
    assert "publisher.pub.pem: not an unencrypted PEM private key" in capsys.readouterr().err and not out.exists()
    assert main(["ensemble", "--members", *map(str, biased_members), "--register", "dp-signed", "--tracking-uri", store.uri,
                 "--out", str(out), "--sign-key", str(sign), "--device", "cpu", "--force", "--quiet"]) == 0
    assert "manifest signed with" in capsys.readouterr().out and (out / "manifest.sig").is_file()

    def predict(model: str, key: Path) -> int:
        return main(["predict", "--model", model, "--tracking-uri", store.uri, "--verify-key", str(key),
                     "--data", str(SAMPLE_DIR), "--out", str(tmp_path / "p.tsv"), "--device", "cpu", "--quiet"])

    assert predict("models:/dp-signed@champion", verify) == 0 and predict(str(out), verify) == 0
    capsys.readouterr()
    assert predict("models:/dp-signed@champion", other) == 1
    assert "not a valid signature of manifest.json by --verify-key" in capsys.readouterr().err
    assert predict(str(biased_ensemble), verify) == 1  # unsigned
    assert "unsigned (no manifest.sig)" in capsys.readouterr().err
    assert main(["serve", "--model", str(biased_ensemble), "--verify-key", str(verify)]) == 1  # refused before Ray starts
    assert "unsigned (no manifest.sig)" in capsys.readouterr().err
    # a registered, signed model whose files and manifest were replaced fails the digest, then the signature
    stored = _stored_ensemble(store, "dp-signed")
    _replace_weights_and_manifest(stored)
    shutil.rmtree(store.root / "cache", ignore_errors=True)
    assert predict("models:/dp-signed@champion", verify) == 1
    assert "the registry recorded" in capsys.readouterr().err
    from drugprot.manifest import verify_signature

    with pytest.raises(ArtifactError, match=r"manifest\.sig: not a valid signature of manifest\.json by --verify-key"):
        verify_signature(stored, verify)


# -- a real MLflow server --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_register_and_load_through_an_mlflow_server(biased_ensemble, dev_documents, tmp_path, monkeypatch):  # noqa: F811
    from fixtures_mlflow import _free_port, mlflow_server_process

    monkeypatch.setenv("DRUGPROT_CACHE_DIR", str(tmp_path / "cache"))
    with mlflow_server_process(tmp_path / "server", port=_free_port("5110-5119")) as (uri, _process):
        run = log_ensemble(biased_ensemble, tracking_uri=uri, register="dp-server", log=lambda _: None)
        assert run.registration.alias_moved
        predictor = load_predictor("models:/dp-server@champion", device="cpu", tracking_uri=uri)
        expected = Predictor.from_ensemble(biased_ensemble, device="cpu").predict(dev_documents)
        assert _relations(predictor.predict(dev_documents)) == _relations(expected)
        # the server's artifact store is writable by others: files replaced with their manifest are refused
        [stored] = [p.parent for p in (tmp_path / "server" / "artifacts").rglob("ensemble.json")
                    if (p.parent / "manifest.json").is_file()]  # the model's copy, not the run's ensemble/ensemble.json
        _replace_weights_and_manifest(stored)
        shutil.rmtree(tmp_path / "cache")
        with pytest.raises(RegistryError, match=r"the downloaded manifest's sha256 is [0-9a-f]{64}, but the registry "
                                                r"recorded [0-9a-f]{64} at registration"):
            load_predictor("models:/dp-server@champion", device="cpu", tracking_uri=uri)
    assert list((tmp_path / "server" / "artifacts").rglob("members/m1-seed1/model.safetensors"))


# -- end to end from a study -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """A 3-trial smoke study (tiny random BERT, 1 epoch) run by ``drugprot tune`` on a private local Ray."""
    root = tmp_path_factory.mktemp("study")
    ray_tmp = tempfile.mkdtemp(prefix="dpray", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", ray_tmp)
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.setenv("DRUGPROT_CACHE_DIR", str(root / "cache"))
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.chdir(root)
        uri = f"sqlite:///{root}/mlflow.db"
        code = main(["tune", "--config", str(REPO / "configs/smoke.yaml"), "--space", str(REPO / "search_spaces/smoke.yaml"),
                     # 32-pair steps, as these trials had before batch_pairs: in 16-pair steps one epoch leaves the
                     # tiny model predicting no relation, and the gates need relations to compare
                     "--set", "train.epochs=1", "--set", "train.batch_pairs=32", "--name", "smk", "--num-samples", "3", "--storage", str(root / "tune"),
                     "--tracking-uri", uri])
        assert code == 0
        yield SimpleNamespace(root=root, uri=uri, name="smk")
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_study_to_champion_to_predictions(smoke_study, tmp_path, capsys):
    from drugprot import mlflow_store, tracking

    uri = smoke_study.uri
    out = tmp_path / "ens"
    assert main(["ensemble", "--study", "smk", "--top-k", "3", "--register", "smk-ens", "--tracking-uri", uri,
                 "--out", str(out), "--device", "cpu", "--force", "--quiet"]) == 0
    printed = capsys.readouterr().out
    # whether the gates alone or --force moved the alias depends on what these tiny trials learned; the gates
    # themselves are pinned in test_champion_alias_moves_only_through_the_gates_or_force
    assert "micro F1" in printed and re.search(r"@champion -> version 1 \((no @champion yet|--force over: F1 on dev "
                                               r"half B)", printed), printed
    assert "Chosen on A, scored on B" in printed and "top-3 by F1" in printed
    meta = json.loads((out / "ensemble.json").read_text())
    trials = tracking.study_trials("smk", uri)
    assert len(trials) == 3  # the ensemble run is not counted as a trial
    assert [m["source"]["trial_id"] for m in meta["members"]] == [t.trial_id for t in trials]
    assert [m["dev_f1_a"] for m in meta["members"]] == [t.best_dev_f1_a for t in trials]
    assert meta["selection_seed"] == 0
    ensemble_runs = mlflow_store.client(mlflow_store.normalize_tracking_uri(uri)).search_runs(
        [tracking.study_experiment("smk", uri)], "tags.`drugprot.kind` = 'ensemble'")
    assert len(ensemble_runs) == 1 and ensemble_runs[0].data.tags.get("mlflow.parentRunId")
    assert ensemble_runs[0].data.metrics["ensemble_f1_b"] == pytest.approx(meta["dev"]["held_out_b"]["ensemble"]["f1"])
    pred = tmp_path / "pred.tsv"
    assert main(["predict", "--model", "models:/smk-ens@champion", "--tracking-uri", uri, "--data", str(SAMPLE_DIR),
                 "--out", str(pred), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--gold", str(SAMPLE_DIR), "--pred", str(pred), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == pytest.approx(meta["dev"]["ensemble"]["f1"], abs=1e-6)


@pytest.mark.slow
def test_study_errors_exit_1(smoke_study, tmp_path, capsys):
    common = ["--tracking-uri", smoke_study.uri, "--no-log"]
    assert main(["ensemble", "--study", "nope", "--out", str(tmp_path / "a"), *common]) == 1
    assert "no study named 'nope'" in capsys.readouterr().err
    assert main(["ensemble", "--study", "smk", "--top-k", "5", "--out", str(tmp_path / "b"), *common]) == 1
    assert "--top-k 5: study 'smk' has only 3 finished trial(s)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.work").exists()


@pytest.mark.slow
def test_study_reseed(smoke_study, tmp_path, capsys):
    from drugprot import tracking

    out = tmp_path / "reseeded"
    assert main(["ensemble", "--study", "smk", "--reseed", "2", "--tracking-uri", smoke_study.uri, "--out", str(out),
                 "--device", "cpu", "--no-log"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "ensemble.json").read_text())
    best = tracking.study_trials("smk", smoke_study.uri)[0]
    assert meta["source"]["selection"] == "reseed" and meta["source"]["reseed_of"] == best.trial_id
    assert [m["seed"] for m in meta["members"]] == [14, 15]  # the study searched seed 13 only
    for member in meta["members"]:
        config = json.loads((out / member["path"] / "drugprot.json").read_text())["config"]
        assert config["train"]["seed"] == member["seed"]
        assert {k: v for k, v in config["train"].items() if k not in ("seed", "threads")} == \
            {k: v for k, v in best.config["train"].items() if k not in ("seed", "threads")}
        assert config["loss"] == best.config["loss"] and config["sampling"] == best.config["sampling"]


@pytest.mark.slow
def test_study_reseed_final_trains_on_train_and_dev_for_the_best_trials_steps(smoke_study, tmp_path, capsys):
    from drugprot import mlflow_store, tracking
    from drugprot.corpus import read_split

    out = tmp_path / "final"
    assert main(["ensemble", "--study", "smk", "--reseed", "1", "--final", "--register", "smk-final", "--quiet",
                 "--tracking-uri", smoke_study.uri, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    best = tracking.study_trials("smk", smoke_study.uri)[0]
    steps = tracking.trial_metrics(best, smoke_study.uri)["best"]["step"]
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["dev"] is None and meta["source"]["final"] is True and meta["source"]["steps"] == steps
    (member,) = meta["members"]
    assert member["name"] == "final-seed14" and member["source"]["reseed_of"] == best.trial_id
    info = json.loads((out / member["path"] / "drugprot.json").read_text())
    assert info["final"]["steps"] == steps and info["config"]["train"]["max_steps"] == steps
    assert info["final"]["trained_on"] == {split: len(read_split(SAMPLE_DIR, split).documents)
                                           for split in ("training", "development")}
    client = mlflow_store.client(mlflow_store.normalize_tracking_uri(smoke_study.uri))
    member_run = client.get_run(member["source"]["run_id"]).data
    assert member_run.tags["drugprot.kind"] == "final" and member_run.tags["drugprot.final_of_trial"] == best.trial_id
    assert member_run.params["train.max_steps"] == str(steps)
    assert len(tracking.study_trials("smk", smoke_study.uri)) == 3  # the final member's run is not a trial
    assert "micro F1" not in printed and "no dev score: members final-seed14 trained on the development" in printed
    assert "no development score exists to pass the gate" in printed
    version = client.get_model_version("smk-final", "1")
    assert version.tags["drugprot.dev_score"] == "none (trained on train+dev)" and version.tags["promotion"] == "refused"
    assert not client.get_registered_model("smk-final").aliases


@pytest.mark.slow
def test_study_greedy_json_prints_the_half_b_table_and_builds_the_recipe_chosen_on_a(smoke_study, tmp_path, capsys):
    out = tmp_path / "greedy"
    assert main(["ensemble", "--study", "smk", "--select", "greedy", "--json", "--quiet", "--tracking-uri", smoke_study.uri,
                 "--out", str(out), "--device", "cpu", "--no-log", "--max-size", "4"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is the JSON object alone; the tables went to stderr
    selection = summary["selection"]
    assert [c["label"] for c in selection["candidates"]] == [
        "best single trial", "top-3 by F1", "greedy", "greedy + margin", "greedy + margin + type thresholds",
        "greedy + margin + type thresholds + multi-label"]
    for candidate in selection["candidates"]:
        assert set(candidate["b"]) == {"precision", "recall", "f1", "tp", "fp", "fn"} and 0 <= candidate["f1_a"] <= 1
        assert 1 <= candidate["votes"] <= 4 and candidate["members"]
    halves = selection["halves"]
    assert halves["A"]["documents"] + halves["B"]["documents"] == 10 and selection["held_out"] == "B"
    assert "Chosen on A, scored on B" in captured.err and "B columns are held out" in captured.err
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["selection"] == selection and meta["source"]["selection"] == "greedy"
    chosen = selection["chosen"]
    assert [(m["name"], m["weight"]) for m in meta["members"]] == [(m["trial"], m["weight"]) for m in chosen["members"]]
    # the stored probabilities and the one inference path agree on the chosen recipe's half-B F1
    assert summary["dev"]["held_out_b"]["ensemble"]["f1"] == pytest.approx(chosen["b"]["f1"], abs=0.02)
    assert meta["dev"]["halves"] == {"seed": 0, **halves}
    predictor = Predictor.from_ensemble(out, device="cpu")
    assert predictor.decision.as_dict() == chosen["decision"] and predictor.vote_mode == chosen["vote"]


@pytest.mark.slow
def test_study_gates_refuse_what_does_not_beat_its_members_on_b(smoke_study, tmp_path, capsys):
    common = ["--study", "smk", "--tracking-uri", smoke_study.uri, "--device", "cpu", "--quiet", "--json", "--register", "smk-gate"]
    assert main(["ensemble", *common, "--top-k", "3", "--out", str(tmp_path / "a"), "--min-gain", "1"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["registration"]["alias_moved"] is False
    assert "does not beat its best single member's" in first["registration"]["reason"]
    assert "by more than --min-gain 1" in first["registration"]["reason"]
    assert main(["ensemble", *common, "--top-k", "3", "--out", str(tmp_path / "b"), "--min-gain", "1", "--force"]) == 0
    forced = json.loads(capsys.readouterr().out)["registration"]
    assert forced["alias_moved"] is True and forced["reason"].startswith("--force over:")
    from drugprot import mlflow_store

    tags = mlflow_store.client(mlflow_store.normalize_tracking_uri(smoke_study.uri)).get_model_version("smk-gate", forced["version"]).tags
    assert tags["promotion"] == "forced" and tags["gate_on"] == "dev half B" and tags["min_gain"] == "1"
