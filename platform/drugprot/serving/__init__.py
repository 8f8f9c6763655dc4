"""Ray Serve application for DrugProt relation extraction (``drugprot serve``, ``serve run serve/local.yaml``).

Modules: ``options`` (typed builder arguments), ``schemas`` (HTTP models), ``batching`` (framework-free cross-request
pair batching), ``service`` (limits, readiness, warm-up around one Predictor), ``api`` (FastAPI app), ``app`` (the
Serve deployment). Only ``app`` imports Ray, and only when :func:`build_app` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application

    from drugprot.serving.options import ServeOptions

__all__ = ["build_app"]


def build_app(args: dict[str, Any] | ServeOptions | None = None) -> Application:
    """Application builder: validated ``args`` (see ``ServeOptions``) → the bound Serve application."""
    from drugprot.serving.app import build_application

    return build_application(args)
