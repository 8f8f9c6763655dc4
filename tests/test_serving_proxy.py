"""serving.proxy: the middlewares Serve's HTTP proxy runs (the routes guard, resending lost requests, the caps on
stalled bodies, admission learned from overload refusals), around stand-ins for the proxy's apps."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from fixtures_serving import until


def test_rays_routes_endpoint_needs_the_token_at_the_proxy(monkeypatch):
    """The middleware Serve's proxy runs (``proxy_middlewares``) around a stand-in for the proxy's own answers."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from drugprot.serving.proxy import (PROXY_CALLBACK, AdmissionAtProxy, ResendOnLostReplica, RoutesGuard,
                                        StalledBodiesAtProxy, proxy_middlewares)

    assert PROXY_CALLBACK[1] == f"{proxy_middlewares.__module__}:{proxy_middlewares.__name__}"
    middleware, stalled, admission, resend = proxy_middlewares()
    assert middleware.cls is RoutesGuard and stalled.cls is StalledBodiesAtProxy and resend.cls is ResendOnLostReplica
    assert admission.cls is AdmissionAtProxy
    proxy = [Route("/-/routes", lambda _: JSONResponse({"/": "drugprot"})), Route("/-/healthz", lambda _: JSONResponse("ok"))]
    monkeypatch.setenv("DRUGPROT_API_TOKEN", "s3cret")
    with TestClient(Starlette(routes=proxy, middleware=[middleware])) as guarded:
        assert guarded.get("/-/routes").status_code == 401
        assert guarded.get("/-/routes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        answer = guarded.get("/-/routes", headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 200 and answer.json() == {"/": "drugprot"}
        assert guarded.get("/-/healthz").status_code == 200
    monkeypatch.delenv("DRUGPROT_API_TOKEN")
    with TestClient(Starlette(routes=proxy, middleware=[Middleware(RoutesGuard)])) as open_proxy:
        assert open_proxy.get("/-/routes").status_code == 200  # no token configured: as open as the API


class LosingProxy:
    """Stands in for Serve's proxy around a replica that dies: it reads the body as the proxy does (in parts, then
    listening for a disconnect), for the first ``lose`` calls sends nothing (the replica died), afterwards answers
    ``answer_status`` with the body it read."""

    def __init__(self, lose: int, *, answer_status: int = 200):
        self.lose, self.answer_status, self.calls, self.bodies, self.paths = lose, answer_status, 0, [], []

    async def __call__(self, scope, receive, send):
        self.calls += 1
        self.paths.append(scope["path"])
        scope["root_path"], scope["path"] = "/chaos", scope["path"].removeprefix("/chaos")  # as Serve's proxy does
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        if self.calls <= self.lose:
            try:  # the proxy keeps listening for a disconnect until it gives up on the request
                await asyncio.wait_for(receive(), 0.05)
            except TimeoutError:
                pass
            return
        await send({"type": "http.response.start", "status": self.answer_status, "headers": []})
        await send({"type": "http.response.body", "body": body})


def through_resend(app, *, method: str = "POST", path: str = "/v1/relations", parts=(b'{"documents": ', b"[]}"),
                   disconnect_after_body: bool = False, attempts: int = 3):
    """One request through ``ResendOnLostReplica(app)``; returns what was sent back and how often the client's
    ``receive`` was called."""
    from drugprot.serving.proxy import ResendOnLostReplica

    messages = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
    if disconnect_after_body:
        messages.append({"type": "http.disconnect"})
    sent, reads = [], [0]

    async def receive():
        reads[0] += 1
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected: a further read waits

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    asyncio.run(asyncio.wait_for(ResendOnLostReplica(app, attempts=attempts)(scope, receive, send), 5))
    return sent, reads[0]


def test_a_request_lost_with_its_replica_is_sent_again_with_its_body():
    app = LosingProxy(lose=2)
    sent, reads = through_resend(app, path="/chaos/v1/relations")
    assert app.calls == 3 and app.bodies == [b'{"documents": []}'] * 3  # the body replayed to each attempt
    assert app.paths == ["/chaos/v1/relations"] * 3  # each attempt gets the request as it came, not as routed
    assert reads == 2 + 2  # the body's two parts read from the client once; each lost attempt also waited for a disconnect
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] and sent[0]["status"] == 200
    assert sent[1]["body"] == b'{"documents": []}'


