"""HTTP request and response models, and the one place that turns validation errors into readable messages.

A document is ``{id, text}`` or ``{id, title, abstract}`` (then text = title + " " + abstract, as in the official
corpus) with entities ``{id, type, start, end, text?}`` whose offsets index into that text (0-based, end exclusive).
Every model forbids unknown keys. Pydantic only; no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drugprot.corpus import Document, Entity

EntityType = Literal["CHEMICAL", "GENE", "GENE-Y", "GENE-N"]
INTERVAL_BOUND = 50  # |GENE interval| a request may ask for; the model's own default is (-10, 16)


class _Strict(BaseModel):
    """No unknown keys, and no coercion: ``"start": true`` or ``"threshold": "0.5"`` are errors, not 1 and 0.5."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _utf8(value: str | None, what: str) -> str | None:
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"{what} is not valid Unicode (unpaired surrogate at character {error.start})") from None
    return value


class EntityIn(_Strict):
    id: str = Field(..., min_length=1, max_length=128, description="Entity id, unique within its document (e.g. T1).")
    type: EntityType = Field(..., description="CHEMICAL, GENE, GENE-Y or GENE-N.")
    start: int = Field(..., ge=0, description="First character (0-based) in the document text.")
    end: int = Field(..., ge=1, description="One past the last character.")
    text: str | None = Field(None, description="The mention; when given it must equal text[start:end].")

    @field_validator("id", "text")
    @classmethod
    def _valid_unicode(cls, value: str | None, info) -> str | None:
        return _utf8(value, info.field_name)


class DocumentIn(_Strict):
    id: str = Field(..., min_length=1, max_length=256, description="Document id (a PMID); unique within the request.")
    text: str | None = Field(None, description="Full text; or give title and abstract instead.")
    title: str | None = Field(None, description="Title (with abstract: text = title + ' ' + abstract).")
    abstract: str | None = Field(None, description="Abstract (with title).")
    entities: list[EntityIn] = Field(default_factory=list, description="Entity mentions with offsets into the text.")

    @field_validator("id", "text", "title", "abstract")
    @classmethod
    def _valid_unicode(cls, value: str | None, info) -> str | None:
        return _utf8(value, info.field_name)

    @model_validator(mode="after")
    def _consistent(self) -> DocumentIn:
        if self.text is not None and (self.title is not None or self.abstract is not None):
            raise ValueError("give either text, or title and abstract, not both")
        if self.text is None and (self.title is None or self.abstract is None):
            missing = [name for name in ("title", "abstract") if getattr(self, name) is None]
            raise ValueError(f"give text, or title and abstract ({' and '.join(missing)} missing)")
        text = self.full_text
        problems = []
        seen: dict[str, int] = {}
        for i, entity in enumerate(self.entities):
            where = f"entities[{i}] (id {entity.id!r})"
            if entity.id in seen:
                problems.append(f"{where}: duplicate entity id (also entities[{seen[entity.id]}])")
            seen.setdefault(entity.id, i)
            if entity.end <= entity.start:
                problems.append(f"{where}: end {entity.end} must be greater than start {entity.start}")
            elif entity.end > len(text):
                problems.append(f"{where}: offsets {entity.start}-{entity.end} lie outside the text "
                                f"(length {len(text)})")
            elif entity.text is not None and text[entity.start:entity.end] != entity.text:
                problems.append(f"{where}: text {entity.text!r} does not match the text at {entity.start}-{entity.end} "
                                f"({text[entity.start:entity.end]!r})")
        if problems:
            raise ValueError("; ".join(problems[:10]) + (f"; … and {len(problems) - 10} more" if len(problems) > 10 else ""))
        return self

    @property
    def full_text(self) -> str:
        return self.text if self.text is not None else f"{self.title} {self.abstract}"

    def to_document(self, key: str) -> Document:
        """A corpus Document under the internal ``key`` (its pmid); offsets and text are unchanged."""
        if self.text is not None:
            title, abstract = self.text, ""  # Document.text appends one space: offsets stay valid
        else:
            title, abstract = self.title, self.abstract
        text = self.full_text
        entities = {e.id: Entity(e.id, e.type, e.start, e.end, text[e.start:e.end]) for e in self.entities}
        return Document(key, title, abstract, entities)


