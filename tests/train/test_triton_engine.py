"""The triton engine against the torch engine (the reference) on tiny models of each architecture.

CPU, fp32, kernels interpreted (TRITON_INTERPRET=1): the two engines compute the same
functions in a different order (fused kernels, chunked loss, packed attention), so they agree to
float32 rounding. 1e-5 relative (loss, and every trained tensor's gradient as a whole) leaves
room for a few dozen fp32 roundings and is far below any wrong mask, cast or missing term.
"""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from tests.helpers import tiny_run
from tests.train.triton_models import CONFIGS, packed_batch, preference_batch, tiny_model
from tunedag.kernels.nf4 import NF4Weight
from tunedag.models.loading import load_causal_lm
from tunedag.models.batch_inputs import loss_sum
from tunedag.train.engines import TorchEngine, make_engine, model_engine
from tunedag.train.ranks import DistEnv
from tunedag.models.logprobs import sequence_logps
from tunedag.train.triton_engine import TritonEngine

CPU = torch.device("cpu")
FP32_REL = 1e-5


def _run(model_dir, **overrides):
    keys = dict(base_model=str(model_dir), lora_r=8, lora_alpha=16, train_engine="triton")
    keys.update(overrides)
    return tiny_run(model_dir / "config.json", **keys)


def _engines(model_dir, **overrides):
    """(torch engine, triton engine) with identical, non-trivial trainable weights."""
    run = _run(model_dir, **overrides)
    ref = TorchEngine(run, model_dir, CPU)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0, which would leave every A gradient 0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    fast = TritonEngine(run, model_dir, CPU)
    trained = {n for n, p in ref.model.named_parameters() if p.requires_grad}
    missing = fast.model.load_state_dict({k: v for k, v in ref.model.state_dict().items() if k in trained},
                                         strict=False)
    assert not missing.unexpected_keys and trained.isdisjoint(missing.missing_keys)
    return ref, fast


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _assert_same_step(ref, fast, batch):
    ref_loss, fast_loss = ref.loss_sum(batch), fast.loss_sum(batch)
    ref_loss.backward()
    fast_loss.backward()
    assert _rel(fast_loss.detach(), ref_loss.detach()) < FP32_REL, (float(fast_loss), float(ref_loss))
    fast_grads = {n: p.grad for n, p in fast.model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.model.named_parameters() if p.requires_grad}
    assert fast_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g is not None and g.abs().sum() > 0, f"{name}: no reference gradient"
        assert _rel(fast_grads[name], g) < FP32_REL, f"{name}: relative error {_rel(fast_grads[name], g):.2e}"


CASES = {
    # the default config's shape: embed_tokens and lm_head trained in full, checkpointing on
    "llama": dict(lora_modules_to_save=["embed_tokens", "lm_head"], gradient_checkpointing=True),
    "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "gemma2": {},
}


@pytest.mark.parametrize("arch", list(CASES))
def test_loss_and_gradients_match_the_torch_engine(arch, tmp_path):
    model_dir = tiny_model(arch, tmp_path / arch)
    ref, fast = _engines(model_dir, **CASES[arch])
    record = fast.model.tunedag_patches
    assert record.architecture == arch
    replaced = {new for _, new in record.modules.values()}
    assert replaced == {"FusedLoRAAttention", "FusedLoRAMLP", "FusedRMSNorm"}
    n_layers = CONFIGS[arch]().num_hidden_layers
    assert sum(new == "FusedLoRAMLP" for _, new in record.modules.values()) == n_layers
    _assert_same_step(ref, fast, packed_batch())


@pytest.fixture
def mlp_outputs(monkeypatch):
    """The ``output`` flag of every fused MLP call, in call order."""
    import tunedag.models.fused_modules as fused

    outputs, real = [], fused.lora_mlp

    def spy(*args):
        outputs.append(args[-1])
        return real(*args)

    monkeypatch.setattr(fused, "lora_mlp", spy)
    return outputs


