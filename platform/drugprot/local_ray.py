"""The one way this project starts a private local Ray: ``drugprot serve`` without ``--address``, ``drugprot tune``
without ``--address``, ``drugprot predict --ray``, the serving tests and the benchmarks.

It listens on loopback only. Ray otherwise advertises the machine's network address and opens the GCS, raylet,
worker and agent ports and three metrics endpoints on it or on every interface, without authentication, even
when Serve's proxy binds 127.0.0.1. A node whose IP is 127.0.0.1 binds all of them to 127.0.0.1; Ray resolves a
requested 127.0.0.1 to the network address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read at import, so it is
also set on an already imported Ray). A real cluster is joined with ``--address`` instead and is configured by
whoever runs it (see docs/serving.md for the ports to open).

Ray 2.60 turns token authentication on by default and every process must agree: when ``RAY_AUTH_MODE`` is unset
we choose token mode with a fresh token in a file under the Ray temporary folder (never ``~/.ray``); a mode the
caller already set is kept. Usage statistics are off unless the caller says otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drugprot.environment import quiet_defaults

LOOPBACK = "127.0.0.1"


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _keep_loopback() -> None:
    """Ray keeps a 127.0.0.1 node or cluster address as it is instead of rewriting it to the network address."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def keep_loopback_address(address: str | None) -> None:
    """Before ``ray.init(address=...)``: a cluster addressed on loopback (``infra/local-cluster.sh`` binds every node
    to 127.0.0.1 only) is joined there, not at the machine's network address that Ray would rewrite it to. A cluster
    that listens on every interface answers on 127.0.0.1 too, so this never loses one."""
    host = (address or "").split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in LOOPBACK_HOSTS:
        _keep_loopback()


def prepare_environment(root: str | os.PathLike | None = None, *, gcs_port: int | None = None) -> Path:
    """Set the environment a local Ray inherits: its temporary folder (``root``, else ``RAY_TMPDIR``, else a new
    ``/tmp/drugprot-ray-*``), loopback only, no usage stats, token auth; returns the folder."""
    if root is None and os.environ.get("RAY_TMPDIR"):
        root = os.environ["RAY_TMPDIR"]  # the caller chose Ray's temporary folder
    folder = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="drugprot-ray-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(folder)
    quiet_defaults()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _keep_loopback()  # node IP: loopback, not the network address
    if "RAY_AUTH_MODE" not in os.environ:
        token_file = folder / "auth_token"
        if not token_file.exists():
            token_file.write_text(secrets.token_hex(32))
            token_file.chmod(0o600)
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
        if "ray._raylet" in sys.modules:  # Ray read its config at import: make this process see token mode too
            raylet = sys.modules["ray._raylet"]
            raylet.Config.initialize("")
            raylet.AuthenticationTokenLoader.instance().reset_cache()  # not an earlier local Ray's token
    if gcs_port is not None:
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    return folder


def start_local_ray(*, num_cpus: float | None = None, root: str | os.PathLike | None = None, gcs_port: int | None = None,
                    dashboard: bool = False, object_store_mb: int | None = None, runtime_env: dict | None = None,
                    **init_options) -> Path:
    """Start a new single-node Ray on 127.0.0.1 (never joins another one); returns its temporary folder."""
    folder = prepare_environment(root, gcs_port=gcs_port)
    import ray

    ray.init(address="local", num_cpus=None if num_cpus is None else int(num_cpus), include_dashboard=dashboard,
             dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
             object_store_memory=None if object_store_mb is None else object_store_mb * 1024 * 1024,
             runtime_env=runtime_env, log_to_driver=False, configure_logging=False, **init_options)
    return folder


@contextmanager
def local_serve(port: int, *, root: str | os.PathLike, gcs_port: int | None = None, num_cpus: float = 2,
                object_store_mb: int = 256, **init_options) -> Iterator[Path]:
    """A private Ray with Serve's proxy on 127.0.0.1:``port`` for the benchmarks and the serving tests
    (``init_options`` go to ``ray.init``); everything is stopped and ``root`` removed on exit."""
    start_local_ray(num_cpus=num_cpus, root=root, gcs_port=gcs_port, object_store_mb=object_store_mb, **init_options)
    import ray
    from ray import serve

    try:
        serve.start(http_options={"host": LOOPBACK, "port": port})
        yield Path(root)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)
