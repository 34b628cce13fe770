"""One loop on every path: the Slurm job's task and profiles/local train alike, a rank's device is
chosen before any collective, a failing rank stops its peers, and checkpoints load no code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.ranks import free_port, write_runs
from tunedag.config import load_run
from tunedag.train import checkpoint as ckpt
from tunedag.train import ranks
from tunedag.train.loop import train
from tunedag.train.rank_failures import describe, latest_failures
from tunedag.train.ranks import DistEnv, choose_device

ROOT = Path(__file__).resolve().parents[2]


def _run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_a_one_task_slurm_job_and_the_local_stage_write_the_same_adapter(sample_shards, tiny_model_dir, tmp_path):
    src, shards = sample_shards
    config = write_runs(tmp_path / "config.yaml", src, {"r": {"max_steps": 3, "save_steps": 2}})
    local = subprocess.run([sys.executable, "-P", "scripts/train.py", "--config", str(config), "--run", "r",
                            "--shards", str(shards), "--model", str(tiny_model_dir), "--run-dir",
                            str(tmp_path / "local"), "--launcher", "local"],  # what profiles/local runs
                           capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert local.returncode == 0, local.stderr[-3000:]
    slurm_task = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77",
                  "SLURM_JOB_NODELIST": "localhost"}
    job = _run_python("import sys; from tunedag.slurm.job import TrainJob; TrainJob(*sys.argv[1:])()",
                      str(config), "r", str(shards), str(tiny_model_dir), str(tmp_path / "job"), env=slurm_task)
    assert job.returncode == 0, job.stderr[-3000:]
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "local" / adapter).read_bytes() == (tmp_path / "job" / adapter).read_bytes()
    infos = [json.loads((tmp_path / d / "train_info.json").read_text()) for d in ("local", "job")]
    assert infos[0]["engine"] == infos[1]["engine"] == "torch" and infos[1]["world_size"] == 1
    assert "no CUDA GPU" in infos[1]["fallback_reason"]
    metrics = [(tmp_path / d / "train_metrics.jsonl").read_text().splitlines() for d in ("local", "job")]
    assert [json.loads(l)["loss"] for l in metrics[0]] == [json.loads(l)["loss"] for l in metrics[1]]


def test_a_failing_rank_stops_its_peer_and_is_named(sample_shards, tiny_model_dir, tmp_path):
    """Rank 1 fails in its third micro-batch and then hangs (as a rank stuck in NCCL's teardown would);
    rank 0, waiting for it in a collective, stops within seconds naming rank 1's error."""
    src, shards = sample_shards
    config = write_runs(tmp_path / "config.yaml", src, {"r": {"max_steps": 50, "train_engine": "ddp",
                                                              "micro_batch_size": 2}})
    code = """
import sys, time
from tunedag.train.engines import TorchEngine
from tunedag.slurm.job import TrainJob
rank = int(__import__("os").environ["RANK"])
calls = []
real = TorchEngine.loss_sum
def loss_sum(self, batch):
    calls.append(1)
    if rank == 1 and len(calls) == 3:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    return real(self, batch)
TorchEngine.loss_sum = loss_sum
try:
    TrainJob(*sys.argv[1:])()
except RuntimeError:
    time.sleep(600)
"""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(config), "r", str(shards),
                                       str(tiny_model_dir), str(tmp_path / "r")], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        started = time.monotonic()
        out0, _ = procs[0].communicate(timeout=240)
        waited = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, out0[-3000:]
    assert "stopping because rank 1" in out0 and "illegal memory access" in out0, out0[-3000:]
    failed = latest_failures(tmp_path / "r")
    assert [f["rank"] for f in failed] == [1] and failed[0]["type"] == "RuntimeError"
    assert describe(failed).startswith("rank 1 on ") and "illegal memory access" in describe(failed)
    assert waited < 200  # the process group's own timeout is 600 s


@pytest.mark.parametrize("visible, local_rank, world, index", [
    (2, 1, 2, 1),  # the task sees its node's GPUs: its local rank's
    (1, 1, 2, 0),  # the task sees only its own (--gpu-bind): index 0
    (2, 0, 1, 0),  # one process on a machine with two GPUs trains on the first
])
def test_each_rank_takes_its_own_gpu_before_any_collective(monkeypatch, visible, local_rank, world, index):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    device = choose_device(DistEnv(rank=local_rank, local_rank=local_rank, world_size=world))
    assert device == torch.device("cuda", index) and chosen == [index]
    assert os.environ["LOCAL_RANK"] == str(index)  # what DeepSpeed reads


def test_a_task_that_sees_too_few_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="local rank 3.* sees 2 GPUs"):
        choose_device(DistEnv(rank=3, local_rank=3, world_size=4))


def test_slurm_and_torchrun_environments_name_each_start_apart():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "42",
             "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NODELIST": "gpu[017-020]"}
    env = DistEnv.from_environment(slurm)
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.attempt) == (3, 1, 8, "gpu017",
                                                                                       "slurm-42-2")
    assert DistEnv.from_environment({**slurm, "SLURM_RESTART_COUNT": "3"}).attempt == "slurm-42-3"
    assert DistEnv.from_environment({}) == DistEnv()
    assert ranks.all_sum(3, torch.device("cpu")) == 3.0  # no process group: the value itself


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_trainer_state_with_code_in_it_is_refused_not_run(packed_run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step = packed_run_dir / "checkpoints" / "step-1"
    state = ckpt.load_state(step)  # what the loop wrote loads with weights_only
    torch.save({**state, "extra": _Payload()}, step / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match=f"{step / ckpt.STATE_FILE}: not a trainer state"):
        ckpt.latest_checkpoint(packed_run_dir / "checkpoints", state["resume_key"], steps=2)
    assert not (tmp_path / "PWNED").exists()


@pytest.fixture
def packed_run_dir(sample_shards, tiny_model_dir, tmp_path) -> Path:
    src, shards = sample_shards
    config = write_runs(tmp_path / "config.yaml", src, {"r": {"max_steps": 1}})
    train(load_run(config, "r")[1], shards, tiny_model_dir, tmp_path / "r")
    return tmp_path / "r"


def test_a_rank_without_rows_gets_no_batches_instead_of_cycling_empty_epochs(sample_shards):
    """max_steps makes the batches endless; a rank with no rows (fewer rows than ranks) must still end."""
    from tests.helpers import tiny_run
    from tunedag.data.shards import ShardReader
    from tunedag.train.loop import micro_batches

    src, shards = sample_shards
    run = tiny_run(src, max_steps=5)
    empty = ShardReader(shards / "train", rank=999, world_size=1000)
    assert len(empty) == 0 and list(micro_batches(empty, run, 0, ckpt.Position())) == []
    full = ShardReader(shards / "train", rank=0, world_size=1)
    endless = micro_batches(full, run, 0, ckpt.Position())
    assert len([next(endless) for _ in range(3 * len(full))]) == 3 * len(full)  # past the first epoch
