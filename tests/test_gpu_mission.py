"""The GPU mission's preparation: the payload in parts (bench/gpu_payload.py), the plan of calls, the machine's
inventory, and the whole mission rehearsed on CPU (bench/gpu_mission.sh --dry-run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_payload  # noqa: E402

MIB = 2**20


def staged(root: Path, sizes: dict[str, int]) -> Path:
    """A stage folder of sparse files of these sizes (what prepare_gpu.sh stages, in shape)."""
    for name, size in sizes.items():
        path = root / "stage" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(size)
    (root / "stage" / "wheels" / "a.whl").write_bytes(os.urandom(4096))  # something that is not zeros
    return root / "stage"


def test_parts_stashed_call_by_call_join_back_to_the_staged_folder(tmp_path):
    stage = staged(tmp_path, {"wheels/ray.whl": 300_000, "minilm/model.safetensors": 120_000, "corpus/a.tsv.gz": 5})
    manifest = gpu_payload.pack(stage, tmp_path / "mission", part_bytes=100_000)
    assert len(manifest["parts"]) == 5 and all(p["bytes"] <= 100_000 for p in manifest["parts"])
    for part in manifest["parts"]:  # each call carries the manifest and its own part only
        call = tmp_path / f"call-{part['name']}"
        call.mkdir()
        (call / "manifest.json").write_bytes((tmp_path / "mission" / "manifest.json").read_bytes())
        (call / part["name"]).write_bytes((tmp_path / "mission" / part["name"]).read_bytes())
        assert gpu_payload.stash(call, tmp_path / "stash") == [part["name"]]
    gpu_payload.join(call, tmp_path / "stash", tmp_path / "joined")
    for path in stage.rglob("*"):
        if path.is_file():
            assert (tmp_path / "joined" / path.relative_to(stage)).read_bytes() == path.read_bytes()


def test_a_missing_or_damaged_part_names_the_call_to_rerun(tmp_path):
    stage = staged(tmp_path, {"wheels/ray.whl": 250_000})
    gpu_payload.pack(stage, tmp_path / "mission", part_bytes=100_000)
    damaged = tmp_path / "mission" / "part-01"
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(gpu_payload.PayloadError, match=r"part-01: checksum differs .*rerun the call that carries "
                                                       r"part-01 \(call 2\)"):
        gpu_payload.stash(tmp_path / "mission", tmp_path / "stash")
    damaged.unlink()
    (tmp_path / "mission" / "part-02").unlink()
    with pytest.raises(gpu_payload.PayloadError, match=r"parts missing: part-01 \(call 2\), part-02 \(call 3\); the "
                                                       r"machine went cold between calls"):
        gpu_payload.join(tmp_path / "mission", tmp_path / "stash", tmp_path / "joined")
    assert not (tmp_path / "joined").exists()


def test_plan_keeps_every_carry_under_64_mib_and_the_calls_within_15_minutes(tmp_path):
    """A payload of the staged size (ray 79 MB, the rest of the wheels, MiniLM, corpus: about 166 MiB), cut with
    the parts prepare_gpu.sh cuts: the plan printed by bench/gpu_mission.sh --plan."""
    staged(tmp_path, {"wheels/ray.whl": 79_321_593, "wheels/others.whl": 43 * MIB, "minilm/model.safetensors": 44 * MIB,
                      "corpus/training.tsv.gz": 4 * MIB})
    packed = subprocess.run([sys.executable, "bench/gpu_payload.py", "pack", str(tmp_path / "stage"),
                             str(tmp_path / "mission")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr
    result = subprocess.run(["bash", "bench/gpu_mission.sh", "--plan"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "MISSION_DIR": str(tmp_path / "mission"),
                                              "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    calls = plan["calls"]
    assert len(calls) == 3
    assert all(c["carry_bytes"] < 64 * MIB for c in calls), [c["carry_bytes"] / MIB for c in calls]
    assert plan["start_s"] >= 240 and plan["total_s"] < 15 * 60 and plan["fits"]
    assert plan["total_s"] == plan["start_s"] + sum(c["seconds"] for c in calls)
    assert "inventory" in calls[0]["does"] and "a. tune" in calls[-1]["does"]
    assert all(c["timeout_s"] <= 600 for c in calls)
    assert [c["command"] for c in calls] == [f"bench/gpu_mission.sh --call {n}" for n in (1, 2, 3)]
    assert f"= {plan['total_s']} s of 900 s" in result.stdout


def test_inventory_lists_a_cached_model(tmp_path, monkeypatch):
    model = tmp_path / "hf" / "hub" / "models--dmis-lab--biobert" / "snapshots" / "abc"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "_name_or_path": "dmis-lab/biobert"}))
    (model / "model.safetensors").write_bytes(b"\0" * 1024)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    found = gpu_payload.inventory(tmp_path / "inventory.json")
    assert {"path": str(model), "model_type": "bert", "architectures": None, "name": "dmis-lab/biobert",
            "bytes": 1024 + len((model / "config.json").read_bytes())} in found["models"]
    assert json.loads((tmp_path / "inventory.json").read_text())["models"] == found["models"]
    assert any(p.startswith("torch==") for p in found["packages"])


def test_mission_refuses_an_unknown_mode_before_doing_anything(tmp_path):
    result = subprocess.run(["bash", "bench/gpu_mission.sh", "--call", "x"], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip() == "usage: bench/gpu_mission.sh --call N (N: 1, 2, ...)"
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_dry_run_rehearses_tune_ensemble_and_serve_over_http(tmp_path):
    """The whole mission on CPU: parts stashed and joined, a study of 2 trials at half a CPU each, the top-k and
    reseeded ensembles on half B, both served over HTTP at 1, 8 and 64 clients; the stores come back."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "SCRATCH": str(tmp_path / "scratch"),
           "PYTHONPATH": str(REPO / "platform"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "BATCH_STEPS": ""}  # step d is bench/gpu.sh's, rehearsed by its own dry run
    result = subprocess.run(["bash", "bench/gpu_mission.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                            timeout=1500, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "checksum verified" in result.stdout
    study = json.loads((tmp_path / "tune.json").read_text())
    assert study["complete"] and len(study["trials"]) == 2
    for name, select, members in (("ensemble_topk", "top-k", 2), ("ensemble_reseed", "reseed", 1)):
        built = json.loads((tmp_path / f"{name}.json").read_text())
        assert built["select"] == select and len(built["members"]) == members
    half_b = json.loads((tmp_path / "half_b.json").read_text())["half_b"]
    assert [row["name"] for row in half_b] == ["single", "top-k", "reseeded"]
    assert [row["members"] for row in half_b] == [1, 2, 1]
    serve = (tmp_path / "serve.log").read_text()
    for config in ("batched", "unbatched"):
        for clients in (1, 8, 64):
            row = next(line for line in serve.splitlines() if line.startswith(f"| {config} | {clients} |"))
            assert int(row.split("|")[4]) > 0, row  # some 200 answers at every level
    with tarfile.open(tmp_path / "stores.tar.gz") as archive:
        assert sorted(archive.getnames()) == ["mlflow.db", "optuna.db"]
