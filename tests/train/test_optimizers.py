"""tunedag's own optimizers on one process: AdamW with block-wise quantized moments
(adamw_torch_8bit / adamw_torch_4bit) and Muon, against torch's AdamW and Muon, their state's
memory, a resume from a saved state dict, and a training run killed and resumed."""
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tunedag.config.axolotl import translate
from tunedag.train.engines import TorchEngine
from tunedag.train.loop import train
from tunedag.train.kahan_adamw import KahanAdamW
from tunedag.train.muon import Muon, muon_groups
from tunedag.train.optimizers import build_optimizer
from tunedag.train.quantized_adamw import QMAPS, QuantizedAdamW, dequantize, quantize, state_bytes
from tests.train.test_train import packed  # noqa: F401  (the fixture: tokenized sample rows)


def nearest_by_search(x: torch.Tensor, bits: int, signed: bool, block: int) -> torch.Tensor:
    """Reference: each block over its largest magnitude, the closest map value by exhaustive search."""
    qmap = QMAPS[bits, signed]
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1], block):
            chunk = x[r, start:start + block]
            scale = chunk.abs().max()
            idx = (chunk[:, None] / scale - qmap[None, :]).abs().argmin(-1)
            out[r, start:start + block] = qmap[idx] * scale
    return out


@pytest.mark.parametrize("bits, signed", [(8, True), (8, False), (4, True), (4, False)])
def test_quantize_rounds_each_element_to_its_blocks_nearest_map_value(bits, signed):
    """Rows of 301: two full blocks of 128 and a partial one, an odd count of 4-bit codes; values over
    six decades so the dynamic maps' small codes are used."""
    torch.manual_seed(bits)
    x = torch.randn(5, 301) * torch.logspace(-6, 0, 301)
    x = x if signed else x.abs()
    codes, scales = quantize(x, bits, signed, 128)
    assert codes.dtype == torch.uint8 and codes.shape == (5, 301 if bits == 8 else 151) and scales.shape == (5, 3)
    got = dequantize(codes, scales, bits, signed, 128, 301)
    torch.testing.assert_close(got, nearest_by_search(x, bits, signed, 128), rtol=0, atol=1e-7)


def regression(steps: int, make_opt) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    x, w_true = torch.randn(256, 96), torch.randn(96, 64)
    w = torch.nn.Parameter(torch.randn(64, 96) * 0.1)
    opt, losses = make_opt([w]), []
    for _ in range(steps):
        loss = ((x @ w.T - x @ w_true) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses, w.detach()


@pytest.mark.parametrize("bits, max_update_error, max_loss_ratio", [(8, 0.06, 1.02), (4, 0.45, 1.5)])
def test_quantized_adamw_follows_adamw(bits, max_update_error, max_loss_ratio):
    """30 steps of a least-squares fit (a 64 x 96 weight: 24 blocks of 8 bits, 48 of 4): the weight's
    total change within a share of AdamW's (measured 3.5% at 8 bits, 31% at 4 bits: 4-bit moments round
    small second moments up to 1/16 of their block's largest) and the loss close to AdamW's."""
    start = regression(0, lambda p: torch.optim.AdamW(p))[1]
    ref_losses, ref = regression(30, lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.01))
    losses, got = regression(30, lambda p: QuantizedAdamW(p, lr=3e-2, bits=bits, weight_decay=0.01))
    assert ((got - start) - (ref - start)).norm() / (ref - start).norm() < max_update_error
    assert losses[-1] < max_loss_ratio * ref_losses[-1] and losses[-1] < 0.3 * losses[0]


