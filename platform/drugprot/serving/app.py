"""The Ray Serve deployment: one replica = one RelationService (model, batcher, limits, auth) behind FastAPI.

``build_application(args)`` is the application builder behind ``drugprot.serving:build_app`` (``serve run``,
``serve deploy``, KubeRay ``serveConfigV2``, ``drugprot serve``). The replica loads the model in its constructor
(a bad model fails the deployment with its message), then warms up in its model thread; ``/readyz`` turns 200 when
that is done. Serve's proxy answers 503 once ``max_queued_requests`` requests wait; ``check_health`` reports a failed
warm-up so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve import Application

from drugprot.serving.api import create_api, resolve_token
from drugprot.serving.options import ServeOptions, parse_options
from drugprot.serving.service import RelationService

log = logging.getLogger("drugprot.serving")

DEPLOYMENT_NAME = "DrugprotRelations"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class RelationDeployment:
    """A Serve replica: the FastAPI app is built per replica around this replica's service."""

    def __init__(self, options: dict[str, Any]):
        self.options = parse_options(options)
        self.token = resolve_token(self.options.token_env, required=self.options.require_token)
        self.service = RelationService.load(self.options)
        self.service.start_warmup()
        log.info("drugprot serving: model %s loaded (auth %s)", self.options.model, "on" if self.token else "off")

    def __serve_build_asgi_app__(self):
        return create_api(self.service, token=self.token)

    def check_health(self) -> None:
        self.service.check_health()

    async def __del__(self):
        try:
            await asyncio.wait_for(self.service.close(), timeout=5)
        except Exception:  # shutting down anyway
            pass


def build_application(args: dict[str, Any] | ServeOptions | None) -> Application:
    options = parse_options(args)
    return RelationDeployment.options(**options.deployment_options()).bind(options.model_dump(mode="json"))
