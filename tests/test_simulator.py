"""The Coze simulator: scripts, counters, fault injection, thread and process modes."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.clock import FakeClock
from pipeline.coze import CozeClient
from pipeline.errors import CozeError, CozeNetworkError
from pipeline.standins.simulator import CozeSimulator, Script

ROOT = Path(__file__).resolve().parents[1]


def scenario(body, **sim_kwargs):
    """Run ``body(sim, coze, clock)`` against a simulator on a shared FakeClock."""
    clock = sim_kwargs.pop("clock", None) or FakeClock()

    async def main():
        sim = CozeSimulator(clock=clock, **sim_kwargs)
        base = await sim.start()
        try:
            async with CozeClient(base, "sim-token") as coze:
                return await body(sim, coze, clock)
        finally:
            await sim.stop()

    return asyncio.run(main())


async def until_done(coze, clock, execute_id, step=1.0, workflow="wf"):
    while True:
        status = await coze.poll(workflow, execute_id)
        if status.done:
            return status
        await clock.sleep(step)


def test_run_ends_on_the_clock_and_counts_polls():
    async def body(sim, coze, clock):
        sim.script("t1", Script(duration=3.0))
        sub = await coze.submit("wf", {"task_id": "t1"})
        status = await until_done(coze, clock, sub.execute_id)
        return sim, status, clock.slept

    sim, status, slept = scenario(body)
    assert status.status == "Success" and status.output_data() == {"output": "result t1"}
    assert slept == [1.0, 1.0, 1.0]
    stats = sim.task("t1")
    assert (stats.submits, stats.polls, stats.late_polls) == (1, 4, 1)
    assert sim.polls_after_final == {}
    assert sim.total_requests == 5
    assert [r.path for r in sim.requests][:1] == ["/v1/workflow/run"]


def test_an_ended_run_reports_its_own_start_and_end_in_whole_seconds():
    """Like Coze: create_time is the run's start, update_time its end (not the poll's time)."""
    async def body(sim, coze, clock):
        sim.script("t1", Script(duration=6.5))
        sub = await coze.submit("wf", {"task_id": "t1"})
        running = await coze.poll("wf", sub.execute_id)
        await clock.sleep(100)                    # polled long after the end
        ended = await coze.poll("wf", sub.execute_id)
        second_sub = await coze.submit("wf", {"task_id": "t2"})   # default 1 s
        await clock.sleep(100)
        second = await coze.poll("wf", second_sub.execute_id)
        return running, ended, second

    sim_start = 1_750_000_000.7
    sim_kwargs = {"clock": FakeClock(start=sim_start)}
    running, ended, second = scenario(body, **sim_kwargs)
    assert running.status == "Running" and running.create_time == 1_750_000_000
    assert (ended.create_time, ended.update_time) == (1_750_000_000, 1_750_000_007)
    assert ended.update_time - ended.create_time == 7     # 6.5 s from .7 ends at 7.2
    assert second.status == "Success" and second.update_time == int(sim_start + 100 + 1.0)


def test_polls_after_the_final_status_are_recorded():
    async def body(sim, coze, clock):
        sim.script("t1", Script(duration=0, outcome="Fail", error_code="720701002"))
        sub = await coze.submit("wf", {"task_id": "t1"})
        for _ in range(3):
            status = await coze.poll("wf", sub.execute_id)
        return sim, sub.execute_id, status

    sim, execute_id, status = scenario(body)
    assert status.status == "Fail"
    assert sim.polls_after_final == {execute_id: 2}
    assert sim.task("t1").late_polls == 3


def test_fail_first_n_runs_then_success():
    async def body(sim, coze, clock):
        sim.script("t1", Script(duration=0, fail_first_n_runs=1, error_code="720701001",
                                node="plugin_7"))
        first = await coze.poll("wf", (await coze.submit("wf", {"task_id": "t1"})).execute_id)
        second = await coze.poll("wf", (await coze.submit("wf", {"task_id": "t1"})).execute_id)
        return sim, first, second

    sim, first, second = scenario(body)
    assert (first.status, first.error_code, first.node) == ("Fail", "720701001", "plugin_7")
    assert second.status == "Success"
    assert len(sim.task("t1").runs) == 2 and sim.task("t1").submits == 2


def test_submit_faults_come_in_order_and_are_counted():
    async def body(sim, coze, clock):
        sim.script("t1", Script(drop_connection_first_n=1, http_429_first_n=1, retry_after=5,
                                http_500_first_n=1, code_on_submit=4000,
                                code_on_submit_first_n=1))
        seen = []
        for _ in range(5):
            try:
                await coze.submit("wf", {"task_id": "t1"})
                seen.append("ok")
            except CozeNetworkError:
                seen.append("drop")
            except CozeError as err:
                seen.append((err.code, err.http_status, err.retry_after))
        return sim, seen

    sim, seen = scenario(body)
    assert seen == ["drop", ("4020", 429, 5.0), ("5000", 500, None), ("4000", 200, None), "ok"]
    assert sim.task("t1").submits == 5 and len(sim.task("t1").runs) == 1
    assert [r.status for r in sim.requests] == [599, 429, 500, 200, 200]


def test_peak_in_flight_and_tasks_without_task_id():
    async def body(sim, coze, clock):
        ids = [(await coze.submit("wf", {"n": i})).execute_id for i in range(3)]
        clock.advance(10)
        await coze.submit("wf", {"n": 3})
        return sim, ids

    sim, ids = scenario(body, default_duration=lambda task: 5.0)
    assert sim.peak_in_flight == 3 and sim.in_flight() == 1
    assert sorted(sim.tasks) == ["task-1", "task-2", "task-3", "task-4"]
    assert len(set(ids)) == 3 and all(i.isdigit() for i in ids)


def test_max_rps_over_clock_time():
    async def body(sim, coze, clock):
        for _ in range(4):
            await coze.submit("wf", {"task_id": "a"})
        clock.advance(1.0)
        for _ in range(2):
            await coze.submit("wf", {"task_id": "a"})
        return sim

    sim = scenario(body)
    assert sim.max_rps(1.0) == 4 and sim.max_rps(2.0) == 6


def test_global_switches_token_down_and_storm():
    async def body(sim, coze, clock):
        results = []
        sim.set_token_valid(False)
        with pytest.raises(CozeError) as info:
            await coze.submit("wf", {"task_id": "t"})
        results.append((info.value.code, info.value.http_status))
        sim.set_token_valid(True)
        sim.set_down(True)
        with pytest.raises(CozeNetworkError):
            await coze.submit("wf", {"task_id": "t"})
        sim.set_down(False)
        sim.storm_429(10, retry_after=3)
        with pytest.raises(CozeError) as info:
            await coze.poll("wf", "1")
        results.append((info.value.http_status, info.value.retry_after))
        clock.advance(10)
        await coze.submit("wf", {"task_id": "t"})
        return sim, results

    sim, results = scenario(body)
    assert results == [("4100", 401), (429, 3.0)]
    assert sim.task("t").submits == 1     # rejected requests never reached the task


def test_unknown_workflow_and_execution():
    async def body(sim, coze, clock):
        codes = []
        for call in (coze.submit("other", {"task_id": "t"}), coze.poll("wf", "123")):
            with pytest.raises(CozeError) as info:
                await call
            codes.append(info.value.code)
        return codes

    assert scenario(body, workflow_id="wf") == ["4200", "4314"]


def test_poll_500_first_n():
    async def body(sim, coze, clock):
        sim.script("t1", Script(duration=0, poll_500_first_n=1))
        sub = await coze.submit("wf", {"task_id": "t1"})
        with pytest.raises(CozeError) as info:
            await coze.poll("wf", sub.execute_id)
        return info.value.http_status, (await coze.poll("wf", sub.execute_id)).status

    assert scenario(body) == (500, "Success")


def test_bad_script_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown Script fields"):
        Script.from_dict({"outcome": "Fail", "duraton": 3})


def test_thread_mode_serves_a_synchronous_caller():
    sim = CozeSimulator(default_duration=0)
    base = sim.start_in_thread()
    try:
        request = urllib.request.Request(
            base + "/v1/workflow/run", method="POST",
            data=json.dumps({"workflow_id": "wf", "parameters": {"task_id": "x"},
                             "is_async": True}).encode(),
            headers={"Authorization": "Bearer sim-token", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.loads(resp.read())
            assert resp.headers["X-Tt-Logid"] == body["detail"]["logid"]
        assert body["code"] == 0 and body["execute_id"].isdigit()
        assert sim.task("x").submits == 1
    finally:
        sim.stop_thread()
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/_sim/stats", timeout=2)


def test_process_mode_with_a_script_file(tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"default_duration": 0,
                                  "tasks": {"t1": {"outcome": "Fail", "node": "n1"}}}))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.standins.simulator", "--port", "0",
                             "--script", str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening http://127.0.0.1:")
        base = line.split()[1]

        async def main():
            async with CozeClient(base, "sim-token") as coze:
                sub = await coze.submit("wf", {"task_id": "t1"})
                return await coze.poll("wf", sub.execute_id)

        status = asyncio.run(main())
        assert (status.status, status.node) == ("Fail", "n1")
        with urllib.request.urlopen(base + "/_sim/stats", timeout=5) as resp:
            stats = json.loads(resp.read())
        assert stats["tasks"]["t1"]["submits"] == 1 and stats["tasks"]["t1"]["polls"] == 1
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# -- accounts: each token is a Coze account with its own run and QPS limits -------------------

def accounts_scenario(body, accounts, **sim_kwargs):
    """Run ``body(sim, clients, clock)``; ``accounts`` maps token -> (max_runs, qps), the first
    being the simulator's own token; ``clients`` maps each token to a CozeClient using it."""
    clock = sim_kwargs.pop("clock", None) or FakeClock()
    (first, (runs, qps)), *others = accounts.items()

    async def main():
        sim = CozeSimulator(clock=clock, token=first, max_runs=runs, qps=qps, **sim_kwargs)
        for token, (more_runs, more_qps) in others:
            sim.add_account(token, max_runs=more_runs, qps=more_qps)
        base = await sim.start()
        clients = {token: CozeClient(base, token) for token in accounts}
        try:
            return await body(sim, clients, clock)
        finally:
            for client in clients.values():
                await client.close()
            await sim.stop()

    return asyncio.run(main())


