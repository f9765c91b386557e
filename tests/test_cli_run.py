"""`opsbot run FILE`: batch files, include/exclude, the seeds' config, progress, results, exit code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.batchfile import BatchFileError, read_batch_file, select
from pipeline.runner import seeds_config
from storage.db import open_db, schema_version

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path, db_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEISHU_", "COZE_",
                                                                       "OPSBOT_", "BITABLE_"))}
    cfg = tmp_path / "fast.toml"
    cfg.write_text("[pipeline]\nidle_interval = 0.02\n[pipeline.poll]\nfirst = 0.05\n"
                   "maximum = 0.2\n", encoding="utf-8")
    env.update(OPSBOT_DB=str(db_path), OPSBOT_CONFIG=str(cfg), PYTHONPATH=str(ROOT),
               **extra)
    return env


def _opsbot(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "bot.ops.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_run_a_csv_against_the_simulator_writes_results_and_exits_0(tmp_path, db_path):
    csv = tmp_path / "batch.csv"
    csv.write_text("task_id,topic,style\na1,猫,短视频\na2,狗,长视频\na3,鱼,短视频\n",
                   encoding="utf-8")
    results = tmp_path / "results.json"
    proc = _opsbot(["run", str(csv), "--simulate", "--exclude", "a3", "--results", str(results)],
                   _env(tmp_path, db_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 succeeded, 0 failed" in proc.stdout
    assert "2/2" in proc.stderr                                # the progress line
    doc = json.loads(results.read_text(encoding="utf-8"))
    assert [t["task_id"] for t in doc["tasks"]] == ["a1", "a2"]
    first = doc["tasks"][0]
    assert first["status"] == "succeeded" and first["attempts"] == 1
    assert first["execute_id"] and first["timings"]["coze_seconds"] is not None
    assert first["output"]["synthesis"]["manifest"]


def test_run_without_a_coze_account_says_what_to_set(tmp_path, db_path):
    csv = tmp_path / "b.csv"
    csv.write_text("task_id\nx\n", encoding="utf-8")
    proc = _opsbot(["run", str(csv)], _env(tmp_path, db_path), tmp_path)
    assert proc.returncode == 2
    assert "COZE_API_TOKEN" in proc.stderr and "--simulate" in proc.stderr


def test_run_reads_the_seeds_json_config(tmp_path):
    cfg = tmp_path / "seeds.json"
    cfg.write_text(json.dumps({"workflow_config": {
        "coze_config": {"token": "sim-token", "workflow_id": "wf_seed"},
        "max_coze_concurrent": 2, "max_synthesis_workers": 1, "poll_interval": 0.2}}),
        encoding="utf-8")
    assert seeds_config(cfg) == {"token": "sim-token", "workflow_id": "wf_seed", "max_coze": 2,
                                 "max_synthesis": 1, "poll_first": 0.2}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"workflow_config": {"max_coze_concurrent": "lots"}}))
    with pytest.raises(BatchFileError, match="max_coze_concurrent"):
        seeds_config(bad)


def test_failed_tasks_make_the_exit_code_non_zero(tmp_path, db_path):
    """A task the simulator fails twice (plugin timeout) fails; the others still deliver."""
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"task_id": "ok1"}\n{"task_id": "bad1"}\n', encoding="utf-8")
    # the CLI's --simulate uses an unscripted simulator, so drive run_batch (what the CLI
    # calls) directly against a scripted one
    import asyncio

    from bot.settings import load_settings
    from pipeline.runner import run_batch
    from pipeline.standins.simulator import CozeSimulator, Script

    settings = load_settings(_env(tmp_path, db_path))

    async def go():
        sim = CozeSimulator(default_duration=0.05)
        sim.script("bad1", Script(outcome="Fail", duration=0.05))
        await sim.start()
        try:
            return await run_batch(open_db(settings.db_path), settings.pipeline,
                                   tasks=read_batch_file(jsonl), coze_base_url=sim.base_url,
                                   coze_token=sim.token, workflow_id="wf",
                                   results_path=tmp_path / "r.json")
        finally:
            await sim.stop()

    result = asyncio.run(go())
    assert result.exit_code == 1
    assert result.counts["succeeded"] == 1 and result.counts["failed"] == 1
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    bad = [t for t in doc["tasks"] if t["task_id"] == "bad1"][0]
    assert bad["error_class"] == "plugin_timeout" and bad["error_code"] == "720701002"
    assert bad["resubmits"] == 1


@pytest.mark.parametrize("name, content, needle", [
    ("a.csv", "topic\nx\n", "needs a task_id column"),
    ("a.csv", "task_id,topic\n,x\n", "a.csv:2: task_id is empty"),
    ("a.csv", "task_id,topic\nx,1\nx,2\n", "appears twice"),
    ("a.csv", "task_id\n", "no tasks"),
    ("a.csv", "task_id,topic\nx,1,extra\n", "more values than header"),
    ("a.jsonl", '{"task_id": "x"}\n{broken\n', "a.jsonl:2: not valid JSON"),
    ("a.jsonl", '["task_id"]\n', "must be a JSON object"),
])
def test_bad_batch_files_are_refused_with_the_line(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BatchFileError) as err:
        read_batch_file(path)
    assert needle in str(err.value)


@pytest.mark.empty_database
def test_bad_file_via_cli_exits_2_and_queues_nothing(tmp_path, db_path):
    path = tmp_path / "a.csv"
    path.write_text("topic\nx\n", encoding="utf-8")
    env = _env(tmp_path, db_path)
    proc = _opsbot(["run", str(path), "--simulate"], env, tmp_path)
    assert proc.returncode == 2 and "task_id column" in proc.stderr
    store = open_db(db_path, migrate=False)
    assert schema_version(store) == 0          # the store was never opened, nothing queued
    store.conn.close()


def test_include_exclude_select_and_reject_unknown_ids():
    tasks = [{"task_key": k, "params": {}} for k in ("a", "b", "c")]
    assert [t["task_key"] for t in select(tasks, ["a,c"], None)] == ["a", "c"]
    assert [t["task_key"] for t in select(tasks, None, ["b"])] == ["a", "c"]
    with pytest.raises(BatchFileError, match="unknown task_id.*zz"):
        select(tasks, ["zz"], None)


def test_worker_without_a_coze_account_says_what_to_set(tmp_path, db_path):
    proc = _opsbot(["worker", "--drain"], _env(tmp_path, db_path), tmp_path)
    assert proc.returncode == 2
    assert "COZE_API_TOKEN" in proc.stderr and "--simulate" in proc.stderr


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path, db_path):
    proc = _opsbot(["report"], _env(tmp_path, db_path, OPSBOT_TIMEZONE="Mars/Base"), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "opsbot: configuration error: OPSBOT_TIMEZONE: 'Mars/Base' is not an IANA time zone "
        "(e.g. Asia/Shanghai)"]
