#!/usr/bin/env python3
"""Benchmark fused linear-CE and the LoRA-fused projections against their baselines on CUDA.

Per op and shape (Llama-3.1-8B: hidden 4096, intermediate 14336, vocab 128256, 8 KV heads,
LoRA r = 16, bf16): forward + backward median time (``triton.testing.do_bench``) and peak
memory above what the inputs already hold, for

- ours (``tunedag.kernels``), with a dense bf16 or an NF4 base weight;
- eager: the kernel file's plain-PyTorch reference function (bf16 adapters);
- peft: the same reference with fp32 adapters, peft's default (its LoRA path runs in fp32);
- compile: ``torch.compile`` of the reference (first shape only: each compile costs ~30 s);
- liger: Liger Kernel's fused linear cross-entropy, where importable;
- bnb-qlora: peft-style QLoRA with bitsandbytes' ``matmul_4bit`` base, where importable.

Matmul floor: the op's FLOPs (counted below) over the bf16 matmul rate measured in the same run
(8192^3 ``torch.mm``); "floor %" is floor time / measured time. Writes
``$OUT/bench_fused_kernels.{csv,md}`` (``./bench_out`` without $OUT) and prints the table last.

Usage: python3 scripts/bench_fused_kernels.py [--tokens 4096 16384] [--budget-s 330]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton.testing import do_bench  # noqa: E402

from tunedag.kernels.cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy, fused_linear_cross_entropy_reference)
from tunedag.kernels.lora_mlp import lora_mlp, lora_mlp_reference  # noqa: E402
from tunedag.kernels.lora_qkv import (  # noqa: E402
    lora_o, lora_o_reference, lora_qkv, lora_qkv_reference)
from tunedag.kernels.nf4 import dequantize_nf4, quantize_nf4_reference  # noqa: E402

H, I, V, KV, R = 4096, 14336, 128256, 1024, 16
SCALING = 2.0
GiB = 2**30
ROWS: list[dict] = []
START = time.monotonic()


def measure(fn, params) -> tuple[float, float]:
    """(median ms of fn, peak bytes above the allocation before the call)."""
    def clear():
        for p in params:
            p.grad = None
    fn()  # warm-up: Triton/inductor compilation, cuBLAS handles
    clear()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    clear()
    ms = do_bench(fn, warmup=50, rep=300, grad_to_none=params, return_mode="median")
    clear()
    return ms, peak


def record(op, shape, variant, fn, params, flops, ceiling):
    try:
        ms, peak = measure(fn, params)
    except torch.cuda.OutOfMemoryError:
        print(f"{op} {shape} {variant}: out of memory", flush=True)
        torch.cuda.empty_cache()
        return
    floor_ms = flops / ceiling * 1e3
    row = dict(op=op, shape=shape, variant=variant, ms=round(ms, 3),
               peak_gib=round(peak / GiB, 3), tflops=round(flops / ms / 1e9, 1),
               floor_pct=round(100 * floor_ms / ms, 1))
    ROWS.append(row)
    print(row, flush=True)


def can_compile(args) -> bool:
    return time.monotonic() - START < args.budget_s


def bf16_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: torch.mm(a, b), warmup=100, rep=500, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def bench_flce(n, train_head, ceiling, args, first):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, H, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) * (4.0 / H**0.5)).bfloat16()
    w.requires_grad_(train_head)
    t = torch.randint(0, V, (n,), device="cuda", generator=g)
    t[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
    params = [h, w] if train_head else [h]
    flops = (6 if train_head else 4) * n * V * H
    op = "linear_ce" + ("" if train_head else " (frozen head)")
    shape = f"N={n} H={H} V={V}"
    losses = {}

    def run(name, f):
        def fn():
            loss = f()
            loss.backward()
            losses[name] = loss.item() if name not in losses else losses[name]
        record(op, shape, name, fn, params, flops, ceiling)

    run("ours", lambda: fused_linear_cross_entropy(h, w, t))
    for c in args.chunk_sweep:
        run(f"ours-c{c}", lambda c=c: fused_linear_cross_entropy(h, w, t, chunk_rows=c))
    run("eager", lambda: fused_linear_cross_entropy_reference(h, w, t))
    if first and can_compile(args):
        comp = torch.compile(fused_linear_cross_entropy_reference, dynamic=False)
        run("compile", lambda: comp(h, w, t))
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss)
        liger = LigerFusedLinearCrossEntropyLoss()
        run("liger", lambda: liger(w, h, t))
    except ImportError as e:
        print(f"liger-kernel not importable: {e}")
    print(f"{op} {shape} losses: {losses}", flush=True)


def _lora_params(g, shapes, adapter_dtype):
    ab = []
    for o, k in shapes:
        ab += [(torch.randn(R, k, device="cuda", generator=g) / k**0.5).to(adapter_dtype),
               (torch.randn(o, R, device="cuda", generator=g) / R**0.5).to(adapter_dtype)]
    return [t.requires_grad_() for t in ab]


def _bnb_qlora_linear(x, packed_state, a, b):
    import bitsandbytes as bnb

    packed, state = packed_state
    base = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    return base + (torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b)
                   * SCALING).to(x.dtype)


def _bnb_quantize(ws):
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        print(f"bitsandbytes not importable: {e}")
        return None
    return [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            for w in ws]


def bench_mlp(n, ceiling, args, first):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, H, device="cuda", generator=g).bfloat16().requires_grad_()
    ws = [(torch.randn(o, k, device="cuda", generator=g) / k**0.5).bfloat16()
          for o, k in ((I, H), (I, H), (H, I))]
    shapes = ((I, H), (I, H), (H, I))
    ab32 = _lora_params(g, shapes, torch.float32)
    ab16 = [t.detach().bfloat16().requires_grad_() for t in ab32]
    dy = torch.randn(n, H, device="cuda", generator=g).bfloat16()
    q4 = [quantize_nf4_reference(w) for w in ws]
    flops = 12 * n * H * I + 18 * n * R * (H + I)  # base fwd + dx; LoRA matmuls
    op, shape = "lora_mlp", f"N={n} H={H} I={I} r={R}"

    def mlp_call(f, w, ab):
        return lambda: f(x, w[0], ab[0], ab[1], w[1], ab[2], ab[3], w[2], ab[4], ab[5],
                         SCALING, "silu").backward(dy)

    record(op, shape, "ours", mlp_call(lora_mlp, ws, ab32), [x, *ab32], flops, ceiling)
    record(op, shape, "ours-nf4", mlp_call(lora_mlp, q4, ab32), [x, *ab32], flops, ceiling)
    record(op, shape, "ours-bf16ab", mlp_call(lora_mlp, ws, ab16), [x, *ab16], flops, ceiling)
    if first and args.profile:
        profile(f"mlp_N{n}", {"ours": mlp_call(lora_mlp, ws, ab32),
                              "eager": mlp_call(lora_mlp_reference, ws, ab16)}, [x, *ab32, *ab16])
    record(op, shape, "eager", mlp_call(lora_mlp_reference, ws, ab16), [x, *ab16], flops,
           ceiling)
    record(op, shape, "peft", mlp_call(lora_mlp_reference, ws, ab32), [x, *ab32], flops,
           ceiling)
    if first and can_compile(args):
        comp = torch.compile(lora_mlp_reference, dynamic=False)
        record(op, shape, "compile", mlp_call(comp, ws, ab16), [x, *ab16], flops, ceiling)
    bq = _bnb_quantize(ws)
    if bq is not None:
        def qlora():
            a = ab32
            gg = _bnb_qlora_linear(x, bq[0], a[0], a[1])
            u = _bnb_qlora_linear(x, bq[1], a[2], a[3])
            y = _bnb_qlora_linear(torch.nn.functional.silu(gg) * u, bq[2], a[4], a[5])
            y.backward(dy)
        record(op, shape, "bnb-qlora", qlora, [x, *ab32], flops, ceiling)
    # NF4 dequantisation alone, for the record: bytes moved / time.
    ms = do_bench(lambda: dequantize_nf4(q4[0], torch.bfloat16), return_mode="median")
    nbytes = ws[0].numel() * (2 + 0.5 + 1 / 64)
    print(f"nf4 dequant {I}x{H}: {ms * 1e3:.1f} us, {nbytes / ms / 1e6:.0f} GB/s", flush=True)


def bench_attn(n, ceiling, args, first):
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(n, H, device="cuda", generator=g).bfloat16().requires_grad_()
    outs = (H, KV, KV, H)
    ws = [(torch.randn(o, H, device="cuda", generator=g) / H**0.5).bfloat16() for o in outs]
    ab32 = _lora_params(g, [(o, H) for o in outs], torch.float32)
    ab16 = [t.detach().bfloat16().requires_grad_() for t in ab32]
    douts = [torch.randn(n, o, device="cuda", generator=g).bfloat16() for o in outs]
    q4 = [quantize_nf4_reference(w) for w in ws]
    flops = 4 * n * H * sum(outs) + 6 * n * R * (4 * H + sum(outs))
    op, shape = "lora_qkv+o", f"N={n} H={H} kv={KV} r={R}"

    def call(fqkv, fo, w, ab):
        def fn():
            q, k, v = fqkv(x, w[0], ab[0], ab[1], w[1], ab[2], ab[3], w[2], ab[4], ab[5],
                           SCALING)
            o = fo(x, w[3], ab[6], ab[7], SCALING)
            torch.autograd.backward([q, k, v, o], douts)
        return fn

    record(op, shape, "ours", call(lora_qkv, lora_o, ws, ab32), [x, *ab32], flops, ceiling)
    record(op, shape, "ours-nf4", call(lora_qkv, lora_o, q4, ab32), [x, *ab32], flops, ceiling)
    record(op, shape, "ours-bf16ab", call(lora_qkv, lora_o, ws, ab16), [x, *ab16], flops,
           ceiling)
    if first and args.profile:
        profile(f"qkv_N{n}", {
            "ours": call(lora_qkv, lora_o, ws, ab32),
            "ours-bf16ab": call(lora_qkv, lora_o, ws, ab16),
            "eager": call(lora_qkv_reference, lora_o_reference, ws, ab16)}, [x, *ab32, *ab16])
    record(op, shape, "eager", call(lora_qkv_reference, lora_o_reference, ws, ab16),
           [x, *ab16], flops, ceiling)
    record(op, shape, "peft", call(lora_qkv_reference, lora_o_reference, ws, ab32),
           [x, *ab32], flops, ceiling)
    if first and can_compile(args):
        cq = torch.compile(lora_qkv_reference, dynamic=False)
        co = torch.compile(lora_o_reference, dynamic=False)
        record(op, shape, "compile", call(cq, co, ws, ab16), [x, *ab16], flops, ceiling)


def profile(tag, fns, params, iters=10):
    """Wall time vs summed GPU kernel time per iteration; top kernels to $OUT/profile_*.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    text = []
    for name, fn in fns.items():
        for _ in range(3):
            fn()
            for p in params:
                p.grad = None
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
                for p in params:
                    p.grad = None
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / iters * 1e3
        avg = prof.key_averages()
        gpu = sum(getattr(e, "self_device_time_total", 0) or 0 for e in avg) / iters / 1e3
        kernels = sum(e.count for e in avg
                      if (getattr(e, "self_device_time_total", 0) or 0) > 0) / iters
        line = (f"profile {tag} {name}: wall {wall:.3f} ms/iter (profiled), GPU kernels "
                f"{gpu:.3f} ms/iter, ~{kernels:.0f} kernel launches/iter")
        print(line, flush=True)
        text += [line, avg.table(sort_by="self_device_time_total", row_limit=14), ""]
    (out / f"profile_{tag}.txt").write_text("\n".join(text))


