"""What an anonymous client can hold and what serving does by default, over real HTTP on 127.0.0.1.

The ``drugprot serve`` tests run first, each with its own Ray (HTTP 8122, GCS 6435) or none at all; then one private
Ray for the module (HTTP 8121, GCS 6434) with Serve's proxy running ``drugprot.serving.proxy``'s callback (a 2 s
header timeout and 64 connections per client address, so the tests stay short) and two applications:

* ``/guarded``: a bearer token, the defaults otherwise;
* ``/objective``: no token, a latency objective so tight that concurrent requests are refused by it.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from fixtures_serving import deploy, document_json, serve_cluster, wait_for_serve_command

from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split

pytestmark = pytest.mark.slow

HTTP_PORT, GCS_PORT = 8121, 6434
CLI_HTTP_PORT, CLI_GCS_PORT = 8122, 6435
BASE = f"http://127.0.0.1:{HTTP_PORT}"
TOKEN = "security-test-token"
TOKEN_ENV = "DRUGPROT_SECURITY_TEST_TOKEN"
PROXY_LIMITS = {"header_timeout_s": 2.0, "max_connections_per_client": 64}
SMALL = {"id": "d1", "text": "Aspirin inhibits COX-1 strongly.",
         "entities": [{"id": "T1", "type": "CHEMICAL", "start": 0, "end": 7}, {"id": "T2", "type": "GENE-Y", "start": 17, "end": 22}]}


@pytest.fixture(scope="module")
def ensemble_dir(relation_members, tmp_path_factory) -> Path:  # noqa: F811
    from drugprot.ensemble import build_ensemble

    return build_ensemble(relation_members, tmp_path_factory.mktemp("security") / "ensemble", vote="soft",
                          log=lambda _: None).path


def cli_env() -> dict[str, str]:
    env = {**os.environ, "RAY_GCS_SERVER_PORT": str(CLI_GCS_PORT), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR", "DRUGPROT_API_TOKEN", "DRUGPROT_PROXY_LIMITS",
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"):
        env.pop(key, None)
    return env


# ---- drugprot serve: auth by default, logs kept, errors before Ray ------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--no-auth", "--host", "0.0.0.0"], "--no-auth: refused with --host 0.0.0.0, which is reachable beyond this machine"),
    (["--require-token"], "--require-token: DRUGPROT_API_TOKEN is empty or unset"),
])
def test_serving_without_a_token_is_refused_before_ray_starts(ensemble_dir, flags, message):
    done = subprocess.run([sys.executable, "-m", "drugprot", "serve", "--model", str(ensemble_dir), *flags,
                           "--port", str(CLI_HTTP_PORT)], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "started a local Ray" not in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--metrics-port", "{busy}"], "--metrics-port {busy}: 127.0.0.1:{busy} is not free"),
    (["--dashboard-port", "{busy}"], "--dashboard-port {busy}: 127.0.0.1:{busy} is not free"),
    (["--metrics-port", "70000"], "--metrics-port: must be a TCP port (1-65535), got 70000"),
    (["--address", "127.0.0.1:1", "--metrics-port", "9100"], "--metrics-port: applies to the local Ray only"),
])
def test_the_local_rays_ports_are_checked_before_ray_starts(tmp_path, flags, message):
    """Checked before any model is read: an empty folder stands for the model."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = str(held.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "drugprot", "serve", "--model", str(tmp_path), "--no-auth",
                               *(flag.format(busy=busy) for flag in flags), "--port", str(CLI_HTTP_PORT)],
                              capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode != 0 and message.format(busy=busy) in done.stderr, done.stderr[-2000:]
    assert "started a local Ray" not in done.stderr


def test_a_missing_alias_is_reported_before_ray_starts(tmp_path):
    from drugprot.mlflow_store import client

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client(store).create_registered_model("drugprot")  # a registry with the model, not the alias
    started, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "drugprot", "serve", "--model", "models:/drugprot@nosuch",
                           "--tracking-uri", store, "--port", str(CLI_HTTP_PORT)],
                          capture_output=True, text=True, env=cli_env(), timeout=120)
    took, used = time.monotonic() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode != 0 and "model 'drugprot' has no alias 'nosuch'" in done.stderr, done.stderr[-2000:]
    assert "started a local Ray" not in done.stderr
    # CPU time, not wall time: on a shared 2-core machine the wall clock measures the neighbours (mlflow's import
    # alone took 5.5 s of wall time there at a load of 11); starting Ray first took about 40 s
    seconds = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(f"\nmissing alias reported after {took:.1f} s ({seconds:.1f} s of CPU)")
    assert seconds < 5, f"the missing alias was reported after {seconds:.1f} s of CPU ({took:.1f} s)"


