"""serving.api (FastAPI TestClient or straight ASGI, no Serve): answers equal ``predict``, the byte limit, the token,
the latency objective's 503, the page, stalled bodies, and a bounded fuzz of request bodies."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drugprot.errors import DrugprotError
from drugprot.polling import poll
from drugprot.serving.api import create_api, resolve_token
from fixtures_serving import (answered, client, document_json, ensemble, expected, many_docs, one_doc,  # noqa: F401
                              service_for)


# ---- the HTTP app (FastAPI TestClient, no Serve) -------------------------------------------------------------
def test_one_request_with_the_development_sample_equals_predict(client, ensemble, dev_documents):
    response = client.post("/v1/relations", json={"documents": [document_json(d) for d in dev_documents]})
    assert response.status_code == 200
    got = answered(response.json())
    want = expected(ensemble, dev_documents)
    assert got == want  # labels, scores (mean probabilities, 6 decimals) and every member's vote, exactly
    assert sum(len(v) for v in want.values()) > 20 and len({r[2] for v in want.values() for r in v}) > 5
    assert [d["candidates"] for d in response.json()["documents"]] == [len(ensemble.candidates([d])) for d in dev_documents]


def test_text_form_interval_and_threshold(client, ensemble, dev_documents):
    docs = dev_documents[:3]
    by_title = client.post("/v1/relations", json={"documents": [document_json(d) for d in docs]}).json()
    by_text = client.post("/v1/relations", json={"documents": [document_json(d, form="text") for d in docs]}).json()
    assert answered(by_text) == answered(by_title)
    narrow = client.post("/v1/relations", json={"documents": [document_json(d) for d in docs], "interval": [0, 0],
                                                "threshold": 0.4}).json()
    assert answered(narrow) == expected(ensemble, docs, interval=(0, 0), threshold=0.4)
    assert all(r[3] >= 0.4 for rels in answered(narrow).values() for r in rels)


def test_arrivals_are_counted_until_queued_or_answered(client):
    service = client.service
    assert service._preparing == 0
    assert client.post("/v1/relations", json={"documents": [one_doc()]}).status_code == 200
    assert client.post("/v1/relations", content=b"{", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/v1/relations", json={"documents": many_docs(21)}).status_code == 413
    assert service._preparing == 0


def test_a_request_refused_by_the_latency_objective_is_a_json_503_with_retry_after(ensemble):
    service = service_for(ensemble, max_queue_wait_s=0.5)
    model = service.model
    busy = threading.Event()
    model._executor.submit(busy.wait, 30)  # the model thread is busy: the next batch waits behind it
    model.batcher.pairs_per_s = 0.5  # as if the recent model calls had been this slow
    with TestClient(create_api(service)) as http:
        admitted: dict = {}
        waiting = threading.Thread(target=lambda: admitted.update(
            response=http.post("/v1/relations", json={"documents": [one_doc()]})))
        waiting.start()
        assert poll(lambda: model.batcher.expected_wait_s() or None, timeout=30, interval=0.01), "never queued"
        refused = http.post("/v1/relations", json={"documents": [one_doc()]})
        busy.set()
        waiting.join(60)
    found = re.search(r"would wait about (\d+\.\d) s in its queue, beyond the 0\.5 s objective \(--max-queue-wait-s\)",
                      refused.json()["detail"])
    assert refused.status_code == 503 and found, refused.json()
    expected = float(found.group(1))  # rounded to 0.1 s; Retry-After is the wait rounded up to whole seconds
    assert max(1, math.ceil(expected - 0.05)) <= int(refused.headers["retry-after"]) <= max(1, math.ceil(expected + 0.05))
    assert admitted["response"].status_code == 200  # admitted before the queue built up: answered, however late


def test_bodies_over_the_byte_limit_get_413_declared_or_streamed(client):
    big = json.dumps({"documents": many_docs(1, chars=250_000)}).encode()
    response = client.post("/v1/relations", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"] == "request body: larger than the limit of 200000 bytes; split the request"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(big), 65_536):
            yield big[start:start + 65_536]

    streamed = client.post("/v1/relations", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_bearer_token_guards_everything_but_probes_and_docs(ensemble):
    service = service_for(ensemble)
    body = {"documents": [one_doc()]}
    with TestClient(create_api(service, token="s3cret")) as secured:
        missing = secured.post("/v1/relations", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["detail"] == "missing or invalid bearer token: send 'Authorization: Bearer <token>'"
        assert secured.post("/v1/relations", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert secured.get("/v1/model").status_code == 401
        assert secured.post("/v1/relations", content=b"{", headers={"content-type": "application/json"}).status_code == 401
        assert secured.post("/v1/relations", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert secured.get("/healthz").status_code == 200 and secured.get("/readyz").status_code == 200
        assert secured.get("/v1/nothing-here").status_code == 401  # deny by default, not 404
    with TestClient(create_api(service, token="s3cret"), root_path="/secure") as prefixed:  # behind a route prefix
        assert prefixed.post("/secure/v1/relations", json=body).status_code == 401
        assert prefixed.get("/secure/readyz").status_code == 200
        assert prefixed.post("/secure/v1/relations", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with TestClient(create_api(service, token=None)) as open_client:
        assert open_client.post("/v1/relations", json=body).status_code == 200


def test_token_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("DRUGPROT_TEST_TOKEN", " abc ")
    assert resolve_token("DRUGPROT_TEST_TOKEN") == "abc"
    monkeypatch.delenv("DRUGPROT_TEST_TOKEN")
    assert resolve_token("DRUGPROT_TEST_TOKEN") is None and resolve_token(None) is None
    with pytest.raises(DrugprotError, match="require_token is set but the environment variable DRUGPROT_TEST_TOKEN is empty"):
        resolve_token("DRUGPROT_TEST_TOKEN", required=True)


def test_model_info_and_openapi(client):
    info = client.get("/v1/model").json()
    assert info["vote"] == "soft" and info["interval"] == [-10, 16] and len(info["members"]) == 3
    assert {m["encoder"] for m in info["members"]} == {"tiny-random"} and info["precision"] == "fp32"
    assert info["limits"]["max_pairs"] == 300
    schema = client.get("/openapi.json").json()
    assert {"/v1/relations", "/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    assert "413" in schema["paths"]["/v1/relations"]["post"]["responses"]


# ---- fuzz: nothing a client sends crashes the app ----------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25)
entity_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=5), st.integers()), "type": st.sampled_from(["CHEMICAL", "GENE", "GENE-Y", "GENE-N", "X", ""]),
     "start": st.integers(-5, 60), "end": st.integers(-5, 60)},
    optional={"text": st.text(max_size=8), "extra": json_values})
document_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=6), st.integers(), st.none())},
    optional={"text": st.text(max_size=60), "title": st.text(max_size=30), "abstract": st.text(max_size=30),
              "entities": st.lists(entity_like, max_size=6)})
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"documents": st.lists(document_like, max_size=4)},
                          optional={"interval": json_values, "threshold": json_values}),
)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, raw=st.binary(max_size=64), as_raw=st.booleans())
def test_fuzzed_bodies_never_crash_the_app(client, body, raw, as_raw):
    if as_raw:
        response = client.post("/v1/relations", content=raw, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/relations", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code in (200, 413, 422), (response.status_code, response.text)
    if response.status_code != 200:
        assert response.json()["detail"]
    else:
        assert len(response.json()["documents"]) == len(body["documents"])


def test_the_app_still_answers_after_the_fuzz(client):
    assert client.post("/v1/relations", json={"documents": [one_doc()]}).status_code == 200
    assert client.service.model.batcher.stats.failed_batches == 0


# ---- stalled bodies: timeouts and caps on unfinished uploads ------------------------------------------------------
async def asgi_post(app, parts: list[bytes], *, stall: bool, client: str = "10.0.0.1",
                    stalled: asyncio.Event | None = None) -> tuple[int, dict]:
    """POST /v1/relations straight into the ASGI app; ``stall`` leaves the body unfinished after ``parts``, and
    ``stalled`` is set once the app asks for more than ``parts`` (it has admitted the body and waits for the rest)."""
    messages = [{"type": "http.request", "body": part, "more_body": stall or i < len(parts) - 1}
                for i, part in enumerate(parts)]

    async def receive():
        if messages:
            return messages.pop(0)
        if stalled is not None:
            stalled.set()
        await asyncio.Event().wait()  # the client sends nothing more

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/relations", "raw_path": b"/v1/relations", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "client": (client, 5000), "server": ("x", 80)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


async def held_in_app(app, parts: list[bytes], clients: list[str]) -> list[asyncio.Task]:
    """One stalling POST from each of ``clients``, returned once the app holds every one waiting for its body."""
    stalled = [asyncio.Event() for _ in clients]
    tasks = [asyncio.create_task(asgi_post(app, parts, stall=True, client=client, stalled=event))
             for client, event in zip(clients, stalled)]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in stalled)), 5)
    return tasks


def test_stalled_bodies_time_out_and_cannot_crowd_out_whole_requests(ensemble):
    service = service_for(ensemble, limits={"body_timeout_s": 5, "body_idle_timeout_s": 0.5, "max_unfinished_bodies": 3,
                                            "max_unfinished_bodies_per_client": 2})
    app = create_api(service)
    whole = json.dumps({"documents": [one_doc()]}).encode()

    async def scenario():
        stalled = await held_in_app(app, [b'{"documents": ['], ["10.0.0.1"] * 2)
        third = await asgi_post(app, [b'{"documents": ['], stall=True)  # same address, over its share
        other = await asgi_post(app, [b'{"documents": ['], stall=True, client="10.0.0.2")  # a new address: admitted
        ordinary = await asgi_post(app, [whole], stall=False)  # whole in its first part: never counted
        return third, ordinary, await asyncio.gather(*stalled), other

    third, ordinary, stalled, other = asyncio.run(scenario())
    assert third[0] == 429 and "too many unfinished requests from 10.0.0.1" in third[1]["detail"]
    assert ordinary[0] == 200 and ordinary[1]["documents"][0]["candidates"] == 1
    assert [status for status, _ in stalled] == [408, 408] and other[0] == 408
    assert stalled[0][1]["detail"] == ("request body: not received in time (a body must arrive within 5 s, "
                                       "pausing at most 0.5 s)")

    async def crowd():
        held = await held_in_app(app, [b"{"], [f"10.1.0.{i}" for i in range(3)])
        refused = await asgi_post(app, [b"{"], stall=True, client="10.1.0.9")
        await asyncio.gather(*held)
        return refused

    status, body = asyncio.run(crowd())
    assert status == 503 and body["detail"] == "server busy receiving other requests; retry shortly"


def test_the_page_is_served_without_a_token_and_carries_the_bundled_example(ensemble, dev_documents):
    with TestClient(create_api(service_for(ensemble), token="s3cret")) as secured:
        page = secured.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert secured.get("/v1/model").status_code == 401  # the API behind it still needs the token
    example = json.loads(re.search(r'<script id="example" type="application/json">(.*?)</script>', page.text, re.S)[1])
    first = dev_documents[0]
    assert (example["title"], example["abstract"]) == (first.title, first.abstract)
    assert len(example["entities"]) == len(first.entities)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text) and "fetch(\"v1/relations\"" in page.text
