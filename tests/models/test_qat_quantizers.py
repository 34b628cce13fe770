"""The fake quantizers of qat against hand-worked values and an independent reference (an element-by-element
search of the grid) on awkward shapes; their round-trip error bounds and straight-through gradients."""
import math

import numpy as np
import pytest
import torch

from tunedag.models.fake_quant import int4_weight, int8_token, mxfp4, nvfp4, quantizer, round_fp4

FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def ref_fp4(v: float) -> float:
    """The nearest FP4 E2M1 value by search; a tie goes to the even code (even mantissa); saturates at ±6."""
    mag = abs(v)
    best = min(range(8), key=lambda i: (abs(mag - FP4[i]), i % 2))
    return math.copysign(FP4[best], v)


def ref_mxfp4(x: torch.Tensor) -> torch.Tensor:
    out = []
    for block in x.double().reshape(-1, 32).tolist():
        amax = max(abs(v) for v in block)
        e = -127 if amax == 0 else max(-127, math.ceil(math.log2(amax / 6)))
        out += [ref_fp4(v / 2 ** e) * 2 ** e for v in block]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def e4m3(v: float) -> float:
    """Round a positive float to FP8 E4M3 (3 mantissa bits, normals from 2^-6), ties to even."""
    e = max(math.floor(math.log2(v)), -6)
    step = 2.0 ** (e - 3)
    q = v / step
    r = math.floor(q + 0.5) if q - math.floor(q) != 0.5 else (math.floor(q) if math.floor(q) % 2 == 0 else math.ceil(q))
    return r * step


def ref_nvfp4(x: torch.Tensor) -> torch.Tensor:
    values = x.double().reshape(-1, 16).tolist()
    amax = max(abs(v) for b in values for v in b)
    tensor_scale = amax / (448 * 6) if amax else 1.0
    out = []
    for block in values:
        bscale = e4m3(min(max(max(abs(v) for v in block) / 6 / tensor_scale, 2.0 ** -6), 448.0))
        out += [ref_fp4(v / (bscale * tensor_scale)) * bscale * tensor_scale for v in block]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


# The integer grids' scales and quotients in float32, as the quantizers (and torchao) compute them: a
# group's extreme lands exactly on a rounding tie (±7.5 steps) only in exact arithmetic.
F32 = np.float32


def ref_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    out = []
    for g in w.reshape(-1, group).numpy():
        low = F32(g.min())
        scale = F32(max(F32(g.max()) - low, F32(1e-6))) / F32(15)
        zero = low + scale * F32(8)
        out += [float(F32(min(max(round(float((v - low) / scale)), 0), 15) - 8) * scale + zero) for v in g]
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


def ref_int8(x: torch.Tensor) -> torch.Tensor:
    out = []
    for row in x.reshape(-1, x.shape[-1]).numpy():
        low, high = min(F32(row.min()), F32(0)), max(F32(row.max()), F32(0))
        scale = (high - low) / F32(255)
        zero = min(max(-128 - round(float(low / scale)), -128), 127)
        out += [(min(max(round(float(v / scale)) + zero, -128), 127) - zero) * float(scale) for v in row]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def data(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 4  # rows of different ranges
    return x


def test_fp4_rounding_hand_worked():
    v = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.75, -100.0])
    assert round_fp4(v).tolist() == [0, 0, 0.5, 1, 1, 2, 2, 4, 4, 6, 6, -1, -6]


def test_int4_hand_worked_min_max_grid():
    w = torch.tensor([[-7.0, 8.0, 0.5, 2.5], [0.0, 7.5, 1.25, 3.0]])
    # ranges 15 and 7.5: scales 1 and 0.5; 7.5 steps rounds to 8 and 9.5 to 10, 2.5 to 2 (ties to even)
    assert int4_weight(w, 4).tolist() == [[-7.0, 8.0, 1.0, 3.0], [0.0, 7.5, 1.0, 3.0]]


def test_int8_per_token_hand_worked():
    q, _ = int8_token(torch.tensor([[-1.0, 0.51, 2.984375, 0.0]]))  # range 255/64: scale 1/64, zero -64
    assert q.tolist() == [[-1.0, 0.515625, 2.984375, 0.0]]


def test_mxfp4_hand_worked_scales():
    x = torch.zeros(3, 32)
    x[0, :3] = torch.tensor([5.0, 1.3, -0.2])  # amax 5: scale 2^ceil(log2(5/6)) = 1
    x[1, :2] = torch.tensor([12.0, 2.9])  # amax 12: scale exactly 2
    x[2, :2] = torch.tensor([12.5, 1.0])  # amax 12.5: scale 4
    q, _ = mxfp4(x)
    assert q[0, :3].tolist() == [4.0, 1.5, 0.0] and q[1, :2].tolist() == [12.0, 3.0]
    assert q[2, :2].tolist() == [12.0, 0.0]  # 3.125 → 3, 0.25 → 0 (tie to even)


