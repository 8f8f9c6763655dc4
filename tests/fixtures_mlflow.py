"""A real ``mlflow server`` process for tests (import the fixture into your test module to use it).

``mlflow_server`` (module scope) starts ``mlflow server`` on 127.0.0.1 with a SQLite database and an artifacts
folder in a temporary directory, waits for ``GET /health``, yields its URI (``http://127.0.0.1:PORT``) and ends the
server with SIGTERM (SIGKILL after 10 s) when the module is done. Ports come from ``MLFLOW_TEST_PORTS`` (default
5100-5109, this suite's range): the first free one is used. :func:`mlflow_server_process` is the same as a context
manager, for a test that needs its own server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

MLFLOW = Path(sys.executable).with_name("mlflow")
PORTS = os.environ.get("MLFLOW_TEST_PORTS", "5100-5109")


def _free_port(spec: str = PORTS, what: str = "the test MLflow server (set MLFLOW_TEST_PORTS)") -> int:
    """The first port of ``spec`` (``FIRST-LAST``) that binds on 127.0.0.1."""
    first, _, last = spec.partition("-")
    for port in range(int(first), int(last or first) + 1):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {spec} for {what}")


@contextlib.contextmanager
def mlflow_server_process(root: Path, *, port: int | None = None, ready_timeout: float = 90.0,
                          backend_store_uri: str | None = None):
    """Run ``mlflow server`` with ``root/mlflow.db`` (or ``backend_store_uri``) and ``root/artifacts``; yields ``(uri, process)``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    log = open(root / "server.log", "wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(uri, process, root / "server.log", ready_timeout)
        yield uri, process
    finally:
        _stop(process)
        log.close()


def _wait_ready(uri: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    import requests

    from drugprot.polling import poll

    def healthy() -> bool | None:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            return requests.get(f"{uri}/health", timeout=2).status_code == 200 or None
        except requests.RequestException:
            return None

    if poll(healthy, timeout=timeout):
        return
    raise RuntimeError(f"mlflow server at {uri} not ready after {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started as the leader of its own session), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real MLflow tracking server (SQLite + artifacts folder) for this test module."""
    with mlflow_server_process(tmp_path_factory.mktemp("mlflow-server")) as (uri, _process):
        yield uri
