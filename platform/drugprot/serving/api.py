"""The HTTP face of a :class:`RelationService`: a FastAPI app with auth, a body-size limit and readable errors.

``create_api(service, token=...)`` is plain FastAPI: the Serve deployment returns it from
``__serve_build_asgi_app__`` and the unit tests drive it with a TestClient. Routes: ``POST /v1/relations``,
``GET /v1/model``, ``GET /healthz``, ``GET /readyz``, ``GET /saturation``, the page at ``/`` and FastAPI's
``/openapi.json`` (``/docs`` and ``/redoc`` only with ``api_docs``: they load their scripts from a CDN).
Status codes: 400 more than one ``Authorization`` header, 401 missing/wrong bearer token (all but the probes, the
page and the docs, checked before the body is read), 413 body or request over a limit, 422 malformed JSON, a key
twice in one object or an invalid document (the message names the document and field), 503 not ready or
overloaded (JSON with ``Retry-After``; under sustained overload the proxy's ``serving.proxy.AdmissionAtProxy``
answers it before a request reaches here).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import Counter
import logging
import os

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from drugprot import __version__
from drugprot.errors import DrugprotError
from drugprot.serving.options import Limits
from drugprot.serving.rollout import KEY_HEADER, answer_headers
from drugprot.serving.schemas import ErrorResponse, ModelInfo, RelationsRequest, RelationsResponse, describe_errors
from drugprot.serving.service import RelationService, ServingError

log = logging.getLogger("drugprot.serving")

RAW_BODY = "drugprot.raw_body"
ANSWERING = "drugprot.answering"  # which model answers the request (a rollout.Answering), once chosen
OBJECTIVE_HEADER = "X-Drugprot-Objective"  # the latency objective in s, on answers: the proxy's admission reads it
KEY_DESCRIPTION = ("With a canary: the same key always reaches the same model (its SHA-256 modulo 100 below the "
                   "canary share: the challenger); without one, the side is drawn at random.")
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/saturation", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

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


def page_headers(page: str) -> dict[str, str]:
    """The page's security headers: a Content-Security-Policy that allows only its own inline style and script (by
    hash) and requests to this server, no framing, no referrer sent onward."""
    import base64
    import hashlib
    import re

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)  # not <script type=...>: data, never run
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
              f"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def duplicate_key(body: bytes) -> str | None:
    """The first key that occurs twice in one JSON object of ``body`` (None: none, or not JSON at all)."""
    found: list[str] = []

    def unique(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(pairs)

    try:
        json.loads(body, object_pairs_hook=unique)
    except (ValueError, RecursionError):
        return None
    return found[0] if found else None


class DuplicateKey(ServingError):
    status = 422


def saturation(status: dict) -> dict:
    """How full the model replica's queue is against the latency objective: ``ratio`` = expected wait / objective
    (``saturated`` from 1 on: new requests are refused); without an objective, the queue's expected wait alone."""
    batching = status.get("batching") or {}
    expected, objective = float(batching.get("expected_wait_s") or 0.0), batching.get("max_wait_s")
    ratio = round(expected / objective, 3) if objective else None
    return {"expected_wait_s": expected, "objective_s": objective, "ratio": ratio,
            "saturated": ratio is not None and ratio >= 1.0, "queued": batching.get("queued", 0),
            "refused_by_wait_objective": batching.get("refused_by_wait_objective", 0)}


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
        self.observe = observe  # (route, status, seconds, answering) per answered request, e.g. the Serve metrics
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
                self.observe(path, status[0], time.monotonic() - started, scope.get(ANSWERING))

    async def _guarded(self, scope, receive, send, path: str):
        if len(authorizations(scope)) > 1:
            return await _error(400, "request: more than one Authorization header; send one")(scope, receive, send)
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


def authorizations(scope) -> list[bytes]:
    """Every ``Authorization`` header of the request (more than one is refused: which one counts would be a guess)."""
    return [value for name, value in scope.get("headers") or [] if name.lower() == b"authorization"]


