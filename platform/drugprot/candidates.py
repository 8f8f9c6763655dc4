"""Candidate CHEMICAL × GENE pairs: sentence segmentation, the GENE interval filter, and recall-ceiling counts.

The GENE interval of a pair: order the sentence's GENE mentions by start offset and let ``p`` be the number of
them that start before the chemical; the gene ranked ``i`` (0-based) has interval index ``i - p``. The first gene
to the right of the chemical is 0, the first to the left is -1, and so on outwards. Pairs whose index falls
outside ``[lo, hi]`` are dropped in training (negative sampling) and never predicted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import blingfire

from drugprot.corpus import CHEMICAL, RELATION_TYPES, Document, Entity

NONE_LABEL = "NONE"
LABELS = (NONE_LABEL, *RELATION_TYPES)  # a classifier's outputs, NONE first
DEFAULT_INTERVAL = (-10, 16)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One CHEMICAL–GENE pair inside one sentence; ``labels`` are its gold types (empty for a negative)."""

    pmid: str
    chemical: Entity
    gene: Entity
    sentence: tuple[int, int]
    interval: int
    labels: frozenset[str] = frozenset()


def sentence_spans(document: Document) -> list[tuple[int, int]]:
    """Sentence (start, end) offsets in ``document.text``; sentences that would cut an entity are merged."""
    text = document.text
    _, offsets = blingfire.text_to_sentences_and_offsets(text)
    spans = [(int(s), int(e)) for s, e in offsets]
    return _cover_entities(spans, [(e.start, e.end) for e in document.entities.values()], len(text))


def _cover_entities(spans: list[tuple[int, int]], entities: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Merge neighbouring spans until every entity lies inside one span (and every entity in some span)."""
    if not spans:
        return [(0, length)]
    changed = True
    while changed:
        changed = False
        starts = [s for s, _ in spans]
        for begin, finish in entities:
            i = max(0, bisect_left(starts, begin + 1) - 1)
            if spans[i][1] >= finish and spans[i][0] <= begin:
                continue
            j = i
            while j + 1 < len(spans) and spans[j][1] < finish:
                j += 1
            k = i
            while k > 0 and spans[k][0] > begin:
                k -= 1
            spans[k:j + 1] = [(min(spans[k][0], begin), max(spans[j][1], finish))]
            changed = True
            break
    return spans


def _overlap(a: Entity, b: Entity) -> bool:
    return a.start < b.end and b.start < a.end


@dataclass(slots=True)
class CandidateStats:
    pairs: int = 0
    kept: int = 0
    negatives_dropped: int = 0
    positives_dropped: int = 0  # gold pairs outside the interval
    gold_relations: int = 0
    lost_cross_sentence: int = 0  # gold relations whose arguments lie in different sentences
    lost_overlap: int = 0  # gold relations between overlapping (nested) mentions, which get no candidate
    lost_by_interval: int = 0
    interval_histogram: Counter = field(default_factory=Counter)
    gold_by_interval: Counter = field(default_factory=Counter)  # gold relations by interval index, before the filter


def document_candidates(
    document: Document, interval: tuple[int, int] | None = DEFAULT_INTERVAL, stats: CandidateStats | None = None
) -> list[Candidate]:
    """All same-sentence, non-overlapping CHEMICAL×GENE pairs inside ``interval`` (``None`` keeps all)."""
    gold: dict[tuple[str, str], set[str]] = {}
    for relation in document.relations:
        gold.setdefault((relation.chemical, relation.gene), set()).add(relation.type)
    stats = stats if stats is not None else CandidateStats()
    stats.gold_relations += len(document.relations)
    spans = sentence_spans(document)
    starts = [s for s, _ in spans]
    by_sentence: dict[int, list[Entity]] = {}
    for entity in sorted(document.entities.values(), key=lambda e: (e.start, e.end, e.id)):
        by_sentence.setdefault(bisect_left(starts, entity.start + 1) - 1, []).append(entity)

    result: list[Candidate] = []
    seen_pairs: set[tuple[str, str]] = set()
    overlapping: set[tuple[str, str]] = set()
    for index, members in by_sentence.items():
        genes = [e for e in members if e.is_gene]
        gene_starts = [g.start for g in genes]
        for chemical in (e for e in members if e.type == CHEMICAL):
            before = bisect_left(gene_starts, chemical.start)
            for rank, gene in enumerate(genes):
                if _overlap(chemical, gene):
                    overlapping.add((chemical.id, gene.id))
                    continue
                labels = frozenset(gold.get((chemical.id, gene.id), ()))
                seen_pairs.add((chemical.id, gene.id))
                position = rank - before
                stats.pairs += 1
                stats.interval_histogram[position] += 1
                stats.gold_by_interval[position] += len(labels)
                if interval is not None and not interval[0] <= position <= interval[1]:
                    if labels:
                        stats.positives_dropped += 1
                        stats.lost_by_interval += len(labels)
                    else:
                        stats.negatives_dropped += 1
                    continue
                stats.kept += 1
                result.append(Candidate(document.pmid, chemical, gene, spans[index], position, labels))
    for pair, types in gold.items():
        if pair in overlapping:
            stats.lost_overlap += len(types)
        elif pair not in seen_pairs:
            stats.lost_cross_sentence += len(types)
    return result


def corpus_candidates(
    documents: Iterable[Document], interval: tuple[int, int] | None = DEFAULT_INTERVAL
) -> tuple[list[Candidate], CandidateStats]:
    stats = CandidateStats()
    pairs: list[Candidate] = []
    for document in documents:
        pairs.extend(document_candidates(document, interval, stats))
    return pairs, stats
