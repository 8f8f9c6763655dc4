"""The HTTP face of a :class:`RelationService`: a FastAPI app with auth, a body-size limit and readable errors.

``create_api(service, token=...)`` is plain FastAPI: the Serve deployment returns it from
``__serve_build_asgi_app__`` and the unit tests drive it with a TestClient. Routes: ``POST /v1/relations``,
``GET /v1/model``, ``GET /healthz``, ``GET /readyz`` (and FastAPI's ``/openapi.json`` and ``/docs``).
Status codes: 401 missing/wrong bearer token (all but the probes and docs, checked before the body is read), 413 body or
request over a limit, 422 malformed JSON or invalid document (the message names the document and field),
503 not ready or overloaded (JSON with ``Retry-After``; under sustained overload the proxy's ``AdmissionAtProxy``
answers it before a request reaches here).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections import Counter
import logging
import os

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from drugprot import __version__
from drugprot.errors import DrugprotError
from drugprot.serving.options import Limits, ServeOptions
from drugprot.serving.schemas import ErrorResponse, ModelInfo, RelationsRequest, RelationsResponse, describe_errors
from drugprot.serving.service import OVERLOAD_HEADER, RelationService, ServingError

log = logging.getLogger("drugprot.serving")

RAW_BODY = "drugprot.raw_body"
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

DESCRIPTION = """DrugProt chemical–gene relation extraction.

POST documents with their CHEMICAL and GENE mentions (character offsets into the text, where text is either
`text` or `title + " " + abstract`); each document comes back with its relations `{chemical, gene, type, score,
votes}`. When the server has a token configured, everything except `/healthz`, `/readyz` and the API docs needs
`Authorization: Bearer TOKEN`.
"""


def resolve_token(token_env: str | None, *, required: bool = False) -> str | None:
    """The bearer token from the named environment variable (None: authentication off)."""
    token = os.environ.get(token_env, "").strip() if token_env else ""
    if not token and required:
        raise DrugprotError(f"require_token is set but the environment variable {token_env or '(none configured)'} is "
                            f"empty or unset in this replica; set it (e.g. from a Kubernetes Secret) or drop require_token")
    return token or None


def try_page() -> str:
    """``GET /``: the self-contained page to try the API, with the first development document of the bundled sample
    as its example (the page sends it to ``v1/relations`` itself, with the token the user types)."""
    from importlib.resources import files

    from drugprot.config import SAMPLE_DIR
    from drugprot.corpus import read_split

    document = read_split(SAMPLE_DIR, "development").documents[0]
    example = {"title": document.title, "abstract": document.abstract,
               "entities": [{"id": e.id, "type": e.type, "start": e.start, "end": e.end} for e in document.entities.values()]}
    page = (files("drugprot") / "resources" / "try.html").read_text(encoding="utf-8")
    return page.replace("__EXAMPLE__", json.dumps(example).replace("</", "<\\/"))


def undecodable(body: bytes) -> str:
    """Why FastAPI could not decode a JSON body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"not valid UTF-8 text at byte {error.start}"
    try:
        json.loads(text)
    except RecursionError:
        return "nested too deeply"
    except ValueError as error:
        return str(error)
    return "cannot be decoded"


