"""Run times: learned exactly from Coze's create_time / update_time, kept per workflow in the store.

The worker tests share a :class:`FakeClock` with the simulator and run one task at a time, so
every run's true start, end and polls are known exactly.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.clock import FakeClock
from pipeline.config import PipelineConfig, PollPolicy
from pipeline.coze import CozeClient
from pipeline.runtimes import KEEP, RunTimeBook, RunTimeModel, run_seconds
from pipeline.standins.simulator import CozeSimulator
from pipeline.worker import Worker
from storage import queue, runtimes as stored
from storage.db import apply_migrations, open_db, schema_version
from storage.migrations import MIGRATIONS

ONE_AT_A_TIME = PipelineConfig(max_coze=1, max_synthesis=1, coze_qps=10_000, lease_seconds=30,
                               idle_interval=0.01, skip_synthesis=True)


# -- one run's time --------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(start=st.floats(1_700_000_000, 1_700_100_000), duration=st.floats(0.05, 900),
       lag=st.floats(0, 0.5), first=st.floats(0.1, 1200), step=st.floats(0.1, 60),
       with_coze=st.booleans())
def test_run_seconds_lies_within_what_was_seen(start, duration, lag, first, step, with_coze):
    """Whatever the poll schedule, the estimate respects every bound, and with Coze's times it
    is within a second of the truth (they are whole seconds)."""
    sent = start - lag                     # the submit went out, Coze started the run...
    answered = start + lag                 # ...and its answer came back
    end = start + duration
    polls = [sent + first]
    while polls[-1] < end:
        polls.append(polls[-1] + step)
    running = [p for p in polls if p < end]
    est = run_seconds(create_time=math.floor(start) if with_coze else None,
                      update_time=math.floor(end) if with_coze else None,
                      submit_sent=sent, submit_answered=answered,
                      running_sent=running[-1] if running else None, end_seen=polls[-1])
    lo = max(0.0, running[-1] - answered) if running else 0.0
    assert est is not None and lo - 1e-6 <= est <= polls[-1] - sent + 1e-6
    if with_coze:
        assert abs(est - duration) < 1.0 + 1e-6


def test_a_run_seen_ended_by_the_first_poll_is_not_taken_for_half_its_time():
    """The censoring case: the first poll, 20 s after submit, sees a 6.4 s run ended."""
    start = 1_750_000_000.3
    est = run_seconds(create_time=math.floor(start), update_time=math.floor(start + 6.4),
                      submit_sent=start, submit_answered=start, running_sent=None,
                      end_seen=start + 20)
    assert abs(est - 6.4) < 1.0
    # without Coze's times only the poll bounds are left: their midpoint
    assert run_seconds(create_time=None, update_time=None, submit_sent=start,
                       submit_answered=start, running_sent=None, end_seen=start + 20) == 10.0


def test_coze_times_that_contradict_the_polls_are_not_trusted():
    # Coze says 50 s, but the run was seen Running 10 s in and ended by 12 s
    est = run_seconds(create_time=100, update_time=150, submit_sent=0.0, submit_answered=0.1,
                      running_sent=10.0, end_seen=12.0)
    assert 9.9 <= est <= 12.0
    # update before create, or missing: the polls decide
    assert run_seconds(create_time=150, update_time=100, submit_sent=0.0, submit_answered=0.0,
                       running_sent=4.0, end_seen=6.0) == 5.0
    # a sub-second run: whole seconds say 0 or 1, the polls 0.41-0.61 s; not an edge of that
    for update in (100, 101):
        est = run_seconds(create_time=100, update_time=update, submit_sent=0.0,
                          submit_answered=0.0, running_sent=0.41, end_seen=0.61)
        assert 0.46 < est < 0.56, (update, est)
    # a resumed run (submit time unknown) seen ended at once: nothing bounds it, not learned
    assert run_seconds(create_time=None, update_time=None, submit_sent=None,
                       submit_answered=0.0, running_sent=None, end_seen=9.0) is None
    # with Coze's times it is
    assert run_seconds(create_time=0, update_time=8, submit_sent=None,
                       submit_answered=0.0, running_sent=None, end_seen=9.0) == pytest.approx(8.0)


# -- the model ---------------------------------------------------------------------------------

def test_model_floor_scales_with_run_times():
    short = RunTimeModel.fit([3.0, 4.0, 5.0, 4.0, 3.5, 4.5, 4.2, 3.8], 0.03)
    long = RunTimeModel.fit([60.0, 80.0, 70.0, 65.0, 75.0, 90.0, 55.0, 72.0], 0.03)
    assert short.floor < 0.2 < 1.0 < long.floor
    assert RunTimeBook(lambda wf: []).model("wf", target=0.03, max_poll_rate=0,
                                            min_samples=8) is None


# -- the store ---------------------------------------------------------------------------------

def test_stored_run_times_are_bounded_per_workflow(db):
    for i in range(KEEP + 50):
        stored.record(db, "wf-a", float(i), now=i, keep=KEEP)
    stored.record(db, "wf-b", 7.0, now=0, keep=KEEP)
    a = stored.load(db, "wf-a", limit=KEEP)
    assert len(a) == KEEP and a[0] == 50.0 and a[-1] == KEEP + 49.0   # the newest, in order
    assert stored.load(db, "wf-b", limit=KEEP) == [7.0]
    assert db.execute("SELECT COUNT(*) FROM run_times").fetchone()[0] == KEEP + 1
    assert stored.load(db, "never-seen", limit=KEEP) == []


@pytest.mark.empty_database
def test_the_migration_applies_to_a_store_of_the_previous_version(db_path):
    from tests.helpers import store_at_version

    old = store_at_version(db_path, len(MIGRATIONS) - 1)
    old.execute("INSERT INTO breakers (service, state, failures, successes, updated_at)"
                " VALUES ('coze', 'open', 5, 0, 1)")
    old.conn.close()
    db = open_db(db_path, migrate=False)
    assert apply_migrations(db) == schema_version(db) == len(MIGRATIONS)
    assert db.execute("SELECT submit_failures FROM breakers").fetchone()[0] == 0
    stored.record(db, "wf", 3.0, now=0, keep=KEEP)
    db.conn.close()


# -- the worker --------------------------------------------------------------------------------

async def _batch_on_fake_clock(db, sim, clock, keys, config, prefix):
    batch = queue.create_batch(db, [{"task_key": f"{prefix}{k}"} for k in keys],
                               now=clock.now(), source="cli")
    async with CozeClient(sim.base_url, sim.token) as coze:
        worker = Worker(db, config, coze, "wf1", clock=clock)
        await asyncio.wait_for(worker.run(drain=True), 60)
    return batch, worker


def _polls_of(sim, execute_id):
    return [r.time for r in sim.requests if r.path.endswith(f"/run_histories/{execute_id}")]


def test_a_run_that_ended_before_the_first_poll_is_learned_at_its_true_time(db):
    """The first poll comes 20 s after submit; the runs took 6.5 s. Midpoints said 10 s."""
    clock = FakeClock(start=1_750_000_000.7)   # runs start and end off the whole second
    cfg = dataclasses.replace(ONE_AT_A_TIME, poll=PollPolicy(first=20, multiplier=1.5,
                                                             maximum=30))

    async def go():
        sim = CozeSimulator(clock=clock, default_duration=6.5)
        await sim.start()
        try:
            return sim, await _batch_on_fake_clock(db, sim, clock, range(3), cfg, "t")
        finally:
            await sim.stop()

    sim, (batch, worker) = asyncio.run(go())
    assert queue.batch_counts(db, batch)["succeeded"] == 3
    for row in queue.tasks_of(db, batch):     # each run was polled once, 20 s in
        assert len(_polls_of(sim, row["execute_id"])) == 1
    learned = list(worker.runtimes.samples("wf1"))
    assert len(learned) == 3 and all(abs(s - 6.5) < 1.0 for s in learned), learned
    assert stored.load(db, "wf1", limit=KEEP) == learned      # and they are in the store


def test_a_new_worker_starts_from_the_run_times_an_earlier_one_learned(db):
    """Batch 1 (cold) polls from 1 s on; batch 2, run by a new worker on the same store, waits
    until runs of this workflow are likely to have ended. A workflow never seen starts cold."""
    clock = FakeClock(start=1_750_000_000.0)
    cfg = dataclasses.replace(ONE_AT_A_TIME, poll=PollPolicy())   # the default: 1 s, x1.5

    async def go():
        sim = CozeSimulator(clock=clock, default_duration=lambda key: 30.0 + (hash(key) % 7))
        await sim.start()
        try:
            first, _ = await _batch_on_fake_clock(db, sim, clock, range(8), cfg, "a")
            second, worker = await _batch_on_fake_clock(db, sim, clock, range(4), cfg, "b")
            return sim, first, second, worker
        finally:
            await sim.stop()

    sim, first, second, worker = asyncio.run(go())

    def first_polls(batch):
        return [_polls_of(sim, r["execute_id"])[0] - r["submitted_at"]
                for r in queue.tasks_of(db, batch)]

    def polls(batch):
        return sum(len(_polls_of(sim, r["execute_id"])) for r in queue.tasks_of(db, batch))

    assert max(first_polls(first)) <= 1.0 + 1e-6          # cold: the first poll after 1 s
    assert min(first_polls(second)) > 20.0                # warm: not before runs can end
    assert polls(second) / 4 < polls(first) / 8
    model = worker._run_time_model("wf1")
    assert model is not None and 29 < model.median < 38
    assert worker._run_time_model("wf-never-seen") is None   # still cold
    assert worker._poll_delay(0.0, 0, "wf-never-seen") == cfg.poll.first


def test_two_opsbot_runs_on_one_store_share_what_they_learned(tmp_path, db_path):
    """`opsbot run` keeps the run times it learned; the next `opsbot run` loads them."""
    from tests.test_cli_run import _env, _opsbot

    env = _env(tmp_path, db_path)
    for name, n in (("first", 8), ("second", 4)):
        csv = tmp_path / f"{name}.csv"
        csv.write_text("task_id\n" + "".join(f"{name}{i}\n" for i in range(n)), encoding="utf-8")
        proc = _opsbot(["run", str(csv), "--simulate", "--results", str(tmp_path / "r.json")],
                       env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        db = open_db(db_path)
        try:
            learned = stored.load(db, "sim-workflow", limit=KEEP)
        finally:
            db.conn.close()
        assert len(learned) == (8 if name == "first" else 12)
        # the simulator's runs take 0.5 s; the polls (at most 0.2 s apart) bound the estimate
        assert all(0.2 < s < 0.8 for s in learned), learned


def test_run_times_older_than_two_weeks_do_not_warm_a_new_worker(db):
    """A workflow edited since runs differently: month-old run times must not place its polls."""
    day = 86400.0
    now = 1_750_000_000.0
    for i in range(20):
        stored.record(db, "wf1", 600.0 + i, now=now - 30 * day, keep=KEEP)
    for i in range(3):
        stored.record(db, "wf1", 5.0, now=now - 1 * day, keep=KEEP)
    assert stored.load(db, "wf1", limit=KEEP, since=now - stored.MAX_AGE) == [5.0] * 3
    assert len(stored.load(db, "wf1", limit=KEEP)) == 23
    worker = Worker(db, dataclasses.replace(ONE_AT_A_TIME, poll=PollPolicy()), None, "wf1",
                    clock=FakeClock(start=now))
    assert worker._run_time_model("wf1") is None          # cold again: 3 recent samples only
    assert worker._poll_delay(0.0, 0, "wf1") == 1.0


def test_the_first_poll_waits_at_most_a_few_poll_maxima_whatever_was_learned(db):
    """Runs used to take 10 minutes; a run that now fails at 5 s is noticed within 3 x the
    poll maximum, not minutes late."""
    now = 1_750_000_000.0
    for i in range(40):
        stored.record(db, "wf1", 600.0 + (i % 7) * 10, now=now - 3600, keep=KEEP)
    poll = PollPolicy(first=1.0, multiplier=1.5, maximum=10.0)
    worker = Worker(db, dataclasses.replace(ONE_AT_A_TIME, poll=poll), None, "wf1",
                    clock=FakeClock(start=now))
    model = worker._run_time_model("wf1")
    assert model is not None and model.early > 300
    waits, elapsed = [], 0.0
    while elapsed < model.early:
        wait = worker._poll_delay(elapsed, len(waits), "wf1")
        waits.append(wait)
        elapsed += wait
    assert waits[0] <= 3 * poll.maximum + 1e-9 and max(waits) <= 3 * poll.maximum + 1e-9
    assert len(waits) <= model.early / (3 * poll.maximum) + 2   # still few polls before then


@pytest.mark.parametrize("raw, seconds", [
    (1730174063, 1730174063.0), ("1730174063", 1730174063.0),
    (1730174063123, 1730174063.123), (1730174063123456, 1730174063.123456),
    (1730174063123456789, 1730174063.1234567),
])
def test_coze_timestamps_in_seconds_millis_or_micros_read_as_seconds(raw, seconds):
    from pipeline.coze import _unix_seconds
    assert _unix_seconds(raw) == pytest.approx(seconds, abs=1e-3)
