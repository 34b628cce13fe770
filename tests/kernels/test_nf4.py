"""NF4 storage: bitsandbytes' byte layout, the reference round trip, the Triton dequantiser."""
import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_dynamic_map_is_bitsandbytes_signed_map():
    from tunedag.kernels.nf4 import dynamic_map

    code = dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, 256 distinct values
    assert code[127] == 0.0 and code[255] == 1.0
    # The first exponent level holds one mean, (0.1 + 1) / 2 * 1e-6 of each sign.
    torch.testing.assert_close(code[126:129], torch.tensor([-0.55e-6, 0.0, 0.55e-6]))
    # Largest level: 64 means over [0.1, 1]; the most negative is -(1 - 0.9 / 128).
    torch.testing.assert_close(code[0], torch.tensor(-(1 - 0.9 / 128)))


def test_nibble_order_is_high_first():
    from tunedag.kernels.nf4 import NF4_CODE, dequantize_nf4_reference, quantize_nf4_reference

    # One block whose absmax is 1: the nested absmax quantises (1 - mean) = 0 exactly, so the
    # stored absmax is exactly 1 and every code value survives the round trip bit for bit.
    idx = torch.tensor([15, 0] + [i % 16 for i in range(62)])
    w = NF4_CODE[idx].reshape(2, 32)
    q = quantize_nf4_reference(w)
    assert q.packed[0].item() == 0xF0  # element 0 (1.0, code 15) in the high nibble
    assert q.packed[1].item() == (0 << 4) | 1
    assert q.packed.numel() == 32 and q.absmax_q.numel() == 1 and q.absmax_scale.numel() == 1
    assert torch.equal(dequantize_nf4_reference(q), w)


@pytest.mark.parametrize("shape", [(129, 131), (3, 5), (64, 64)])
def test_reference_round_trip(shape):
    from tunedag.kernels.nf4 import (
        NF4_CODE, dequantize_absmax_reference, dequantize_nf4_reference, dynamic_map,
        quantize_nf4_reference)

    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * 0.02
    q = quantize_nf4_reference(w)
    n = w.numel()
    blocks = -(-n // 64)
    assert q.packed.numel() == (n + 1) // 2 and q.packed.dtype == torch.uint8
    assert q.absmax_q.numel() == blocks and q.absmax_scale.numel() == -(-blocks // 256)

    # Every nibble is the nearest NF4 code to w / (its block's true absmax).
    flat = torch.zeros(blocks * 64)
    flat[:n] = w.reshape(-1)
    absmax = flat.view(blocks, 64).abs().amax(1)
    scaled = (flat.view(blocks, 64) / absmax[:, None]).reshape(-1)[:n]
    nearest = (scaled[:, None] - NF4_CODE).abs().argmin(1)
    nib = torch.stack([q.packed >> 4, q.packed & 15], 1).reshape(-1)[:n].long()
    assert torch.equal(nib, nearest)

    # The double-quantised absmax is off by at most half a gap of the 8-bit map.
    code2 = dynamic_map()
    half_gap = ((code2[1:] - code2[:-1]).max() / 2).item()
    err = (dequantize_absmax_reference(q) - absmax).abs()
    bound = half_gap * q.absmax_scale.repeat_interleave(256)[:blocks] * (1 + 1e-6) + 1e-9
    assert torch.all(err <= bound)

    dq = dequantize_nf4_reference(q)
    assert dq.shape == w.shape and dq.dtype == w.dtype
    r = ((dq - w).norm() / w.norm()).item()
    assert 0.05 < r < 0.12  # NF4 on Gaussian weights: ~0.09 relative error


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(129, 131), (1, 7), (96, 64)])
def test_triton_dequantize_matches_reference_exactly(shape, out_dtype):
    from tunedag.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, quantize_nf4_reference

    g = torch.Generator().manual_seed(7)
    w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
    q = quantize_nf4_reference(w.to(DEV))
    assert q.dtype == torch.bfloat16
    ref = dequantize_nf4_reference(q, out_dtype)
    out = torch.full(shape, float("nan"), dtype=out_dtype, device=DEV)  # poison
    got = dequantize_nf4(q, out_dtype, out=out)
    assert torch.isfinite(got).all()
    assert torch.equal(got, ref)  # the same fp32 operations in the same order


def test_quantize_rejects_bad_input():
    from tunedag.kernels.nf4 import quantize_nf4_reference

    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4_reference(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4_reference(torch.ones(0, 4))