def _error(status: int, detail: str, problems: list[str] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(detail=detail, problems=problems or [detail]).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


class UnfinishedBodies:
    """Bodies being received at once, per client address (one event loop): the caps on stalled uploads."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._by_client: Counter[str] = Counter()

    def admit(self, client: str) -> JSONResponse | None:
        """Count one more unfinished body from ``client``, or the refusal to send when a cap is reached."""
        if sum(self._by_client.values()) >= self.limits.max_unfinished_bodies:
            return _error(503, "server busy receiving other requests; retry shortly",
                          headers={"Retry-After": "1", "Connection": "close"})
        if self._by_client[client] >= self.limits.max_unfinished_bodies_per_client:
            return _error(429, f"too many unfinished requests from {client}; finish sending them first",
                          headers={"Retry-After": "1", "Connection": "close"})
        self._by_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self._by_client[client] -= 1
        if not self._by_client[client]:
            del self._by_client[client]


class _Guard:
    """Pure ASGI middleware: bearer token for every path but the probes and docs (checked before anything is read),
    then the body: its size, how long it takes, and how many arrive at once.

    The body is read here up to ``max_body_bytes`` and replayed to the app, so an oversized body is refused with 413
    without being buffered whole. A body must arrive within ``body_timeout_s`` without pausing longer than
    ``body_idle_timeout_s`` (else 408), and only ``max_unfinished_bodies`` (per client address:
    ``max_unfinished_bodies_per_client``) are received at once; the rest are refused at once (503, 429). A client
    that sends headers and then stalls therefore holds a replica's slot for seconds, not forever.
    """

    def __init__(self, app, *, token: str | None, limits: Limits, service: RelationService, observe=None):
        self.app = app
        self.observe = observe  # (route, status, seconds) per answered request, e.g. the Serve metrics
        self.service = service
        self.token = token.encode() if token else None
        self.limits = limits
        self.max_body_bytes = limits.max_body_bytes
        self._unfinished = UnfinishedBodies(limits)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # behind a route prefix (Serve's route_prefix) the path still carries it
            path = path[len(root):] or "/"
        if self.service.draining and path != "/healthz":
            response = _error(503, "shutting down: this replica takes no new requests; retry on another one",
                              headers={"Retry-After": "1", "Connection": "close"})
            return await response(scope, receive, send)
        self.service.in_flight += 1
        started, status = time.monotonic(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            return await self._guarded(scope, receive, send_and_note, path)
        finally:
            self.service.in_flight -= 1
            if self.observe is not None:
                self.observe(path, status[0], time.monotonic() - started)

    async def _guarded(self, scope, receive, send, path: str):
        if self.token is not None and path not in OPEN_PATHS and not self._authorized(scope):
            response = _error(401, "missing or invalid bearer token: send 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": 'Bearer realm="drugprot"'})
            return await response(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        with self.service.arriving():  # the batcher may wait for this request while its body is read
            try:
                body = await self._receive_body(scope, receive)
            except TimeoutError:
                body = _error(408, f"request body: not received in time (a body must arrive within "
                                   f"{self.limits.body_timeout_s:g} s, pausing at most "
                                   f"{self.limits.body_idle_timeout_s:g} s)", headers={"Connection": "close"})
            if body is None:  # the client went away
                return None
            if isinstance(body, JSONResponse):
                return await body(scope, receive, send)
            scope[RAW_BODY] = body  # for the error handlers' messages
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)

    async def _receive_body(self, scope, receive) -> bytes | JSONResponse | None:
        """The whole body, or the refusal to send, or None when the client disconnected.

        A body that came whole in its first part never counts as unfinished, so clients that stall cannot crowd out
        ordinary requests from the same address."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, f"request body: larger than the limit of {self.max_body_bytes} bytes; "
                                f"split the request")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    return too_large
            except ValueError:
                return _error(400, "request: invalid Content-Length header")
        client = (scope.get("client") or ("?", 0))[0]
        chunks, size, counted = [], 0, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                message = await asyncio.wait_for(receive(), max(0.0, min(remaining, self.limits.body_idle_timeout_s)))
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    return too_large
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
                if not counted:
                    refusal = self._unfinished.admit(client)
                    if refusal is not None:
                        return refusal
                    counted = True
        finally:
            if counted:
                self._unfinished.release(client)

    def _authorized(self, scope) -> bool:
        return bearer_matches(scope, self.token)


def bearer_matches(scope, token: bytes) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (compared in constant time)."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, value = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token)


