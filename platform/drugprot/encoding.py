"""Typed entity markers, tokenization once per corpus, windows that keep both entities, token-budget batches and
optimizer steps of a fixed number of pairs.

Each sentence is cut at the boundaries of every entity of its document that lies in it and each piece is
tokenized once (a batched call on the fast tokenizer); a pair's input is then assembled from cached pieces with the
four marker tokens inserted at its two entities, so no text is re-tokenized per pair or per step. Cutting at every
entity, not only at those of the candidates being encoded, makes a pair's token ids independent of which other
pairs share the call (a boundary inside a word changes how the word is split): the server may then score a large
request in several model calls, and a request's GENE interval changes no other pair's ids. When the marked sentence is longer than
``max_length``, the window slides to keep both entities whole; a pair whose entities alone do not fit is dropped
and counted (never silently pointed at [CLS]).
"""

from __future__ import annotations

import random
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from drugprot.candidates import LABELS, NONE_LABEL, Candidate  # noqa: F401  (LABELS re-exported)
from drugprot.corpus import CHEMICAL, RELATION_TYPES, Document

LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}
ENTITY_CLASSES = (CHEMICAL, "GENE-Y", "GENE-N")  # targets of the multitask entity-type head; GENE is unknown
IGNORE_INDEX = -100
SENTENCE_CACHE = 1024  # tokenized sentences each PairEncoder keeps


def marker_tokens(entity_type: str, role: str) -> tuple[str, str]:
    return f"[{role}:{entity_type}]", f"[/{role}:{entity_type}]"


MARKERS = tuple(t for etype in (CHEMICAL,) for t in marker_tokens(etype, "S")) + tuple(
    t for etype in ("GENE", "GENE-Y", "GENE-N") for t in marker_tokens(etype, "O")
)


def gene_marker_type(gene_type: str, scheme: str) -> str:
    """Coarse markers say GENE; fine markers say GENE-Y/GENE-N where the type is known (gold or predicted)."""
    return gene_type if scheme == "fine" and gene_type in ("GENE-Y", "GENE-N") else "GENE"


#: What a pair is encoded in: its sentence (the paper), or as much of its abstract as fits, centred on the pair.
CONTEXTS = ("sentence", "abstract")


@dataclass(frozen=True, slots=True)
class EncodedPair:
    input_ids: tuple[int, ...]
    subject: int  # position of [S:CHEMICAL]
    object: int  # position of [O:GENE…]
    target: tuple[float, ...]  # distribution over LABELS (multi-label pairs share the mass equally)
    entity_types: tuple[int, int]  # ENTITY_CLASSES indices or IGNORE_INDEX
    index: int  # position of the candidate in the list given to encode_candidates


@dataclass(slots=True)
class EncodingStats:
    pairs: int = 0
    too_long: int = 0  # pairs whose two entities do not fit in max_length together
    windowed: int = 0  # pairs whose sentence was cut to a window around them
    dropped_indices: list[int] = field(default_factory=list)


