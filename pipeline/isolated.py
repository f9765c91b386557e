"""Run a synthesis callable in a process of its own, so a hung or crashed job harms only itself.

A shared process pool cannot stop one job: ``concurrent.futures`` has no way to kill the
worker running a given future, so a timeout meant killing the whole pool and every healthy
job in it. Here each job gets its own process (forked from a clean ``forkserver`` process
where the platform has one, else spawned), in its own session: a timeout or a cancellation
kills that session (the job and anything it started) and nothing else.

The callable must be importable (``module:function``); its arguments and result travel
pickled through a pipe. A process that dies without answering is reported as ``crashed``.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .errors import SynthesisError

__all__ = ["IsolatedRunner"]


def _child(func: Callable[..., Any], args: tuple, conn: Any) -> None:
    os.setsid()  # its own session: killing it kills what it started too
    try:
        try:
            conn.send(("ok", func(*args)))
        except SynthesisError as exc:
            conn.send(("synthesis", exc.code, exc.message))
        except BaseException as exc:  # noqa: BLE001 - the user's callable: report, don't die
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _receive(conn: Any) -> tuple:
    """Wait for the child's answer; EOF (the child died or was killed) is ``("died",)``."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return ("died",)
    finally:
        conn.close()


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class IsolatedRunner:
    """Runs callables, each in its own process; at most ``workers`` threads wait on them."""

    def __init__(self, workers: int) -> None:
        self._threads = ThreadPoolExecutor(max_workers=max(1, workers) * 2,
                                           thread_name_prefix="synthesis")
        self._procs: set[Any] = set()
        self._ctx = _context()

    async def run(self, func: Callable[..., Any], args: tuple, timeout: float) -> Any:
        """``func(*args)`` in a new process; :class:`SynthesisError` ``timeout``, ``crashed``
        or ``error`` (with the callable's exception), or the callable's own SynthesisError."""
        loop = asyncio.get_running_loop()
        recv, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_child, args=(func, args, send), daemon=False)
        try:
            await loop.run_in_executor(self._threads, proc.start)
        finally:
            send.close()
        self._procs.add(proc)
        try:
            answer = await asyncio.wait_for(loop.run_in_executor(self._threads, _receive, recv),
                                            timeout)
        except asyncio.TimeoutError:
            _kill(proc)
            raise SynthesisError("timeout", f"synthesis timed out after {timeout:g}s; only this "
                                            "job was stopped") from None
        except BaseException:  # cancelled (batch stopped, lease lost, shutdown)
            _kill(proc)
            raise
        finally:
            self._procs.discard(proc)
            loop.run_in_executor(self._threads, proc.join, 5)
        if answer[0] == "ok":
            return answer[1]
        if answer[0] == "synthesis":
            raise SynthesisError(answer[1], answer[2])
        if answer[0] == "error":
            raise SynthesisError("error", answer[1])
        raise SynthesisError("crashed", f"the synthesis process died (exit code "
                                        f"{_exitcode(proc)}); other jobs were not touched")

    def close(self) -> None:
        """Kill every running job (their tasks are handed back) and stop the threads."""
        for proc in list(self._procs):
            _kill(proc)
        self._threads.shutdown(wait=False, cancel_futures=True)


def _kill(proc: Any) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, TypeError):
        try:
            proc.kill()
        except (ProcessLookupError, ValueError, AttributeError):
            pass


def _exitcode(proc: Any) -> Any:
    proc.join(1)
    return proc.exitcode