class RoutesGuard:
    """Pure ASGI middleware for Serve's HTTP proxy: the proxy answers ``GET /-/routes`` (every application's route
    prefix and name) itself, before any application sees the request, so the API's token check never runs there.
    With the token variable set in the proxy's environment (``DRUGPROT_API_TOKEN``, the default ``token_env``),
    ``/-/routes`` needs the same bearer token as the API; ``/-/healthz`` stays open for probes."""

    def __init__(self, app, *, token_env: str | None = None):
        self.app = app
        token = resolve_token(token_env or ServeOptions.model_fields["token_env"].default)
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if (self.token is not None and scope["type"] == "http"
                and scope.get("path", "")[len(scope.get("root_path", "")):] == "/-/routes"
                and not bearer_matches(scope, self.token)):
            response = _error(401, "missing or invalid bearer token: send 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": 'Bearer realm="drugprot"'})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class StalledBodiesAtProxy:
    """Pure ASGI middleware for Serve's HTTP proxy: the caps on unfinished bodies (``Limits``' defaults), enforced
    before a request reaches an ingress replica.

    A request whose body does not come whole with its first part counts as unfinished until its last part arrives;
    beyond ``max_unfinished_bodies`` of them at this proxy it is refused with 503, beyond
    ``max_unfinished_bodies_per_client`` from one address with 429, and a first part that takes longer than
    ``body_idle_timeout_s`` gets 408. The ingress replicas apply the same caps and the body timeouts; refusing here
    too costs the proxy one read instead of a round trip to a replica, so clients that re-open stalled connections
    as fast as they are refused cannot starve valid requests of the replicas' time.
    """

    def __init__(self, app, *, limits: Limits | None = None):
        self.app = app
        self.limits = limits or Limits()
        self.unfinished = UnfinishedBodies(self.limits)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            first = await asyncio.wait_for(receive(), self.limits.body_idle_timeout_s)
        except TimeoutError:
            response = _error(408, f"request body: nothing received within {self.limits.body_idle_timeout_s:g} s",
                              headers={"Connection": "close"})
            return await response(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]
        unfinished = first["type"] == "http.request" and first.get("more_body", False)
        if unfinished:
            refusal = self.unfinished.admit(client)
            if refusal is not None:
                return await refusal(scope, receive, send)
        replayed = False

        async def first_then_live():
            nonlocal replayed, unfinished
            if not replayed:
                replayed = True
                return first
            message = await receive()
            if unfinished and (message["type"] == "http.disconnect" or not message.get("more_body", False)):
                unfinished = False
                self.unfinished.release(client)
            return message

        try:
            return await self.app(scope, first_then_live, send)
        finally:
            if unfinished:
                self.unfinished.release(client)


