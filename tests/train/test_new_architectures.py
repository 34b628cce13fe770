"""Phi-3, Gemma-3 (text), Mixtral and Qwen3-MoE on the triton engine: loss and gradients equal to the torch engine.

Tiny random models from the HF configs, fp32 on the CPU, kernels interpreted (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, MixtralConfig, Phi3Config, Qwen3MoeConfig

from tests.train.test_triton_engine import FP32_REL, _assert_same_step, _engines, _rel
from tests.train.triton_models import COMMON, packed_batch, tiny_model
from tunedag.models.batch_inputs import loss_sum
from tunedag.kernels.grouped_gemm import grouped_mm, grouped_mm_reference
from tunedag.models.moe import load_balancing_loss
from tunedag.models.registry import ARCHITECTURES, fast_path_blocker, peft_targets

NEW_CONFIGS = {
    # window wider than any test document (the torch engine's packed mask has none); the window
    # itself is checked against transformers' own mask below
    "phi3": lambda: Phi3Config(**COMMON, sliding_window=64, tie_word_embeddings=False),
    # one sliding layer, one global: two RoPE bases, Gemma q/k norms, sandwich norms
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=64, query_pre_attn_scalar=8,
                                            layer_types=["sliding_attention", "full_attention"],
                                            rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                                   "rope_theta": 10.0},
                                                             "full_attention": {"rope_type": "default",
                                                                                "rope_theta": 10000.0}}),
    # 4 experts, top-2: LoRA on attention and on every expert's gate_up and down
    "mixtral": lambda: MixtralConfig(**dict(COMMON, intermediate_size=16), num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=None, tie_word_embeddings=False),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False),
}
MOE = ("mixtral", "qwen3_moe")


@pytest.fixture(autouse=True)
def _new_configs(monkeypatch):
    from tests.train import triton_models

    monkeypatch.setattr(triton_models, "CONFIGS", {**triton_models.CONFIGS, **NEW_CONFIGS})


def _model(arch, tmp_path, **overrides):
    return tiny_model(arch, tmp_path / arch, **overrides)


@pytest.mark.parametrize("arch", list(NEW_CONFIGS))
def test_loss_and_gradients_match_the_torch_engine(arch, tmp_path):
    ref, fast = _engines(_model(arch, tmp_path))
    record = fast.model.tunedag_patches
    assert record.architecture == arch
    mlp = "FusedLoRAMoE" if arch in MOE else "FusedLoRAMLP"
    assert sum(new == mlp for _, new in record.modules.values()) == 2
    adapted = {n.split(".")[-4] for n in dict(fast.model.named_parameters()) if "lora_A" in n}
    expected = set(ARCHITECTURES[arch].lora_targets)
    if arch in MOE:  # gate_up_proj's wrapper sits inside down_proj's: experts.base_layer.lora_A
        expected = {n for n in expected if not n.startswith("experts.")} | {"experts", "base_layer"}
    assert adapted == expected
    _assert_same_step(ref, fast, packed_batch())


@pytest.mark.parametrize("arch, checkpointing", [("mixtral", True), ("qwen3_moe", False)])
def test_router_loss_matches_the_torch_engine(arch, checkpointing, tmp_path):
    """output_router_logits on: both engines add router_aux_loss_coef x the load-balancing loss, and its
    gradient reaches the adapters also through checkpointed layers (recomputed in backward)."""
    ref, fast = _engines(_model(arch, tmp_path, output_router_logits=True, router_aux_loss_coef=0.5),
                         gradient_checkpointing=checkpointing)
    batch = packed_batch()
    config = fast.causal_lm.config
    with torch.no_grad():
        config.output_router_logits = False
        plain = fast.loss_sum(batch)
        config.output_router_logits = True
        assert float(fast.loss_sum(batch)) - float(plain) > 1e-3  # the aux term is there
    ref_loss, fast_loss = ref.loss_sum(batch), fast.loss_sum(batch)
    assert _rel(fast_loss.detach(), ref_loss.detach()) < FP32_REL
    for loss in (ref_loss, fast_loss):  # the loop scales the summed loss before backward
        (loss * 0.37).backward()
    fast_grads = dict(fast.model.named_parameters())
    for name, p in ref.model.named_parameters():
        if p.requires_grad:
            assert _rel(fast_grads[name].grad, p.grad) < FP32_REL, name


@pytest.mark.parametrize("arch", MOE)
def test_moe_block_without_peft_matches_transformers(arch):
    """The fused block on a plain HF block (full fine-tuning): output and every weight's gradient."""
    from transformers import AutoModelForCausalLM

    from tunedag.models.fused_modules import AdapterSwitch
    from tunedag.models.moe import FusedLoRAMoE, RouterLogits

    torch.manual_seed(0)
    block = AutoModelForCausalLM.from_config(NEW_CONFIGS[arch]()).model.layers[0].mlp.float()
    fused = FusedLoRAMoE(block, "silu", RouterLogits(), AdapterSwitch())
    x = torch.randn(1, 13, COMMON["hidden_size"])
    dy = torch.randn_like(x)
    params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    want = torch.autograd.grad(block(x), [*params], dy)
    got_y = fused(x)
    got = torch.autograd.grad(got_y, [*params], dy)
    torch.testing.assert_close(got_y, block(x), rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_is_transformers_own():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(7, 5, generator=gen) for _ in range(3)]
    torch.testing.assert_close(load_balancing_loss(logits, 5, 2), load_balancing_loss_func(tuple(logits), 5, 2))


