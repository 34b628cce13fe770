"""train_engine: deepspeed on CUDA in bf16: ZeRO-2, ZeRO-3 and ZeRO-3 with everything offloaded,
on one rank and (when 2 GPUs are visible) on two, against the torch engine in one process.
Skipped without CUDA or DeepSpeed. Run with ``python -m pytest tests/gpu/test_deepspeed_gpu.py``.

Tolerance: DeepSpeed holds bf16 weights (fp32 master copies in the optimizer), the torch engine
fp32 weights under bf16 autocast; both round every matmul input to bf16, but not the same
tensors, so their losses differ by bf16 rounding (2^-8 relative per rounding). 2e-2 relative per
step is above what that gives on this tiny model and far below what a wrong gradient scale or
a skipped update gives by step 3 (the loss falls by about a third over the run).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("deepspeed")

from tunedag.config import load_run  # noqa: E402
from tunedag.train.loop import train  # noqa: E402
from tests.train.ranks import metrics, torchrun_train, write_runs  # noqa: E402

WORLD_SIZES = [1, 2] if torch.cuda.device_count() >= 2 else [1]
ZERO = {"zero2": {"deepspeed_zero_stage": 2},
        "zero3": {"deepspeed_zero_stage": 3},
        "zero3-offload": {"deepspeed_zero_stage": 3, "deepspeed_offload": "all"}}


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("zero", list(ZERO))
def test_deepspeed_bf16_follows_the_torch_engine(zero, world_size, sample_shards, tiny_model_dir, tmp_path):
    src, shards = sample_shards
    steps = {"max_steps": 8, "gradient_accumulation_steps": 2}
    config = write_runs(tmp_path / "config.yaml", src, {
        "ds": {"train_engine": "deepspeed", "micro_batch_size": 4, **ZERO[zero], **steps},
        "torch": {"train_engine": "torch", "micro_batch_size": 4 * world_size, **steps}})
    torchrun_train(config, "ds", shards, tiny_model_dir, tmp_path / "ds", ranks=world_size)
    train(load_run(config, "torch")[1], shards, tiny_model_dir, tmp_path / "torch")

    info = json.loads((tmp_path / "ds/train_info.json").read_text())
    assert info["engine"] == "deepspeed" and info["world_size"] == world_size and info["device"].startswith("cuda")
    written = json.loads((tmp_path / "ds/deepspeed_config.json").read_text())
    assert written["bf16"] == {"enabled": True}
    ds, reference = [m["loss"] for m in metrics(tmp_path / "ds")], [m["loss"] for m in metrics(tmp_path / "torch")]
    assert ds == pytest.approx(reference, rel=2e-2)
    assert ds[-1] < 0.8 * ds[0]
    adapter = load_file(tmp_path / "ds/adapter/adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in adapter.values())
