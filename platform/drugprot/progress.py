"""The progress bar every command shows on stderr (tqdm), off with ``--quiet``; one place for its look."""

from __future__ import annotations

import sys


def progress_bar(total: int | None, *, unit: str, quiet: bool = False, description: str | None = None, initial: int = 0):
    """A tqdm bar on stderr (``unit="B"`` counts bytes as kB/MB); ``quiet`` gives a silent one with the same API."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=description, disable=quiet, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000)
