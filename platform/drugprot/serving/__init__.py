"""Ray Serve application for DrugProt relation extraction (``drugprot serve``, ``serve run serve/local.yaml``).

Modules: ``options`` (typed builder arguments), ``schemas`` (HTTP models), ``batching`` (framework-free cross-request
pair batching), ``service`` (limits, readiness, warm-up around one Predictor), ``api`` (FastAPI app), ``app`` (the
Serve deployments), ``follow`` (the live champion swap of ``drugprot serve --follow-alias``), ``rollout`` (canary
and shadow in the ingress). Only ``app``, ``follow`` and ``metrics`` import Ray, and only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application

    from drugprot.serving.options import ServeOptions

__all__ = ["build_app", "build_challenger"]


def build_app(args: dict[str, Any] | ServeOptions | None = None) -> Application:
    """Application builder: validated ``args`` (see ``ServeOptions``) → the bound Serve application."""
    from drugprot.serving.app import build_application

    return build_application(args)


def build_challenger(args: dict[str, Any] | ServeOptions | None = None) -> Application:
    """Application builder for a rollout's challenger (``rollout.challenger``), deployed as ``NAME-challenger`` with no
    route beside the application ``NAME`` that ``build_app`` makes from the same ``args``."""
    from drugprot.serving.app import build_challenger_application

    return build_challenger_application(args)
