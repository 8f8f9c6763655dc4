"""The Serve application: two deployments, composed as Ray Serve's model composition does.

* ``DrugprotIngress`` (CPU): FastAPI, auth, limits, validation, candidate generation, decoding. It holds a handle
  to the model deployment and calls it through :class:`RemoteModel`, which retries a call whose model replica died
  (scoring is pure) on another replica, bounded by a count and a deadline.
* ``DrugprotModel`` (GPU when given one): the loaded Predictor and the pair batcher, shared by every ingress replica.
  It loads and warms up in its constructor, so Serve routes nothing to a replica before it is warm; a bad model
  fails the constructor with its ``DrugprotError`` message (``drugprot serve`` prints it).

``build_application(args)`` is the application builder behind ``drugprot.serving:build_app`` (``serve run``,
``serve deploy``, KubeRay ``serveConfigV2``, ``drugprot serve``). The per-deployment options set here are defaults
that a config's ``deployments:`` section overrides without restarting unaffected replicas.

With ``rollout`` the challenger is a model deployment in an application of its own, ``NAME-challenger`` with no
route (``build_challenger_application``, behind ``drugprot.serving:build_challenger``): its constructor failing fails
that application only. Each ingress replica watches it through ``serve.status()`` (:class:`ChallengerWatch`) and
sends it requests once it runs; until then, or when it failed, the champion answers every request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.schema import ApplicationStatus

from drugprot.errors import DrugprotError
from drugprot.polling import poll
from drugprot.serving.api import create_api, resolve_token
from drugprot.serving.metrics import IngressMetrics, ModelMetrics
from drugprot.serving.options import ServeOptions, parse_options
from drugprot.serving.rollout import Challenger
from drugprot.serving.service import ModelService, Overloaded, RelationService, ServingError

log = logging.getLogger("drugprot.serving")

INGRESS_DEPLOYMENT = "DrugprotIngress"
MODEL_DEPLOYMENT = "DrugprotModel"
METRICS_REFRESH_S = 2.0
CHALLENGER_REFRESH_S = 2.0


def challenger_app_name(app_name: str) -> str:
    """The Serve application that holds the challenger of the application ``app_name``."""
    return f"{app_name}-challenger"


class ModelUnavailable(ServingError):
    status = 503
    headers = {"Retry-After": "1"}


class RemoteModel:
    """The model deployment seen from an ingress replica: the same async protocol as ``ModelService``.

    A call whose replica died (``RayActorError``) is sent again, to whichever replica the router picks, at most
    ``attempts`` times in all and until ``deadline_s`` after the first try; ``retries`` counts the repeats.
    A full model queue (Serve's ``BackPressureError``) is an ``Overloaded`` 503 with ``Retry-After``, never retried.
    """

    def __init__(self, handle, *, attempts: int, deadline_s: float, metrics: IngressMetrics | None = None):
        self.handle = handle
        self.metrics = metrics
        self.attempts = attempts
        self.deadline_s = deadline_s
        self.retries = 0

    async def _call(self, method: str, *args):
        deadline = time.monotonic() + self.deadline_s
        for attempt in range(1, self.attempts + 1):
            response = getattr(self.handle, method).remote(*args)
            started = time.monotonic()
            try:
                result = await asyncio.wait_for(_awaited(response), max(0.0, deadline - time.monotonic()))
                if self.metrics is not None and method == "score":
                    self.metrics.model_call(time.monotonic() - started)
                return result
            except ServingError as error:  # the replica's own refusal (Overloaded, NotReady), wrapped by Ray
                raise getattr(error, "cause", error) from None
            except BackPressureError:
                raise Overloaded("the model's queue is full; retry after a second", 1.0) from None
            except TimeoutError:
                raise ModelUnavailable(f"the model did not answer within {self.deadline_s:g} s; retry later") from None
            except (RayActorError, ReplicaUnavailableError) as error:
                if attempt == self.attempts or time.monotonic() >= deadline:
                    raise ModelUnavailable(f"the model replica failed {attempt} time(s) for this request "
                                           f"({type(error).__name__}); retry later") from None
                self.retries += 1
                if self.metrics is not None:
                    self.metrics.retry()
                log.warning("drugprot serving: model call %s failed (%s), retrying on another replica (%d/%d)",
                            method, type(error).__name__, attempt, self.attempts)
        raise AssertionError("unreachable")

    async def score(self, job):
        return await self._call("score", job)

    async def plan(self):
        return await self._call("plan")

    async def status(self) -> dict[str, Any]:
        return {**await self._call("status"), "retries": self.retries}

    async def info(self):
        return await self._call("info")


async def _awaited(response):
    return await response


def _replica_grpc_on_loopback() -> None:
    """Ray 2.60 opens each Serve replica's inter-deployment gRPC server on ``[::]:0`` whatever the node's IP
    (``ray.serve._private.replica``, not configurable). On a loopback-only node (``drugprot.local_ray``) bind it to
    127.0.0.1 instead, the address Serve advertises for it anyway; on a cluster node nothing changes. Called in each
    replica's constructor, which runs before Serve starts that server."""
    if not ray.is_initialized() or ray.util.get_node_ip_address() != "127.0.0.1":
        return
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback_only", False):
        return

    def bind_loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    bind_loopback.loopback_only = True
    replica.add_port_to_grpc_server = bind_loopback


@serve.deployment(name=MODEL_DEPLOYMENT)
class ModelDeployment:
    """A model replica: loads, warms up, then scores jobs from every ingress replica in shared batches."""

    def __init__(self, options: dict[str, Any], version: str | None = None, swap_error: str | None = None):
        """``version`` pins a ``models:/NAME@ALIAS`` model to one version (the alias watcher's redeploys)."""
        _replica_grpc_on_loopback()
        self.options = parse_options(options)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") if ray.is_initialized() else None
        self.service = ModelService.load(self.options, threads=max(1, math.floor(cpus)) if cpus else None,
                                         version=version, swap_error=swap_error)
        self.service.start_warmup().result()  # ready (and routed to) only once warm
        metrics = ModelMetrics(self.service.registry, self.options.model)
        self.service.batcher.on_batch = metrics.batch
        self._closing = threading.Event()
        threading.Thread(target=self._report, args=(metrics,), daemon=True, name="drugprot-metrics").start()
        if self.service.failure():
            raise DrugprotError(f"model {self.options.model}: {self.service.failure()}")
        log.info("drugprot serving: model %s loaded and warm", self.options.model)

    def _report(self, metrics: ModelMetrics) -> None:
        while not self._closing.wait(METRICS_REFRESH_S):
            metrics.refresh(self.service.batcher.queued)

    async def score(self, job):
        return await self.service.score(job)

    async def plan(self):
        return await self.service.plan()

    async def status(self):
        return await self.service.status()

    async def info(self):
        return await self.service.info()

    def check_health(self) -> None:
        self.service.check_health()

    def note_swap_error(self, swap_error: str) -> None:
        """The alias watcher's word that the version it moved to could not be served (``/v1/model`` shows it)."""
        self.service.swap_error = swap_error

    async def __del__(self):
        self._closing.set()
        try:
            await asyncio.wait_for(self.service.close(), timeout=5)
        except Exception:  # shutting down anyway
            pass


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class IngressDeployment:
    """An ingress replica: the FastAPI app around a RelationService whose model is the model deployment."""

    def __init__(self, options: dict[str, Any], model):
        _replica_grpc_on_loopback()
        self.options = parse_options(options)
        self.token = resolve_token(self.options.token_env, required=self.options.require_token)
        self.metrics = IngressMetrics()
        remote = RemoteModel(model, attempts=self.options.retry_attempts, deadline_s=self.options.retry_deadline_s,
                             metrics=self.metrics)
        rollout = self.options.rollout
        challenger = Challenger(None, rollout.challenger) if rollout is not None else None
        self.service = RelationService(remote, self.options, challenger=challenger, on_shadow=self.metrics.shadow)
        self.service.warm_up()  # routed to only once warm, like the model replicas
        self.watch = None
        if challenger is not None:
            app_name = serve.get_replica_context().app_name
            self.watch = ChallengerWatch(challenger, challenger_app_name(app_name), self.options, self.metrics)
            threading.Thread(target=self.watch.run, daemon=True, name="drugprot-challenger").start()
        log.info("drugprot serving: ingress up (auth %s)", "on" if self.token else "off")

    def __del__(self):
        """Serve calls it when the replica stops: the challenger watch stops with it."""
        if getattr(self, "watch", None) is not None:
            self.watch.stopped.set()

    def __serve_build_asgi_app__(self):
        return create_api(self.service, token=self.token, observe=self.metrics.request)

    def drain(self) -> int:
        """Refuse new requests (503 with Retry-After) from now on; returns the requests still inside."""
        self.service.draining = True
        return self.service.in_flight

    def in_flight(self) -> int:
        return self.service.in_flight

    def model_retries(self) -> int:
        """Model calls this replica sent again after their replica died."""
        return self.service.model.retries


class ChallengerWatch:
    """Keeps an ingress replica's view of the challenger's application current (every ``CHALLENGER_REFRESH_S``):
    loading while Serve deploys it, ready (with a handle) while it runs, failed with the replicas' error otherwise.
    A thread of its own: ``serve.status()`` is a blocking call to the controller."""

    def __init__(self, challenger: Challenger, app_name: str, options: ServeOptions, metrics: IngressMetrics):
        self.challenger = challenger
        self.app_name = app_name
        self.options = options
        self.metrics = metrics
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception as error:  # noqa: BLE001 - the controller restarting: look again next time
                log.warning("drugprot serving: cannot read the challenger's state (%s: %s)", type(error).__name__,
                            error)
            self.metrics.challenger_state(self.challenger.state)
            if self.stopped.wait(CHALLENGER_REFRESH_S):
                return

    def refresh(self) -> None:
        challenger = self.challenger
        application = serve.status().applications.get(self.app_name)
        if application is None:
            self._become("loading", f"no Serve application {self.app_name!r} (yet); drugprot serve deploys it, a "
                                    f"Serve config names drugprot.serving:build_challenger so")
        elif application.status == ApplicationStatus.RUNNING:
            if challenger.model is None:  # the handle is first called on the replica's event loop, not here
                handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, self.app_name)
                challenger.model = RemoteModel(handle, attempts=self.options.retry_attempts,
                                               deadline_s=self.options.retry_deadline_s)
            self._become("ready", None)
        elif application.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            self._become("failed", deployment_failure(self.app_name) or application.message or "Serve could not "
                                                                                                 "deploy it")
        else:
            self._become("loading", None)

    def _become(self, state: str, error: str | None) -> None:
        challenger = self.challenger
        if state != challenger.state:
            say = log.warning if state == "failed" else log.info
            say("drugprot serving: challenger %s is %s%s", challenger.uri, state, f": {error}" if error else "")
        challenger.error, challenger.state = error, state


