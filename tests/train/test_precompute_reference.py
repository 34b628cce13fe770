"""precompute_ref_log_probs: dpo and kto take the reference's log-probs from a table computed once before the
first step, and train as they do with a reference pass in every step (CPU, fp32)."""
import dataclasses
import json

import numpy as np
import pytest

from tunedag.config import ConfigError
from tunedag.data.shards import ShardReader
from tunedag.train.loop import train
from tunedag.train.preference import PreferenceObjective
from tests.helpers import preference_rows, tiny_run, tokenized_kto, tokenized_pairs, write_jsonl

STEPS = 4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model_dir):
    return tokenized_pairs(tmp_path_factory.mktemp("precompute"), tiny_model_dir, preference_rows(40, seed=4),
                           val_set_size=2, learning_rate=1e-2, rl_beta=0.5, lr_scheduler="constant",
                           micro_batch_size=3, max_steps=STEPS, save_steps=2)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]


def count_reference_passes(monkeypatch) -> list[int]:
    """Counts the reference's forward passes (PreferenceObjective.live_reference), in a one-item list."""
    calls = [0]
    live = PreferenceObjective.live_reference

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return live(self, *args, **kwargs)

    monkeypatch.setattr(PreferenceObjective, "live_reference", counted)
    return calls


@pytest.mark.parametrize("overrides", [{}, {"adapter": None, "learning_rate": 1e-3}, {"dpo_loss_type": "ipo"}],
                         ids=["lora", "full_finetune", "ipo"])
def test_precomputed_reference_trains_as_the_reference_pass_does(pairs, tiny_model_dir, tmp_path, monkeypatch,
                                                                  overrides):
    run, packed = pairs
    run = dataclasses.replace(run, **overrides)
    calls = count_reference_passes(monkeypatch)
    train(run, packed, tiny_model_dir, tmp_path / "live")
    live_calls, calls[0] = calls[0], 0
    train(dataclasses.replace(run, precompute_ref_log_probs=True), packed, tiny_model_dir, tmp_path / "table")
    rows = len(ShardReader(packed / "train"))
    assert live_calls == STEPS  # one reference pass per micro-batch
    assert calls[0] == -(-rows // run.micro_batch_size)  # one pass over the rows, none in the steps
    np.testing.assert_allclose(losses(tmp_path / "table"), losses(tmp_path / "live"), rtol=1e-5, atol=1e-6)


def test_kto_with_a_precomputed_reference(tmp_path, tiny_model_dir):
    run, packed = tokenized_kto(tmp_path, tiny_model_dir, 30, seed=5, max_steps=3, val_set_size=2,
                                micro_batch_size=2, learning_rate=1e-2)
    train(run, packed, tiny_model_dir, tmp_path / "live")
    train(dataclasses.replace(run, precompute_ref_log_probs=True), packed, tiny_model_dir, tmp_path / "table")
    np.testing.assert_allclose(losses(tmp_path / "table"), losses(tmp_path / "live"), rtol=1e-5, atol=1e-6)


def test_a_resumed_run_reads_the_table_instead_of_computing_it(pairs, tiny_model_dir, tmp_path, monkeypatch):
    run, packed = pairs
    run = dataclasses.replace(run, precompute_ref_log_probs=True)
    train(run, packed, tiny_model_dir, tmp_path / "whole")

    def stopped_after_step_2(run_dir):
        polls = []
        assert train(run, packed, tiny_model_dir, run_dir, should_stop=lambda: polls.append(1) or
                     len(polls) == 2) is None
        return run_dir / "checkpoints/reference_logps.rank0.npz"

    assert stopped_after_step_2(tmp_path / "r").is_file()
    calls = count_reference_passes(monkeypatch)
    info = train(run, packed, tiny_model_dir, tmp_path / "r")
    assert info["resumed_from"].endswith("step-2") and calls[0] == 0
    np.testing.assert_allclose(losses(tmp_path / "r"), losses(tmp_path / "whole"), rtol=1e-6)

    # a table written with another resume key (config, data, base model) is computed again, not trusted
    table = stopped_after_step_2(tmp_path / "r2")
    with np.load(table) as saved:
        offsets, values = saved["offsets"], saved["values"]
    with open(table, "wb") as f:
        np.savez(f, key=np.array("another run"), offsets=offsets, values=values + 1.0)
    info = train(run, packed, tiny_model_dir, tmp_path / "r2")
    assert info["resumed_from"].endswith("step-2") and calls[0] > 0
    np.testing.assert_allclose(losses(tmp_path / "r2"), losses(tmp_path / "whole"), rtol=1e-6)

    # and one that cannot be read (cut short) is computed again too
    table = stopped_after_step_2(tmp_path / "r3")
    table.write_bytes(table.read_bytes()[:100])
    calls[0] = 0
    info = train(run, packed, tiny_model_dir, tmp_path / "r3")
    assert info["resumed_from"].endswith("step-2") and calls[0] > 0
    np.testing.assert_allclose(losses(tmp_path / "r3"), losses(tmp_path / "whole"), rtol=1e-6)


def test_precompute_needs_a_reference(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", preference_rows(2, seed=0))
    with pytest.raises(ConfigError, match=r"precompute_ref_log_probs: only dpo and kto compare with a reference "
                                          r"model; rl: orpo has none"):
        tiny_run(src, datasets=[{"path": str(src), "type": "dpo"}], rl="orpo", precompute_ref_log_probs=True)


@pytest.mark.parametrize("engine_name", ["torch", "triton"])
def test_each_engine_takes_the_batchs_reference_log_probs(pairs, tiny_model_dir, engine_name):
    """An engine's loss from a batch carrying its own reference log-probs equals its loss with the reference
    pass; other values in the batch change the loss (they are what it uses)."""
    import torch

    from tunedag.data.batches import collate
    from tunedag.train.engines import TorchEngine
    from tunedag.train.preference import REFERENCE_LOGPS
    from tunedag.train.triton_engine import TritonEngine

    run, packed = pairs
    cpu = torch.device("cpu")
    engine = (TritonEngine(dataclasses.replace(run, train_engine="triton"), tiny_model_dir, cpu)
              if engine_name == "triton" else TorchEngine(run, tiny_model_dir, cpu))
    with torch.no_grad():  # move the policy off the reference (LoRA's B starts at zero)
        g = torch.Generator().manual_seed(0)
        for p in engine.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = collate([ShardReader(packed / "train").row(0)], 0)  # the interpreted kernels are slow: one row
    with torch.no_grad():
        live = engine.loss_sum(batch)
        reference = engine.reference_logps(batch).logps
        taken = engine.loss_sum({**batch, REFERENCE_LOGPS: reference})
        shifted = engine.loss_sum({**batch, REFERENCE_LOGPS: reference + torch.arange(len(reference)) % 2})
    torch.testing.assert_close(taken, live, rtol=1e-6, atol=0)
    assert not torch.isclose(shifted, live)
