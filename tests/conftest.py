"""Shared fixtures: the bundled sample, the full shared corpus (skipped when absent), tiny corpora from strings,
and tiny trained models (``fixtures_models``, trained once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drugprot.config import SAMPLE_DIR
from fixtures_models import smoke_members, smoke_model_dir  # noqa: F401  (session fixtures: trained once per run)

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
