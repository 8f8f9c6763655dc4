"""Corpus reading, validation (one test per error, each naming file:line), and crash-safe writing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drugprot.corpus import (
    Corpus,
    CorpusError,
    Document,
    Entity,
    Problem,
    Relation,
    read_files,
    read_split,
    write_relations,
    write_split,
)

# Text of 100: "Aspirin inhibits COX-1. Ibuprofen binds COX-2 and TP53."  (abstract starts at len(title) + 1 = 24)
ABSTRACTS = "100\tAspirin inhibits COX-1.\tIbuprofen binds COX-2 and TP53.\n200\tCaffeine and ADORA2A.\tNo relation here.\n"
ENTITY_LINES = [
    "100\tT1\tCHEMICAL\t0\t7\tAspirin",
    "100\tT2\tGENE-Y\t17\t22\tCOX-1",
    "100\tT3\tCHEMICAL\t24\t33\tIbuprofen",
    "100\tT4\tGENE-N\t40\t45\tCOX-2",
    "100\tT5\tGENE-Y\t50\t54\tTP53",
    "200\tT1\tCHEMICAL\t0\t8\tCaffeine",
    "200\tT2\tGENE-Y\t13\t20\tADORA2A",
]
RELATION_LINES = [
    "100\tINHIBITOR\tArg1:T1\tArg2:T2",
    "100\tDIRECT-REGULATOR\tArg1:T3\tArg2:T4",
    "200\tANTAGONIST\tArg1:T1\tArg2:T2",
]
FILES = {"abstracts": "drugprot_training_abstracs.tsv", "entities": "drugprot_training_entities.tsv",
         "relations": "drugprot_training_relations.tsv"}


def lines(rows: list[str]) -> str:
    return "".join(f"{row}\n" for row in rows)


@pytest.fixture
def tiny(make_corpus):
    """Factory for the two-document corpus above, with optional replaced/appended lines per file."""

    def build(abstracts: list[str] | None = None, entities: list[str] | None = None, relations: list[str] | None = None):
        return make_corpus(
            abstracts=lines(abstracts) if abstracts is not None else ABSTRACTS,
            entities=lines(entities if entities is not None else ENTITY_LINES),
            relations=lines(relations if relations is not None else RELATION_LINES),
        )

    return build


def replaced(rows: list[str], number: int, line: str) -> list[str]:
    """Replace 1-based line ``number`` (or append when it is one past the end)."""
    rows = list(rows)
    if number == len(rows) + 1:
        rows.append(line)
    else:
        rows[number - 1] = line
    return rows


# ---------------------------------------------------------------------------------------------------- parsing


def test_tiny_corpus_parses_into_typed_documents(tiny):
    corpus = read_split(tiny(), "training")
    assert isinstance(corpus, Corpus) and corpus.split == "training" and len(corpus) == 2
    doc = corpus.by_pmid()["100"]
    assert doc.text == "Aspirin inhibits COX-1. Ibuprofen binds COX-2 and TP53."
    assert doc.entities["T4"] == Entity("T4", "GENE-N", 40, 45, "COX-2")
    assert doc.entities["T4"].is_gene and not doc.entities["T1"].is_gene
    assert doc.relations == [Relation("INHIBITOR", "T1", "T2"), Relation("DIRECT-REGULATOR", "T3", "T4")]
    assert corpus.by_pmid()["200"].relations == [Relation("ANTAGONIST", "T1", "T2")]
    assert corpus.warnings == [] and doc.duplicate_relations == []
    for document in corpus:
        for entity in document.entities.values():
            assert document.text[entity.start:entity.end] == entity.text


def test_relations_file_is_optional(make_corpus):
    root = make_corpus(abstracts=ABSTRACTS, entities=lines(ENTITY_LINES), relations=None)
    corpus = read_split(root, "training")
    assert [d.relations for d in corpus] == [[], []]
    assert len(corpus.by_pmid()["100"].entities) == 5


def test_crlf_line_endings_read_like_lf(make_corpus):
    root = make_corpus(abstracts=ABSTRACTS.replace("\n", "\r\n"), entities=lines(ENTITY_LINES).replace("\n", "\r\n"),
                       relations=lines(RELATION_LINES).replace("\n", "\r\n"))
    corpus = read_split(root, "training")
    assert corpus.by_pmid()["200"].abstract == "No relation here."
    assert corpus.by_pmid()["100"].entities["T5"].text == "TP53"
    assert corpus.by_pmid()["200"].relations == [Relation("ANTAGONIST", "T1", "T2")]


def test_corrected_abstracts_file_name_is_accepted_but_not_both(tiny):
    root = tiny()
    folder = root / "training"
    (folder / FILES["abstracts"]).rename(folder / "drugprot_training_abstracts.tsv")
    assert len(read_split(root, "training")) == 2
    (folder / FILES["abstracts"]).write_text(ABSTRACTS, encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="several abstracts files"):
        read_split(root, "training")


def test_missing_split_names_the_splits_found(tiny):
    with pytest.raises(FileNotFoundError, match=r"no such split folder \(found splits: training\)"):
        read_split(tiny(), "development")


def test_missing_entities_file_is_reported(tiny):
    root = tiny()
    (root / "training" / FILES["entities"]).unlink()
    with pytest.raises(FileNotFoundError, match="missing the entities file"):
        read_split(root, "training")


def test_sample_reads_cleanly(sample_dir):
    training = read_split(sample_dir, "training", strict=True)
    development = read_split(sample_dir, "development", strict=True)
    assert (len(training), len(development)) == (40, 10)
    for corpus, gene_types in ((training, {"GENE-Y", "GENE-N"}), (development, {"GENE"})):
        types = {e.type for d in corpus for e in d.entities.values()}
        assert types == {"CHEMICAL", *gene_types}
        for doc in corpus:
            assert len(doc.relations) >= 2  # the sample's selection rule
            for entity in doc.entities.values():
                assert doc.text[entity.start:entity.end] == entity.text
            for relation in doc.relations:
                assert doc.entities[relation.chemical].type == "CHEMICAL" and doc.entities[relation.gene].is_gene


# ------------------------------------------------------------------------------- validation: one error per test

ERRORS = {
    "abstracts-columns": ("abstracts", 2, "200\tCaffeine and ADORA2A.", r"expected 3 tab-separated columns, found 2"),
    "entities-columns": ("entities", 3, "100\tT3\tCHEMICAL\t24\t33", r"expected 6 tab-separated columns, found 5"),
    "relations-columns": ("relations", 2, "100\tDIRECT-REGULATOR\tArg1:T3\tArg2:T4\textra", r"expected 4 tab-separated columns, found 5"),
    "non-integer-offset": ("entities", 3, "100\tT3\tCHEMICAL\t24\tx33\tIbuprofen", r"offsets must be integers, got start='24' end='x33'"),
    "float-offset": ("entities", 2, "100\tT2\tGENE-Y\t17.0\t22\tCOX-1", r"offsets must be integers"),
    "offset-past-end": ("entities", 5, "100\tT5\tGENE-Y\t50\t540\tTP53", r"offsets 50-540 out of range for a text of 55 characters"),
    "negative-offset": ("entities", 1, "100\tT1\tCHEMICAL\t-1\t7\tAspirin", r"offsets -1-7 out of range"),
    "empty-span": ("entities", 1, "100\tT1\tCHEMICAL\t7\t7\t", r"offsets 7-7 out of range"),
    "text-mismatch": ("entities", 2, "100\tT2\tGENE-Y\t17\t22\tCOX-9", r"entity text 'COX-9' does not match the text at 17-22: 'COX-1'"),
    "text-off-by-one": ("entities", 5, "100\tT5\tGENE-Y\t49\t53\tTP53", r"entity text 'TP53' does not match"),
    "unknown-entity-type": ("entities", 1, "100\tT1\tDRUG\t0\t7\tAspirin", r"unknown entity type 'DRUG'"),
    "unknown-relation-type": ("relations", 2, "100\tINHIBITS\tArg1:T3\tArg2:T4", r"unknown relation type 'INHIBITS'"),
    "relation-argument-missing": ("relations", 1, "100\tINHIBITOR\tArg1:T1\tArg2:T9", r"argument T9 is not an entity of PMID 100"),
    "relation-argument-other-document": ("relations", 3, "200\tANTAGONIST\tArg1:T1\tArg2:T5", r"argument T5 is not an entity of PMID 200"),
    "relation-argument-unlabelled": ("relations", 1, "100\tINHIBITOR\tT1\tT2", r"arguments must read Arg1:Tn and Arg2:Tm"),
    "relation-gene-to-chemical": ("relations", 1, "100\tINHIBITOR\tArg1:T2\tArg2:T1", r"relation must go CHEMICAL→GENE, got GENE-Y\(T2\)→CHEMICAL\(T1\)"),
    "relation-chemical-to-chemical": ("relations", 2, "100\tSUBSTRATE\tArg1:T1\tArg2:T3", r"relation must go CHEMICAL→GENE, got CHEMICAL\(T1\)→CHEMICAL\(T3\)"),
    "relation-without-abstract": ("relations", 4, "300\tINHIBITOR\tArg1:T1\tArg2:T2", r"relation for PMID 300, which has no abstract"),
    "duplicate-entity-id": ("entities", 8, "100\tT1\tCHEMICAL\t24\t33\tIbuprofen", r"duplicate entity id T1 in PMID 100"),
    "entities-without-abstract": ("entities", 8, "300\tT1\tCHEMICAL\t0\t7\tAspirin", r"PMID 300 has entities but no abstract"),
    "duplicate-pmid": ("abstracts", 3, "100\tAgain.\tSame PMID.", r"duplicate PMID 100"),
}


@pytest.mark.parametrize("kind, number, line, message", ERRORS.values(), ids=ERRORS.keys())
def test_each_validation_error_names_file_and_line(tiny, kind, number, line, message):
    files = {"abstracts": ABSTRACTS.splitlines(), "entities": ENTITY_LINES, "relations": RELATION_LINES}
    files[kind] = replaced(files[kind], number, line)
    with pytest.raises(CorpusError, match=rf"{FILES[kind]}:{number}: {message}") as caught:
        read_split(tiny(**files), "training")
    # reported first, as a structured Problem too; later ones can only be knock-on effects in later files
    # (a relation whose entity line was rejected), never in the same file
    first, *rest = caught.value.problems
    assert isinstance(first, Problem)
    assert (first.path.name, first.line) == (FILES[kind], number)
    assert all(p.path.name != FILES[kind] for p in rest)


def test_bad_utf8_names_file_and_line(tiny):
    root = tiny()
    path = root / "training" / FILES["entities"]
    data = path.read_bytes().split(b"\n")
    data[3] = data[3].replace(b"COX-2", b"COX-\xff")  # line 4
    path.write_bytes(b"\n".join(data))
    with pytest.raises(CorpusError, match=rf"{FILES['entities']}:4: not valid UTF-8") as caught:
        read_split(root, "training")
    # T4 is lost, so the relation that uses it is reported too
    assert [(p.path.name, p.line) for p in caught.value.problems] == [(FILES["entities"], 4), (FILES["relations"], 2)]


def test_every_problem_is_reported_in_one_run(tiny):
    entities = replaced(ENTITY_LINES, 2, "100\tT2\tGENE-Y\t17\t22\tCOX-9")
    entities = replaced(entities, 6, "200\tT1\tCHEMICAL\tzero\t8\tCaffeine")
    relations = replaced(RELATION_LINES, 2, "100\tINHIBITS\tArg1:T3\tArg2:T4")
    with pytest.raises(CorpusError) as caught:
        read_split(tiny(entities=entities, relations=relations), "training")
    where = {(p.path.name, p.line) for p in caught.value.problems}
    assert {(FILES["entities"], 2), (FILES["entities"], 6), (FILES["relations"], 2)} <= where
    assert f"{FILES['entities']}:6:" in str(caught.value)


def test_exact_duplicate_relation_lines_are_kept_once_with_a_warning(tiny):
    root = tiny(relations=[*RELATION_LINES, RELATION_LINES[0], RELATION_LINES[0]])
    corpus = read_split(root, "training")
    doc = corpus.by_pmid()["100"]
    assert doc.relations == [Relation("INHIBITOR", "T1", "T2"), Relation("DIRECT-REGULATOR", "T3", "T4")]
    assert doc.duplicate_relations == [Relation("INHIBITOR", "T1", "T2")] * 2
    assert [(w.path.name, w.line) for w in corpus.warnings] == [(FILES["relations"], 4), (FILES["relations"], 5)]
    assert "exact duplicate" in corpus.warnings[0].message


def test_same_pair_with_another_type_is_not_a_duplicate(tiny):
    corpus = read_split(tiny(relations=[*RELATION_LINES, "100\tACTIVATOR\tArg1:T1\tArg2:T2"]), "training")
    assert len(corpus.by_pmid()["100"].relations) == 3 and corpus.warnings == []


def test_strict_turns_the_duplicate_warning_into_an_error(tiny):
    root = tiny(relations=[*RELATION_LINES, RELATION_LINES[2]])
    assert len(read_split(root, "training").warnings) == 1
    with pytest.raises(CorpusError, match=rf"{FILES['relations']}:4: exact duplicate relation line"):
        read_split(root, "training", strict=True)


def test_read_files_takes_explicit_paths(tiny):
    folder = tiny() / "training"
    corpus = read_files(folder / FILES["abstracts"], folder / FILES["entities"], None, split="mine")
    assert corpus.split == "mine" and sum(len(d.relations) for d in corpus) == 0


# ------------------------------------------------------------------------------------------------------ writing


def test_write_split_reproduces_the_official_files_byte_for_byte(sample_dir, tmp_path):
    corpus = read_split(sample_dir, "training")
    write_split(tmp_path, "training", corpus.documents)
    for name in ("drugprot_training_abstracs.tsv", "drugprot_training_entities.tsv", "drugprot_training_relations.tsv"):
        assert (tmp_path / "training" / name).read_bytes() == (sample_dir / "training" / name).read_bytes()


def test_write_split_round_trips_duplicates(tiny, tmp_path):
    corpus = read_split(tiny(relations=[*RELATION_LINES, RELATION_LINES[1]]), "training")
    write_split(tmp_path / "out", "training", corpus.documents)
    again = read_split(tmp_path / "out", "training")
    assert [(d.pmid, d.title, d.abstract, d.entities, d.relations, d.duplicate_relations) for d in again] == [
        (d.pmid, d.title, d.abstract, d.entities, d.relations, d.duplicate_relations) for d in corpus
    ]
    assert len(again.warnings) == 1


def test_written_files_get_the_umask_mode_not_a_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        write_relations(tmp_path / "pred.tsv", [("1", Relation("INHIBITOR", "T1", "T2"))])
    finally:
        os.umask(old)
    assert (tmp_path / "pred.tsv").stat().st_mode & 0o777 == 0o644


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name.endswith(".tmp"))


def failing_rows(n_good: int):
    for i in range(n_good):
        yield (str(i), Relation("INHIBITOR", "T1", "T2"))
    raise KeyboardInterrupt  # an interruption mid-way, the hardest case (BaseException, not Exception)


def test_interrupted_write_relations_creates_nothing(tmp_path):
    target = tmp_path / "preds.tsv"
    with pytest.raises(KeyboardInterrupt):
        write_relations(target, failing_rows(50))
    assert not target.exists()
    assert leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_interrupted_write_relations_keeps_the_old_file(tmp_path):
    target = tmp_path / "preds.tsv"
    write_relations(target, [("9", Relation("AGONIST", "T3", "T4"))])
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        write_relations(target, failing_rows(50))
    assert target.read_bytes() == before == b"9\tAGONIST\tArg1:T3\tArg2:T4\n"
    assert leftovers(tmp_path) == []


def test_write_relations_refuses_a_field_that_would_break_the_format(tmp_path):
    target = tmp_path / "preds.tsv"
    rows = [("1", Relation("INHIBITOR", "T1", "T2")), ("2", Relation("INHIBITOR", "T1\tT9", "T2"))]
    with pytest.raises(CorpusError, match=r"preds\.tsv:2: cannot write a field holding a tab"):
        write_relations(target, rows)
    assert not target.exists() and leftovers(tmp_path) == []


def test_interrupted_write_split_writes_nothing(tiny, tmp_path):
    documents = read_split(tiny(), "training").documents

    def interrupted():
        yield documents[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_split(tmp_path / "out", "training", interrupted())
    assert not (tmp_path / "out" / "training").exists()


def test_failed_write_split_keeps_every_old_file(tiny, tmp_path):
    documents = read_split(tiny(), "training").documents
    write_split(tmp_path, "training", documents)
    before = {p.name: p.read_bytes() for p in (tmp_path / "training").iterdir()}
    # a valid first document (its abstract line renders fine), then an entity that cannot be written: the abstracts
    # file is rendered first, so a writer that replaced files one by one would already have overwritten it
    changed = Document("100", "A new title.", "New abstract.")
    changed.entities["T1"] = Entity("T1", "CHEMICAL", 0, 1, "A\tB")
    with pytest.raises(CorpusError, match=r"drugprot_training_entities\.tsv:1:"):
        write_split(tmp_path, "training", [changed, *documents[1:]])
    assert {p.name: p.read_bytes() for p in (tmp_path / "training").iterdir()} == before
    assert leftovers(tmp_path) == []
