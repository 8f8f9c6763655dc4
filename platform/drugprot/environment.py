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


#: Set for every command and every local Ray unless the user set them: no usage reports or telemetry leave the
#: machine, and MLflow's artifact progress bars do not flood logs.
QUIET_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                  "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def quiet_defaults() -> None:
    """Apply :data:`QUIET_DEFAULTS` to this process (and so to the Ray workers it starts); a variable already set wins."""
    for variable, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(variable, value)
