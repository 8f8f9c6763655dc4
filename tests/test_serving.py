"""Real Ray Serve over HTTP on 127.0.0.1: one private Ray and one Serve instance for the module, three applications.

* ``/open``: a three-member soft-voting ensemble, two replicas, no auth (parity, batching, a replica killed mid-load);
* ``/secure``: the same ensemble behind a bearer token, with small limits (auth, 413s, 422s through the proxy);
* ``/tight``: one replica, one request at a time, two queued, a long warm-up (readiness, overload → 503).

The ``drugprot serve`` command gets its own Ray in a subprocess and is stopped with SIGTERM.
Ports: Serve HTTP 8111 (CLI 8112), Ray GCS 6424 (CLI 6425).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from test_serving_unit import answered, document_json, expected, relation_members  # noqa: F401 - fixture

from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split

pytestmark = pytest.mark.slow

HTTP_PORT, GCS_PORT = 8111, 6424
CLI_HTTP_PORT, CLI_GCS_PORT = 8112, 6425
BASE = f"http://127.0.0.1:{HTTP_PORT}"
TOKEN_ENV = "DRUGPROT_SERVE_TEST_TOKEN"
RAY_ENV = ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_GCS_SERVER_PORT",
           TOKEN_ENV)


@pytest.fixture(scope="module")
def dev_documents():
    return read_split(SAMPLE_DIR, "development").documents


@pytest.fixture(scope="module")
def ensemble_dir(relation_members, tmp_path_factory) -> Path:  # noqa: F811
    from drugprot.ensemble import build_ensemble

    return build_ensemble(relation_members, tmp_path_factory.mktemp("serving") / "ensemble", vote="soft",
                          log=lambda _: None).path


@pytest.fixture(scope="module")
def reference(ensemble_dir):
    from drugprot.inference import load_predictor

    return load_predictor(ensemble_dir, device="cpu")


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def cluster(token):
    """A private Ray (2 CPUs, token auth, its own temp folder) with Serve on 127.0.0.1:8111; torn down after."""
    import ray
    from ray import serve

    from drugprot.serving.local import start_local_ray

    saved = {key: os.environ.get(key) for key in RAY_ENV}
    root = Path(tempfile.mkdtemp(prefix="drugprot-serve-test-"))
    os.environ[TOKEN_ENV] = token  # the replicas inherit it from the raylet
    start_local_ray(num_cpus=2, root=root, gcs_port=GCS_PORT, object_store_mb=256)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        yield root
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def apps(cluster, ensemble_dir):
    """``/open`` and ``/secure``, deployed together."""
    from ray import serve

    from drugprot.serving import build_app

    model = str(ensemble_dir)
    serve.run_many([
        serve.RunTarget(build_app({"model": model, "replicas": 2, "num_cpus": 0.5, "token_env": None,
                                   "max_batch_pairs": 64, "batch_wait_ms": 10}), name="open", route_prefix="/open"),
        serve.RunTarget(build_app({"model": model, "num_cpus": 0.25, "token_env": TOKEN_ENV, "require_token": True,
                                   "limits": {"max_documents": 3, "max_characters": 20_000, "max_entities": 200,
                                              "max_pairs": 60, "max_body_bytes": 20_000}}),
                        name="secure", route_prefix="/secure"),
    ])
    for app in ("open", "secure"):
        wait_ready(f"{BASE}/{app}/readyz")
    return {"open": f"{BASE}/open", "secure": f"{BASE}/secure"}


@pytest.fixture(scope="module")
def tight(cluster, ensemble_dir):
    """``/tight``: deployed on first use; records /readyz from the moment Serve reports the app running."""
    from ray import serve

    from drugprot.serving import build_app

    serve.run(build_app({"model": str(ensemble_dir), "num_cpus": 0.25, "token_env": None, "max_batch_pairs": 2,
                         "max_ongoing_requests": 1, "max_queued_requests": 2, "warmup_rounds": 150}),
              name="tight", route_prefix="/tight")
    url = f"{BASE}/tight"
    seen, early = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = requests.get(f"{url}/readyz", timeout=10)
        seen.append((response.status_code, response.json().get("status")))
        if early is None:
            early = requests.post(f"{url}/v1/relations", json={"documents": [small_doc()]}, timeout=10)
        if response.status_code == 200:
            break
        time.sleep(0.1)
    return url, seen, early


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s")


def small_doc(doc_id: str = "d1") -> dict:
    return {"id": doc_id, "text": "Aspirin inhibits COX-1 strongly.",
            "entities": [{"id": "T1", "type": "CHEMICAL", "start": 0, "end": 7, "text": "Aspirin"},
                         {"id": "T2", "type": "GENE-Y", "start": 17, "end": 22, "text": "COX-1"}]}


def replicas(app: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")}


# ---- the command line: its own Ray, stopped by SIGTERM (runs first, before the module's cluster exists) -----------
def test_drugprot_serve_runs_in_the_foreground_until_sigterm(ensemble_dir, tmp_path):
    env = {**os.environ, "RAY_GCS_SERVER_PORT": str(CLI_GCS_PORT), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR", "DRUGPROT_API_TOKEN"):
        env.pop(key, None)
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "drugprot", "serve", "--model", str(ensemble_dir),
                                "--port", str(CLI_HTTP_PORT), "--max-batch-pairs", "32"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while b"drugprot serve: ready at" not in (tmp_path / "serve.log").read_bytes():
            assert process.poll() is None, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "drugprot serve did not become ready"
            time.sleep(0.5)
        response = requests.post(f"http://127.0.0.1:{CLI_HTTP_PORT}/v1/relations",
                                 json={"documents": [small_doc()]}, timeout=30)
        assert response.status_code == 200 and response.json()["documents"][0]["candidates"] == 1
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        took = time.monotonic() - started
        output = (tmp_path / "serve.log").read_text(errors="replace")
        assert "drugprot serve: stopping" in output and "drugprot serve: stopped" in output
        assert took < 60
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{CLI_HTTP_PORT}/healthz", timeout=5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


# ---- parity with predict ---------------------------------------------------------------------------------------
def test_http_answers_equal_drugprot_predict_on_the_development_sample(apps, reference, ensemble_dir, dev_documents, tmp_path):
    from drugprot.cli import main

    response = requests.post(f"{apps['open']}/v1/relations",
                             json={"documents": [document_json(d) for d in dev_documents]}, timeout=60)
    assert response.status_code == 200
    got = answered(response.json())
    assert got == expected(reference, dev_documents)  # labels, scores, votes: exactly
    out = tmp_path / "predicted.tsv"
    assert main(["predict", "--model", str(ensemble_dir), "--data", str(SAMPLE_DIR), "--split", "development",
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = {tuple(line.split("\t")) for line in out.read_text().splitlines() if line}
    served = {(pmid, rel[2], f"Arg1:{rel[0]}", f"Arg2:{rel[1]}") for pmid, rels in got.items() for rel in rels}
    assert served == rows and len(rows) > 20


def test_concurrent_requests_are_batched_and_agree_with_predict(apps, reference, dev_documents):
    want = expected(reference, dev_documents)

    def one(doc):
        return requests.post(f"{apps['open']}/v1/relations", json={"documents": [document_json(doc)]}, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, dev_documents * 3))
    assert all(r.status_code == 200 for r in responses)
    for doc, response in zip(dev_documents * 3, responses):
        (relations,) = answered(response.json()).values()
        assert [r[:3] for r in relations] == [w[:3] for w in want[doc.pmid]]
        assert all(abs(r[3] - w[3]) <= 2e-6 for r, w in zip(relations, want[doc.pmid]))


# ---- errors through the proxy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, message", [
    (b'{"documents": [', 422, "request body: malformed JSON"),
    ({"documents": [{**small_doc(), "entities": [{"id": "T1", "type": "DRUG", "start": 0, "end": 7}]}]}, 422,
     "documents[0] (id 'd1'): entities[0].type: Input should be 'CHEMICAL', 'GENE', 'GENE-Y' or 'GENE-N'"),
    ({"documents": [{**small_doc(), "entities": [{"id": "T1", "type": "CHEMICAL", "start": 20, "end": 90}]}]}, 422,
     "documents[0] (id 'd1'): entities[0] (id 'T1'): offsets 20-90 lie outside the text (length 32)"),
    ({"documents": [{**small_doc(), "entities": [{"id": "T1", "type": "CHEMICAL", "start": 0, "end": 7, "text": "aspirin"}]}]},
     422, "documents[0] (id 'd1'): entities[0] (id 'T1'): text 'aspirin' does not match the text at 0-7 ('Aspirin')"),
    ({"documents": [small_doc(), small_doc()]}, 422, "documents[1] (id 'd1'): duplicate document id (also documents[0])"),
    ({"documents": [{"text": "x"}]}, 422, "documents[0]: id: Field required"),
    ({"documents": [small_doc(f"d{i}") for i in range(4)]}, 413,
     "documents: 4 documents exceed the limit of 3 per request; split the request"),
    ({"documents": [{**small_doc(), "text": "x" * 25_000, "entities": []}]}, 413,
     "request body: larger than the limit of 20000 bytes; split the request"),
])
def test_errors_over_http(apps, token, body, status, message):
    headers = {"Authorization": f"Bearer {token}"}
    if isinstance(body, bytes):
        response = requests.post(f"{apps['secure']}/v1/relations", data=body,
                                 headers={**headers, "content-type": "application/json"}, timeout=30)
    else:
        response = requests.post(f"{apps['secure']}/v1/relations", json=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith(message), response.json()["detail"]


def test_bearer_token_on_and_off(apps, token):
    body = {"documents": [small_doc()]}
    secure = f"{apps['secure']}/v1/relations"
    assert requests.post(secure, json=body, timeout=30).status_code == 401
    wrong = requests.post(secure, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.post(secure, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    assert requests.get(f"{apps['secure']}/readyz", timeout=10).status_code == 200  # probes stay open
    assert requests.post(f"{apps['open']}/v1/relations", json=body, timeout=30).status_code == 200
    info = requests.get(f"{apps['open']}/v1/model", timeout=10).json()
    assert info["vote"] == "soft" and [m["name"] for m in info["members"]] == ["m1-seed1", "m2-seed2", "m3-seed3"]
    assert info["execution"] == "fold" and info["precision"] == "fp32"
    assert requests.get(f"{apps['open']}/openapi.json", timeout=10).json()["info"]["title"] == "drugprot relation extraction"


# ---- readiness and overload -------------------------------------------------------------------------------------
def test_ready_only_after_warm_up(tight):
    url, seen, early = tight
    assert seen[0] == (503, "warming up"), seen[:3]
    assert seen[-1] == (200, "ready")
    assert early.status_code == 503 and "warming up" in early.json()["detail"]
    assert requests.post(f"{url}/v1/relations", json={"documents": [small_doc()]}, timeout=30).status_code == 200


def test_overload_gets_503_quickly_and_loses_no_accepted_request(tight, reference, dev_documents):
    url = tight[0]
    body = {"documents": [document_json(d) for d in dev_documents]}
    want = expected(reference, dev_documents)
    barrier = threading.Barrier(30)

    def one(_):
        barrier.wait()
        started = time.monotonic()
        response = requests.post(f"{url}/v1/relations", json=body, timeout=120)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    statuses = Counter(r.status_code for r, _ in results)
    assert set(statuses) <= {200, 503} and sum(statuses.values()) == 30, statuses
    assert statuses[503] >= 15 and statuses[200] >= 1, statuses  # about 1 running + 2 queued, the rest refused
    refused = [took for r, took in results if r.status_code == 503]
    assert statistics.median(refused) < 1.0 and max(refused) < 5.0, refused
    for response, _ in results:
        if response.status_code == 200:
            assert answered(response.json()) == want  # each accepted request ran alone: exact
    print(f"\noverload: {dict(statuses)}; 503 latency median {statistics.median(refused) * 1000:.0f} ms, "
          f"max {max(refused) * 1000:.0f} ms")


# ---- a replica killed under load ---------------------------------------------------------------------------------
def test_a_killed_replica_is_replaced_and_clients_see_bounded_failures(apps, dev_documents):
    import ray

    url = f"{apps['open']}/v1/relations"
    before = replicas("open")
    assert len(before) == 2
    stop = threading.Event()
    outcomes: list[tuple[float, object]] = []
    lock = threading.Lock()
    clients = 6

    def client(i: int):
        n = i
        while not stop.is_set():
            doc = dev_documents[n % len(dev_documents)]
            n += clients
            try:
                status = requests.post(url, json={"documents": [document_json(doc)]}, timeout=60).status_code
            except requests.RequestException as error:
                status = type(error).__name__
            with lock:
                outcomes.append((time.monotonic(), status))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    victim = sorted(before)[0]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    time.sleep(8.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (len(replicas("open")) == 2 and victim not in replicas("open")):
        time.sleep(0.5)
    after = replicas("open")
    assert len(after) == 2 and victim not in after, after
    wait_ready(f"{apps['open']}/readyz")
    with ThreadPoolExecutor(4) as pool:
        assert all(r.status_code == 200 for r in pool.map(
            lambda d: requests.post(url, json={"documents": [document_json(d)]}, timeout=60), dev_documents))
    failures = [(t - killed_at, s) for t, s in outcomes if s != 200]
    print(f"\nreplica kill: {len(outcomes)} requests during the run, {len(failures)} failed "
          f"({dict(Counter(s for _, s in failures))}), after the kill at {[round(t, 2) for t, _ in failures]} s")
    assert len(outcomes) > 30
    assert len(failures) <= 2 * clients  # at most the requests in flight on, or routed to, the dead replica
    assert all(t >= -0.5 for t, _ in failures)  # nothing failed before the kill
