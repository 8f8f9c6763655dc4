"""A private local Ray for ``drugprot serve`` without ``--address``, the serving tests and the load benchmark.

Ray 2.60 turns token authentication on by default and every process must agree: when ``RAY_AUTH_MODE`` is unset
we choose token mode with a fresh token in a file under the Ray temporary folder (never ``~/.ray``); a mode the
caller already set is kept. Usage statistics are off unless the caller says otherwise.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path


def prepare_environment(root: str | os.PathLike | None = None, *, gcs_port: int | None = None) -> Path:
    """Set the environment a local Ray inherits: its temporary folder (``root``, else ``RAY_TMPDIR``, else a new
    ``/tmp/drugprot-serve-*``), no usage stats, token auth; returns the folder."""
    if root is None and os.environ.get("RAY_TMPDIR"):
        root = os.environ["RAY_TMPDIR"]  # the caller chose Ray's temporary folder
    folder = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="drugprot-serve-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(folder)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "RAY_AUTH_MODE" not in os.environ:
        token_file = folder / "auth_token"
        if not token_file.exists():
            token_file.write_text(secrets.token_hex(32))
            token_file.chmod(0o600)
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
        if "ray._raylet" in sys.modules:  # Ray read its config at import: make this process see token mode too
            sys.modules["ray._raylet"].Config.initialize("")
    if gcs_port is not None:
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    return folder


def start_local_ray(*, num_cpus: float | None = None, root: str | os.PathLike | None = None, gcs_port: int | None = None,
                    dashboard: bool = False, object_store_mb: int | None = None, runtime_env: dict | None = None) -> Path:
    """Start a new single-node Ray (never joins another one); returns its temporary folder."""
    folder = prepare_environment(root, gcs_port=gcs_port)
    import ray

    ray.init(address="local", num_cpus=None if num_cpus is None else int(num_cpus), include_dashboard=dashboard,
             object_store_memory=None if object_store_mb is None else object_store_mb * 1024 * 1024,
             runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
    return folder
