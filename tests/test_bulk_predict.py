"""Streaming, sharded, resumable prediction (drugprot.bulk, ``drugprot predict --input``): a job killed with SIGKILL
and rerun gives byte-identical output; settings are pinned per output folder; the JSON summary and the progress bar;
the cascade CPU path; the Ray Data path gives the same shards; peak memory does not grow with the corpus."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fixtures_bulk import dev_sample, relation_model_dir  # noqa: F401  (fixtures)

from drugprot.cli import main
from drugprot.formats import write_pubtator
from drugprot.polling import poll

REPO = Path(__file__).resolve().parents[1]


def repeated(documents, times: int):
    """The documents ``times`` over, copy k with PMIDs prefixed by k (what the memory bench generates)."""
    return [dataclasses.replace(d, pmid=f"{k}{d.pmid}") for k in range(1, times + 1) for d in documents]


def _drugprot(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    return subprocess.Popen([sys.executable, "-m", "drugprot", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_killed_job_resumes_to_byte_identical_output(relation_model_dir, dev_sample, tmp_path):
    corpus = tmp_path / "corpus.pubtator"
    write_pubtator(corpus, repeated(dev_sample, 8))  # 80 documents, 40 shards of 2
    common = ["predict", "--model", str(relation_model_dir), "--input", str(corpus), "--format", "pubtator",
              "--output-format", "jsonl", "--shard-size", "2", "--device", "cpu", "--quiet", "--json"]

    reference = _drugprot(*common, "--out", str(tmp_path / "reference"))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()

    killed_out = tmp_path / "resumed"
    job = _drugprot(*common, "--out", str(killed_out))
    manifest = killed_out / "manifest.json"

    def three_shards_written() -> bool | None:
        if job.poll() is not None:
            return False  # it ended first: nothing left to kill
        return manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3 or None

    if poll(three_shards_written, timeout=600, interval=0.01):
        job.send_signal(signal.SIGKILL)
    assert job.wait(timeout=60) == -signal.SIGKILL, "the job finished before it could be killed"
    finished = len(json.loads(manifest.read_text())["shards"])
    assert 3 <= finished < 40

    rerun = _drugprot(*common, "--out", str(killed_out))
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    summary = json.loads(rerun.stdout.read().splitlines()[-1])
    assert summary["shards_skipped"] == finished and summary["shards_written"] == 40 - finished
    assert summary["documents"] == 80 and summary["relations"] > 0
    assert _tree(killed_out) == _tree(tmp_path / "reference")


def test_a_folder_of_another_job_is_refused(relation_model_dir, dev_sample, tmp_path, capsys):
    corpus = tmp_path / "c.pubtator"
    write_pubtator(corpus, dev_sample)
    common = ["predict", "--model", str(relation_model_dir), "--input", str(corpus), "--format", "pubtator",
              "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")]
    assert main([*common, "--shard-size", "4"]) == 0
    assert main([*common, "--shard-size", "5"]) != 0
    assert "holds the output of another job (shard_size: 4 there, 5 now)" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main([*common[:-1], str(tmp_path / "busy")]) != 0
    assert "busy: folder is not empty and has no manifest.json" in capsys.readouterr().err


def test_changed_input_is_refused_on_resume(relation_model_dir, dev_sample, tmp_path, capsys):
    corpus = tmp_path / "c.pubtator"
    write_pubtator(corpus, dev_sample)
    common = ["predict", "--model", str(relation_model_dir), "--input", str(corpus), "--format", "pubtator",
              "--device", "cpu", "--quiet", "--shard-size", "4", "--out", str(tmp_path / "out")]
    assert main(common) == 0
    write_pubtator(corpus, repeated(dev_sample, 1))
    assert main(common) != 0
    assert "the input changed since it was written" in capsys.readouterr().err


def test_json_summary_and_progress_bar(relation_model_dir, dev_sample, tmp_path, capsys):
    corpus = tmp_path / "c.pubtator"
    write_pubtator(corpus, dev_sample)
    assert main(["predict", "--model", str(relation_model_dir), "--input", str(corpus), "--format", "pubtator",
                 "--device", "cpu", "--json", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["documents"] == 10 and summary["shards_written"] == 1 and summary["pairs"] > 0
    assert f"{summary['pairs']}/" in captured.err or f"{summary['pairs']}pairs" in captured.err.replace(" ", "")
    assert main(["predict", "--model", str(relation_model_dir), "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "p.tsv"), "--quiet"]) != 0
    assert main(["predict", "--model", str(relation_model_dir), "--data", str(REPO / "platform/drugprot/sample_data"),
                 "--out", str(tmp_path / "p.tsv"), "--device", "cpu", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["relations"] == len((tmp_path / "p.tsv").read_text().splitlines())
    assert "pairs" not in captured.err


def test_cascade_scores_in_bf16_and_rescores_close_calls_in_fp32(relation_model_dir, dev_sample):
    """precision cascade: a bf16 copy scores every pair, the fp32 model re-scores those whose top-2 margin is below
    cascade_margin: margin 1 re-scores everything (exactly fp32), margin 0 nothing (the bf16 copy alone)."""
    import torch

    from drugprot.inference import Predictor

    fp32 = Predictor.from_path(relation_model_dir, device="cpu", precision="fp32")
    candidates = fp32.candidates(dev_sample)
    probs32 = fp32.member_probabilities(dev_sample, candidates)
    everything = Predictor.from_path(relation_model_dir, device="cpu", precision="cascade", cascade_margin=1.0)
    assert {p.dtype for p in everything.scorer.stages[0].scorer.fast.parameters()} == {torch.bfloat16}
    assert everything.members[0].model.classifier.weight.dtype == torch.float32
    assert everything.member_probabilities(dev_sample, candidates).equal(probs32)
    assert everything.rescored_pairs == everything.scored_pairs > 0
    bf16 = Predictor.from_path(relation_model_dir, device="cpu", precision="cascade", cascade_margin=0.0)
    probs16 = bf16.member_probabilities(dev_sample, candidates)
    assert bf16.rescored_pairs == 0 and not probs16.equal(probs32)
    assert torch.allclose(probs16, probs32, atol=0.05)
    default = Predictor.from_path(relation_model_dir, device="cpu", precision="cascade")
    probs = default.member_probabilities(dev_sample, candidates)
    top2 = probs16.topk(2, -1).values
    close = (top2[:, :, 0] - top2[:, :, 1]) < default.cascade_margin
    assert 0 < default.rescored_pairs == int(close.sum()) < default.scored_pairs
    # re-scored pairs are batched apart from the others (other padding), so fp32 up to float rounding
    assert torch.allclose(probs[close], probs32[close], atol=1e-5) and not probs[close].equal(probs16[close])
    assert probs[~close].equal(probs16[~close])
    with pytest.raises(ValueError, match=r"cascade_margin must be between 0 and 1 \(a probability margin\), got 1.5"):
        Predictor.from_path(relation_model_dir, device="cpu", precision="cascade", cascade_margin=1.5)
    with pytest.raises(ValueError, match="execution 'fold' cannot stack cascade members; use 'auto' or 'loop'"):
        Predictor.from_path(relation_model_dir, device="cpu", precision="cascade", execution="fold")


@pytest.mark.slow
def test_ray_data_path_writes_the_same_shards(relation_model_dir, dev_sample, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_pubtator(folder / "a.pubtator", dev_sample)
    write_pubtator(folder / "b.pubtator", repeated(dev_sample, 1))
    common = ["predict", "--model", str(relation_model_dir), "--input", str(folder), "--format", "pubtator",
              "--output-format", "bioc", "--shard-size", "3", "--device", "cpu", "--quiet"]
    local = _drugprot(*common, "--out", str(tmp_path / "local"))
    assert local.wait(timeout=600) == 0, local.stderr.read()
    ray_tmp = tempfile.mkdtemp(prefix="dpray", dir="/tmp")  # short (Ray's socket paths) and private: our own Ray
    ray_env = {"RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    with_ray = subprocess.run([sys.executable, "-m", "drugprot", *common, "--ray", "--ray-actors", "2", "--out",
                               str(tmp_path / "ray-out")], env={**os.environ, **ray_env, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO / "platform")},
                              capture_output=True, text=True, timeout=600)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert with_ray.returncode == 0, with_ray.stderr[-3000:]
    assert _tree(tmp_path / "ray-out") == _tree(tmp_path / "local")
    assert len([n for n in _tree(tmp_path / "local") if n.startswith("part-")]) == 8


@pytest.mark.slow
def test_peak_memory_stays_flat_as_the_corpus_grows(relation_model_dir, tmp_path):
    """500× the sample (5000 documents) against 1×, through bench/bulk_memory.py. An empty GENE interval (99 99)
    leaves no pairs, so the test times reading, sharding and writing alone within the test budget: holding the
    corpus in memory would add ~36 MB here (measured with tracemalloc). The bench with a real model over 20× the development set gives the
    figures with prediction."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bulk_memory.py"), "--model", str(relation_model_dir),
                             "--multipliers", "1", "500", "--shard-size", "50", "--interval", "99", "99",
                             "--data", str(REPO / "platform/drugprot/sample_data"), "--work", str(tmp_path)],
                            env={**os.environ, "PYTHONPATH": str(REPO / "platform")}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    small, large = report["runs"]
    assert (small["documents"], large["documents"]) == (10, 5000)
    assert large["peak_rss_mb"] <= small["peak_rss_mb"] + 15, report


