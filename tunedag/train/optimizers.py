"""The optimizer of a run (``optimizer``, Axolotl's names), built over an engine's trainable parameters.

| optimizer | what | state per trained weight |
| --- | --- | --- |
| adamw_torch | ``torch.optim.AdamW``, fused where the engine says its parameters allow it | 2 fp32 |
| adamw_torch_fused | ``torch.optim.AdamW(fused=True)`` (CUDA, or the CPU on torch >= 2.4) | 2 fp32 |
| adamw_torch_8bit | tunedag's AdamW with block-wise 8-bit moments (torchao's AdamW8bit design), every engine | 2 bytes + 2 fp32 per 256 |
| adamw_torch_4bit | the same with 4-bit moments (torchao's AdamW4bit design) | 1 byte + 2 fp32 per 128 |
| adamw_bnb_8bit | bitsandbytes' ``AdamW8bit``: blockwise 8-bit moments | 2 bytes |
| paged_adamw_8bit | bitsandbytes' ``PagedAdamW8bit``: the same, paged to CPU memory under pressure | 2 bytes |
| adafactor | transformers' ``Adafactor``, no relative step or parameter scaling (as HF's Trainer) | row + column |
| muon | Muon on the hidden weight matrices, AdamW on embeddings, lm_head, norms, biases (:mod:`tunedag.train.muon`) | 1 fp32 (Muon), 2 fp32 (AdamW) |

The quantized moments and Muon are tunedag's own (:mod:`tunedag.train.quantized_adamw`,
:mod:`tunedag.train.muon`): they update plain tensors and FSDP2's DTensor shards alike. Weights under
4096 elements keep fp32 moments with the quantized AdamWs.

With ``master_weights: bf16_kahan`` (a full fine-tune on bf16 weights, no fp32 master copy) adamw_torch,
adamw_torch_8bit and adamw_torch_4bit become :class:`tunedag.train.kahan_adamw.KahanAdamW` with fp32, 8-bit or
4-bit moments: the same update, rounded to bf16 with a 2-byte Kahan compensation per weight; the other
optimizers would round small updates away on bf16 weights, so they are refused there.

The loop's schedule drives every one of them through their parameter groups' ``lr``; every one
saves and loads its state through ``state_dict`` (each engine stores it the way it stores AdamW's).
"""
from __future__ import annotations

import importlib.util
from typing import Iterable

import torch

from tunedag.config.checks import KAHAN_OPTIMIZERS
from tunedag.errors import TunedagError
from tunedag.train.kahan_adamw import KahanAdamW
from tunedag.train.muon import Muon, muon_groups
from tunedag.train.quantized_adamw import QuantizedAdamW

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_8bit", "adamw_torch_4bit", "adamw_bnb_8bit",
              "paged_adamw_8bit", "adafactor", "muon")
QUANTIZED_BITS = {"adamw_torch_8bit": 8, "adamw_torch_4bit": 4}
Params = Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]]


class OptimizerError(TunedagError, RuntimeError):
    """The optimizer cannot be built here (its package is missing, or the device has no such kernel)."""


def _bitsandbytes(name: str):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise OptimizerError(f"optimizer: {name} needs the bitsandbytes package, which is not installed "
                             "(pip install bitsandbytes; it runs on CUDA GPUs), or choose adamw_torch or adafactor")
    import bitsandbytes

    return bitsandbytes.optim


def build_optimizer(params: Params, name: str, lr: float, weight_decay: float,
                    fused: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, master_weights: str = "fp32") -> torch.optim.Optimizer:
    """``name``'s optimizer over ``params`` (or (name, parameter) pairs, which muon needs to tell the
    embeddings apart); ``fused``: the engine's parameters are plain tensors on a device with a fused
    AdamW (adamw_torch then takes it). ``betas`` and ``eps`` are the AdamW ones (Adafactor has its own).
    ``master_weights: bf16_kahan``: the weights are bf16, updated by :class:`KahanAdamW`."""
    named = [p if isinstance(p, tuple) else (None, p) for p in params]
    if master_weights == "bf16_kahan":
        if name not in KAHAN_OPTIMIZERS:
            raise OptimizerError(f"optimizer: {name} would round small updates away on bf16 weights; with "
                                 f"master_weights: bf16_kahan use {', '.join(KAHAN_OPTIMIZERS)}")
        return KahanAdamW([p for _, p in named], lr=lr, bits=QUANTIZED_BITS.get(name), betas=betas, eps=eps,
                          weight_decay=weight_decay)
    if name == "muon":
        if any(n is None for n, _ in named):
            raise OptimizerError("optimizer: muon needs the parameters' names (embeddings and lm_head take AdamW)")
        return Muon(muon_groups(named, weight_decay), lr=lr, betas=betas, eps=eps)
    params = [p for _, p in named]
    if name in QUANTIZED_BITS:
        return QuantizedAdamW(params, lr=lr, bits=QUANTIZED_BITS[name], betas=betas, eps=eps,
                              weight_decay=weight_decay)
    if name in ("adamw_torch", "adamw_torch_fused"):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                     fused=True if name == "adamw_torch_fused" else fused)
        except RuntimeError as err:
            raise OptimizerError(f"optimizer: {name}: torch has no fused AdamW for these parameters ({err}); "
                                 "use adamw_torch") from None
    if name == "adamw_bnb_8bit":
        return _bitsandbytes(name).AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "paged_adamw_8bit":
        return _bitsandbytes(name).PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    raise OptimizerError(f"optimizer: unknown optimizer {name!r}; tunedag has {', '.join(OPTIMIZERS)}")
