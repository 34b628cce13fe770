"""gpt-oss: LoRA merged into a folder transformers loads, and its GGUF as llama.cpp computes it.

A tiny random gpt-oss (2 layers: sliding, global; 4 experts, top-2; sinks, biases, gpt-oss-20b's YaRN
rope) gets a random LoRA on attention and every expert, merged by tunedag's merge; the merged folder's
logits are compared with the PEFT model's, then the f32 and f16 GGUF with transformers at every
position (llama-cpp-python, f32 KV cache). A 4-token window makes the sliding layer matter.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from gguf_models import save_bpe_tokenizer  # noqa: E402
from tests.export.test_gguf_llama_cpp import (ATOL_F32_DEFAULT, REL_RMS, TOKENIZER_STRINGS, compare,  # noqa: E402
                                              hf_tokenizer, load_llama_cpp)
from tests.helpers import tiny_run  # noqa: E402
from tunedag.export.gguf import export_gguf  # noqa: E402
from tunedag.export.gguf_errors import GGUFExportError  # noqa: E402
from tunedag.merge.adapter import merge_adapter  # noqa: E402
from tunedag.model_facts import LORA_TARGETS  # noqa: E402
from tunedag.models.registry import lora_target_kwargs  # noqa: E402

# gpt-oss-20b's rope: YaRN x32 over 4096 positions, base 150000
ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}


def build(out: Path, **overrides) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssConfig

    out.mkdir(parents=True)
    n_tok = save_bpe_tokenizer(out, "o200k")  # gpt-oss's pre-tokenizer regex
    ids = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids
    keys = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                max_position_embeddings=4096 * 32, rope_parameters=ROPE, initializer_range=0.3, rms_norm_eps=1e-6,
                tie_word_embeddings=False, vocab_size=n_tok, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"),
                pad_token_id=ids("<pad>"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GptOssConfig(**{**keys, **overrides}), dtype=torch.float32)
    with torch.no_grad():  # norms start at 1, biases at 0: perturb so both show
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def _lora(base_dir: Path, dest: Path):
    """A random LoRA on the seven projections (attention, and every expert's gate_up and down), saved."""
    from peft import LoraConfig, get_peft_model

    from tunedag.models.loading import load_causal_lm

    base = load_causal_lm(base_dir)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, **lora_target_kwargs(base.config, LORA_TARGETS))
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
    model.save_pretrained(dest)
    return model.eval()


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> tuple[Path, dict, torch.Tensor]:
    """(merged folder, merge report, the PEFT model's logits on a fixed input)."""
    root = tmp_path_factory.mktemp("gpt_oss")
    base_dir = build(root / "base")
    peft_model = _lora(base_dir, root / "adapter")
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    run = tiny_run(base_dir / "config.json", base_model=str(base_dir), merge_dtype="float32")
    report = merge_adapter(run, base_dir, root / "adapter", root / "merged")
    return root / "merged", report, (ids, want)


def test_merged_folder_computes_the_peft_model(merged):
    from transformers import AutoModelForCausalLM

    model_dir, report, (ids, want) = merged
    assert report["merged_tensors"] == (4 + 2) * 2  # q, k, v, o and the two stacked expert weights, per layer
    assert report["relative_logit_error"] < 1e-5
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(model_dir.parent / "base", dtype=torch.float32).eval()
    with torch.no_grad():  # the adapter changes the function: the check above is not base against base
        assert (base(input_ids=ids).logits - want).abs().max() > 0.1


def _as_llama_cpp_rounds_yarn(model_dir: Path, dest: Path) -> Path:
    """A copy of ``model_dir`` whose YaRN rounds its correction range as llama.cpp does (truncate: true)."""
    import json
    import shutil

    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["rope_parameters"]["truncate"] = True
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_computes_what_transformers_does(merged, outtype, tmp_path, caplog):
    """gpt-oss's own truncate: false YaRN is warned about; against transformers with llama.cpp's rounding
    (truncate: true) the file agrees to f32 rounding."""
    model_dir = merged[0]
    path = export_gguf(model_dir, tmp_path / f"gpt-oss-{outtype}.gguf", outtype).path
    assert "truncate=false" in caplog.text
    r = compare(path, _as_llama_cpp_rounds_yarn(model_dir, tmp_path / "ref"),
                argmax_margin=0.0 if outtype == "f32" else 1.0)
    as_configured = compare(path, model_dir, argmax_margin=1.0)
    print(f"gpt_oss {outtype}: max |Δlogit| = {r['max_abs']:.3g}, rms(Δ)/std = {r['rel_rms']:.3g}; against "
          f"truncate=false: max |Δlogit| = {as_configured['max_abs']:.3g}, rms(Δ)/std = {as_configured['rel_rms']:.3g}")
    if outtype == "f32":
        assert r["max_abs"] <= ATOL_F32_DEFAULT
    else:
        assert r["rel_rms"] <= REL_RMS[outtype]
    assert r["argmax_ok"]


