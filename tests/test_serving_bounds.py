"""Serving's bounds without Ray: the proxy's HTTP protocol in a real uvicorn on 127.0.0.1, the admission middleware's
memory, the overload refusal across pickling, and the ingress sized from every model replica."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
import time

import pytest

from drugprot.serving.options import ProxyLimits, parse_options


def test_an_overload_refusal_survives_pickling_with_its_status_and_headers():
    from drugprot.serving.service import Overloaded

    refusal = pickle.loads(pickle.dumps(Overloaded("the model is overloaded: retry later", 4.2)))
    assert str(refusal) == "the model is overloaded: retry later" and refusal.status == 503
    assert refusal.headers == {"Retry-After": "5", "X-Drugprot-Overload": "1"}


@pytest.mark.parametrize("args, ongoing", [
    ({}, 128),  # one replica: 64 in progress + 64 queued
    ({"replicas": 2}, 192),
    ({"autoscale": "1:4"}, 320),  # autoscaling's maximum, not the replicas running now
    ({"replicas": 3, "max_ongoing_requests": 8, "max_queued_requests": 4}, 64),  # never below 64
])
def test_the_ingress_admits_all_that_every_model_replica_may_hold(args, ongoing):
    options = parse_options({"model": "m", **args})
    ingress = options.ingress_deployment_options()
    assert ingress["max_ongoing_requests"] == ongoing and ingress["max_queued_requests"] == 4 * ongoing


def test_the_latency_objective_is_on_by_default_and_zero_turns_it_off():
    assert parse_options({"model": "m"}).max_queue_wait_s == 2.0
    assert parse_options({"model": "m", "max_queue_wait_s": 0}).max_queue_wait_s is None


@pytest.fixture(scope="module")
def bounded_server():
    """uvicorn on 127.0.0.1 with ``BoundedHttpProtocol`` chosen as Serve's proxy gets it (``http="auto"``)."""
    import uvicorn

    from drugprot.serving.proxy import bound_connections

    bound_connections(ProxyLimits(header_timeout_s=1.0, max_connections_per_client=4))

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    from drugprot.polling import poll

    assert poll(lambda: server.started or None, timeout=30)
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def exchange(port: int, head: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0)) as connection:
        try:
            connection.sendall(head)
        except OSError:
            pass  # answered and closed while sending
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("head, status, detail", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"200", b"ok"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9_000 + b"\r\n\r\n", b"431", b"header 'X-Long': larger than the limit of 8192 bytes"),
    (b"GET /" + b"u" * 9_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"431", b"request line: larger than"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 1_000) for i in range(40)) + b"\r\n",
     b"431", b"request line and headers: larger than the limit of 32768 bytes"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"c" * 2_000_000, b"431", b"request line and headers"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", b"408", b"request headers: not received within 1 s"),
])
def test_the_proxy_protocol_bounds_header_size_and_time(bounded_server, head, status, detail):
    answer = exchange(bounded_server, head)
    assert answer.split(b" ")[1] == status and detail in answer, answer[:300]


def test_the_proxy_protocol_caps_connections_per_client_address(bounded_server):
    held = [socket.create_connection(("127.0.0.1", bounded_server), source_address=("127.0.0.7", 0)) for _ in range(4)]
    try:
        refused = exchange(bounded_server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.7")
        assert refused.startswith(b"HTTP/1.1 429 ") and b"too many connections from 127.0.0.7" in refused
        assert exchange(bounded_server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.8").startswith(b"HTTP/1.1 200 ")
    finally:
        for connection in held:
            connection.close()
    from drugprot.polling import poll
    from drugprot.serving.proxy import BoundedHttpProtocol

    assert poll(lambda: "127.0.0.7" not in BoundedHttpProtocol.connections_by_client or None, timeout=10)


def test_admission_keeps_no_entry_per_path_a_client_makes_up():
    from drugprot.serving.proxy import AdmissionAtProxy

    async def not_found(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        pass

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    gate = AdmissionAtProxy(not_found, clock=time.monotonic)

    async def main():
        for i in range(2_000):
            await gate({"type": "http", "method": "POST", "path": f"/made-up-{i}/v1/relations"}, receive, send)

    asyncio.run(main())
    assert not gate.in_flight and not gate.limit and not gate.refused_at


def test_admission_cuts_its_limit_on_answers_slower_than_the_objective():
    """The model's objective cannot see waits in the proxy and the ingress: a 200 that took longer than the
    objective the application states (``X-Drugprot-Objective``) limits the requests in flight as a refusal does."""
    from drugprot.serving.proxy import AdmissionAtProxy

    now = [0.0]
    release = asyncio.Event()

    async def slow(scope, receive, send):
        now[0] += 3.0  # three seconds through the proxy, against an objective of two
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-drugprot-objective", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = AdmissionAtProxy(slow, clock=lambda: now[0])
    scope = {"type": "http", "method": "POST", "path": "/v1/relations"}

    async def one() -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        await gate(dict(scope), receive, send)
        return sent

    async def main():
        first, second = asyncio.create_task(one()), asyncio.create_task(one())
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, second)
        assert gate.limit[""] == 1.0  # two were in flight when the first late answer came
        release.clear()
        held = asyncio.create_task(one())
        await asyncio.sleep(0)
        refused = await one()
        release.set()
        await held
        return refused

    refused = asyncio.run(main())
    assert refused[0]["status"] == 503 and b"the service is at capacity" in refused[1]["body"]
