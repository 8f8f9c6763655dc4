"""Settings that MLflow and Ray users put in the environment, resolved the same way for every command.

The flag wins, then the ecosystem's own variable, then drugprot's default: ``--tracking-uri`` >
``MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db``, and ``--address`` > ``RAY_ADDRESS`` > a private local Ray. The
KubeRay ConfigMap in ``infra/`` sets both variables once for every pod.
"""

from __future__ import annotations

import os

TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"
RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"


def setting(flag: str | None, variable: str, default: str | None = None) -> str | None:
    """``flag`` when given, else the environment variable ``variable`` when set and not empty, else ``default``."""
    if flag not in (None, ""):
        return flag
    return os.environ.get(variable) or default
