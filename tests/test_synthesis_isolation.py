"""A hung synthesis job fails only itself (issue 9.5).

Four workers run a job that hangs and three healthy jobs that are mid-run when the hung one
times out. Before the fix, the timeout reset the shared process pool and killed the healthy
jobs with it (they failed as ``crashed``); now each job has its own process.
"""
from __future__ import annotations

import asyncio
import os

from pipeline.synthesis import Synthesizer


def test_a_hung_job_times_out_alone_while_three_healthy_jobs_finish(tmp_path):
    out = tmp_path / "b"

    async def go():
        synth = Synthesizer("tests.synth_jobs:hang_or_wait", workers=4, output_dir=tmp_path,
                            timeout=3.0)
        try:
            hung = asyncio.create_task(synth.run("b", "hang", {}, {"x": 1}))
            await asyncio.sleep(1.0)
            healthy = [asyncio.create_task(synth.run("b", f"ok{i}", {}, {"x": i}))
                       for i in range(3)]
            try:
                await hung
            except Exception as exc:  # noqa: BLE001 - asserted below
                hung_error = exc
            else:
                hung_error = None
            started = sorted(p.name.split("-")[1] for p in out.glob("started-*"))
            (out / "go").touch()          # the healthy jobs may finish now
            results = await asyncio.gather(*healthy, return_exceptions=True)
            return hung_error, started, results
        finally:
            synth.close()

    hung_error, started, results = asyncio.run(go())
    assert getattr(hung_error, "code", None) == "timeout", hung_error
    # the healthy jobs were running when the hung one was killed ...
    assert started == ["hang", "ok0", "ok1", "ok2"]
    # ... and they finished and succeeded, each in the process it started in
    assert all(isinstance(r, dict) for r in results), results
    assert [r["ok"] for r in results] == ["ok0", "ok1", "ok2"]
    for r in results:
        assert os.path.exists(out / f"started-{r['ok']}-{r['pid']}")
    assert len(list(out.glob("started-*"))) == 4  # nobody was started twice


def test_a_crashing_job_is_reported_and_its_neighbour_succeeds(tmp_path):
    async def go():
        synth = Synthesizer("tests.synth_jobs:slow_or_fast", workers=2, output_dir=tmp_path,
                            timeout=20.0)
        try:
            return await asyncio.gather(synth.run("b", "crash", {}, {}),
                                        synth.run("b", "fine", {}, {}), return_exceptions=True)
        finally:
            synth.close()

    crashed, fine = asyncio.run(go())
    assert getattr(crashed, "code", None) == "crashed"
    assert fine == {"ok": "fine"}