async def _outcome(call):
    """"ok", or the refusal as (code, HTTP status, Retry-After)."""
    try:
        await call
        return "ok"
    except CozeError as err:
        return (err.code, err.http_status, err.retry_after)


def test_a_submit_over_the_accounts_run_limit_answers_4009_and_creates_nothing():
    async def body(sim, clients, clock):
        coze = clients["tok-a"]
        seen = [await _outcome(coze.submit("wf", {"task_id": f"t{i}"})) for i in range(3)]
        in_flight = sim.account_in_flight("tok-a")
        clock.advance(5)                      # the first two runs end
        seen.append(await _outcome(coze.submit("wf", {"task_id": "t2"})))
        return sim, seen, in_flight

    sim, seen, in_flight = accounts_scenario(body, {"tok-a": (2, None)},
                                             default_duration=5.0)
    assert seen == ["ok", "ok", ("4009", 200, None), "ok"]
    assert in_flight == 2
    assert sim.task("t2").submits == 2 and len(sim.task("t2").runs) == 1   # refused: no run
    stats = sim.account("tok-a")
    assert (stats.submits, stats.runs, stats.max_concurrent, stats.refused_run_limit) == \
        (4, 3, 2, 1)
    assert stats.workflows == {"wf": 3}


def test_run_limits_are_per_account():
    async def body(sim, clients, clock):
        seen = []
        for token in ("tok-a", "tok-b", "tok-a", "tok-b", "tok-c", "tok-c"):
            seen.append(await _outcome(clients[token].submit("wf", {})))
        return sim, seen

    sim, seen = accounts_scenario(
        body, {"tok-a": (1, None), "tok-b": (1, None), "tok-c": (None, None)},
        default_duration=60.0)
    refused = ("4009", 200, None)
    assert seen == ["ok", "ok", refused, refused, "ok", "ok"]
    assert [sim.account(t).max_concurrent for t in ("tok-a", "tok-b", "tok-c")] == [1, 1, 2]
    assert sim.peak_in_flight == 4


