"""Phi-3 and Gemma-3 (text) on the triton engine: loss and gradients equal to the torch engine.

Tiny random models from the HF configs, fp32 on the CPU, kernels interpreted (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, Phi3Config

from tests.train.test_triton_engine import FP32_REL, _assert_same_step, _engines
from tests.train.triton_models import COMMON, packed_batch, tiny_model
from tunedag.models.batch_inputs import loss_sum
from tunedag.models.registry import ARCHITECTURES, fast_path_blocker, peft_target_modules

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
}


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
    assert sum(new == "FusedLoRAMLP" for _, new in record.modules.values()) == 2
    adapted = {n.split(".")[-4] for n in dict(fast.model.named_parameters()) if "lora_A" in n}
    assert adapted == set(ARCHITECTURES[arch].lora_targets)
    _assert_same_step(ref, fast, packed_batch())


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
    assert peft_target_modules(spec, ["q_proj", "k_proj", "v_proj"]) == ("qkv_proj",)
    with pytest.raises(ValueError, match="qkv_proj"):
        peft_target_modules(spec, ["q_proj", "v_proj"])
    why = fast_path_blocker(NEW_CONFIGS["phi3"](), rl=None, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
                            lora_modules_to_save=[])
    assert "adapts as a whole" in why


@pytest.mark.parametrize("key, value, reason", [
    ("resid_pdrop", 0.1, "resid_pdrop 0.1 > 0"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75},
     "partial_rotary_factor 0.75"),
])
def test_phi3_settings_the_kernels_lack_fall_back(key, value, reason):
    config = NEW_CONFIGS["phi3"]()
    setattr(config, key, value)
    why = fast_path_blocker(config, rl=None, lora_dropout=0.0, lora_target_modules=ARCHITECTURES["llama"].lora_targets,
                            lora_modules_to_save=[])
    assert why is not None and reason in why
