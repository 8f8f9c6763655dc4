"""DrugProt corpus: typed documents, official TSV reading/writing, validation with file:line errors.

Text is ``title + " " + abstract`` and every offset indexes into it (0-based, exclusive end), exactly as the
official release defines. Reading collects every problem before failing, so one run shows them all; writing
goes through a temporary file and a rename, so an interrupted or invalid write leaves nothing half-written.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from drugprot.errors import DrugprotError

CHEMICAL = "CHEMICAL"
GENE_TYPES = ("GENE", "GENE-Y", "GENE-N")
ENTITY_TYPES = (CHEMICAL, *GENE_TYPES)
RELATION_TYPES = (
    "INHIBITOR",
    "DIRECT-REGULATOR",
    "SUBSTRATE",
    "ACTIVATOR",
    "INDIRECT-UPREGULATOR",
    "INDIRECT-DOWNREGULATOR",
    "ANTAGONIST",
    "PRODUCT-OF",
    "PART-OF",
    "AGONIST",
    "AGONIST-ACTIVATOR",
    "SUBSTRATE_PRODUCT-OF",
    "AGONIST-INHIBITOR",
)
SPLIT_FILES = {"abstracts": ("_abstracs.tsv", "_abstracts.tsv"), "entities": ("_entities.tsv",), "relations": ("_relations.tsv",)}


@dataclass(frozen=True, slots=True)
class Entity:
    id: str
    type: str
    start: int
    end: int
    text: str

    @property
    def is_gene(self) -> bool:
        return self.type in GENE_TYPES


@dataclass(frozen=True, slots=True)
class Relation:
    """A typed relation; ``chemical`` and ``gene`` are entity ids (Arg1, Arg2) of the same document."""

    type: str
    chemical: str
    gene: str


@dataclass(slots=True)
class Document:
    pmid: str
    title: str
    abstract: str
    entities: dict[str, Entity] = field(default_factory=dict)
    relations: list[Relation] = field(default_factory=list)  # unique, in file order
    duplicate_relations: list[Relation] = field(default_factory=list)  # extra copies of exact duplicate lines

    @property
    def text(self) -> str:
        return f"{self.title} {self.abstract}"


@dataclass(frozen=True, slots=True)
class Problem:
    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class CorpusError(DrugprotError, ValueError):
    """Invalid corpus input; ``problems`` lists every finding with its file and line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) in corpus input:\n{shown}{more}")


@dataclass(slots=True)
class Corpus:
    split: str
    documents: list[Document]
    warnings: list[Problem] = field(default_factory=list)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    def __len__(self) -> int:
        return len(self.documents)

    def by_pmid(self) -> dict[str, Document]:
        return {d.pmid: d for d in self.documents}


def split_files(data_dir: Path, split: str) -> dict[str, Path | None]:
    """Find a split's three files, accepting the official names (``*_abstracs.tsv``, misspelt) and the corrected one."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        found = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir()) if Path(data_dir).is_dir() else []
        raise FileNotFoundError(f"{folder}: no such split folder (found splits: {', '.join(found) or 'none'})")
    files: dict[str, Path | None] = {}
    for kind, suffixes in SPLIT_FILES.items():
        matches = sorted(p for p in folder.iterdir() if p.name.endswith(suffixes))
        if len(matches) > 1:
            raise FileNotFoundError(f"{folder}: several {kind} files: {', '.join(p.name for p in matches)}")
        files[kind] = matches[0] if matches else None
    for kind in ("abstracts", "entities"):
        if files[kind] is None:
            raise FileNotFoundError(f"{folder}: missing the {kind} file (*{SPLIT_FILES[kind][0]})")
    return files


def available_splits(data_dir: Path) -> list[str]:
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such corpus folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*_entities.tsv")))


def _rows(path: Path, columns: int, problems: list[Problem]) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) for each line, recording encoding and column-count problems."""
    data = path.read_bytes()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw:
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(Problem(path, number, f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})"))
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != columns:
            problems.append(Problem(path, number, f"expected {columns} tab-separated columns, found {len(fields)}"))
            continue
        yield number, fields


def read_split(data_dir: str | os.PathLike, split: str, *, strict: bool = False) -> Corpus:
    """Read and validate one split; raise ``CorpusError`` naming every bad line (warnings too when ``strict``)."""
    files = split_files(Path(data_dir), split)
    return read_files(files["abstracts"], files["entities"], files["relations"], split=split, strict=strict)


