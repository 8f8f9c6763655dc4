"""What runs in Serve's HTTP proxy, before any request reaches an application: the bounds on what one client may
hold (header size and time, connections per address, unfinished bodies), the token on Serve's own ``/-/routes``,
admission under overload, and the resending of requests whose ingress replica died.

Serve calls :func:`proxy_middlewares` in each proxy process when ``PROXY_CALLBACK`` is in the environment of the Ray
nodes (``drugprot serve`` sets it for the Ray it starts; on a cluster, set it on every node). Ray 2.60 builds the
proxy's uvicorn server itself and offers no setting for header size, header time or connections per client
(``ray.serve._private.http_util.start_asgi_http_server`` passes only host, port, root path and keep-alive), and an
ASGI middleware sees a request only once its headers are complete; so the callback also makes
:class:`BoundedHttpProtocol`, uvicorn's own httptools protocol with those bounds, the one uvicorn picks for
``http="auto"`` in that process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import Counter

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from drugprot.serving.api import (OBJECTIVE_HEADER, UnfinishedBodies, _error, authorizations, bearer_matches,
                                  resolve_token)
from drugprot.serving.options import PROXY_LIMITS_ENV, Limits, ProxyLimits, ServeOptions
from drugprot.serving.service import OVERLOAD_HEADER

log = logging.getLogger("drugprot.serving")

PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "drugprot.serving.proxy:proxy_middlewares")


def proxy_limits() -> ProxyLimits:
    """The limits from ``PROXY_LIMITS_ENV`` (JSON), else the defaults."""
    from drugprot.serving.options import parse_model

    return parse_model(ProxyLimits, json.loads(os.environ.get(PROXY_LIMITS_ENV) or "{}"), source=PROXY_LIMITS_ENV)


class HeaderRefused(Exception):
    """Raised inside a parser callback to stop reading a request; ``send_400_response`` sends the real status."""


def _refusal(status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    body = json.dumps({"detail": detail, "problems": [detail]}).encode()
    lines = [STATUS_LINE[status], b"content-type: application/json\r\n", b"connection: close\r\n",
             b"content-length: %d\r\n" % len(body)]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    return b"".join(lines) + b"\r\n" + body


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with nginx-like bounds (``ProxyLimits``), each answered and then closed:

    * a request line or header line over ``max_header_line_bytes``, or line and headers together over
      ``max_header_bytes``, gets 431 (what one connection buffers while its headers arrive is bounded by that plus
      one socket read);
    * headers not complete within ``header_timeout_s`` of the request's first byte (or of the connection's opening)
      get 408;
    * a connection beyond ``max_connections_per_client`` open ones from the same address gets 429.

    Every instance lives on the proxy's one event loop, so the per-address count needs no lock."""

    limits = ProxyLimits()
    connections_by_client: Counter[str] = Counter()
    LINGER_S = 1.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._address = self.client[0] if self.client else "?"
        self._refused: bytes | None = None
        self._counted = False
        self._header_bytes = 0  # received while headers were incomplete
        self._header_total = 0  # of the header lines parsed so far
        self._reading_headers = True
        self._header_timer: asyncio.TimerHandle | None = None
        if self.connections_by_client[self._address] >= self.limits.max_connections_per_client:
            self._close_with(_refusal(429, f"too many connections from {self._address} (at most "
                                           f"{self.limits.max_connections_per_client}); close some and retry",
                                      ((b"retry-after", b"1"),)))
            return
        self.connections_by_client[self._address] += 1
        self._counted = True
        self._start_header_timer()

    def connection_lost(self, exc) -> None:
        self._uncount()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        if self._reading_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._reading_headers and self._header_bytes > self.limits.max_header_bytes and self._refused is None:
            self._close_with(self._too_large("request line and headers", self.limits.max_header_bytes))

    def handle_websocket_upgrade(self) -> None:
        """A websocket leaves this protocol (uvicorn hands the transport to its websocket protocol): uncount it."""
        self._uncount()
        super().handle_websocket_upgrade()

    def _uncount(self) -> None:
        self._stop_header_timer()
        if self._counted:
            self._counted = False
            self.connections_by_client[self._address] -= 1
            if not self.connections_by_client[self._address]:
                del self.connections_by_client[self._address]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._header_total = 0
        self._start_header_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_header_line_bytes:
            self._refused = self._too_large("request line", self.limits.max_header_line_bytes)
            raise HeaderRefused

    def on_header(self, name: bytes, value: bytes) -> None:
        line = len(name) + len(value) + 4  # "name: value\r\n"
        self._header_total += line
        if line > self.limits.max_header_line_bytes:
            self._refused = self._too_large(f"header {name[:64].decode('latin-1')!r}", self.limits.max_header_line_bytes)
            raise HeaderRefused
        if len(self.url) + self._header_total > self.limits.max_header_bytes:  # they came whole, in one read
            self._refused = self._too_large("request line and headers", self.limits.max_header_bytes)
            raise HeaderRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._header_bytes = 0
        self._stop_header_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser gave up on; a bound's own answer where one was broken."""
        if self._refused is not None:
            return self._close_with(self._refused)
        return super().send_400_response(msg)

    def _too_large(self, what: str, limit: int) -> bytes:
        return _refusal(431, f"{what}: larger than the limit of {limit} bytes")

    def _close_with(self, answer: bytes) -> None:
        """Answer, then close as nginx's lingering close does: this side first, and the socket only after
        ``LINGER_S`` (what the client sends meanwhile is dropped), so that its unread data cannot make the kernel
        reset the connection before the client has read the answer."""
        self._refused = answer
        self._stop_header_timer()
        if not self.transport.is_closing():
            self.transport.write(answer)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(self.LINGER_S, self.transport.close)

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._reading_headers and self._refused is None:
            self._close_with(_refusal(408, f"request headers: not received within {self.limits.header_timeout_s:g} s"))