class PairEncoder:
    """Turns candidates into marked token ids; holds the tokenizer and the marker ids."""

    def __init__(self, tokenizer, *, max_length: int = 256, markers: str = "coarse", context: str = "sentence"):
        vocabulary = tokenizer.get_vocab()  # builds a dict of the whole vocabulary: once, not per marker
        missing = [m for m in MARKERS if m not in vocabulary]
        if missing:
            raise ValueError(f"tokenizer lacks marker tokens {missing}: call add_marker_tokens first")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.scheme = markers
        if context not in CONTEXTS:
            raise ValueError(f"encoding.context: {context!r} is not one of {', '.join(CONTEXTS)}")
        self.context = context
        self.marker_ids = {m: tokenizer.convert_tokens_to_ids(m) for m in MARKERS}
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        # (sentence text, cuts relative to its start) -> (ids, relative char offset -> token position), the most
        # recent SENTENCE_CACHE sentences: a big request scored in chunks tokenizes its sentences once, not per chunk
        self._sentences: dict[tuple[str, tuple[int, ...]], tuple[list[int], dict[int, int]]] = {}
        self._sentences_lock = threading.Lock()

    def encode(self, documents: Sequence[Document], candidates: Sequence[Candidate]) -> tuple[list[EncodedPair], EncodingStats]:
        """Encode candidates (any order, any documents among ``documents``); tokenizes each text piece once, and a
        sentence cut the same way as one of the recent calls' not at all."""
        by_pmid = {d.pmid: d for d in documents}
        boundaries: dict[str, list[int]] = {}  # each document's entity offsets, sorted
        pieces_by_sentence: dict[tuple[str, int, int], list[int]] = {}
        for cand in candidates:
            key = (cand.pmid, *self._span(cand, by_pmid))
            if key not in pieces_by_sentence:  # every entity of the document, whichever candidates are in this call
                if cand.pmid not in boundaries:
                    entities = by_pmid[cand.pmid].entities.values()
                    boundaries[cand.pmid] = sorted(c for e in entities for c in (e.start, e.end))
                offsets = boundaries[cand.pmid]
                start, end = cand.sentence
                pieces_by_sentence[key] = offsets[bisect_right(offsets, start):bisect_left(offsets, end)]
            # a candidate's own entities are the document's; cutting at them as well keeps a stray one encodable
            pieces_by_sentence[key].extend((cand.chemical.start, cand.chemical.end, cand.gene.start, cand.gene.end))
        cache: dict[tuple[str, int, int], tuple[list[int], dict[int, int]]] = {}
        missing: dict[tuple[str, tuple[int, ...]], list[tuple[str, int, int]]] = {}
        for (pmid, start, end), cuts in pieces_by_sentence.items():
            relative = sorted({0, end - start, *(c - start for c in cuts if start < c < end)})
            shape = (by_pmid[pmid].text[start:end], tuple(relative))
            with self._sentences_lock:
                known = self._sentences.get(shape)
            if known is None:
                missing.setdefault(shape, []).append((pmid, start, end))
            else:
                cache[(pmid, start, end)] = _placed(known, start)
        if missing:
            piece_texts = [sentence[a:b] for sentence, bounds in missing for a, b in zip(bounds, bounds[1:])]
            piece_ids = iter(self.tokenizer(piece_texts, add_special_tokens=False)["input_ids"])
            with self._sentences_lock:
                for shape, keys in missing.items():
                    ids: list[int] = []
                    at: dict[int, int] = {0: 0}  # char offset in the sentence -> token position
                    for b in shape[1][1:]:
                        ids.extend(next(piece_ids))
                        at[b] = len(ids)
                    self._sentences[shape] = (ids, at)
                    for key in keys:
                        cache[key] = _placed((ids, at), key[1])
                while len(self._sentences) > SENTENCE_CACHE:
                    del self._sentences[next(iter(self._sentences))]

        stats = EncodingStats()
        encoded: list[EncodedPair] = []
        for index, cand in enumerate(candidates):
            stats.pairs += 1
            ids, at = cache[(cand.pmid, *self._span(cand, by_pmid))]
            pair = self._assemble(ids, at, cand, index, stats)
            if pair is None:
                stats.too_long += 1
                stats.dropped_indices.append(index)
            else:
                encoded.append(pair)
        return encoded, stats

    def _span(self, cand: Candidate, by_pmid: dict[str, Document]) -> tuple[int, int]:
        """The text a pair is encoded in: its sentence, or the whole abstract (windowed around the pair later)."""
        return cand.sentence if self.context == "sentence" else (0, len(by_pmid[cand.pmid].text))

    def _assemble(self, ids: list[int], at: dict[int, int], cand: Candidate, index: int, stats: EncodingStats) -> EncodedPair | None:
        chem, gene = cand.chemical, cand.gene
        gene_kind = gene_marker_type(gene.type, self.scheme)
        s_open, s_close = (self.marker_ids[m] for m in marker_tokens(CHEMICAL, "S"))
        o_open, o_close = (self.marker_ids[m] for m in marker_tokens(gene_kind, "O"))
        # Candidates never overlap, so one entity ends (in characters, hence in tokens) before the other starts.
        # Build "… [A] a [/A] … [B] b [/B] …" explicitly: sorting the four inserts by position alone would put
        # [B] before [/A] when the entities touch ("X-Y" with X ending where Y starts).
        spans = sorted([(chem.start, at[chem.start], at[chem.end], s_open, s_close),
                        (gene.start, at[gene.start], at[gene.end], o_open, o_close)])
        (_, a1, b1, open1, close1), (_, a2, b2, open2, close2) = spans
        marked = [*ids[:a1], open1, *ids[a1:b1], close1, *ids[b1:a2], open2, *ids[a2:b2], close2, *ids[b2:]]
        first, last = a1, b2 + 3  # positions of the first open marker and of the last close marker
        subject, obj = (a1, a2 + 2) if open1 == s_open else (a2 + 2, a1)
        budget = self.max_length - 2
        if len(marked) > budget:
            span = last - first + 1
            if span > budget:
                return None
            spare = budget - span
            left = max(0, first - spare // 2)
            left = min(left, len(marked) - budget)
            marked = marked[left:left + budget]
            subject -= left
            obj -= left
            stats.windowed += 1
        target = [0.0] * len(LABELS)
        if cand.labels:
            for label in cand.labels:
                target[LABEL_INDEX[label]] = 1.0 / len(cand.labels)
        else:
            target[0] = 1.0
        gene_class = ENTITY_CLASSES.index(gene.type) if gene.type in ENTITY_CLASSES else IGNORE_INDEX
        return EncodedPair(tuple([self.cls_id, *marked, self.sep_id]), subject + 1, obj + 1, tuple(target),
                           (0, gene_class), index)


def _placed(tokenized: tuple[list[int], dict[int, int]], start: int) -> tuple[list[int], dict[int, int]]:
    """A cached sentence's ids, with its char offsets moved to where the sentence starts in its document."""
    ids, at = tokenized
    return ids, {start + offset: position for offset, position in at.items()}


def add_marker_tokens(tokenizer) -> int:
    """Register the marker tokens as special tokens (kept whole); returns how many were new."""
    return tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)}, replace_extra_special_tokens=False)


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    subject: torch.Tensor  # (B,) long
    object: torch.Tensor  # (B,) long
    target: torch.Tensor  # (B, len(LABELS)) float
    entity_types: torch.Tensor  # (B, 2) long
    index: torch.Tensor  # (B,) long, positions in the candidate list

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(*(getattr(self, f).to(device, non_blocking=non_blocking) for f in self.__slots__))

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> Batch:
    width = max(len(p.input_ids) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, pair in enumerate(pairs):
        ids[row, : len(pair.input_ids)] = torch.tensor(pair.input_ids)
        mask[row, : len(pair.input_ids)] = 1
    return Batch(
        ids, mask,
        torch.tensor([p.subject for p in pairs]), torch.tensor([p.object for p in pairs]),
        torch.tensor([p.target for p in pairs], dtype=torch.float32),
        torch.tensor([p.entity_types for p in pairs]), torch.tensor([p.index for p in pairs]),
    )


def token_budget_batches(pairs: Sequence[EncodedPair], *, token_budget: int, max_pairs: int,
                         shuffle_seed: int | None = None) -> list[list[int]]:
    """Group pair indices into length-bucketed batches of at most ``token_budget`` padded tokens.

    Sorting by length keeps padding small; with ``shuffle_seed`` the pairs are shuffled within equal lengths and
    the batch order is shuffled, both from that seed alone (so a resumed run sees the same order).
    """
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    batches = _within_budget(pairs, _by_length(pairs, rng), token_budget=token_budget, max_pairs=max_pairs)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def step_batches(pairs: Sequence[EncodedPair], *, batch_pairs: int, token_budget: int, max_pairs: int,
                 shuffle_seed: int | None = None) -> list[list[list[int]]]:
    """Optimizer steps of ``batch_pairs`` pairs (the last one of an epoch may have fewer), each cut into micro-batches
    of at most ``token_budget`` padded tokens and ``max_pairs`` pairs: ceil(len(pairs) / batch_pairs) steps, whatever
    the budget, which only bounds the memory one forward pass takes.

    Length-bucketed and seeded as :func:`token_budget_batches`: a step holds pairs of similar length (little padding)
    and the step order is shuffled from ``shuffle_seed`` alone.
    """
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    order = _by_length(pairs, rng)
    steps = [order[start:start + batch_pairs] for start in range(0, len(order), batch_pairs)]
    if rng is not None:
        rng.shuffle(steps)
    return [_within_budget(pairs, step, token_budget=token_budget, max_pairs=max_pairs) for step in steps]


def _by_length(pairs: Sequence[EncodedPair], rng: random.Random | None) -> list[int]:
    """Pair indices sorted by length; shuffled first (so in random order within equal lengths) when ``rng`` is given."""
    order = list(range(len(pairs)))
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: len(pairs[i].input_ids))
    return order


def _within_budget(pairs: Sequence[EncodedPair], order: list[int], *, token_budget: int, max_pairs: int) -> list[list[int]]:
    """Cut ``order`` (indices sorted by length) into consecutive groups within the padded-token and pair limits."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        length = len(pairs[i].input_ids)
        if current and (max(width, length) * (len(current) + 1) > token_budget or len(current) >= max_pairs):
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, length)
    if current:
        batches.append(current)
    return batches


def iterate_batches(pairs: Sequence[EncodedPair], batches: Iterable[list[int]], pad_id: int) -> Iterable[Batch]:
    for members in batches:
        yield collate([pairs[i] for i in members], pad_id)
