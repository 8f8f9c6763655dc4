"""Shared serving helpers: the in-process service and its test client, request bodies, answers compared with
``predict``, a private Ray with Serve and waits for a service to come up, a loopback HTTP server in a thread and the
page as headless Chromium renders it (import what you use into your test module; ``relation_members`` comes from
``fixtures_models``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient

from drugprot.inference import Predictor
from drugprot.local_ray import local_serve
from drugprot.model.artifacts import load_artifact
from drugprot.polling import poll
from drugprot.serving.api import create_api
from drugprot.serving.options import parse_options
from drugprot.serving.service import ModelService, RelationService


def document_json(doc, *, form: str = "title") -> dict:
    entities = [{"id": e.id, "type": e.type, "start": e.start, "end": e.end, "text": e.text} for e in doc.entities.values()]
    if form == "text":
        return {"id": doc.pmid, "text": doc.text, "entities": entities}
    return {"id": doc.pmid, "title": doc.title, "abstract": doc.abstract, "entities": entities}


def expected(predictor, documents, **kwargs) -> dict[str, list[tuple]]:
    """``Predictor.predict`` as the HTTP answer would show it: per document id, (chemical, gene, type, score, votes)."""
    predictions = predictor.predict(documents, **kwargs)
    return {d.pmid: [(r.chemical, r.gene, r.type, r.score, list(r.votes)) for r in rel] for d, rel in zip(documents, predictions)}


def answered(body: dict) -> dict[str, list[tuple]]:
    return {d["id"]: [(r["chemical"], r["gene"], r["type"], r["score"], r["votes"]) for r in d["relations"]]
            for d in body["documents"]}


def assert_equal_up_to_rounding(got: dict[str, list[tuple]], want: dict[str, list[tuple]]) -> None:
    """Same relations, labels and votes; scores within float rounding (a request scored in other call shapes)."""
    assert {k: [(*r[:3], r[4]) for r in v] for k, v in got.items()} == {k: [(*r[:3], r[4]) for r in v] for k, v in want.items()}
    assert all(abs(g[3] - w[3]) <= 2e-6 for k in want for g, w in zip(got[k], want[k]))


def service_for(predictor, **options) -> RelationService:
    """Ingress and model halves in this process: the model warmed up, the ingress calling it directly."""
    parsed = parse_options({"model": "(in-process)", "warmup_rounds": 1, **options})
    model = ModelService(predictor, parsed)
    model.start_warmup().result(timeout=120)
    return RelationService(model, parsed)


@pytest.fixture(scope="module")
def ensemble(relation_members) -> Predictor:
    """Three opinionated members, soft voting: scores are real probabilities, votes differ between members."""
    return Predictor([load_artifact(p) for p in relation_members], vote="soft", device="cpu")


@pytest.fixture(scope="module")
def client(ensemble):
    service = service_for(ensemble, max_batch_pairs=300,  # no request is split: each runs as predict runs it, exactly
                          limits={"max_documents": 20, "max_characters": 40_000, "max_entities": 400,
                                  "max_pairs": 300, "max_body_bytes": 200_000})
    with TestClient(create_api(service)) as test_client:
        test_client.service = service
        yield test_client


async def until(condition, timeout: float = 5.0) -> None:
    """Yield to the event loop until ``condition()`` holds (what other tasks on this loop do next), failing after
    ``timeout`` seconds. Each turn waits for nothing but the other ready tasks: no fixed sleep."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0)  # one turn of the loop


def one_doc(**overrides) -> dict:
    doc = {"id": "d1", "text": "Aspirin inhibits COX-1 strongly.",
           "entities": [{"id": "T1", "type": "CHEMICAL", "start": 0, "end": 7, "text": "Aspirin"},
                        {"id": "T2", "type": "GENE-Y", "start": 17, "end": 22, "text": "COX-1"}]}
    doc.update(overrides)
    return doc


def many_docs(n: int, *, chars: int = 40, genes: int = 1) -> list[dict]:
    docs = []
    for i in range(n):
        text = "Aspirin inhibits " + " ".join(["COX1"] * genes)
        text += " " + "x" * max(0, chars - len(text) - 1)
        entities = [{"id": "C", "type": "CHEMICAL", "start": 0, "end": 7}]
        entities += [{"id": f"G{g}", "type": "GENE", "start": 17 + 5 * g, "end": 21 + 5 * g} for g in range(genes)]
        docs.append({"id": f"doc{i}", "text": text, "entities": entities})
    return docs


#: What starting a local Ray sets in this process's environment (``drugprot.local_ray.prepare_environment``).
RAY_ENV = ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_GCS_SERVER_PORT")


@contextmanager
def serve_cluster(port: int, *, gcs_port: int, env: dict[str, str], prefix: str, **init_options) -> Iterator[Path]:
    """A private Ray (2 CPUs, token auth, its own temporary folder) with Serve on 127.0.0.1:``port``, for a test
    module's fixture. ``env`` is set before Ray starts (the replicas and the proxy inherit it from the raylet); on
    exit Serve and Ray are stopped, the folder removed and the environment as it was before."""
    saved = {key: os.environ.get(key) for key in (*RAY_ENV, *env)}
    os.environ.update(env)
    try:
        with local_serve(port, root=tempfile.mkdtemp(prefix=prefix), gcs_port=gcs_port, **init_options) as root:
            yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_ready(url: str, timeout: float = 120) -> None:
    """Until ``url`` (an application's ``/readyz``) answers 200."""

    def ready() -> bool | None:
        try:
            return requests.get(url, timeout=5).status_code == 200 or None
        except requests.RequestException:
            return None

    assert poll(ready, timeout=timeout, interval=0.2), f"{url} not ready after {timeout} s"


def deploy(base: str, model: Path, applications: dict[str, dict]) -> dict[str, str]:
    """Deploy ``model`` (unless an application's options name another) as the applications named in
    ``applications`` (each name's serving options) together, each at ``/NAME`` under ``base``, and wait until each
    is ready; returns their URLs by name. An application with ``rollout`` gets its challenger's application too, not
    waited for (one that fails to load is a case to test)."""
    from ray import serve

    from drugprot.serving import build_app, build_challenger
    from drugprot.serving.app import challenger_app_name

    args = {name: {"model": str(model), **options} for name, options in applications.items()}
    challengers = [serve.RunTarget(build_challenger(options), name=challenger_app_name(name), route_prefix=None)
                   for name, options in args.items() if options.get("rollout")]
    if challengers:
        serve.run_many(challengers, wait_for_applications_running=False)
    serve.run_many([serve.RunTarget(build_app(options), name=name, route_prefix=f"/{name}")
                    for name, options in args.items()])
    for name in applications:
        wait_ready(f"{base}/{name}/readyz")
    return {name: f"{base}/{name}" for name in applications}


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` answering on a free loopback port from a thread of this process; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


def headless_dom(url: str, profile: Path) -> str:
    """The page at ``url`` as Debian's headless Chromium leaves it after its scripts ran (virtual time: no fixed
    sleep); ``profile`` is a fresh user-data folder."""
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--virtual-time-budget=30000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180).stdout


def wait_for_serve_command(process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until ``drugprot serve`` (``process``, its output in ``log``) says it is ready; fails at once with the log's
    end if it exits first."""

    def ready() -> bool | None:
        if b"drugprot serve: ready at" in log.read_bytes():
            return True
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        return None

    assert poll(ready, timeout=timeout, interval=0.5), f"drugprot serve did not become ready within {timeout:.0f} s"
