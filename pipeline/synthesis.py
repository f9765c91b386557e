"""The local post-processing stage (video synthesis), run off the event loop.

Three ways to configure it (``[pipeline] synthesis_command``):
- ``""`` (default): the built-in step, which checks the workflow output and writes a manifest of
  the generated assets (script text, video/image URLs) to ``<output_dir>/<batch>/<task>.json``.
- ``"module:function"``: a Python callable ``f(task_key: str, params: dict, coze_output: dict,
  output_dir: str) -> dict``, run in a process pool (``max_synthesis`` workers).
- anything else: a command line (split like a shell would, never run through a shell) with the
  placeholders ``{input}`` (a JSON file holding task, params and workflow output) and ``{output}``
  (the JSON file the command must write). Exit code 0 and the output file mean success.

Failures raise :class:`pipeline.errors.SynthesisError`, which the classifier sees like any error.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import re
import shlex
import signal
import tempfile
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

from .errors import SynthesisError

_URL = re.compile(r"https?://[^\s\"'<>]+")


def builtin_synthesize(task_key: str, params: dict, coze_output: Any, output_dir: str) -> dict:
    """Collect the workflow's assets into a manifest file; fail on an empty output."""
    if coze_output in (None, "", {}, []):
        raise SynthesisError("empty_output", "workflow returned no output to synthesise")
    text = coze_output if isinstance(coze_output, str) else json.dumps(coze_output,
                                                                         ensure_ascii=False)
    urls = sorted(set(_URL.findall(text)))
    manifest = {
        "task_id": task_key,
        "params": params,
        "assets": urls,
        "output": coze_output,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    path = Path(output_dir) / f"{_safe(task_key)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash never leaves half a manifest
    return {"manifest": str(path), "assets": len(urls)}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:100] or "task"


def load_callable(spec: str) -> Callable[..., dict]:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SynthesisError("config", f"cannot load synthesis callable {spec!r}: {exc}") from exc


class Synthesizer:
    """Runs the synthesis step with at most ``workers`` jobs at once."""

    def __init__(self, command: str = "", *, workers: int = 4, output_dir: str | Path = "var/output",
                 timeout: float = 600.0, executor: Executor | None = None) -> None:
        self.command = command.strip()
        self.output_dir = Path(output_dir)
        self.timeout = timeout
        self.semaphore = asyncio.Semaphore(workers)
        self._workers = workers
        self._executor = executor
        self._func: Callable[..., dict] | None = None
        if not self.command:
            self._func = builtin_synthesize
        elif re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", self.command):
            self._func = load_callable(self.command)

    def _pool(self) -> Executor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=self._workers)
        return self._executor

    async def run(self, batch_id: str, task_key: str, params: dict, coze_output: Any) -> dict:
        async with self.semaphore:
            out_dir = str(self.output_dir / _safe(batch_id))
            if self._func is not None:
                return await self._run_callable(task_key, params, coze_output, out_dir)
            return await self._run_command(task_key, params, coze_output, out_dir)

    async def _run_callable(self, task_key: str, params: dict, coze_output: Any,
                            out_dir: str) -> dict:
        loop = asyncio.get_running_loop()
        in_pool = self._func is not builtin_synthesize
        try:
            if in_pool:
                fut = loop.run_in_executor(self._pool(), self._func, task_key, params,
                                           coze_output, out_dir)
            else:  # cheap I/O: a thread is enough and avoids pickling to a process
                fut = loop.run_in_executor(None, self._func, task_key, params, coze_output,
                                           out_dir)
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            if in_pool:
                self._reset_pool()  # the job would go on holding a worker process
            raise SynthesisError("timeout", f"synthesis timed out after {self.timeout:.0f}s")
        except BrokenProcessPool as exc:
            self._reset_pool()
            raise SynthesisError("crashed", "a synthesis process died; the pool was restarted") \
                from exc
        except SynthesisError:
            raise
        except Exception as exc:  # the user's callable: any failure is a synthesis failure
            raise SynthesisError("error", f"{type(exc).__name__}: {exc}") from exc

    def _reset_pool(self) -> None:
        """Kill the pool's processes (a hung or dead job) and start a fresh pool next time."""
        pool, self._executor = self._executor, None
        if pool is None:
            return
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def _run_command(self, task_key: str, params: dict, coze_output: Any,
                           out_dir: str) -> dict:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="opsbot-synth-") as tmp:
            inp, outp = Path(tmp) / "input.json", Path(out_dir) / f"{_safe(task_key)}.json"
            inp.write_text(json.dumps({"task_id": task_key, "params": params,
                                       "output": coze_output}, ensure_ascii=False), "utf-8")
            argv = [a.replace("{input}", str(inp)).replace("{output}", str(outp))
                    for a in shlex.split(self.command)]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    start_new_session=True)
            except OSError as exc:
                raise SynthesisError("config", f"cannot start {argv[0]!r}: {exc}") from exc
            try:
                _, err = await asyncio.wait_for(proc.communicate(), self.timeout)
            except asyncio.TimeoutError:
                await _kill(proc)
                raise SynthesisError("timeout", f"synthesis timed out after {self.timeout:.0f}s")
            except asyncio.CancelledError:  # batch cancelled, lease lost, shutdown
                await _kill(proc)
                raise
            if proc.returncode != 0:
                tail = err.decode("utf-8", "replace").strip()[-300:]
                raise SynthesisError("exit", f"exit code {proc.returncode}: {tail}")
            if not outp.exists():
                raise SynthesisError("no_output", f"the command wrote no {outp.name}")
            return {"manifest": str(outp)}

    def close(self) -> None:
        """Stop the pool without waiting for jobs (their tasks are handed back)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the command and everything it started (its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()