def bound_connections(limits: ProxyLimits) -> None:
    """Make :class:`BoundedHttpProtocol` (with ``limits``) what uvicorn's ``http="auto"`` loads in this process."""
    from uvicorn.protocols.http import auto

    BoundedHttpProtocol.limits = limits
    auto.AutoHTTPProtocol = BoundedHttpProtocol


class RoutesGuard:
    """Pure ASGI middleware for Serve's HTTP proxy: the proxy answers ``GET /-/routes`` (every application's route
    prefix and name) itself, before any application sees the request, so the API's token check never runs there.
    With the token variable set in the proxy's environment (``DRUGPROT_API_TOKEN``, the default ``token_env``),
    ``/-/routes`` needs the same bearer token as the API; ``/-/healthz`` stays open for probes. A request with more
    than one ``Authorization`` header is refused (400) wherever it goes: which one counts would be a guess. Serve's
    own endpoints speak plain HTTP only, so a websocket to any ``/-/`` path is closed before it is accepted (403)."""

    def __init__(self, app, *, token_env: str | None = None):
        self.app = app
        token = resolve_token(token_env or ServeOptions.model_fields["token_env"].default)
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")[len(scope.get("root_path", "")):]
        if scope["type"] == "websocket":
            if path.startswith("/-/") or len(authorizations(scope)) > 1:
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        if len(authorizations(scope)) > 1:
            return await _error(400, "request: more than one Authorization header; send one").__call__(
                scope, receive, send)
        if self.token is not None and path == "/-/routes" and not bearer_matches(scope, self.token):
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
    refused (capacity was added) probes every round again. Until the first refusal there is no limit.

    The application's latency objective (``OBJECTIVE_HEADER`` on its answers) covers only the model's queue, but a
    request also waits in the proxy, the ingress and their event loops, which the model cannot see; so a 2xx answer
    that took longer than the objective through this proxy cuts the limit as a refusal does (a delay signal, as in
    delay-based congestion control), and what would have queued there is refused here instead; such a cut does not
    slow the probing down, since a late answer costs no extra refusal."""

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
        round_, started = self.cuts[key], self.clock()
        self.in_flight[key] += 1

        async def send_and_learn(message):
            if message["type"] == "http.response.start":
                self._learn(key, round_, message["status"], message.get("headers") or [], self.clock() - started)
            await send(message)

        try:
            return await self.app(scope, receive, send_and_learn)
        finally:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:  # no entry per path a client made up: only for requests in flight
                del self.in_flight[key]

    def _learn(self, key: str, round_: int, status: int, headers, seconds: float = 0.0) -> None:
        """Cut the limit on an overload refusal or a 2xx answer slower than the objective (backing off once per
        round), raise it on a 2xx answer while there is demand."""
        headers = {name.lower(): value for name, value in headers}
        refused = status == 503 and OVERLOAD_HEADER.lower().encode() in headers  # only an application's route says so
        objective = headers.get(OBJECTIVE_HEADER.lower().encode())
        late = 200 <= status < 300 and objective is not None and seconds > float(objective)
        if refused or late:
            if refused:
                self.retry_after[key] = headers.get(b"retry-after", b"1").decode("latin-1")
            if round_ == self.cuts[key]:  # the first refusal of a round: a failed probe
                self.refused_limit[key] = self.limit.get(key, float(self.in_flight[key]))
                self.cuts[key] += 1
                rounds = self.probe_rounds.get(key)
                if rounds is None or refused:  # a late answer is no costly probe: it does not slow the probing
                    self.probe_rounds[key] = 1 if rounds is None else min(2 * rounds, self.MAX_PROBE_ROUNDS)
            self.limit[key] = max(1.0, min(self.limit.get(key, math.inf), self.in_flight[key] - 1.0))
        elif 200 <= status < 300 and key in self.limit and self.clock() - self.refused_at.get(key, -math.inf) < self.DEMAND_S:
            self.limit[key] += 1.0 / (self.probe_rounds[key] * self.limit[key])
            if self.limit[key] >= self.refused_limit[key] + 1:
                self.probe_rounds[key] = 1


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback: ``PROXY_CALLBACK`` in the environment of the Ray nodes (``drugprot serve`` sets
    it for the Ray it starts; on a cluster, set it on every node)."""
    from starlette.middleware import Middleware

    bound_connections(proxy_limits())
    return [Middleware(RoutesGuard), Middleware(StalledBodiesAtProxy), Middleware(AdmissionAtProxy),
            Middleware(ResendOnLostReplica)]