class ResendOnLostReplica:
    """Pure ASGI middleware for Serve's HTTP proxy: a request whose ingress replica died while holding it is sent
    again, to another replica.

    When the replica that holds a request dies (``RayActorError``), Serve's proxy sends the client nothing and returns,
    and the server then answers a bare 500: the request is lost although nothing of it was answered. Scoring is pure,
    so such a request is resent, at most ``attempts`` times in all: the body the proxy read is replayed first. Only
    requests that may be sent twice are resent (GET and HEAD, and POST to ``…/v1/relations``), only when nothing of a
    response was sent, and never after the client disconnected. Serve's router has already marked the dead replica
    when the proxy returns, so the next attempt goes to a live one (or waits in the queue for a replacement).
    """

    RESENDABLE_POST = "/v1/relations"
    LOG_MARK = "got no answer from its replica"

    def __init__(self, app, *, attempts: int = 3):
        self.app = app
        self.attempts = attempts

    def _resendable(self, scope) -> bool:
        method = scope.get("method")
        return method in ("GET", "HEAD") or (method == "POST" and scope.get("path", "").endswith(self.RESENDABLE_POST))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self._resendable(scope):
            return await self.app(scope, receive, send)
        received: list[dict] = []  # what the client sent so far, replayed to each later attempt
        started = False

        async def send_and_note(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        for attempt in range(1, self.attempts + 1):
            position = 0

            async def replayed_then_live():
                nonlocal position
                if position < len(received):
                    position += 1
                    return received[position - 1]
                message = await receive()
                received.append(message)
                position += 1
                return message

            await self.app(dict(scope), replayed_then_live, send_and_note)  # Serve's proxy rewrites its scope
            if started or any(message["type"] == "http.disconnect" for message in received):
                return None
            if attempt < self.attempts:
                log.warning("drugprot serving: %s %s %s (it died); sending it again (%d/%d)", scope.get("method"),
                            scope.get("path"), self.LOG_MARK, attempt + 1, self.attempts)
        return None  # every attempt lost: the server answers 500, as without this middleware


class AdmissionAtProxy:
    """Pure ASGI middleware for Serve's HTTP proxy: under overload, refuse at the proxy what the application would
    refuse anyway, in milliseconds instead of after a round trip through an ingress replica and the model's queue.

    The proxy cannot see the model's queue, so it learns each application's capacity (per route prefix of
    ``…/v1/relations``) from the application's own refusals, as TCP's congestion window does (additive increase,
    multiplicative decrease): when a request comes back refused for lack of capacity (a 503 carrying
    ``OVERLOAD_HEADER``), the limit becomes at most the requests then in flight through this proxy minus one (the
    refusals of one burst come back one after the other, each lowering it to what the application held then).
    While the requests in flight reach the limit, a new request is answered here with the same JSON 503 and the
    ``Retry-After`` of the last refusal. While there is demand beyond the limit (a request refused here in the last
    ``DEMAND_S``), every 2xx answer raises it by 1/(rounds × limit): one more request every ``rounds`` rounds
    probes whether capacity was added (a replica, a scale-up). A probe the application refuses is one slow
    refusal, so probing backs off: each round's first refusal (of a request admitted since the previous one)
    doubles ``rounds`` (up to ``MAX_PROBE_ROUNDS``), and a limit that grew past the one the application last
    refused (capacity was added) probes every round again. Until the first refusal there is no limit."""

    SUFFIX = "/v1/relations"
    AT_CAPACITY = "the service is at capacity"  # how its refusals begin
    MAX_PROBE_ROUNDS = 64
    DEMAND_S = 1.0

    def __init__(self, app, *, clock=time.monotonic):
        self.app = app
        self.clock = clock
        self.in_flight: Counter[str] = Counter()  # per application (route prefix)
        self.limit: dict[str, float] = {}
        self.cuts: Counter[str] = Counter()  # how many times each limit was cut: a request's round
        self.refused_limit: dict[str, float] = {}  # the limit when the application last refused (a failed probe)
        self.probe_rounds: dict[str, int] = {}
        self.retry_after: dict[str, str] = {}
        self.refused = 0  # answered here
        self.refused_at: dict[str, float] = {}  # when a request to each application was last refused here

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.endswith(self.SUFFIX):
            return await self.app(scope, receive, send)
        key = path[: -len(self.SUFFIX)]
        limit = self.limit.get(key)
        if limit is not None and self.in_flight[key] >= limit:
            self.refused += 1
            self.refused_at[key] = self.clock()
            retry_after = self.retry_after.get(key, "1")
            response = _error(503, f"{self.AT_CAPACITY} ({self.in_flight[key]} requests in progress); retry "
                                   f"after {retry_after} s", headers={"Retry-After": retry_after, OVERLOAD_HEADER: "1"})
            return await response(scope, receive, send)
        round_ = self.cuts[key]
        self.in_flight[key] += 1

        async def send_and_learn(message):
            if message["type"] == "http.response.start":
                self._learn(key, round_, message["status"], message.get("headers") or [])
            await send(message)

        try:
            return await self.app(scope, receive, send_and_learn)
        finally:
            self.in_flight[key] -= 1

    def _learn(self, key: str, round_: int, status: int, headers) -> None:
        """Cut the limit on an overload refusal (backing off once per round), raise it on a 2xx answer while there
        is demand."""
        headers = {name.lower(): value for name, value in headers}
        if status == 503 and OVERLOAD_HEADER.lower().encode() in headers:
            self.retry_after[key] = headers.get(b"retry-after", b"1").decode("latin-1")
            if round_ == self.cuts[key]:  # the first refusal of a round: a failed probe
                self.refused_limit[key] = self.limit.get(key, float(self.in_flight[key]))
                self.cuts[key] += 1
                rounds = self.probe_rounds.get(key)
                self.probe_rounds[key] = 1 if rounds is None else min(2 * rounds, self.MAX_PROBE_ROUNDS)
            self.limit[key] = max(1.0, min(self.limit.get(key, math.inf), self.in_flight[key] - 1.0))
        elif 200 <= status < 300 and self.clock() - self.refused_at.get(key, -math.inf) < self.DEMAND_S:
            self.limit[key] += 1.0 / (self.probe_rounds[key] * self.limit[key])
            if self.limit[key] >= self.refused_limit[key] + 1:
                self.probe_rounds[key] = 1


PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "drugprot.serving.api:proxy_middlewares")


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback: ``PROXY_CALLBACK`` in the environment of the Ray nodes (``drugprot serve`` sets
    it for the Ray it starts; on a cluster, set it on every node)."""
    from starlette.middleware import Middleware

    return [Middleware(RoutesGuard), Middleware(StalledBodiesAtProxy), Middleware(AdmissionAtProxy),
            Middleware(ResendOnLostReplica)]


def create_api(service: RelationService, *, token: str | None = None, observe=None) -> FastAPI:
    """``observe(route, status, seconds)``, when given, is called for every answered request."""
    app = FastAPI(title="drugprot relation extraction", version=__version__, description=DESCRIPTION)
    app.add_middleware(_Guard, token=token, limits=service.limits, service=service, observe=observe)
    bearer = HTTPBearer(auto_error=False, description="Only when the server has a token configured.")
    errors = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
              503: {"model": ErrorResponse}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        problems = describe_errors(error.errors(), getattr(error, "body", None), raw=request.scope.get(RAW_BODY))
        return _error(422, problems[0] if problems else "request body: invalid", problems)

    @app.exception_handler(ServingError)
    async def _refused(request: Request, error: ServingError):
        return _error(error.status, str(error), headers=error.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        if error.status_code == 400 and request.url.path.endswith("/v1/relations"):
            # FastAPI's answer to a body it cannot decode: say why, from the body the guard kept
            return _error(422, f"request body: malformed JSON ({undecodable(request.scope.get(RAW_BODY) or b'')})")
        return _error(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(request: Request, error: json.JSONDecodeError):
        return _error(422, f"request body: malformed JSON ({error.msg} at position {error.pos})")

    @app.exception_handler(Exception)
    async def _crashed(request: Request, error: Exception):
        log.exception("drugprot serving: request failed")
        return _error(500, f"internal error ({type(error).__name__}); the request was not processed")

    @app.post("/v1/relations", response_model=RelationsResponse, responses=errors, dependencies=[Depends(bearer)],
              summary="Relations for each document")
    async def relations(body: RelationsRequest, response: Response) -> RelationsResponse:
        answer, version = await service.relations(body)
        if version is not None:
            response.headers["X-Model-Version"] = version
        return answer

    @app.get("/v1/model", response_model=ModelInfo, responses={401: {"model": ErrorResponse}},
             dependencies=[Depends(bearer)], summary="The loaded model: registry name, version, alias, members")
    async def model() -> ModelInfo:
        return await service.model.info()

    page = try_page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", summary="Liveness: the replica answers (500 when its warm-up failed)")
    async def healthz():
        status = await service.model.status()
        if status["status"] == "failed":
            return JSONResponse({"status": "failed", "detail": status.get("detail")}, status_code=500)
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up, else 503")
    async def readyz():
        status = await service.model.status()
        if status["status"] != "ready":
            body = {key: status[key] for key in ("status", "detail") if key in status}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        return {**status, "state": "ready"}

    return app
