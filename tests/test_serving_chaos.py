"""``bench/serve_chaos.py`` in its short form, as a slow test: real Ray Serve, real SIGKILLs, real HTTP clients.

Kill phase: neither kill costs a request (a model call is retried on the other model replica; a request whose
ingress replica died is resent by the proxy's middleware). Stalled phase: 200 stalled bodies held open fail no
valid request, and each stalled connection is answered (408, 429 or 503), none hangs. Overload phase: every refusal
is a JSON 503 with Retry-After and no accepted request fails. The swap and SIGTERM phases have their own slow tests
(test_serving_swap.py, test_serving.py). Ports: Serve HTTP 8117, Ray GCS 6429.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_chaos_benchmark_short_run(relation_members, tmp_path):  # noqa: F811
    from drugprot.ensemble import build_ensemble

    model = build_ensemble(relation_members, tmp_path / "ensemble", vote="soft", log=lambda _: None).path
    done = subprocess.run([sys.executable, str(REPO / "bench" / "serve_chaos.py"), "--model", str(model),
                           "--phases", "kill,stalled,overload", "--seconds", "15", "--clients", "8",
                           "--overload-clients", "16", "--overload-replicas", "1", "--max-queue-wait-s", "0.2",
                           "--report-only", "--port", "8117", "--gcs-port", "6429"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {line["phase"]: line for line in map(json.loads, (l for l in done.stdout.splitlines() if l.startswith("{")))}
    kill, stalled, overload = results["kill"], results["stalled"], results["overload"]
    print(f"\n{json.dumps(kill)}\n{json.dumps(stalled)}\n{json.dumps(overload)}")
    assert kill["sent"] > 50 and kill["model_replaced_s"] is not None and kill["ingress_replaced_s"] is not None
    assert kill["failed"] == 0, kill
    assert stalled["all_held"] and stalled["sent_under_attack"] > 0 and stalled["failed"] == 0, stalled
    assert set(stalled["stalled_answers"]) <= {"408", "429", "503", "still stalled at the end"}, stalled
    assert overload["refused"] > 0 and overload["failed"] == 0
    assert overload["refusals_with_retry_after"] == overload["refusals_json"] == overload["refused"]
    assert overload["refused_at_proxy"] > 0, overload  # the proxy learnt the capacity and refused the excess itself