def read_files(
    abstracts: Path, entities: Path, relations: Path | None, *, split: str = "custom", strict: bool = False
) -> Corpus:
    problems: list[Problem] = []
    warnings: list[Problem] = []
    documents: dict[str, Document] = {}
    for number, (pmid, title, abstract) in _rows(abstracts, 3, problems):
        if pmid in documents:
            problems.append(Problem(abstracts, number, f"duplicate PMID {pmid}"))
            continue
        documents[pmid] = Document(pmid, title, abstract)

    for number, (pmid, eid, etype, start, end, text) in _rows(entities, 6, problems):
        doc = documents.get(pmid)
        if doc is None:
            problems.append(Problem(entities, number, f"PMID {pmid} has entities but no abstract"))
            continue
        if etype not in ENTITY_TYPES:
            problems.append(Problem(entities, number, f"unknown entity type {etype!r} (expected one of {', '.join(ENTITY_TYPES)})"))
            continue
        try:
            begin, finish = int(start), int(end)
        except ValueError:
            problems.append(Problem(entities, number, f"offsets must be integers, got start={start!r} end={end!r}"))
            continue
        full = doc.text
        if not 0 <= begin < finish <= len(full):
            problems.append(Problem(entities, number, f"offsets {begin}-{finish} out of range for a text of {len(full)} characters"))
            continue
        if full[begin:finish] != text:
            problems.append(Problem(entities, number, f"entity text {text!r} does not match the text at {begin}-{finish}: {full[begin:finish]!r}"))
            continue
        if eid in doc.entities:
            problems.append(Problem(entities, number, f"duplicate entity id {eid} in PMID {pmid}"))
            continue
        doc.entities[eid] = Entity(eid, etype, begin, finish, text)

    if relations is not None:
        seen: set[tuple[str, Relation]] = set()
        for number, (pmid, rtype, arg1, arg2) in _rows(relations, 4, problems):
            relation = _parse_relation(relations, number, documents.get(pmid), pmid, rtype, arg1, arg2, problems)
            if relation is None:
                continue
            doc = documents[pmid]
            if (pmid, relation) in seen:
                warnings.append(Problem(relations, number, f"exact duplicate relation line {pmid} {rtype} {arg1} {arg2} (kept once)"))
                doc.duplicate_relations.append(relation)
                continue
            seen.add((pmid, relation))
            doc.relations.append(relation)

    if strict:
        problems.extend(warnings)
    if problems:
        raise CorpusError(problems)
    return Corpus(split, list(documents.values()), warnings)


def _parse_relation(path, number, doc, pmid, rtype, arg1, arg2, problems) -> Relation | None:
    def fail(message: str) -> None:
        problems.append(Problem(path, number, message))

    if doc is None:
        return fail(f"relation for PMID {pmid}, which has no abstract")
    if rtype not in RELATION_TYPES:
        return fail(f"unknown relation type {rtype!r}")
    if not (arg1.startswith("Arg1:") and arg2.startswith("Arg2:")):
        return fail(f"arguments must read Arg1:Tn and Arg2:Tm, got {arg1!r} {arg2!r}")
    chem_id, gene_id = arg1[5:], arg2[5:]
    for eid in (chem_id, gene_id):
        if eid not in doc.entities:
            return fail(f"argument {eid} is not an entity of PMID {pmid}")
    chem, gene = doc.entities[chem_id], doc.entities[gene_id]
    if chem.type != CHEMICAL or not gene.is_gene:
        return fail(f"relation must go CHEMICAL→GENE, got {chem.type}({chem_id})→{gene.type}({gene_id})")
    return Relation(rtype, chem_id, gene_id)


def _format_rows(path: Path, rows: Iterable[tuple], columns: int) -> list[str]:
    """Render rows as TSV lines, refusing a field that holds a tab or a line break (it would corrupt the file)."""
    lines: list[str] = []
    problems: list[Problem] = []
    for number, row in enumerate(rows, start=1):
        fields = [str(value) for value in row]
        assert len(fields) == columns, f"internal: {len(fields)} fields for a {columns}-column file"
        bad = [value for value in fields if "\t" in value or "\n" in value or "\r" in value]
        if bad:
            problems.append(Problem(path, number, f"cannot write a field holding a tab or line break: {bad[0]!r}"))
            continue
        lines.append("\t".join(fields))
    if problems:
        raise CorpusError(problems)
    return lines


def _atomic_write_all(files: dict[Path, Iterable[tuple]], columns: dict[Path, int]) -> None:
    """Render every file first, stage each as a temporary file beside its target, then rename them all.

    Nothing is renamed until every file is rendered and written, so an exception (a failing iterable, an invalid
    field, a full disk, Ctrl-C) leaves the targets as they were and removes the temporary files. Files are
    created with the usual ``0o666 & ~umask`` mode rather than ``mkstemp``'s private ``0o600``.
    """
    rendered = {Path(path): _format_rows(Path(path), rows, columns[path]) for path, rows in files.items()}
    staged: list[tuple[str, Path]] = []
    try:
        for path, lines in rendered.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                    break
                except FileExistsError:
                    continue
            staged.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
                for line in lines:
                    handle.write(line + "\n")
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_relations(path: str | os.PathLike, rows: Iterable[tuple[str, Relation]]) -> None:
    """Write ``(pmid, relation)`` rows in the official format ``PMID\\tTYPE\\tArg1:Tn\\tArg2:Tm``."""
    path = Path(path)
    _atomic_write_all({path: ((pmid, r.type, f"Arg1:{r.chemical}", f"Arg2:{r.gene}") for pmid, r in rows)}, {path: 4})


def write_split(data_dir: str | os.PathLike, split: str, documents: Iterable[Document]) -> None:
    """Write documents as an official split folder (abstracts, entities, relations with duplicates as read).

    All three files are rendered and staged before any is replaced, so a failure leaves the old split intact.
    """
    docs = list(documents)
    folder = Path(data_dir) / split
    abstracts = folder / f"drugprot_{split}_abstracs.tsv"
    entities = folder / f"drugprot_{split}_entities.tsv"
    relations = folder / f"drugprot_{split}_relations.tsv"
    _atomic_write_all(
        {
            abstracts: ((d.pmid, d.title, d.abstract) for d in docs),
            entities: ((d.pmid, e.id, e.type, e.start, e.end, e.text) for d in docs for e in d.entities.values()),
            relations: (
                (d.pmid, r.type, f"Arg1:{r.chemical}", f"Arg2:{r.gene}")
                for d in docs
                for r in [*d.relations, *d.duplicate_relations]
            ),
        },
        {abstracts: 3, entities: 6, relations: 4},
    )