def test_requests_over_the_accounts_qps_answer_429_4020_without_reaching_a_task():
    async def body(sim, clients, clock):
        coze, other = clients["tok-a"], clients["tok-b"]
        sub = await coze.submit("wf", {"task_id": "t1"})
        seen = [await _outcome(coze.poll("wf", sub.execute_id)) for _ in range(3)]
        seen.append(await _outcome(other.submit("wf", {"task_id": "t2"})))  # its own budget
        clock.advance(0.999)                  # still inside the same second
        seen.append(await _outcome(coze.submit("wf", {"task_id": "t1"})))
        clock.advance(0.001)                  # the first request is a second old
        seen.append(await _outcome(coze.poll("wf", sub.execute_id)))
        return sim, seen

    sim, seen = accounts_scenario(body, {"tok-a": (None, 3), "tok-b": (None, 3)},
                                  default_duration=60.0)
    refused = ("4020", 429, None)
    assert seen == ["ok", "ok", refused, "ok", refused, "ok"]
    assert sim.task("t1").submits == 1 and sim.task("t1").polls == 3   # refusals never got there
    stats = sim.account("tok-a")
    assert (stats.requests, stats.refused_qps, stats.submits, stats.polls) == (6, 2, 1, 3)
    assert stats.max_rps() == 5           # what it sent in one second, refused ones included
    assert sim.account("tok-b").refused_qps == 0 and sim.account("tok-b").requests == 1


