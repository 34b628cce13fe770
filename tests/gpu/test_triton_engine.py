"""The triton engine on CUDA, bf16, at shapes where the GPU paths (varlen / Flex attention, cuBLAS
in bf16, offloaded checkpointing) are the ones that run. Skipped without CUDA.

Tolerance rule (why not a fixed number): the triton engine computes in bf16, the torch engine
in fp32 weights under bf16 autocast; neither equals the fp32 result. Both are measured against
the torch engine run in full fp32 (no autocast) on the same batch, and the triton engine's error
must be at most twice the torch engine's own bf16 error (plus a floor of 2e-3 where that error
is tiny): "lossless" means no worse than the rounding the reference itself accepts.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from tests.helpers import tiny_run  # noqa: E402
from tests.train.triton_models import pack, preference_batch, sample  # noqa: E402
from tunedag.data.batches import collate  # noqa: E402
from tunedag.train.engines import TorchEngine  # noqa: E402
from tunedag.train.triton_engine import TritonEngine  # noqa: E402

CUDA = torch.device("cuda")
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192,
             rms_norm_eps=1e-5, initializer_range=0.02, pad_token_id=0, tie_word_embeddings=False)


def _model(arch, dest):
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen3Config

    cfg = {"llama": lambda: LlamaConfig(**SHAPE, rope_theta=500000.0),
           "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=64),
           "gemma2": lambda: Gemma2Config(**SHAPE, head_dim=64, sliding_window=4096,
                                          query_pre_attn_scalar=64)}[arch]()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(dest, safe_serialization=True)
    return dest


MIXED_DOCS = ((900, 1500, 300, 1200), (2048, 1000, 700))  # 3900 and 3748 tokens: padding in both
EQUAL_DOCS = ((1900, 1900), (1900,))  # one length: packed_attention's dense cuDNN path


def _batch(seed=0, rows=MIXED_DOCS):
    rng = np.random.default_rng(seed)
    out = []
    for lengths in rows:
        samples = [sample(n, rng, prompt=20) for n in lengths]
        for s in samples:
            s["input_ids"] = rng.integers(3, 32000, size=len(s["input_ids"]))
            s["labels"] = s["input_ids"].copy()
            s["labels"][:20] = -100
        out.append(pack(samples))
    return collate(out, pad_id=0)


def _grads(engine):
    return {n: p.grad.detach().float().clone() for n, p in engine.model.named_parameters() if p.requires_grad}


def _step(engine, batch):
    """One loss_sum + backward as the engine runs it (the torch engine: bf16 autocast on CUDA)."""
    engine.model.zero_grad(set_to_none=True)
    loss = engine.loss_sum(batch)
    loss.backward()
    return float(loss), _grads(engine)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _references(model_dir, batch, **overrides):
    run = tiny_run(model_dir / "config.json", base_model=str(model_dir), **overrides)
    ref = TorchEngine(run, model_dir, CUDA)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ref.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    fp32 = _step_no_autocast(ref, batch)
    bf16 = _step(ref, batch)
    state = {n: p.detach().clone() for n, p in ref.model.named_parameters() if p.requires_grad}
    del ref
    torch.cuda.empty_cache()
    return run, state, fp32, bf16


def _step_no_autocast(engine, batch):
    engine.model.zero_grad(set_to_none=True)
    original = engine.autocast
    engine.autocast = contextlib.nullcontext
    try:
        loss = engine.loss_sum(batch)
    finally:
        engine.autocast = original
    loss.backward()
    return float(loss), _grads(engine)


def _fast(run, model_dir, state):
    fast = TritonEngine(run, model_dir, CUDA)
    params = dict(fast.model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
    return fast


def _check(fast_result, fp32, bf16, floor=2e-3):
    (loss, grads), (ref_loss, ref_grads), (auto_loss, auto_grads) = fast_result, fp32, bf16
    loss_err, auto_err = abs(loss - ref_loss) / abs(ref_loss), abs(auto_loss - ref_loss) / abs(ref_loss)
    assert loss_err <= max(2 * auto_err, floor), (loss, ref_loss, auto_loss)
    errs = {n: (_rel(grads[n], g), _rel(auto_grads[n], g)) for n, g in ref_grads.items()}
    worst = max(errs, key=lambda n: errs[n][0] / max(errs[n][1], floor))
    print(f"loss error triton {loss_err:.2e} torch-bf16 {auto_err:.2e}; {len(errs)} gradients, worst {worst}: "
          f"triton {errs[worst][0]:.2e} vs torch-bf16 {errs[worst][1]:.2e}")
    for n, (err, auto) in errs.items():
        assert err <= max(2 * auto, floor), f"{n}: triton {err:.2e} vs torch-bf16 {auto:.2e}"


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", dict(docs=EQUAL_DOCS)),
    ("llama", dict(docs=EQUAL_DOCS, gradient_checkpointing=True)),
    ("llama", dict(gradient_checkpointing=True, gradient_checkpointing_skip_layers=2)),
    ("llama", dict(adapter="qlora")),
    ("llama", dict(gradient_checkpointing=True, activation_offloading=True,
                   lora_modules_to_save=["embed_tokens", "lm_head"])),
    ("qwen3", {}),
    ("gemma2", {}),
    # full fine-tuning: every weight (fp32 masters, bf16 compute), and a part of them with checkpointing
    ("llama", dict(adapter=None)),
    ("qwen3", dict(adapter=None, gradient_checkpointing=True,
                   unfrozen_parameters=[r"layers\.[23]\.", r"norm\.weight$", r"^lm_head"])),
], ids=["llama", "llama-equal-docs", "llama-equal-docs-ckpt", "llama-ckpt-skip2", "llama-qlora", "llama-offload-mts", "qwen3", "gemma2-flex", "llama-full", "qwen3-full-unfrozen-ckpt"])
def test_bf16_step_is_as_close_to_fp32_as_the_torch_engine(arch, overrides, tmp_path):
    model_dir = _model(arch, tmp_path / arch)
    overrides = dict(overrides)
    batch = _batch(rows=overrides.pop("docs", MIXED_DOCS))
    run, state, fp32, bf16 = _references(model_dir, batch, **overrides)
    fast = _fast(run, model_dir, state)
    _check(_step(fast, batch), fp32, bf16)


# --------------------------------------------------------------------------- preference objectives

PAIRS = ((900, 700, 1200, 1000), (1500, 1300))  # chosen, rejected, …: 3800 and 2800 tokens, padding in one row
EQUAL_PAIRS = ((1000, 1000, 1000, 1000), (1000, 1000))  # every sequence one length: the dense cuDNN path


@pytest.mark.parametrize("arch,rl,overrides", [
    ("llama", "dpo", {}),
    ("llama", "dpo", dict(pairs=EQUAL_PAIRS, gradient_checkpointing=True)),
    ("llama", "dpo", dict(adapter="qlora", gradient_checkpointing=True, lora_modules_to_save=["lm_head"])),
    ("llama", "orpo", {}),
    ("qwen3", "kto", dict(gradient_checkpointing=True)),
], ids=["llama-dpo", "llama-dpo-equal-ckpt", "llama-dpo-qlora-ckpt-mts", "llama-orpo", "qwen3-kto"])
def test_bf16_preference_step_is_as_close_to_fp32_as_the_torch_engine(arch, rl, overrides, tmp_path):
    """The policy pass, the adapters-off reference and the loss in bf16, against the fp32 torch engine.

    Same rule as the supervised test (at most twice the torch engine's own bf16 error), with a floor
    of 1e-2 instead of 2e-3: a dpo loss is a difference of summed log-probs over ~1000 tokens each,
    so its relative rounding error is larger than a token-mean cross-entropy's.
    """
    model_dir = _model(arch, tmp_path / arch)
    kind = "kto" if rl == "kto" else "dpo"
    labels = ((1, 0, 0, 1), (0, 1)) if rl == "kto" else None
    overrides = dict(overrides)
    batch = preference_batch(rows=overrides.pop("pairs", PAIRS), labels=labels, prompt=64, vocab=SHAPE["vocab_size"])
    run, state, fp32, bf16 = _references(model_dir, batch, rl=rl, rl_beta=0.1,
                                         datasets=[{"path": str(model_dir / "config.json"), "type": kind}],
                                         **overrides)
    fast = _fast(run, model_dir, state)
    assert fast.objective is not None
    _check(_step(fast, batch), fp32, bf16, floor=1e-2)