def test_gguf_tokenizes_as_transformers_does(merged, tmp_path):
    """gpt-oss's o200k pre-tokenizer is written as llama.cpp's gpt-4o one: the same ids, and lossless."""
    model_dir = merged[0]
    llm = load_llama_cpp(export_gguf(model_dir, tmp_path / "gpt-oss.gguf", "f32").path)
    tok = hf_tokenizer(model_dir)
    for text in TOKENIZER_STRINGS + ["HelloWorld's CAPS don't 1234567/\n/path"]:
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert got == tok(text)["input_ids"], text
        assert llm.detokenize(got[1:]).decode("utf-8") == text
    llm.close()


@pytest.mark.parametrize("key, value, reason", [
    ("swiglu_limit", 9.0, "swiglu_limit 9.0"),
    ("layer_types", ["full_attention", "sliding_attention"], "layer_types"),
    ("rope_parameters", {**ROPE, "beta_fast": 16.0}, "beta_fast 16.0"),
])
def test_configs_llama_cpp_would_compute_differently_are_refused(key, value, reason, merged, tmp_path):
    import json

    from tunedag.export.preflight import export_problems

    model_dir = build(tmp_path / "m", **{key: value})
    with pytest.raises(GGUFExportError, match=reason):
        export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()
    # the config check, before any job: the run's GGUF export named with the reason
    run = tiny_run(model_dir / "config.json", base_model=str(model_dir), gguf_types=["f16"])
    problems = export_problems(run, json.loads((model_dir / "config.json").read_text()), "runs.t", "m", True)
    assert len(problems) == 1 and reason in problems[0] and "runs.t.gguf_types" in problems[0]
    gpt_oss_20b_like = json.loads((merged[0].parent / "base" / "config.json").read_text())
    assert export_problems(run, gpt_oss_20b_like, "runs.t", "base", True) == []


def _as_mxfp4(model_dir: Path) -> Path:
    """``model_dir`` rewritten as the hub ships gpt-oss: random MXFP4 experts (blocks and scales), and the
    quantization_config saying so."""
    import json

    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(4)
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, n_in, n_out = weights.pop(name).shape
        weights[name + "_blocks"] = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=gen)
        weights[name + "_scales"] = torch.randint(122, 128, (e, n_out, n_in // 32), dtype=torch.uint8, generator=gen)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_mxfp4_dequantization_is_transformers_own():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from tunedag.models.mxfp4 import dequantize

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 2, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(118, 135, (3, 10, 2), dtype=torch.uint8, generator=gen)
    assert torch.equal(dequantize(blocks, scales), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))


def test_mxfp4_base_trains_and_merges_dequantized(tmp_path):
    """The hub's MXFP4 experts: LoRA on the dequantized model, merged into a plain (dequantized) folder."""
    import json

    from safetensors import safe_open

    base_dir = _as_mxfp4(build(tmp_path / "base"))
    peft_model = _lora(base_dir, tmp_path / "adapter")
    experts = peft_model.get_base_model().model.layers[0].mlp.experts.base_layer.base_layer
    assert experts.gate_up_proj.dtype == torch.float32  # dequantized, with its LoRA beside it
    run = tiny_run(base_dir / "config.json", base_model=str(base_dir), merge_dtype="float32")
    report = merge_adapter(run, base_dir, tmp_path / "adapter", tmp_path / "merged")
    assert report["merged_tensors"] == (4 + 2) * 2 and report["relative_logit_error"] < 1e-5
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_shape() == [4, 64, 64]
        assert not [k for k in f.keys() if k.endswith(("_blocks", "_scales"))]
