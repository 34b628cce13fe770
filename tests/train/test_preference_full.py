"""Preference training as a full fine-tune (``adapter: null``): every weight trains, and dpo, ipo and kto
compare with a frozen second copy of the base (orpo needs none). CPU, fp32."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tunedag.data.batches import collate
from tunedag.data.shards import ShardReader
from tunedag.merge.full import merge_full_model
from tunedag.models.loading import load_causal_lm
from tunedag.train.engines import TorchEngine, make_engine
from tunedag.train.loop import train
from tunedag.train.ranks import DistEnv
from tests.helpers import preference_rows, tokenized_kto, tokenized_pairs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def full_pairs(tmp_path_factory, tiny_model_dir):
    return tokenized_pairs(tmp_path_factory.mktemp("dpo-full"), tiny_model_dir, preference_rows(48, seed=0),
                           adapter=None, val_set_size=8, learning_rate=1e-3, rl_beta=0.5,
                           lr_scheduler="constant", micro_batch_size=4)


def _batch(packed, rows=3):
    rows = [ShardReader(packed / "train").row(i) for i in range(rows)]
    return rows, collate(rows, 0)


def _segment_logps(model, rows):
    """Each sample alone through ``model`` (unpacked, full logits): its response log-prob, in row order."""
    out = []
    for row in rows:
        cu = row["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:]):
            ids = torch.from_numpy(row["input_ids"][a:b].astype("int64"))[None]
            labels = torch.from_numpy(row["labels"][a:b].astype("int64"))[1:]
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            keep = labels != -100
            out.append(logp[keep].gather(-1, labels[keep][:, None]).sum())
    return torch.stack(out)


def test_full_dpo_starts_at_log2_and_its_gradient_is_dpos_against_the_frozen_base(full_pairs, tiny_model_dir):
    run, packed = full_pairs
    engine = TorchEngine(run, tiny_model_dir, CPU)
    reference = engine.objective.reference
    assert reference is not None and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in engine.model.parameters())
    rows, batch = _batch(packed)
    units = engine.objective.loss_units(batch)
    # step 1: the policy is the reference, every log-ratio is 0 (the same fp32 computation both ways)
    assert float(engine.loss_sum(batch).detach() / units) == pytest.approx(math.log(2), abs=1e-6)

    with torch.no_grad():  # move the policy away from the base, so the reference's own values matter
        g = torch.Generator().manual_seed(0)
        for p in engine.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    params = list(engine.model.parameters())
    ours = engine.loss_sum(batch) / units
    base = load_causal_lm(tiny_model_dir).eval()  # an independent copy of the base as the reference
    policy = _segment_logps(engine.model, rows)
    with torch.no_grad():
        ref = _segment_logps(base, rows)
    delta = (policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2])
    expected = -F.logsigmoid(run.rl_beta * delta).mean()
    assert units == len(delta) >= 6 and abs(float(expected) - math.log(2)) > 1e-3  # the policy moved
    # fp32 both ways; packed and single-sample attention sum in another order, nothing more
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_full_dpo_steps_train_every_weight_and_leave_the_reference_alone(full_pairs, tiny_model_dir):
    run, packed = full_pairs
    engine = make_engine(run, tiny_model_dir, DistEnv())
    reference = engine.objective.reference
    ref_before = {n: t.clone() for n, t in reference.state_dict().items()}
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    assert not {id(p) for p in reference.parameters()} & {id(p) for g in engine.optimizer.param_groups
                                                           for p in g["params"]}
    for step in range(2):
        _, batch = _batch(packed, rows=2)
        engine.backward(engine.loss_sum(batch) / engine.objective.loss_units(batch))
        engine.step(run.max_grad_norm)
    assert all(p.grad is None for p in reference.parameters())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, ref_before[name]), name
    unchanged = [n for n, p in engine.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged


def test_full_dpo_run_writes_the_whole_model_and_merges(full_pairs, tiny_model_dir, tmp_path):
    run, packed = full_pairs
    run = dataclasses.replace(run, max_steps=2)
    info = train(run, packed, tiny_model_dir, tmp_path / "run")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run/train_metrics.jsonl").read_text().splitlines()]
    assert info["steps"] == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-5)
    trained = load_file(tmp_path / "run/adapter/model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert trained.keys() == base.keys() and not (tmp_path / "run/adapter/adapter_config.json").exists()
    assert all(not torch.equal(trained[n], base[n]) for n in base)
    report = merge_full_model(run, tiny_model_dir, tmp_path / "run/adapter", tmp_path / "merged")
    assert report["relative_logit_error"] < 1e-4


@pytest.mark.parametrize("loss", ["ipo", "orpo"])
def test_full_ipo_and_orpo(full_pairs, tiny_model_dir, loss):
    """IPO compares with the frozen base (step 1: every log-ratio 0, loss (1/(2β))²); ORPO loads no reference."""
    run, packed = full_pairs
    run = dataclasses.replace(run, rl="orpo") if loss == "orpo" else dataclasses.replace(run, dpo_loss_type="ipo")
    engine = TorchEngine(run, tiny_model_dir, CPU)
    _, batch = _batch(packed, rows=2)
    value = engine.loss_sum(batch) / engine.objective.loss_units(batch)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.model.parameters())
    if loss == "orpo":
        assert engine.objective.reference is None and math.isfinite(float(value))
    else:
        assert engine.objective.reference is not None
        assert float(value) == pytest.approx((1 / (2 * run.rl_beta)) ** 2, rel=1e-6)


def test_full_kto_compares_with_the_frozen_base(tmp_path, tiny_model_dir):
    run, _ = tokenized_kto(tmp_path, tiny_model_dir, 16, seed=1, adapter=None, val_set_size=2,
                           kto_desirable_weight=1.5, kto_undesirable_weight=0.5)
    engine = TorchEngine(run, tiny_model_dir, CPU)
    batch = collate([ShardReader(tmp_path / "packed/train").row(0)], 0)
    labels = batch["segment_labels"][batch["segment_labels"] >= 0]
    # step 1: every log-ratio and the reference point are 0, so each sample's loss is its weight × (1 - σ(0))
    expected = float(torch.where(labels.bool(), 1.5, 0.5).sum()) / 2
    assert engine.objective.reference is not None and 0 < labels.sum() < len(labels)
    assert float(engine.loss_sum(batch)) == pytest.approx(expected, rel=1e-6)


def test_triton_engine_full_dpo_matches_the_torch_engine(full_pairs, tiny_model_dir):
    """The fused decoder against transformers' on one batch, the policy moved off the base alike in both."""
    from tunedag.train.triton_engine import TritonEngine

    run, packed = full_pairs
    run = dataclasses.replace(run, train_engine="triton")
    engines = [TorchEngine(run, tiny_model_dir, CPU), TritonEngine(run, tiny_model_dir, CPU)]
    for engine in engines:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for _, p in sorted(engine.model.named_parameters()):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    _, batch = _batch(packed, rows=1)  # the interpreted kernels are slow: one row of pairs
    losses = [e.loss_sum(batch) for e in engines]
    for loss in losses:
        loss.backward()
    # fp32 on both; the kernels sum in another order (tests/train/test_triton_engine.py: 1e-5 relative)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    grads = [dict(e.model.named_parameters()) for e in engines]
    for name, p in grads[0].items():
        torch.testing.assert_close(grads[1][name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
