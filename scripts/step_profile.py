"""Where a training step's GPU time goes: matmuls, attention, tunedag's Triton kernels, copies, the rest.

``bench_train.py --profile`` runs a row's steps once more under ``torch.profiler`` after timing them and
adds this split to the row: per step, the device time of each class of kernel, the time no kernel ran
(launch gaps, host work, synchronisation), and the longest kernels. That is what separates a setting
from the matmul ceiling: at the ceiling a step would be its matmul time alone.

A kernel's class comes from its name: cuBLAS/CUTLASS GEMMs (and ``torch._grouped_mm``) are matmuls;
FlashAttention-style kernels, cuDNN's and FlexAttention's compiled templates are attention; a Triton
kernel defined in ``tunedag.kernels`` is tunedag's (its attention-sink kernels count as attention);
copies and fills are copies; anything else (PyTorch's elementwise
and reduction kernels, the optimizer, other libraries' Triton kernels) is the rest.
"""
from __future__ import annotations

import importlib
import pkgutil
import time
from typing import Callable

MATMUL = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "grouped_mm", "splitk")
ATTENTION = ("flash", "fmha", "attention", "attn", "sdpa", "cudnn", "triton_tem")
COPY = ("memcpy", "memset")
# tunedag.kernels modules whose kernels do another class's work (tunedag's experts are torch._grouped_mm: matmul)
MODULE_CLASS = {"sink_attention": "attention"}
CLASSES = ("matmul", "attention", "tunedag kernels", "copies", "rest")


def tunedag_kernels() -> dict[str, str]:
    """Name of each Triton kernel in ``tunedag.kernels`` -> its class (MODULE_CLASS, else tunedag kernels)."""
    import triton

    import tunedag.kernels as package

    names = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, triton.runtime.KernelInterface):  # jit, interpreted or autotuned
                while hasattr(obj, "fn"):
                    obj = obj.fn
                names[obj.__name__] = MODULE_CLASS.get(info.name, "tunedag kernels")
    return names


def kernel_class(name: str, ours: dict[str, str]) -> str:
    """The class (one of CLASSES) of the GPU kernel called ``name``; ``ours``: :func:`tunedag_kernels`."""
    if name in ours:
        return ours[name]
    lowered = name.lower()
    # attention first: FlashAttention's kernel names carry CUTLASS template arguments (cutlass::bfloat16_t)
    for cls, marks in (("attention", ATTENTION), ("matmul", MATMUL), ("copies", COPY)):
        if any(mark in lowered for mark in marks):
            return cls
    return "rest"


def split_by_class(kernel_us: dict[str, float], ours: dict[str, str], steps: int, wall_s: float,
                   top: int = 12) -> dict:
    """Per-step milliseconds of each class, of no kernel at all, and of the ``top`` longest kernels, from the
    device microseconds each kernel name took over ``steps`` steps of ``wall_s`` seconds."""
    per_class = dict.fromkeys(CLASSES, 0.0)
    for name, us in kernel_us.items():
        per_class[kernel_class(name, ours)] += us
    busy = sum(per_class.values())
    step_ms = 1e3 * wall_s / steps
    longest = sorted(kernel_us.items(), key=lambda kv: -kv[1])[:top]
    return {"step_ms": round(step_ms, 2),
            "ms_per_step": {cls: round(us / 1e3 / steps, 2) for cls, us in per_class.items()},
            "no_kernel_ms": round(max(step_ms - busy / 1e3 / steps, 0.0), 2),
            "longest": [{"kernel": name[:120], "class": kernel_class(name, ours),
                         "ms_per_step": round(us / 1e3 / steps, 3)} for name, us in longest]}


def profile_steps(step: Callable[[], None], steps: int) -> dict:
    """Run ``step`` ``steps`` times under torch.profiler (CUDA kernels) and split the device time by class."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernel_us: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            kernel_us[event.key] = kernel_us.get(event.key, 0.0) + event.self_device_time_total
    return split_by_class(kernel_us, tunedag_kernels(), steps, wall)


def format_table(rows: list[dict]) -> str:
    """The profiled rows' split (bench_train.py results with a ``profile``), one line each, in ms per step."""
    lines = [f"{'variant':22} {'shape':13} {'batch':>5} {'step ms':>8} " + " ".join(f"{c:>15}" for c in CLASSES)
             + f" {'no kernel':>9}"]
    for r in rows:
        p = r["profile"]
        lines.append(f"{r['variant']:22} {r['shape']:13} {r['batch']:>5} {p['step_ms']:>8.1f} "
                     + " ".join(f"{p['ms_per_step'][c]:>15.1f}" for c in CLASSES) + f" {p['no_kernel_ms']:>9.1f}")
    return "\n".join(lines)
