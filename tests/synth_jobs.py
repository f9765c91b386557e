"""Synthesis callables for tests (importable by the process pool's workers)."""
import os
import time


def slow_or_fast(task_key, params, coze_output, output_dir):
    if task_key == "slow":
        time.sleep(30)
    if task_key == "crash":
        os._exit(3)  # the worker process dies
    return {"ok": task_key}
