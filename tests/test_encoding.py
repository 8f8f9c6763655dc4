"""Marker encoding: single-token markers, marker positions, fine gene markers, windows, dropped pairs, batching."""

from __future__ import annotations

import math
import random

import pytest
import torch

from drugprot.candidates import document_candidates
from drugprot.corpus import Document, Entity, Relation
from drugprot.encoding import (
    LABEL_INDEX,
    LABELS,
    MARKERS,
    EncodedPair,
    PairEncoder,
    add_marker_tokens,
    collate,
    marker_tokens,
    step_batches,
    token_budget_batches,
)
from drugprot.model.encoder import load_tokenizer

FILLER = "alpha"  # one word piece in MiniLM's vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer("tiny-random")
    add_marker_tokens(tok)
    return tok


def make_document(text: str, mentions: list[tuple[str, str, str]], relations=(), pmid="1") -> Document:
    """One-sentence title ``text`` (empty abstract); mentions ``(id, type, surface)`` at the first free occurrence."""
    doc = Document(pmid, text, "")
    taken: set[int] = set()
    for eid, etype, surface in mentions:
        start = text.index(surface)
        while start in taken:
            start = text.index(surface, start + 1)
        taken.add(start)
        doc.entities[eid] = Entity(eid, etype, start, start + len(surface), surface)
    doc.relations = [Relation(*r) for r in relations]
    return doc


