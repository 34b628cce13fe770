"""AdamW with its two moments stored block-wise quantized: ``adamw_torch_8bit`` and ``adamw_torch_4bit``
(Axolotl's names for torchao's AdamW8bit and AdamW4bit), in plain torch.

Each step dequantizes a weight's moments to fp32, applies the AdamW update (decoupled weight decay,
bias correction, as ``torch.optim.AdamW``), and quantizes the new moments again. A moment is stored
as one code per element (8 bits, or 4 bits two to a byte) and one fp32 scale per block: the block's
largest magnitude. A code indexes a map of values in [-1, 1] (or [0, 1]):

- 8 bits, both moments: the dynamic tree map of Dettmers et al. (arXiv:2110.02861): decades
  10^-6 .. 10^0, each with linearly spaced fractions, the larger decades finer; relative error stays
  small over seven orders of magnitude. Blocks of 256.
- 4 bits (Li et al., arXiv:2309.01507): the first moment on a 4-bit dynamic map; the second on the
  linear map 1/16, 2/16, .., 1, which has no zero so that no ``sqrt(v)`` of a non-zero moment rounds
  to zero (the update ``m / (sqrt(v) + eps)`` would explode). Blocks of 128.

Layout, chosen so that a sharded weight keeps whole blocks: the weight is seen as rows (its first
dimension; a vector is one row) and a block is up to ``block_size`` consecutive elements of one row.
Codes then have the weight's rows, scales ``(rows, blocks per row)``, and for an FSDP2 weight (a
DTensor sharded on its rows) they are DTensors sharded alike: every rank updates its local rows, and
``torch.distributed.checkpoint`` gathers or reshards them like any state. Weights under 4096 elements
(norms, biases), and DTensors not sharded on their rows, keep fp32 moments (as torchao does).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Iterator

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

MIN_QUANTIZED = 4096  # elements: smaller weights keep fp32 moments
# An update works on this many elements of a weight at a time, so that its fp32 temporaries (gradient, moments,
# the quantizer's) stay a few hundred MB however large the weight: a 128k-token embedding, updated whole, made
# the optimizer step the run's memory peak.
CHUNK_ELEMENTS = 2**24
BLOCK_SIZE = {8: 256, 4: 128}
BYTES_PER_SCALE = 4


def dynamic_map(signed: bool, exponent_bits: int, total_bits: int) -> torch.Tensor:
    """The dynamic tree quantization map, sorted: 0, 1, and for each decade i of ``exponent_bits``
    (10^-(exponent_bits-1) .. 10^0) the midpoints of 2^k equal steps of [0.1, 1] scaled to it (and their
    negatives when ``signed``), k growing by one per decade; the unsigned map spends the sign bit on
    finer fractions. 2^total_bits values: torchao's and bitsandbytes' map."""
    fraction_bits = total_bits - 1 - exponent_bits + (0 if signed else 1)
    values = [0.0, 1.0]
    for i in range(exponent_bits):
        edges = torch.linspace(0.1, 1.0, 2 ** (i + fraction_bits) + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - exponent_bits + 1)).tolist()
        values += mids + ([-v for v in mids] if signed else [])
    assert len(values) == 2 ** total_bits, (signed, exponent_bits, total_bits)
    return torch.tensor(sorted(values), dtype=torch.float32)


QMAPS = {  # (bits, signed) -> map; signed for the first moment, unsigned for the second
    (8, True): dynamic_map(True, 7, 8),
    (8, False): dynamic_map(False, 7, 8),
    (4, True): dynamic_map(True, 3, 4),
    (4, False): torch.linspace(0, 1, 17)[1:],
}


@functools.lru_cache(maxsize=None)
def _qmap(bits: int, signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(map, midpoints between its values) on ``device``: copied there once, not every optimizer step."""
    qmap = QMAPS[bits, signed].to(device)
    return qmap, (qmap[1:] + qmap[:-1]) / 2


