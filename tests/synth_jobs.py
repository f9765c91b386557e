"""Synthesis callables for tests (importable by the process pool's workers)."""
import os
import time


def slow_or_fast(task_key, params, coze_output, output_dir):
    if task_key == "slow":
        time.sleep(30)
    if task_key == "crash":
        os._exit(3)  # the worker process dies
    return {"ok": task_key}


def hang_or_wait(task_key, params, coze_output, output_dir):
    """Marks its start; ``hang`` never returns, the others return once ``go`` exists."""
    from pathlib import Path
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"started-{task_key}-{os.getpid()}").touch()
    if task_key == "hang":
        time.sleep(120)
    deadline = time.monotonic() + 20
    while not (out / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"ok": task_key, "pid": os.getpid()}
