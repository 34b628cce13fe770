"""Gemma-3 (text), Phi-3, Mixtral and Qwen3-MoE: merged LoRA and GGUF export as llama.cpp runs them.

Each tiny model gets a random LoRA on every projection (on MoE models: attention and every expert),
merged by tunedag's merge (which checks the merged logits against base + adapter), exported as
f32 GGUF and compared with transformers' logits at every position (llama-cpp-python, f32 KV cache,
CPU repacking off as in test_gguf_llama_cpp). Windows of 4 tokens make the sliding layers matter
at these prompt lengths.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from gguf_models import save_bpe_tokenizer, save_sentencepiece_tokenizer  # noqa: E402
from tests.export.test_gguf_llama_cpp import ATOL_F32_DEFAULT, compare  # noqa: E402
from tests.helpers import tiny_run  # noqa: E402
from tunedag.export.gguf import export_gguf  # noqa: E402
from tunedag.export.gguf_errors import GGUFExportError  # noqa: E402
from tunedag.merge.adapter import merge_adapter  # noqa: E402
from tunedag.model_facts import LORA_TARGETS  # noqa: E402
from tunedag.models.registry import lora_target_kwargs  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.3,
              rms_norm_eps=1e-6)
MODELS = {
    # name: (config class, tokenizer, vocab_pad, config overrides)
    "phi3": ("Phi3Config", "gpt2", 0, dict(sliding_window=None)),  # llama.cpp runs Phi-3 without its window
    # Phi-4-mini's partial rotary: RoPE on half of each head (rope dimension count 8 of 16)
    "phi3_partial": ("Phi3Config", "gpt2", 0, dict(sliding_window=None, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # Phi-3.5 / Phi-4-mini's LongRoPE: per-frequency factors (the short ones up to 256 tokens: llama.cpp
    # rounds its 128-token context up to 256) and the cos/sin attention factor sqrt(1 + ln 2 / ln 256)
    "phi3_longrope": ("Phi3Config", "gpt2", 0, dict(sliding_window=None, max_position_embeddings=512,
                                                    original_max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
        "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8], "long_factor": [1.0, 2.0, 4.0, 8.0] * 2})),
    # 6 layers: llama.cpp's gemma3 pattern (layer 5 global, the others sliding, two RoPE bases)
    "gemma3_text": ("Gemma3TextConfig", "sentencepiece", 8, dict(num_hidden_layers=6, sliding_window=4,
                                                                  query_pre_attn_scalar=16)),
    "mixtral": ("MixtralConfig", "gpt2", 0, dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                                 sliding_window=None, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "qwen2", 0, dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                                     norm_topk_prob=True, tie_word_embeddings=False)),
}


def build(name: str, out: Path) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls, tokenizer, pad, overrides = MODELS[name]
    out.mkdir(parents=True)
    n_tok = (save_sentencepiece_tokenizer(out, "GemmaTokenizer", add_dummy_prefix=False) if tokenizer == "sentencepiece"
             else save_bpe_tokenizer(out, tokenizer))
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.convert_tokens_to_ids
    config = getattr(transformers, cls)(**{**COMMON, **overrides}, vocab_size=n_tok + pad, bos_token_id=ids("<s>"),
                                       eos_token_id=ids("</s>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # norms start at 1 (Gemma: 0): perturb so the norm convention shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def merged(name: str, root: Path, **run_keys) -> tuple[Path, dict]:
    """The tiny model with a random LoRA on all its projections merged in, and the merge's report."""
    from peft import LoraConfig, get_peft_model

    from tunedag.models.loading import load_causal_lm

    base_dir = build(name, root / "base")
    base = load_causal_lm(base_dir)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora_target_kwargs(base.config, LORA_TARGETS))
    with torch.no_grad():
        model = get_peft_model(base, lora)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)  # keep the adapted model's logits in the range llama.cpp is compared over
    model.save_pretrained(root / "adapter")
    run = tiny_run(base_dir / "config.json", base_model=str(base_dir), merge_dtype="float32", **run_keys)
    report = merge_adapter(run, base_dir, root / "adapter", root / "merged")
    return root / "merged", report


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_lora_exports_to_what_llama_cpp_computes(name, tmp_path):
    model_dir, report = merged(name, tmp_path)
    assert report["relative_logit_error"] < 1e-5
    # per-layer LoRA'd tensors: attention q/k/v/o (Phi-3: qkv, o) and MLP, or every expert's gate/up/down
    per_layer = {"phi3": 4, "phi3_partial": 4, "phi3_longrope": 4, "gemma3_text": 7}.get(name, 4 + 3 * 4)  # MoE: 4 experts
    assert report["merged_tensors"] == per_layer * MODELS[name][3].get("num_hidden_layers", 2)
    path = export_gguf(model_dir, tmp_path / f"{name}.gguf", "f32").path
    r = compare(path, model_dir, argmax_margin=0.0)
    print(f"{name} f32: max |Δlogit| = {r['max_abs']:.3g}, rms(Δ)/std = {r['rel_rms']:.3g}")
    assert r["max_abs"] <= (2e-2 if name.startswith("gemma") else ATOL_F32_DEFAULT) and r["argmax_ok"]


def test_phi3_qlora_merge_rounds_the_packed_projections_to_nf4(tmp_path):
    from safetensors.torch import load_file

    model_dir, report = merged("phi3", tmp_path, adapter="qlora")
    assert report["relative_logit_error"] < 1e-5  # against peft on the NF4-rounded base
    rounded = load_file(model_dir / "model.safetensors")
    plain = merged("phi3", tmp_path / "plain")[0]
    plain_weights = load_file(plain / "model.safetensors")
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"):
        diff = (rounded[name] - plain_weights[name]).abs().max()
        assert 0 < diff < 0.2 * plain_weights[name].abs().max(), name  # NF4 rounding, nothing larger


def test_phi3_adapter_is_one_vllm_serves(tmp_path):
    """The packed qkv_proj / gate_up_proj LoRA passes the vLLM export's adapter check."""
    from peft import LoraConfig, get_peft_model

    from tunedag.export.vllm import check_adapter_dir
    from tunedag.models.loading import load_causal_lm

    base = load_causal_lm(build("phi3", tmp_path / "base"))
    lora = LoraConfig(r=8, lora_alpha=16, **lora_target_kwargs(base.config, LORA_TARGETS))
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    assert set(check_adapter_dir(tmp_path / "adapter")["target_modules"]) == {
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.mark.parametrize("name, old, new, reason", [
    ("gemma3_text", '"full_attention"', '"sliding_attention"', "layer_types"),  # llama.cpp: every 6th global
    ("qwen3_moe", '"norm_topk_prob": true', '"norm_topk_prob": false', "norm_topk_prob=false"),
])
def test_configs_llama_cpp_would_compute_differently_are_refused(name, old, new, reason, tmp_path):
    model_dir = build(name, tmp_path / name)
    config = (model_dir / "config.json").read_text()
    assert old in config
    (model_dir / "config.json").write_text(config.replace(old, new))
    with pytest.raises(GGUFExportError, match=reason):
        export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()
