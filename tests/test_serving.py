"""Real Ray Serve over HTTP on 127.0.0.1: one private Ray and one Serve instance for the module, three applications.

* ``/open``: a three-member soft-voting ensemble, two replicas, no auth (parity, batching, a replica killed mid-load);
* ``/secure``: the same ensemble behind a bearer token, with small limits (auth, 413s, 422s through the proxy);
* ``/tight``: one replica, one request at a time, two queued, a long warm-up (readiness, overload → 503).

The ``drugprot serve`` command gets its own Ray in a subprocess and is stopped with SIGTERM.
Ports: Serve HTTP 8111 (CLI 8112), Ray GCS 6424 (CLI 6425), metrics 6426 (CLI 6427), CLI dashboard 6428.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from fixtures_serving import (answered, assert_equal_up_to_rounding, deploy, document_json, expected, headless_dom,
                              serve_cluster, wait_for_serve_command, wait_ready)

from drugprot.config import SAMPLE_DIR
from drugprot.polling import poll

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

HTTP_PORT, GCS_PORT, METRICS_PORT = 8111, 6424, 6426
CLI_HTTP_PORT, CLI_GCS_PORT, CLI_METRICS_PORT, CLI_DASHBOARD_PORT = 8112, 6425, 6427, 6428
BASE = f"http://127.0.0.1:{HTTP_PORT}"
TOKEN_ENV = "DRUGPROT_SERVE_TEST_TOKEN"


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
    """The module's private Ray with Serve on 127.0.0.1:8111, the token in the replicas' environment."""
    with serve_cluster(HTTP_PORT, gcs_port=GCS_PORT, env={TOKEN_ENV: token}, prefix="drugprot-serve-test-",
                       _metrics_export_port=METRICS_PORT) as root:
        yield root


@pytest.fixture(scope="module")
def apps(cluster, ensemble_dir):
    """``/open`` and ``/secure``, deployed together."""
    return deploy(BASE, ensemble_dir, {
        "open": {"replicas": 2, "num_cpus": 0.5, "token_env": None,
                 "max_batch_pairs": 160,  # the development sample (137 pairs) in one call
                 "max_ongoing_requests": 64, "batch_wait_ms": 10,
                 "max_queue_wait_s": 0},  # every request answered: no latency objective
        "secure": {"num_cpus": 0.25, "token_env": TOKEN_ENV, "require_token": True,
                   "limits": {"max_documents": 3, "max_characters": 20_000, "max_entities": 200, "max_pairs": 60,
                              "max_body_bytes": 20_000}},
    })


@pytest.fixture(scope="module")
def tight(cluster, ensemble_dir):
    """``/tight``: deployed on first use; records /readyz from the moment Serve reports the app running."""
    from ray import serve

    from drugprot.serving import build_app

    app = build_app({"model": str(ensemble_dir), "num_cpus": 0.1, "ingress_cpus": 0.05, "token_env": None,
                     "max_batch_pairs": 2, "max_ongoing_requests": 1, "max_queued_requests": 2, "warmup_rounds": 40})
    threading.Thread(target=serve.run, args=(app,), kwargs={"name": "tight", "route_prefix": "/tight"},
                     daemon=True).start()  # serve.run returns once ready; watch what clients see meanwhile
    url = f"{BASE}/tight"
    seen = []

    def ready() -> bool | None:
        try:
            response = requests.get(f"{url}/readyz", timeout=300)
        except requests.ConnectionError:
            return None
        seen.append((response.status_code, response.text))
        return response.status_code == 200 or None

    poll(ready, timeout=300, interval=0.1)  # test_ready_only_after_warm_up judges what was seen
    return url, seen


def small_doc(doc_id: str = "d1") -> dict:
    return {"id": doc_id, "text": "Aspirin inhibits COX-1 strongly.",
            "entities": [{"id": "T1", "type": "CHEMICAL", "start": 0, "end": 7, "text": "Aspirin"},
                         {"id": "T2", "type": "GENE-Y", "start": 17, "end": 22, "text": "COX-1"}]}


def replicas(app: str, deployment: str = "DrugprotModel") -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")}


# ---- the command line: its own Ray, stopped by SIGTERM (runs first, before the module's cluster exists) -----------
def test_drugprot_serve_runs_until_sigterm_and_drains_accepted_requests(ensemble_dir, dev_documents, tmp_path):
    env = {**os.environ, "RAY_GCS_SERVER_PORT": str(CLI_GCS_PORT), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR", "DRUGPROT_API_TOKEN"):
        env.pop(key, None)
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "drugprot", "serve", "--model", str(ensemble_dir), "--no-auth",
                                "--port", str(CLI_HTTP_PORT), "--max-batch-pairs", "32", "--run-dir", str(tmp_path),
                                "--metrics-port", str(CLI_METRICS_PORT), "--dashboard-port", str(CLI_DASHBOARD_PORT),
                                "--max-queue-wait-s", "0"],  # every request before the SIGTERM answered: no objective
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_serve_command(process, tmp_path / "serve.log", timeout=150)
        url = f"http://127.0.0.1:{CLI_HTTP_PORT}/v1/relations"
        response = requests.post(url, json={"documents": [small_doc()]}, timeout=30)
        assert response.status_code == 200 and response.json()["documents"][0]["candidates"] == 1
        check_what_an_operator_is_told((tmp_path / "serve.log").read_text(errors="replace"))
        outcomes, stopped = [], threading.Event()
        body = {"documents": [document_json(d) for d in dev_documents[:3]]}

        def client():
            while not stopped.is_set():
                sent = time.monotonic()
                try:
                    answer = requests.post(url, json=body, timeout=60)
                    outcome = answer.status_code if answer.status_code != 503 else f"503 {answer.json()['detail']}"
                except requests.ConnectionError as error:
                    outcome = "refused" if "refused" in str(error).lower() else f"dropped: {error}"
                outcomes.append((sent, time.monotonic(), outcome))

        clients = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for thread in clients:
            thread.start()
        assert poll(lambda: True if len(outcomes) >= 12 else None, timeout=60, interval=0.05), outcomes  # under load
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        stopped.set()
        for thread in clients:
            thread.join(timeout=60)
        took = time.monotonic() - started
        output = (tmp_path / "serve.log").read_text(errors="replace")
        assert "drugprot serve: stopping" in output and "drugprot serve: stopped" in output
        assert took < 90
        kinds = Counter(outcome if not isinstance(outcome, str) else outcome.split(":")[0] for _, _, outcome in outcomes)
        before = Counter(outcome for sent, _, outcome in outcomes if sent < started)
        assert set(before) == {200}, before  # every request sent before SIGTERM was answered
        assert any(sent < started < answered and outcome == 200 for sent, answered, outcome in outcomes), kinds
        assert set(kinds) <= {200, "503 shutting down", "refused", "dropped"}, kinds
        # requests sent after SIGTERM: 503 while the replicas drain, refused once the proxy is gone, and dropped only
        # when they reached the proxy in the moment Serve stopped it
        print(f"\nSIGTERM under load: {dict(before)} before, {dict(kinds - before)} after")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{CLI_HTTP_PORT}/healthz", timeout=5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def check_what_an_operator_is_told(output: str) -> None:
    """The metrics URL and the ``serve status`` line that ``drugprot serve`` prints work as printed; its Ray, dashboard
    included, listens on loopback only."""
    import re
    import shlex

    metrics = re.search(r"drugprot serve: Prometheus metrics: (\S+)", output)[1]
    assert metrics == f"http://127.0.0.1:{CLI_METRICS_PORT}/metrics"
    info = r'ray_drugprot_model_info\{[^}]*version="folder"[^}]*\} 1\.0'
    scraped = poll(lambda: re.search(info, text := requests.get(metrics, timeout=10).text) and text, timeout=90)
    assert scraped, requests.get(metrics, timeout=10).text[-3000:]
    assert "ray_drugprot_model_version" not in scraped
    status_line = re.search(r"drugprot serve: Serve status: (.+)", output)[1]
    words = shlex.split(status_line)
    assignments, (program, *arguments) = words[:2], words[2:]
    assert [a.split("=")[0] for a in assignments] == ["RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"], status_line
    assert (program, arguments) == ("serve", ["status", "--address", f"http://127.0.0.1:{CLI_DASHBOARD_PORT}"])
    serve_cli = str(Path(sys.executable).parent / "serve")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([serve_cli, *arguments], capture_output=True, text=True, env=clean, timeout=120)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr, refused
    status = subprocess.run([serve_cli, *arguments], capture_output=True, text=True, timeout=120,
                            env={**clean, **dict(a.split("=", 1) for a in assignments)})
    assert status.returncode == 0, status.stderr[-2000:]
    applications = yaml.safe_load(status.stdout)["applications"]
    assert applications["drugprot"]["status"] == "RUNNING", status.stdout
    addresses = {fields[3] for fields in listeners()}
    assert {f"127.0.0.1:{CLI_METRICS_PORT}", f"127.0.0.1:{CLI_DASHBOARD_PORT}"} <= addresses, addresses
    assert {a.rsplit(":", 1)[0] for a in addresses} <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, addresses


def listeners() -> list[list[str]]:
    """``ss -ltnp`` lines (split) of every TCP listener that this process or any of its descendants holds."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    ours = {os.getpid()}
    while True:  # every descendant of this process
        more = {pid for pid, parent in parents.items() if parent in ours} - ours
        if not more:
            break
        ours |= more
    listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split() for line in listing if any(f"pid={pid}," in line for pid in ours)]


