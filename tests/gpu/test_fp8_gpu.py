"""fp8 and qat on CUDA: float8 matmuls through cuBLAS against the emulation, the fake quantizers bit-equal to
the CPU's, and the torch engine training the built-in model with each. Skipped without CUDA; the fp8 tests
also without a GPU of compute capability 8.9+."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from tests.helpers import tiny_run  # noqa: E402
from tests.models.test_fp8 import emulate  # noqa: E402
from tests.train.ranks import metrics  # noqa: E402
from tunedag.models.fake_quant import int4_weight, int8_token, mxfp4, nvfp4  # noqa: E402
from tunedag.models.fp8 import E4M3, E5M2, Float8Linear, Fp8Matmul, cast, to_fp8  # noqa: E402
from tunedag.train.loop import train  # noqa: E402

CUDA = torch.device("cuda")
needs_fp8 = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                               reason="float8 matmuls need compute capability 8.9+")
FULL = dict(adapter=None, lora_modules_to_save=[], learning_rate=1e-3, max_steps=6, train_engine="torch")


@needs_fp8
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_fused_cuda_cast_equals_the_cpu_cast(dtype):
    x = torch.randn(1000, 3072) * torch.rand(1000, 1) * 30
    x8, inv = cast(x.to(CUDA).bfloat16(), dtype)
    ref8, ref_inv = to_fp8(x.bfloat16(), dtype)
    assert torch.equal(x8.cpu().view(torch.uint8), ref8.view(torch.uint8))
    torch.testing.assert_close(inv.cpu(), ref_inv, rtol=2.4e-7, atol=0)  # one float32 bit at most


@needs_fp8
@pytest.mark.parametrize("m,k,n", [(4096, 3072, 8192), (48, 112, 16)])
def test_cublas_matmul_and_gradients_match_the_emulation(m, k, n):
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(m, k, device=CUDA, generator=g).requires_grad_()
    w = (torch.randn(n, k, device=CUDA, generator=g) * 0.02).requires_grad_()
    grad = torch.randn(m, n, device=CUDA, generator=g) * 1e-4
    y = Fp8Matmul.apply(x, w, torch.float32)
    y.backward(grad)
    xq, wq, gq = (emulate(t, d).double() for t, d in ((x.detach(), E4M3), (w.detach(), E4M3), (grad, E5M2)))
    errors = {}
    for name, got, ref in (("y", y, xq @ wq.t()), ("dx", x.grad, gq @ wq), ("dw", w.grad, gq.t() @ xq)):
        errors[name] = float((got.detach().double() - ref).abs().max() / ref.abs().max())
    print(f"{m}x{k}x{n}: largest error / largest value", {k_: f"{v:.1e}" for k_, v in errors.items()})
    # The float8 inputs are the emulation's exactly (the cast test above); what remains is the sum: Hopper's
    # float8 MMA adds in fewer bits than float32 before cuBLAS promotes, 2.3e-3 of the largest value measured
    # at k = 3072 on an H200. A wrong scale, layout or format is off by order 1.
    assert max(errors.values()) < 5e-3, errors


@needs_fp8
def test_layer_under_bf16_autocast_gives_bf16_and_pads_rows():
    linear = torch.nn.Linear(256, 512, bias=True, device=CUDA)
    layer = Float8Linear(linear)
    x = torch.randn(3, 37, 256, device=CUDA, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 37, 512)
    xq, wq = emulate(x.detach().reshape(-1, 256), E4M3), emulate(linear.weight.detach(), E4M3)
    ref = (xq @ wq.t() + linear.bias.detach()).reshape(3, 37, 512)
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-3)  # the output rounded to bf16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("quantize", [lambda t: (int4_weight(t, 32),), int8_token, mxfp4, nvfp4],
                         ids=["int4", "int8", "mxfp4", "nvfp4"])
def test_fake_quantizers_agree_with_the_cpus(quantize):
    """mxfp4 and nvfp4 bit-equal (seen on an H200). The integer grids should be too now that every scale
    is a correctly rounded tensor division (CUDA divides by a Python scalar through its rounded reciprocal);
    an element on a rounding tie may still come out one step apart. The bound below holds either way."""
    x = torch.randn(64, 256) * torch.rand(64, 1) * 5
    got, ref = quantize(x.to(CUDA))[0].cpu(), quantize(x)[0]
    moved = (got - ref).abs() > 1e-6 * ref.abs().max()
    assert moved.float().mean() < 0.03
    if quantize in (mxfp4, nvfp4):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("over", [pytest.param({"fp8": True}, marks=needs_fp8, id="fp8"),
                                  pytest.param({"fp8": True, "train_engine": "fsdp",
                                                "fp8_enable_fsdp_float8_all_gather": True}, marks=needs_fp8,
                                               id="fp8-fsdp"),
                                  pytest.param({"qat": {"weight_dtype": "nvfp4", "activation_dtype": "nvfp4"}},
                                               id="qat-nvfp4"),
                                  pytest.param({"qat": {"weight_dtype": "int4", "activation_dtype": "int8"}},
                                               id="qat-int4")])
def test_torch_engine_trains_close_to_bf16(sample_shards, tiny_model_dir, tmp_path, over):
    """The built-in model, 6 steps: losses fall and stay near the bf16 run's (quantization noise, not a
    different model)."""
    src, shards = sample_shards
    train(tiny_run(src, **{**FULL, **over}), shards, tiny_model_dir, tmp_path / "low")
    train(tiny_run(src, **FULL), shards, tiny_model_dir, tmp_path / "bf16")
    low, ref = [m["loss"] for m in metrics(tmp_path / "low")], [m["loss"] for m in metrics(tmp_path / "bf16")]
    print(over, "losses", low, "bf16", ref)
    assert low[-1] < 0.8 * low[0]
    assert all(abs(a - b) <= 0.1 * b for a, b in zip(low, ref)), (low, ref)
