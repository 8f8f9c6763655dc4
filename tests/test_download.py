"""``download_corpus`` against local zips served through file:// URLs (never the network)."""

from __future__ import annotations

import hashlib
import socket
import zipfile
from pathlib import Path

import pytest

from drugprot.cli import main
from drugprot.corpus import read_split
from drugprot.download import DownloadError, download_corpus

TOP = "drugprot-gs-training-development"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def official_like_zip(path: Path, sample_dir: Path, *, splits=("training", "development")) -> Path:
    """A zip laid out like the official archive, holding the bundled sample's files plus the usual clutter."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{TOP}/", "")
        archive.writestr(f"{TOP}/README.pdf", b"%PDF-1.4 not really")
        for split in splits:
            archive.writestr(f"{TOP}/{split}/", "")
            for source in sorted((sample_dir / split).glob("*.tsv")):
                archive.write(source, f"{TOP}/{split}/{source.name}")
                # a macOS resource fork that would otherwise look like a second abstracts/entities file
                archive.writestr(f"__MACOSX/{TOP}/{split}/._{source.name}", b"\x00\x05\x16\x07")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path, sample_dir) -> Path:
    return official_like_zip(tmp_path / "drugprot-gs-training-development.zip", sample_dir)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith(".download-")) if dest.exists() else []


def test_download_unpacks_each_split(archive, tmp_path, sample_dir):
    dest = tmp_path / "data" / "drugprot"
    assert download_corpus(dest, url=archive.as_uri(), sha256=sha256(archive)) == dest
    for split in ("training", "development"):
        names = sorted(p.name for p in (dest / split).iterdir())
        assert names == sorted(p.name for p in (sample_dir / split).glob("*.tsv"))
        for name in names:
            assert (dest / split / name).read_bytes() == (sample_dir / split / name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["development", "training"]  # no README.pdf, no staging
    assert len(read_split(dest, "training")) == 40 and len(read_split(dest, "development")) == 10


def test_download_replaces_an_older_copy(archive, tmp_path):
    dest = tmp_path / "corpus"
    (dest / "training").mkdir(parents=True)
    (dest / "training" / "stale_entities.tsv").write_text("old")
    download_corpus(dest, url=archive.as_uri(), sha256=sha256(archive))
    assert not (dest / "training" / "stale_entities.tsv").exists()
    assert len(read_split(dest, "training")) == 40


def test_checksum_mismatch_names_both_hashes_and_writes_nothing(archive, tmp_path):
    dest = tmp_path / "corpus"
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=rf"expected sha256 {wrong}, got {sha256(archive)}"):
        download_corpus(dest, url=archive.as_uri(), sha256=wrong)
    assert not (dest / "training").exists() and not (dest / "development").exists()
    assert leftovers(dest) == []


def test_checksum_mismatch_keeps_an_existing_corpus(archive, tmp_path):
    dest = tmp_path / "corpus"
    (dest / "training").mkdir(parents=True)
    (dest / "training" / "keep.tsv").write_text("mine")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_corpus(dest, url=archive.as_uri(), sha256="f" * 64)
    assert (dest / "training" / "keep.tsv").read_text() == "mine"


def test_non_zip_payload(tmp_path):
    payload = tmp_path / "page.html"
    payload.write_text("<html>Too many requests</html>")
    dest = tmp_path / "corpus"
    with pytest.raises(DownloadError, match="not a zip archive"):
        download_corpus(dest, url=payload.as_uri(), sha256=sha256(payload))
    assert not (dest / "training").exists() and leftovers(dest) == []


def test_zip_without_a_split(tmp_path, sample_dir):
    partial = official_like_zip(tmp_path / "partial.zip", sample_dir, splits=("training",))
    dest = tmp_path / "corpus"
    with pytest.raises(DownloadError, match="archive has no development folder"):
        download_corpus(dest, url=partial.as_uri(), sha256=sha256(partial))
    assert not (dest / "training").exists()


def test_unreachable_url(tmp_path):
    missing = tmp_path / "nowhere.zip"
    with pytest.raises(DownloadError, match="cannot download"):
        download_corpus(tmp_path / "corpus", url=missing.as_uri(), sha256="0" * 64)


def test_download_cli(archive, tmp_path, capsys):
    dest = tmp_path / "cli"
    assert main(["data", "download", "--dest", str(dest), "--url", archive.as_uri(), "--sha256", sha256(archive)]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    assert main(["data", "check", "--data", str(dest)]) == 0
    capsys.readouterr()
    assert main(["data", "download", "--dest", str(tmp_path / "other"), "--url", archive.as_uri(), "--sha256", "1" * 64]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_download_cli_shows_bytes_unless_quiet(archive, tmp_path, capsys):
    url, digest = archive.as_uri(), sha256(archive)
    assert main(["data", "download", "--dest", str(tmp_path / "a"), "--url", url, "--sha256", digest]) == 0
    err = capsys.readouterr().err
    assert "download: 100%" in err and f"/{archive.stat().st_size / 1024:.1f}k" in err.replace("kB", "k")
    assert main(["data", "download", "--dest", str(tmp_path / "b"), "--url", url, "--sha256", digest, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
