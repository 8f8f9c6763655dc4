"""Candidate pairs: GENE-interval arithmetic (hand-computed and property-based) and entity-safe sentence spans."""

from __future__ import annotations

import blingfire
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drugprot.candidates import (
    DEFAULT_INTERVAL,
    CandidateStats,
    _cover_entities,
    corpus_candidates,
    document_candidates,
    sentence_spans,
)
from drugprot.corpus import Document, Entity, Relation, read_split

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_document(title: str, abstract: str, mentions: list[tuple[str, str, str]], relations=(), pmid="1") -> Document:
    """Document whose entities are ``(id, type, surface)``, each located at the first unused occurrence of surface."""
    doc = Document(pmid, title, abstract)
    text = doc.text
    for eid, etype, surface in mentions:
        start = text.index(surface)
        doc.entities[eid] = Entity(eid, etype, start, start + len(surface), surface)
    doc.relations = [Relation(*r) for r in relations]
    return doc


# One abstract sentence: GENEA GENEB chemx GENEC chemy GENED GENEE; a second sentence with GENEF and chemw.
INTERVAL_DOC = dict(
    title="Interval test.",
    abstract="GENEA GENEB chemx GENEC chemy GENED GENEE bind here. A second sentence with GENEF and chemw.",
    mentions=[("A", "GENE-Y", "GENEA"), ("B", "GENE-N", "GENEB"), ("X", "CHEMICAL", "chemx"),
              ("C", "GENE-Y", "GENEC"), ("Y", "CHEMICAL", "chemy"), ("D", "GENE-Y", "GENED"),
              ("E", "GENE-N", "GENEE"), ("F", "GENE-Y", "GENEF"), ("W", "CHEMICAL", "chemw")],
)
# Hand-computed from the rule at the top of candidates.py: chemx has 2 genes before it, chemy 3; chemw only F (before it).
ALL_INDICES = {
    ("X", "A"): -2, ("X", "B"): -1, ("X", "C"): 0, ("X", "D"): 1, ("X", "E"): 2,
    ("Y", "A"): -3, ("Y", "B"): -2, ("Y", "C"): -1, ("Y", "D"): 0, ("Y", "E"): 1,
    ("W", "F"): -1,
}


def pairs(candidates) -> dict[tuple[str, str], int]:
    return {(c.chemical.id, c.gene.id): c.interval for c in candidates}


def test_hand_built_document_is_two_abstract_sentences():
    doc = make_document(**INTERVAL_DOC)
    spans = sentence_spans(doc)
    inside = {eid: next(i for i, (s, e) in enumerate(spans) if s <= ent.start and ent.end <= e) for eid, ent in doc.entities.items()}
    assert len({inside[k] for k in "ABXCYDE"}) == 1 and inside["F"] == inside["W"] != inside["A"]


@pytest.mark.parametrize(
    "interval, expected",
    [
        (None, set(ALL_INDICES)),
        (DEFAULT_INTERVAL, set(ALL_INDICES)),
        ((-1, 1), {("X", "B"), ("X", "C"), ("X", "D"), ("Y", "C"), ("Y", "D"), ("Y", "E"), ("W", "F")}),
        ((0, 0), {("X", "C"), ("Y", "D")}),
        ((0, 2), {("X", "C"), ("X", "D"), ("X", "E"), ("Y", "D"), ("Y", "E")}),
        ((-3, -2), {("X", "A"), ("Y", "A"), ("Y", "B")}),
        ((-1, 0), {("X", "B"), ("X", "C"), ("Y", "C"), ("Y", "D"), ("W", "F")}),
    ],
)
def test_interval_keeps_exactly_the_allowed_pairs(interval, expected):
    found = pairs(document_candidates(make_document(**INTERVAL_DOC), interval))
    assert set(found) == expected
    assert found == {pair: ALL_INDICES[pair] for pair in expected}


def test_interval_stats_and_labels():
    relations = [("INHIBITOR", "X", "A"), ("ACTIVATOR", "X", "A"), ("AGONIST", "Y", "D"), ("SUBSTRATE", "X", "F")]
    doc = make_document(**INTERVAL_DOC, relations=relations)
    stats = CandidateStats()
    kept = document_candidates(doc, (-1, 1), stats)
    assert stats.pairs == 11 and stats.kept == 7
    assert stats.positives_dropped == 1 and stats.negatives_dropped == 3  # X–A is gold (two types) at index -2
    assert stats.lost_by_interval == 2 and stats.lost_cross_sentence == 1 and stats.lost_overlap == 0  # X–F
    assert stats.gold_relations == 4
    assert stats.interval_histogram == {-3: 1, -2: 2, -1: 3, 0: 2, 1: 2, 2: 1}
    assert +stats.gold_by_interval == {-2: 2, 0: 1}  # X–A (two types) and Y–D, before the filter; X–F has none
    labels = {(c.chemical.id, c.gene.id): c.labels for c in kept}
    assert labels[("Y", "D")] == frozenset({"AGONIST"}) and labels[("X", "C")] == frozenset()
    assert all(c.pmid == "1" for c in kept)


