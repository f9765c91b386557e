"""The Coze simulator: scripts, counters, fault injection, thread and process modes."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

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