def test_grouped_mm_matches_one_matmul_per_expert():
    """Padded-bmm path, forward and backward, with an empty expert and uneven groups."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=gen, requires_grad=True)
    w = torch.randn(4, 5, 6, generator=gen).transpose(1, 2).requires_grad_()  # (E, K, N) as a transposed view
    offs = torch.tensor([2, 2, 7, 9], dtype=torch.int32)
    dy = torch.randn(9, 5, generator=gen)
    got = grouped_mm(x, w, offs)
    grads = torch.autograd.grad(got, (x, w), dy)
    want = grouped_mm_reference(x, w, offs)
    ref_grads = torch.autograd.grad(want, (x, w), dy)
    torch.testing.assert_close(got, want)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("arch", list(NEW_CONFIGS))
def test_sliding_window_matches_transformers_own_mask(arch, tmp_path):
    """One document longer than the window: the triton engine against HF's own unpacked forward."""
    ref, fast = _engines(_model(arch, tmp_path, sliding_window=4))
    batch = packed_batch(seed=2, rows=((11,),))
    with torch.no_grad():
        expected = loss_sum(ref.model(input_ids=batch["input_ids"]).logits, batch["labels"])
        torch.testing.assert_close(fast.loss_sum(batch), expected, rtol=FP32_REL, atol=0)


def test_phi3_llama_names_map_onto_the_packed_projections():
    spec = ARCHITECTURES["phi3"]
    assert sorted(spec.lora_targets) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert peft_targets(spec, ["q_proj", "k_proj", "v_proj"]) == (("qkv_proj",), ())
    with pytest.raises(ValueError, match="qkv_proj"):
        peft_targets(spec, ["q_proj", "v_proj"])
    assert peft_targets(ARCHITECTURES["mixtral"], ["q_proj", "gate_proj", "up_proj", "down_proj"]) == (
        ("q_proj",), ("experts.gate_up_proj", "experts.down_proj"))
    why = fast_path_blocker(NEW_CONFIGS["phi3"](), rl=None, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
                            lora_modules_to_save=[])
    assert "adapts as a whole" in why


def test_config_check_knows_the_packed_names(tmp_path):
    from tests.helpers import tiny_run
    from tunedag.errors import TunedagError

    model_dir = _model("phi3", tmp_path)
    run = tiny_run(model_dir / "config.json", base_model=str(model_dir), lora_target_modules=["qkv_proj", "o_proj"])
    assert run.lora_target_modules == ["qkv_proj", "o_proj"]
    with pytest.raises(TunedagError, match="no module named 'qkv'"):
        tiny_run(model_dir / "config.json", base_model=str(model_dir), lora_target_modules=["qkv", "o_proj"])


def test_phi3_partial_rotary_matches_the_torch_engine(tmp_path):
    """Phi-4-mini's layout: RoPE on the first half of each head, the rest passed through."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    ref, fast = _engines(_model("phi3", tmp_path, rope_parameters=rope))
    assert fast.decoder.rotary_emb.inv_freq.numel() * 2 == 4  # head_dim 8: 4 rotated dims
    _assert_same_step(ref, fast, packed_batch())


def test_phi3_qlora_holds_the_packed_projections_in_nf4(tmp_path):
    from tunedag.kernels.nf4 import NF4Weight

    ref, fast = _engines(_model("phi3", tmp_path), adapter="qlora")
    layer = fast.decoder.layers[0]
    assert isinstance(layer.self_attn._nf4["qkv_proj"], NF4Weight)
    assert isinstance(layer.mlp._nf4["gate_up_proj"], NF4Weight)
    assert len(fast.model.tunedag_patches.nf4_weights) == 4 * 2  # qkv, o, gate_up, down x 2 layers
    _assert_same_step(ref, fast, packed_batch())


@pytest.mark.parametrize("key, value, reason", [
    ("resid_pdrop", 0.1, "resid_pdrop 0.1 > 0"),
])
def test_phi3_settings_the_kernels_lack_fall_back(key, value, reason):
    config = NEW_CONFIGS["phi3"]()
    setattr(config, key, value)
    why = fast_path_blocker(config, rl=None, lora_dropout=0.0, lora_target_modules=ARCHITECTURES["llama"].lora_targets,
                            lora_modules_to_save=[])
    assert why is not None and reason in why
