"""Kill -9 at points of every stage, run the stage again, and nothing is lost or stale.

A tiny run goes through every stage once, uninterrupted: the reference. Then, for each stage
and each kill point (a share of that stage's measured run time), a copy of the workspace
without that stage's outputs runs the stage, the stage is killed with SIGKILL at that point,
and the same command runs again, as Snakemake reruns a failed job. The outputs must equal the
reference byte for byte (JSON records without their clock readings: train's tokens/s and
elapsed time, download's time of writing; train_info.json's results, not where it resumed
from), and no temporary file may be left anywhere.

CI runs 32 trials (``pytest tests/faults``); ``-m faults_long`` runs 4 times as many points.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.helpers import sample_rows, write_jsonl

SERVER = Path(__file__).with_name("stage_server.py")
RUN = "t"
MODEL = "models/builtin/tiny-llama"
STAGES = {  # stage: (script and arguments, outputs)
    "download_model": (["scripts/download_model.py", "--base-model", "builtin:tiny-llama", "--out", MODEL], [MODEL]),
    "download": (["scripts/download.py", "--config", "config.yaml", "--run", RUN, "--dataset", "animals",
                  "--out", "data/raw/animals"], ["data/raw/animals"]),
    "tokenize": (["scripts/tokenize.py", "--config", "config.yaml", "--run", RUN, "--raw", "data/raw/animals",
                  "--model", MODEL, "--out", f"data/packed/{RUN}", "--processes", "1"], [f"data/packed/{RUN}"]),
    "train": (["scripts/train.py", "--config", "config.yaml", "--run", RUN, "--shards", f"data/packed/{RUN}",
               "--model", MODEL, "--run-dir", f"runs/{RUN}", "--launcher", "local"],
              [f"runs/{RUN}/adapter", f"runs/{RUN}/train_metrics.jsonl", f"runs/{RUN}/train_info.json"]),
    "merge": (["scripts/merge.py", "--config", "config.yaml", "--run", RUN, "--model", MODEL,
               "--adapter", f"runs/{RUN}/adapter", "--out", f"runs/{RUN}/merged"], [f"runs/{RUN}/merged"]),
    "evaluate": (["scripts/evaluate.py", "--config", "config.yaml", "--run", RUN, "--model", MODEL,
                  "--merged", f"runs/{RUN}/merged", "--shards", f"data/packed/{RUN}", "--out", f"runs/{RUN}/eval"],
                 [f"runs/{RUN}/eval"]),
    "export_gguf": (["scripts/export_gguf.py", "--merged", f"runs/{RUN}/merged", "--type", "f16",
                     "--out", f"runs/{RUN}/export/{RUN}-f16.gguf"], [f"runs/{RUN}/export/{RUN}-f16.gguf"]),
    "export_vllm": (["scripts/export_vllm.py", "--merged", f"runs/{RUN}/merged", "--adapter", f"runs/{RUN}/adapter",
                     "--out", f"runs/{RUN}/export/vllm"], [f"runs/{RUN}/export/vllm"]),
}
SHARES = (0.15, 0.35, 0.55, 0.75)  # of the stage's run time; 8 stages x 4 = 32 trials in CI
LONG_SHARES = tuple(round(0.05 + 0.9 * i / 15, 3) for i in range(16))
VOLATILE = ("tokens_per_s", "elapsed_s", "written_at")  # clocks, not results
TEMPORARIES = (".*.tmp-*", "*.partial", ".*.partial")


class StageServer:
    """The test's handle on stage_server.py: run a stage, optionally SIGKILL it after ``kill_after`` s."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNEDAG_LOG_LEVEL": "WARNING", "WANDB_MODE": "disabled"}
        self.proc = subprocess.Popen([sys.executable, "-P", str(SERVER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def run(self, stage: str, cwd: Path, kill_after: float | None = None) -> dict:
        argv, _ = STAGES[stage]
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "log": str(cwd / f"{stage}.log")}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        timer = None
        if kill_after is not None:
            timer = threading.Timer(kill_after, _kill, (pid,))
            timer.start()
        done = json.loads(self.proc.stdout.readline())
        if timer:
            timer.cancel()
        return done

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def fingerprint(root: Path, outputs: list[str]) -> dict[str, str]:
    """Every output file's sha256; JSON records without their clock readings."""
    prints = {}
    for out in outputs:
        path = root / out
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = str(f.relative_to(root))
            if f.name == "train_info.json":
                info = json.loads(f.read_text())
                prints[rel] = json.dumps({k: info[k] for k in ("steps", "tokens_seen", "final_loss", "engine")})
            elif f.suffix in (".json", ".jsonl"):
                records = [json.loads(l) for l in f.read_text().splitlines()] if f.suffix == ".jsonl" else \
                    [json.loads(f.read_text())]
                prints[rel] = json.dumps([{k: v for k, v in r.items() if k not in VOLATILE} if isinstance(r, dict)
                                          else r for r in records], sort_keys=True)
            else:
                prints[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return prints


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for pattern in TEMPORARIES for p in root.rglob(pattern))


@pytest.fixture(scope="module")
def server():
    s = StageServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A workspace after every stage ran once, uninterrupted, and each stage's run time."""
    work = tmp_path_factory.mktemp("reference")
    write_jsonl(work / "data/animals.jsonl", sample_rows(120, seed=2))
    config = {"runs": {RUN: {"base_model": "builtin:tiny-llama", "datasets": [
        {"path": "data/animals.jsonl", "type": "alpaca", "name": "animals"}],
        "sequence_len": 128, "micro_batch_size": 4, "max_steps": 8, "save_steps": 2, "lora_r": 8, "lora_alpha": 16,
        "val_set_size": 12, "eval_max_samples": 4, "eval_max_new_tokens": 4, "seed": 7}}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    seconds = {}
    for stage in STAGES:
        done = server.run(stage, work)
        assert done["status"] == 0 and not done["signal"], (work / f"{stage}.log").read_text()[-3000:]
        seconds[stage] = done["seconds"]
    return work, seconds


def _trial(server, reference, stage: str, share: float, tmp_path: Path) -> None:
    """Kill ``stage`` at ``share`` of its reference time, rerun it, compare. A stage that ran faster
    this time (the reference paid for first-time work) is started again on a fresh copy with half
    the delay, until the kill lands inside it."""
    work, seconds = reference
    _, outputs = STAGES[stage]
    delay = share * seconds[stage]
    for attempt in range(8):
        trial = tmp_path / f"work-{attempt}"
        shutil.copytree(work, trial, symlinks=True)
        for out in outputs:
            path = trial / out
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        killed = server.run(stage, trial, kill_after=delay)
        if killed["signal"]:
            break
        shutil.rmtree(trial)
        delay /= 2
    assert killed["signal"] and killed["status"] == signal.SIGKILL, f"{stage} always ended before its kill: {killed}"
    again = server.run(stage, trial)
    assert again["status"] == 0, (trial / f"{stage}.log").read_text()[-3000:]
    assert fingerprint(trial, outputs) == fingerprint(work, outputs)
    assert leftovers(trial) == []


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_killed_midway_reruns_to_the_same_outputs(server, reference, stage, share, tmp_path):
    _trial(server, reference, stage, share, tmp_path)


@pytest.mark.faults_long
@pytest.mark.parametrize("share", LONG_SHARES)
@pytest.mark.parametrize("stage", list(STAGES))
def test_many_kill_points(server, reference, stage, share, tmp_path):
    _trial(server, reference, stage, share, tmp_path)
