"""The private local Ray (``drugprot.local_ray``): one process may start several, one after another, as the serving
tests, the benches and ``drugprot serve`` in a notebook do."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from drugprot.local_ray import start_local_ray

RAY_ENV = ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_GCS_SERVER_PORT")


@pytest.fixture
def clean_ray_environment(monkeypatch):
    """No Ray variables set; afterwards the environment as it was, and this process's Ray configuration read from it
    again (another module may run Ray with ``RAY_AUTH_MODE=disabled`` in this process later)."""
    for key in RAY_ENV:
        monkeypatch.setenv(key, "")  # remembers whether it was set, so teardown puts it back as it was
        monkeypatch.delenv(key)
    yield
    monkeypatch.undo()
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def short_folder():
    """A short temporary folder: Ray's socket paths under it must fit in 107 bytes, pytest's tmp_path is too long."""
    folder = Path(tempfile.mkdtemp(prefix="dp-ray-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_second_local_ray_in_one_process_authenticates_with_its_own_token(short_folder, clean_ray_environment,
                                                                           monkeypatch):
    """Each local Ray writes a new token into its folder; Ray caches the token it read first, so a second Ray in the
    same process failed to start ("InvalidAuthToken") until the cache was reset."""
    import ray

    tokens = []
    for name in ("first", "second"):
        start_local_ray(num_cpus=1, root=short_folder / name, object_store_mb=80)
        try:
            assert ray.get(ray.put(name)) == name
            tokens.append((short_folder / name / "auth_token").read_text())
        finally:
            ray.shutdown()
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # as a test module's fixture leaves them
            monkeypatch.delenv(key)
    assert tokens[0] != tokens[1]
