"""The demo's yardstick: the majority rule it prints next to the champion."""

from __future__ import annotations

from collections import Counter

from drugprot.candidates import corpus_candidates
from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split
from drugprot.demo import majority_baseline


def test_majority_baseline_labels_every_candidate_with_the_commonest_training_type():
    training = read_split(SAMPLE_DIR, "training").documents
    counts = Counter(r.type for d in training for r in d.relations)
    development = read_split(SAMPLE_DIR, "development").documents
    candidates, _ = corpus_candidates(development)
    commonest, f1 = majority_baseline()
    assert counts[commonest] == max(counts.values())
    # every candidate is predicted once with that type: precision = hits / candidates, recall = hits / gold relations
    pairs = {(c.pmid, c.chemical.id, c.gene.id) for c in candidates}
    hits = sum((d.pmid, r.chemical, r.gene) in pairs for d in development for r in d.relations if r.type == commonest)
    gold = sum(len(d.relations) for d in development)
    precision, recall = hits / len(candidates), hits / gold
    assert hits > 0 and abs(f1 - 2 * precision * recall / (precision + recall)) < 1e-9
