"""Shared fixtures: the bundled sample, the full shared corpus (skipped when absent), tiny corpora from strings,
and tiny trained models (``fixtures_models``, trained once per test session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from drugprot.config import SAMPLE_DIR
from fixtures_models import relation_members, smoke_members, smoke_model_dir  # noqa: F401  (session fixtures: trained once per run)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = (REPO_ROOT / "../shared/data/drugprot").resolve()


def write_corpus(root: Path, split: str = "training", *, abstracts: str, entities: str, relations: str | None = "") -> Path:
    """Write one split in the official layout from file contents; returns ``root`` (the corpus folder).

    ``relations=None`` leaves the relations file out. Strings are written as given (UTF-8), so a test can
    plant any malformed line; pass ``bytes`` through :func:`Path.write_bytes` for encoding errors instead.
    """
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"drugprot_{split}_abstracs.tsv").write_text(abstracts, encoding="utf-8")
    (folder / f"drugprot_{split}_entities.tsv").write_text(entities, encoding="utf-8")
    if relations is not None:
        (folder / f"drugprot_{split}_relations.tsv").write_text(relations, encoding="utf-8")
    return Path(root)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled 40 + 10 document sample (official layout, training and development)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def dev_documents():
    """The sample's development documents, read once per session: a test must not modify them."""
    from drugprot.corpus import read_split

    return read_split(SAMPLE_DIR, "development").documents


#: Runs ``drugprot.cli.main(argv)`` and then says whether the command left Ray initialised in its process.
_CLI_THEN_RAY_STATE = ("import sys, ray\nfrom drugprot.cli import main\ncode = main(sys.argv[1:])\n"
                       "print(f'ray initialized: {ray.is_initialized()}')\nsys.exit(code)")


@pytest.fixture
def fresh_drugprot(tmp_path):
    """Run ``drugprot ARGV`` in a new Python process, so that no Ray runtime or other state left by earlier tests in
    this process changes what it does; the environment is this process's at the call. Its stdout ends with
    ``ray initialized: True|False``, whether the command left Ray initialised."""

    def run(argv: list[str], *, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _CLI_THEN_RAY_STATE, *argv], cwd=cwd or tmp_path, env=dict(os.environ),
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def full_corpus_dir() -> Path:
    """The full DrugProt v1.1 corpus in ../shared/data/drugprot; tests using it skip when it is not there."""
    if not all((SHARED_CORPUS / split).is_dir() for split in ("training", "development")):
        pytest.skip(f"full DrugProt corpus not found at {SHARED_CORPUS} (needs training/ and development/)")
    return SHARED_CORPUS


@pytest.fixture
def make_corpus(tmp_path):
    """Factory: ``make_corpus(abstracts=..., entities=..., relations=..., split=...)`` -> corpus folder in tmp_path."""

    def make(split: str = "training", **files) -> Path:
        return write_corpus(tmp_path / "corpus", split, **files)

    return make