def test_overlapping_mentions_never_pair_but_keep_their_rank():
    # "chemz" is nested in the gene "chemz receptor"; the nested gene still occupies rank 0 of the sentence's genes
    doc = make_document("Nested.", "The chemz receptor binds GENEG and chemv here.",
                        [("R", "GENE-Y", "chemz receptor"), ("Z", "CHEMICAL", "chemz"), ("G", "GENE-N", "GENEG"),
                         ("V", "CHEMICAL", "chemv")],
                        relations=[("AGONIST", "Z", "R"), ("INHIBITOR", "V", "R")])
    stats = CandidateStats()
    found = pairs(document_candidates(doc, None, stats))
    assert found == {("Z", "G"): 1, ("V", "R"): -2, ("V", "G"): -1}
    assert stats.lost_overlap == 1 and stats.lost_cross_sentence == 0


def test_corpus_candidates_accumulates_over_documents(sample_dir):
    corpus = read_split(sample_dir, "development")
    candidates, stats = corpus_candidates(corpus.documents)
    assert stats.kept == len(candidates)
    assert stats.gold_relations == sum(len(d.relations) for d in corpus)
    positives = sum(len(c.labels) for c in candidates)
    assert positives + stats.lost_cross_sentence + stats.lost_overlap + stats.lost_by_interval == stats.gold_relations
    assert {c.pmid for c in candidates} <= {d.pmid for d in corpus}


# ------------------------------------------------------------------------------------------- sentence spans


def assert_spans_cover(spans, entities, length):
    assert all(0 <= s < e <= length for s, e in spans) or spans == [(0, length)]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"overlapping or unsorted spans {spans}"
    for start, end in entities:
        holders = [span for span in spans if span[0] <= start and end <= span[1]]
        assert len(holders) == 1, f"entity {start}-{end} lies in {len(holders)} spans of {spans}"


def test_blingfire_split_inside_an_entity_is_merged():
    title, abstract = "Title.", "The protein (Ca2+. Na+ exchanger) was blocked by amiloride. End."
    doc = make_document(title, abstract, [("G", "GENE-N", "Ca2+. Na+ exchanger"), ("C", "CHEMICAL", "amiloride")],
                        relations=[("INHIBITOR", "C", "G")])
    gene = doc.entities["G"]
    raw = [(int(s), int(e)) for s, e in blingfire.text_to_sentences_and_offsets(doc.text)[1]]
    assert any(gene.start < e < gene.end for _, e in raw), "precondition: blingfire cuts this entity"
    spans = sentence_spans(doc)
    assert_spans_cover(spans, [(e.start, e.end) for e in doc.entities.values()], len(doc.text))
    stats = CandidateStats()
    assert pairs(document_candidates(doc, None, stats)) == {("C", "G"): -1}
    assert stats.lost_cross_sentence == 0
    assert any(s <= len(title) + 1 and e >= gene.end for s, e in spans)  # merged, not dropped
    assert (len(doc.text) - 4, len(doc.text)) in spans  # "End." untouched


def test_an_entity_spanning_three_sentences_merges_them_all():
    doc = make_document("Title.", "One Dr. Two. Three. Four and more text. Last one.",
                        [("G", "GENE-Y", "Dr. Two. Three. Four")])
    spans = sentence_spans(doc)
    assert_spans_cover(spans, [(doc.entities["G"].start, doc.entities["G"].end)], len(doc.text))
    assert spans[-1][1] == len(doc.text)


@st.composite
def spans_and_entities(draw):
    length = draw(st.integers(1, 200))
    cuts = sorted(set(draw(st.lists(st.integers(0, length), max_size=12))))
    bounds = [0, *cuts, length]
    # blingfire-like spans: ordered, non-overlapping, possibly with gaps (dropped whitespace)
    spans = []
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            shrink = draw(st.integers(0, min(2, b - a - 1)))
            spans.append((a + shrink, b))
    entities = []
    for _ in range(draw(st.integers(0, 10))):
        start = draw(st.integers(0, length - 1))
        entities.append((start, draw(st.integers(start + 1, length))))
    return spans, entities, length


@PROPERTY
@given(spans_and_entities())
def test_cover_entities_property(case):
    spans, entities, length = case
    result = _cover_entities(list(spans), entities, length)
    assert_spans_cover(result, entities, length)
    for s, e in spans:  # merging only joins input spans, never cuts one
        assert any(rs <= s and e <= re for rs, re in result)


# -------------------------------------------------------------------------------------- random-layout properties

