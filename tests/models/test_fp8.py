"""fp8 training's math against an emulation (quantize → dequantize → float32 matmul) on awkward shapes, which
layers it converts, and the refusal on devices without float8 matmuls. torch's CPU ``_scaled_mm`` runs the
same float8 products the GPU does (float32 accumulation); tests/gpu/test_fp8_gpu.py repeats this on CUDA."""
import pytest
import torch

from tests.helpers import tiny_run
from tunedag.models.fp8 import E4M3, E5M2, Float8Linear, Fp8Error, Fp8Matmul, convert_to_fp8, require_fp8_device, to_fp8
from tunedag.train.engines import TorchEngine


def cpu_scaled_mm_available() -> bool:
    one = torch.tensor(1.0)
    try:
        torch._scaled_mm(torch.zeros(16, 16, dtype=E4M3), torch.zeros(16, 16, dtype=E4M3).t(), scale_a=one,
                         scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_scaled_mm = pytest.mark.skipif(not cpu_scaled_mm_available(), reason="this torch has no CPU _scaled_mm")


def emulate(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` through ``dtype`` with a per-tensor scale (max / amax), back in float32: written independently."""
    t = t.double()
    scale = torch.finfo(dtype).max / t.abs().max().clamp(min=1e-12)
    return ((t * scale).float().to(dtype).double() / scale).float()


def test_cast_scale_maps_amax_to_the_format_max():
    x = torch.randn(5, 48) * 3
    x8, inv = to_fp8(x, E4M3)
    assert x8.float().abs().max() == 448 and torch.isclose(inv, x.abs().max() / 448)
    torch.testing.assert_close(x8.float() * inv, emulate(x, E4M3), rtol=1e-6, atol=0)
    # E4M3 keeps 3 mantissa bits: every value within 1/16 of itself (or a quarter step near zero)
    assert ((x8.float() * inv - x).abs() <= x.abs() / 16 + inv * 2 ** -9).all()
    zeros8, _ = to_fp8(torch.zeros(3, 16), E5M2)
    assert torch.equal(zeros8.float(), torch.zeros(3, 16))


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 accumulation order: the same float8 products summed in float32 in another order
    differ by a few float32 ulps of the largest partial sum (entries near zero by that much absolutely)."""
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@needs_scaled_mm
@pytest.mark.parametrize("m,k,n", [(16, 32, 48), (48, 96, 16)])
def test_matmul_and_its_gradients_match_the_emulation(m, k, n):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(m, k, generator=g) * 2).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 0.1).requires_grad_()
    grad = torch.randn(m, n, generator=g) * 1e-3
    y = Fp8Matmul.apply(x, w, torch.float32)
    y.backward(grad)
    xq, wq, gq = emulate(x.detach(), E4M3), emulate(w.detach(), E4M3), emulate(grad, E5M2)
    close(y, xq @ wq.t())
    close(x.grad, gq @ wq)
    close(w.grad, gq.t() @ xq)


@needs_scaled_mm
def test_layer_pads_odd_row_counts_and_adds_the_bias():
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 16, bias=True)
    layer = Float8Linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 7, 32, requires_grad=True)  # 21 rows: padded to 32 inside
    y = layer(x)
    xq, wq = emulate(x.detach().reshape(21, 32), E4M3), emulate(linear.weight.detach(), E4M3)
    close(y, (xq @ wq.t() + linear.bias.detach()).reshape(3, 7, 16))
    y.square().sum().backward()
    assert x.grad.shape == x.shape and linear.weight.grad is not None and linear.bias.grad is not None


def test_first_and_last_linear_and_odd_sizes_stay_plain():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 48), torch.nn.Linear(48, 40),
                                torch.nn.Linear(40, 32), torch.nn.Linear(32, 8))
    assert convert_to_fp8(model) == ["1"]  # 0: first, 4: last, 2 and 3: 40 is not a multiple of 16
    assert isinstance(model[1], Float8Linear) and type(model[2]) is torch.nn.Linear


def test_refused_at_start_without_float8_matmuls(sample_shards, tiny_model_dir):
    with pytest.raises(Fp8Error, match="needs a CUDA GPU of compute capability 8.9 or newer.*trains on cpu"):
        require_fp8_device(torch.device("cpu"))
    src, _ = sample_shards
    run = tiny_run(src, adapter=None, lora_modules_to_save=[], fp8=True, train_engine="torch")
    with pytest.raises(Fp8Error, match="Remove fp8"):
        TorchEngine(run, tiny_model_dir, torch.device("cpu"))
