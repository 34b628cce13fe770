"""A process that imports every stage's code once, then forks one child per stage run.

The fault tests kill stages with SIGKILL at chosen points of their work. Started fresh, a stage
script spends its first seconds importing torch and transformers; forking from a process that
has imported them already puts every kill point inside the stage's own work and keeps a trial
under a second or two. The server is single-threaded (nothing here starts a thread before a
fork), reads one JSON request a line on stdin and answers on stdout:

  {"argv": ["scripts/train.py", ...], "cwd": "/work/t1", "log": "/work/t1/train.log"}
  -> {"pid": 1234}                     as soon as the child runs (the test may kill it)
  -> {"pid": 1234, "status": 9, "signal": true, "seconds": 1.7}   when it has ended
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(REPO, "scripts")]

import peft  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import tunedag.data.download  # noqa: E402,F401
import tunedag.data.tokenize  # noqa: E402,F401
import tunedag.evaluate.compare  # noqa: E402,F401
import tunedag.export.gguf  # noqa: E402,F401
import tunedag.export.vllm  # noqa: E402,F401
import tunedag.merge.adapter  # noqa: E402,F401
import tunedag.models.builtin  # noqa: E402,F401
import tunedag.train.loop  # noqa: E402,F401


def run_child(request: dict) -> None:
    """In the forked child: the stage script as ``python -P script args`` would run it."""
    os.chdir(request["cwd"])
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.argv = list(request["argv"])
    code = 0
    try:
        runpy.run_path(os.path.join(REPO, request["argv"][0]), run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            run_child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        print(json.dumps({"pid": pid, "signal": killed,
                          "status": os.WTERMSIG(status) if killed else os.WEXITSTATUS(status),
                          "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main()
