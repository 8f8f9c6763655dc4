"""bench/tune_chaos.py as a test: three nodes, S3 on moto_server, MLflow on PostgreSQL, a worker's raylet and then the
driver SIGKILLed, the study resumed; nothing may be lost or logged twice. CI runs a smaller study than the bench's
default (6 trials, no baseline run) to stay within its time budget; the checks are the same. Both faults are
triggered by progress (evaluations reported, trials restarted and ended), not by the clock, and a trial has 8
evaluations (4 epochs), so the retried trial still runs when the driver is killed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chaos_rehearsal_loses_nothing(tmp_path, capsys):
    if shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]', part of the test extra)")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import tune_chaos
    finally:
        sys.path.remove(str(REPO / "bench"))
    code = tune_chaos.main(["--trials", "6", "--max-concurrent", "3", "--kill-driver-after", "2", "--epochs", "4",
                            "--victim-eval", "5", "--skip-baseline", "--keep", str(tmp_path / "work")])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["lost_metrics"], line["duplicate_runs"], line["duplicate_steps"], line["errored"]) == (0, 0, 0, 0), line
    assert line["trials"] == line["ray_trials"] == line["models_from_s3"] == line["optuna_trials_complete"] == 6, line
    assert line["restarts_tagged"] and line["retries"] >= 1, line
    assert line["raylet_killed"]["node"].startswith("worker-") and line["driver_killed"]["running_trials"] >= 1, line
    assert line["ensemble_registered"], (tmp_path / "work" / "ensemble.log").read_text()[-3000:]
    assert code == 0 and line["ok"], line
