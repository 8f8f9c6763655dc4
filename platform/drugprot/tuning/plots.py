"""Optuna plots of a study (optimization history, parameter importances, parallel coordinates), as HTML and PNG.

The plots are drawn from the study's own Optuna study, in its storage (``optuna.db`` in the study folder, or the
``--optuna-storage`` database): OptunaSearch writes every trial there as Tune runs it (values asked, best dev F1
told, dev F1 at every evaluation as intermediate values), so they cover every trial of a resumed study too, and
``optuna-dashboard STORAGE`` shows the same study live. Early-stopped trials are complete with the best dev F1 they
reached; errored ones FAIL. PNGs come from plotly + kaleido when kaleido finds a Chrome; otherwise from
``optuna.visualization.matplotlib``. A plot that cannot be drawn (e.g. importances with fewer than two finished
trials) is skipped and named in the returned notes.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")
KALEIDO_TIMEOUT_S = 90.0


def load_optuna_study(name: str, storage: str, *, close_running: bool = False):
    """The study ``name`` from its Optuna storage. With ``close_running`` (the Tune study has ended), trials still
    RUNNING there -- asked by a driver that was killed before Tune saved them -- are marked FAIL."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    if close_running:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
    return study


def write_plots(study, folder: Path) -> tuple[list[Path], list[str]]:
    """Write ``folder/NAME.html`` and ``folder/NAME.png`` for each plot; returns (files, notes)."""
    import optuna.visualization as vis

    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    notes: list[str] = []
    figures: dict[str, Any] = {}
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = getattr(vis, f"plot_{name}")(study)
        except Exception as error:  # noqa: BLE001 - a plot that cannot be drawn is skipped, not fatal
            notes.append(f"{name}: not drawn ({type(error).__name__}: {str(error)[:160]})")
            continue
        figure.write_html(folder / f"{name}.html", include_plotlyjs="cdn")
        files.append(folder / f"{name}.html")
        figures[name] = figure

    pngs = {name: folder / f"{name}.png" for name in figures}
    error = _kaleido(figures, pngs) if figures else None
    if error is not None:
        notes.append(f"PNG through kaleido failed ({error}); drew the PNGs with matplotlib")
    for name, png in pngs.items():
        if error is None:
            files.append(png)
            continue
        failure = _matplotlib(name, study, png)
        if failure is None:
            files.append(png)
        else:
            notes.append(f"{name}.png: not drawn ({failure})")
    return files, notes


def _kaleido(figures: dict[str, Any], pngs: dict[str, Path]) -> str | None:
    """Export every figure through one kaleido browser session; None on success, else why not."""
    outcome: dict[str, str | None] = {}

    def export() -> None:
        try:
            import plotly.io as pio

            names = list(figures)
            if hasattr(pio, "write_images"):  # plotly >= 6.1: one browser for all figures
                pio.write_images([figures[n] for n in names], [str(pngs[n]) for n in names], width=1000, height=600)
            else:
                for n in names:
                    figures[n].write_image(str(pngs[n]), width=1000, height=600)
            outcome["error"] = None
        except Exception as error:  # noqa: BLE001
            outcome["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:120]}"

    logging.getLogger("kaleido").setLevel(logging.ERROR)
    logging.getLogger("choreographer").setLevel(logging.ERROR)
    worker = threading.Thread(target=export, daemon=True, name="kaleido-export")
    worker.start()
    worker.join(KALEIDO_TIMEOUT_S)
    if worker.is_alive():
        return f"no answer within {KALEIDO_TIMEOUT_S:.0f} s"
    if outcome.get("error") is None and not all(p.is_file() for p in pngs.values()):
        return "no file written"
    return outcome.get("error")


def _matplotlib(name: str, study, png: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as vis

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = getattr(vis, f"plot_{name}")(study)
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figure.savefig(png, dpi=100)
        plt.close(figure)
        return None
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {str(error)[:160]}"
