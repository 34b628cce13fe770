"""master_weights: bf16_kahan on the engines: bf16 trained weights updated by KahanAdamW, and the triton
engine's full fine-tune computing the gradients its fp32-master path computes at the same weights (a killed
run's bit-exact resume is a case of tests/train/test_full_finetune.py)."""
import torch

from tests.train.test_triton_engine import FP32_REL, _rel
from tests.train.test_triton_full_finetune import _run
from tests.train.triton_models import packed_batch, tiny_model
from tunedag.train.engines import make_optimizer
from tunedag.train.kahan_adamw import COMPENSATION, KahanAdamW
from tunedag.train.triton_engine import TritonEngine

BF16_REL = 2.0 ** -8  # a gradient rounded once to bf16 (8 significant bits)


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
