"""Live champion swap, for real: ``drugprot serve --model models:/NAME@champion --follow-alias --poll-s 1`` in its own
process (its own Ray), a SQLite MLflow registry shared with this test, clients sending all the while.

1. The alias moves to a new version (registered with the registry function behind ``drugprot ensemble --register
   --force``): no request fails, ``X-Model-Version`` goes from the old version to the new one, ``/v1/model`` agrees.
2. The alias moves to a version whose artifact was tampered with: the old version goes on serving, no request fails,
   and ``/v1/model`` names the version and the loader's error in ``swap_error``.
The server has a bearer token, so it also shows that Ray's own ``/-/routes`` (answered by Serve's proxy, not by the
API) asks for that token (3). The tests share the server and run in this order: 3, 1, 2.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import requests
from fixtures_mlflow import _free_port
from fixtures_serving import document_json, wait_for_serve_command

from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split
from drugprot.polling import poll

pytestmark = pytest.mark.slow

NAME = "drugprot-swap-test"
CLIENTS = 4
TOKEN = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def registry(relation_members, tmp_path_factory):  # noqa: F811
    """An ensemble registered once as version 1 (@champion) in a SQLite store this test and the server share."""
    from drugprot.ensemble import build_ensemble
    from drugprot.ensemble.publish import log_ensemble

    root = tmp_path_factory.mktemp("swap")
    built = build_ensemble(relation_members, root / "ensemble", vote="soft", log=lambda _: None)
    store = f"sqlite:///{root / 'mlflow.db'}"
    log_ensemble(built.path, tracking_uri=store, register=NAME, force=True, log=lambda _: None)
    return {"root": root, "store": store, "ensemble": built.path}


@pytest.fixture(scope="module")
def server(registry):
    root = registry["root"]
    port, gcs = _free_port("8140-8159", "the swap test's HTTP port"), _free_port("6440-6459", "the swap test's Ray")
    metrics, dashboard = _free_port("6460-6469", "the swap test's metrics"), _free_port("6470-6479", "its dashboard")
    env = {**os.environ, "RAY_GCS_SERVER_PORT": str(gcs), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "DRUGPROT_CACHE_DIR": str(root / "cache"), "MLFLOW_DISABLE_TELEMETRY": "true", "DRUGPROT_API_TOKEN": TOKEN}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR", "MLFLOW_TRACKING_URI",
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"):
        env.pop(key, None)
    log_path = root / "serve.log"
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "drugprot", "serve", "--model", f"models:/{NAME}@champion",
                                "--tracking-uri", registry["store"], "--follow-alias", "--poll-s", "1",
                                "--port", str(port), "--cpus-per-replica", "0.5", "--max-batch-pairs", "32",
                                "--metrics-port", str(metrics), "--dashboard-port", str(dashboard),
                                "--max-queue-wait-s", "0"],  # every request answered during a swap: no objective
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    try:
        wait_for_serve_command(process, log_path, timeout=180)
        yield {"url": f"http://127.0.0.1:{port}", "log": log_path, "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        log.close()


class Load:
    """``CLIENTS`` threads posting one development document each, continuously; every answer is kept as
    ``(status or error, X-Model-Version)``."""

    def __init__(self, url: str):
        documents = read_split(SAMPLE_DIR, "development").documents
        self.bodies = [{"documents": [document_json(d)]} for d in documents[:CLIENTS]]
        self.url = f"{url}/v1/relations"
        self.answers: list[tuple[int | str, str | None]] = []
        self.refusals: list[tuple[float, int | str, str]] = []  # when (monotonic), status, why
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(body,), daemon=True) for body in self.bodies]

    def _client(self, body) -> None:
        while not self.stop.is_set():
            try:
                answer = requests.post(self.url, json=body, headers=AUTH, timeout=120)
                self.answers.append((answer.status_code, answer.headers.get("X-Model-Version")))
                if answer.status_code != 200:
                    self.refusals.append((time.monotonic(), answer.status_code, answer.text[:300]))
            except requests.RequestException as error:
                self.answers.append((type(error).__name__, None))
                self.refusals.append((time.monotonic(), type(error).__name__, str(error)[:300]))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)

    def versions(self) -> list[str | None]:
        return [version for _, version in list(self.answers)]


def wait_for(condition, timeout: float, what: str, log: Path):
    """The first true value of ``condition()``; fails after ``timeout`` s saying ``what`` and the server log's end."""
    value = poll(lambda: condition() or None, timeout=timeout, interval=0.5)
    assert value, f"{what} within {timeout:.0f} s; server log:\n{log.read_text(errors='replace')[-4000:]}"
    return value


