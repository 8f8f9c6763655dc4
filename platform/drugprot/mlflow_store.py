"""Which MLflow store to use and whether it answers: URI normalization and checks, the client, links to the UI.

The study tracker (:mod:`drugprot.tracking`) and the model registry (:mod:`drugprot.registry`) both stand on this
module; it imports neither, nor MLflow until a client is asked for.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

from drugprot.errors import DrugprotError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(DrugprotError):
    """The tracking store cannot be reached or holds something unexpected; the message says which and what to do."""


def normalize_tracking_uri(uri: str | None) -> str:
    """The store to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else :data:`DEFAULT_TRACKING_URI`; a relative
    ``sqlite:///rel.db`` becomes ``sqlite:////abs/rel.db`` (workers and ``mlflow ui`` may run elsewhere)."""
    from drugprot.environment import TRACKING_URI_VARIABLE, setting

    uri = setting(uri, TRACKING_URI_VARIABLE, DEFAULT_TRACKING_URI).strip()
    parsed = urlparse(uri)
    if not parsed.scheme:
        raise TrackingError(f"--tracking-uri {uri!r}: not a URI; use sqlite:///mlflow.db (a local file) or "
                            f"http://HOST:PORT (an MLflow server)")
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
        if not path:
            raise TrackingError(f"--tracking-uri {uri!r}: expected sqlite:///RELATIVE.db or sqlite:////ABSOLUTE.db")
        if path != ":memory:":
            return "sqlite:///" + str(Path(path).expanduser().resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def check_tracking_uri(uri: str | None, *, timeout: float = 10.0) -> str:
    """Fail fast and clearly when the tracking store cannot be used; returns the normalized URI.

    HTTP servers must answer ``GET /health`` within ``timeout`` seconds (retried), then a real API call; a SQLite
    store must live in an existing folder.
    """
    uri = normalize_tracking_uri(uri)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        from drugprot.polling import poll

        deadline = time.monotonic() + timeout
        reason = ""

        def healthy() -> bool | None:
            nonlocal reason
            try:
                response = requests.get(uri.rstrip("/") + "/health", timeout=max(0.5, min(5.0, deadline - time.monotonic())))
                if response.status_code == 200:
                    return True
                reason = f"GET /health answered {response.status_code}"
            except requests.RequestException as error:
                reason = type(error).__name__ + (f": {error.__context__}" if error.__context__ else "")
            return None

        if not poll(healthy, timeout=timeout):
            raise TrackingError(
                f"--tracking-uri {uri}: no MLflow server answers ({reason[:200]}) after {timeout:.0f} s; start one "
                f"(`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`) or "
                f"leave --tracking-uri out to use {DEFAULT_TRACKING_URI} in this folder")
    path = sqlite_path(uri)
    if path is not None and not path.parent.is_dir():
        raise TrackingError(f"--tracking-uri {uri}: folder {path.parent} does not exist; create it or pick another path")
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any store failure becomes one clear message
        raise TrackingError(f"--tracking-uri {uri}: the tracking store refused a request ({type(error).__name__}: "
                            f"{str(error)[:300]})") from None
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous
    return uri


def ui_command(tracking_uri: str) -> str:
    """What to run (or open) to browse the studies of this store."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


#: The MLflow 3 UI opens every page in its GenAI view (traces, "Evaluations") unless the link or the browser's last
#: choice says otherwise; it ignores the experiment's ``mlflow.experimentKind`` on run pages. Links carry the choice.
UI_VIEW = "workflowType=machine_learning"


def run_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link to an experiment (or one of its runs) that opens on the UI's model-training view."""
    base = tracking_uri.rstrip("/") if urlparse(tracking_uri).scheme in ("http", "https") else "http://127.0.0.1:5000"
    link = f"{base}/#/experiments/{experiment_id}"
    return f"{link}/runs/{run_id}?{UI_VIEW}" if run_id else f"{link}?{UI_VIEW}"



def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``-``, ``_`` and ``.`` replaced (a folder name)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "study"


def experiment_artifact_location(tracking_uri: str, name: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite store (``mlartifacts/NAME``), else the server's choice."""
    path = sqlite_path(normalize_tracking_uri(tracking_uri))
    return (path.parent / "mlartifacts" / safe_name(name)).as_uri() if path is not None else None
