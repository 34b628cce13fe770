"""master_weights: bf16_kahan on the engines: bf16 trained weights updated by KahanAdamW, a killed run that
resumes bit for bit (torch engine, and fsdp's sharded checkpoint), and the triton engine's full fine-tune
computing the gradients its fp32-master path computes at the same weights."""
import pytest
import torch

from tests.train.ranks import free_port, metrics
from tests.train.test_full_finetune import Killed, single, weights
from tests.train.test_triton_engine import FP32_REL, _rel
from tests.train.test_triton_full_finetune import _run
from tests.train.triton_models import packed_batch, tiny_model
from tunedag.train.checkpoint import list_checkpoints
from tunedag.train.engines import TorchEngine, make_optimizer
from tunedag.train.kahan_adamw import COMPENSATION, KahanAdamW
from tunedag.train.loop import train
from tunedag.train.ranks import DistEnv
from tunedag.train.triton_engine import TritonEngine

BF16_REL = 2.0 ** -8  # a gradient rounded once to bf16 (8 significant bits)


@pytest.mark.parametrize("engine", ["torch", "fsdp"])
def test_killed_run_resumes_to_the_same_bf16_weights(engine, sample_shards, tiny_model_dir, tmp_path, monkeypatch):
    """adamw_torch_8bit on bf16 weights, killed in step 5 after the step-3 checkpoint and run again:
    the same losses and bit-identical bf16 weights as a run never stopped."""
    src, shards = sample_shards
    run = single(src, train_engine=engine, optimizer="adamw_torch_8bit", master_weights="bf16_kahan",
                 max_steps=6, save_steps=3)
    env = DistEnv(master_port=free_port())
    train(run, shards, tiny_model_dir, tmp_path / "straight", env)
    real, calls = TorchEngine.loss_sum, []

    def dies_in_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise Killed()
        return real(self, batch)

    monkeypatch.setattr(TorchEngine, "loss_sum", dies_in_step_5)
    with pytest.raises(Killed):
        train(run, shards, tiny_model_dir, tmp_path / "resumed", env)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed/checkpoints")] == ["step-3"]
    monkeypatch.setattr(TorchEngine, "loss_sum", real)
    assert train(run, shards, tiny_model_dir, tmp_path / "resumed", env)["resumed_from"].endswith("step-3")
    timing = ("tokens_per_s", "elapsed_s")
    strip = [{k: v for k, v in m.items() if k not in timing} for m in metrics(tmp_path / "straight")]
    assert strip == [{k: v for k, v in m.items() if k not in timing} for m in metrics(tmp_path / "resumed")]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.bfloat16 and torch.equal(a[name], b[name]), name


def test_triton_engine_trains_bf16_weights_with_the_fp32_path_gradients(tmp_path):
    """The triton engine's full fine-tune under bf16_kahan keeps every trained weight in bf16 and takes
    KahanAdamW; on the CPU (fp32 compute) its loss is the fp32-master engine's at the same weight values,
    and its gradients are that engine's rounded once to bf16."""
    model_dir = tiny_model("llama", tmp_path / "llama")
    run = _run(model_dir, master_weights="bf16_kahan")
    fast, ref = TritonEngine(run, model_dir, torch.device("cpu")), TritonEngine(_run(model_dir), model_dir,
                                                                                 torch.device("cpu"))
    trained = dict(fast.model.named_parameters())
    assert trained and all(p.dtype == torch.bfloat16 for p in trained.values())
    with torch.no_grad():
        for name, p in ref.model.named_parameters():
            p.copy_(trained[name])  # fp32 masters holding the bf16 values
    batch = packed_batch(seed=0)
    losses = [e.loss_sum(batch) for e in (fast, ref)]
    for loss in losses:
        loss.backward()
    assert _rel(losses[0].detach(), losses[1].detach()) < FP32_REL
    for name, p in ref.model.named_parameters():
        got = trained[name].grad
        assert got.dtype == torch.bfloat16 and _rel(got.float(), p.grad) <= BF16_REL, name
    opt = make_optimizer(fast.trainable_parameters(), run, model=fast.model)
    assert isinstance(opt, KahanAdamW)
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt.step()
    assert all(p.dtype == torch.bfloat16 and COMPENSATION in opt.state[p] for p in trained.values())
    assert any(not torch.equal(before[n], p) for n, p in trained.items())
