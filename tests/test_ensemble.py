"""Ensembles: stacked vs looped execution, the folder format and its manifest, member selection, the CLI,
and Ray Data batch prediction (``drugprot predict --ray``), on tiny trained models."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from drugprot.cli import main
from drugprot.config import SAMPLE_DIR
from drugprot.encoding import LABEL_INDEX, LABELS, PairEncoder
from drugprot.ensemble import EnsembleError, build_ensemble
from drugprot.ensemble.build import MemberSource
from drugprot.ensemble_folder import MANIFEST
from drugprot.ensemble.members import new_seeds, select_top_k
from drugprot.model.stacked import stack_incompatibility
from drugprot.inference import Predictor, load_predictor, pair_probabilities
from drugprot.model.artifacts import ArtifactError, LoadedModel, load_artifact, save_artifact

BOOSTED = ("INHIBITOR", "ACTIVATOR", "ACTIVATOR")


@pytest.fixture(scope="session")
def biased_members(smoke_members, dev_documents, tmp_path_factory) -> list[Path]:
    """The smoke members with their head biases moved so that they predict relations and disagree with each other.

    Tiny models trained for one epoch predict NONE everywhere (dev F1 0). Each member's NONE logit is lowered by its
    median margin over the best other label (about half the dev pairs become relations), and its boosted label is
    raised to par with INHIBITOR; the hard vote then mixes NONE, INHIBITOR and ACTIVATOR with three-way ties, which
    is what the voting and registry tests need. Saved through ``save_artifact`` (valid manifests).
    """
    out = tmp_path_factory.mktemp("biased")
    inhibitor = LABEL_INDEX["INHIBITOR"]
    folders = []
    for i, (src, label) in enumerate(zip(smoke_members, BOOSTED)):
        loaded = load_artifact(src)
        encoder = PairEncoder(loaded.tokenizer, max_length=loaded.info["max_length"], markers=loaded.info["markers"])
        cands = Predictor([loaded], device="cpu").candidates(dev_documents)
        pairs, _ = encoder.encode(dev_documents, cands)
        logp = pair_probabilities(loaded.model, pairs, pad_id=loaded.tokenizer.pad_token_id, device=torch.device("cpu")).log()
        # offsets keep the pair at each median off an exact tie (which fp32 rounding could break either way)
        margin = float((logp[:, 0] - logp[:, 1:].max(-1).values).median()) + 0.011
        with torch.no_grad():
            loaded.model.classifier.bias[0] -= margin
            if label != "INHIBITOR":
                gap = float((logp[:, inhibitor] - logp[:, LABEL_INDEX[label]]).median())
                loaded.model.classifier.bias[LABEL_INDEX[label]] += gap + 0.013
        info = {k: v for k, v in loaded.info.items() if k != "format_version"}
        folders.append(save_artifact(out / f"member{i + 1}", model=loaded.model, tokenizer=loaded.tokenizer, info=info))
    return folders


@pytest.fixture(scope="session")
def biased_ensemble(biased_members, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ensembles") / "biased"
    build_ensemble(biased_members, out, vote="hard", log=lambda _: None)
    return out


def flip_first_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))


def _loaded(paths) -> list[LoadedModel]:
    return [load_artifact(p) for p in paths]


def _relations(predictions) -> list[tuple]:
    return [(p.pmid, p.chemical, p.gene, p.type, p.score, p.votes) for preds in predictions for p in preds]


# -- stacked execution ----------------------------------------------------------------------------------------


def test_stacked_probabilities_match_the_loop(biased_members, dev_documents):
    looped = Predictor(_loaded(biased_members), device="cpu", execution="loop")
    stacked = Predictor(_loaded(biased_members), device="cpu", execution="fold")
    assert (looped.execution, stacked.execution) == ("loop", "fold")
    cands = looped.candidates(dev_documents)
    expected = looped.member_probabilities(dev_documents, cands)
    found = stacked.member_probabilities(dev_documents, cands)
    assert expected.shape == (3, len(cands), len(LABELS)) and len(cands) > 50
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)  # fp32 rounding only
    assert _relations(stacked.predict(dev_documents)) == _relations(looped.predict(dev_documents))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_members_in_turn_skip_settled_pairs_and_predict_the_same(biased_members, dev_documents, mode):
    from drugprot.inference.voting import Decision
    from drugprot.inference import decode

    for decision in (Decision(), Decision(margin=-0.05, thresholds={"INHIBITOR": 0.2}, second_type=0.1)):
        predictor = Predictor(_loaded(biased_members), device="cpu", execution="loop", vote=mode, decision=decision)
        cands = predictor.candidates(dev_documents)
        full = predictor.member_probabilities(dev_documents, cands)
        assert predictor.scored_pairs == 3 * len(cands)
        predictor.scored_pairs = 0
        skipped = predictor.member_probabilities(dev_documents, cands, skip_settled=True)
        # later members ran on fewer pairs (hard: two NONE votes of three settle a pair; these flat tiny models are
        # never sure enough for a soft vote to settle), and only the skipped entries differ (P(NONE) = 1 there)
        differs = (skipped != full).any(-1)
        assert predictor.scored_pairs == 3 * len(cands) - int(differs.sum()) and not differs[0].any()
        assert differs.any() == (mode == "hard")
        assert (skipped[differs] == torch.nn.functional.one_hot(torch.tensor(0), len(LABELS)).float()).all()
        relations = decode(cands, full, mode, weights=None, decision=decision)
        assert relations and decode(cands, skipped, mode, decision=decision) == relations
        assert _relations(predictor.predict(dev_documents)) == [
            (r.pmid, r.chemical, r.gene, r.type, r.score, r.votes) for r in relations]


def test_same_architecture_members_run_in_turn_on_cpu_and_stack_when_asked(biased_members):
    assert Predictor(_loaded(biased_members), device="cpu").execution == "loop"  # auto on CPU: settling pays more
    predictor = Predictor(_loaded(biased_members), device="cpu", execution="fold")
    assert predictor.execution == "fold"
    # the members' own parameters now live inside the stacked tensors (no second copy of the weights)
    first = predictor.members[0].model.classifier.weight
    assert first.untyped_storage().data_ptr() == predictor.scorer.stages[0].scorer.stacked.p["classifier.weight"].untyped_storage().data_ptr()


def _other_architecture(like: LoadedModel) -> LoadedModel:
    from drugprot.model.encoder import build_encoder
    from drugprot.model.heads import RelationModel

    encoder = build_encoder("tiny-random", tiny={"hidden_size": 16, "intermediate_size": 32}, seed=5)
    encoder.resize_token_embeddings(len(like.tokenizer))
    return LoadedModel(like.path, RelationModel(encoder), like.tokenizer, dict(like.info))


def test_mixed_members_fall_back_to_the_loop(biased_members, dev_documents):
    members = _loaded(biased_members[:2])
    mixed = [*members, _other_architecture(members[0])]
    assert stack_incompatibility(mixed) == "encoder architectures differ"
    predictor = Predictor(mixed, device="cpu")
    assert predictor.execution == "loop"
    assert len(predictor.predict(dev_documents)) == len(dev_documents)
    with pytest.raises(ValueError, match="cannot run stacked .encoder architectures differ"):
        Predictor(mixed, device="cpu", execution="fold")


@pytest.mark.parametrize("change, reason", [
    (lambda m: dataclasses.replace(m, info={**m.info, "max_length": 64}), "max_length differs"),
    (lambda m: dataclasses.replace(m, info={**m.info, "markers": "fine"}), "markers differs"),
    (lambda m: dataclasses.replace(m, gene_typer=torch.nn.Linear(1, 1)), "FGEMR"),
])
def test_stack_incompatibility_reasons(biased_members, change, reason):
    members = _loaded(biased_members[:2])
    assert stack_incompatibility(members) is None
    assert reason in stack_incompatibility([members[0], change(members[1])])
    assert stack_incompatibility(members[:1]) == "a single member"


# -- folder format ---------------------------------------------------------------------------------------------


def test_ensemble_folder_format(biased_ensemble, biased_members):
    meta = json.loads((biased_ensemble / "ensemble.json").read_text())
    assert meta["kind"] == "drugprot-ensemble" and meta["vote"] == "hard" and meta["interval"] == [-10, 16]
    assert meta["encoder"] == "tiny-random" and meta["execution"] == "loop"  # evaluated on CPU
    assert [m["name"] for m in meta["members"]] == ["m1-seed1", "m2-seed2", "m3-seed3"]
    assert all(m["dev_f1_a"] == 0.0 and m["path"] == f"members/{m['name']}" for m in meta["members"])
    dev = meta["dev"]
    assert set(dev["members"]) == {"m1-seed1", "m2-seed2", "m3-seed3"} and dev["ensemble"]["f1"] > 0
    assert dev["split"] == "development" and dev["documents"] == 10
    assert meta["selection_seed"] == 0 and dev["halves"]["A"]["documents"] + dev["halves"]["B"]["documents"] == 10
    assert set(dev["held_out_b"]["members"]) == set(dev["members"]) and 0.0 <= dev["held_out_b"]["ensemble"]["f1"] <= 1.0
    listed = json.loads((biased_ensemble / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(biased_ensemble).as_posix() for p in biased_ensemble.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(listed) == on_disk
    assert "members/m1-seed1/model.safetensors" in listed and "members/m1-seed1/manifest.json" in listed
    assert "members/m2-seed2/tokenizer/tokenizer.json" in listed and "members/m3-seed3/encoder/config.json" in listed
    assert not [p for p in biased_ensemble.rglob("*") if p.suffix in (".pkl", ".pt", ".bin")]


def test_loaded_ensemble_predicts_like_its_members(biased_ensemble, biased_members, dev_documents):
    loaded = Predictor.from_ensemble(biased_ensemble, device="cpu")
    direct = Predictor(_loaded(biased_members), device="cpu", vote="hard")
    assert loaded.vote_mode == "hard" and loaded.execution == "loop"
    assert _relations(loaded.predict(dev_documents)) == _relations(direct.predict(dev_documents))
    via_path = Predictor.from_path(biased_ensemble, device="cpu", vote="soft", execution="loop")
    assert via_path.vote_mode == "soft" and via_path.execution == "loop"


def test_evaluation_table_puts_members_and_ensemble_side_by_side(biased_members, dev_documents, tmp_path):
    from drugprot.scoring import score

    built = build_ensemble(biased_members, tmp_path / "e", vote="soft", documents=dev_documents, log=lambda _: None)
    table = built.evaluation.table()
    header = table.splitlines()[1].split()
    assert header == ["type", "m1-seed1", "m2-seed2", "m3-seed3", "ensemble"]
    assert "INHIBITOR" in table and "micro F1" in table and "soft vote" in table
    predictions = Predictor.from_ensemble(tmp_path / "e", device="cpu").predict(dev_documents)
    expected = score(dev_documents, [(r.pmid, r.type, r.chemical, r.gene) for preds in predictions for r in preds])
    assert built.evaluation.ensemble.f1 == pytest.approx(expected.f1)
    assert built.meta["dev"]["ensemble"]["f1"] == pytest.approx(expected.f1, abs=1e-6)


@pytest.fixture
def ensemble_copy(biased_ensemble, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(biased_ensemble, copy)
    return copy


@pytest.mark.parametrize("tamper, message", [
    (lambda d: flip_first_byte(d / "members/m2-seed2/model.safetensors"),
     r"members/m2-seed2/model\.safetensors: sha256 mismatch"),
    (lambda d: (d / "ensemble.json").write_text((d / "ensemble.json").read_text().replace('"hard"', '"soft"')),
     r"ensemble\.json: sha256 mismatch"),
    (lambda d: (d / "members/m1-seed1/extra.py").write_text("import os"), r"members/m1-seed1/extra\.py: file not listed"),
    (lambda d: (d / "members/m3-seed3/tokenizer/tokenizer.json").unlink(),
     r"members/m3-seed3/tokenizer/tokenizer\.json: listed in the ensemble manifest but missing"),
    (lambda d: (d / MANIFEST).unlink(), r"no manifest\.json"),
])
def test_tampered_ensemble_is_refused_naming_the_file(ensemble_copy, tamper, message):
    tamper(ensemble_copy)
    with pytest.raises(ArtifactError, match=message):
        Predictor.from_ensemble(ensemble_copy, device="cpu")


def test_cli_predict_refuses_a_tampered_ensemble(ensemble_copy, tmp_path, capsys):
    (ensemble_copy / "members/m1-seed1/drugprot.json").write_text("{}")
    code = main(["predict", "--model", str(ensemble_copy), "--data", str(SAMPLE_DIR), "--out", str(tmp_path / "p.tsv"),
                 "--device", "cpu"])
    assert code == 1
    assert "members/m1-seed1/drugprot.json: sha256 mismatch" in capsys.readouterr().err


def test_build_refuses_bad_requests(biased_members, smoke_members, tmp_path):
    with pytest.raises(EnsembleError, match=r"vote: must be one of hard, soft .*got 'Hard'"):
        build_ensemble(biased_members, tmp_path / "a", vote="Hard")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(EnsembleError, match="already exists and is not empty"):
        build_ensemble(biased_members, tmp_path / "busy")
    with pytest.raises(EnsembleError, match="used twice"):
        build_ensemble([MemberSource(biased_members[0], name="a"), MemberSource(biased_members[1], name="a")], tmp_path / "b",
                       evaluate_on_dev=False)
    with pytest.raises(EnsembleError, match="no such folder"):
        build_ensemble([tmp_path / "nope"], tmp_path / "c")
    tampered = tmp_path / "tampered"
    shutil.copytree(smoke_members[0], tampered)
    flip_first_byte(tampered / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"tampered/model\.safetensors: sha256 mismatch"):
        build_ensemble([tampered], tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_ensemble_json_with_a_bad_vote_is_refused(ensemble_copy, biased_ensemble):
    from drugprot.ensemble_folder import write_tree_manifest

    meta = json.loads((ensemble_copy / "ensemble.json").read_text())
    (ensemble_copy / "ensemble.json").write_text(json.dumps({**meta, "vote": "hard,soft"}))
    write_tree_manifest(ensemble_copy)  # a consistent folder, but an invalid mode
    with pytest.raises(EnsembleError, match=r"ensemble\.json: vote: must be one of hard, soft .*got 'hard,soft'"):
        Predictor.from_ensemble(ensemble_copy, device="cpu")
    with pytest.raises(EnsembleError, match="got 'mixed'"):
        Predictor.from_ensemble(biased_ensemble, device="cpu", vote="mixed")


# -- member selection ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:  # the tuning contract's TrialRecord fields
    trial_id: str
    best_dev_f1_a: float | None
    params: dict
    seed: int | None = None
    state: str = "finished"
    run_id: str = ""
    config: dict = dataclasses.field(default_factory=dict)


def _records(rows):
    return [Record(f"t{i}", f1, params, params.get("train.seed"), state) for i, (f1, params, state) in enumerate(rows)]


def test_top_k_takes_distinct_seeds_of_the_best_configuration():
    records = _records([
        (0.50, {"train.lr": 1e-4, "train.seed": 1}, "finished"),
        (0.62, {"train.lr": 3e-5, "train.seed": 1}, "finished"),
        (0.60, {"train.lr": 3e-5, "train.seed": 2}, "finished"),
        (0.61, {"train.lr": 3e-5, "train.seed": 1}, "finished"),  # same configuration and seed: a duplicate
        (0.55, {"train.lr": 3e-5, "train.seed": 3}, "early-stopped"),  # ASHA-stopped: its best model counts
        (0.70, {"train.lr": 3e-5, "train.seed": 4}, "errored"),  # not finished: ignored
        (0.58, {"train.lr": 1e-3, "train.seed": 2}, "finished"),
    ])
    selection = select_top_k(records, 3)
    assert selection.seeds_searched and not selection.note
    assert [r.trial_id for r in selection.records] == ["t1", "t2", "t4"]
    filled = select_top_k(records, 4)
    assert [r.trial_id for r in filled.records] == ["t1", "t2", "t4", "t6"]
    assert "best configuration has 3 distinct seed(s)" in filled.note


def test_top_k_without_searched_seeds_takes_the_best_trials():
    records = _records([(0.5, {"train.lr": 1e-4}, "finished"), (0.7, {"train.lr": 3e-5}, "finished"),
                        (0.6, {"train.lr": 1e-3}, "finished"), (0.9, {"train.lr": 2e-5}, "running")])
    selection = select_top_k(records, 2)
    assert not selection.seeds_searched and [r.trial_id for r in selection.records] == ["t1", "t2"]


def test_top_k_larger_than_the_finished_trials_is_a_clear_error():
    records = _records([(0.5, {"train.lr": 1e-4}, "finished"), (0.7, {"train.lr": 3e-5}, "errored")])
    with pytest.raises(EnsembleError, match=r"--top-k 3: study 'smoke' has only 1 finished trial\(s\) with a dev F1 "
                                            r"\(1 errored, 1 finished\); lower --top-k to at most 1 or use --reseed 3"):
        select_top_k(records, 3, study="smoke")
    with pytest.raises(EnsembleError, match="no finished trial"):
        select_top_k(_records([(0.7, {}, "errored")]), 1, study="smoke")
    with pytest.raises(EnsembleError, match="at least 1"):
        select_top_k(records, 0)


def test_new_seeds_skip_used_ones():
    assert new_seeds([1, 2, 5], 3) == [6, 7, 8]
    assert new_seeds([3, 4], 3, start=2) == [2, 5, 6]
    assert new_seeds([], 2) == [1, 2]


# -- CLI -------------------------------------------------------------------------------------------------------


def test_cli_ensemble_from_member_folders(biased_members, tmp_path, capsys):
    out = tmp_path / "ens"
    code = main(["ensemble", "--members", *map(str, biased_members), "--vote", "soft", "--out", str(out), "--no-log",
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "m1-seed1" in printed and "ensemble" in printed and "micro F1" in printed
    assert json.loads((out / "ensemble.json").read_text())["vote"] == "soft"
    assert not (tmp_path / ".ens.work").exists()


@pytest.mark.parametrize("argv, message", [
    (["--vote", "hard,soft"], "--vote: must be one of hard, soft (one mode for the whole ensemble), got 'hard,soft'"),
    (["--vote", "Soft"], "got 'Soft'"),
    (["--reseed", "2"], "--reseed needs --study"),
    (["--register", "x", "--no-log"], "--register logs the ensemble to MLflow; drop --no-log"),
    (["--select", "greedy"], "--select greedy needs --study (it chooses among the study's trials) and excludes --reseed"),
])
def test_cli_ensemble_bad_inputs_exit_1(biased_members, tmp_path, capsys, argv, message):
    code = main(["ensemble", "--members", str(biased_members[0]), "--out", str(tmp_path / "e"), *argv])
    assert code == 1
    assert message in capsys.readouterr().err


def test_ensemble_json_with_a_bad_weight_or_decision_is_refused(ensemble_copy):
    from drugprot.ensemble_folder import write_tree_manifest

    meta_path = ensemble_copy / "ensemble.json"
    meta = json.loads(meta_path.read_text())
    for change, message in (({"weight": 0}, r"member 'm1-seed1': weight must be a positive integer \(votes\), got 0"),
                            ({"weight": 1.5}, r"weight must be a positive integer \(votes\), got 1.5")):
        broken = {**meta, "members": [{**meta["members"][0], **change}, *meta["members"][1:]]}
        meta_path.write_text(json.dumps(broken))
        (ensemble_copy / MANIFEST).unlink()
        write_tree_manifest(ensemble_copy)
        with pytest.raises(EnsembleError, match=message):
            Predictor.from_ensemble(ensemble_copy, device="cpu")
    meta_path.write_text(json.dumps({**meta, "decision": {"margin": 0.1, "cutoff": 2}}))
    (ensemble_copy / MANIFEST).unlink()
    write_tree_manifest(ensemble_copy)
    with pytest.raises(EnsembleError, match=r"ensemble.json: decision: unknown key\(s\) cutoff"):
        Predictor.from_ensemble(ensemble_copy, device="cpu")


def test_weights_and_decision_in_ensemble_json_drive_prediction(ensemble_copy, dev_documents):
    from drugprot.inference.voting import Decision
    from drugprot.ensemble_folder import write_tree_manifest

    meta_path = ensemble_copy / "ensemble.json"
    meta = json.loads(meta_path.read_text())
    weighted = {**meta, "members": [{**meta["members"][0], "weight": 3}, *meta["members"][1:]],
                "decision": {"margin": -0.2, "thresholds": {}, "second_type": None}}
    meta_path.write_text(json.dumps(weighted))
    (ensemble_copy / MANIFEST).unlink()
    write_tree_manifest(ensemble_copy)
    predictor = Predictor.from_ensemble(ensemble_copy, device="cpu")
    assert predictor.weights.tolist() == [3.0, 1.0, 1.0] and predictor.decision == Decision(margin=-0.2)
    plain = Predictor(predictor.members, vote=predictor.vote_mode, interval=predictor.interval, device="cpu")
    assert _relations(predictor.predict(dev_documents)) != _relations(plain.predict(dev_documents))
    paths = [ensemble_copy / meta["members"][0]["path"]] * 3 + [ensemble_copy / m["path"] for m in meta["members"][1:]]
    repeated = Predictor(_loaded(paths), vote=meta["vote"], interval=tuple(meta["interval"]), device="cpu",
                         decision=Decision(margin=-0.2))  # weight 3 is the first member three times over

    def without_votes(predictions):
        return [r[:5] for r in _relations(predictions)]

    assert without_votes(predictor.predict(dev_documents)) == without_votes(repeated.predict(dev_documents))


def test_cli_top_k_and_reseed_are_exclusive(tmp_path, capsys):
    code = main(["ensemble", "--study", "s", "--top-k", "3", "--reseed", "2", "--out", str(tmp_path / "e")])
    assert code == 1
    assert "--top-k and --reseed are alternatives" in capsys.readouterr().err


# -- Ray Data batch prediction ---------------------------------------------------------------------------------


@pytest.fixture
def isolated_ray(monkeypatch):
    """A short private RAY_TMPDIR, so the test starts its own local Ray instead of joining anyone else's."""
    folder = tempfile.mkdtemp(prefix="dpray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_predict_with_ray_equals_local_prediction(biased_ensemble, tmp_path, isolated_ray, capsys):
    local, remote = tmp_path / "local.tsv", tmp_path / "ray.tsv"
    common = ["predict", "--model", str(biased_ensemble), "--data", str(SAMPLE_DIR), "--split", "development",
              "--device", "cpu"]
    assert main([*common, "--out", str(local)]) == 0
    # The Ray run is its own process, as a user runs it: Ray's in-process state left by other tests (the Serve
    # tests' private Ray) cannot leak in, whatever order the tests run in.
    ray_run = subprocess.run([sys.executable, "-m", "drugprot", *common, "--out", str(remote), "--ray",
                              "--ray-actors", "2", "--ray-batch-size", "3"], capture_output=True, text=True, timeout=300)
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    capsys.readouterr()
    assert local.read_text() and remote.read_text() == local.read_text()


def _shard_row(documents) -> dict:
    from drugprot.records import document_record

    return {"name": "part-00000", "finished": False, "skipped_types": "{}",
            "records": json.dumps([document_record(d) for d in documents])}


def test_ray_actor_class_without_ray(biased_ensemble, dev_documents):
    """The Ray Data actor on its own (no cluster): the shard's output is the Predictor's relations, in order."""
    from drugprot.bulk import BulkJob, ShardPredictor
    from drugprot.formats import render

    actor = ShardPredictor(BulkJob((), "pubtator", "jsonl", model=str(biased_ensemble)), "cpu", None)
    out = actor(_shard_row(dev_documents[:3]))
    expected = load_predictor(biased_ensemble, device="cpu").predict(dev_documents[:3])
    assert out["data"] == render(dev_documents[:3], expected, "jsonl")
    assert out["relations"] == sum(map(len, expected)) > 0 and out["documents"] == 3


def test_hand_vote_helper_agrees_with_vote():
    """Sanity check of the by-hand majority used in test_registry (Counter + mean-probability tie break)."""
    from drugprot.inference import vote

    table = torch.softmax(torch.randn(3, 200, len(LABELS), generator=torch.Generator().manual_seed(1)) * 3, -1)
    assert hand_vote(table) == [int(x) for x in vote(table, "hard")[0]]


def hand_vote(table: torch.Tensor) -> list[int]:
    labels = []
    for i in range(table.size(1)):
        votes = Counter(int(table[m, i].argmax()) for m in range(table.size(0)))
        top = max(votes.values())
        tied = [label for label, count in votes.items() if count == top]
        labels.append(max(tied, key=lambda label: float(table[:, i, label].mean())))
    return labels



@pytest.mark.parametrize("system", ["relation_attention", "multitask"])
def test_fold_matches_the_loop_for_every_head(biased_members, dev_documents, system):
    """The paper's heads stack too: relation attention (definitions encoded by each member) and multitask."""
    from drugprot.model.encoder import build_encoder
    from drugprot.model.heads import RelationModel
    from drugprot.training import relation_definitions

    like = load_artifact(biased_members[0])
    ids, mask = relation_definitions(like.tokenizer)
    members = []
    for seed in (1, 2):
        encoder = build_encoder("tiny-random", seed=seed)
        encoder.resize_token_embeddings(len(like.tokenizer))
        torch.manual_seed(seed)
        model = RelationModel(encoder, system=system, definition_ids=ids, definition_mask=mask)
        members.append(LoadedModel(like.path, model, like.tokenizer, {**like.info, "system": system}))
    looped = Predictor(members, device="cpu", execution="loop")
    cands = looped.candidates(dev_documents[:4])
    expected = looped.member_probabilities(dev_documents[:4], cands)
    stacked = Predictor(members, device="cpu", execution="fold")
    torch.testing.assert_close(stacked.member_probabilities(dev_documents[:4], cands), expected, atol=1e-5, rtol=1e-4)


# -- selection on stored dev probabilities: A/B halves, greedy with replacement, calibration ---------------------------


def _documents(n: int) -> list:
    from drugprot.corpus import Document, Entity, Relation

    docs = []
    for i in range(n):
        entities = {"T1": Entity("T1", "CHEMICAL", 0, 7, "aspirin"), "T2": Entity("T2", "GENE-Y", 17, 21, "COX1")}
        relations = [Relation("INHIBITOR", "T1", "T2")] if i % 2 == 0 else []
        docs.append(Document(f"{1000 + i}", "aspirin blocks COX1", "", entities, relations))
    return docs


def _trial(name: str, documents, correct):
    """Stored probabilities of a trial that gives the gold label (INHIBITOR or NONE) ``correct(i)`` on document i
    and the other label the rest: below 0.5 it is wrong."""
    from drugprot.ensemble.selection import TrialProbabilities

    table = torch.zeros((len(documents), len(LABELS)))
    for i, doc in enumerate(documents):
        gold, other = (LABEL_INDEX["INHIBITOR"], 0) if doc.relations else (0, LABEL_INDEX["INHIBITOR"])
        table[i, gold], table[i, other] = correct(i), 1 - correct(i)
    return TrialProbabilities(name, [(d.pmid, "T1", "T2") for d in documents], table)


def _halves_trials(docs):
    """Trial 0 is right on the first 20 documents, mildly wrong on the gold of the rest; trial 1 the other way round;
    trial 2 is noise. Together (soft) the first two are right everywhere."""
    return [_trial("first", docs, lambda i: 0.9 if i < 20 else (0.4 if i % 2 == 0 else 0.8)),
            _trial("second", docs, lambda i: 0.9 if i >= 20 else (0.4 if i % 2 == 0 else 0.8)),
            _trial("noise", docs, lambda i: 0.3 if i % 3 == 0 else 0.7)]


def _scorer(trials, docs):
    from drugprot.ensemble.selection import Half, Scorer, align

    keys, table = align(trials)
    return Scorer(keys, table, Half("all", docs, torch.arange(len(keys))))


def test_greedy_combines_complementary_trials_and_breaks_ties_to_fewer_members():
    from drugprot.ensemble.selection import greedy

    docs = _documents(40)
    scorer = _scorer(_halves_trials(docs), docs)
    soft = greedy(scorer, 3, max_size=5, vote="soft")
    assert soft.members == {0: 1, 1: 1} and scorer.f1(soft) == 1.0  # neither alone is right on more than 30 of 40
    perfect = [_trial("perfect", docs, lambda i: 0.9), *_halves_trials(docs)]
    alone = greedy(_scorer(perfect, docs), 4, max_size=5, vote="soft")
    assert alone.members == {0: 1}  # adding anything (even itself again) cannot beat 1.0: the smallest prefix stays


def test_greedy_picks_a_trial_again_when_that_helps():
    from drugprot.ensemble.selection import Recipe, greedy

    docs = _documents(40)
    x, y = {0, 1}, {4, 5, 6, 7}  # A is mildly wrong on X, B confidently wrong on Y
    trials = [_trial("A", docs, lambda i: 0.4 if i in x else 0.8), _trial("B", docs, lambda i: 0.1 if i in y else 0.9)]
    scorer = _scorer(trials, docs)
    assert scorer.f1(Recipe("", {0: 1, 1: 1}, "soft")) < scorer.f1(Recipe("", {0: 1}, "soft")) < 1.0
    recipe = greedy(scorer, 2, max_size=5, vote="soft")
    assert recipe.members == {0: 2, 1: 1} and scorer.f1(recipe) == 1.0  # A twice outvotes B on Y, B fixes X


def test_margin_is_calibrated_on_the_half_it_is_given():
    from drugprot.ensemble.selection import Recipe, calibrate_margin

    docs = _documents(20)
    shy = _trial("shy", docs, lambda i: 0.48 if i % 2 == 0 else 0.6)  # every relation just under NONE
    scorer = _scorer([shy], docs)
    plain = Recipe("greedy", {0: 1}, "soft")
    assert scorer.f1(plain) == 0.0
    tuned = calibrate_margin(scorer, plain)
    assert tuned.decision.margin == pytest.approx(-0.05) and tuned.label == "greedy + margin"  # the smallest that works
    assert scorer.f1(tuned) == 1.0


def test_compare_chooses_on_a_and_reports_every_candidate_on_b():
    from drugprot.ensemble.selection import compare

    docs = _documents(40)
    result = compare(_halves_trials(docs), docs, select="greedy", top=2, max_size=4)
    labels = [c.recipe.label for c in result.candidates]
    assert labels == ["best single trial", "top-2 by F1", "greedy", "greedy + margin", "greedy + margin + type thresholds",
                      "greedy + margin + type thresholds + multi-label"]
    a, b = result.halves
    assert {d.pmid for d in a.documents}.isdisjoint({d.pmid for d in b.documents})
    chosen = result.chosen
    assert chosen.recipe.label.startswith("greedy") and chosen.f1_a == max(c.f1_a for c in result.candidates[2:5])
    assert chosen.b.f1 < 1.0  # perfect on A by luck (noise + second, hard): half B shows it, and it is what is built
    table = result.as_dict()
    assert [c["label"] for c in table["candidates"]] == labels and sum(c["chosen"] for c in table["candidates"]) == 1
    assert table["chosen"]["label"] == chosen.recipe.label and table["chosen"]["b"]["f1"] == round(chosen.b.f1, 6)
    assert "refit" not in table and table["seed"] == 0 and "built as it is" in result.table()


def _typed_documents(n: int) -> list:
    """n documents, one gold relation each, its type cycling through three (so a permutation can change them)."""
    from drugprot.corpus import Document, Entity, Relation

    types = ("INHIBITOR", "ACTIVATOR", "SUBSTRATE")
    entities = {"T1": Entity("T1", "CHEMICAL", 0, 7, "aspirin"), "T2": Entity("T2", "GENE-Y", 17, 21, "COX1")}
    return [Document(f"{2000 + i}", "aspirin blocks COX1", "", entities, [Relation(types[i % 3], "T1", "T2")])
            for i in range(n)]


def test_half_b_figures_do_not_change_when_the_b_labels_are_permuted_before_selection():
    """Selection on documents whose half-B gold types are permuted builds the same ensemble (members, weights, vote,
    decision, every candidate), so its figures on the true half B are the same: no choice looked at B's labels."""
    from drugprot.dev_halves import split_halves
    from drugprot.ensemble.selection import Scorer, TrialProbabilities, align, compare

    docs = _typed_documents(60)
    generator = torch.Generator().manual_seed(7)
    trials = [TrialProbabilities(f"t{t}", [(d.pmid, "T1", "T2") for d in docs],
                                 torch.softmax(3 * torch.randn(len(docs), len(LABELS), generator=generator), -1))
              for t in range(6)]
    b_pmids = split_halves(docs, 0).b_pmids
    b_types = [d.relations[0].type for d in docs if d.pmid in b_pmids]
    shifted = iter(b_types[1:] + b_types[:1])  # every B document gets its neighbour's type
    permuted = [dataclasses.replace(d, relations=[dataclasses.replace(d.relations[0], type=next(shifted))])
                if d.pmid in b_pmids else d for d in docs]
    assert sum(p.relations != d.relations for p, d in zip(permuted, docs)) > len(b_pmids) // 2

    honest = compare(trials, docs, select="greedy", top=3, max_size=4, multi_label=True)
    blind = compare(trials, permuted, select="greedy", top=3, max_size=4, multi_label=True)
    assert {d.pmid for d in blind.halves[1].documents} == b_pmids  # the same split
    assert [c.recipe for c in blind.candidates] == [c.recipe for c in honest.candidates]
    assert blind.chosen.recipe == honest.chosen.recipe and blind.chosen.f1_a == honest.chosen.f1_a
    on_true_b = Scorer(*align(trials), honest.halves[1])
    assert on_true_b.score(blind.chosen.recipe) == honest.chosen.b

    def recorded_choices(table):  # what ensemble.json records as the selection, less the figures scored on B
        if isinstance(table, dict):
            return {k: recorded_choices(v) for k, v in table.items() if k not in ("b", "multi_label_helps")}
        return [recorded_choices(v) for v in table] if isinstance(table, list) else table

    assert recorded_choices(blind.as_dict()) == recorded_choices(honest.as_dict())
    assert [on_true_b.score(c.recipe) for c in blind.candidates] == [c.b for c in honest.candidates]


def test_trials_or_members_chosen_on_different_splits_are_refused():
    from drugprot.ensemble.build import selection_seed
    from drugprot.ensemble.selection import compare

    docs = _documents(10)
    same = [_trial("t0", docs, lambda i: 0.9), _trial("t1", docs, lambda i: 0.8)]
    assert compare(same, docs, top=2, max_size=2).seed == 0  # nothing recorded: the config default
    mixed = [dataclasses.replace(same[0], selection_seed=0), dataclasses.replace(same[1], selection_seed=3)]
    with pytest.raises(EnsembleError, match=r"the trials were chosen on different dev splits "
                                            r"\(data.selection_seed 0: t0; 3: t1\)"):
        compare(mixed, docs)
    assert compare([dataclasses.replace(t, selection_seed=3) for t in same], docs, top=2, max_size=2).seed == 3
    infos = [{"config": {"data": {"selection_seed": 2}}}, {"config": {"data": {}}}]
    with pytest.raises(EnsembleError, match=r"the members were trained on different dev splits "
                                            r"\(data.selection_seed 0: m2; 2: m1\)"):
        selection_seed(infos, ["m1", "m2"])
    assert selection_seed(infos[:1], ["m1"]) == 2


def test_compare_refuses_probabilities_of_other_documents():
    from drugprot.ensemble.selection import compare

    docs = _documents(10)
    with pytest.raises(EnsembleError, match=r"cover document\(s\) 1009 that are not in the dev documents given \(9\)"):
        compare([_trial("t", docs, lambda i: 0.9)], docs[:9])
    with pytest.raises(EnsembleError, match="no trial with stored dev probabilities"):
        compare([], docs)


# -- stored dev probabilities (written by training at its best evaluation) ---------------------------------------------


def test_training_stores_the_best_evaluations_dev_probabilities(smoke_members, dev_documents):
    from drugprot.candidates import corpus_candidates
    from drugprot.dev_halves import split_halves
    from drugprot.inference import decode
    from drugprot.model.dev_probabilities import FILE, load_dev_probabilities
    from drugprot.scoring import score

    run = smoke_members[0].parent
    stored = load_dev_probabilities(run / FILE)
    best = json.loads((run / "metrics.json").read_text())["best"]
    info = json.loads((smoke_members[0] / "drugprot.json").read_text())
    candidates, _ = corpus_candidates(dev_documents, tuple(info["interval"]))
    assert stored.keys == [(c.pmid, c.chemical.id, c.gene.id) for c in candidates] and stored.labels == LABELS
    assert stored.probabilities.shape == (len(candidates), len(LABELS)) and stored.eval == best["eval"]
    assert stored.selection_seed == 0 and stored.dev_f1_a == pytest.approx(best["dev_f1_a"])
    assert torch.allclose(stored.probabilities.sum(-1), torch.ones(len(candidates)), atol=1e-2)  # fp16 rows
    relations = decode(candidates, stored.probabilities[None])
    predicted = [(r.pmid, r.type, r.chemical, r.gene) for r in relations]
    assert score(dev_documents, predicted).f1 == pytest.approx(best["dev_f1_all"], abs=1e-3)
    assert score(split_halves(dev_documents, 0).a, predicted).f1 == pytest.approx(best["dev_f1_a"], abs=1e-3)


def test_foreign_or_broken_probability_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    from drugprot.errors import DrugprotError
    from drugprot.model.dev_probabilities import load_dev_probabilities

    save_file({"probabilities": torch.zeros(2, 14)}, str(tmp_path / "other.safetensors"), metadata={"kind": "something"})
    with pytest.raises(DrugprotError, match=r"other.safetensors: not a drugprot dev-probabilities file \(kind 'something'"):
        load_dev_probabilities(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(DrugprotError, match=r"broken.safetensors: not a readable safetensors file"):
        load_dev_probabilities(tmp_path / "broken.safetensors")
    with pytest.raises(DrugprotError, match=r"missing.safetensors: no such file"):
        load_dev_probabilities(tmp_path / "missing.safetensors")


# -- the early exit ----------------------------------------------------------------------------------------------


def _a_confidence_that_exits(predictor, documents) -> float:
    """The median P(NONE) of the first member's NONE votes: the first member alone then leaves about half of them."""
    full = predictor.member_probabilities(documents, predictor.candidates(documents))
    return float(full[0, full[0].argmax(-1) == 0, 0].median())


def test_early_exit_on_real_members_does_what_its_replay_says(biased_members, dev_documents):
    """Members in turn with an early exit output what ``run_in_turn`` replays from every member's probabilities (so
    the calibration measures the real thing), score fewer pairs than exact skipping, and only drop relations."""
    from drugprot.ensemble.early_exit import run_in_turn
    from drugprot.inference import decode

    exact = Predictor(_loaded(biased_members), device="cpu", execution="loop")
    cands = exact.candidates(dev_documents)
    full = exact.member_probabilities(dev_documents, cands)
    confidence = _a_confidence_that_exits(exact, dev_documents)
    exact.scored_pairs = 0
    exact.member_probabilities(dev_documents, cands, skip_settled=True)
    early = Predictor(_loaded(biased_members), device="cpu", early_exit=confidence)
    found = early.member_probabilities(dev_documents, cands, skip_settled=True)
    replay, scored = run_in_turn(full, torch.ones(3), "hard", early.decision, confidence)
    assert early.execution == "loop" and early.exited_pairs > 0
    assert early.scored_pairs == scored < exact.scored_pairs
    torch.testing.assert_close(found, replay, atol=1e-5, rtol=1e-4)  # batches of other pairs: fp32 rounding only

    def keys(relations):
        return {(r.pmid, r.chemical, r.gene, r.type) for r in relations}

    kept, every = keys(decode(cands, found, "hard")), keys(decode(cands, full, "hard"))
    assert kept == keys(decode(cands, replay, "hard")) and kept < every
    assert keys(r for preds in early.predict(dev_documents) for r in preds) == kept


def test_build_records_the_calibrated_early_exit_and_predict_uses_it(biased_ensemble, dev_documents, tmp_path, capsys):
    from drugprot.ensemble.early_exit import EXIT_AGREEMENT

    from drugprot.dev_halves import split_halves

    calibrated = json.loads((biased_ensemble / "ensemble.json").read_text())["early_exit"]
    assert calibrated["agreement"] >= EXIT_AGREEMENT and calibrated["relations"] > 0
    assert 0 < calibrated["member_pair_share"] <= 1 and calibrated["pairs"] > 0
    on_a = Predictor.from_path(biased_ensemble, device="cpu").candidates(list(split_halves(dev_documents, 0).a))
    assert calibrated["pairs"] == len(on_a)  # calibrated on half A's pairs only: half B stays held out
    predictor = Predictor.from_path(biased_ensemble, device="cpu", early_exit="calibrated")
    assert predictor.early_exit == calibrated["confidence"]
    out = tmp_path / "p.tsv"
    assert main(["predict", "--model", str(biased_ensemble), "--data", str(SAMPLE_DIR), "--out", str(out),
                 "--device", "cpu", "--early-exit", "--quiet"]) == 0
    expected = [(p.pmid, p.type, p.chemical, p.gene) for preds in predictor.predict(dev_documents) for p in preds]
    rows = [tuple(line.split("\t")) for line in out.read_text().splitlines()]
    assert [(pmid, rtype, a1.removeprefix("Arg1:"), a2.removeprefix("Arg2:")) for pmid, rtype, a1, a2 in rows] == expected


def test_ray_actor_passes_the_run_options(biased_ensemble, dev_documents):
    from drugprot.bulk import BulkJob, ShardPredictor
    from drugprot.formats import render
    from drugprot.inference.options import InferenceOptions

    confidence = _a_confidence_that_exits(load_predictor(biased_ensemble, device="cpu"), dev_documents)
    options = InferenceOptions(precision="fp32", early_exit=confidence)
    actor = ShardPredictor(BulkJob((), "pubtator", "jsonl", model=str(biased_ensemble), options=options), "cpu", None)
    assert actor.predictor.early_exit == confidence and actor.predictor.precision == "fp32"
    expected = load_predictor(biased_ensemble, device="cpu", early_exit=confidence).predict(dev_documents[:4])
    assert actor(_shard_row(dev_documents[:4]))["data"] == render(dev_documents[:4], expected, "jsonl")


def test_early_exit_refusals_name_what_is_wrong(biased_members, ensemble_copy, tmp_path, capsys):
    from drugprot.bulk import BulkJob, predict_split_with_ray
    from drugprot.ensemble_folder import write_tree_manifest
    from drugprot.inference.options import InferenceOptions

    def predict_with_ray(model, documents, options):
        job = BulkJob((), "drugprot", model=model, options=InferenceOptions(**options))
        return predict_split_with_ray(documents, job)

    with pytest.raises(ValueError, match=r"early_exit must be a probability in \(0, 1\] or 'calibrated', got 0"):
        Predictor(_loaded(biased_members), device="cpu", early_exit=0)
    with pytest.raises(ValueError, match=r"execution 'fold' cannot exit early; members leave pairs early only in turn"):
        Predictor(_loaded(biased_members), device="cpu", execution="fold", early_exit=0.7)
    single = rf"early exit: {biased_members[0]} is a single model; members leave pairs early only in an ensemble"
    with pytest.raises(EnsembleError, match=single):
        Predictor.from_path(biased_members[0], device="cpu", early_exit=0.7)
    with pytest.raises(EnsembleError, match=single):  # before any Ray starts
        predict_with_ray(str(biased_members[0]), [], options={"early_exit": "calibrated"})
    with pytest.raises(EnsembleError, match=r"early exit: .*nowhere: no such model folder"):
        predict_with_ray(str(tmp_path / "nowhere"), [], options={"early_exit": 0.7})
    meta = json.loads((ensemble_copy / "ensemble.json").read_text())
    del meta["early_exit"]
    (ensemble_copy / "ensemble.json").write_text(json.dumps(meta))
    write_tree_manifest(ensemble_copy)  # an ensemble built before calibration
    with pytest.raises(EnsembleError, match=r"copy/ensemble\.json: no calibrated early exit \(built before calibration"):
        Predictor.from_ensemble(ensemble_copy, device="cpu", early_exit="calibrated")
    assert Predictor.from_ensemble(ensemble_copy, device="cpu", early_exit=0.8).early_exit == 0.8
    common = ["predict", "--data", str(SAMPLE_DIR), "--out", str(tmp_path / "p.tsv"), "--device", "cpu", "--quiet"]
    for value in ("1.5", "0", "often"):
        assert main([*common, "--model", str(ensemble_copy), "--early-exit", value]) == 1
        assert (f"--early-exit must be a probability in (0, 1] or 'calibrated', got {value!r}"
                in capsys.readouterr().err)
    assert main([*common, "--model", str(biased_members[0]), "--early-exit", "0.7"]) == 1
    assert "is a single model; members leave pairs early only in an ensemble" in capsys.readouterr().err
    assert not (tmp_path / "p.tsv").exists()
