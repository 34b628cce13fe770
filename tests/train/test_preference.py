"""Preference training: losses against TRL's, chunked log-probs, a DPO run that learns, bad pairs."""
import dataclasses
import json
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tunedag.config import ConfigError
from tunedag.data.sample_task import INSTRUCTION
from tunedag.data.shards import ShardReader
from tunedag.models.loading import load_causal_lm
from tunedag.data.batches import PreferenceDataError, collate
from tunedag.evaluate.scores import kto_metrics, pair_logps, preference_metrics
from tunedag.models.logprobs import sequence_logps, token_logps
from tunedag.train.loop import TrainError, train
from tunedag.train.preference import dpo_losses, ipo_losses, kto_losses, orpo_odds_ratio
from tests.helpers import (preference_rows, tiny_run, tokenized_kto, tokenized_pairs, trl_trainer_state,
                           write_jsonl)

trl = pytest.importorskip("trl")
warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402


# --------------------------------------------------------------------------- losses vs TRL

def _fake_model(per_token: dict[int, torch.Tensor]):
    """A model whose fused-head outputs are the given per-token log-probs, keyed by input width."""
    def model(input_ids, **_):
        lp = per_token[input_ids.shape[1]]
        zeros = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    return model


def _completions(n, width, seed):
    """Per-token log-probs masked to random-length completions after a 2-token prompt."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i in range(n):
        mask[i, 2:2 + int(torch.randint(1, width - 2, (1,), generator=g))] = 1
    per_token = (-torch.rand(n, width - 1, generator=g) * 3) * mask[:, 1:]
    return mask, per_token


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl(loss_type):
    b, width, beta = 5, 9, 0.3
    mask, per_token = _completions(2 * b, width, seed=1)
    ref = -torch.rand(2 * b, generator=torch.Generator().manual_seed(2)) * 10
    inputs = {"input_ids": torch.ones(2 * b, width, dtype=torch.long), "attention_mask": torch.ones(2 * b, width),
              "completion_mask": mask, "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
    state = trl_trainer_state(precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                           use_weighting=False)
    expected = DPOTrainer._compute_loss(state, _fake_model({width: per_token}), inputs, False)
    logps, tokens = per_token.sum(1), mask.sum(1)
    if loss_type == "sigmoid":
        ours = dpo_losses(logps[:b], logps[b:], ref[:b], ref[b:], beta)
    else:
        ours = ipo_losses(logps[:b], logps[b:], ref[:b], ref[b:], beta, tokens[:b], tokens[b:])
    # both are a few fp32 ops on the same numbers: only rounding may differ
    torch.testing.assert_close(ours.mean(), expected, rtol=1e-6, atol=1e-6)


def test_dpo_label_smoothing_is_conservative_dpo():
    """TRL 1.x dropped smoothing from its sigmoid loss; checked against the cDPO formula written out."""
    chosen, rejected = torch.tensor([-3.0, -7.0]), torch.tensor([-5.0, -2.0])
    ref_c, ref_r = torch.tensor([-4.0, -6.0]), torch.tensor([-4.5, -3.0])
    beta, eps = 0.5, 0.2
    d = beta * ((chosen - ref_c) - (rejected - ref_r))
    p = 1 / (1 + torch.exp(-d))
    expected = -(1 - eps) * torch.log(p) - eps * torch.log(1 - p)
    torch.testing.assert_close(dpo_losses(chosen, rejected, ref_c, ref_r, beta, eps), expected)


def test_orpo_odds_ratio_equals_trl():
    g = torch.Generator().manual_seed(3)
    chosen = -torch.rand(16, generator=g) * 4 - 1e-3  # per-token mean log-probs, including near 0
    rejected = -torch.rand(16, generator=g) * 4 - 1e-3
    losses = ORPOTrainer.odds_ratio_loss(trl_trainer_state(beta=0.25), chosen, rejected)[0]
    torch.testing.assert_close(0.25 * orpo_odds_ratio(chosen, rejected), losses, rtol=1e-6, atol=1e-6)


def test_kto_equals_trl():
    n, width, beta = 8, 7, 0.2
    mask, per_token = _completions(n, width, seed=4)
    kl_mask, kl_per_token = _completions(n, width + 1, seed=5)  # another width tells the KL pass apart
    ref = -torch.rand(n, generator=torch.Generator().manual_seed(6)) * 8
    ref_kl = kl_per_token.sum(1) - 0.4  # a positive KL estimate, so the clamp does not hide it
    label = torch.tensor([True, False, True, True, False, False, True, False])
    inputs = {"input_ids": torch.ones(n, width, dtype=torch.long), "attention_mask": torch.ones(n, width),
              "completion_mask": mask, "KL_input_ids": torch.ones(n, width + 1, dtype=torch.long),
              "KL_attention_mask": torch.ones(n, width + 1), "KL_completion_mask": kl_mask, "label": label,
              "ref_logps": ref, "ref_KL_logps": ref_kl}
    state = trl_trainer_state(precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
                           desirable_weight=1.3, undesirable_weight=0.7)
    state._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, state)
    expected = KTOTrainer._compute_loss(state, _fake_model({width: per_token, width + 1: kl_per_token}), inputs, False)
    kl = (kl_per_token.sum(1) - ref_kl).mean().clamp(min=0)
    ours = kto_losses(per_token.sum(1), ref, label, beta, kl, 1.3, 0.7)
    torch.testing.assert_close(ours.mean(), expected, rtol=1e-6, atol=1e-6)


def test_kto_metrics_score_reward_signs_against_labels():
    policy = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    reference = torch.tensor([-2.0, -1.0, -4.0, -3.0, -5.0])  # ratios: +1, -1, +1, -1, 0
    labels = torch.tensor([1, 1, 0, 0, 1])
    out = kto_metrics(policy, labels, reference, beta=0.5)
    # right signs: sample 0 (desirable, +) and 3 (undesirable, -); sample 4's zero reward is wrong
    assert out["reward_accuracy"] == pytest.approx(2 / 5)
    assert out["desirable_reward"] == pytest.approx(0.5 * (1 - 1 + 0) / 3)
    assert out["undesirable_reward"] == pytest.approx(0.5 * (1 - 1) / 2)
    assert out["reward_margin"] == pytest.approx(out["desirable_reward"] - out["undesirable_reward"])
    assert kto_metrics(policy, labels, None, 0.5) == {"desirable": 3, "undesirable": 2,
                                                      "desirable_logp": pytest.approx(-8 / 3),
                                                      "undesirable_logp": pytest.approx(-3.5)}


# --------------------------------------------------------------------------- chunked log-probs

def test_chunked_logps_equal_full_logits(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, model.config.hidden_size, generator=g, requires_grad=True)
    target = torch.randint(0, model.config.vocab_size, (37,), generator=g)
    chunked = token_logps(hidden, target, head, chunk_tokens=8)  # 5 chunks, the last one short
    full = F.log_softmax(head(hidden).float(), -1).gather(-1, target[:, None])[:, 0]
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    weights = torch.randn(37, generator=g)
    grads = [torch.autograd.grad((x * weights).sum(), [hidden, head.weight]) for x in (chunked, full)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- a DPO run

@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory, tiny_model_dir):
    return tokenized_pairs(tmp_path_factory.mktemp("dpo"), tiny_model_dir, preference_rows(400, seed=0),
                           val_set_size=64, learning_rate=1e-2, rl_beta=0.5, lr_scheduler="constant",
                           micro_batch_size=4, save_steps=1000)


def test_sequence_logps_of_a_packed_batch_equal_each_sample_alone(dpo_data, tiny_model_dir):
    _, packed = dpo_data
    model = load_causal_lm(tiny_model_dir).eval()
    row = ShardReader(packed / "train").row(0)
    with torch.no_grad():
        seq = sequence_logps(model, collate([row], 0), torch.device("cpu"), chunk_tokens=5)
        alone = []
        for a, b in zip(row["cu_seqlens"][:-1], row["cu_seqlens"][1:]):
            ids = torch.from_numpy(row["input_ids"][a:b].astype("int64"))[None]
            labels = torch.from_numpy(row["labels"][a:b].astype("int64"))[1:]
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            keep = labels != -100
            alone.append(logp[keep].gather(-1, labels[keep][:, None]).sum())
    assert len(alone) >= 4 and seq.labels.tolist() == [1, 0] * (len(alone) // 2)
    torch.testing.assert_close(seq.logps, torch.stack(alone), rtol=1e-5, atol=1e-4)


def test_dpo_run_raises_held_out_preference_accuracy(dpo_data, tiny_model_dir, tmp_path):
    run, packed = dpo_data
    run = dataclasses.replace(run, max_steps=15)
    info = train(run, packed, tiny_model_dir, tmp_path / "run")
    from peft import PeftModel

    base = load_causal_lm(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), tmp_path / "run/adapter").eval()
    base_pairs = pair_logps(base, packed / "val", pad_id=0)
    before = preference_metrics(base_pairs, None, run.rl_beta)
    after = preference_metrics(pair_logps(tuned, packed / "val", pad_id=0), base_pairs, run.rl_beta)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run/train_metrics.jsonl").read_text().splitlines()]
    print(f"held-out: {before} -> {after}; loss {losses[0]:.4f} -> {np.mean(losses[-5:]):.4f}")
    assert info["steps"] == 15 and after["pairs"] >= 60 and set(before) == {"pairs", "preference_accuracy",
                                                                           "logp_margin"}
    assert losses[0] == pytest.approx(np.log(2), abs=1e-4)  # step 1: policy = reference, loss = log 2
    # 64 held-out pairs: 0.85 is 5.6 standard errors above chance
    assert after["preference_accuracy"] >= 0.85 and after["preference_accuracy"] > before["preference_accuracy"] + 0.2
    assert after["reward_accuracy"] >= 0.85 and after["reward_margin"] > 0


def test_orpo_and_kto_train(tmp_path, tiny_model_dir, dpo_data):
    run, packed = dpo_data
    info = train(dataclasses.replace(run, rl="orpo", max_steps=3), packed, tiny_model_dir, tmp_path / "orpo")
    assert info["steps"] == 3 and np.isfinite(info["final_loss"])
    kto, kto_packed = tokenized_kto(tmp_path / "kto", tiny_model_dir, 40, seed=1, max_steps=3, val_set_size=4)
    info = train(kto, kto_packed, tiny_model_dir, tmp_path / "kto/run")
    assert info["steps"] == 3 and np.isfinite(info["final_loss"])


# --------------------------------------------------------------------------- bad input

def test_identical_pair_stops_training_naming_the_row(tmp_path, tiny_model_dir, monkeypatch):
    """tokenize never writes such a pair (tests/data/test_tokenize.py); shards from older code might."""
    monkeypatch.setattr("tunedag.data.tokenize._identical_pair", lambda sample: False)
    rows = [{"prompt": f"{INSTRUCTION}\nred cat", "chosen": "cat", "rejected": "cat"}] + preference_rows(11, seed=2)
    run, packed = tokenized_pairs(tmp_path, tiny_model_dir, rows, val_set_size=1, sample_packing=False, seed=3)
    with pytest.raises(PreferenceDataError, match=r"train/shard-00000.arrow: row \d+, pair 0: chosen and "
                                                  r"rejected responses are identical"):
        train(dataclasses.replace(run, max_steps=1), packed, tiny_model_dir, tmp_path / "run")
    assert not (tmp_path / "run/adapter").exists()


def test_empty_response_is_dropped_and_counted(tmp_path, tiny_model_dir):
    """The tokenize stage drops a pair with an empty response (no trained token besides its first)."""
    rows = [{"prompt": f"{INSTRUCTION}\nred cat", "chosen": "", "rejected": "cat"}] + preference_rows(11, seed=2)
    _, packed = tokenized_pairs(tmp_path, tiny_model_dir, rows, val_set_size=1, sample_packing=False)
    manifest = json.loads((packed / "manifest.json").read_text())
    assert manifest["counts"]["no_trained_tokens_dropped"] == 1


def test_rl_needs_preference_data(tmp_path, tiny_model_dir, dpo_data):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(ConfigError, match=r"rl: dpo trains on type: dpo data; 'a' are not"):
        tiny_run(src, rl="dpo")
    with pytest.raises(ConfigError, match=r"rl: reward trains on type: dpo data; 'a' are not"):
        tiny_run(src, rl="reward")
    run, packed = dpo_data
    with pytest.raises(TrainError, match="objective 'dpo' cannot train rl: None"):
        train(dataclasses.replace(run, rl=None), packed, tiny_model_dir, tmp_path / "run")