def model_info(url: str) -> dict:
    answer = requests.get(f"{url}/v1/model", headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_rays_own_routes_endpoint_needs_the_api_token(server):
    url = server["url"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = requests.get(f"{url}/-/routes", headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == 'Bearer realm="drugprot"'
        assert refused.json()["detail"].startswith("missing or invalid bearer token")
    routes = requests.get(f"{url}/-/routes", headers=AUTH, timeout=30)
    assert routes.status_code == 200 and routes.json() == {"/": "drugprot"}
    assert requests.get(f"{url}/-/healthz", timeout=30).status_code == 200  # probes stay open
    assert requests.get(f"{url}/v1/model", timeout=30).status_code == 401  # the API's own check, as before


def test_moving_the_alias_swaps_the_version_under_load_without_a_failed_request(server, registry):
    from drugprot.ensemble.publish import log_ensemble

    url = server["url"]
    assert model_info(url)["version"] == "1"
    with Load(url) as load:
        wait_for(lambda: len(load.answers) >= 3 * CLIENTS, 60, "clients answered before the swap", server["log"])
        moved = time.monotonic()
        log_ensemble(registry["ensemble"], tracking_uri=registry["store"], register=NAME, force=True,
                     log=lambda _: None)  # version 2, @champion moved (what `drugprot ensemble --force` calls)
        wait_for(lambda: load.versions()[-2 * CLIENTS:].count("2") == 2 * CLIENTS, 110,
                 "version 2 did not answer every request", server["log"])
        took = time.monotonic() - moved
        wait_for(lambda: "version 2 serves" in server["log"].read_text(errors="replace"), 90,
                 "Serve did not finish the swap", server["log"])
        done = time.monotonic() - moved
    statuses = Counter(status for status, _ in load.answers)
    versions = load.versions()
    switched = versions.index("2")
    print(f"\nswap under load: {dict(statuses)}, {switched} answers from version 1 then "
          f"{Counter(versions[switched:])} after; version 2 answered everything {took:.1f} s after the alias moved, "
          f"the old replicas were gone after {done:.1f} s")
    assert statuses == Counter({200: len(load.answers)}), [(round(t - moved, 1), *rest) for t, *rest in load.refusals]
    assert set(versions[:switched]) == {"1"} and switched >= 3 * CLIENTS
    info = model_info(url)
    assert (info["version"], info["alias"], info["swap_error"]) == ("2", "champion", None)
    # the info metric follows: version 2's series, and version 1's gone with its replicas (Ray ages it out)
    served = re.compile(r'ray_drugprot_model_info\{[^}]*version="(\d+)"[^}]*\} 1\.0')

    def versions_exported():
        versions = set(served.findall(requests.get(server["metrics"], timeout=10).text))
        return versions == {"2"} or None

    assert poll(versions_exported, timeout=90), requests.get(server["metrics"], timeout=10).text[-3000:]
    exported = requests.get(server["metrics"], timeout=10).text
    assert f'name="{NAME}"' in exported and 'alias="champion"' in exported


def test_a_version_that_cannot_load_leaves_the_old_one_serving_and_says_why(server, registry):
    from drugprot.ensemble.publish import log_ensemble
    from drugprot.registry import promote
    from drugprot.mlflow_store import client

    url = server["url"]
    assert model_info(url)["version"] == "2"
    # version 3 under another alias first, so the server cannot load it before one of its weights is changed
    log_ensemble(registry["ensemble"], tracking_uri=registry["store"], register=NAME, alias="candidate", force=True,
                 log=lambda _: None)
    registry_client = client(registry["store"])
    location = registry_client.get_model_version_download_uri(NAME, "3")
    stored = Path(unquote(urlparse(location).path)) if location.startswith("file:") else None
    assert stored is not None and stored.is_dir(), location  # a SQLite store keeps artifacts in a local folder
    weights = sorted(stored.rglob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with Load(url) as load:
        wait_for(lambda: len(load.answers) >= CLIENTS, 60, "clients answered before the move", server["log"])
        promote(registry_client, NAME, "3", alias="champion", dev_f1=None, force=True, log=lambda _: None)
        info = wait_for(lambda: (model_info(url).get("swap_error") and model_info(url)), 120,
                        "/v1/model did not report the failed swap", server["log"])
        wait_for(lambda: len(load.answers) >= 2 * CLIENTS, 60, "clients answered after the failed swap", server["log"])
    statuses = Counter(status for status, _ in load.answers)
    print(f"\nfailed swap under load: {dict(statuses)}, versions {Counter(load.versions())}; "
          f"swap_error: {info['swap_error']}")
    assert statuses == Counter({200: len(load.answers)}), load.refusals
    assert set(load.versions()) == {"2"}
    assert info["version"] == "2" and info["swap_error"].startswith("version 3: ")
    assert "sha256 mismatch" in info["swap_error"], info["swap_error"]
    output = server["log"].read_text(errors="replace")
    assert f"version 3 of models:/{NAME}@champion could not be served" in output
    assert output.count("moved from version 2 to 3") == 1  # polled every second since, never tried again