@pytest.mark.parametrize("arch,skips", [("llama", True), ("gemma2", False)])
def test_checkpoint_recompute_skips_the_down_projection_where_the_output_goes_to_the_residual(
        arch, skips, tmp_path, mlp_outputs):
    """Checkpointed layers: the recompute asks each fused MLP for no output where the layer adds it to the
    residual as it is (Llama), and for its output where a norm reads it first (Gemma-2's post-feedforward
    norm, whose backward needs it); either way the step equals the torch engine's."""
    ref, fast = _engines(tiny_model(arch, tmp_path / arch), gradient_checkpointing=True)
    _assert_same_step(ref, fast, packed_batch())
    n_layers = CONFIGS[arch]().num_hidden_layers
    # forward, then the recompute of every layer but the last (never checkpointed)
    assert mlp_outputs == [True] * n_layers + [not skips] * (n_layers - 1)


def test_layers_kept_out_of_checkpointing_are_not_recomputed(tmp_path, mlp_outputs):
    n_layers = CONFIGS["llama"]().num_hidden_layers
    ref, fast = _engines(tiny_model("llama", tmp_path / "llama"), gradient_checkpointing=True,
                         gradient_checkpointing_skip_layers=n_layers)
    _assert_same_step(ref, fast, packed_batch())
    assert n_layers > 1 and mlp_outputs == [True] * n_layers  # no recompute at all


def test_the_torch_engine_says_it_recomputes_every_layer(tmp_path, caplog):
    run = _run(tiny_model("llama", tmp_path / "llama"), gradient_checkpointing=True,
               gradient_checkpointing_skip_layers=1, train_engine="torch")
    with caplog.at_level(logging.WARNING):
        TorchEngine(run, tmp_path / "llama", CPU)
    assert "gradient_checkpointing_skip_layers: 1 is the triton engine's" in caplog.text


def test_qlora_matches_the_torch_engine_on_dequantised_weights(tmp_path):
    model_dir = tiny_model("llama", tmp_path / "llama")
    ref, fast = _engines(model_dir, adapter="qlora")
    mlp = fast.model.get_base_model().model.layers[0].mlp
    assert isinstance(mlp._nf4["gate_proj"], NF4Weight)
    assert mlp.gate_proj.base_layer.weight.numel() == 0  # the dense copy is gone
    assert len(fast.model.tunedag_patches.nf4_weights) == 7 * 2
    _assert_same_step(ref, fast, packed_batch())


def test_packed_and_unpacked_samples_give_the_same_loss(tmp_path):
    fast = _engines(tiny_model("qwen2", tmp_path / "m"))[1]
    lengths = (4, 6, 5)
    batch = packed_batch(seed=5, rows=(lengths,))
    alone = packed_batch(seed=5, rows=tuple((n,) for n in lengths))  # same samples, one per row, padded
    assert torch.equal(batch["input_ids"][batch["segment_ids"] > 0], alone["input_ids"][alone["segment_ids"] > 0])
    with torch.no_grad():
        torch.testing.assert_close(fast.loss_sum(batch), fast.loss_sum(alone), rtol=FP32_REL, atol=0)


def test_sliding_window_matches_transformers_own_mask(tmp_path):
    """One document longer than the window: the triton engine against HF's unpacked forward."""
    model_dir = tiny_model("mistral", tmp_path / "m", sliding_window=4)
    ref, fast = _engines(model_dir)
    batch = packed_batch(seed=2, rows=((11,),))
    with torch.no_grad():  # no attention_mask: transformers builds its own sliding-window mask
        expected = loss_sum(ref.model(input_ids=batch["input_ids"]).logits, batch["labels"])
        torch.testing.assert_close(fast.loss_sum(batch), expected, rtol=FP32_REL, atol=0)
        # and the window matters here: the torch engine's packed mask (no window) differs
        assert abs(float(ref.loss_sum(batch) - expected)) > 1e-3


def test_training_curve_follows_the_torch_engine(tmp_path):
    """30 AdamW steps on both engines from the same start: the loss curves agree."""
    model_dir = tiny_model("llama", tmp_path / "m", num_hidden_layers=1)
    ref, fast = _engines(model_dir)
    curves = []
    for engine in (ref, fast):
        params = engine.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for step in range(30):
            batch = packed_batch(seed=step % 3, rows=((3, 4),))
            loss = engine.loss_sum(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        curves.append(torch.tensor(losses))
    assert curves[0][-3:].mean() < 0.7 * curves[0][:3].mean(), "the reference did not learn"
    # Adam divides by sqrt(v): fp32 differences grow over steps; 1e-4 still separates any real bug
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=0)