def ids_of(tokenizer, *names: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def entity_between(pair: EncodedPair, open_at: int, close_id: int) -> list[int]:
    """Token ids between the marker at ``open_at`` and the next ``close_id``."""
    ids = list(pair.input_ids)
    return ids[open_at + 1: ids.index(close_id, open_at)]


def encode_one(tokenizer, doc: Document, **options):
    encoder = PairEncoder(tokenizer, **options)
    candidates = document_candidates(doc, None)
    return encoder, candidates, *encoder.encode([doc], candidates)


# --- markers --------------------------------------------------------------------------------------------------

def test_every_marker_is_one_token(tokenizer):
    for marker in MARKERS:
        assert tokenizer.tokenize(f"the {marker} gene") == ["the", marker, "gene"], marker
        ids = tokenizer(f"x {marker} y", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(marker) in ids and len(ids) == 3


def test_encoder_refuses_a_tokenizer_without_markers():
    with pytest.raises(ValueError, match=r"lacks marker tokens .*add_marker_tokens"):
        PairEncoder(load_tokenizer("tiny-random"))


def test_subject_and_object_point_at_their_markers(tokenizer):
    doc = make_document("Aspirin strongly inhibits cyclooxygenase in platelets.",
                        [("T1", "CHEMICAL", "Aspirin"), ("T2", "GENE-Y", "cyclooxygenase")],
                        [("INHIBITOR", "T1", "T2")])
    _, candidates, pairs, stats = encode_one(tokenizer, doc, max_length=64, markers="coarse")
    assert stats.pairs == 1 and stats.too_long == 0 and stats.windowed == 0
    (pair,) = pairs
    s_open, s_close, o_open, o_close = ids_of(tokenizer, "[S:CHEMICAL]", "[/S:CHEMICAL]", "[O:GENE]", "[/O:GENE]")
    assert pair.input_ids[0] == tokenizer.cls_token_id and pair.input_ids[-1] == tokenizer.sep_token_id
    assert pair.input_ids[pair.subject] == s_open
    assert pair.input_ids[pair.object] == o_open
    assert tokenizer.decode(entity_between(pair, pair.subject, s_close)) == "aspirin"
    assert tokenizer.decode(entity_between(pair, pair.object, o_close)) == "cyclooxygenase"
    assert pair.target[LABEL_INDEX["INHIBITOR"]] == 1.0 and sum(pair.target) == 1.0
    assert pair.entity_types == (0, 1)  # CHEMICAL, GENE-Y
    batch = collate(pairs, tokenizer.pad_token_id)
    assert batch.input_ids[0, batch.subject[0]] == s_open and batch.input_ids[0, batch.object[0]] == o_open


def test_gene_before_chemical(tokenizer):
    doc = make_document("EGFR is blocked by gefitinib.", [("T1", "GENE-N", "EGFR"), ("T2", "CHEMICAL", "gefitinib")])
    _, _, (pair,), _ = encode_one(tokenizer, doc, max_length=64, markers="fine")
    s_open, o_open = ids_of(tokenizer, "[S:CHEMICAL]", "[O:GENE-N]")
    assert pair.object < pair.subject
    assert pair.input_ids[pair.subject] == s_open and pair.input_ids[pair.object] == o_open
    assert pair.object == 1  # right after [CLS]


def test_touching_entities_keep_their_markers_nested(tokenizer):
    """A chemical ending exactly where the gene starts: [S] chem [/S] [O] gene [/O], never [S] chem [O] [/S] …"""
    doc = make_document("The aspirinCOX adduct forms.", [("T1", "CHEMICAL", "aspirin"), ("T2", "GENE", "COX")])
    assert doc.entities["T1"].end == doc.entities["T2"].start
    _, _, (pair,), _ = encode_one(tokenizer, doc, max_length=64, markers="coarse")
    s_open, s_close, o_open, o_close = ids_of(tokenizer, "[S:CHEMICAL]", "[/S:CHEMICAL]", "[O:GENE]", "[/O:GENE]")
    ids = list(pair.input_ids)
    assert [t for t in ids if t in (s_open, s_close, o_open, o_close)] == [s_open, s_close, o_open, o_close]
    assert ids[pair.subject] == s_open and ids[pair.object] == o_open


def test_a_pairs_ids_do_not_depend_on_the_other_candidates_in_the_call(tokenizer):
    """"TNF" ends inside the word "TNFalpha": its boundary must cut that word for the IL6 pair too, whether or not
    the TNF pair is encoded in the same call (the server scores a large request in several calls)."""
    doc = make_document("Ethanol alters TNFalpha and IL6 levels.",
                        [("T1", "CHEMICAL", "Ethanol"), ("T2", "GENE", "TNF"), ("T3", "GENE", "IL6")])
    whole, split = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("TNFalpha", "TNF"))
    assert whole[:len(split)] != split  # cut or not, the word's ids differ: the old per-call cuts would fail here
    encoder = PairEncoder(tokenizer, max_length=64)
    candidates = document_candidates(doc, None)
    (il6,) = [c for c in candidates if c.gene.id == "T3"]
    together, _ = encoder.encode([doc], candidates)
    (alone,), _ = encoder.encode([doc], [il6])
    (with_all,) = [p for p in together if candidates[p.index] == il6]
    assert alone.input_ids == with_all.input_ids and (alone.subject, alone.object) == (with_all.subject, with_all.object)


def test_a_sentence_tokenized_once_serves_later_calls(tokenizer):
    """Chunks of one request come in separate calls: the second call tokenizes nothing and gives the same ids."""
    doc = make_document("Ethanol alters TNFalpha and IL6 levels.",
                        [("T1", "CHEMICAL", "Ethanol"), ("T2", "GENE", "TNF"), ("T3", "GENE", "IL6")])
    encoder = PairEncoder(tokenizer, max_length=64)
    tokenized: list[list[str]] = []

    def counting(texts, **options):
        tokenized.append(texts)
        return tokenizer(texts, **options)

    encoder.tokenizer = counting
    first, second = document_candidates(doc, None)
    (one,), _ = encoder.encode([doc], [first])
    moved = Document("2", "Before. " + doc.title, "",  # the same sentence elsewhere in another document
                     {k: Entity(e.id, e.type, e.start + 8, e.end + 8, e.text) for k, e in doc.entities.items()})
    (again,), _ = encoder.encode([moved], [c for c in document_candidates(moved, None) if c.gene.id == first.gene.id])
    (two,), _ = encoder.encode([doc], [second])
    assert len(tokenized) == 1 and one.input_ids == again.input_ids and two.input_ids != one.input_ids


@pytest.mark.parametrize("scheme, expected", [
    ("fine", {"T2": "[O:GENE-Y]", "T3": "[O:GENE-N]", "T4": "[O:GENE]"}),
    ("coarse", {"T2": "[O:GENE]", "T3": "[O:GENE]", "T4": "[O:GENE]"}),
])
def test_gene_marker_schemes(tokenizer, scheme, expected):
    doc = make_document("Caffeine binds ADORA2A and CYP1A2 and MAOB here.",
                        [("T1", "CHEMICAL", "Caffeine"), ("T2", "GENE-Y", "ADORA2A"), ("T3", "GENE-N", "CYP1A2"),
                         ("T4", "GENE", "MAOB")])
    _, candidates, pairs, _ = encode_one(tokenizer, doc, max_length=64, markers=scheme)
    assert len(pairs) == 3
    for pair in pairs:
        gene_id = candidates[pair.index].gene.id
        open_marker = expected[gene_id]
        assert pair.input_ids[pair.object] == tokenizer.convert_tokens_to_ids(open_marker)
        close_marker = marker_tokens(open_marker[3:-1], "O")[1]
        assert tokenizer.convert_tokens_to_ids(close_marker) in pair.input_ids
        # exactly one gene open marker, exactly one chemical open marker
        opens = [t for t in pair.input_ids if t in ids_of(tokenizer, "[O:GENE]", "[O:GENE-Y]", "[O:GENE-N]")]
        assert len(opens) == 1


# --- windows --------------------------------------------------------------------------------------------------

def long_document(n_words: int, chem_at: int, gene_at: int, gene_type: str = "GENE-Y") -> Document:
    words = [FILLER] * n_words
    words[chem_at] = "ibuprofen"
    words[gene_at] = "PTGS2"
    text = " ".join(words) + "."
    return make_document(text, [("T1", "CHEMICAL", "ibuprofen"), ("T2", gene_type, "PTGS2")])


@pytest.mark.parametrize("chem_at, gene_at", [(3, 20), (150, 170), (280, 295), (295, 270), (100, 60)])
def test_long_sentence_is_windowed_around_both_entities(tokenizer, chem_at, gene_at):
    doc = long_document(300, chem_at, gene_at)
    _, _, pairs, stats = encode_one(tokenizer, doc, max_length=64, markers="fine")
    assert stats.windowed == 1 and stats.too_long == 0
    (pair,) = pairs
    assert len(pair.input_ids) == 64
    assert pair.input_ids[0] == tokenizer.cls_token_id and pair.input_ids[-1] == tokenizer.sep_token_id
    s_open, s_close, o_open, o_close = ids_of(tokenizer, "[S:CHEMICAL]", "[/S:CHEMICAL]", "[O:GENE-Y]", "[/O:GENE-Y]")
    ids = list(pair.input_ids)
    for marker in (s_open, s_close, o_open, o_close):
        assert ids.count(marker) == 1
    assert ids[pair.subject] == s_open and ids[pair.object] == o_open
    assert entity_between(pair, pair.subject, s_close) == tokenizer("ibuprofen", add_special_tokens=False)["input_ids"]
    assert entity_between(pair, pair.object, o_close) == tokenizer("PTGS2", add_special_tokens=False)["input_ids"]


def test_pair_whose_entities_do_not_fit_is_dropped_and_counted(tokenizer):
    doc = long_document(300, 2, 250)
    short = make_document("Ibuprofen inhibits PTGS2.", [("T1", "CHEMICAL", "Ibuprofen"), ("T2", "GENE-Y", "PTGS2")],
                          pmid="2")
    encoder = PairEncoder(tokenizer, max_length=64, markers="fine")
    candidates = document_candidates(doc, None) + document_candidates(short, None)
    pairs, stats = encoder.encode([doc, short], candidates)
    assert stats.pairs == 2 and stats.too_long == 1 and stats.dropped_indices == [0]
    assert [p.index for p in pairs] == [1]


def test_too_long_pair_predicts_none_without_crashing(smoke_model_dir):  # noqa: F811
    from drugprot.inference import Predictor

    predictor = Predictor.from_path(smoke_model_dir, device="cpu")
    max_length = predictor.members[0].info["max_length"]
    doc = long_document(3 * max_length, 1, 3 * max_length - 2)
    candidates = predictor.candidates([doc])
    assert len(candidates) == 1
    probs = predictor.member_probabilities([doc], candidates)
    assert probs.shape == (1, 1, len(LABELS))
    assert probs[0, 0, 0] == 1.0 and probs[0, 0, 1:].sum() == 0.0
    assert predictor.predict([doc]) == [[]]


# --- targets --------------------------------------------------------------------------------------------------

def test_multi_label_pair_splits_target_mass(tokenizer):
    doc = make_document("Tamoxifen antagonizes and inhibits ESR1 here.",
                        [("T1", "CHEMICAL", "Tamoxifen"), ("T2", "GENE-Y", "ESR1")],
                        [("ANTAGONIST", "T1", "T2"), ("INHIBITOR", "T1", "T2")])
    _, _, (pair,), _ = encode_one(tokenizer, doc, max_length=64)
    expected = [0.0] * len(LABELS)
    expected[LABEL_INDEX["ANTAGONIST"]] = expected[LABEL_INDEX["INHIBITOR"]] = 0.5
    assert list(pair.target) == expected


def test_negative_pair_targets_none(tokenizer):
    doc = make_document("Tamoxifen was given and ESR1 measured.", [("T1", "CHEMICAL", "Tamoxifen"), ("T2", "GENE", "ESR1")])
    _, _, (pair,), _ = encode_one(tokenizer, doc, max_length=64)
    assert pair.target[0] == 1.0 and sum(pair.target) == 1.0
    assert pair.entity_types == (0, -100)  # plain GENE: entity type unknown, ignored by the multitask loss


def test_sample_corpus_encodes_every_pair(tokenizer, sample_dir):
    from drugprot.candidates import corpus_candidates
    from drugprot.corpus import read_split

    docs = read_split(sample_dir, "training").documents[:10]
    candidates, _ = corpus_candidates(docs)
    pairs, stats = PairEncoder(tokenizer, max_length=128, markers="fine").encode(docs, candidates)
    assert stats.pairs == len(candidates) == len(pairs) + stats.too_long
    s_open = tokenizer.convert_tokens_to_ids("[S:CHEMICAL]")
    gene_opens = set(ids_of(tokenizer, "[O:GENE-Y]", "[O:GENE-N]"))
    for pair in pairs:
        assert len(pair.input_ids) <= 128
        assert pair.input_ids[pair.subject] == s_open and pair.input_ids[pair.object] in gene_opens


# --- token-budget batches -------------------------------------------------------------------------------------

def synthetic_pairs(n: int, seed: int = 0, longest: int = 128) -> list[EncodedPair]:
    rng = random.Random(seed)
    return [EncodedPair(tuple(range(rng.randint(8, longest))), 1, 2, (1.0,), (0, 0), i) for i in range(n)]


@pytest.mark.parametrize("budget, max_pairs", [(512, 64), (1024, 8), (128, 100), (4096, 3)])
@pytest.mark.parametrize("seed", [None, 7])
def test_token_budget_batches_respect_budget_and_cover_everything(budget, max_pairs, seed):
    pairs = synthetic_pairs(300)
    batches = token_budget_batches(pairs, token_budget=budget, max_pairs=max_pairs, shuffle_seed=seed)
    for members in batches:
        assert 1 <= len(members) <= max_pairs
        assert max(len(pairs[i].input_ids) for i in members) * len(members) <= budget
    flat = [i for members in batches for i in members]
    assert sorted(flat) == list(range(len(pairs)))  # every index exactly once
    widths = [len(collate([pairs[i] for i in members], 0).input_ids[0]) for members in batches]
    assert sum(w * len(m) for w, m in zip(widths, batches)) <= budget * len(batches)


def test_token_budget_batches_are_length_bucketed():
    pairs = synthetic_pairs(500)
    batches = token_budget_batches(pairs, token_budget=2048, max_pairs=64)
    padded = sum(max(len(pairs[i].input_ids) for i in m) * len(m) for m in batches)
    real = sum(len(p.input_ids) for p in pairs)
    assert padded / real < 1.1  # sorted by length: little padding


def test_token_budget_batch_order_comes_from_the_seed_alone():
    pairs = synthetic_pairs(300)
    run = lambda seed: token_budget_batches(pairs, token_budget=1024, max_pairs=32, shuffle_seed=seed)  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)
    unshuffled = run(None)
    assert unshuffled == run(None)
    widths = [max(len(pairs[i].input_ids) for i in members) for members in unshuffled]
    assert widths == sorted(widths)  # without a seed: plain length order (inference)
    assert len(run(3)) == len(run(4)) == len(run(None))  # same lengths, same batch boundaries: steps per epoch fixed