def test_drugprot_serve_makes_a_private_token_and_keeps_ray_logs_after_a_clean_stop(ensemble_dir, tmp_path):
    run_dir = tmp_path / "run"
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "drugprot", "serve", "--model", str(ensemble_dir),
                                "--port", str(CLI_HTTP_PORT), "--run-dir", str(run_dir)],
                               stdout=log, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
    try:
        wait_for_serve_command(process, tmp_path / "serve.log", timeout=150)
        token_file = run_dir / "api-token"
        output = (tmp_path / "serve.log").read_text(errors="replace")
        assert f"bearer token written to {token_file} (readable by you only)" in output
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in output
        url = f"http://127.0.0.1:{CLI_HTTP_PORT}/v1/relations"
        assert requests.post(url, json={"documents": [SMALL]}, timeout=30).status_code == 401
        answer = requests.post(url, json={"documents": [SMALL]}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["documents"][0]["candidates"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert f"Ray logs kept in {run_dir / 'ray-logs'}" in output
    kept = {path.name for path in (run_dir / "ray-logs").rglob("*") if path.is_file()}
    assert "raylet.out" in kept and any(name.startswith("replica_") for name in kept), sorted(kept)[:20]


# ---- one Ray, two applications ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """The module's private Ray with Serve on 127.0.0.1:8121, its proxy running drugprot's callback."""
    from drugprot.serving.proxy import PROXY_CALLBACK

    env = {TOKEN_ENV: TOKEN, PROXY_CALLBACK[0]: PROXY_CALLBACK[1], "DRUGPROT_PROXY_LIMITS": json.dumps(PROXY_LIMITS)}
    with serve_cluster(HTTP_PORT, gcs_port=GCS_PORT, env=env, prefix="drugprot-security-test-") as root:
        yield root


@pytest.fixture(scope="module")
def apps(cluster, ensemble_dir):
    return deploy(BASE, ensemble_dir, {
        "guarded": {"num_cpus": 0.25, "ingress_cpus": 0.1, "token_env": TOKEN_ENV, "require_token": True,
                    "warmup_rounds": 1},
        "objective": {"num_cpus": 0.25, "ingress_cpus": 0.1, "token_env": None, "max_batch_pairs": 4,
                      "max_queue_wait_s": 0.02, "warmup_rounds": 1},
    })


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def raw_exchange(head: bytes, *, source: str = "127.0.0.1", timeout: float = 10) -> bytes:
    """Send ``head`` on a new connection and read until the server closes it (or ``timeout`` passes)."""
    with socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=timeout, source_address=(source, 0)) as connection:
        connection.sendall(head)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def test_an_overload_refusal_crosses_the_serve_handle_as_a_json_503(apps):
    """The latency objective refuses in the model replica; the ingress answers its JSON 503 with Retry-After
    (not a 500 for an exception that could not be unpickled)."""
    documents = read_split(SAMPLE_DIR, "development").documents
    body = {"documents": [document_json(d) for d in documents[:2]]}
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{apps['objective']}/v1/relations", json=body, timeout=120),
                                range(48)))
    statuses = sorted({a.status_code for a in answers})
    assert statuses == [200, 503], statuses
    refused = [a for a in answers if a.status_code == 503]
    assert all(a.json()["detail"].startswith(("the model is overloaded", "the service is at capacity")) for a in refused)
    assert all(int(a.headers["Retry-After"]) >= 1 and a.headers["X-Drugprot-Overload"] == "1" for a in refused)
    ready = requests.get(f"{apps['objective']}/readyz", timeout=30).json()
    assert ready["saturation"]["objective_s"] == 0.02 and ready["saturation"]["refused_by_wait_objective"] > 0
    assert requests.get(f"{apps['objective']}/saturation", timeout=30).status_code in (200, 503)