def tampered_copy(ensemble_dir: Path, out: Path) -> Path:
    """The ensemble with one byte of a member's weights changed (its manifest still lists the old hash)."""
    shutil.copytree(ensemble_dir, out)
    weights = sorted(out.rglob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return out


def test_drugprot_serve_prints_the_replicas_own_error_and_fails(ensemble_dir, tmp_path):
    env = {**os.environ, "RAY_GCS_SERVER_PORT": str(CLI_GCS_PORT), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR", "DRUGPROT_API_TOKEN"):
        env.pop(key, None)
    model = tampered_copy(ensemble_dir, tmp_path / "tampered")
    done = subprocess.run([sys.executable, "-m", "drugprot", "serve", "--model", str(model), "--port", str(CLI_HTTP_PORT),
                           "--metrics-port", str(CLI_METRICS_PORT), "--dashboard-port", str(CLI_DASHBOARD_PORT),
                           "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0, done.stderr[-3000:]  # 2 today for every DrugprotError (issue 11.5 makes it 1)
    assert "drugprot serve: error: the model could not be served: " in done.stderr
    assert "sha256 mismatch" in done.stderr and "Failed to update the deployments" not in done.stderr


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
    assert all(r.status_code == 200 for r in responses), Counter((r.status_code, r.text[:300]) for r in responses)
    for doc, response in zip(dev_documents * 3, responses):
        (relations,) = answered(response.json()).values()
        assert [r[:3] for r in relations] == [w[:3] for w in want[doc.pmid]]
        assert all(abs(r[3] - w[3]) <= 2e-6 for r, w in zip(relations, want[doc.pmid]))


def test_a_replica_that_cannot_load_its_model_reports_why(cluster, ensemble_dir, tmp_path):
    """A wrong registry URI, a missing store and a tampered model: Serve's status carries the DrugprotError text that
    ``drugprot serve`` prints (serving.app.deployment_failure)."""
    import mlflow
    from ray import serve

    from drugprot.serving.app import build_application, deployment_failure

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=store).search_registered_models()  # an empty registry
    cases = {
        "wrong-uri": ({"model": "models:/no-such-model@champion", "tracking_uri": store},
                      "models:/no-such-model@champion: no registered model 'no-such-model'"),
        "no-store": ({"model": "models:/drugprot@champion", "tracking_uri": f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"},
                     "no MLflow database at"),
        "tampered": ({"model": str(tampered_copy(ensemble_dir, tmp_path / "tampered"))}, "sha256 mismatch"),
    }
    raised = {}

    def deploy(name: str, args: dict) -> None:
        try:  # serve.run raises once the deployment failed (one try: each try fails with the same error)
            serve.run(build_application({**args, "num_cpus": 0.1, "ingress_cpus": 0.05, "token_env": None,
                                         "warmup_rounds": 0}, constructor_tries=1),
                      name=name, route_prefix=f"/{name}")
        except RuntimeError as error:
            raised[name] = error

    deploying = [threading.Thread(target=deploy, args=(name, args), daemon=True) for name, (args, _) in cases.items()]
    for thread in deploying:
        thread.start()
    try:
        for thread in deploying:
            thread.join(timeout=300)
        assert set(raised) == set(cases), raised
        for name, (_, message) in cases.items():
            failure = deployment_failure(name)
            assert message in failure, (name, failure)
            assert "Traceback" not in failure and "controller logs" not in failure, failure
    finally:
        for name in cases:
            serve.delete(name)


def test_the_local_ray_listens_on_loopback_only(apps):
    """Every TCP listener of this test's Ray (GCS, raylet, workers, agents, metrics, the Serve proxy) is on 127.0.0.1."""
    found = listeners()
    addresses = {fields[3].rsplit(":", 1)[0] for fields in found}
    assert len(found) >= 8, found  # gcs, raylet, agents, workers, proxy: all of them were found
    assert addresses <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, [f for f in found if "127.0.0.1" not in f[3]]
    assert any(fields[3].endswith(f":{HTTP_PORT}") for fields in found)
    assert any(fields[3].endswith(f":{METRICS_PORT}") for fields in found)


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


def test_200_stalled_bodies_do_not_stop_valid_requests(apps, token):
    """200 connections send valid headers, a token, Content-Length 1000 and '{"documents": [' and then nothing; while
    they are held open, valid requests keep getting 200 (they are not queued behind the stalled ones)."""
    import socket

    host, port = "127.0.0.1", HTTP_PORT
    head = (f"POST /secure/v1/relations HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"documents\": [").encode()
    stalled = []
    try:
        for _ in range(200):
            connection = socket.create_connection((host, port), timeout=10)
            connection.sendall(head)
            stalled.append(connection)
        took = []
        for _ in range(20):
            started = time.monotonic()
            response = requests.post(f"{apps['secure']}/v1/relations", json={"documents": [small_doc()]},
                                     headers={"Authorization": f"Bearer {token}"}, timeout=10)
            took.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
        answers = Counter()
        deadline = time.monotonic() + 30
        for connection in stalled:  # what the stalled ones got: refused at once (429/503) or timed out (408, after 2 s)
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                answers[connection.recv(64).split(b" ")[1].decode()] += 1
            except (OSError, IndexError):
                answers["no answer"] += 1
        assert set(answers) <= {"408", "429", "503"}, answers  # none is left hanging
        print(f"\n200 stalled bodies: valid requests took {max(took) * 1000:.0f} ms at most "
              f"(median {statistics.median(took) * 1000:.0f} ms); the stalled ones got {dict(answers)}")
    finally:
        for connection in stalled:
            connection.close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_page_in_headless_chromium_shows_what_the_api_answers(apps, tmp_path):
    """GET / (no token needed for the page itself) in real headless Chromium: it sends the bundled example to
    v1/relations (here at once, asked by the URL fragment) and renders one row per relation, under the page's own
    Content-Security-Policy."""
    import html
    import re

    from drugprot.config import SAMPLE_DIR
    from drugprot.corpus import read_split

    page = requests.get(f"{apps['open']}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # self-contained: no external assets
    dom = headless_dom(f"{apps['open']}/#send", tmp_path)
    assert 'data-state="done"' in dom, dom[-2000:]
    rendered = [(m["chemical"], m["gene"], m["type"], float(m["score"])) for m in re.finditer(
        r'<tr class="relation" data-chemical="(?P<chemical>[^"]*)" data-gene="(?P<gene>[^"]*)" '
        r'data-type="(?P<type>[^"]*)" data-score="(?P<score>[^"]*)"', html.unescape(dom))]
    document = read_split(SAMPLE_DIR, "development").documents[0]
    body = {"documents": [{"id": "page", "title": document.title, "abstract": document.abstract,
                           "entities": [{"id": e.id, "type": e.type, "start": e.start, "end": e.end}
                                        for e in document.entities.values()]}]}
    answer = requests.post(f"{apps['open']}/v1/relations", json=body, timeout=60).json()["documents"][0]["relations"]
    assert rendered == [(r["chemical"], r["gene"], r["type"], r["score"]) for r in answer] and rendered


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed")
def test_prometheus_scrapes_the_serving_metrics_from_the_local_ray(apps, token, tmp_path):
    """Debian's prometheus on 127.0.0.1 scrapes this Ray node's metrics port (infra/prometheus/scrape.yaml's job,
    pointed at it); after some traffic its HTTP query API returns the drugprot series."""
    from fixtures_mlflow import _free_port

    port = _free_port("9190-9199", "the test Prometheus")
    scrape = yaml.safe_load((REPO / "infra" / "prometheus" / "scrape.yaml").read_text())
    job = scrape["scrape_configs"][0]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        for _ in range(20):
            assert requests.post(f"{apps['secure']}/v1/relations", json={"documents": [small_doc()]}, headers=headers,
                                 timeout=30).status_code == 200
        assert requests.post(f"{apps['secure']}/v1/relations", json={"documents": []}, headers=headers,
                             timeout=30).status_code == 422
        secure = 'application="secure"'
        wanted = {  # query → the least value its first series must reach
            f'ray_drugprot_requests_total{{{secure},route="/v1/relations",status="200"}}': 20,
            f'ray_drugprot_requests_total{{{secure},route="/v1/relations",status="422"}}': 1,
            f'ray_drugprot_request_seconds_count{{{secure},route="/v1/relations"}}': 21,
            f"ray_drugprot_model_call_seconds_count{{{secure}}}": 20,
            f"ray_drugprot_pairs_per_model_call_count{{{secure}}}": 1,
            f"ray_drugprot_queue_wait_seconds_count{{{secure}}}": 20,
            f"ray_drugprot_queue_depth{{{secure}}}": 0,
            f'ray_drugprot_model_info{{{secure},version="folder",name="",alias=""}}': 1}
        seen: dict[str, float] = {}

        def all_reached() -> bool | None:
            for query in wanted:
                try:
                    answer = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
                except requests.ConnectionError:
                    return None  # Prometheus not listening yet
                result = answer.json()["data"]["result"] if answer.status_code == 200 else []
                if result:
                    seen[query] = sum(float(series["value"][1]) for series in result)
            return all(seen.get(q, -1) >= least for q, least in wanted.items()) or None

        poll(all_reached, timeout=120, interval=1)
        missing = {q: seen.get(q) for q, least in wanted.items() if seen.get(q, -1) < least}
        assert not missing, (missing, (tmp_path / "prometheus.log").read_text()[-2000:])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


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
    assert info["execution"] == "loop" and info["precision"] == "fp32"  # a CPU replica runs members in turn
    assert requests.get(f"{apps['open']}/openapi.json", timeout=10).json()["info"]["title"] == "drugprot relation extraction"


# ---- readiness and overload -------------------------------------------------------------------------------------
def test_ready_only_after_warm_up(tight):
    """While the model replica warms up (40 rounds) no request reaches it: the proxy knows no route yet, or the
    ingress waits for a model replica; nothing ever answers 'warming up'."""
    url, seen = tight
    assert seen and seen[-1][0] == 200 and '"status":"ready"' in seen[-1][1].replace(" ", ""), seen[-3:]
    assert not any("warming up" in text for _, text in seen), seen
    assert requests.post(f"{url}/v1/relations", json={"documents": [small_doc()]}, timeout=30).status_code == 200


def test_overload_gets_503_and_loses_no_accepted_request(tight, reference, dev_documents):
    """Refusals are JSON 503s with Retry-After; how fast they come is measured by bench/serve_chaos.py (timing is
    no test assertion: CI machines are shared)."""
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
    for response, _ in results:
        if response.status_code == 503:
            assert response.headers.get("Retry-After") and "detail" in response.json(), response.text
    for response, _ in results:
        if response.status_code == 200:  # each accepted request ran in chunks of 2 pairs: equal up to float rounding
            assert_equal_up_to_rounding(answered(response.json()), want)
    print(f"\noverload: {dict(statuses)}; 503 latency median {statistics.median(refused) * 1000:.0f} ms, "
          f"max {max(refused) * 1000:.0f} ms")


# ---- a replica killed under load ---------------------------------------------------------------------------------
def test_a_killed_model_replica_is_replaced_and_no_request_fails(apps, dev_documents):
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
    assert poll(lambda: True if len(outcomes) >= 12 else None, timeout=60, interval=0.05), outcomes  # under load
    victim = sorted(before)[0]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    def replaced() -> bool | None:
        """The controller started a replica in the victim's place and requests went on after the kill."""
        current = replicas("open")
        after_kill = sum(1 for t, _ in outcomes if t > killed_at)
        return True if len(current) == 2 and victim not in current and after_kill >= 30 else None

    poll(replaced, timeout=90)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
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
    assert failures == []  # calls on the dead replica, if any, were retried on the other one
    retries = requests.get(f"{apps['open']}/readyz", timeout=10).json()["retries"]
    print(f"model calls retried on the other replica: {retries}")
