"""Corpus and candidate statistics behind ``drugprot data stats``: counts as released, recall ceilings, timing."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from drugprot.candidates import DEFAULT_INTERVAL, corpus_candidates
from drugprot.corpus import RELATION_TYPES, read_split


def split_statistics(data_dir: Path, split: str, interval: tuple[int, int] = DEFAULT_INTERVAL, *, strict: bool = False) -> dict:
    """Read, validate, segment and pair one split; every count a user checks against the published tables."""
    started = time.perf_counter()
    corpus = read_split(data_dir, split, strict=strict)
    read_seconds = time.perf_counter() - started
    candidates, cstats = corpus_candidates(corpus.documents, interval)
    total_seconds = time.perf_counter() - started

    entity_types: Counter = Counter()
    by_type: dict[str, Counter] = {t: Counter() for t in RELATION_TYPES}
    pair_types: Counter = Counter()
    for doc in corpus:
        entity_types.update(e.type for e in doc.entities.values())
        for relation in [*doc.relations, *doc.duplicate_relations]:
            by_type[relation.type][doc.entities[relation.gene].type] += 1
        pair_types.update((r.chemical, r.gene, doc.pmid) for r in doc.relations)
    relation_lines = sum(len(d.relations) + len(d.duplicate_relations) for d in corpus)
    unique = sum(len(d.relations) for d in corpus)
    gold = cstats.gold_relations or 1
    return {
        "split": split,
        "documents": len(corpus),
        "entities": dict(sorted(entity_types.items())),
        "relation_lines": relation_lines,
        "unique_relations": unique,
        "duplicate_relation_lines": relation_lines - unique,
        "relations_by_type": {t: dict(sorted(c.items())) for t, c in by_type.items() if c},
        "related_pairs": len(pair_types),
        "multi_label_pairs": sum(1 for n in pair_types.values() if n > 1),
        "documents_with_relations": sum(1 for d in corpus if d.relations),
        "candidates": {
            "interval": list(interval),
            "pairs_in_sentences": cstats.pairs,
            "kept": cstats.kept,
            "positives_kept": sum(1 for c in candidates if c.labels),
            "negatives_dropped": cstats.negatives_dropped,
            "gold_lost_cross_sentence": cstats.lost_cross_sentence,
            "gold_lost_cross_sentence_pct": 100 * cstats.lost_cross_sentence / gold,
            "gold_lost_overlapping_mentions": cstats.lost_overlap,
            "gold_lost_overlapping_mentions_pct": 100 * cstats.lost_overlap / gold,
            "gold_lost_by_interval": cstats.lost_by_interval,
            "gold_lost_by_interval_pct": 100 * cstats.lost_by_interval / gold,
            "gold_by_interval": {str(k): v for k, v in sorted(cstats.gold_by_interval.items()) if v},
        },
        "seconds": {"read_validate": round(read_seconds, 3), "total": round(total_seconds, 3)},
        "warnings": len(corpus.warnings),
    }


def format_statistics(stats: dict) -> str:
    lines = [f"split {stats['split']}: {stats['documents']} documents, "
             f"{sum(stats['entities'].values())} entities ({', '.join(f'{k} {v}' for k, v in stats['entities'].items())})",
             f"relations: {stats['relation_lines']} lines, {stats['unique_relations']} unique "
             f"({stats['duplicate_relation_lines']} exact duplicate lines), {stats['related_pairs']} related pairs, "
             f"{stats['multi_label_pairs']} multi-label", ""]
    gene_types = sorted({g for counts in stats["relations_by_type"].values() for g in counts})
    lines.append(f"{'type':<24}" + "".join(f"{g:>9}" for g in gene_types) + f"{'total':>9}")
    for rtype, counts in stats["relations_by_type"].items():
        lines.append(f"{rtype:<24}" + "".join(f"{counts.get(g, 0):>9}" for g in gene_types) + f"{sum(counts.values()):>9}")
    c = stats["candidates"]
    lines += ["", f"candidates (GENE interval {c['interval']}): {c['pairs_in_sentences']} same-sentence pairs, "
              f"{c['kept']} kept ({c['positives_kept']} positive), {c['negatives_dropped']} negatives dropped",
              f"gold relations lost: {c['gold_lost_cross_sentence']} across sentences "
              f"({c['gold_lost_cross_sentence_pct']:.2f}%), {c['gold_lost_overlapping_mentions']} between overlapping mentions "
              f"({c['gold_lost_overlapping_mentions_pct']:.2f}%), {c['gold_lost_by_interval']} by the interval "
              f"({c['gold_lost_by_interval_pct']:.2f}%)",
              "gold relations by GENE interval index: "
              + ", ".join(f"{k}: {v}" for k, v in c["gold_by_interval"].items()),
              f"time: read+validate {stats['seconds']['read_validate']:.2f} s, total (read, validate, split, pair) "
              f"{stats['seconds']['total']:.2f} s"]
    return "\n".join(lines)
