"""Documents and predicted relations as plain records and pandas DataFrames (the pyfunc and Ray Data formats).

A document record: ``pmid``, ``title``, ``abstract`` and ``entities``, a list of ``{"id", "type", "start",
"end", "text"}`` (offsets into ``title + " " + abstract``, as in the official entities file); ``entities`` may
also be that list as a JSON string. A relation record: ``pmid``, ``type``, ``arg1`` (chemical id), ``arg2``
(gene id), ``score`` and ``votes`` (each member's label, comma-separated).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from drugprot.corpus import ENTITY_TYPES, Document, Entity
from drugprot.errors import DrugprotError

DOCUMENT_COLUMNS = ("pmid", "title", "abstract", "entities")
RELATION_COLUMNS = ("pmid", "type", "arg1", "arg2", "score", "votes")


class InputError(DrugprotError):
    pass


def document_record(document: Document) -> dict[str, Any]:
    return {"pmid": document.pmid, "title": document.title, "abstract": document.abstract,
            "entities": [{"id": e.id, "type": e.type, "start": e.start, "end": e.end, "text": e.text}
                         for e in document.entities.values()]}


def document_from_record(record: Mapping[str, Any], where: str = "document") -> Document:
    """A Document from a record; a missing field or a bad entity is an :class:`InputError` naming the row."""
    missing = [c for c in DOCUMENT_COLUMNS if c not in record]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}; expected {', '.join(DOCUMENT_COLUMNS)}")
    entities = record["entities"]
    if isinstance(entities, str):
        try:
            entities = json.loads(entities)
        except ValueError as error:
            raise InputError(f"{where}: entities is a string but not JSON ({error})") from None
    if hasattr(entities, "tolist"):  # a numpy array from pandas / Ray Data
        entities = entities.tolist()
    document = Document(str(record["pmid"]), str(record["title"]), str(record["abstract"]))
    text = document.text
    for i, raw in enumerate(entities or ()):
        try:
            entity = Entity(str(raw["id"]), str(raw["type"]), int(raw["start"]), int(raw["end"]), str(raw.get("text", "")))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{where}: entity {i}: expected id, type, start, end (and text), got {raw!r} ({error})") from None
        if entity.type not in ENTITY_TYPES:
            raise InputError(f"{where}: entity {entity.id}: type must be one of {', '.join(ENTITY_TYPES)}, got {entity.type!r}")
        if not 0 <= entity.start < entity.end <= len(text):
            raise InputError(f"{where}: entity {entity.id}: offsets [{entity.start}, {entity.end}) outside the text "
                             f"(title + ' ' + abstract has {len(text)} characters)")
        document.entities[entity.id] = entity
    return document


def documents_to_frame(documents: Sequence[Document]):
    import pandas as pd

    return pd.DataFrame([document_record(d) for d in documents], columns=list(DOCUMENT_COLUMNS))


def frame_to_documents(frame) -> list[Document]:
    import pandas as pd

    if isinstance(frame, Mapping):
        frame = pd.DataFrame(frame)
    if not isinstance(frame, pd.DataFrame):
        if isinstance(frame, Sequence) and all(isinstance(r, Mapping) for r in frame):
            frame = pd.DataFrame(list(frame))
        else:
            raise InputError(f"expected a pandas DataFrame of documents, got {type(frame).__name__}")
    missing = [c for c in DOCUMENT_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"input DataFrame lacks column(s) {', '.join(missing)}; expected {', '.join(DOCUMENT_COLUMNS)}, "
                         f"found {', '.join(map(str, frame.columns))}")
    return [document_from_record(row, f"row {i}") for i, row in enumerate(frame.to_dict("records"))]


def relation_records(documents: Sequence[Document], predictions: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [{"pmid": r.pmid, "type": r.type, "arg1": r.chemical, "arg2": r.gene, "score": r.score,
             "votes": ",".join(r.votes)} for preds in predictions for r in preds]


def relations_to_frame(documents: Sequence[Document], predictions: Sequence[Sequence[Any]]):
    import pandas as pd

    return pd.DataFrame(relation_records(documents, predictions), columns=list(RELATION_COLUMNS))