DELIVERY_S = 1.0


def drain_application(app_name: str, *, timeout_s: float, poll_s: float = 0.2, delivery_s: float = DELIVERY_S) -> int:
    """Stop every ingress replica of ``app_name`` from admitting requests, then wait until the accepted ones are
    answered (at most ``timeout_s``); returns how many were still inside at the end (0: drained).

    An ingress replica is done with a request when its app returns, but the answer still travels through Serve's
    proxy to the client, and stopping Serve under it drops the connection (seen under load: a request accepted
    before the SIGTERM got "Server disconnected"). So after the last one, ``delivery_s`` more pass before returning.
    """
    handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name)
    remaining = sum(handle.broadcast("drain").results())

    def drained() -> bool | None:
        nonlocal remaining
        remaining = sum(handle.broadcast("in_flight").results())
        return remaining == 0 or None

    if remaining:
        poll(drained, timeout=timeout_s, interval=poll_s)
    time.sleep(delivery_s)  # nothing to wait on: the answers' way through the proxy is not observable from here
    return remaining


def build_application(args: dict[str, Any] | ServeOptions | None, *, version: str | None = None,
                      swap_error: str | None = None, constructor_tries: int | None = None) -> Application:
    """The two deployments; ``version`` and ``swap_error`` go to the model replicas (see ``ModelService.load``),
    ``constructor_tries`` replaces the model deployment's usual three."""
    options = parse_options(args)
    deployment = options.deployment_options()
    if constructor_tries is not None:
        deployment["max_constructor_retry_count"] = constructor_tries
    model = ModelDeployment.options(**deployment).bind(options.without_rollout().model_dump(mode="json"), version,
                                                       swap_error)
    return IngressDeployment.options(**options.ingress_deployment_options()).bind(options.model_dump(mode="json"),
                                                                                   model)