WORDS = ["alpha", "beta", "x", "Dr.", "end.", "Ca2+.", "(p38)", "IL-2", "and", "e.g.", "kinase.", "The", "It", "Na+"]


@st.composite
def random_documents(draw):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=40))
    title = draw(st.sampled_from(["A title.", "Title", "On x."]))
    doc = Document("7", title, " ".join(words))
    starts, position = [], len(title) + 1
    for word in words:
        starts.append((position, position + len(word)))
        position += len(word) + 1
    for n in range(draw(st.integers(0, 14))):
        first = draw(st.integers(0, len(words) - 1))
        last = draw(st.integers(first, min(len(words) - 1, first + 3)))
        start, end = starts[first][0], starts[last][1]
        etype = draw(st.sampled_from(["CHEMICAL", "GENE-Y", "GENE-N", "GENE"]))
        doc.entities[f"T{n}"] = Entity(f"T{n}", etype, start, end, doc.text[start:end])
    chemicals = [e.id for e in doc.entities.values() if e.type == "CHEMICAL"]
    genes = [e.id for e in doc.entities.values() if e.is_gene]
    if chemicals and genes:
        chosen = draw(st.lists(st.tuples(st.sampled_from(["INHIBITOR", "AGONIST"]), st.sampled_from(chemicals),
                                          st.sampled_from(genes)), max_size=6, unique=True))
        doc.relations = [Relation(*r) for r in chosen]
    return doc


def oracle_index(chemical: Entity, gene: Entity, sentence_genes: list[Entity]) -> int:
    """The docstring's words: first gene to the right is 0, next 1, ...; first to the left -1, next -2, ..."""
    ordered = sorted(sentence_genes, key=lambda g: (g.start, g.end, g.id))
    right = [g for g in ordered if g.start >= chemical.start]
    left = [g for g in ordered if g.start < chemical.start]
    return right.index(gene) if gene in right else -(len(left) - left.index(gene))


@st.composite
def intervals(draw):
    lo = draw(st.integers(-6, 0))
    return lo, draw(st.integers(0, 6))


@PROPERTY
@given(random_documents(), intervals())
def test_random_layouts(doc, interval):
    lo, hi = interval
    spans = sentence_spans(doc)
    assert_spans_cover(spans, [(e.start, e.end) for e in doc.entities.values()], len(doc.text))

    everything_stats, stats = CandidateStats(), CandidateStats()
    everything = document_candidates(doc, None, everything_stats)
    kept = document_candidates(doc, interval, stats)

    assert all(lo <= c.interval <= hi for c in kept)
    assert len(everything) == stats.kept + stats.negatives_dropped + stats.positives_dropped == stats.pairs
    assert stats.kept == len(kept)
    all_pairs = pairs(everything)
    assert pairs(kept) == {p: i for p, i in all_pairs.items() if lo <= i <= hi}  # same index whatever the interval

    gold = {}
    for r in doc.relations:
        gold.setdefault((r.chemical, r.gene), set()).add(r.type)
    for c in everything:
        assert c.chemical.type == "CHEMICAL" and c.gene.is_gene
        assert not (c.chemical.start < c.gene.end and c.gene.start < c.chemical.end), "overlapping mentions paired"
        s, e = c.sentence
        assert s <= c.chemical.start and c.chemical.end <= e and s <= c.gene.start and c.gene.end <= e
        sentence_genes = [g for g in doc.entities.values() if g.is_gene and s <= g.start and g.end <= e]
        assert c.interval == oracle_index(c.chemical, c.gene, sentence_genes)
        assert c.labels == frozenset(gold.get((c.chemical.id, c.gene.id), ()))

    # every same-sentence, non-overlapping CHEMICAL x GENE pair is a candidate, and nothing else
    expected = set()
    for chem in (x for x in doc.entities.values() if x.type == "CHEMICAL"):
        for gene in (x for x in doc.entities.values() if x.is_gene):
            same = any(s <= min(chem.start, gene.start) and max(chem.end, gene.end) <= e for s, e in spans)
            if same and not (chem.start < gene.end and gene.start < chem.end):
                expected.add((chem.id, gene.id))
    assert set(all_pairs) == expected

    # gold relations are conserved: each is a kept positive or lost for exactly one reason
    positives = sum(len(c.labels) for c in kept)
    assert positives + stats.lost_by_interval + stats.lost_cross_sentence + stats.lost_overlap == len(doc.relations)
    assert everything_stats.lost_by_interval == 0


@PROPERTY
@given(random_documents(), intervals(), st.integers(0, 3), st.integers(0, 3))
def test_widening_the_interval_never_removes_pairs(doc, interval, widen_left, widen_right):
    lo, hi = interval
    narrow = set(pairs(document_candidates(doc, (lo, hi))))
    wide = set(pairs(document_candidates(doc, (lo - widen_left, hi + widen_right))))
    assert narrow <= wide
