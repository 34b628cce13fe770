"""gpt-oss on the triton engine: the fused MoE block against transformers' GptOssMLP, and the engine against the
torch engine (sinks, window, biases, clamped SwiGLU, LoRA on attention and every expert).

The tiny gpt-oss of tests/train/test_gpt_oss.py, fp32 on the CPU, kernels interpreted. Its swiglu_limit is
lowered so that both clamps cut some of the tiny model's activations.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.train.test_gpt_oss import gpt_oss_config
from tunedag.models.fused_modules import AdapterSwitch
from tunedag.models.moe import FusedLoRAMoE, RouterLogits, clamped_swiglu

LIMIT = 0.4
TOL = dict(rtol=1e-5, atol=1e-6)


def _block(peft: bool):
    """(layer 0's GptOssMLP, the model) with random biases; peft: LoRA on both expert parameters, B random."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt_oss_config(swiglu_limit=LIMIT)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        return model.get_base_model().model.layers[0].mlp, model
    return model.model.layers[0].mlp, model


def _x():
    return torch.randn(1, 13, 32, generator=torch.Generator().manual_seed(1)) * 2


def test_clamped_swiglu_clamps_both_halves():
    """The limit cuts gate above and up on both sides, on interleaved columns, as GptOssExperts does."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(gpt_oss_config(swiglu_limit=LIMIT))
    gu = torch.randn(9, 32) * 2
    assert (gu[:, ::2] > LIMIT).any() and (gu[:, 1::2] < -LIMIT).any()
    torch.testing.assert_close(clamped_swiglu(gu, experts.alpha, experts.limit), experts._apply_gate(gu), **TOL)


def test_moe_block_without_peft_matches_transformers():
    """Full fine-tuning: output and the gradients of router weight and bias, expert weights and biases."""
    block, _ = _block(peft=False)
    fused = FusedLoRAMoE(block, "gpt_oss", RouterLogits(), AdapterSwitch())
    x = _x()
    dy = torch.randn_like(x)
    params = [block.router.weight, block.router.bias, *block.experts.parameters()]
    assert len(params) == 6
    want_y = block(x)[0]
    want = torch.autograd.grad(want_y, params, dy)
    got_y, scores = fused(x)
    assert scores is None
    got = torch.autograd.grad(got_y, params, dy)
    torch.testing.assert_close(got_y, want_y, **TOL)
    for g, w in zip(got, want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, **TOL)


def test_moe_block_with_lora_on_every_expert_matches_peft():
    """peft's ParamWrappers on gate_up_proj and down_proj ((E, in, out) weights): output and every LoRA gradient."""
    block, model = _block(peft=True)
    fused = FusedLoRAMoE(block, "gpt_oss", RouterLogits(), AdapterSwitch())
    x = _x().requires_grad_()
    dy = torch.randn_like(x)
    loras = [p for n, p in block.named_parameters() if "lora_" in n]
    assert len(loras) == 4
    want_y = block(x)[0]
    want = torch.autograd.grad(want_y, [x, *loras], dy)
    got_y, _ = fused(x)
    got = torch.autograd.grad(got_y, [x, *loras], dy)
    torch.testing.assert_close(got_y, want_y, **TOL)
    for g, w in zip(got, want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, **TOL)


def _tiny_engines(tmp_path, **keys):
    from tests.train.test_gpt_oss import tiny_gpt_oss
    from tests.train.test_triton_engine import _engines

    return _engines(tiny_gpt_oss(tmp_path / "m", swiglu_limit=LIMIT), **keys)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_gradients_match_the_torch_engine(tmp_path, checkpointing):
    """Packed rows with documents longer than the sliding layer's window: the triton engine (sink attention kernel,
    fused MoE) gives the torch engine's loss and every adapter gradient (attention, experts of both layers)."""
    from tests.train.test_gpt_oss import ROWS
    from tests.train.test_triton_engine import _assert_same_step
    from tests.train.triton_models import packed_batch

    ref, fast = _tiny_engines(tmp_path, gradient_checkpointing=checkpointing)
    record = fast.model.tunedag_patches
    assert record.architecture == "gpt_oss"
    assert sum(new == "FusedLoRAMoE" for _, new in record.modules.values()) == 2
    assert sum(new == "FusedLoRAAttention" for _, new in record.modules.values()) == 2
    _assert_same_step(ref, fast, packed_batch(seed=1, rows=ROWS))


def test_full_fine_tune_trains_sinks_and_biases(tmp_path):
    """adapter: none on the triton engine: the sinks, router and expert biases get the torch engine's gradients."""
    from tests.train.test_gpt_oss import ROWS
    from tests.train.test_triton_engine import _assert_same_step
    from tests.train.triton_models import packed_batch

    ref, fast = _tiny_engines(tmp_path, adapter=None)
    trained = {n for n, p in fast.model.named_parameters() if p.requires_grad}
    assert {"model.layers.0.self_attn.sinks", "model.layers.1.mlp.router.bias",
            "model.layers.0.mlp.experts.down_proj_bias"} <= trained
    _assert_same_step(ref, fast, packed_batch(seed=1, rows=ROWS))


def test_triton_engine_takes_gpt_oss(tmp_path):
    from tests.helpers import tiny_run
    from tests.train.test_gpt_oss import tiny_gpt_oss
    from tunedag.train.engines import model_kind

    model_dir = tiny_gpt_oss(tmp_path / "m")
    run = tiny_run(model_dir / "config.json", base_model=str(model_dir), train_engine="triton")
    assert model_kind(run, model_dir, torch.device("cpu")) == ("triton", None)


def test_router_loss_matches_the_torch_engine(tmp_path):
    """output_router_logits: the biased router's load-balancing loss and its gradient, as the torch engine's."""
    from tests.train.test_gpt_oss import ROWS, tiny_gpt_oss
    from tests.train.test_triton_engine import FP32_REL, _engines, _rel
    from tests.train.triton_models import packed_batch

    ref, fast = _engines(tiny_gpt_oss(tmp_path / "m", swiglu_limit=LIMIT, output_router_logits=True,
                                      router_aux_loss_coef=0.5))
    batch = packed_batch(seed=1, rows=ROWS)
    ref_loss, fast_loss = ref.loss_sum(batch), fast.loss_sum(batch)
    assert _rel(fast_loss.detach(), ref_loss.detach()) < FP32_REL
    ref_loss.backward()
    fast_loss.backward()
    fast_grads = dict(fast.model.named_parameters())
    for name, p in ref.model.named_parameters():
        if p.requires_grad:
            assert _rel(fast_grads[name].grad, p.grad) < FP32_REL, name