def bearer_matches(scope, token: bytes) -> bool:
    """Whether the request carries exactly one ``Authorization: Bearer <token>`` (compared in constant time)."""
    headers = authorizations(scope)
    scheme, _, value = (headers[0] if len(headers) == 1 else b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token)


def create_api(service: RelationService, *, token: str | None = None, observe=None) -> FastAPI:
    """``observe(route, status, seconds, answering)``, when given, is called for every answered request
    (``answering``: the model that answered a relations request, else None)."""
    docs = service.options.api_docs  # Swagger UI and ReDoc load their scripts from a CDN: off unless asked for
    app = FastAPI(title="drugprot relation extraction", version=__version__, description=DESCRIPTION,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.add_middleware(_Guard, token=token, limits=service.limits, service=service, observe=observe)
    bearer = HTTPBearer(auto_error=False, description="Only when the server has a token configured.")
    errors = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
              503: {"model": ErrorResponse}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        problems = describe_errors(error.errors(), getattr(error, "body", None), raw=request.scope.get(RAW_BODY))
        return _error(422, problems[0] if problems else "request body: invalid", problems)

    rollout = service.options.rollout is not None

    def answered_by(request: Request) -> dict[str, str]:
        return answer_headers(request.scope.get(ANSWERING), rollout=rollout)

    @app.exception_handler(ServingError)
    async def _refused(request: Request, error: ServingError):
        return _error(error.status, str(error), headers={**error.headers, **answered_by(request)} or None)

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
        return _error(500, f"internal error ({type(error).__name__}); the request was not processed",
                      headers=answered_by(request) or None)

    def unique_keys(request: Request) -> None:
        key = duplicate_key(request.scope.get(RAW_BODY) or b"")
        if key is not None:
            raise DuplicateKey(f"request body: key {key!r} occurs twice in one JSON object; send each key once")

    @app.post("/v1/relations", response_model=RelationsResponse, responses=errors,
              dependencies=[Depends(bearer), Depends(unique_keys)],
              summary="Relations for each document")
    async def relations(body: RelationsRequest, request: Request, response: Response,
                        request_key: str | None = Header(None, alias=KEY_HEADER, description=KEY_DESCRIPTION)
                        ) -> RelationsResponse:
        answering = request.scope[ANSWERING] = service.choose(request_key)
        answer, _ = await service.relations(body, answering)
        response.headers.update(answered_by(request))
        if service.options.max_queue_wait_s is not None:
            response.headers[OBJECTIVE_HEADER] = f"{service.options.max_queue_wait_s:g}"
        return answer

    @app.get("/v1/model", response_model=ModelInfo, responses={401: {"model": ErrorResponse}},
             dependencies=[Depends(bearer)], summary="The loaded model: registry name, version, alias, members")
    async def model() -> ModelInfo:
        info = await service.model.info()
        return info.model_copy(update={"rollout": await service.rollout_info()}) if rollout else info

    page = try_page()
    security = page_headers(page)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page, headers=security)

    @app.get("/healthz", summary="Liveness: the replica answers (500 when its warm-up failed)")
    async def healthz():
        status = await service.model.status()
        if status["status"] == "failed":
            return JSONResponse({"status": "failed", "detail": status.get("detail")}, status_code=500)
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up, else 503; with the "
                              "saturation of the model replica that answered")
    async def readyz():
        status = await service.model.status()
        if status["status"] != "ready":
            body = {key: status[key] for key in ("status", "detail") if key in status}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        return {**status, "state": "ready", "saturation": saturation(status)}

    @app.get("/saturation", summary="For a load balancer: 200 while the model replica that answered admits "
                                    "requests within the latency objective, 503 while it refuses them")
    async def saturated():
        status = await service.model.status()
        if status["status"] != "ready":
            return JSONResponse({"status": status["status"]}, status_code=503, headers={"Retry-After": "1"})
        found = saturation(status)
        if found["saturated"]:
            return JSONResponse(found, status_code=503, headers={"Retry-After": str(max(1, round(found["expected_wait_s"])))})
        return found

    return app