def test_refused_requests_do_not_spend_the_quota():
    async def body(sim, clients, clock):
        coze = clients["tok-a"]
        seen = []
        for _ in range(4):                   # 2 accepted, 2 refused, all at one instant
            seen.append(await _outcome(coze.submit("wf", {})))
        clock.advance(0.5)
        seen.append(await _outcome(coze.submit("wf", {})))   # both accepted ones still count
        clock.advance(0.5)
        seen += [await _outcome(coze.submit("wf", {})) for _ in range(3)]
        return seen

    refused = ("4020", 429, None)
    assert accounts_scenario(body, {"tok-a": (None, 2)}) == \
        ["ok", "ok", refused, refused, refused, "ok", "ok", refused]


def test_an_unknown_token_answers_401_4100_and_is_counted_apart():
    async def body(sim, clients, clock):
        async with CozeClient(sim.base_url, "pat_stranger") as stranger:
            seen = [await _outcome(stranger.submit("wf", {"task_id": "t"})),
                    await _outcome(stranger.poll("wf", "1"))]
        seen.append(await _outcome(clients["tok-a"].submit("wf", {"task_id": "t"})))
        return sim, seen

    sim, seen = accounts_scenario(body, {"tok-a": (1, 1)})
    assert seen == [("4100", 401, None), ("4100", 401, None), "ok"]
    assert sim.unknown_token_requests == 2
    assert set(sim.account_stats) == {"tok-a"} and sim.task("t").submits == 1
    assert sim.stats()["unknown_token_requests"] == 2


def test_a_run_is_polled_only_with_the_token_that_created_it():
    async def body(sim, clients, clock):
        sub = await clients["tok-a"].submit("wf", {"task_id": "t1"})
        seen = [await _outcome(clients["tok-b"].poll("wf", sub.execute_id)),
                await _outcome(clients["tok-a"].poll("wf", sub.execute_id))]
        return sim, seen

    sim, seen = accounts_scenario(body, {"tok-a": (None, None), "tok-b": (None, None)})
    assert seen == [("4101", 200, None), "ok"]
    assert sim.account("tok-b").refused_permission == 1
    assert sim.task("t1").polls == 1


def test_renaming_the_first_token_keeps_its_limits():
    sim = CozeSimulator(token="old", max_runs=3, qps=7)
    sim.token = "new"
    assert sim.token == "new" and set(sim.accounts) == {"new"}
    assert (sim.accounts["new"].max_runs, sim.accounts["new"].qps) == (3, 7)
    sim.add_account("new", max_runs=1)
    assert (sim.accounts["new"].max_runs, sim.accounts["new"].qps) == (1, None)


