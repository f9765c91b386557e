"""The classifier as tables of real Coze codes and messages, property tests, and the retry adapter."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.classifier import Decision, classify
from pipeline.clock import FakeClock
from pipeline.config import DEFAULT_RULES, RetryPolicy, Rule
from pipeline.coze import CozeClient
from pipeline.errors import CozeError, CozeNetworkError, RunFailed, SynthesisError
from pipeline.retry import call_with_retry
from pipeline.standins.simulator import CozeSimulator, Script

POLICY = RetryPolicy()


def decide(error, *, attempt=1, resubmits=0, elapsed=0.0, policy=POLICY, rules=DEFAULT_RULES,
           rand=lambda: 0.5):
    return classify(error, rules, attempt=attempt, resubmits=resubmits, elapsed=elapsed,
                    policy=policy, rand=rand)


def call_error(code, message="", status=200, **kw):
    return CozeError(code, message, http_status=status, **kw)


TABLE = [
    # (error, action, error_class, tier)
    (RunFailed("720701002", "Access plugin server url timed out"), "resubmit", "plugin_timeout", "LOW"),
    (RunFailed("720701001", "Access plugin server url timed out"), "resubmit", "plugin_timeout", "LOW"),
    (RunFailed("", "Access plugin server url timed out"), "resubmit", "plugin_timeout", "LOW"),
    (RunFailed("", "node \"LLM_1\" failed: upstream server error"), "resubmit", "plugin_timeout", "LOW"),
    (RunFailed("", "Request Timeout"), "resubmit", "plugin_timeout", "LOW"),
    (call_error("4100", "authentication is invalid", 401), "fatal", "auth", "HIGH"),
    (call_error("4100", "authentication is invalid"), "fatal", "auth", "HIGH"),
    (call_error("4101", "permission denied"), "fatal", "auth", "HIGH"),
    (call_error("http_403", "Forbidden", 403), "fatal", "auth", "HIGH"),
    (call_error("4011", "insufficient balance"), "fatal", "balance", "HIGH"),
    (call_error("4019", "account in arrears"), "fatal", "balance", "HIGH"),
    (call_error("4008", "daily limit reached"), "fatal", "balance", "HIGH"),
    (call_error("6003", "async run is not allowed on this plan"), "fatal", "balance", "HIGH"),
    (call_error("4009", "system limit, retry later"), "retry", "rate_limited", "LOW"),
    (call_error("4013", "model rate limit"), "retry", "rate_limited", "LOW"),
    (call_error("4020", "RPM over quota", 429, retry_after=2.0), "retry", "rate_limited", "LOW"),
    (call_error("http_429", "Too Many Requests", 429), "retry", "rate_limited", "LOW"),
    (call_error("5000", "internal server error", 500), "retry", "server", "LOW"),
    (call_error("http_502", "<html>Bad Gateway</html>", 502), "retry", "server", "LOW"),
    (call_error("http_503", "Service Unavailable", 503), "retry", "server", "LOW"),
    (CozeNetworkError("ServerDisconnectedError: Server disconnected"), "retry", "network", "LOW"),
    (ConnectionResetError(104, "Connection reset by peer"), "retry", "network", "LOW"),
    (ConnectionRefusedError(111, "Connection refused"), "retry", "network", "LOW"),
    (asyncio.TimeoutError(), "retry", "network", "LOW"),
    (call_error("4000", "invalid parameter"), "fail", "bad_request", "MEDIUM"),
    (call_error("4200", "workflow not found or not published"), "fail", "bad_request", "MEDIUM"),
    (call_error("4314", "execute history not found"), "fail", "bad_request", "MEDIUM"),
    (call_error("http_404", "Not Found", 404), "fail", "bad_request", "MEDIUM"),
    (call_error("bad_response", "answer is not a JSON object"), "fail", "unknown", "MEDIUM"),
    (RunFailed("", "workflow run failed"), "fail", "unknown", "MEDIUM"),
    (SynthesisError("ffmpeg_exit_1", "ffmpeg exited with 1"), "fail", "unknown", "MEDIUM"),
    (ValueError("something odd"), "fail", "unknown", "MEDIUM"),
]


@pytest.mark.parametrize("error, action, error_class, tier", TABLE,
                         ids=[f"{type(e).__name__}-{getattr(e, 'code', '') or e}" for e, *_ in TABLE])
def test_default_rules_table(error, action, error_class, tier):
    decision = decide(error)
    assert (decision.action, decision.error_class, decision.tier) == (action, error_class, tier)
    assert decision.reason


def test_plugin_timeout_rule_is_scoped_to_runs():
    # The same words on a failed API call are a network problem, not a run to resubmit.
    assert decide(CozeNetworkError("no answer in 30s: POST /v1/workflow/run")).action == "retry"
    assert decide(call_error("http_504", "Gateway Timeout", 504)).error_class == "server"


def test_resubmit_only_once_then_fail_medium():
    error = RunFailed("720701002", "Access plugin server url timed out")
    assert decide(error, resubmits=0) == Decision("resubmit", 0.0, "plugin_timeout", "LOW",
                                                  "matched rule plugin_timeout: resubmit the run")
    again = decide(error, resubmits=1)
    assert (again.action, again.tier, again.error_class) == ("fail", "MEDIUM", "plugin_timeout")


def test_exponential_backoff_with_full_jitter():
    error = call_error("5000", "internal server error", 500)
    waits = [decide(error, attempt=a, rand=lambda: 1.0).wait for a in (1, 2, 3, 4)]
    assert waits == [1.0, 2.0, 4.0, 8.0]
    capped = RetryPolicy(max_attempts=20, maximum=30.0)
    assert decide(error, attempt=10, policy=capped, rand=lambda: 1.0).wait == 30.0
    assert decide(error, attempt=3, rand=lambda: 0.25).wait == 1.0
    assert decide(error, attempt=3, rand=lambda: 0.0).wait == 0.0


def test_retry_after_is_honoured_with_small_jitter():
    error = call_error("4020", "RPM over quota", 429, retry_after=7.0)
    assert decide(error, rand=lambda: 0.0).wait == 7.0
    assert 7.0 < decide(error, rand=lambda: 0.9).wait <= 8.0


def test_retries_exhausted_by_attempts_or_total_time():
    error = call_error("5000", "internal server error", 500)
    last = decide(error, attempt=POLICY.max_attempts)
    assert (last.action, last.tier) == ("fail", "MEDIUM")
    assert "retries exhausted" in last.reason
    assert decide(error, attempt=POLICY.max_attempts - 1).action == "retry"
    over = decide(error, attempt=2, elapsed=POLICY.max_total - 0.5, rand=lambda: 1.0)
    assert over.action == "fail" and "exhausted" in over.reason


def test_rule_tier_overrides_and_unknown_5xx_is_retried():
    rules = (Rule("quota", "fail", codes=("4008",), tier="HIGH"),
             Rule("slow", "retry", codes=("4013",), tier="LOW"))
    assert decide(call_error("4008", "daily limit"), rules=rules).tier == "HIGH"
    exhausted = decide(call_error("4013", ""), rules=rules, attempt=POLICY.max_attempts)
    assert (exhausted.action, exhausted.tier) == ("fail", "MEDIUM")
    unknown = decide(call_error("http_599", "", 599), rules=())
    assert (unknown.action, unknown.error_class) == ("retry", "unknown")
    assert decide(CozeNetworkError("reset"), rules=()).action == "retry"
    assert decide(call_error("4000", "bad"), rules=()).action == "fail"


def test_message_match_is_case_insensitive_and_first_rule_wins():
    rules = (Rule("first", "fail", messages=("Quota",)), Rule("second", "fatal", codes=("4011",)))
    assert decide(call_error("4011", "QUOTA exhausted"), rules=rules).error_class == "first"


# -- properties ------------------------------------------------------------------------------

codes = st.sampled_from(["4000", "4008", "4009", "4011", "4013", "4019", "4020", "4100", "4101",
                         "4200", "5000", "6003", "720701002", "network", "http_500", "", "x"])
messages = st.sampled_from(["", "timeout", "Access plugin server url timed out", "invalid token",
                            "rate limit", "validation failed", "任务失败", "server error"])
statuses = st.one_of(st.none(), st.integers(min_value=100, max_value=599))
retry_afters = st.one_of(st.none(), st.floats(min_value=0, max_value=120))


@st.composite
def errors(draw):
    kind = draw(st.sampled_from(["call", "run", "net", "raw", "value"]))
    if kind == "call":
        return CozeError(draw(codes), draw(messages), http_status=draw(statuses),
                         retry_after=draw(retry_afters))
    if kind == "run":
        return RunFailed(draw(codes), draw(messages))
    if kind == "net":
        return CozeNetworkError(draw(messages))
    if kind == "raw":
        return draw(st.sampled_from([ConnectionResetError(), asyncio.TimeoutError(),
                                     BrokenPipeError()]))
    return ValueError(draw(messages))


policies = st.builds(RetryPolicy, max_attempts=st.integers(1, 8),
                     initial=st.floats(0.01, 5), maximum=st.floats(0.5, 60),
                     multiplier=st.floats(1, 3), max_total=st.floats(1, 600),
                     max_resubmits=st.integers(0, 2))


@settings(max_examples=300, deadline=None)
@given(error=errors(), attempt=st.integers(1, 10), resubmits=st.integers(0, 3),
       elapsed=st.floats(0, 700), policy=policies, r=st.floats(0, 1, exclude_max=True))
def test_any_error_gets_a_bounded_deterministic_decision(error, attempt, resubmits, elapsed,
                                                        policy, r):
    d = decide(error, attempt=attempt, resubmits=resubmits, elapsed=elapsed, policy=policy,
               rand=lambda: r)
    assert d.action in ("retry", "resubmit", "fail", "fatal")
    assert d.tier in ("LOW", "MEDIUM", "HIGH", "CRITICAL")
    retry_after = getattr(error, "retry_after", None) or 0.0
    assert 0.0 <= d.wait <= policy.maximum + retry_after
    if d.action == "retry":
        assert attempt < policy.max_attempts and elapsed + d.wait <= policy.max_total
    if d.action == "resubmit":
        assert resubmits < policy.max_resubmits and d.wait == 0.0
    assert d == decide(error, attempt=attempt, resubmits=resubmits, elapsed=elapsed,
                       policy=policy, rand=lambda: r)


# -- call_with_retry over real sockets, on a FakeClock ------------------------------------------

async def with_client(script, body, policy=POLICY, clock=None):
    clock = clock or FakeClock()
    sim = CozeSimulator(clock=clock)
    sim.script("t1", script)
    base = await sim.start()
    seen = []
    try:
        async with CozeClient(base, "sim-token") as coze:
            async def submit():
                return await coze.submit("wf", {"task_id": "t1"})
            return await body(submit, clock, sim, seen,
                              lambda d, e, a: seen.append((d.action, type(e).__name__, a)))
    finally:
        await sim.stop()


def test_500_500_200_succeeds_after_two_retries():
    async def body(submit, clock, sim, seen, on_retry):
        result = await call_with_retry(submit, rules=DEFAULT_RULES, policy=POLICY, clock=clock,
                                       on_retry=on_retry, rand=lambda: 1.0)
        return result, clock.slept, sim.task("t1").submits, seen

    result, slept, submits, seen = asyncio.run(with_client(Script(http_500_first_n=2), body))
    assert result.execute_id.isdigit()
    assert slept == [1.0, 2.0] and submits == 3
    assert seen == [("retry", "CozeError", 1), ("retry", "CozeError", 2)]


def test_retry_after_is_honoured_by_call_with_retry():
    async def body(submit, clock, sim, seen, on_retry):
        await call_with_retry(submit, rules=DEFAULT_RULES, policy=POLICY, clock=clock,
                              rand=lambda: 0.0)
        return clock.slept

    assert asyncio.run(with_client(Script(http_429_first_n=1, retry_after=4), body)) == [4.0]


def test_bad_token_raises_at_once_with_a_fatal_decision():
    async def body(submit, clock, sim, seen, on_retry):
        sim.set_token_valid(False)
        with pytest.raises(CozeError) as info:
            await call_with_retry(submit, rules=DEFAULT_RULES, policy=POLICY, clock=clock,
                                  on_retry=on_retry)
        return info.value, clock.slept, sim.total_requests, seen

    err, slept, requests, seen = asyncio.run(with_client(Script(), body))
    assert err.code == "4100" and err.decision.action == "fatal" and err.decision.tier == "HIGH"
    assert slept == [] and requests == 1 and seen == []


def test_exhausted_retries_raise_the_last_error_with_a_fail_decision():
    policy = RetryPolicy(max_attempts=3)

    async def body(submit, clock, sim, seen, on_retry):
        with pytest.raises(CozeNetworkError) as info:
            await call_with_retry(submit, rules=DEFAULT_RULES, policy=policy, clock=clock,
                                  rand=lambda: 1.0)
        return info.value, clock.slept, sim.task("t1").submits

    err, slept, submits = asyncio.run(with_client(Script(drop_connection_first_n=9), body,
                                                  policy))
    assert (err.decision.action, err.decision.tier) == ("fail", "MEDIUM")
    assert "retries exhausted" in err.decision.reason
    assert slept == [1.0, 2.0] and submits == 3


def test_resubmit_decision_is_raised_not_retried():
    calls = []

    async def failing():
        calls.append(1)
        raise RunFailed("720701002", "Access plugin server url timed out")

    async def main():
        with pytest.raises(RunFailed) as info:
            await call_with_retry(failing, rules=DEFAULT_RULES, policy=POLICY, clock=FakeClock())
        return info.value

    err = asyncio.run(main())
    assert err.decision.action == "resubmit" and calls == [1]
