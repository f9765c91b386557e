"""CozeClient over real sockets: against the simulator and against a canned-JSON server."""
from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web

from pipeline.clock import FakeClock
from pipeline.coze import CozeClient, RunStatus
from pipeline.errors import CozeError, CozeNetworkError, RunFailed
from pipeline.ratelimit import RateLimiter
from pipeline.standins.simulator import CozeSimulator, Script

SAMPLES = Path("/work/shared/samples")
TOKEN = "sim-token"


def run(coro):
    return asyncio.run(coro)


class Canned:
    """A loopback server answering queued (status, body, headers) and recording requests."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.received = []

    async def handle(self, request):
        body = await request.read()
        self.received.append((request.method, request.path, dict(request.headers),
                              json.loads(body) if body else None))
        status, payload, headers = self.answers.pop(0)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        if callable(payload):
            return await payload(request)
        return web.Response(status=status, text=payload, headers=headers or {},
                            content_type="application/json")

    async def __aenter__(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self.runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


async def canned_call(answers, call, **client_kwargs):
    async with Canned(answers) as server:
        async with CozeClient(server.url, TOKEN, **client_kwargs) as client:
            result = await call(client)
    return result, server


def history(**item):
    return {"code": 0, "msg": "", "data": [item]}


# -- parsing ------------------------------------------------------------------------------

def test_poll_parses_the_documented_success_sample():
    sample = json.loads((SAMPLES / "coze_run_histories_success.json").read_text())
    status, server = run(canned_call([(200, sample, None)],
                                     lambda c: c.poll("wf1", "743104097880585****")))
    assert status == RunStatus(
        status="Success", output='{"Output":"..."}', error_code="", error_message="",
        debug_url="https://www.coze.cn/work_flow?execute_id=743104097880585****",
        log_id="20241029152003BC531DC784F1897B****", node=None,
        execute_id="743104097880585****",
        create_time=1730174063.0, update_time=1730174065.0)   # the run took 2 s
    assert status.output_data() == {"Output": "..."}
    method, path, headers, _ = server.received[0]
    assert (method, path) == ("GET", "/v1/workflows/wf1/run_histories/743104097880585****")
    assert headers["Authorization"] == f"Bearer {TOKEN}"


def test_submit_sends_an_async_run_and_reads_execute_id():
    answer = {"code": 0, "msg": "", "execute_id": 7431040978805851234,
              "debug_url": "https://www.coze.cn/work_flow?execute_id=7431040978805851234"}
    result, server = run(canned_call([(200, answer, {"X-Tt-Logid": "LOG1"})],
                                     lambda c: c.submit("wf1", {"task_id": "t1", "x": 1})))
    assert result.execute_id == "7431040978805851234"
    assert result.log_id == "LOG1"
    assert result.debug_url.endswith("7431040978805851234")
    method, path, _, body = server.received[0]
    assert (method, path) == ("POST", "/v1/workflow/run")
    assert body == {"workflow_id": "wf1", "parameters": {"task_id": "t1", "x": 1},
                    "is_async": True}


@pytest.mark.parametrize("payload, expected", [
    ({"code": 0, "data": []}, ("Running", "", None)),
    (history(execute_status="Queued"), ("Running", "", None)),
    (history(), ("Running", "", None)),
    (history(execute_status="Fail", error_code=None, error_message="boom"), ("Fail", "", None)),
    (history(execute_status="Fail", error_code=720701002), ("Fail", "720701002", None)),
    (history(execute_status="Failed", error_code="4013"), ("Fail", "4013", None)),
    (history(execute_status="Success", output={"a": 1}), ("Success", "", '{"a": 1}')),
    ({"code": 0, "data": json.dumps([{"execute_status": "Success", "output": "{\"b\":2}"}])},
     ("Success", "", '{"b":2}')),
    ({"code": 0, "data": {"execute_status": "Running"}}, ("Running", "", None)),
])
def test_poll_is_lenient(payload, expected):
    status, _ = run(canned_call([(200, payload, None)], lambda c: c.poll("wf", "1")))
    assert (status.status, status.error_code, status.output) == expected


def test_fail_status_is_returned_and_converts_to_run_failed():
    payload = history(execute_status="Fail", error_code="720701002",
                      error_message='node "plugin_1" failed: Access plugin server url timed out',
                      debug_url="https://www.coze.cn/work_flow?execute_id=9")
    status, _ = run(canned_call([(200, payload, {"X-Tt-Logid": "L9"})],
                                lambda c: c.poll("wf", "9")))
    assert status.status == "Fail" and status.done
    assert status.node == "plugin_1"
    err = status.as_error()
    assert isinstance(err, RunFailed) and isinstance(err, CozeError)
    assert (err.code, err.scope, err.node, err.log_id) == ("720701002", "run", "plugin_1", "L9")
    assert err.debug_url == "https://www.coze.cn/work_flow?execute_id=9"


# -- against the simulator ------------------------------------------------------------------

async def with_sim(body, **sim_kwargs):
    clock = sim_kwargs.pop("clock", FakeClock())
    sim = CozeSimulator(clock=clock, **sim_kwargs)
    base = await sim.start()
    try:
        return await body(sim, base, clock)
    finally:
        await sim.stop()


def test_submit_then_poll_running_then_success():
    async def body(sim, base, clock):
        sim.script("t1", Script(duration=5, output={"video": "v.mp4"}))
        async with CozeClient(base, TOKEN) as coze:
            sub = await coze.submit("wf", {"task_id": "t1"})
            first = await coze.poll("wf", sub.execute_id)
            clock.advance(5)
            last = await coze.poll("wf", sub.execute_id)
        return sub, first, last

    sub, first, last = run(with_sim(body))
    assert sub.execute_id.isdigit() and len(sub.execute_id) == 19
    assert sub.log_id and sub.debug_url.startswith("https://www.coze.cn/work_flow?execute_id=")
    assert first.status == "Running"
    assert last.status == "Success" and last.output_data() == {"video": "v.mp4"}


def test_failed_run_from_simulator_names_the_node():
    async def body(sim, base, clock):
        sim.script("t1", Script(duration=0, outcome="Fail", node="LLM_3"))
        async with CozeClient(base, TOKEN) as coze:
            sub = await coze.submit("wf", {"task_id": "t1"})
            return await coze.poll("wf", sub.execute_id)

    status = run(with_sim(body))
    assert (status.status, status.error_code, status.node) == ("Fail", "720701002", "LLM_3")
    assert "Access plugin server url timed out" in status.error_message


# -- error mapping --------------------------------------------------------------------------

def submit_error(script=None, token=TOKEN, **client_kwargs):
    async def body(sim, base, clock):
        if script:
            sim.script("t1", script)
        async with CozeClient(base, token, **client_kwargs) as coze:
            with pytest.raises(CozeError) as info:
                await coze.submit("wf", {"task_id": "t1"})
        return info.value

    return run(with_sim(body))


def test_bad_token_is_4100_http_401_without_the_token_in_the_message():
    err = submit_error(token="secret-token-123")
    assert (err.code, err.http_status, err.scope) == ("4100", 401, "call")
    assert err.log_id
    assert "secret-token-123" not in str(err) and "secret-token-123" not in repr(err)


def test_bad_parameters_are_4000():
    err = submit_error(Script(code_on_submit=4000))
    assert (err.code, err.http_status, err.message) == ("4000", 200, "invalid parameter")
    assert not isinstance(err, CozeNetworkError)


def test_429_carries_retry_after_and_slows_the_shared_limiter():
    clock = FakeClock()
    limiter = RateLimiter(10, clock)
    err = submit_error(Script(http_429_first_n=1, retry_after=2), limiter=limiter)
    assert (err.code, err.http_status, err.retry_after) == ("4020", 429, 2.0)
    assert limiter.slowdowns == 1 and limiter.requests == 1
    assert limiter.paused_until == pytest.approx(clock.monotonic() + 2)


def test_500_maps_to_the_coze_code_with_http_status():
    err = submit_error(Script(http_500_first_n=1))
    assert (err.code, err.http_status) == ("5000", 500)


def test_502_html_without_coze_code_becomes_http_502():
    answers = [(502, "<html>Bad Gateway</html>", {"Retry-After": "3"})]

    async def call(client):
        with pytest.raises(CozeError) as info:
            await client.submit("wf", {})
        return info.value

    err, _ = run(canned_call(answers, call))
    assert (err.code, err.http_status, err.retry_after) == ("http_502", 502, 3.0)
    assert "Bad Gateway" in err.message


def test_x_ratelimit_reset_and_body_logid_are_read():
    answers = [(429, {"code": 4013, "msg": "model rate limit", "detail": {"logid": "BODYLOG"}},
                {"x-ratelimit-reset": "7"})]

    async def call(client):
        with pytest.raises(CozeError) as info:
            await client.poll("wf", "1")
        return info.value

    err, _ = run(canned_call(answers, call))
    assert (err.code, err.log_id, err.retry_after) == ("4013", "BODYLOG", 7.0)


def test_dropped_connection_is_a_network_error():
    err = submit_error(Script(drop_connection_first_n=1))
    assert isinstance(err, CozeNetworkError)
    assert (err.code, err.scope, err.http_status) == ("network", "call", None)


def test_refused_connection_is_a_network_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()   # nothing listens on the port now

    async def main():
        async with CozeClient(f"http://127.0.0.1:{port}", "tok-XYZ") as coze:
            with pytest.raises(CozeNetworkError) as info:
                await coze.poll("wf", "1")
        return info.value

    err = run(main())
    assert err.code == "network" and "tok-XYZ" not in str(err)
    assert isinstance(err.__cause__, Exception)


def test_slow_answer_times_out_as_network_error():
    async def slow(request):
        await asyncio.sleep(0.5)
        return web.json_response({"code": 0})

    async def call(client):
        with pytest.raises(CozeNetworkError) as info:
            await client.poll("wf", "1")
        return info.value

    err, _ = run(canned_call([(200, slow, None)], call, timeout=0.1))
    assert "no answer in 0.1s" in err.message


def test_non_json_200_is_a_bad_response():
    async def call(client):
        with pytest.raises(CozeError) as info:
            await client.submit("wf", {})
        return info.value

    err, _ = run(canned_call([(200, "not json", None)], call))
    assert (err.code, err.http_status) == ("bad_response", 200)


def test_submits_and_polls_share_the_limiter():
    async def body(sim, base, clock):
        limiter = RateLimiter(2, clock)
        async with CozeClient(base, TOKEN, limiter=limiter) as coze:
            sub = await coze.submit("wf", {"task_id": "t1"})
            for _ in range(3):
                await coze.poll("wf", sub.execute_id)
        return limiter, sim

    limiter, sim = run(with_sim(body))
    assert limiter.requests == 4 == sim.total_requests
    assert sim.max_rps(1.0) <= 2
