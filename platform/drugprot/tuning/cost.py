"""What a study cost: wall and device seconds per trial, and the device-hours ASHA saved.

Device seconds are what a trial held of its device: GPU seconds (wall seconds x the GPUs it was given, fractions
included) when it ran on GPUs, else the CPU seconds its process used (``time.process_time``, all threads). A trial
counts its cost up to each reported evaluation and carries it in its checkpoint (``cost.json``), so a trial retried
from a checkpoint goes on counting from there; the time lost after that checkpoint is not counted.

ASHA's saving compares the study with one where every trial ran to its last evaluation (``max_t``): an early-stopped
trial would have cost its device seconds per evaluation for each evaluation it skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

COST_FILE = "cost.json"


class TrialClock:
    """Counts one trial's wall and device seconds across restarts (see the module docstring)."""

    def __init__(self, *, gpus: float, carried: dict | None = None):
        self.gpus = gpus
        carried = carried or {}
        self._wall0 = float(carried.get("wall_s", 0.0))
        self._device0 = float(carried.get("device_s", 0.0))
        self._start = time.monotonic()
        self._cpu_start = time.process_time()

    @classmethod
    def resume(cls, folder: Path, *, gpus: float) -> TrialClock:
        """A clock that goes on from the cost saved in a restored checkpoint folder (if any)."""
        try:
            carried = json.loads((Path(folder) / COST_FILE).read_text())
        except (OSError, ValueError):
            carried = None
        return cls(gpus=gpus, carried=carried)

    def read(self) -> dict[str, float]:
        wall = time.monotonic() - self._start
        device = wall * self.gpus if self.gpus > 0 else time.process_time() - self._cpu_start
        return {"wall_s": round(self._wall0 + wall, 3), "device_s": round(self._device0 + device, 3)}

    def save(self, folder: Path) -> dict[str, float]:
        """Write the cost so far into ``folder`` (the next checkpoint) and return it."""
        cost = self.read()
        (Path(folder) / COST_FILE).write_text(json.dumps(cost))
        return cost


@dataclass(frozen=True)
class TrialCost:
    """A finished trial's cost, as logged to its MLflow run."""

    wall_s: float
    device_s: float
    evaluations: int
    pairs_per_s: float | None
    asha_stopped: bool

    def metrics(self) -> dict[str, float]:
        out = {"wall_s": self.wall_s, "device_s": self.device_s, "evaluations": float(self.evaluations),
               "asha_stopped": float(self.asha_stopped)}
        if self.pairs_per_s is not None:
            out["train_pairs_per_s"] = self.pairs_per_s
        return out


def trial_cost(result: dict, *, state: str) -> TrialCost:
    """The cost from a trial's last reported result and its final state."""
    pairs = result.get("pairs_per_s")
    return TrialCost(wall_s=float(result.get("wall_s") or 0.0), device_s=float(result.get("device_s") or 0.0),
                     evaluations=int(result.get("eval") or 0),
                     pairs_per_s=float(pairs) if isinstance(pairs, (int, float)) else None,
                     asha_stopped=state == "early-stopped")


def study_cost(costs: list[TrialCost], *, max_t: int, device: str, wall_s: float) -> dict[str, float | str]:
    """Totals for the parent run: device-hours spent and the share ASHA saved against running every trial to
    ``max_t`` evaluations."""
    spent = sum(c.device_s for c in costs)
    skipped = sum(c.device_s / c.evaluations * (max_t - c.evaluations)
                  for c in costs if c.asha_stopped and 0 < c.evaluations < max_t)
    return {"device": device, "device_hours": round(spent / 3600, 5),
            "trial_wall_s": round(sum(c.wall_s for c in costs), 1), "study_wall_s": round(wall_s, 1), "evaluations": sum(c.evaluations for c in costs),
            "asha_stopped": sum(c.asha_stopped for c in costs),
            "asha_saved_share": round(skipped / (spent + skipped), 4) if spent + skipped > 0 else 0.0}
