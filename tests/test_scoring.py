"""Official-equivalent scoring rules on a hand-computed fixture, prediction-file parsing, and ``drugprot evaluate``."""

from __future__ import annotations

import json

import pytest

from drugprot.cli import main
from drugprot.corpus import CorpusError, Document, Entity, Relation, read_split
from drugprot.scoring import Counts, Score, read_predictions, score


def entity(eid: str, etype: str, start: int) -> Entity:
    return Entity(eid, etype, start, start + 1, "x")


@pytest.fixture
def gold() -> list[Document]:
    one = Document("1", "t", "a")
    for e in (entity("T1", "CHEMICAL", 0), entity("T2", "GENE-Y", 2), entity("T3", "GENE-N", 4),
              entity("T4", "CHEMICAL", 6), entity("T5", "GENE-Y", 8)):
        one.entities[e.id] = e
    one.relations = [Relation("INHIBITOR", "T1", "T2"), Relation("ACTIVATOR", "T1", "T2"),  # a multi-type pair
                     Relation("SUBSTRATE", "T4", "T3"), Relation("PART-OF", "T4", "T5")]
    two = Document("2", "t", "a")
    for e in (entity("T1", "CHEMICAL", 0), entity("T2", "GENE", 2)):
        two.entities[e.id] = e
    two.relations = [Relation("AGONIST", "T1", "T2")]
    return [one, two]


PREDICTIONS = [
    ("1", "INHIBITOR", "T1", "T2"),    # TP
    ("1", "INHIBITOR", "T1", "T2"),    # exact duplicate: dropped
    ("1", "ACTIVATOR", "T2", "T1"),    # arguments swapped: the same relation, TP
    ("1", "SUBSTRATE", "T4", "T5"),    # a CHEMICAL-GENE pair of the gold entities, but not a gold relation: FP
    ("1", "SUBSTRATE", "T5", "T4"),    # ... and its swapped duplicate: still one FP
    ("1", "INHIBITS", "T4", "T3"),     # unknown type: dropped
    ("1", "INHIBITOR", "T1", "T4"),    # CHEMICAL-CHEMICAL: ignored
    ("1", "INHIBITOR", "T2", "T3"),    # GENE-GENE: ignored
    ("1", "INHIBITOR", "T1", "T9"),    # no such entity: ignored
    ("99", "INHIBITOR", "T1", "T2"),   # unknown PMID: ignored
    ("2", "ANTAGONIST", "T1", "T2"),   # type absent from the gold: FP in micro, no per-type row
    ("2", "AGONIST", "T1", "T2"),      # TP
    ("1", "PART-OF", "T4", "T3"),      # wrong gene for PART-OF: FP
]
# Hand count: gold keys = 5; TP = INHIBITOR(1,T1,T2), ACTIVATOR(1,T1,T2), AGONIST(2,T1,T2) = 3;
# FP = SUBSTRATE(1,T4,T5), ANTAGONIST(2,T1,T2), PART-OF(1,T4,T3) = 3; FN = SUBSTRATE(1,T4,T3), PART-OF(1,T4,T5) = 2.


def test_hand_computed_fixture(gold):
    result = score(gold, PREDICTIONS)
    assert result.micro == Counts(tp=3, fp=3, fn=2)
    assert result.precision == pytest.approx(3 / 6)
    assert result.recall == pytest.approx(3 / 5)
    assert result.f1 == pytest.approx(2 * 0.5 * 0.6 / 1.1)
    assert result.per_type == {
        "INHIBITOR": Counts(1, 0, 0),
        "ACTIVATOR": Counts(1, 0, 0),
        "SUBSTRATE": Counts(0, 1, 1),
        "PART-OF": Counts(0, 1, 1),
        "AGONIST": Counts(1, 0, 0),
    }
    assert "ANTAGONIST" not in result.per_type


def test_pmids_filter_predictions_not_gold(gold):
    result = score(gold, PREDICTIONS, pmids=["1"])
    # doc 2's predictions (one TP, one FP) are filtered; its gold relation still counts as a miss
    assert result.micro == Counts(tp=2, fp=2, fn=3)
    assert result.per_type["AGONIST"] == Counts(0, 0, 1)


def test_multi_type_pair_scored_per_type(gold):
    result = score(gold, [("1", "INHIBITOR", "T1", "T2")])
    assert result.per_type["INHIBITOR"] == Counts(1, 0, 0)
    assert result.per_type["ACTIVATOR"] == Counts(0, 0, 1)
    assert result.micro == Counts(1, 0, 4)


def test_gold_against_itself_is_perfect(gold):
    keys = [(d.pmid, r.type, r.chemical, r.gene) for d in gold for r in d.relations]
    result = score(gold, keys + keys[:2])  # duplicates do not hurt
    assert (result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0)
    assert all((c.precision, c.recall, c.f1) == (1.0, 1.0, 1.0) for c in result.per_type.values())