def write_outputs(meta: str):
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    cols = ["op", "shape", "variant", "ms", "peak_gib", "tflops", "floor_pct"]
    with open(out / "bench_fused_kernels.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols)
        wr.writeheader()
        wr.writerows(ROWS)
    lines = [meta, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in ROWS]
    (out / "bench_fused_kernels.md").write_text("\n".join(lines) + "\n")
    return lines


def summary():
    """Ratios the targets speak of: memory vs eager, time vs Liger."""
    by = {(r["op"], r["shape"], r["variant"]): r for r in ROWS}
    for (op, shape, variant), r in by.items():
        if variant != "ours":
            continue
        e = by.get((op, shape, "eager"))
        lg = by.get((op, shape, "liger"))
        pf = by.get((op, shape, "peft"))
        msg = f"{op} {shape}:"
        if e:
            msg += (f" peak eager/ours {e['peak_gib'] / max(r['peak_gib'], 1e-9):.1f}x,"
                    f" time eager/ours {e['ms'] / r['ms']:.2f}x")
        if pf:
            msg += f", time peft/ours {pf['ms'] / r['ms']:.2f}x"
        if lg:
            msg += (f", time liger/ours {lg['ms'] / r['ms']:.2f}x,"
                    f" peak liger/ours {lg['peak_gib'] / max(r['peak_gib'], 1e-9):.2f}x")
        print(msg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--ops", nargs="+", default=["ce", "mlp", "attn"],
                    choices=["ce", "mlp", "attn"])
    ap.add_argument("--chunk-sweep", type=int, nargs="*", default=[],
                    help="also time fused linear-CE with these chunk_rows")
    ap.add_argument("--profile", action="store_true",
                    help="profile LoRA QKV+O and MLP at the first token count to $OUT")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="skip torch.compile baselines once this many seconds have passed")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fused_kernels needs CUDA")
    import triton
    ceiling = bf16_ceiling()
    meta = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}; bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s "
            f"(8192^3 torch.mm, measured in this run)")
    print(meta, flush=True)
    for i, n in enumerate(args.tokens):
        first = i == 0
        if "ce" in args.ops:
            bench_flce(n, False, ceiling, args, first)
            bench_flce(n, True, ceiling, args, first)
            torch.cuda.empty_cache()
        if "mlp" in args.ops:
            bench_mlp(n, ceiling, args, first)
            torch.cuda.empty_cache()
        if "attn" in args.ops:
            bench_attn(n, ceiling, args, first)
            torch.cuda.empty_cache()
        write_outputs(meta)
    summary()
    print("\n".join(write_outputs(meta)))


if __name__ == "__main__":
    main()