def rows_and_columns(shape: torch.Size) -> tuple[int, int]:
    """A weight seen as rows: its first dimension by the rest; a vector or scalar is one row."""
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` seen as (rows, columns): a view, so that writes to it reach ``x``."""
    return x.view(rows_and_columns(x.shape))


def row_chunks(shape: torch.Size) -> Iterator[slice]:
    """Slices of a weight's rows holding about CHUNK_ELEMENTS elements each (at least one row)."""
    rows, cols = rows_and_columns(shape)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return (slice(start, min(start + step, rows)) for start in range(0, rows, step))


def block_len(columns: int, block_size: int) -> int:
    return max(1, min(block_size, columns))


def quantize(x: torch.Tensor, bits: int, signed: bool, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of ``x`` (rows, columns): the nearest map value of each element over its block's
    largest magnitude; codes (rows, columns) uint8, or (rows, ceil(columns / 2)) with two 4-bit codes a byte."""
    rows, cols = x.shape
    block = block_len(cols, block_size)
    nblocks = math.ceil(cols / block)
    blocks = torch.nn.functional.pad(x.float(), (0, nblocks * block - cols)).view(rows, nblocks, block)
    scales = blocks.abs().amax(-1)
    _, mids = _qmap(bits, signed, x.device)
    codes = torch.bucketize(blocks / scales.clamp_min(1e-12).unsqueeze(-1), mids).to(torch.uint8)
    codes = codes.view(rows, nblocks * block)[:, :cols]
    if bits == 4:
        codes = torch.nn.functional.pad(codes, (0, cols % 2))
        codes = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, signed: bool, block_size: int,
               cols: int) -> torch.Tensor:
    """The fp32 (rows, ``cols``) tensor that :func:`quantize` stored."""
    rows = codes.shape[0]
    if bits == 4:
        codes = torch.stack((codes >> 4, codes & 15), dim=-1).view(rows, -1)
    block = block_len(cols, block_size)
    nblocks = scales.shape[-1]
    codes = torch.nn.functional.pad(codes[:, :cols], (0, nblocks * block - cols)).view(rows, nblocks, block)
    values = _qmap(bits, signed, codes.device)[0][codes.long()] * scales.unsqueeze(-1)
    return values.view(rows, nblocks * block)[:, :cols]


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def quantizes(param: torch.Tensor, bits: int | None) -> bool:
    """Whether ``param``'s moments are stored quantized (see the module's doc)."""
    if bits is None or param.numel() < MIN_QUANTIZED:
        return False
    if isinstance(param, DTensor):
        return param.dim() >= 2 and all(isinstance(pl, Replicate) or pl == Shard(0) for pl in param.placements)
    return True


def _like_param(local_tensor: torch.Tensor, param: torch.Tensor, columns: int) -> torch.Tensor:
    """``local_tensor`` (this rank's rows) as ``param`` holds its rows: a DTensor of ``param``'s rows by
    ``columns`` when ``param`` is one, else itself."""
    if not isinstance(param, DTensor):
        return local_tensor
    rows = param.shape[0]
    return DTensor.from_local(local_tensor, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size((rows, columns)), stride=(columns, 1))


def init_state(param: torch.Tensor, bits: int | None, block_size: int) -> dict[str, torch.Tensor]:
    """Zero moments for ``param``: quantized codes and scales, or fp32 tensors like ``param``."""
    state: dict[str, torch.Tensor] = {"step": torch.tensor(0.0)}
    if not quantizes(param, bits):
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
        return state
    weight = local(param)
    rows, cols = rows_and_columns(weight.shape)
    code_cols = cols if bits == 8 else math.ceil(cols / 2)
    nblocks = math.ceil(cols / block_len(cols, block_size))
    for key in ("exp_avg", "exp_avg_sq"):
        codes = torch.zeros(rows, code_cols, dtype=torch.uint8, device=weight.device)
        scales = torch.zeros(rows, nblocks, dtype=torch.float32, device=weight.device)
        state[f"{key}_codes"] = _like_param(codes, param, code_cols)
        state[f"{key}_scales"] = _like_param(scales, param, nblocks)
    return state


def _moments(state: dict[str, torch.Tensor], rows: slice, cols: int, bits: int | None,
             block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 moments of ``rows`` of a weight: views of fp32 state, or dequantized copies."""
    if "exp_avg" in state:
        return tuple(as_rows(local(state[key]))[rows].float() for key in ("exp_avg", "exp_avg_sq"))
    return tuple(dequantize(local(state[f"{key}_codes"])[rows], local(state[f"{key}_scales"])[rows], bits, signed,
                            block_size, cols)
                 for key, signed in (("exp_avg", True), ("exp_avg_sq", False)))


def _store(state: dict[str, torch.Tensor], rows: slice, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           bits: int | None, block_size: int) -> None:
    if "exp_avg" in state:
        as_rows(local(state["exp_avg"]))[rows].copy_(exp_avg)
        as_rows(local(state["exp_avg_sq"]))[rows].copy_(exp_avg_sq)
        return
    for key, value, signed in (("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, False)):
        codes, scales = quantize(value, bits, signed, block_size)
        local(state[f"{key}_codes"])[rows].copy_(codes)
        local(state[f"{key}_scales"])[rows].copy_(scales)


@torch.no_grad()
def adamw_step(param: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
    """One AdamW update of ``param`` from its gradient, on this rank's shard, with ``group``'s lr, betas,
    eps, weight_decay and moment storage (``bits``: 8, 4 or None for fp32; ``block_size``)."""
    weight = as_rows(local(param))
    for rows, target in adamw_targets(param, state, group):
        weight[rows].copy_(target)


@torch.no_grad()
def adamw_targets(param: torch.Tensor, state: dict[str, torch.Tensor],
                  group: dict[str, Any]) -> Iterator[tuple[slice, torch.Tensor]]:
    """One AdamW update (:func:`adamw_step`) of this rank's shard of ``param``, a chunk of rows at a time
    (:func:`row_chunks`): (rows, their fp32 value after the update), each chunk's moments stored as it is
    yielded; ``param`` itself is left as it was. Consume every chunk: the step count advances on the first."""
    bits, block_size = group["bits"], group["block_size"]
    if "step" not in state:
        state.update(init_state(param, bits, block_size))
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    state["step"] = state["step"] + 1  # a new tensor: a state dict taken earlier keeps its count
    step = float(state["step"])
    weight, grad = as_rows(local(param)), as_rows(local(param.grad))
    cols = weight.shape[1]
    for rows in row_chunks(local(param).shape):
        g = grad[rows].float()
        exp_avg, exp_avg_sq = _moments(state, rows, cols, bits, block_size)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        updated = weight[rows].float().mul(1 - lr * group["weight_decay"])  # a new tensor, also for fp32
        updated.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
        _store(state, rows, exp_avg, exp_avg_sq, bits, block_size)
        yield rows, updated


class StateKeepingOptimizer(torch.optim.Optimizer):
    """An optimizer that updates each parameter with a gradient on its own (:meth:`update`), and whose state
    tensors load back with the dtypes they were saved with: torch's ``load_state_dict`` casts every floating
    state to the weight's dtype, which would turn uint8 codes into floats and round fp32 moments of a bf16
    weight to bf16."""

    def update(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.update(param, self.state[param], group)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                if torch.is_tensor(value) and key != "step":
                    self.state[param][key] = value.to(device=param.device, copy=True)


class QuantizedAdamW(StateKeepingOptimizer):
    """``torch.optim.AdamW``'s update with ``bits``-bit block-wise moments (8 or 4; see the module's doc)."""

    def __init__(self, params: Iterable[Any], lr: float, bits: int, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, block_size: int | None = None):
        if bits not in BLOCK_SIZE:
            raise ValueError(f"QuantizedAdamW: bits must be 8 or 4, got {bits!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bits=bits,
                                      block_size=block_size or BLOCK_SIZE[bits]))

    def update(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        adamw_step(param, state, group)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every state tensor this rank holds (its shards of DTensor states)."""
    return sum(local(t).numel() * local(t).element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))
