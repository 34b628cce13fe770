"""Gradient checkpointing per decoder layer: off, on, or offload.

``on``: a layer runs forward without keeping its activations; only its input is saved, and
backward runs the layer again (with grad) before back-propagating through it.
``offload``: as ``on``, but the saved input goes to pinned host memory, copied on a side CUDA
stream so the copy overlaps the next layers' compute, and comes back for the recompute. A
layer input of 4096 tokens x 4096 hidden in bf16 is 32 MiB: on an 8B model that is 1 GiB of
GPU memory returned for 32 layers. Tiny inputs (< 1 MiB, where a copy costs more than it
frees) stay on the GPU.

In both, the last layer is not checkpointed (backward starts with it), and neither are the last
``skip_last`` layers (``gradient_checkpointing_skip_layers``).

Implemented as a reentrant autograd Function: backward recomputes and calls
``torch.autograd.backward`` on the layer's output, which accumulates the LoRA gradients into
``.grad`` directly. The layer input must require grad for that backward to run at all (the
engine makes the embedding output require grad). There is no dropout on this path, so the
recompute needs no RNG replay. The recompute runs inside ``recomputing_for_backward``: its
output is only the root that backward starts from, so fused modules may skip work whose result
only the output carries (tunedag.models.fused_modules).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from tunedag.models.fused_modules import recomputing_for_backward

Mode = Literal["off", "on", "offload"]
MIN_OFFLOAD_BYTES = 1 << 20

_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class _CheckpointedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], offload: bool):
        ctx.run = run
        ctx.device = hidden.device
        ctx.offloaded = offload
        if offload:
            stream = _side_stream(hidden.device)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(hidden, non_blocking=True)
                ctx.copied = torch.cuda.Event()
                ctx.copied.record(stream)
            hidden.record_stream(stream)  # keep the GPU buffer alive until the copy is done
            ctx.host = host
        else:
            ctx.save_for_backward(hidden)
        return run(hidden)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.offloaded:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
            hidden = ctx.host.to(ctx.device, non_blocking=True)
            del ctx.host
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(True)
        with torch.enable_grad(), recomputing_for_backward():  # the output is a graph root only
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad_out)
        return hidden.grad, None, None


def run_layers(layers, hidden: torch.Tensor, call: Callable, mode: Mode, skip_last: int = 0) -> torch.Tensor:
    """hidden -> call(layer, hidden) for each layer, checkpointed per ``mode`` but for the last ``skip_last``
    layers, which keep their activations (no recompute: faster, by a layer's activations of memory each).
    The last layer is never checkpointed: backward starts there, so its recompute would hold the same
    activations at once, beside its saved input, and only cost time."""
    last = len(layers) - 1
    skip_last = max(skip_last, 1)
    for i, layer in enumerate(layers):
        def run(h, layer=layer):
            return call(layer, h)

        if mode == "off" or i > last - skip_last or not torch.is_grad_enabled():
            hidden = run(hidden)
            continue
        offload = (mode == "offload" and hidden.is_cuda
                   and hidden.numel() * hidden.element_size() >= MIN_OFFLOAD_BYTES)
        hidden = _CheckpointedLayer.apply(hidden, run, offload)
    return hidden
