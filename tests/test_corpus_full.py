"""The full DrugProt v1.1 corpus: published counts, recall ceilings, and scoring checks on the real development set.

Skipped when ../shared/data/drugprot is absent. The expected numbers are the published ones (the organisers' per-type
table and the counts measured in the corpus README), never figures copied from this package's output.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections import Counter

import pytest

from drugprot.cli import main
from drugprot.corpus import RELATION_TYPES, Relation, read_split, write_relations

pytestmark = pytest.mark.corpus

# Published per-type relation counts in training, split by the Arg2 entity type: (GENE-Y, GENE-N).
TRAINING_BY_TYPE = {
    "INHIBITOR": (3423, 1969),
    "DIRECT-REGULATOR": (1583, 667),
    "SUBSTRATE": (1370, 633),
    "ACTIVATOR": (788, 641),
    "INDIRECT-UPREGULATOR": (1052, 327),
    "INDIRECT-DOWNREGULATOR": (1048, 282),
    "ANTAGONIST": (687, 285),
    "PRODUCT-OF": (677, 244),
    "PART-OF": (617, 269),
    "AGONIST": (495, 164),
    "AGONIST-ACTIVATOR": (28, 1),
    "SUBSTRATE_PRODUCT-OF": (21, 4),
    "AGONIST-INHIBITOR": (6, 7),
}
DEVELOPMENT_BY_TYPE = {
    "INHIBITOR": 1152, "DIRECT-REGULATOR": 458, "SUBSTRATE": 495, "ACTIVATOR": 246, "INDIRECT-UPREGULATOR": 302,
    "INDIRECT-DOWNREGULATOR": 332, "ANTAGONIST": 218, "PRODUCT-OF": 158, "PART-OF": 258, "AGONIST": 131,
    "AGONIST-ACTIVATOR": 10, "SUBSTRATE_PRODUCT-OF": 3, "AGONIST-INHIBITOR": 2,
}
SPLIT_COUNTS = {  # documents, entities by type, relation lines, unique relations, documents with relations
    "training": (3500, {"CHEMICAL": 46274, "GENE-N": 14834, "GENE-Y": 28421}, 17288, 17274, 2433),
    "development": (750, {"CHEMICAL": 9853, "GENE": 9005}, 3765, 3761, 542),
}


@pytest.fixture(scope="module")
def stats(full_corpus_dir):
    """``drugprot data stats --json`` for each split, run once for the module (capsys is function-scoped)."""
    results = {}
    for split in ("training", "development"):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["data", "stats", "--data", str(full_corpus_dir), "--split", split, "--json"]) == 0
        results[split] = json.loads(buffer.getvalue())
    return results


def test_training_reproduces_the_26_published_per_type_counts(stats):
    by_type = stats["training"]["relations_by_type"]
    assert set(by_type) == set(TRAINING_BY_TYPE)
    for rtype, (gene_y, gene_n) in TRAINING_BY_TYPE.items():
        assert by_type[rtype] == {"GENE-Y": gene_y, "GENE-N": gene_n}, rtype
    assert sum(y + n for y, n in TRAINING_BY_TYPE.values()) == stats["training"]["relation_lines"] == 17288


def test_development_per_type_counts_by_gene(stats):
    assert stats["development"]["relations_by_type"] == {t: {"GENE": n} for t, n in DEVELOPMENT_BY_TYPE.items()}


@pytest.mark.parametrize("split", ["training", "development"])
def test_split_counts(stats, split):
    documents, entities, lines, unique, with_relations = SPLIT_COUNTS[split]
    s = stats[split]
    assert (s["documents"], s["entities"], s["relation_lines"], s["unique_relations"]) == (documents, entities, lines, unique)
    assert s["documents_with_relations"] == with_relations
    assert s["duplicate_relation_lines"] == s["warnings"] == lines - unique


def test_training_pairs(stats):
    assert (stats["training"]["related_pairs"], stats["training"]["multi_label_pairs"]) == (17073, 201)


@pytest.mark.parametrize("split", ["training", "development"])
def test_recall_ceiling(stats, split):
    c = stats[split]["candidates"]
    assert c["gold_lost_cross_sentence_pct"] <= 0.5
    assert c["gold_lost_cross_sentence"] / stats[split]["unique_relations"] <= 0.005
    lost = c["gold_lost_cross_sentence"] + c["gold_lost_overlapping_mentions"] + c["gold_lost_by_interval"]
    assert c["positives_kept"] <= stats[split]["unique_relations"] - lost  # kept positive pairs <= relations left
    assert lost / stats[split]["unique_relations"] <= 0.01


def evaluate_json(capsys, gold_dir, pred) -> dict:
    assert main(["evaluate", "--gold", str(gold_dir), "--split", "development", "--pred", str(pred), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_development_gold_against_itself(full_corpus_dir, capsys):
    pred = full_corpus_dir / "development" / "drugprot_development_relations.tsv"  # includes its 4 duplicate lines
    data = evaluate_json(capsys, full_corpus_dir, pred)
    assert (data["precision"], data["recall"], data["f1"]) == (1.0, 1.0, 1.0)
    assert (data["tp"], data["fp"], data["fn"]) == (3761, 0, 0)
    assert set(data["per_type"]) == set(RELATION_TYPES)


def test_development_perturbation(full_corpus_dir, tmp_path, capsys):
    """Perturb the gold in known ways and check P/R/F1 against counts derived from the perturbation alone."""
    rng = random.Random(20210628)
    corpus = read_split(full_corpus_dir, "development")
    gold = [(d, r) for d in corpus for r in d.relations]
    gold_keys = {(d.pmid, r.type, r.chemical, r.gene) for d, r in gold}
    rng.shuffle(gold)
    n_drop, n_relabel, n_false = 300, 200, 150
    dropped, relabelled, kept = gold[:n_drop], gold[n_drop:n_drop + n_relabel], gold[n_drop + n_relabel:]

    tp, fp, fn = Counter(), Counter(), Counter()  # per type
    rows: list[tuple[str, Relation]] = []
    for i, (doc, r) in enumerate(kept):  # every 10th kept relation is written with its arguments swapped only
        rows.append((doc.pmid, Relation(r.type, r.gene, r.chemical) if i % 10 == 0 else r))
        tp[r.type] += 1
    for doc, r in dropped:
        fn[r.type] += 1
    produced = set()
    for doc, r in relabelled:  # a wrong type on a gold pair: one FN (old type) and one FP (new type)
        choices = [t for t in RELATION_TYPES if (doc.pmid, t, r.chemical, r.gene) not in gold_keys | produced]
        new = rng.choice(choices)
        produced.add((doc.pmid, new, r.chemical, r.gene))
        rows.append((doc.pmid, Relation(new, r.chemical, r.gene)))
        fn[r.type] += 1
        fp[new] += 1
    related = {(d.pmid, r.chemical, r.gene) for d, r in gold}
    false_pairs = sorted(
        (d.pmid, c.id, g.id)
        for d in corpus
        for c in d.entities.values() if c.type == "CHEMICAL"
        for g in d.entities.values() if g.is_gene and (d.pmid, c.id, g.id) not in related
    )
    for pmid, chem, gene in rng.sample(false_pairs, n_false):  # a pair with no gold relation: one FP
        rtype = rng.choice(RELATION_TYPES)
        rows.append((pmid, Relation(rtype, chem, gene)))
        fp[rtype] += 1

    # perturbations the scorer must ignore
    noise: list[tuple[str, Relation]] = []
    noise += rng.sample(rows, 100)  # exact duplicate lines
    noise += [(p, Relation(r.type, r.gene, r.chemical)) for p, r in rng.sample(rows, 100)]  # swapped argument order
    noise += [(p, Relation(rng.choice(["BINDS", "inhibitor", "NONE"]), r.chemical, r.gene)) for p, r in rng.sample(rows, 50)]
    noise += [("1", Relation("INHIBITOR", "T1", "T2")), ("99999999", Relation("AGONIST", "T1", "T2"))]  # unknown PMIDs
    chem_pairs = [(d.pmid, a.id, b.id) for d in corpus for a in d.entities.values() for b in d.entities.values()
                  if a.type == b.type == "CHEMICAL" and a.id != b.id]
    noise += [(p, Relation("INHIBITOR", a, b)) for p, a, b in rng.sample(chem_pairs, 20)]  # not a CHEMICAL-GENE pair
    noise += [(d.pmid, Relation("INHIBITOR", "T1", "T99999")) for d in corpus.documents[:10]]  # no such entity
    lines = rows + noise
    rng.shuffle(lines)
    pred = tmp_path / "perturbed.tsv"
    write_relations(pred, lines)

    TP, FP, FN = sum(tp.values()), sum(fp.values()), sum(fn.values())
    assert (TP, FP, FN) == (len(gold) - n_drop - n_relabel, n_relabel + n_false, n_drop + n_relabel)
    data = evaluate_json(capsys, full_corpus_dir, pred)
    assert (data["tp"], data["fp"], data["fn"]) == (TP, FP, FN)
    precision, recall = TP / (TP + FP), TP / (TP + FN)
    assert data["precision"] == pytest.approx(precision)
    assert data["recall"] == pytest.approx(recall)
    assert data["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    for rtype in RELATION_TYPES:
        row = data["per_type"][rtype]
        assert (row["tp"], row["fp"], row["fn"]) == (tp[rtype], fp[rtype], fn[rtype]), rtype
