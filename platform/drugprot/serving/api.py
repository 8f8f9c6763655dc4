"""The HTTP face of a :class:`RelationService`: a FastAPI app with auth, a body-size limit and readable errors.

``create_api(service, token=...)`` is plain FastAPI: the Serve deployment returns it from
``__serve_build_asgi_app__`` and the unit tests drive it with a TestClient. Routes: ``POST /v1/relations``,
``GET /v1/model``, ``GET /healthz``, ``GET /readyz`` (and FastAPI's ``/openapi.json`` and ``/docs``).
Status codes: 401 missing/wrong bearer token (all but the probes and docs, checked before the body is read), 413 body or
request over a limit, 422 malformed JSON or invalid document (the message names the document and field),
503 not ready; overload beyond the queue (503) is answered by Serve's proxy before a request reaches here.
"""

from __future__ import annotations

import hmac
import json
import logging
import os

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from drugprot import __version__
from drugprot.errors import DrugprotError
from drugprot.serving.schemas import ErrorResponse, ModelInfo, RelationsRequest, RelationsResponse, describe_errors
from drugprot.serving.service import RelationService, ServingError

log = logging.getLogger("drugprot.serving")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

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


def _error(status: int, detail: str, problems: list[str] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(detail=detail, problems=problems or [detail]).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: bearer token for every path but the probes and docs (checked before anything is read),
    then the body-size limit.

    The body is read here up to ``max_body_bytes`` and replayed to the app, so an oversized body is refused with 413
    without being buffered whole.
    """

    def __init__(self, app, *, token: str | None, max_body_bytes: int, service: RelationService):
        self.app = app
        self.service = service
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # behind a route prefix (Serve's route_prefix) the path still carries it
            path = path[len(root):] or "/"
        if self.token is not None and path not in OPEN_PATHS and not self._authorized(scope):
            response = _error(401, "missing or invalid bearer token: send 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": 'Bearer realm="drugprot"'})
            return await response(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        with self.service.arriving():  # the batcher may wait for this request while its body is read
            return await self._read_body(scope, receive, send)

    async def _read_body(self, scope, receive, send):
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, f"request body: larger than the limit of {self.max_body_bytes} bytes; "
                                f"split the request")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    return await too_large(scope, receive, send)
            except ValueError:
                return await _error(400, "request: invalid Content-Length header")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)


def create_api(service: RelationService, *, token: str | None = None) -> FastAPI:
    app = FastAPI(title="drugprot relation extraction", version=__version__, description=DESCRIPTION)
    app.add_middleware(_Guard, token=token, max_body_bytes=service.limits.max_body_bytes, service=service)
    bearer = HTTPBearer(auto_error=False, description="Only when the server has a token configured.")
    errors = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
              503: {"model": ErrorResponse}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        problems = describe_errors(error.errors(), getattr(error, "body", None))
        return _error(422, problems[0] if problems else "request body: invalid", problems)

    @app.exception_handler(ServingError)
    async def _refused(request: Request, error: ServingError):
        return _error(error.status, str(error), headers=error.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        if error.status_code == 400 and request.url.path.endswith("/v1/relations"):
            # FastAPI's answer to a body it cannot decode (e.g. invalid UTF-8): malformed JSON, like any other
            return _error(422, "request body: malformed JSON (not valid UTF-8 text)")
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
    async def relations(body: RelationsRequest) -> RelationsResponse:
        return await service.relations(body)

    @app.get("/v1/model", response_model=ModelInfo, responses={401: {"model": ErrorResponse}},
             dependencies=[Depends(bearer)], summary="The loaded model: registry name, version, alias, members")
    async def model() -> ModelInfo:
        return service.model_info()

    @app.get("/healthz", summary="Liveness: the replica answers (500 when its warm-up failed)")
    async def healthz():
        failure = service.failure()
        if failure:
            return JSONResponse({"status": "failed", "detail": failure}, status_code=500)
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up, else 503")
    async def readyz():
        state = service.state
        if state != "ready":
            body = {"status": state}
            if service.failure():
                body["detail"] = service.failure()
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ready", **service.stats()}

    return app
