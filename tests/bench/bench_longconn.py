"""Long connection (FEISHU_CONNECTION=ws): answer latency, and whether the worker's loop starves.

The real lark-oapi ``ws.Client`` (our :class:`bot.feishu.longconn.LongConnection`) against the stand-in
(:mod:`bot.standins.fake_feishu_ws`) on loopback. A coroutine on "the worker's loop" (this process's main
asyncio loop) sleeps 10 ms at a time and records how late each wake-up is, first while the
connection is idle, then while the stand-in pushes N message events and N button presses one
after the other, each waiting for its answer frame. Prints answer latencies (frame sent -> answer
received, as the stand-in measures them) and the wake-up lag of the worker's loop in both phases.

    python -m tests.bench.bench_longconn [--events 300]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bot.standins.events import ADMIN, card_action_event, message_event
from bot.standins.fake_feishu import FakeFeishu
from bot.standins.fake_feishu_ws import FakeFeishuWS
from bot.feishu.longconn import LongConnection
from bot.settings import Settings
from storage.db import open_db


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def lag_probe(stop: asyncio.Event, lags: list[float], step: float = 0.01) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(step)
        lags.append(time.perf_counter() - t - step)


def fmt(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"n={len(ms)} p50 {statistics.median(ms):.1f} ms, p99 {pct(ms, 99):.1f} ms, "
            f"max {max(ms):.1f} ms")


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, FakeFeishu() as fake, FakeFeishuWS(fake) as ws:
        db_path = Path(tmp) / "bench.db"
        open_db(db_path).conn.close()
        settings = Settings(feishu=fake.settings(connection="ws", admin_ids=(ADMIN,)),
                            db_path=db_path)
        conn = LongConnection(settings)
        conn.start()
        await asyncio.to_thread(ws.wait_connected, 1, 60)

        stop, idle = asyncio.Event(), []
        probe = asyncio.create_task(lag_probe(stop, idle))
        await asyncio.sleep(3)
        stop.set()
        await probe

        stop, busy = asyncio.Event(), []
        probe = asyncio.create_task(lag_probe(stop, busy))

        def push() -> tuple[list[str], list[str]]:
            msgs, cards = [], []
            for i in range(n):
                event = message_event("status", message_id=f"om_b{i}")
                for _ in range(2):  # new, then the same message again
                    mid = ws.send_event(event)
                    ws.wait_answer(mid, 10)
                    msgs.append(mid)
            for _ in range(n):
                mid = ws.send_event(card_action_event({"action": "status", "batch_id": "none"}))
                ws.wait_answer(mid, 10)
                cards.append(mid)
            return msgs, cards

        started = time.perf_counter()
        msgs, cards = await asyncio.to_thread(push)
        elapsed = time.perf_counter() - started
        stop.set()
        await probe
        await asyncio.to_thread(conn.stop, 10)

        message_lat = [ws.answers[m]["latency"] for m in msgs]
        card_lat = [ws.answers[m]["latency"] for m in cards]
        late = sum(1 for m in cards if ws.answers[m]["late"])
        print(f"events: {len(msgs)} message frames (each message twice: new, then again), "
              f"{len(cards)} button presses, in {elapsed:.1f} s")
        print(f"message answer latency: {fmt(message_lat)}")
        print(f"button answer latency:  {fmt(card_lat)}; later than 3 s: {late}")
        print(f"worker loop wake-up lag, connection idle: {fmt(idle)}")
        print(f"worker loop wake-up lag, under load:      {fmt(busy)}")
        db = open_db(db_path, migrate=False)
        print("inbox rows:", db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0],
              f"(expected {n + n}: {n} messages, {n} button presses)")
        db.conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300)
    asyncio.run(main(parser.parse_args().events))
