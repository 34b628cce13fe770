"""4-bit NF4 weights with double quantisation, stored byte for byte as bitsandbytes stores them.

Layout (bitsandbytes ``quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=True, quant_storage=torch.uint8)``, checked against its source):

- ``packed``: uint8, ``ceil(n / 2)`` bytes for the ``n`` elements of the row-major flattened
  weight; element ``2i`` in the high nibble of byte ``i``, element ``2i + 1`` in the low nibble.
  A nibble is an index into the 16-value NF4 code (``NF4_CODE``).
- ``absmax_q``: uint8, one per block of 64 elements: the block's absmax, minus ``absmax_offset``,
  quantised with bitsandbytes' signed 8-bit dynamic map (``dynamic_map()``) in blocks of 256.
- ``absmax_scale``: fp32, one per block of 256 absmax values (bitsandbytes' ``state2.absmax``).
- ``absmax_offset``: fp32, one value for the whole tensor: the mean of the 64-block absmaxes
  (bitsandbytes' ``state.offset``).

Dequantisation: ``w[i] = NF4_CODE[nibble(i)] * (code2[absmax_q[i // 64]]
* absmax_scale[i // (64 * 256)] + absmax_offset)``, all in fp32 (the product and the sum each
rounded, no fused multiply-add, as bitsandbytes' two separate kernels do), then cast to the
compute dtype. That is 0.5 + 1/64 + 4/16384 bytes per weight: ~4.127 bits.

Why bitsandbytes-compatible storage rather than torchao's NF4Tensor: the storage is plain
uint8/fp32 tensors with a documented layout, so the pure-torch quantise/dequantise below runs on
the CPU in tests (no compiled extension, no tensor subclass), the Triton kernel dequantises it
on CUDA (and under TRITON_INTERPRET=1 on the CPU), and a checkpoint quantised by bitsandbytes
(what transformers' 4-bit loader and peft's QLoRA produce) can be wrapped without re-quantising
(``NF4Weight.from_bnb``). torchao's NF4 uses its own scaler blocking and a tensor subclass whose
dispatch we would have to go through on every op; we only need "bytes in, dense weight out".

Quantisation rounds to the nearest code: NF4 with bitsandbytes' decision-tree thresholds
(strictly greater than the midpoint goes up), the 8-bit absmax codes with midpoints of the
dynamic map, values scaled by ``x * (1 / absmax)`` as bitsandbytes' CUDA kernel does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._tl_rounding import cast_for_store

NF4_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256

# The 16 NF4 values (normal-float quantiles of N(0, 1), scaled to [-1, 1]); index = nibble.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
# bitsandbytes' dQuantizeNF4 decision thresholds: nibble = number of thresholds strictly below x.
NF4_THRESHOLDS = torch.tensor(
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ],
    dtype=torch.float32,
)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``): 256 fp32.

    For exponent i in 0..6 it takes 2**i evenly spaced fraction means in [0.1, 1] scaled by
    10**(i - 6), both signs, plus 0 and 1.0; sorted. Built in fp32 as bitsandbytes builds it.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclass
class NF4Weight:
    """A frozen weight of ``shape`` in NF4 with double-quantised absmax (see module docstring)."""

    packed: torch.Tensor  # uint8 (ceil(n/2),)
    absmax_q: torch.Tensor  # uint8 (ceil(n/64),)
    absmax_scale: torch.Tensor  # fp32 (ceil(ceil(n/64)/256),)
    absmax_offset: torch.Tensor  # fp32 (1,)
    code2: torch.Tensor  # fp32 (256,) the dynamic map
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the weight before quantisation (default compute dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> "NF4Weight":
        return NF4Weight(
            self.packed.to(device), self.absmax_q.to(device), self.absmax_scale.to(device),
            self.absmax_offset.to(device), self.code2.to(device), self.shape, self.dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap bitsandbytes' ``quantize_4bit(..., compress_statistics=True)`` output, no copy."""
        qs = quant_state
        if qs.quant_type != "nf4" or qs.blocksize != NF4_BLOCKSIZE or qs.state2 is None:
            raise ValueError(
                "only bitsandbytes NF4 with blocksize 64 and compress_statistics=True (double "
                f"quantisation) is supported; got quant_type={qs.quant_type!r}, "
                f"blocksize={qs.blocksize}, nested={qs.state2 is not None}"
            )
        if qs.state2.blocksize != ABSMAX_BLOCKSIZE:
            raise ValueError(f"absmax blocksize must be 256, got {qs.state2.blocksize}")
        return cls(
            packed.view(torch.uint8).reshape(-1), qs.absmax.reshape(-1),
            qs.state2.absmax.float().reshape(-1), qs.offset.float().reshape(1),
            qs.state2.code.float(), tuple(qs.shape), qs.dtype,
        )