def test_saved_adapter_is_peft_format(tmp_path):
    model_dir = tiny_model("llama", tmp_path / "m")
    ref, fast = _engines(model_dir, lora_modules_to_save=["lm_head"])
    fast.save(tmp_path / "adapter")
    other = TorchEngine(_run(model_dir, lora_modules_to_save=["lm_head"]), model_dir, CPU)
    other.load_trainable(tmp_path / "adapter")
    theirs = dict(other.model.named_parameters())
    for name, p in fast.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(theirs[name], p), name


def _phi(tmp_path):
    from transformers import PhiConfig

    PhiConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, pad_token_id=0).save_pretrained(tmp_path / "phi")
    return tmp_path / "phi"


FALLBACKS = {
    "lora_dropout": (dict(lora_dropout=0.1), "lora_dropout 0.1 > 0"),
    "targets": (dict(lora_target_modules=["q_proj", "v_proj"]), "not exactly the seven projections"),
    "modules_to_save": (dict(lora_modules_to_save=["norm"]), "only ['embed_tokens', 'lm_head']"),
    "tied": ("gemma", "tied input/output embeddings"),
    "architecture": ("phi", "architecture 'phi' has no fused path"),
    "reward": (dict(rl="reward"), "rl: reward"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_uncovered_settings_fall_back_to_torch_with_the_reason(case, tmp_path, caplog, monkeypatch):
    overrides, reason = FALLBACKS[case]
    if case == "reward":  # the torch engine's reward model needs a tokenizer the tiny model lacks
        monkeypatch.setattr("tunedag.train.engines.TorchEngine", lambda run, path, device: "torch-engine")
        model_dir = tiny_model("llama", tmp_path / "m")
        overrides = dict(overrides, **_preference_data(model_dir, "reward"))
    elif overrides == "phi":
        model_dir, overrides = _phi(tmp_path), {}
        monkeypatch.setattr("tunedag.train.engines.TorchEngine", lambda run, path, device: "torch-engine")
    elif overrides == "gemma":
        model_dir, overrides = tiny_model("gemma", tmp_path / "g"), dict(lora_modules_to_save=["lm_head"])
    else:
        model_dir = tiny_model("llama", tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="tunedag.train.engines"):
        engine, why = model_engine(_run(model_dir, **overrides), model_dir, CPU)
    assert engine == "torch-engine" or isinstance(engine, TorchEngine)
    assert reason in why and f"using the torch engine because {why}" in caplog.text, caplog.text


def test_triton_is_chosen_when_covered(tmp_path):
    model_dir = tiny_model("llama", tmp_path / "m")
    one = DistEnv()
    engine = make_engine(_run(model_dir), model_dir, one)
    assert isinstance(engine.inner, TritonEngine) and engine.name == "triton" and "fallback_reason" not in engine.info
    engine = make_engine(_run(model_dir, train_engine="torch"), model_dir, one)
    assert isinstance(engine.inner, TorchEngine) and engine.name == "torch"
    # auto and ddp take the kernels on CUDA only (on the CPU the interpreter is for tests)
    for name in ("auto", "ddp"):
        engine = make_engine(_run(model_dir, train_engine=name), model_dir, one)
        assert isinstance(engine.inner, TritonEngine if torch.cuda.is_available() else TorchEngine)
        assert torch.cuda.is_available() or "no CUDA GPU" in engine.info["fallback_reason"]
    for rl in ("dpo", "orpo", "kto"):  # preference objectives take the fast path too
        engine = make_engine(_run(model_dir, **_preference_data(model_dir, rl)), model_dir, one)
        assert isinstance(engine.inner, TritonEngine) and engine.objective.run.rl == rl


def test_collate_segments_flatten_to_documents():
    from tunedag.models.packed_attention import PackedSequences

    batch = packed_batch(rows=((4, 6), (5,)))
    seq = PackedSequences.from_batch(batch["segment_ids"], batch["position_ids"], CPU)
    assert seq.cu_seqlens.tolist() == [0, 4, 10, 15] and seq.max_len == 6
    assert seq.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    assert seq.keep.tolist() == [True] * 10 + [True] * 5 + [False] * 5


# --------------------------------------------------------------------------- preference objectives

def _preference_data(model_dir, rl):
    """The run keys of an ``rl`` run (its datasets must be of the matching type)."""
    kind = "kto" if rl == "kto" else "dpo"
    return dict(rl=rl, datasets=[{"path": str(model_dir / "config.json"), "type": kind}])


def _perturb_full_modules(*engines):
    """Move the trained embed_tokens / lm_head copies away from the frozen originals, alike in each engine:
    else the reference (which must use the originals) could not tell them apart."""
    gen = torch.Generator().manual_seed(4)
    noise = {}
    for engine in engines:
        with torch.no_grad():
            for name, p in engine.model.named_parameters():
                if "modules_to_save" in name:
                    noise.setdefault(name, torch.randn(p.shape, generator=gen) * 0.05)
                    p.add_(noise[name])


KTO_LABELS = ((1, 0, 0, 1), (1, 1))  # the batch's segments: desirable 1, undesirable 0
PREFERENCE_CASES = {
    # trained embed_tokens and lm_head that the reference must switch off, checkpointing, cDPO smoothing
    "dpo-sigmoid": ("llama", dict(lora_modules_to_save=["embed_tokens", "lm_head"], gradient_checkpointing=True,
                                  dpo_label_smoothing=0.1, rl_beta=0.5)),
    "dpo-ipo": ("qwen2", dict(dpo_loss_type="ipo")),
    "dpo-qlora": ("llama", dict(adapter="qlora")),
    "orpo": ("gemma2", dict(orpo_alpha=0.5)),
    "kto": ("qwen3", dict(gradient_checkpointing=True, kto_desirable_weight=1.3)),
}


@pytest.mark.parametrize("case", list(PREFERENCE_CASES))
def test_preference_loss_and_gradients_match_the_torch_engine(case, tmp_path):
    """The packed policy pass, the adapters-off reference and the loss: triton engine = torch engine, fp32."""
    arch, overrides = PREFERENCE_CASES[case]
    model_dir = tiny_model(arch, tmp_path / arch)
    rl = case.split("-")[0]
    ref, fast = _engines(model_dir, **_preference_data(model_dir, rl), **overrides)
    _perturb_full_modules(ref, fast)
    batch = preference_batch(labels=KTO_LABELS if rl == "kto" else None)
    assert fast.objective.loss_units(batch) == ref.objective.loss_units(batch) == (6 if rl == "kto" else 3)
    _assert_same_step(ref, fast, batch)


def test_adapters_off_reference_is_the_base_model(tmp_path):
    """With the engine's adapters_off() (the reference pass) or inside peft's disable_adapter(), the fused
    modules run the frozen base alone and the trained embed_tokens / lm_head give way to the originals:
    log-probs equal the untouched HF model's. Afterwards all is back on."""
    model_dir = tiny_model("llama", tmp_path / "m")
    _, fast = _engines(model_dir, **_preference_data(model_dir, "dpo"),
                       lora_modules_to_save=["embed_tokens", "lm_head"])
    _perturb_full_modules(fast)
    batch = preference_batch(seed=1)
    trained = fast.trainable_parameters()
    expected = sequence_logps(load_causal_lm(model_dir), batch, CPU)

    @contextlib.contextmanager
    def peft_disabled():
        with torch.no_grad(), fast.model.disable_adapter():
            yield

    for switch in (fast.adapters_off, peft_disabled):
        with switch():
            reference = fast.sequence_logps(batch)
        assert reference.logps.grad_fn is None
        torch.testing.assert_close(reference.logps, expected.logps, rtol=FP32_REL, atol=0)
        assert torch.equal(reference.tokens, expected.tokens)
        policy = fast.sequence_logps(batch)
        assert (policy.logps - expected.logps).abs().min() > 1e-2  # the adapters are on again, and they matter
        assert fast.trainable_parameters() == trained  # peft re-enabled every adapter's requires_grad
    with fast.model.disable_adapter(), pytest.raises(RuntimeError, match="under torch.no_grad"):
        fast.sequence_logps(batch)  # the base-only path keeps nothing for backward: it refuses gradients
