"""The dev A/B split every decision shares, and the checkpoint rule: best on half A, whatever the whole set says."""

from __future__ import annotations

import pytest

from drugprot.corpus import Document, Entity, Relation


def _documents(n: int) -> list[Document]:
    """n documents; document i holds i % 3 INHIBITOR relations (one per gene), so relation counts differ."""
    docs = []
    for i in range(n):
        entities = {"T1": Entity("T1", "CHEMICAL", 0, 7, "aspirin")}
        relations = []
        for g in range(i % 3):
            entities[f"G{g}"] = Entity(f"G{g}", "GENE-Y", 17 + 6 * g, 21 + 6 * g, "COX1")
            relations.append(Relation("INHIBITOR", "T1", f"G{g}"))
        docs.append(Document(f"{1000 + i}", "aspirin blocks COX1 COX2", "", entities, relations))
    return docs


def _gold(documents) -> list[tuple[str, str, str, str]]:
    return [(d.pmid, r.type, r.chemical, r.gene) for d in documents for r in d.relations]


def test_halves_hold_similar_relation_counts_and_follow_the_seed():
    from drugprot.dev_halves import split_halves

    docs = _documents(41)
    halves = split_halves(docs, seed=0)
    a, b = halves.a, halves.b
    assert sorted(d.pmid for d in a + b) == sorted(d.pmid for d in docs) and not halves.a_pmids & halves.b_pmids
    assert abs(len(a) - len(b)) <= 1
    assert abs(sum(len(d.relations) for d in a) - sum(len(d.relations) for d in b)) <= 2  # one pair differs by ≤ 2
    assert [d.pmid for d in a] == [d.pmid for d in docs if d.pmid in halves.a_pmids]  # the corpus order is kept
    assert split_halves(docs, seed=0).a_pmids == halves.a_pmids and split_halves(docs, seed=1).a_pmids != halves.a_pmids
    described = halves.describe()
    assert described["seed"] == 0 and described["A"]["documents"] + described["B"]["documents"] == 41


def test_the_kept_checkpoint_is_the_best_on_half_a_even_when_the_whole_set_prefers_another():
    """Evaluation 1 gets all of B and half of A right, evaluation 2 all of A and none of B: the whole set prefers 1,
    half A prefers 2, and 2 is kept. The half-B figures are handed back apart, never in the reported metrics."""
    from drugprot.dev_halves import split_halves
    from drugprot.training import best_evaluation, dev_metrics

    halves = split_halves(_documents(30), seed=0)
    gold_a, gold_b = _gold(halves.a), _gold(halves.b)
    first, first_b = dev_metrics(halves, gold_a[: len(gold_a) // 2] + gold_b)
    second, second_b = dev_metrics(halves, gold_a)
    first["eval"], second["eval"] = 1, 2
    assert first["dev_f1_all"] > second["dev_f1_all"] and second["dev_f1_a"] > first["dev_f1_a"]
    assert best_evaluation([first, second]) is second
    assert best_evaluation([second, first]) is second
    assert best_evaluation([]) is None
    assert (first_b["dev_f1_b"], second_b["dev_f1_b"]) == (1.0, 0.0)
    assert not any(key.endswith("_b") for key in first)  # nothing that listens to evaluations can choose by B
    tie = {**second, "eval": 3}
    assert best_evaluation([second, tie]) is second  # equal on A: the earlier checkpoint stays