def test_unquantized_moments_are_adamw_exactly():
    """Weights under 4096 elements keep fp32 moments: the update is torch.optim.AdamW's."""
    torch.manual_seed(1)
    ref, got = (torch.nn.Parameter(torch.randn(40, 30)) for _ in range(2))
    got.data.copy_(ref.data)
    ours = QuantizedAdamW([got], lr=1e-2, bits=8, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    theirs = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(40, 30)
        ref.grad, got.grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda p: QuantizedAdamW(p, lr=1e-2, bits=8, weight_decay=0.1),
    lambda p: QuantizedAdamW(p, lr=1e-2, bits=4, weight_decay=0.1),
    lambda p: KahanAdamW(p, lr=1e-2, bits=8, weight_decay=0.1),
    lambda p: KahanAdamW(p, lr=1e-2, bits=None),
], ids=["8bit", "4bit", "kahan_8bit", "kahan_fp32_moments"])
def test_an_update_a_few_rows_at_a_time_equals_the_whole_weights(make, monkeypatch):
    """Large weights are updated in chunks of rows (CHUNK_ELEMENTS, to bound the step's temporaries);
    blocks never cross rows, so chunks of 2 rows (and of 1, for the odd 3-D expert weight) give the
    same weights and state, bit for bit, as one chunk."""
    import tunedag.train.quantized_adamw as qa

    def run(chunk: int) -> list[torch.Tensor]:
        monkeypatch.setattr(qa, "CHUNK_ELEMENTS", chunk)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(torch.bfloat16)) for shape in
                  ((37, 301), (3, 29, 150), (5000,))]  # rows not a multiple of the chunk; a 3-D weight; a vector
        opt = make(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return [p.detach().clone() for p in params] + [t for st in opt.state.values() for t in st.values()]

    whole, chunked = run(2**30), run(602)
    assert len(whole) == len(chunked)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, bits, block", [("adamw_torch_8bit", 8, 256), ("adamw_torch_4bit", 4, 128)])
def test_state_memory_is_codes_plus_one_scale_per_block(name, bits, block):
    """A 64 x 4096 weight: 64 x 4096 codes (8 bits) or half as many bytes (4 bits), and one fp32 scale per
    block of each row, for each moment; a 50-element bias keeps two fp32 moments; a step counter each."""
    weight, bias = torch.nn.Parameter(torch.zeros(64, 4096)), torch.nn.Parameter(torch.zeros(50))
    opt = build_optimizer([weight, bias], name, lr=1e-3, weight_decay=0.0)
    weight.grad, bias.grad = torch.randn(64, 4096), torch.randn(50)
    opt.step()
    codes = 64 * 4096 * bits // 8
    scales = 64 * (4096 // block) * 4
    assert state_bytes(opt) == 2 * (codes + scales) + 2 * 50 * 4 + 2 * 4
    adamw = torch.optim.AdamW([weight, bias])
    adamw.step()
    assert state_bytes(opt) / state_bytes(adamw) < (0.26 if bits == 8 else 0.14)


def run_steps(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()


@pytest.mark.parametrize("name", ["adamw_torch_8bit", "adamw_torch_4bit", "muon"])
def test_a_resumed_optimizer_ends_where_an_uninterrupted_one_does(name):
    """3 steps, state dict through torch.save, a new optimizer loads it, 3 more steps: the same weights
    as 6 uninterrupted steps, bit for bit; codes stay uint8 and a bf16 weight's moments fp32."""
    torch.manual_seed(2)
    shapes = {"model.layers.0.mlp.up_proj.weight": (80, 64), "model.embed_tokens.weight": (100, 64),
              "model.norm.weight": (64,)}
    start = {n: torch.randn(s) for n, s in shapes.items()}
    grads = [[torch.randn(s) for s in shapes.values()] for _ in range(6)]

    def fresh():
        params = [torch.nn.Parameter(start[n].clone().to(torch.bfloat16 if "norm" in n else torch.float32))
                  for n in shapes]
        return params, build_optimizer(list(zip(shapes, params)), name, lr=1e-2, weight_decay=0.1)

    whole, whole_opt = fresh()
    run_steps(whole_opt, whole, grads)
    first, first_opt = fresh()
    run_steps(first_opt, first, grads[:3])
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    buffer.seek(0)
    second, second_opt = fresh()
    for p, q in zip(second, first):
        p.data.copy_(q.data)
    second_opt.load_state_dict(torch.load(buffer))
    dtypes = {k: v.dtype for state in second_opt.state.values() for k, v in state.items()}
    assert dtypes.get("exp_avg_codes", torch.uint8) == torch.uint8 and dtypes["exp_avg_sq"] == torch.float32
    run_steps(second_opt, second, grads[3:])
    for p, q in zip(second, whole):
        assert torch.equal(p, q)


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attention_bias=True)
    return LlamaForCausalLM(config)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    """Axolotl's split: Muon (with weight decay) for the decoder's matrices; AdamW without weight decay for
    embed_tokens, lm_head, norms and biases."""
    model = tiny_llama()
    groups = muon_groups(model.named_parameters(), weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    split = {(g["use_muon"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups}
    matrices = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    assert split[True, 0.01] == matrices and len(matrices) == 2 * 7
    rest = split[False, 0.0]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(rest)
    assert all(n in rest for n in names.values() if n.endswith((".bias", "norm.weight")))
    assert set(split) == {(True, 0.01), (False, 0.0)}
    head, scale = torch.zeros(4, 4), torch.zeros(3)  # a PEFT modules_to_save copy; a vector that is no norm
    groups = muon_groups([("base_model.model.lm_head.modules_to_save.default.weight", head), ("x.scale", scale)], 0.1)
    assert [(g["use_muon"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups] == [
        (False, 0.0, [id(head)]), (False, 0.1, [id(scale)])]


@pytest.mark.parametrize("shape", [(48, 32), (24, 40)])
def test_muon_steps_follow_torch_muon(shape):
    """3 steps on one matrix: torch.optim.Muon's update (its lr scaled by sqrt(max(1, out / in)), ours by
    sqrt(out / in): equal lr for a tall matrix, torch's lr times sqrt(out / in) for a wide one). Both
    orthogonalise in bf16, from momenta that differ by a factor 1 - mu, hence 5% (measured 1.8%)."""
    torch.manual_seed(3)
    start = torch.randn(shape)
    ref, got = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    scale = min(1.0, (shape[0] / shape[1]) ** 0.5)
    theirs = torch.optim.Muon([ref], lr=0.02 * scale, weight_decay=0.0, momentum=0.95, nesterov=True)
    ours = Muon([{"params": [got], "use_muon": True}], lr=0.02)
    for _ in range(3):
        grad = torch.randn(shape)
        ref.grad, got.grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
    assert ((got - start) - (ref - start)).norm() / (ref - start).norm() < 0.05


def test_muon_trains_a_tiny_llama():
    """A few steps of next-token loss on one batch with optimizer: muon go down."""
    torch.manual_seed(4)
    model = tiny_llama()
    opt = build_optimizer(list(model.named_parameters()), "muon", lr=0.02, weight_decay=0.01, betas=(0.9, 0.95))
    batch = torch.randint(0, 128, (2, 16))
    losses = []
    for _ in range(6):
        loss = model(input_ids=batch, labels=batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.5


def test_a_run_killed_mid_training_resumes_its_optimizer_and_schedule(packed, tiny_model_dir, tmp_path, monkeypatch):
    """The loop (torch engine, LoRA + lm_head trained in full: 4-bit moments for lm_head) with Axolotl's cosine
    floor held from step int(5 * 0.6) = 3: killed in step 4, resumed from step 2, it ends with the
    uninterrupted run's weights and logs the schedule's learning rates."""
    run, shards = packed
    run = dataclasses.replace(run, optimizer="adamw_torch_4bit", max_steps=5, save_steps=2, micro_batch_size=1,
                              warmup_steps=1, cosine_min_lr_ratio=0.5, cosine_constant_lr_ratio=0.6)
    train(run, shards, tiny_model_dir, tmp_path / "straight")
    real_loss_sum, calls = TorchEngine.loss_sum, []

    def dies_in_step_4(self, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss_sum(self, batch)

    monkeypatch.setattr(TorchEngine, "loss_sum", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(run, shards, tiny_model_dir, tmp_path / "resumed")
    monkeypatch.setattr(TorchEngine, "loss_sum", real_loss_sum)
    assert train(run, shards, tiny_model_dir, tmp_path / "resumed")["resumed_from"].endswith("step-2")
    straight, resumed = (load_file(tmp_path / r / "adapter/adapter_model.safetensors") for r in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    logged = [json.loads(line)["learning_rate"] for line in (tmp_path / "resumed/train_metrics.jsonl").open()]
    factors = [1.0, 0.75, 0.5, 0.5, 0.5]  # after steps 1..5: warmup 1, cosine over steps 1..3, then the floor
    assert logged == pytest.approx([run.learning_rate * f for f in factors], rel=1e-9)


def test_an_axolotl_muon_run_takes_axolotls_adamw_betas():
    """Axolotl's Muon gives its AdamW part betas (0.9, 0.95) unless the config sets adam_beta2."""
    out, notes, refused = translate({"base_model": "x", "optimizer": "muon"}, "runs.r", Path("."))
    assert (out["optimizer"], out["adam_beta2"], refused) == ("muon", 0.95, [])
    assert any("adam_beta2: 0.95" in note for note in notes)
    assert translate({"base_model": "x", "optimizer": "muon", "adam_beta2": 0.99}, "runs.r", Path("."))[0][
        "adam_beta2"] == 0.99
