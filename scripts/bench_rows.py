"""One benchmark row in its own process: the child prints ``RESULT <json>``, the parent reads the last such line.

Every row of bench_train.py and bench_full_finetune.py runs this way: Liger and Unsloth patch transformers in
place, and peak GPU memory is a process's own.
"""
from __future__ import annotations

import json
import os
import subprocess

RESULT_PREFIX = "RESULT "


def print_result(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_row(cmd: list[str], timeout: float, row: dict) -> dict:
    """The result the child ``cmd`` printed, or ``row`` (what names it) with the error: its output's tail, or
    the timeout and what it had printed by then."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {**row, "error": f"timeout ({timeout:.0f} s)", "stdout": out[-400:]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        return json.loads(lines[-1][len(RESULT_PREFIX):])
    return {**row, "error": (proc.stderr or proc.stdout)[-1500:]}