def build_challenger_application(args: dict[str, Any] | ServeOptions | None) -> Application:
    """The rollout's challenger alone: a model deployment with the champion's settings but the challenger's model,
    tried once (a challenger that fails to load stays failed; the champion serves meanwhile)."""
    options = parse_options(args)
    if options.rollout is None:
        raise DrugprotError("build_challenger: serve args: rollout: missing; give rollout.challenger (the same args "
                            "as the champion's application)")
    deployment = {**options.deployment_options(), "max_constructor_retry_count": 1}
    challenger = options.without_rollout(model=options.rollout.challenger)
    return ModelDeployment.options(**deployment).bind(challenger.model_dump(mode="json"))


def deployment_failure(app_name: str) -> str | None:
    """Why an application failed to deploy, as its replicas said it: the ``DrugprotError`` text when a constructor
    raised one (Serve's own message only wraps it in 'failed to start … see controller logs'), else Serve's message."""
    try:
        application = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - the controller itself is gone: nothing better to report
        return None
    if application is None:
        return None
    messages = [d.message for d in application.deployments.values() if d.message]
    for message in messages:
        # the traceback ends with the exception: "drugprot.manifest.ArtifactError: <text, maybe several lines>"
        found = list(re.finditer(r"^drugprot\.[\w.]*Error: ", message, re.MULTILINE))
        if found:
            return message[found[-1].end():].strip()
    return "\n".join(messages) or application.message or None
