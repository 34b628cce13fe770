"""One run on 1 GPU and on 2: ddp over the triton engine, fsdp, ZeRO-2 and ZeRO-3, each with every GPU
visible to every task (torchrun) and with one GPU per task (``CUDA_VISIBLE_DEVICES`` per task, as
Slurm's ``--gpu-bind`` gives), against one process at twice the micro-batch on the triton engine.
Skipped without 2 CUDA GPUs. Run with ``python -m pytest tests/gpu/test_multi_gpu.py``.

Tolerance: every run rounds its matmul inputs to bf16, but not the same tensors (the triton
engine holds a bf16 base, fsdp and deepspeed fp32 weights under bf16 autocast), so losses differ
by bf16 rounding; 2e-2 relative per step is above that on this tiny model and far below what a
wrong gradient scale, a rank on the wrong rows or a skipped update gives (the loss falls by about
a third over the run).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

from tunedag.config import load_run  # noqa: E402
from tunedag.train.loop import train  # noqa: E402
from tests.train.ranks import free_port, metrics, torchrun_train, write_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = {"max_steps": 8, "gradient_accumulation_steps": 2, "lora_modules_to_save": []}
DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
ENGINES = {"ddp": ({"train_engine": "auto"}, "ddp", "triton"),
           "fsdp": ({"train_engine": "fsdp"}, "fsdp", "torch"),
           "zero2": ({"train_engine": "deepspeed", "deepspeed_zero_stage": 2}, "deepspeed", "torch"),
           "zero3": ({"train_engine": "deepspeed", "deepspeed_zero_stage": 3}, "deepspeed", "torch")}


def one_gpu_per_task(config: Path, run: str, shards: Path, model: Path, run_dir: Path) -> str:
    """Two tasks, each seeing only its own GPU (at index 0), started as Slurm starts them."""
    code = "import sys; from tunedag.slurm.job import TrainJob; TrainJob(*sys.argv[1:])()"
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code, str(config), run, str(shards), str(model), str(run_dir)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": str(rank), "RANK": str(rank),
                                   "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port})
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)
    return "\n".join(logs)


@pytest.fixture(scope="module")
def one_process(sample_shards, tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run folder) of the reference: one process, micro-batch 8, both GPUs visible."""
    src, shards = sample_shards
    root = tmp_path_factory.mktemp("one-process")
    runs = {"single": {"micro_batch_size": 8, **STEPS}}
    runs.update({name: {"micro_batch_size": 4, **keys, **STEPS} for name, (keys, _, _) in ENGINES.items()})
    config = write_runs(root / "config.yaml", src, runs)
    train(load_run(config, "single")[1], shards, tiny_model_dir, root / "single")
    return config, root / "single"


def test_one_process_on_a_machine_with_two_gpus_takes_one_on_the_triton_engine(one_process):
    info = json.loads((one_process[1] / "train_info.json").read_text())
    assert (info["engine"], info["world_size"], info["device"]) == ("triton", 1, "cuda:0")
    assert "fallback_reason" not in info


@pytest.mark.parametrize("visibility", ["all-gpus", "gpu-per-task"])
@pytest.mark.parametrize("engine", [pytest.param(e, marks=DEEPSPEED) if e.startswith("zero") else e for e in ENGINES])
def test_two_gpus_follow_one_process_at_twice_the_micro_batch(engine, visibility, one_process, sample_shards,
                                                               tiny_model_dir, tmp_path):
    config, single = one_process
    _, shards = sample_shards
    run_dir = tmp_path / engine
    if visibility == "all-gpus":
        log = torchrun_train(config, engine, shards, tiny_model_dir, run_dir)
    else:
        log = one_gpu_per_task(config, engine, shards, tiny_model_dir, run_dir)
    assert f"rank 1/2 on cuda:{1 if visibility == 'all-gpus' else 0}" in log, log[-4000:]
    info = json.loads((run_dir / "train_info.json").read_text())
    _, name, model_engine = ENGINES[engine]
    assert (info["engine"], info["model_engine"], info["world_size"], info["device"]) == (name, model_engine, 2,
                                                                                           "cuda:0")
    ours, reference = [m["loss"] for m in metrics(run_dir)], [m["loss"] for m in metrics(single)]
    assert ours == pytest.approx(reference, rel=2e-2)
    assert ours[-1] < 0.8 * ours[0]
