"""serving.schemas through the app: every invalid request gets a 422 naming the document and field, and every
request over a limit a 413."""

from __future__ import annotations

import re

import pytest

from fixtures_serving import client, ensemble, many_docs, one_doc  # noqa: F401 - fixtures client, ensemble


def entity(**overrides) -> dict:
    return {"id": "T9", "type": "CHEMICAL", "start": 0, "end": 7, **overrides}


INVALID = [
    ("malformed JSON", b'{"documents": [', r"^request body: malformed JSON"),
    ("invalid UTF-8", b'{"documents": "\x80"}', r"^request body: malformed JSON \(not valid UTF-8 text at byte 15\)$"),
    ("deep nesting", b'{"documents": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
     r"^request body: malformed JSON \(nested too deeply\)$"),
    ("JSON null", b"null", r'^request body: expected a JSON object \{"documents": \[...\]\}, got JSON null$'),
    ("boolean offset", {"documents": [one_doc(entities=[entity(start=True)])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\]\.start: Input should be a valid integer"),
    ("string threshold", {"documents": [one_doc()], "threshold": "0.5"}, r"^threshold: Input should be a valid number"),
    ("string interval bound", {"documents": [one_doc()], "interval": ["-3", 3]},
     r"^interval\[0\]: Input should be a valid integer"),
    ("not an object", b"[1, 2]", r'^request body: expected a JSON object \{"documents": \[...\]\}, got JSON list'),
    ("empty body", b"", r'^request body: expected a JSON object \{"documents": \[...\]\}, got an empty body$'),
    ("no documents", {"docs": []}, r"^documents: Field required"),
    ("empty documents", {"documents": []}, r"^documents: List should have at least 1 item"),
    ("missing id", {"documents": [{"text": "x"}]}, r"^documents\[0\]: id: Field required"),
    ("missing entity field", {"documents": [one_doc(entities=[{"id": "T1", "type": "CHEMICAL", "start": 0}])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\]\.end: Field required"),
    ("unknown type", {"documents": [one_doc(entities=[entity(type="DRUG")])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\]\.type: Input should be 'CHEMICAL', 'GENE', 'GENE-Y' or 'GENE-N'"),
    ("offsets outside", {"documents": [one_doc(entities=[entity(start=20, end=99)])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\] \(id 'T9'\): offsets 20-99 lie outside the text \(length 32\)"),
    ("negative start", {"documents": [one_doc(entities=[entity(start=-1)])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\]\.start: Input should be greater than or equal to 0"),
    ("end before start", {"documents": [one_doc(entities=[entity(start=5, end=3)])]},
     r"entities\[0\] \(id 'T9'\): end 3 must be greater than start 5"),
    ("text mismatch", {"documents": [one_doc(entities=[entity(text="Aspirim")])]},
     r"^documents\[0\] \(id 'd1'\): entities\[0\] \(id 'T9'\): text 'Aspirim' does not match the text at 0-7 \('Aspirin'\)"),
    ("duplicate entity ids", {"documents": [one_doc(entities=[entity(id="T1"), entity(id="T1", start=17, end=22)])]},
     r"^documents\[0\] \(id 'd1'\): entities\[1\] \(id 'T1'\): duplicate entity id \(also entities\[0\]\)"),
    ("duplicate document ids", {"documents": [one_doc(), one_doc()]},
     r"^documents\[1\] \(id 'd1'\): duplicate document id \(also documents\[0\]\)"),
    ("text and title", {"documents": [one_doc(title="t", abstract="a")]},
     r"^documents\[0\] \(id 'd1'\): give either text, or title and abstract, not both"),
    ("no text", {"documents": [{"id": "d1", "title": "t"}]},
     r"^documents\[0\] \(id 'd1'\): give text, or title and abstract \(abstract missing\)"),
    ("unknown field", {"documents": [one_doc(pmid="1")]}, r"^documents\[0\] \(id 'd1'\): pmid: Extra inputs are not permitted"),
    ("interval out of bounds", {"documents": [one_doc()], "interval": [-80, 3]},
     r"^interval: Value error, needs -50 <= LO <= HI <= 50, got \[-80, 3\]|^interval: needs -50 <= LO <= HI <= 50"),
    ("threshold above 1", {"documents": [one_doc()], "threshold": 1.5}, r"^threshold: Input should be less than or equal to 1"),
    ("NaN threshold", b'{"documents": [{"id": "a", "text": "x"}], "threshold": NaN}', r"^threshold: Input should be a finite number"),
    ("unpaired surrogate", b'{"documents": [{"id": "a", "text": "\\ud800"}]}',
     r"^documents\[0\] \(id 'a'\): text: text is not valid Unicode \(unpaired surrogate at character 0\)"),
]


@pytest.mark.parametrize("case, body, message", INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_requests_get_422_naming_document_and_field(client, case, body, message):
    if isinstance(body, bytes):
        response = client.post("/v1/relations", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/relations", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert response.json()["problems"][0] == detail
    assert re.search(message, detail), detail


@pytest.mark.parametrize("documents, message", [
    (many_docs(21), r"^documents: 21 documents exceed the limit of 20 per request; split the request$"),
    (many_docs(2, chars=20_001), r"^documents: 40002 characters of text exceed the limit of 40000 per request"),
    (many_docs(2, chars=2000, genes=200), r"^documents: 402 entities exceed the limit of 400 per request"),
    (many_docs(20, genes=17, chars=200), r"^documents: 340 candidate pairs exceed the limit of 300 per request \(most from "
                                          r"documents\[0\] \(id 'doc0'\): 17\); send fewer documents or a narrower interval$"),
])
def test_requests_over_a_limit_get_413(client, documents, message):
    response = client.post("/v1/relations", json={"documents": documents})
    assert response.status_code == 413, response.text
    assert re.search(message, response.json()["detail"]), response.json()["detail"]