def test_resending_is_bounded_and_only_for_lost_requests_that_may_be_sent_twice():
    app = LosingProxy(lose=5)
    assert through_resend(app, attempts=3)[0] == [] and app.calls == 3  # all lost: nothing sent, the server's 500
    answered = LosingProxy(lose=0, answer_status=500)
    sent, _ = through_resend(answered)
    assert answered.calls == 1 and sent[0]["status"] == 500  # an answer (even a 500) is never resent
    other = LosingProxy(lose=1)
    assert through_resend(other, path="/v1/other")[0] == [] and other.calls == 1  # a POST elsewhere: not resent
    probe = LosingProxy(lose=1)
    sent, _ = through_resend(probe, method="GET", path="/v1/model", parts=(b"",))
    assert probe.calls == 2 and sent[0]["status"] == 200
    gone = LosingProxy(lose=1)
    assert through_resend(gone, disconnect_after_body=True)[0] == [] and gone.calls == 1  # the client left


def test_the_proxy_refuses_stalled_bodies_beyond_the_caps_before_any_replica_sees_them():
    from drugprot.serving.proxy import StalledBodiesAtProxy
    from drugprot.serving.options import Limits

    async def scenario():
        app = LosingProxy(lose=0)  # reads the whole body, then answers 200
        guard = StalledBodiesAtProxy(app, limits=Limits(max_unfinished_bodies=3, max_unfinished_bodies_per_client=2,
                                                        body_idle_timeout_s=0.2))

        def request(client: str, parts: list[bytes], *, stall: bool):
            messages = [{"type": "http.request", "body": part, "more_body": stall or i < len(parts) - 1}
                        for i, part in enumerate(parts)]
            rest, stalled = asyncio.Event(), asyncio.Event()
            sent = []

            async def receive():
                if messages:
                    return messages.pop(0)
                stalled.set()  # past the parts it sent: the guard (and the app) wait for the rest of the body
                await rest.wait()  # the stalled client sends the rest of its body only when told
                return {"type": "http.request", "body": b"]}", "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/relations", "client": (client, 1), "headers": []}
            return asyncio.create_task(guard(scope, receive, send)), rest, sent, stalled

        held = [request("10.0.0.1", [b'{"documents": ['], stall=True) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*(stalled.wait() for *_, stalled in held)), 5)  # both admitted
        refused = request("10.0.0.1", [b'{"documents": ['], stall=True)  # a third from the same address
        other = request("10.0.0.2", [b'{"documents": ['], stall=True)  # another address: the third overall
        overall = request("10.0.0.3", [b'{"documents": ['], stall=True)  # the fourth overall
        whole = request("10.0.0.1", [b'{"documents": []}'], stall=False)  # a body that comes whole never counts
        await asyncio.wait_for(asyncio.gather(refused[0], overall[0], whole[0]), 5)
        statuses = [task[2][0]["status"] for task in (refused, overall, whole)]
        calls_while_full = app.calls
        held[0][1].set()  # the first stalled body arrives whole: its slot is free again
        await asyncio.wait_for(held[0][0], 5)
        again = request("10.0.0.1", [b'{"documents": ['], stall=True)
        stalled = asyncio.create_task(again[3].wait())
        await asyncio.wait([again[0], stalled], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        admitted_again = stalled.done() and not again[0].done()  # waiting for its body, not refused
        silent = request("10.0.0.4", [], stall=True)  # headers, then not a byte of the body
        await asyncio.wait_for(silent[0], 5)
        for task, rest, *_ in (held[1], other, again):
            rest.set()
            await asyncio.wait_for(task, 5)
        return statuses, calls_while_full, held[0][2][0]["status"], admitted_again, silent[2][0]["status"], guard

    statuses, calls_while_full, first_status, admitted_again, silent_status, guard = asyncio.run(scenario())
    assert statuses == [429, 503, 200]
    assert calls_while_full == 4  # the two held, the other address's and the whole body; no refused one
    assert first_status == 200 and admitted_again and silent_status == 408
    assert guard.unfinished.admit("10.0.0.9") is None  # every slot was given back


class CapacityApp:
    """Stands in for an application that admits ``capacity`` requests at once and refuses the rest for overload
    (503, ``Retry-After: 3`` and the overload header, as the ingress does) after a round trip; each admitted request
    holds its slot until ``release`` is set."""

    def __init__(self, capacity: int):
        from drugprot.serving.service import OVERLOAD_HEADER

        self.capacity, self.running, self.calls, self.release = capacity, 0, 0, asyncio.Event()
        self.header = OVERLOAD_HEADER.lower().encode()

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await asyncio.sleep(0)  # the round trip to a replica: requests sent together are all on their way
        if self.running >= self.capacity:
            headers = [(b"retry-after", b"3"), (self.header, b"1"), (b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            return await send({"type": "http.response.body", "body": b'{"detail": "queue full"}'})
        self.running += 1
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def through_admission(gate, path: str = "/app/v1/relations"):
    """One POST through ``gate`` (an AdmissionAtProxy) as a task; returns (task, what was sent back)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    return asyncio.create_task(gate(scope, receive, send)), sent


def test_the_proxy_learns_capacity_from_overload_refusals_and_refuses_the_excess_itself():
    from drugprot.serving.proxy import AdmissionAtProxy

    async def scenario():
        app, now = CapacityApp(capacity=4), [0.0]
        gate = AdmissionAtProxy(app, clock=lambda: now[0])
        first = [through_admission(gate) for _ in range(6)]  # no limit yet: all six reach the app, two refused there
        await until(lambda: app.running == 4 and sum(task.done() for task, _ in first) == 2)
        assert app.calls == 6 and gate.refused == 0
        assert [sent[0]["status"] for _, sent in first if sent] == [503, 503]
        assert gate.limit["/app"] == 4.0  # each refusal of the burst lowered it to what the app held then (6 - 1, 5 - 1)
        assert gate.probe_rounds["/app"] == 1 and gate.cuts["/app"] == 1  # one round: backed off once
        more = [through_admission(gate) for _ in range(3)]
        await asyncio.gather(*(task for task, _ in more))
        assert app.calls == 6 and gate.refused == 3  # refused at the proxy, never reaching the app
        assert all(json.loads(sent[1]["body"])["detail"].startswith(gate.AT_CAPACITY) for _, sent in more)
        assert all(sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"3" for _, sent in more)
        other = through_admission(gate, path="/other/v1/relations")  # another application: its own (no) limit
        await other[0]
        assert app.calls == 7 and other[1][0]["status"] == 503
        app.release.set()
        await asyncio.gather(*(task for task, _ in first + more))
        raised = 4.0  # requests were refused here within DEMAND_S: each of the four 2xx answers raised the limit
        for _ in range(4):
            raised += 1 / raised
        assert gate.limit["/app"] == pytest.approx(raised) and sum(gate.in_flight.values()) == 0
        app.release.clear()
        now[0] += gate.DEMAND_S  # a while later, nothing refused here since
        calm = [through_admission(gate) for _ in range(2)]  # below the limit: nothing refused, no demand
        await until(lambda: app.running == 2)
        app.release.set()
        await asyncio.gather(*(task for task, _ in calm))
        assert gate.limit["/app"] == pytest.approx(raised)  # answers without demand beyond the limit raise nothing

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_admission_probing_backs_off_while_probes_fail_and_resumes_when_capacity_grows():
    from drugprot.serving.proxy import AdmissionAtProxy
    from drugprot.serving.service import OVERLOAD_HEADER

    gate = AdmissionAtProxy(None, clock=lambda: 0.0)
    overload = [(OVERLOAD_HEADER.lower().encode(), b"1"), (b"retry-after", b"2")]
    gate.in_flight["/a"] = 9
    for rounds in (1, 2, 4, 8, 16, 32, 64, 64):  # each refused probe doubles the rounds between probes, up to the cap
        gate._learn("/a", gate.cuts["/a"], 503, overload)
        assert gate.probe_rounds["/a"] == rounds and gate.limit["/a"] == 8.0 and gate.retry_after["/a"] == "2"
    gate._learn("/a", gate.cuts["/a"] - 1, 503, overload)  # admitted before the last cut: no new cut
    assert gate.probe_rounds["/a"] == 64
    gate.refused_at["/a"] = 0.0  # demand beyond the limit
    answers = 0
    while gate.probe_rounds["/a"] != 1:  # capacity was added: answers succeed past the limit last refused (8)
        gate._learn("/a", gate.cuts["/a"], 200, [])
        answers += 1
    assert gate.limit["/a"] >= 9.0 and 64 * 8 <= answers <= 64 * 9  # 1/(64 × limit) per answer
    before = gate.limit["/a"]
    gate._learn("/a", gate.cuts["/a"], 200, [])
    assert gate.limit["/a"] == pytest.approx(before + 1 / before)  # probing every round again


def test_admission_at_the_proxy_passes_other_routes_and_methods_untouched():
    from drugprot.serving.proxy import AdmissionAtProxy

    async def scenario():
        app = CapacityApp(capacity=0)  # refuses every request it sees
        gate = AdmissionAtProxy(app)
        gate.limit["/app"] = 1.0
        gate.in_flight["/app"] = 5  # far over the limit
        task, sent = through_admission(gate, path="/app/v1/model")
        await task
        assert app.calls == 1 and sent[0]["status"] == 503  # not a relations request: always reaches the app

    asyncio.run(asyncio.wait_for(scenario(), 5))
