"""A real PostgreSQL server for tests, from Debian's packages, on 127.0.0.1 in a temporary data folder.

``make test`` installs the ``postgresql`` package when it is missing (CI runs as root); the server itself is
started here with ``initdb`` + ``pg_ctl`` (as the ``postgres`` user when running as root, since PostgreSQL refuses
to run as root) and stopped when the session ends. Without the binaries the fixture skips with the install line.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fixtures_mlflow import _free_port

PORTS = os.environ.get("POSTGRES_TEST_PORTS", "5440-5449")


def postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


@contextlib.contextmanager
def postgres_server(database: str = "mlflow", *, password: str | None = None):
    """Yield a SQLAlchemy URI ``postgresql+psycopg://postgres@127.0.0.1:PORT/DATABASE`` of a fresh server; with
    ``password``, TCP logins need it (scram-sha-256) and the URI leaves it out (clients set PGPASSWORD)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found: apt-get install -y postgresql (make test does this as root)")
    root = Path(tempfile.mkdtemp(prefix="drugprot-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port(PORTS, "the test PostgreSQL server (set POSTGRES_TEST_PORTS)")
    log = root / "server.log"

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120,
                       env={**os.environ, "PGPASSWORD": password} if password else None)

    auth = ["--auth=trust"]
    if password:
        (root / "pwfile").write_text(password)
        os.chmod(root / "pwfile", 0o644)   # initdb runs as the postgres user; the folder is removed at the end
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={root / 'pwfile'}"]
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", *auth, "--no-sync", "-E", "UTF8")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
            "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off")
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_uri():
    with postgres_server() as uri:
        yield uri