def test_single_pair_longer_than_the_budget_gets_its_own_batch():
    pairs = synthetic_pairs(20, longest=40) + [EncodedPair(tuple(range(200)), 1, 2, (1.0,), (0, 0), 20)]
    batches = token_budget_batches(pairs, token_budget=128, max_pairs=8)
    assert [20] in batches
    assert sorted(i for m in batches for i in m) == list(range(21))


@pytest.mark.parametrize("count", [1, 15, 16, 17, 300])
@pytest.mark.parametrize("batch_pairs", [1, 16, 32])
@pytest.mark.parametrize("budget, max_pairs", [(128, 64), (1024, 4), (8192, 64)])
def test_steps_per_epoch_are_ceil_pairs_over_batch_pairs_whatever_the_budget(count, batch_pairs, budget, max_pairs):
    pairs = synthetic_pairs(count)
    steps = step_batches(pairs, batch_pairs=batch_pairs, token_budget=budget, max_pairs=max_pairs, shuffle_seed=5)
    assert len(steps) == math.ceil(count / batch_pairs)
    sizes = sorted(sum(len(m) for m in step) for step in steps)
    assert sizes[1:] == [batch_pairs] * (len(steps) - 1) and 1 <= sizes[0] <= batch_pairs  # one short step at most
    assert sorted(i for step in steps for m in step for i in m) == list(range(count))  # every pair once an epoch
    for step in steps:  # micro-batches keep to the memory caps (a pair alone may be over the budget)
        for members in step:
            assert len(members) <= max_pairs
            assert len(members) == 1 or max(len(pairs[i].input_ids) for i in members) * len(members) <= budget