@pytest.mark.parametrize("bad", [{"max_runs": 0}, {"max_runs": 1.5}, {"max_runs": True},
                                 {"qps": 0}, {"qps": -1}, {"qps": "10"}, {"runs": 4}])
def test_bad_account_limits_are_refused(bad):
    from pipeline.standins.simulator import Account
    with pytest.raises(ValueError):
        Account.from_dict(bad)


def test_account_arguments_parse():
    from pipeline.standins.simulator import Account
    assert Account.parse("tok:4:10") == ("tok", Account(4, 10.0))
    assert Account.parse("tok::2.5") == ("tok", Account(None, 2.5))
    assert Account.parse("tok") == ("tok", Account(None, None))
    for bad in (":4:10", "tok:x", "tok:4:fast", "tok:0"):
        with pytest.raises(ValueError):
            Account.parse(bad)


_ops = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([0.0, 0.3, 1.0, 2.5])),
                min_size=1, max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_run_limit_and_recording_match_a_model(ops):
    """Random submits from two accounts with clock steps between them: which are refused, the
    most runs in flight and the most requests in a second are what a plain model says."""
    limits = {"a": 2, "b": 3}
    duration = 2.0

    async def body(sim, clients, clock):
        seen = []
        for token, step in ops:
            seen.append(await _outcome(clients[token].submit("wf", {})) == "ok")
            clock.advance(step)
        return sim, seen

    sim, seen = accounts_scenario(body, {t: (n, None) for t, n in limits.items()},
                                  default_duration=duration)
    now, ends = FakeClock().now(), {"a": [], "b": []}   # the same sums as the clock's
    peak, times, expected = {"a": 0, "b": 0}, {"a": [], "b": []}, []
    for token, step in ops:
        live = [e for e in ends[token] if e > now]
        ok = len(live) < limits[token]
        expected.append(ok)
        times[token].append(now)
        if ok:
            live.append(now + duration)
        ends[token] = live
        peak[token] = max(peak[token], len(live))
        now += step
    assert seen == expected
    for token in limits:
        stats = sim.account(token)
        assert stats.max_concurrent == peak[token] <= limits[token]
        assert stats.max_rps() == max((sum(1 for u in times[token] if 0 <= u - t < 1.0)
                                       for t in times[token]), default=0)
        assert stats.runs == sum(1 for (t, _), ok in zip(ops, expected) if t == token and ok)


def test_process_mode_accounts_from_arguments_and_script_file(tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"default_duration": 30,
                                  "accounts": {"tok-c": {"max_runs": 1}}}))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.standins.simulator", "--port", "0",
                             "--token", "tok-a", "--max-runs", "1", "--qps", "50",
                             "--account", "tok-b:2:", "--script", str(script)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        base = proc.stdout.readline().strip().split()[1]

        async def main():
            seen = []
            for token in ("tok-a", "tok-a", "tok-b", "tok-b", "tok-b", "tok-c", "tok-c", "x"):
                async with CozeClient(base, token) as coze:
                    seen.append(await _outcome(coze.submit("wf", {})))
            return seen

        seen = asyncio.run(main())
        refused = ("4009", 200, None)
        assert seen == ["ok", refused, "ok", "ok", refused, "ok", refused, ("4100", 401, None)]
        with urllib.request.urlopen(base + "/_sim/stats", timeout=5) as resp:
            accounts = json.loads(resp.read())["accounts"]
        assert {t: (a["max_runs"], a["qps"], a["runs"], a["max_concurrent"], a["max_rps"])
                for t, a in accounts.items()} == {"tok-a": (1, 50.0, 1, 1, 2),
                                                  "tok-b": (2, None, 2, 2, 3),
                                                  "tok-c": (1, None, 1, 1, 2)}
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_process_mode_refuses_a_bad_account_argument():
    proc = subprocess.run([sys.executable, "-m", "pipeline.standins.simulator",
                           "--account", "tok:many"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "bad account" in proc.stderr
