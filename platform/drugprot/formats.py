"""Corpus files in the formats the field uses: documents in from the DrugProt TSV layout, PubTator and BioC
(XML or JSON); predictions out as the official TSV, JSON Lines or BioC XML.

PubTator and BioC go through the maintained ``bioc`` package. It falls short in three places, handled here:
its PubTator reader reports no line numbers (and prints, rather than raises, on a line it cannot parse), so the
lines are fed to it through a counter; its BioC XML reader never frees parsed elements, so memory grows with one
*file* (not with the corpus: files are read one after another); BioC JSON is one collection per file, read whole.

Every text uses the official convention: ``title + " " + abstract``, offsets 0-based with an exclusive end.
PubTator types ``Chemical`` and ``Gene`` become CHEMICAL and GENE; the DrugProt names (CHEMICAL, GENE, GENE-Y,
GENE-N) are kept as they are; every other type (Species, Disease, …) is counted in :class:`ReadStats` and
skipped. A PubTator mention has no id of its own, so mention *k* of a document (counting every annotation line,
skipped ones too) gets the id ``Tk``. Bad input raises :class:`~drugprot.corpus.CorpusError` naming the file and
the line (PubTator) or the document (BioC).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drugprot.corpus import CHEMICAL, ENTITY_TYPES, CorpusError, Document, Entity, Problem, read_split

INPUT_FORMATS = ("drugprot", "pubtator", "bioc")
OUTPUT_FORMATS = ("tsv", "jsonl", "bioc")
OUTPUT_SUFFIX = {"tsv": ".tsv", "jsonl": ".jsonl", "bioc": ".xml"}
INPUT_SUFFIXES = {"pubtator": (".pubtator", ".txt", ".pubtator.txt"), "bioc": (".xml", ".json")}
TYPE_NAMES = {"Chemical": CHEMICAL, "Gene": "GENE", **{t: t for t in ENTITY_TYPES}}


@dataclass(frozen=True, slots=True)
class DocumentProblem:
    """A problem located by document rather than by line (BioC)."""

    path: Path
    document: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: document {self.document}: {self.message}"


@dataclass(slots=True)
class ReadStats:
    documents: int = 0
    entities: int = 0
    skipped_types: Counter = field(default_factory=Counter)  # mention type -> count, types that are not ours


def input_files(paths: Sequence[str | Path], fmt: str) -> list[Path]:
    """Expand folders into their input files (sorted, so a rerun sees the same order); ``drugprot`` takes split
    folders (holding ``*_entities.tsv``), the others files with the format's suffixes."""
    if fmt not in INPUT_FORMATS:
        raise CorpusError([Problem(Path(str(paths[0]) if paths else "."), 0, f"unknown input format {fmt!r} "
                                   f"(expected one of {', '.join(INPUT_FORMATS)})")])
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"--input {path}: no such file or folder")
        if fmt == "drugprot":
            if not path.is_dir():
                raise FileNotFoundError(f"--input {path}: --format drugprot takes a split folder (holding *_entities.tsv)")
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES[fmt]))
            if not found:
                raise FileNotFoundError(f"--input {path}: no {fmt} files ({', '.join('*' + s for s in INPUT_SUFFIXES[fmt])})")
            files.extend(found)
        else:
            files.append(path)
    return files


