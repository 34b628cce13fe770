"""gpt-oss on the torch engine: packed rows, LoRA on attention and every expert (the triton engine:
tests/train/test_gpt_oss_triton.py).

A tiny random gpt-oss (2 layers: one sliding-window layer with a 4-token window, one global; 4 experts,
top-2; attention sinks, attention and expert biases, the clamped SwiGLU) built from GptOssConfig, fp32
on the CPU. HF's gpt-oss attention is eager with the sinks in the softmax, under the packed mask.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig

from tests.helpers import tiny_run
from tests.train.triton_models import VOCAB, packed_batch
from tunedag.models.batch_inputs import loss_sum
from tunedag.train.engines import TorchEngine

CPU = torch.device("cpu")
# rows of documents longer than the window, so the sliding layer's window shows in the loss
ROWS = ((7, 9), (10,))


def gpt_oss_config(**overrides) -> GptOssConfig:
    keys = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 8})
    return GptOssConfig(**{**keys, **overrides})


def tiny_gpt_oss(dest, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt_oss_config(**overrides)).float()
    with torch.no_grad():  # biases start at 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0, 0.3)
    model.save_pretrained(dest)
    return dest


def _engine(model_dir, **keys) -> TorchEngine:
    run = tiny_run(model_dir / "config.json", base_model=str(model_dir), lora_r=8, lora_alpha=16,
                   train_engine="torch", **keys)
    engine = TorchEngine(run, model_dir, CPU)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0: make the adapters change the function
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return engine


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _documents(batch):
    """(input_ids (1, n), labels (1, n)) of every document of every packed row."""
    for row in range(batch["input_ids"].shape[0]):
        segments = batch["segment_ids"][row]
        for seg in segments.unique():
            if seg > 0:
                at = segments == seg
                yield batch["input_ids"][row, at][None], batch["labels"][row, at][None]


def _separate_loss(model, batch) -> torch.Tensor:
    """Each document through the model alone (transformers' own causal and window masks), summed."""
    return sum(loss_sum(model(input_ids=ids).logits, labels) for ids, labels in _documents(batch))


def test_packed_rows_train_as_their_documents_alone(tmp_path):
    """Loss and every adapter gradient of packed rows equal the documents' own, through sinks and the window."""
    engine = _engine(tiny_gpt_oss(tmp_path / "m"))
    adapted = {n.split(".lora_A")[0].split("layers.0.")[-1] for n, _ in engine.model.named_parameters()
               if "layers.0." in n and "lora_A" in n}
    # peft nests gate_up_proj's wrapper inside down_proj's, both on the experts module
    assert adapted == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.experts", "mlp.experts.base_layer"}
    batch = packed_batch(seed=1, rows=ROWS)
    packed = engine.loss_sum(batch)
    packed.backward()
    got = {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.requires_grad}
    engine.model.zero_grad()
    alone = _separate_loss(engine.model, batch)
    alone.backward()
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=0)
    for name, p in engine.model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name
            assert _rel(got[name], p.grad) < 1e-5, name
    with torch.no_grad():  # the window matters at these lengths: without it the loss moves
        engine.model.config.sliding_window = 64
        assert abs(float(_separate_loss(engine.model, batch)) - float(alone)) > 1e-3


def test_router_loss_on_packed_rows(tmp_path):
    """output_router_logits: the loss adds router_aux_loss_coef x the load-balancing loss over real tokens."""
    from tunedag.models.moe import load_balancing_loss

    engine = _engine(tiny_gpt_oss(tmp_path / "m", output_router_logits=True, router_aux_loss_coef=0.5))
    batch = packed_batch(seed=1, rows=ROWS)
    with torch.no_grad():
        loss = engine.loss_sum(batch)
        plain = _separate_loss(engine.model, batch)
        # each document's router logits alone, per layer, over all documents
        per_doc = [engine.model(input_ids=ids, output_router_logits=True).router_logits for ids, _ in _documents(batch)]
        aux = load_balancing_loss([torch.cat(layer) for layer in zip(*per_doc)], 4, 2)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert float(aux) > 0
    torch.testing.assert_close(loss, plain + 0.5 * aux * n, rtol=1e-5, atol=0)


def test_config_check_knows_gpt_oss_names(tmp_path):
    from tunedag.errors import TunedagError

    model_dir = tiny_gpt_oss(tmp_path / "m")
    run = tiny_run(model_dir / "config.json", base_model=str(model_dir), lora_target_modules=["q_proj", "down_proj"])
    assert run.lora_target_modules == ["q_proj", "down_proj"]
    with pytest.raises(TunedagError, match="no module named 'c_attn'"):
        tiny_run(model_dir / "config.json", base_model=str(model_dir), lora_target_modules=["c_attn"])