def test_oversized_header_lines_and_headers_get_431_and_the_connection_closes(apps):
    line = b"GET /guarded/healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9_000 + b"\r\n\r\n"
    assert raw_exchange(line).startswith(b"HTTP/1.1 431 ")
    many = b"GET /guarded/healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 1_000) for i in range(40))
    answer = raw_exchange(many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"larger than the limit of 32768 bytes" in answer
    unfinished = b"GET /guarded/healthz HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"c" * 1_000_000  # never ends
    assert raw_exchange(unfinished).startswith(b"HTTP/1.1 431 ")
    assert requests.get(f"{apps['guarded']}/healthz", timeout=30).status_code == 200


def proxy_rss_mb() -> float:
    """Resident memory of Serve's proxy process (the only ``ray::ProxyActor`` of this test's Ray)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::ProxyActor"):
                status = (entry / "status").read_text()
                return int(status.split("VmRSS:")[1].split()[0]) / 1024
        except OSError:
            continue
    raise AssertionError("no ray::ProxyActor process found")


def test_200_stalled_headers_are_closed_with_408_hold_little_memory_and_valid_requests_stay_fast(apps):
    """200 connections (50 from each of four loopback addresses, under the per-address cap) send 30 KB of headers,
    just under the limit, and then nothing. The proxy grows by under 20 MB, answers each with 408 and closes it
    after the header timeout, and valid requests meanwhile keep a p99 under 1 s."""
    before = proxy_rss_mb()
    head = b"POST /guarded/v1/relations HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"p" * 1_000) for i in range(30))
    connections = []
    for i in range(200):
        connection = socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=30,
                                              source_address=(f"127.0.0.{2 + i % 4}", 0))
        connection.sendall(head)
        connections.append(connection)
    latencies, grown = [], 0.0
    opened = time.monotonic()
    while time.monotonic() - opened < PROXY_LIMITS["header_timeout_s"] * 0.8:
        started = time.monotonic()
        answer = requests.post(f"{apps['guarded']}/v1/relations", json={"documents": [SMALL]}, headers=AUTH, timeout=30)
        latencies.append(time.monotonic() - started)
        assert answer.status_code == 200
        grown = max(grown, proxy_rss_mb() - before)
    answers = []
    for connection in connections:
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        answers.append(answer)
        connection.close()
    took = time.monotonic() - opened
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else latencies[0]
    print(f"\n200 stalled headers: proxy +{grown:.1f} MB, valid p99 {p99 * 1000:.0f} ms over {len(latencies)}, "
          f"all closed after {took:.1f} s")
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    assert took < PROXY_LIMITS["header_timeout_s"] + 10
    assert grown < 20, f"the proxy grew by {grown:.1f} MB"
    assert p99 < 1.0, latencies


def test_connections_beyond_the_per_client_cap_get_429(apps):
    held = [socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=10, source_address=("127.0.0.9", 0))
            for _ in range(PROXY_LIMITS["max_connections_per_client"])]
    try:
        refused = raw_exchange(b"GET /guarded/healthz HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.9")
        assert refused.startswith(b"HTTP/1.1 429 ") and b"too many connections from 127.0.0.9" in refused
        assert requests.get(f"{apps['guarded']}/healthz", timeout=30).status_code == 200  # another address
    finally:
        for connection in held:
            connection.close()


def test_a_websocket_to_serves_own_routes_is_refused_not_a_500(apps):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    for path in ("/-/routes", "/-/healthz"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{HTTP_PORT}{path}", additional_headers=AUTH, open_timeout=30)
        assert refused.value.response.status_code == 403, path


@pytest.mark.parametrize("path", ["/guarded/v1/model", "/-/routes"])
def test_two_authorization_headers_get_400(apps, path):
    connection = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
    connection.putrequest("GET", path)
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Authorization", "Bearer something-else")
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 400 and json.loads(answer.read())["detail"] == \
        "request: more than one Authorization header; send one"


def test_a_duplicate_json_key_gets_422_naming_it(apps):
    body = '{"documents": [%s], "threshold": 0.1, "threshold": 0.9}' % json.dumps(SMALL)
    answer = requests.post(f"{apps['guarded']}/v1/relations", data=body, timeout=30,
                           headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 422
    assert answer.json()["detail"] == "request body: key 'threshold' occurs twice in one JSON object; send each key once"


def test_the_page_sends_security_headers_and_the_cdn_docs_are_off(apps):
    page = requests.get(f"{apps['guarded']}/", timeout=30)
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Referrer-Policy"] == "no-referrer"
    assert "location.hash" in page.text and "token" not in page.text.split("location.hash")[1].split("\n")[0]
    for path in ("/docs", "/redoc"):
        assert requests.get(f"{apps['guarded']}{path}", timeout=30).status_code == 404
    assert requests.get(f"{apps['guarded']}/openapi.json", timeout=30).status_code == 200