def read_documents(path: Path, fmt: str, stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents of one input file (or split folder), lazily where the format allows; validated as they come."""
    stats = stats if stats is not None else ReadStats()
    if fmt == "pubtator":
        yield from _read_pubtator(Path(path), stats)
    elif fmt == "bioc":
        yield from _read_bioc(Path(path), stats)
    elif fmt == "drugprot":
        for document in read_split(Path(path).parent, Path(path).name).documents:
            stats.documents += 1
            stats.entities += len(document.entities)
            yield document
    else:
        raise ValueError(f"unknown input format {fmt!r}")


def _mention(entities: dict[str, Entity], eid: str, etype: str, start: int, end: int, text: str, full: str,
             stats: ReadStats) -> str | None:
    """Add one mention to ``entities``; returns a problem message, or None (also for a skipped type)."""
    kind = TYPE_NAMES.get(etype)
    if kind is None:
        stats.skipped_types[etype] += 1
        return None
    if not 0 <= start < end <= len(full):
        return f"mention {eid}: offsets {start}-{end} out of range for a text of {len(full)} characters"
    if text is not None and full[start:end] != text:
        return f"mention {eid}: text {text!r} does not match the text at {start}-{end}: {full[start:end]!r}"
    if eid in entities:
        return f"duplicate mention id {eid}"
    if any(c in eid for c in "\t\r\n"):
        return f"mention id {eid!r} holds a tab or line break"
    entities[eid] = Entity(eid, kind, start, end, full[start:end])
    stats.entities += 1
    return None


class _NumberedLines:
    """Feeds a file's lines to bioc's PubTator parser while recording which lines make the current document."""

    def __init__(self, handle):
        self.handle = handle
        self.number = 0
        self.document: list[tuple[int, str]] = []
        self._after_blank = False

    def __iter__(self):
        for line in self.handle:
            if self._after_blank:
                self.document = []
            self.number += 1
            self._after_blank = not line.strip()
            if not self._after_blank:
                self.document.append((self.number, line.rstrip("\r\n")))
            yield line


def _read_pubtator(path: Path, stats: ReadStats) -> Iterator[Document]:
    from bioc import pubtator

    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        lines = _NumberedLines(handle)
        parsed = pubtator.iterparse(lines)
        while True:
            try:
                record = next(parsed)
            except StopIteration:
                return
            except ValueError as error:  # bioc's annotation parser (a non-integer offset, …)
                raise CorpusError([Problem(path, lines.number, f"cannot parse the annotation: {error}")]) from None
            except UnicodeDecodeError as error:
                raise CorpusError([Problem(path, lines.number + 1, f"not valid UTF-8 ({error.reason})")]) from None
            document = _pubtator_document(path, record, lines.document, stats)
            if document.pmid in seen:
                raise CorpusError([Problem(path, lines.document[0][0], f"duplicate PMID {document.pmid} "
                                           f"(first at line {seen[document.pmid]})")])
            seen[document.pmid] = lines.document[0][0]
            yield document


def _pubtator_document(path: Path, record, numbered: list[tuple[int, str]], stats: ReadStats) -> Document:
    problems: list[Problem] = []
    first = numbered[0][0]
    titles = [n for n, line in numbered if "|t|" in line.split("\t", 1)[0]]
    if len(titles) > 1:
        problems.append(Problem(path, titles[1], f"a second title line in PMID {record.pmid}: separate documents by a blank line"))
    if not titles:
        problems.append(Problem(path, first, f"PMID {record.pmid} has no title line (PMID|t|TITLE)"))
    document = Document(record.pmid, record.title or "", record.abstract or "")
    full = document.text
    annotation_lines = []
    for number, line in numbered:
        head = line.split("\t", 1)[0]
        if "|t|" in head or "|a|" in head:
            continue
        columns = line.count("\t") + 1
        if columns >= 6:
            annotation_lines.append(number)
        elif columns not in (4, 5):  # 4 or 5 columns: a relation line, which input predictions ignore
            problems.append(Problem(path, number, f"expected PMID|t|TITLE, PMID|a|ABSTRACT or a tab-separated mention "
                                                  f"(PMID, start, end, text, type, id), found {columns} column(s)"))
    for k, (number, annotation) in enumerate(zip(annotation_lines, record.annotations), start=1):
        if annotation.pmid != record.pmid:
            problems.append(Problem(path, number, f"mention of PMID {annotation.pmid} inside the document of PMID {record.pmid}"))
            continue
        message = _mention(document.entities, f"T{k}", annotation.type, annotation.start, annotation.end,
                           annotation.text, full, stats)
        if message:
            problems.append(Problem(path, number, message))
    if problems:
        raise CorpusError(problems)
    stats.documents += 1
    return document


def _bioc_documents(path: Path):
    from bioc import biocjson, biocxml
    from lxml import etree

    try:
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as handle:
                yield from biocjson.load(handle).documents
        else:
            with biocxml.iterparse(str(path)) as reader:
                yield from reader
    except json.JSONDecodeError as error:
        raise CorpusError([Problem(path, error.lineno, f"not valid JSON: {error.msg}")]) from None
    except KeyError as error:
        raise CorpusError([Problem(path, 1, f"not a BioC JSON collection: missing key {error}")]) from None
    except etree.XMLSyntaxError as error:
        raise CorpusError([Problem(path, error.lineno or 0, f"not valid XML: {error.msg}")]) from None


def _read_bioc(path: Path, stats: ReadStats) -> Iterator[Document]:
    seen: set[str] = set()
    for position, record in enumerate(_bioc_documents(path), start=1):
        name = record.id or f"#{position}"
        problems: list[DocumentProblem] = []

        def fail(message: str) -> None:
            problems.append(DocumentProblem(path, name, message))

        if not record.id:
            fail("has no id (the PMID)")
        elif record.id in seen:
            fail("duplicate document id")
        seen.add(record.id)
        passages = sorted(record.passages, key=lambda p: p.offset)
        full = ""
        for passage in passages:
            if passage.text is None:
                fail(f"passage at offset {passage.offset} has no text (sentence-level BioC is not supported)")
                break
            if not full:
                if passage.offset != 0:
                    fail(f"the first passage starts at offset {passage.offset}, not 0")
                    break
                title = full = passage.text
                continue
            gap = passage.offset - len(full)
            if gap < 1:
                fail(f"passage at offset {passage.offset} overlaps or touches the one before (ending at {len(full)})")
                break
            full += " " * gap + passage.text
        if not passages:
            fail("has no passage")
        if problems:
            raise CorpusError(problems)
        document = Document(record.id, title, full[len(title) + 1:])
        mentions = [*record.annotations, *(a for p in passages for a in p.annotations),
                    *(a for p in passages for s in p.sentences for a in s.annotations)]
        for k, annotation in enumerate(mentions, start=1):
            eid = annotation.id or f"T{k}"
            etype = annotation.infons.get("type", annotation.infons.get("Type", ""))
            if len(annotation.locations) != 1:
                if etype in TYPE_NAMES:
                    stats.skipped_types[f"{etype} (discontinuous)"] += 1
                continue
            location = annotation.locations[0]
            message = _mention(document.entities, eid, etype, location.offset, location.end, annotation.text, full, stats)
            if message:
                fail(message)
        if problems:
            raise CorpusError(problems)
        stats.documents += 1
        yield document


# --- output ---------------------------------------------------------------------------------------------------


def render(documents: Sequence[Document], predictions: Sequence[Sequence], fmt: str) -> bytes:
    """Predictions for ``documents`` (same order) as one output file's bytes; deterministic for the same input."""
    if fmt == "tsv":
        lines = [f"{d.pmid}\t{p.type}\tArg1:{p.chemical}\tArg2:{p.gene}\n" for d, preds in zip(documents, predictions)
                 for p in preds]
        return "".join(lines).encode("utf-8")
    if fmt == "jsonl":
        return "".join(json.dumps(_json_document(d, preds), ensure_ascii=False, separators=(",", ":")) + "\n"
                       for d, preds in zip(documents, predictions)).encode("utf-8")
    if fmt == "bioc":
        return _bioc_collection(documents, predictions)
    raise ValueError(f"unknown output format {fmt!r} (expected one of {', '.join(OUTPUT_FORMATS)})")


def _json_document(document: Document, predictions: Sequence) -> dict:
    def mention(eid: str) -> dict:
        e = document.entities[eid]
        return {"id": e.id, "type": e.type, "start": e.start, "end": e.end, "text": e.text}

    return {"pmid": document.pmid,
            "relations": [{"type": p.type, "chemical": mention(p.chemical), "gene": mention(p.gene), "score": p.score,
                           "votes": list(p.votes)} for p in predictions]}


def _bioc_collection(documents: Sequence[Document], predictions: Sequence[Sequence]) -> bytes:
    from bioc import BioCAnnotation, BioCCollection, BioCDocument, BioCLocation, BioCNode, BioCPassage, BioCRelation, biocxml

    collection = BioCCollection()
    collection.source = "drugprot"
    collection.date = ""  # bioc stamps today's date by default; a rerun must write the same bytes
    for document, preds in zip(documents, predictions):
        out = BioCDocument()
        out.id = document.pmid
        passages = []
        for kind, offset, text in (("title", 0, document.title), ("abstract", len(document.title) + 1, document.abstract)):
            passage = BioCPassage()
            passage.offset, passage.text = offset, text
            passage.infons["type"] = kind
            passages.append(passage)
            out.add_passage(passage)
        for entity in document.entities.values():
            annotation = BioCAnnotation()
            annotation.id, annotation.text = entity.id, entity.text
            annotation.infons["type"] = entity.type
            annotation.add_location(BioCLocation(entity.start, entity.end - entity.start))
            passages[0 if entity.start < len(document.title) else 1].add_annotation(annotation)
        for n, p in enumerate(preds, start=1):
            relation = BioCRelation()
            relation.id = f"R{n}"
            relation.infons.update({"type": p.type, "score": str(p.score), "votes": ",".join(p.votes)})
            relation.add_node(BioCNode(p.chemical, "Arg1"))
            relation.add_node(BioCNode(p.gene, "Arg2"))
            out.add_relation(relation)
        collection.add_document(out)
    return biocxml.dumps(collection).encode("utf-8")


def write_pubtator(path: Path, documents: Sequence[Document]) -> None:
    """Documents as PubTator (title, abstract, one line per mention; ids are not kept: mention k reads back as Tk)."""
    from bioc import pubtator

    records = []
    for document in documents:
        record = pubtator.PubTator(document.pmid, document.title, document.abstract)
        for e in document.entities.values():
            record.add_annotation(pubtator.PubTatorAnn(document.pmid, e.start, e.end, e.text, e.type, e.id))
        records.append(record)
    Path(path).write_text(pubtator.dumps(records) + "\n", encoding="utf-8")


def write_bioc(path: Path, documents: Sequence[Document]) -> None:
    """Documents (with their entities, no relations) as BioC XML, or BioC JSON for a ``.json`` path."""
    data = _bioc_collection(documents, [[] for _ in documents])
    if Path(path).suffix == ".json":
        from bioc import biocjson, biocxml

        Path(path).write_text(biocjson.dumps(biocxml.loads(data.decode("utf-8")), indent=1), encoding="utf-8")
    else:
        Path(path).write_bytes(data)