def test_a_step_over_the_budget_is_cut_into_micro_batches_and_its_order_comes_from_the_seed():
    pairs = synthetic_pairs(300)
    run = lambda seed, budget: step_batches(pairs, batch_pairs=32, token_budget=budget, max_pairs=64,  # noqa: E731
                                            shuffle_seed=seed)
    assert run(3, 8192) == run(3, 8192) and run(3, 8192) != run(4, 8192)
    assert all(len(step) == 1 for step in run(3, 8192))  # 32 pairs of at most 128 tokens fit 8192: one pass each
    cut = run(3, 512)
    assert any(len(step) > 1 for step in cut)
    pairs_of = lambda steps: [sorted(i for m in step for i in m) for step in steps]  # noqa: E731
    assert pairs_of(cut) == pairs_of(run(3, 8192))  # the budget cuts a step but never changes which pairs make it


def test_collate_pads_and_masks():
    pairs = synthetic_pairs(5)
    batch = collate(pairs, pad_id=0)
    assert batch.input_ids.shape == batch.attention_mask.shape == (5, max(len(p.input_ids) for p in pairs))
    assert batch.real_tokens == sum(len(p.input_ids) for p in pairs)
    assert batch.target.dtype == torch.float32 and batch.index.tolist() == list(range(5))


