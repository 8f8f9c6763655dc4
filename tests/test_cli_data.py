"""``drugprot data check|stats`` run in-process (plus one real ``drugprot --help`` subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from drugprot.cli import main

ABSTRACTS = "100\tAspirin inhibits COX-1.\tIbuprofen binds COX-2.\n"
ENTITIES = ("100\tT1\tCHEMICAL\t0\t7\tAspirin\n100\tT2\tGENE-Y\t17\t22\tCOX-1\n"
            "100\tT3\tCHEMICAL\t24\t33\tIbuprofen\n100\tT4\tGENE-N\t40\t45\tCOX-2\n")
RELATIONS = "100\tINHIBITOR\tArg1:T1\tArg2:T2\n100\tDIRECT-REGULATOR\tArg1:T3\tArg2:T4\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_sample_is_clean(sample_dir, capsys):
    code, out, _ = run(capsys, "data", "check", "--data", str(sample_dir), "--strict")
    assert code == 0
    assert "training: ok, 40 documents, 0 warning(s)" in out and "development: ok, 10 documents" in out


def test_check_invalid_corpus_fails_naming_file_and_line(make_corpus, capsys):
    bad = ENTITIES.replace("100\tT3\tCHEMICAL\t24\t33", "100\tT3\tCHEMICAL\t24\t34")
    root = make_corpus(abstracts=ABSTRACTS, entities=bad, relations=RELATIONS)
    make_corpus("development", abstracts=ABSTRACTS, entities=ENTITIES, relations=RELATIONS)
    code, out, _ = run(capsys, "data", "check", "--data", str(root))
    assert code != 0
    assert "training: INVALID" in out and "drugprot_training_entities.tsv:3:" in out
    assert "development: ok, 1 documents" in out  # every split is checked, not just up to the first failure


def test_check_strict_turns_duplicates_into_a_failure(make_corpus, capsys):
    root = make_corpus(abstracts=ABSTRACTS, entities=ENTITIES, relations=RELATIONS + RELATIONS.splitlines()[0] + "\n")
    code, out, _ = run(capsys, "data", "check", "--data", str(root))
    assert code == 0 and "1 warning(s)" in out and "drugprot_training_relations.tsv:3:" in out
    code, out, _ = run(capsys, "data", "check", "--data", str(root), "--strict")
    assert code != 0 and "drugprot_training_relations.tsv:3: exact duplicate" in out


def test_check_folder_without_splits(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, _ = run(capsys, "data", "check", "--data", str(tmp_path / "empty"))
    assert code != 0 and "no split folders" in out
    code, _, err = run(capsys, "data", "check", "--data", str(tmp_path / "missing"))
    assert code == 1 and "no such corpus folder" in err


def file_counts(folder: Path) -> dict:
    """Counts computed straight from the TSV files, independently of the package."""
    split = folder.name
    abstracts = (folder / f"drugprot_{split}_abstracs.tsv").read_text(encoding="utf-8").splitlines()
    entity_rows = [r.split("\t") for r in (folder / f"drugprot_{split}_entities.tsv").read_text(encoding="utf-8").splitlines()]
    relation_rows = [r.split("\t") for r in (folder / f"drugprot_{split}_relations.tsv").read_text(encoding="utf-8").splitlines()]
    etype = {(r[0], r[1]): r[2] for r in entity_rows}
    by_type: dict[str, Counter] = {}
    for pmid, rtype, _, arg2 in relation_rows:
        by_type.setdefault(rtype, Counter())[etype[(pmid, arg2[5:])]] += 1
    return {
        "documents": len(abstracts),
        "entities": dict(Counter(r[2] for r in entity_rows)),
        "relation_lines": len(relation_rows),
        "unique_relations": len({tuple(r) for r in relation_rows}),
        "relations_by_type": {t: dict(c) for t, c in by_type.items()},
        "documents_with_relations": len({r[0] for r in relation_rows}),
    }


def test_stats_json_schema_and_counts(sample_dir, capsys):
    code, out, _ = run(capsys, "data", "stats", "--data", str(sample_dir), "--split", "training", "--json")
    assert code == 0
    stats = json.loads(out)
    assert {"split", "documents", "entities", "relation_lines", "unique_relations", "duplicate_relation_lines",
            "relations_by_type", "related_pairs", "multi_label_pairs", "documents_with_relations", "candidates",
            "seconds", "warnings"} <= set(stats)
    assert {"interval", "pairs_in_sentences", "kept", "positives_kept", "negatives_dropped",
            "gold_lost_cross_sentence", "gold_lost_cross_sentence_pct", "gold_lost_overlapping_mentions",
            "gold_lost_by_interval", "gold_lost_by_interval_pct"} <= set(stats["candidates"])
    expected = file_counts(sample_dir / "training")
    for key, value in expected.items():
        assert stats[key] == value, key
    assert stats["split"] == "training" and stats["duplicate_relation_lines"] == 0
    assert stats["candidates"]["interval"] == [-10, 16]
    c = stats["candidates"]
    assert c["kept"] + c["negatives_dropped"] <= c["pairs_in_sentences"]
    assert 0 <= c["gold_lost_cross_sentence_pct"] <= 100
    assert stats["seconds"]["total"] >= stats["seconds"]["read_validate"] >= 0


def test_stats_all_splits_is_a_list(sample_dir, capsys):
    code, out, _ = run(capsys, "data", "stats", "--data", str(sample_dir), "--json")
    data = json.loads(out)
    assert code == 0 and [s["split"] for s in data] == ["development", "training"]
    assert data[0]["entities"] == file_counts(sample_dir / "development")["entities"]
    assert set(data[0]["entities"]) == {"CHEMICAL", "GENE"}


def test_stats_text_table(sample_dir, capsys):
    code, out, _ = run(capsys, "data", "stats", "--data", str(sample_dir), "--split", "training")
    assert code == 0
    assert "split training: 40 documents" in out and "GENE-N" in out and "INHIBITOR" in out


@pytest.mark.parametrize("lo, hi", [("1", "5"), ("-3", "-1")])
def test_stats_rejects_an_interval_without_zero(sample_dir, capsys, lo, hi):
    code, out, err = run(capsys, "data", "stats", "--data", str(sample_dir), "--interval", lo, hi)
    assert code == 1 and "--interval" in err and out == ""


def test_stats_narrow_interval(sample_dir, capsys):
    _, wide, _ = run(capsys, "data", "stats", "--data", str(sample_dir), "--split", "training", "--json")
    code, narrow, _ = run(capsys, "data", "stats", "--data", str(sample_dir), "--split", "training", "--json",
                          "--interval", "0", "0")
    wide, narrow = json.loads(wide)["candidates"], json.loads(narrow)["candidates"]
    assert code == 0 and narrow["interval"] == [0, 0]
    assert narrow["pairs_in_sentences"] == wide["pairs_in_sentences"]
    assert narrow["kept"] < wide["kept"] and narrow["gold_lost_by_interval"] >= wide["gold_lost_by_interval"]
    # the gold by interval index (what the search spaces' recall-ceiling rule counts) accounts for every loss
    assert narrow["gold_by_interval"] == wide["gold_by_interval"]
    assert sum(n for index, n in narrow["gold_by_interval"].items() if index != "0") == narrow["gold_lost_by_interval"]


def test_stats_strict_with_duplicates_exits_1(make_corpus, capsys):
    root = make_corpus(abstracts=ABSTRACTS, entities=ENTITIES, relations=RELATIONS + RELATIONS)
    code, _, err = run(capsys, "data", "stats", "--data", str(root), "--strict")
    assert code == 1 and "drugprot_training_relations.tsv:3:" in err


def test_drugprot_help_subprocess():
    executable = Path(sys.executable).parent / "drugprot"
    done = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "data" in done.stdout and "evaluate" in done.stdout