class RelationsRequest(_Strict):
    documents: list[DocumentIn] = Field(..., min_length=1, description="Documents to annotate.")
    interval: list[int] | None = Field(None, min_length=2, max_length=2, description=f"GENE interval [LO, HI] override, within "
                                                               f"[-{INTERVAL_BOUND}, {INTERVAL_BOUND}] (default: the model's).")
    threshold: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                             description="Drop relations scoring below this (0..1).")

    @field_validator("interval")
    @classmethod
    def _bounded_interval(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            low, high = value
            if not -INTERVAL_BOUND <= low <= high <= INTERVAL_BOUND:
                raise ValueError(f"needs -{INTERVAL_BOUND} <= LO <= HI <= {INTERVAL_BOUND}, got [{low}, {high}]")
        return value

    @model_validator(mode="after")
    def _unique_ids(self) -> RelationsRequest:
        seen: dict[str, int] = {}
        for i, document in enumerate(self.documents):
            if document.id in seen:
                raise ValueError(f"documents[{i}] (id {document.id!r}): duplicate document id (also documents[{seen[document.id]}])")
            seen[document.id] = i
        return self


class RelationOut(_Strict):
    chemical: str = Field(..., description="Entity id of the CHEMICAL (Arg1).")
    gene: str = Field(..., description="Entity id of the GENE (Arg2).")
    type: str = Field(..., description="One of the 13 DrugProt relation types.")
    score: float = Field(..., description="Vote share (hard voting) or mean probability (soft voting).")
    votes: list[str] = Field(..., description="Each member's label for the pair (NONE included).")


class DocumentRelations(_Strict):
    id: str
    candidates: int = Field(..., description="Candidate pairs the model scored for this document.")
    relations: list[RelationOut]


class RelationsResponse(_Strict):
    documents: list[DocumentRelations]


class MemberInfo(BaseModel):
    name: str | None = None
    seed: int | None = None
    encoder: str | None = None
    system: str | None = None
    markers: str | None = None
    dev_f1: float | None = Field(None, description="F1 on development half A, the half its checkpoint was chosen on.")


class RolloutInfo(BaseModel):
    mode: Literal["canary", "shadow"]
    canary_percent: int = Field(..., description="Share of requests (%) the challenger answers while it is ready.")
    challenger: str = Field(..., description="What the challenger was started with (folder or models:/ URI).")
    challenger_state: Literal["loading", "ready", "failed"] = Field(..., description="loading or failed: the champion "
                                                                    "answers every request.")
    challenger_error: str | None = Field(None, description="Why the challenger does not serve (state failed).")
    challenger_version: str | None = Field(None, description="The challenger's registry version, once it serves.")
    shadow: dict[str, Any] | None = Field(None, description="Shadow only, as counted by the ingress replica that "
                                          "answered: challenger calls (compared, failed, timed_out, skipped) and per "
                                          "relation type agreed / champion_only / challenger_only with the agreed "
                                          "share.")


class ModelInfo(BaseModel):
    uri: str = Field(..., description="What the replica was started with (folder or models:/ URI).")
    name: str | None = Field(None, description="Registered model name.")
    version: str | None = Field(None, description="Registered model version.")
    alias: str | None = Field(None, description="Registry alias (e.g. champion).")
    dev_f1: float | None = Field(None, description="Development F1 recorded at promotion (or of the single member).")
    vote: str
    interval: tuple[int, int]
    members: list[MemberInfo]
    device: str
    precision: str
    execution: str | None = Field(None, description="How members run: loop, or stacked (fold).")
    max_batch_pairs: int
    batch_wait_ms: float
    limits: dict[str, int]
    metadata: dict[str, Any] = Field(default_factory=dict, description="The model's own metadata, as recorded.")
    swap_error: str | None = Field(None, description="With --follow-alias: the version the alias last moved to that "
                                   "could not be served, and why (this version goes on serving).")
    rollout: RolloutInfo | None = Field(None, description="With a challenger: the rollout and the challenger's state "
                                        "(this model is the champion).")


class ErrorResponse(BaseModel):
    detail: str = Field(..., description="What was wrong and where (document, field).")
    problems: list[str] = Field(default_factory=list, description="Every problem found, one per line.")


def _doc_label(body: Any, index: int) -> str:
    label = f"documents[{index}]"
    try:
        doc_id = body["documents"][index]["id"]
    except (KeyError, IndexError, TypeError):
        return label
    if isinstance(doc_id, (str, int)) and len(str(doc_id)) <= 256:
        return f"{label} (id {str(doc_id)!r})"
    return label


def describe_errors(errors: Sequence[dict[str, Any]], body: Any = None, *, raw: bytes | None = None,
                    limit: int = 20) -> list[str]:
    """Pydantic/FastAPI errors → one message each, naming the document (index and id) and the field; ``raw`` (the
    body as received) tells an empty body from a JSON ``null``."""
    messages = []
    for error in list(errors)[:limit]:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        kind = error.get("type", "")
        if kind == "json_invalid":
            position = error.get("ctx", {}).get("error", "") if isinstance(error.get("ctx"), dict) else ""
            messages.append(f"request body: malformed JSON{f' ({position})' if position else ''}")
            continue
        if not loc and kind in ("model_attributes_type", "model_type", "dict_type", "missing"):
            empty = error.get("input") in (None, b"") and (raw is None or not raw.strip())
            found = "an empty body" if empty else "JSON null" if error.get("input") is None else (
                "a non-JSON body (send Content-Type: application/json)" if isinstance(error.get("input"), bytes)
                else f"JSON {type(error.get('input')).__name__}")
            messages.append(f'request body: expected a JSON object {{"documents": [...]}}, got {found}')
            continue
        if len(loc) >= 2 and loc[0] == "documents" and isinstance(loc[1], int):
            where = _doc_label(body, loc[1])
            rest = loc[2:]
            field = ""
            for part in rest:
                field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
            messages.append(f"{where}: {field}: {message}" if field else f"{where}: {message}")
        elif loc:
            field = ""
            for part in loc:
                field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
            messages.append(f"{field}: {message}")
        elif message.startswith("documents["):
            messages.append(message)  # a request-level check that already names the document
        else:
            messages.append(f"request body: {message}")
    if len(errors) > limit:
        messages.append(f"… and {len(errors) - limit} more")
    return messages