# --- context: sentence or abstract ------------------------------------------------------------------------------

def three_sentence_document() -> Document:
    title = "Aspirin inhibits COX-1 in platelets."
    abstract = "Platelets aggregate less after treatment. The effect lasts for the life of the platelet."
    doc = Document("7", title, abstract)
    doc.entities["T1"] = Entity("T1", "CHEMICAL", 0, 7, "Aspirin")
    doc.entities["T2"] = Entity("T2", "GENE-Y", 17, 22, "COX-1")
    return doc


def test_abstract_context_keeps_the_pair_and_its_markers(tokenizer):
    doc = three_sentence_document()
    chemical_open, chemical_close, gene_open, gene_close = ids_of(
        tokenizer, "[S:CHEMICAL]", "[/S:CHEMICAL]", "[O:GENE]", "[/O:GENE]")
    sentence = encode_one(tokenizer, doc, max_length=64)[2]
    abstract = encode_one(tokenizer, doc, max_length=64, context="abstract")[2]
    assert len(sentence) == len(abstract) == 1
    for pair in (sentence[0], abstract[0]):
        assert pair.input_ids[pair.subject] == chemical_open and pair.input_ids[pair.object] == gene_open
    # the start markers point at the same entities in both modes
    assert entity_between(sentence[0], sentence[0].subject, chemical_close) == \
        entity_between(abstract[0], abstract[0].subject, chemical_close) == tokenizer("Aspirin", add_special_tokens=False)["input_ids"]
    assert entity_between(sentence[0], sentence[0].object, gene_close) == \
        entity_between(abstract[0], abstract[0].object, gene_close)
    # a pair in the first sentence gets the following sentences as context, and nothing before it
    assert sentence[0].subject == abstract[0].subject == 1
    following = tokenizer(" ".join([doc.text[doc.text.index("Platelets aggregate"):]]), add_special_tokens=False)["input_ids"]
    assert len(abstract[0].input_ids) >= len(sentence[0].input_ids) + len(following)
    assert list(abstract[0].input_ids[-1 - len(following):-1]) == following


def test_abstract_context_is_windowed_around_the_pair(tokenizer):
    """A long abstract around a pair in its middle: the window keeps the pair whole and spends the spare tokens on
    both sides, so the pair sits near the middle rather than at an edge."""
    filler = " ".join([FILLER] * 60) + "."
    doc = Document("8", filler, f"{filler} Aspirin inhibits COX-1 here. {filler}")
    start = doc.text.index("Aspirin")
    doc.entities["T1"] = Entity("T1", "CHEMICAL", start, start + 7, "Aspirin")
    gene = doc.text.index("COX-1")
    doc.entities["T2"] = Entity("T2", "GENE-Y", gene, gene + 5, "COX-1")
    (pair,) = encode_one(tokenizer, doc, max_length=64, context="abstract")[2]
    assert len(pair.input_ids) == 64
    assert pair.input_ids[pair.subject] == tokenizer.convert_tokens_to_ids("[S:CHEMICAL]")
    assert 20 <= pair.subject <= 40, pair.subject


def test_an_unknown_context_is_refused(tokenizer):
    with pytest.raises(ValueError, match="encoding.context: 'paragraph' is not one of sentence, abstract"):
        PairEncoder(tokenizer, context="paragraph")