def test_gold_duplicates_are_not_counted_twice(gold):
    gold[0].duplicate_relations = [Relation("INHIBITOR", "T1", "T2")]
    assert score(gold, [("1", "INHIBITOR", "T1", "T2")]).micro == Counts(1, 0, 4)


def test_no_predictions_scores_zero_without_dividing_by_zero(gold):
    result = score(gold, [])
    assert result.micro == Counts(0, 0, 5)
    assert (result.precision, result.recall, result.f1) == (0.0, 0.0, 0.0)
    assert Counts(0, 0, 0).f1 == 0.0


def test_score_as_dict_schema(gold):
    data = score(gold, PREDICTIONS).as_dict()
    assert {"precision", "recall", "f1", "tp", "fp", "fn", "per_type"} <= set(data)
    assert data["per_type"]["SUBSTRATE"] == {"tp": 0, "fp": 1, "fn": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert json.loads(json.dumps(data)) == data
    assert "MICRO" in Score(Counts(1, 0, 0)).table()


def test_sample_development_against_itself(sample_dir):
    corpus = read_split(sample_dir, "development")
    predictions = read_predictions(sample_dir / "development" / "drugprot_development_relations.tsv")
    assert len(predictions) == sum(len(d.relations) + len(d.duplicate_relations) for d in corpus)
    result = score(corpus.documents, predictions)
    assert (result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0)
    assert result.micro.tp == sum(len(d.relations) for d in corpus)


# --------------------------------------------------------------------------------------------- prediction files


def test_read_predictions_parses_and_skips_blank_lines(tmp_path):
    path = tmp_path / "pred.tsv"
    path.write_text("1\tINHIBITOR\tArg1:T1\tArg2:T2\n\n2\tNOT-A-TYPE\tArg1:T3\tArg2:T4\r\n", encoding="utf-8")
    assert read_predictions(path) == [("1", "INHIBITOR", "T1", "T2"), ("2", "NOT-A-TYPE", "T3", "T4")]


@pytest.mark.parametrize("bad", ["1\tINHIBITOR\tArg1:T1", "1\tINHIBITOR\tT1\tT2", "1\tINHIBITOR\tArg2:T2\tArg1:T1",
                                 "1\tINHIBITOR\tArg1:T1\tArg2:T2\textra"])
def test_malformed_prediction_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "pred.tsv"
    path.write_text(f"1\tINHIBITOR\tArg1:T1\tArg2:T2\n\n{bad}\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"pred\.tsv:3: expected PMID<TAB>TYPE<TAB>Arg1:Tn<TAB>Arg2:Tm"):
        read_predictions(path)


def test_prediction_file_with_bad_utf8(tmp_path):
    path = tmp_path / "pred.tsv"
    path.write_bytes(b"1\tINHIBITOR\tArg1:T1\tArg2:T2\n1\tINHIBIT\xc3\tArg1:T1\tArg2:T2\n")
    with pytest.raises(CorpusError, match=r"pred\.tsv:2: not valid UTF-8"):
        read_predictions(path)


# ------------------------------------------------------------------------------------------- drugprot evaluate


def test_evaluate_cli_gold_against_itself(sample_dir, capsys):
    pred = sample_dir / "development" / "drugprot_development_relations.tsv"
    assert main(["evaluate", "--gold", str(sample_dir), "--split", "development", "--pred", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "micro precision 1.0000  recall 1.0000  f1 1.0000" in out
    assert main(["evaluate", "--gold", str(sample_dir), "--pred", str(pred), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["precision"], data["recall"], data["f1"]) == (1.0, 1.0, 1.0)
    assert data["per_type"] and all(row["f1"] == 1.0 for row in data["per_type"].values())


def test_evaluate_cli_pmids_filter(sample_dir, tmp_path, capsys):
    pred = sample_dir / "development" / "drugprot_development_relations.tsv"
    rows = [line.split("\t") for line in pred.read_text(encoding="utf-8").splitlines()]
    pmids = sorted({r[0] for r in rows})[:3]
    (tmp_path / "pmids.txt").write_text("\n".join(pmids) + "\n")
    kept = len({tuple(r) for r in rows if r[0] in pmids})
    total = len({tuple(r) for r in rows})
    assert main(["evaluate", "--gold", str(sample_dir), "--pred", str(pred), "--pmids", str(tmp_path / "pmids.txt"),
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["precision"] == 1.0 and (data["tp"], data["fn"]) == (kept, total - kept)


def test_evaluate_cli_malformed_prediction_exits_1_naming_file_and_line(sample_dir, tmp_path, capsys):
    pred = tmp_path / "pred.tsv"
    pred.write_text("17512723\tINHIBITOR\tArg1:T1\tArg2:T2\n17512723\tINHIBITOR\n", encoding="utf-8")
    assert main(["evaluate", "--gold", str(sample_dir), "--pred", str(pred)]) == 1
    err = capsys.readouterr().err
    assert "pred.tsv:2:" in err and err.startswith("drugprot evaluate: error:")