# --------------------------------------------------------------------------------------------
# Plain-PyTorch reference (CPU or CUDA)
# --------------------------------------------------------------------------------------------
def _quantize_to_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest entry of a sorted code (ties go to the lower entry), as uint8 indices."""
    mids = (code[:-1] + code[1:]) * 0.5
    return torch.bucketize(x, mids, right=False).to(torch.uint8)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, flat zero-padded to whole blocks as (blocks, blocksize)), fp32."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=flat.device)
    padded[:n] = flat.float()
    padded = padded.view(blocks, blocksize)
    return padded.abs().amax(dim=1), padded


def _scale_by_reciprocal(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    # bitsandbytes multiplies by 1/absmax (fp32); an all-zero block maps to code 0.0.
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return blocks * inv[:, None]


def quantize_nf4_reference(weight: torch.Tensor) -> NF4Weight:
    """Quantise a dense weight to NF4 + double-quantised absmax (bitsandbytes' bytes)."""
    if not weight.is_floating_point():
        raise TypeError(f"NF4 quantisation needs a floating-point weight, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantise an empty weight")
    dev = weight.device
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    absmax, blocks = _blockwise_absmax(flat, NF4_BLOCKSIZE)
    scaled = _scale_by_reciprocal(blocks, absmax).reshape(-1)
    nib = torch.bucketize(scaled, NF4_THRESHOLDS.to(dev), right=False).to(torch.uint8)
    nib = nib[: n + (n % 2)]  # keep the zero pad element when n is odd (a low nibble of 0.0)
    packed = (nib[0::2] << 4) | nib[1::2]

    offset = absmax.mean()
    centred = absmax - offset
    absmax2, blocks2 = _blockwise_absmax(centred, ABSMAX_BLOCKSIZE)
    code2 = dynamic_map().to(dev)
    scaled2 = _scale_by_reciprocal(blocks2, absmax2).clamp(-1, 1).reshape(-1)[: absmax.numel()]
    absmax_q = _quantize_to_code(scaled2, code2)
    return NF4Weight(
        packed.contiguous(), absmax_q.contiguous(), absmax2.contiguous(),
        offset.reshape(1).float(), code2, tuple(weight.shape), weight.dtype,
    )


def dequantize_absmax_reference(w: NF4Weight) -> torch.Tensor:
    """fp32 absmax per 64-block: code2[q] * scale[block // 256] + offset (two roundings)."""
    idx = torch.arange(w.absmax_q.numel(), device=w.device) // ABSMAX_BLOCKSIZE
    prod = w.code2[w.absmax_q.long()] * w.absmax_scale[idx]
    return prod + w.absmax_offset


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight from NF4 storage in plain PyTorch; the Triton kernel must match it exactly."""
    n = w.numel
    nib = torch.stack([w.packed >> 4, w.packed & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = dequantize_absmax_reference(w)
    vals = NF4_CODE.to(w.device)[nib] * absmax.repeat_interleave(NF4_BLOCKSIZE)[:n]
    return vals.to(dtype or w.dtype).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Triton dequantisation
# --------------------------------------------------------------------------------------------
@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_q_ptr, absmax_scale_ptr, offset_ptr, code2_ptr, nf4_ptr, out_ptr,
    n_elem,
    BLOCK: tl.constexpr,
):
    # Each program writes BLOCK consecutive weights (one wide, coalesced store per thread);
    # neighbouring lanes re-read the same byte, which the cache serves.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    shift = (1 - (offs & 1).to(tl.int32)) * 4  # even element: high nibble
    nib = (byte >> shift) & 0xF
    blk = offs // 64
    q = tl.load(absmax_q_ptr + blk, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(code2_ptr + q, mask=mask, other=0.0)
    s2 = tl.load(absmax_scale_ptr + blk // 256, mask=mask, other=0.0)
    absmax = c2 * s2
    absmax = absmax + tl.load(offset_ptr)
    v = tl.load(nf4_ptr + nib, mask=mask, other=0.0) * absmax
    tl.store(out_ptr + offs, cast_for_store(v, out_ptr), mask=mask)


_NF4_CACHE: dict[torch.device, torch.Tensor] = {}


def _nf4_table(device: torch.device) -> torch.Tensor:
    t = _NF4_CACHE.get(device)
    if t is None:
        t = _NF4_CACHE[device] = NF4_CODE.to(device)
    return t


def dequantize_nf4(
    w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ``w.shape`` weight in ``dtype`` (default: the original dtype) via one Triton launch.

    Memory-bound: reads n/2 + n/64 bytes, writes n * itemsize bytes.
    """
    dtype = dtype or w.dtype
    n = w.numel
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
    elif out.shape != torch.Size(w.shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(w.shape)} {dtype} tensor")
    block = 2048
    grid = (triton.cdiv(n, block),)
    kwargs = {}
    if os.environ.get("TRITON_INTERPRET") != "1":
        kwargs["enable_fp_fusion"] = False  # round product and sum separately, as bitsandbytes
    _nf4_dequant_kernel[grid](
        w.packed, w.absmax_q, w.absmax_scale, w.absmax_offset, w.code2, _nf4_table(w.device),
        out, n, BLOCK=block, num_warps=4, **kwargs,
    )
    return out


def maybe_dequantize(weight: "torch.Tensor | NF4Weight", dtype: torch.dtype) -> torch.Tensor:
    """A dense ``dtype`` view of a base weight: dequantise NF4, cast a dense weight if needed."""
    if isinstance(weight, NF4Weight):
        return dequantize_nf4(weight, dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)