def test_predict_cli_takes_precision_cascade_and_refuses_unknown_precisions(relation_model_dir, tmp_path, capsys):
    sample = str(REPO / "platform/drugprot/sample_data")
    assert main(["predict", "--model", str(relation_model_dir), "--data", sample, "--out", str(tmp_path / "p.tsv"),
                 "--device", "cpu", "--precision", "cascade", "--quiet", "--json"]) == 0
    written = len((tmp_path / "p.tsv").read_text().splitlines())
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["relations"] == written > 0
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(relation_model_dir), "--data", sample, "--out", str(tmp_path / "q.tsv"),
              "--precision", "fp8"])
    assert "argument --precision: invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--precision", "fp32", "--cascade-margin", "0.1"], "--cascade-margin applies to --precision cascade only, got --precision fp32"),
    (["--precision", "cascade", "--cascade-margin", "1.5"], r"--cascade-margin must be between 0 and 1 \(a probability margin\), got 1.5"),
])
def test_predict_refuses_a_cascade_margin_it_cannot_use(relation_model_dir, dev_sample, tmp_path, capsys, options, message):
    write_pubtator(tmp_path / "a.pubtator", dev_sample[:2])
    assert main(["predict", "--model", str(relation_model_dir), "--input", str(tmp_path / "a.pubtator"),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet", *options]) == 1
    assert re.search(message, capsys.readouterr().err) and not (tmp_path / "out").exists()


def test_cascade_margin_reaches_the_predictor_and_pins_the_output_folder(relation_model_dir, dev_sample, tmp_path, capsys):
    """--cascade-margin 0 is bf16 alone: nothing re-scored; the margin is part of the job, so a rerun with another
    margin into the same folder is refused."""
    from drugprot.inference import InferenceOptions, load_predictor

    bf16 = load_predictor(relation_model_dir, device="cpu", options=InferenceOptions(precision="cascade", cascade_margin=0.0))
    bf16.predict(dev_sample)
    assert bf16.cascade_margin == 0.0 and bf16.scored_pairs > 0 and bf16.rescored_pairs == 0
    write_pubtator(tmp_path / "a.pubtator", dev_sample[:3])
    common = ["predict", "--model", str(relation_model_dir), "--input", str(tmp_path / "a.pubtator"), "--out",
              str(tmp_path / "out"), "--device", "cpu", "--precision", "cascade", "--quiet"]
    assert main([*common, "--cascade-margin", "0"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["cascade_margin"] == 0.0
    capsys.readouterr()
    assert main([*common, "--cascade-margin", "0.01"]) == 1
    assert "holds the output of another job (cascade_margin: 0.0 there, 0.01 now)" in capsys.readouterr().err
