"""Fetch the official DrugProt v1.1 archive (Zenodo), verify its sha256, and unpack the training/development TSVs.

Everything is staged in a temporary folder beside the destination and moved into place only after the checksum
and the archive's contents check out, so a failed download never leaves a partial corpus behind.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from drugprot.errors import DrugprotError
from drugprot.manifest import sha256_file
from drugprot.progress import progress_bar

OFFICIAL_URL = "https://zenodo.org/record/5042151/files/drugprot-gs-training-development.zip?download=1"
OFFICIAL_SHA256 = "510c659348145e5fbd4980301f35f52ea2e08c8672e47d93ffcc46075fda0ec4"
SPLITS = ("training", "development")


class DownloadError(DrugprotError, RuntimeError):
    pass


def download_corpus(dest: str | Path, *, url: str = OFFICIAL_URL, sha256: str = OFFICIAL_SHA256, timeout: float = 60,
                    quiet: bool = True) -> Path:
    """Download, verify and unpack into ``dest/{training,development}``; returns ``dest``. Unless ``quiet``, a
    progress bar counts the bytes on stderr."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as staging:
        archive = Path(staging) / "archive.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                size = response.headers.get("Content-Length")
                with progress_bar(int(size) if size else None, unit="B", quiet=quiet, description="download") as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
        except (OSError, ValueError) as error:
            raise DownloadError(f"cannot download {url}: {error}") from None
        found = sha256_file(archive)
        if found != sha256:
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {found}; nothing was written")
        unpacked = Path(staging) / "corpus"
        try:
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():
                    parts = Path(info.filename).parts
                    split = next((p for p in parts if p in SPLITS), None)
                    if info.is_dir() or split is None or not info.filename.endswith(".tsv"):
                        continue
                    if any(p == "__MACOSX" or p.startswith(".") for p in parts):
                        continue  # macOS resource forks (._name.tsv) would be taken for a second abstracts file
                    target = unpacked / split / Path(info.filename).name
                    if target.exists():
                        raise DownloadError(f"{url}: archive holds two {split}/{target.name} files; nothing was written")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zipped.open(info) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
        except zipfile.BadZipFile as error:
            raise DownloadError(f"{url}: not a zip archive ({error})") from None
        missing = [s for s in SPLITS if not (unpacked / s).is_dir()]
        if missing:
            raise DownloadError(f"{url}: archive has no {', '.join(missing)} folder; nothing was written")
        for split in SPLITS:
            target = dest / split
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(unpacked / split), target)
    return dest
