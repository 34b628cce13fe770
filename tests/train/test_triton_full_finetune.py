"""Full fine-tuning (``adapter: null``) on the triton engine against the torch engine, the reference.

CPU, fp32, kernels interpreted (TRITON_INTERPRET=1): a few AdamW steps from the same weights on
both engines; every step's loss, every trained tensor's gradient and the updated weights agree to
fp32 rounding (1e-5 relative, as tests/train/test_triton_engine.py argues), and frozen weights get
no gradient at all.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_run
from tests.train.test_triton_engine import FP32_REL, _rel
from tests.train.triton_models import packed_batch, tiny_model
from tunedag.models.loading import load_causal_lm
from tunedag.train.engines import TorchEngine, make_engine
from tunedag.train.ranks import DistEnv
from tunedag.train.triton_engine import TritonEngine

CPU = torch.device("cpu")
STEPS = 3


def _run(model_dir, **overrides):
    return tiny_run(model_dir / "config.json", base_model=str(model_dir), adapter=None, train_engine="triton",
                    **overrides)


CASES = {
    # every weight, per-layer checkpointing
    "llama-all-ckpt": ("llama", dict(gradient_checkpointing=True)),
    # a mix: layer 1 whole, q/k (with Qwen2's q/k biases) of layer 0, the lm_head; the rest frozen
    "qwen2-unfrozen": ("qwen2", dict(unfrozen_parameters=[r"layers\.1\.", r"layers\.0\.self_attn\.[qk]_proj",
                                                           r"^lm_head"])),
    # tied embeddings: one parameter gets the embedding's and the lm_head's gradients; Gemma norms
    "gemma-tied": ("gemma", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_steps_match_the_torch_engine(case, tmp_path):
    arch, overrides = CASES[case]
    model_dir = tiny_model(arch, tmp_path / arch)
    run = _run(model_dir, **overrides)
    ref, fast = TorchEngine(run, model_dir, CPU), TritonEngine(run, model_dir, CPU)
    trained = [n for n, p in ref.model.named_parameters() if p.requires_grad]
    assert [n for n, p in fast.model.named_parameters() if p.requires_grad] == trained
    frozen = [p for p in fast.model.parameters() if not p.requires_grad]
    assert bool(frozen) == ("unfrozen_parameters" in overrides)
    opts = [torch.optim.AdamW(e.trainable_parameters(), lr=1e-2, weight_decay=0.01) for e in (ref, fast)]
    for step in range(STEPS):
        batch = packed_batch(seed=step)
        losses = [e.loss_sum(batch) for e in (ref, fast)]
        for loss in losses:
            loss.backward()
        assert _rel(losses[1].detach(), losses[0].detach()) < FP32_REL, (step, [float(x) for x in losses])
        grads = [dict((n, p.grad) for n, p in e.model.named_parameters() if p.requires_grad) for e in (ref, fast)]
        for name in trained:
            g = grads[0][name]
            assert g is not None and g.abs().sum() > 0, f"{name}: no reference gradient"
            assert _rel(grads[1][name], g) < FP32_REL, f"step {step} {name}: {_rel(grads[1][name], g):.2e}"
        assert all(p.grad is None for p in frozen)  # no gradient work for frozen weights
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    weights = [dict(e.model.named_parameters()) for e in (ref, fast)]
    for name in trained:  # Adam divides by sqrt(v): fp32 differences grow a little over steps
        assert _rel(weights[1][name].detach(), weights[0][name].detach()) < 10 * FP32_REL, name


def test_checkpoint_round_trip_and_engine_choice(tmp_path):
    """save() writes the whole model as an HF folder; load_trainable() restores every trained weight
    (a resume); make_engine takes the triton engine for adapter: null."""
    model_dir = tiny_model("llama", tmp_path / "m")
    run = _run(model_dir)
    engine = make_engine(run, model_dir, DistEnv())
    assert isinstance(engine.inner, TritonEngine) and "fallback_reason" not in engine.info
    fast = engine.inner
    fast.loss_sum(packed_batch()).backward()
    engine.step(None)  # the weights move away from the model folder's
    fast.save(tmp_path / "ckpt")
    saved = dict(load_causal_lm(tmp_path / "ckpt").named_parameters())  # a plain HF folder, as merge reads it
    other = TritonEngine(run, model_dir, CPU)
    before = dict(other.model.named_parameters())
    assert not torch.equal(before["model.layers.0.mlp.down_proj.weight"],
                           dict(fast.model.named_parameters())["model.layers.0.mlp.down_proj.weight"])
    other.load_trainable(tmp_path / "ckpt")
    theirs = dict(other.model.named_parameters())
    for name, p in fast.model.named_parameters():
        assert torch.equal(theirs[name], p) and torch.equal(saved[name], p), name