@pytest.mark.parametrize("shape", [(3, 7, 96), (5, 64), (1, 32)])
def test_mxfp4_matches_reference(shape):
    x = data(*shape)
    x[0, ..., :32] = 0  # an all-zero block
    torch.testing.assert_close(mxfp4(x)[0].double(), ref_mxfp4(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 16), (2, 112)])
def test_nvfp4_matches_reference(shape):
    x = data(*shape, seed=1)
    got = nvfp4(x)[0].double()
    torch.testing.assert_close(got, ref_nvfp4(x), rtol=1e-6, atol=0)  # float32 vs float64 scale arithmetic


@pytest.mark.parametrize("shape,group", [((6, 96), 32), ((5, 80), 16), ((3, 256), 256)])
def test_int4_matches_reference(shape, group):
    w = data(*shape, seed=2)
    torch.testing.assert_close(int4_weight(w, group).double(), ref_int4(w, group), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 7, 33), (9, 64)])
def test_int8_matches_reference(shape):
    x = data(*shape, seed=3) + 0.5  # rows offset from zero: a zero point other than the middle
    x[0, ..., :] = x[0, ..., :].abs()  # an all-positive row: its range starts at 0
    torch.testing.assert_close(int8_token(x)[0].double(), ref_int8(x), rtol=1e-6, atol=1e-7)


def test_round_trip_errors_within_half_a_step():
    w = data(6, 128, seed=4)
    groups = w.reshape(6, 4, 32)
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    assert ((int4_weight(w, 32).reshape(6, 4, 32) - groups).abs() <= step / 2 + 1e-6).all()
    x = data(4, 9, 64, seed=5)
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 255
    assert ((int8_token(x)[0] - x).abs() <= step / 2 + 1e-6).all()
    blocks = x.reshape(-1, 32)
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True) / 6)))
    assert ((mxfp4(x)[0].reshape(-1, 32) - blocks).abs() <= scale).all()  # FP4's widest step (4→6) is 2 scales
    blocks = x.reshape(-1, 16)
    # nvfp4: the block scale is within 1/16 of amax/6 (E4M3's step), the tensor scale exact
    assert ((nvfp4(x)[0].reshape(-1, 16) - blocks).abs() <= blocks.abs().amax(-1, keepdim=True) / 6 * 1.07).all()


@pytest.mark.parametrize("dtype", ["int8", "mxfp4", "nvfp4"])
def test_straight_through_gradient_is_the_identity_on_the_grid(dtype):
    x = data(4, 64, seed=6).requires_grad_()
    grad = torch.randn(4, 64)
    y = quantizer(dtype, 32)(x)
    y.backward(grad)
    plain = {"int8": int8_token, "mxfp4": mxfp4, "nvfp4": nvfp4}[dtype]
    q, on_grid = plain(x.detach())
    torch.testing.assert_close(y, q)
    expected = grad if on_grid is None else grad * on_grid
    assert torch.equal(x.grad, expected)


def test_int4_gradient_is_the_identity_plus_the_scales_share_at_each_groups_extremes():
    """w' = min + q·scale with q = round((w - min)/scale) passed straight through: dw'/dw = 1, dw'/dmin = 0,
    dw'/dscale = q - (w - min)/scale (the rounding residual r), and scale = (max - min)/15, so the group's max
    element gets Σ g·r / 15 more and its min element Σ g·r / 15 less."""
    x = data(3, 64, seed=6).requires_grad_()
    grad = torch.randn(3, 64)
    quantizer("int4", 32)(x).backward(grad)
    g, out = x.detach().reshape(3, 2, 32), grad.reshape(3, 2, 32)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    steps = (g - low) / ((high - low) / 15)
    share = (out * (torch.round(steps) - steps)).sum(-1, keepdim=True) / 15
    expected = out + share * (g == high) - share * (g == low)
    torch.testing.assert_close(x.grad.reshape(3, 2, 32), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(x.grad, grad)  # the extremes' share is there


def test_bf16_input_keeps_its_dtype_and_grid():
    x = data(3, 64, seed=7).bfloat16()
    y = quantizer("int4", 32)(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), int4_weight(x, 32).bfloat16().float())


def test_group_size_that_does_not_divide_names_both_sizes():
    with pytest.raises(ValueError, match="40 is not a multiple of the group size 32"):
        int4_weight(torch.randn(2, 40), 32)
