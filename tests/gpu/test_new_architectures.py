"""Phi-3, Gemma-3 (text), Mixtral, Qwen3-MoE and gpt-oss on the triton engine in bf16 on CUDA, against the
torch engine: the same rule as tests/gpu/test_triton_engine.py (the triton engine's error to the fp32
torch engine at most twice the torch engine's own bf16 autocast error). The MoE cases run the
experts through torch._grouped_mm. Skipped without CUDA.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from tests.gpu.test_triton_engine import SHAPE, _batch, _check, _fast, _references, _step  # noqa: E402
from tunedag.kernels.grouped_gemm import grouped_mm, grouped_mm_reference  # noqa: E402


def _model(arch, dest):
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GptOssConfig, MixtralConfig, Phi3Config,
                              Qwen3MoeConfig)

    moe = dict(SHAPE, intermediate_size=1024)
    cfg = {"phi3": lambda: Phi3Config(**SHAPE, sliding_window=2047),
           "gemma3_text": lambda: Gemma3TextConfig(**SHAPE, head_dim=64, sliding_window=4096, query_pre_attn_scalar=64,
                                                   layer_types=["sliding_attention"] * 3 + ["full_attention"]),
           "mixtral": lambda: MixtralConfig(**moe, num_local_experts=8, num_experts_per_tok=2,
                                            output_router_logits=True),
           "qwen3_moe": lambda: Qwen3MoeConfig(**dict(SHAPE, moe_intermediate_size=512), head_dim=64, num_experts=16,
                                               num_experts_per_tok=4),
           "gpt_oss": lambda: GptOssConfig(**dict(SHAPE, intermediate_size=512), head_dim=64, num_local_experts=8,
                                           num_experts_per_tok=2, sliding_window=128,
                                           layer_types=["sliding_attention", "full_attention"] * 2)}[arch]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # gpt-oss's biases and sinks start at 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0, 0.1)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.mark.parametrize("arch", ["phi3", "gemma3_text", "mixtral", "qwen3_moe", "gpt_oss"])
def test_bf16_step_is_as_close_to_fp32_as_the_torch_engine(arch, tmp_path):
    model_dir = _model(arch, tmp_path / arch)
    batch = _batch()
    run, state, fp32, bf16 = _references(model_dir, batch)
    fast = _fast(run, model_dir, state)
    print(arch, fast.patches.summary())
    _check(_step(fast, batch), fp32, bf16)


def test_grouped_mm_on_cuda_matches_one_matmul_per_expert():
    """torch._grouped_mm (bf16) forward, dx and dw against per-expert fp32 matmuls, an empty expert included."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    counts = [300, 0, 17, 1200, 5, 64, 1, 900]
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 256, device="cuda", generator=gen)
    w = torch.randn(8, 512, 256, device="cuda", generator=gen).transpose(1, 2) / 16
    dy = torch.randn(sum(counts), 512, device="cuda", generator=gen)
    xb, wb = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    y = grouped_mm(xb, wb, offs)
    dx, dw = torch.autograd.grad(y, (xb, wb), dy.bfloat16())
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = grouped_mm_reference(xr, wr, offs)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy)
    for got, want in ((y, yr), (dx, dxr), (dw, dwr)):
        rel = float((got.float() - want).norm() / want.norm())
        assert rel < 1e-2, rel  # bf16 inputs and outputs: ~4e-3 rounding
