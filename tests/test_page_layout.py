"""The page at ``/`` lays relation arcs out so that each label is readable: in real headless Chromium, the bundled
example with many relations (nested and side by side) gets no two label boxes overlapping.

The page is served here by a small HTTP server that answers ``v1/relations`` with a fixed set of relations: the
layout is what is under test, and it depends only on the answer (the real service answering the real page is tested
in ``test_serving.py``).
"""

from __future__ import annotations

import html
import itertools
import json
import re
import shutil
import subprocess
from http.server import BaseHTTPRequestHandler

import pytest
from fixtures_serving import http_server

from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split
from drugprot.encoding import LABELS
from drugprot.serving.api import try_page

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")


def example_relations(count: int) -> list[dict]:
    """``count`` relations over the example's chemical × gene pairs, the closest pairs first, so that short arcs nest
    under long ones and neighbours sit side by side, as in a real abstract."""
    document = read_split(SAMPLE_DIR, "development").documents[0]
    chemicals = [e for e in document.entities.values() if e.type == "CHEMICAL"]
    genes = [e for e in document.entities.values() if e.type != "CHEMICAL"]
    pairs = sorted(itertools.product(chemicals, genes), key=lambda p: abs(p[0].start - p[1].start))
    assert len(pairs) >= count, "the bundled example has too few pairs for this test"
    return [{"chemical": c.id, "gene": g.id, "type": LABELS[1 + i % (len(LABELS) - 1)], "score": 0.5,
             "votes": [LABELS[1 + i % (len(LABELS) - 1)]]} for i, (c, g) in enumerate(pairs[:count])]


@pytest.fixture
def page_server():
    answer = {"documents": [{"id": "page", "candidates": 30, "relations": example_relations(9)}]}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(200, "text/html; charset=utf-8", try_page().encode())

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(200, "application/json", json.dumps(answer).encode())

        def _send(self, status, kind, body):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http_server(Handler) as url:
        yield url, answer["documents"][0]["relations"]


def overlapping(boxes: list[tuple[float, float, float, float]]) -> list[tuple[int, int]]:
    return [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2)
            if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]]


def test_no_two_arc_labels_overlap(page_server, tmp_path):
    url, relations = page_server
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1100,1400", "--virtual-time-budget=20000"]
    dom = subprocess.run([*chromium, "--dump-dom", f"{url}/#send"], capture_output=True, text=True, timeout=180).stdout
    assert 'data-state="done"' in dom, dom[-2000:]
    labels = re.findall(r'<text [^>]*data-box="([^"]+)"[^>]*>([^<]+)</text>', html.unescape(dom))
    assert sorted(t for _, t in labels) == sorted(r["type"] for r in relations)
    boxes = [tuple(float(v) for v in box.split(",")) for box, _ in labels]
    assert all(w > 0 and h > 0 for _, _, w, h in boxes)
    assert overlapping(boxes) == [], [labels[i][1] + " / " + labels[j][1] for i, j in overlapping(boxes)]
    shot = tmp_path / "page.png"
    subprocess.run([*chromium, f"--screenshot={shot}", f"{url}/#send"], capture_output=True, timeout=180)
    assert shot.stat().st_size > 10_000


def test_the_overlap_check_sees_an_overlap():
    assert overlapping([(0, 0, 10, 10), (5, 5, 10, 10), (20, 0, 5, 5)]) == [(0, 1)]
