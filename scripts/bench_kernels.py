"""Benchmark RMSNorm, RoPE, SwiGLU and GeGLU: ours vs torch eager, torch.compile and Liger Kernel.

For each op at Llama-3.1-8B sizes (hidden 4096, 32 q / 8 kv heads of 128, intermediate 14336)
and 4k and 16k tokens, bf16: forward-only and forward+backward median time
(``triton.testing.do_bench`` over CUDA-graph replays, so that launch overhead does not hide the
kernels at 4k tokens), the peak memory one forward+backward allocates beyond its inputs,
and our fraction of the memory-bandwidth floor: the bytes a perfect fused kernel must move
(each input read once, each output written once, forward and backward) over the device-copy
bandwidth measured in the same run. The baselines are the reference functions of the kernel
files, so the tests and this benchmark measure the same thing.

    python scripts/bench_kernels.py [--tokens 4096 16384]     # OUT=dir also writes CSV + markdown
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunedag.kernels import geglu as geglu_mod  # noqa: E402
from tunedag.kernels import rms_norm as rms_mod  # noqa: E402
from tunedag.kernels import rope as rope_mod  # noqa: E402
from tunedag.kernels import swiglu as swiglu_mod  # noqa: E402

HIDDEN, N_Q, N_KV, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
DTYPE = torch.bfloat16
DEVICE = "cuda"


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(n_bytes // 2 // 64, dtype=torch.bfloat16).to(DEVICE).repeat(64)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * n_bytes / (ms * 1e-3)


def try_liger():
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError as e:
        print(f"Liger Kernel not importable ({e}); its columns stay empty", flush=True)
        return None
    from importlib.metadata import version

    return {
        "version": version("liger-kernel"),
        # the settings of Liger's own modules (LigerRMSNorm: llama casting, in_place=True)
        "rms_norm": lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", True),
        "rms_norm_residual": lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, 1e-5, 0.0, "llama", False),
        "rope": lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin),
        "swiglu": lambda a, b: LigerSiLUMulFunction.apply(a, b),
        "geglu_tanh": lambda a, b: LigerGELUMulFunction.apply(a, b),
    }


class Case:
    """One op at one size: inputs, output-gradient shapes, bytes of the floor, and the impls."""

    def __init__(self, op: str, tokens: int, liger):
        self.op, self.tokens = op, tokens
        t, dev = tokens, DEVICE

        # Inputs come from the CPU generator: a baseline whose graph capture fails leaves the CUDA
        # generator mid-capture (seen with RoPE on torch 2.11), which would break every later randn.
        def randn(*shape):
            return torch.randn(*shape).to(dev)

        def leaf(*shape, scale=1.0):
            return (randn(*shape) * scale).to(DTYPE).requires_grad_()

        e = 2  # bytes per bf16 element
        if op in ("rms_norm", "rms_norm_residual"):
            x, w = leaf(t, HIDDEN), leaf(HIDDEN)
            with torch.no_grad():
                w.normal_(1.0, 0.1)
            n = t * HIDDEN * e
            if op == "rms_norm":
                self.inputs = [x, w]
                # fwd: read x, write y; bwd: read dy, x, write dx (weight, rstd: negligible)
                self.bytes = 5 * n
                self.impls = {
                    "ours": lambda x, w: rms_mod.rms_norm(x, w, 1e-5),
                    "eager": lambda x, w: rms_mod.rms_norm_reference(x, w, 1e-5),
                }
            else:
                r = leaf(t, HIDDEN)
                self.inputs = [x, r, w]
                # fwd: read x, r, write y, h; bwd: read dy, dh, h, write dx (shared by x and r)
                self.bytes = 8 * n
                self.impls = {
                    "ours": lambda x, r, w: rms_mod.rms_norm(x, w, 1e-5, residual=r),
                    "eager": lambda x, r, w: rms_mod.rms_norm_reference(x, w, 1e-5, residual=r),
                }
        elif op == "rope":
            # HF's layout: (B, S, H*D) projection outputs viewed as (B, H, S, D); see bench_case
            self.qk_source = (randn(1, t, N_Q * HEAD_DIM).to(DTYPE), randn(1, t, N_KV * HEAD_DIM).to(DTYPE))
            positions = rope_mod.packed_position_ids([t // 4] * 4, device=dev)  # 4 packed documents
            cos, sin = rope_mod.rope_cos_sin(positions, rope_mod.llama3_inv_freq(HEAD_DIM, device=dev), DTYPE)
            qk = (N_Q + N_KV) * t * HEAD_DIM * e
            # fwd: read q, k, cos, sin, write q, k; bwd: read dq, dk, cos, sin, write dq, dk
            self.bytes = 4 * qk + 4 * t * HEAD_DIM * e
            self.impls = {
                "ours": lambda q, k: rope_mod.rope(q, k, cos, sin),
                "eager": lambda q, k: rope_mod.rope_reference(q, k, cos, sin),
            }
            if liger is not None:
                self.impls["liger"] = lambda q, k: liger["rope"](q, k, cos, sin)
        else:
            a, b = leaf(t, INTERMEDIATE, scale=2.0), leaf(t, INTERMEDIATE, scale=2.0)
            self.inputs = [a, b]
            # fwd: read a, b, write c; bwd: read dc, a, b, write da, db
            self.bytes = 8 * t * INTERMEDIATE * e
            if op == "swiglu":
                self.impls = {"ours": swiglu_mod.swiglu, "eager": swiglu_mod.swiglu_reference}
            else:
                approx = "tanh" if op == "geglu_tanh" else "none"
                self.impls = {
                    "ours": lambda a, b: geglu_mod.geglu(a, b, approx),
                    "eager": lambda a, b: geglu_mod.geglu_reference(a, b, approx),
                }
        self.impls["compile"] = torch.compile(self.impls["eager"], dynamic=False)
        if liger is not None and op in liger and op != "rope":
            self.impls["liger"] = liger[op]


def bench_case(case: Case, impl: str, grads_cache: dict) -> dict:
    fn = case.impls[impl]
    if case.op == "rope":
        t = case.tokens
        # Non-leaf "projection outputs" made once (ours rotates them in place, as in HF, where
        # q_proj's output is dead after RoPE); every step takes fresh (B, H, S, D) views of them.
        q_proj, k_proj = (src.clone().requires_grad_() * 1 for src in case.qk_source)

        def inputs():
            return [q_proj.view(1, t, N_Q, HEAD_DIM).transpose(1, 2), k_proj.view(1, t, N_KV, HEAD_DIM).transpose(1, 2)]

        grad_wrt = [q_proj, k_proj]
    else:
        def inputs():
            return case.inputs

        grad_wrt = case.inputs

    def forward():
        with torch.no_grad():
            return fn(*inputs())

    def forward_backward():
        outs = fn(*inputs())
        outs = outs if isinstance(outs, tuple) else (outs,)
        key = tuple((o.shape, o.dtype) for o in outs)
        if key not in grads_cache:
            grads_cache[key] = [torch.randn(o.shape).to(o) for o in outs]
        torch.autograd.grad(outs, grad_wrt, grads_cache[key])

    forward_backward()  # compile / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # Time CUDA-graph replays: at 4k tokens a step is ~50 us of GPU work, less than the Python
    # and autograd launch overhead, so un-graphed timings would measure the host, not the kernels.
    graphed = True
    try:
        ms_fwd = triton.testing.do_bench(_graph(forward), warmup=25, rep=100, return_mode="median")
        ms = triton.testing.do_bench(_graph(forward_backward), warmup=25, rep=200, return_mode="median")
    except Exception as e:  # a baseline that cannot be captured: time it eagerly, and say so
        print(f"  {case.op} {impl}: no CUDA graph ({type(e).__name__}: {str(e)[:80]}); eager launches", flush=True)
        torch.cuda.synchronize()
        graphed = False
        ms_fwd = triton.testing.do_bench(forward, warmup=25, rep=100, return_mode="median")
        ms = triton.testing.do_bench(forward_backward, warmup=25, rep=200, return_mode="median")
    return {"fwd_ms": ms_fwd, "fwd_bwd_ms": ms, "peak_mib": peak / 2**20, "graph": graphed}


def _graph(step):
    """Capture ``step`` (after warm-up on a side stream, as torch.cuda.graph requires); return replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def sweep(liger) -> list[str]:
    """Ours under a few launch settings (fwd+bwd ms), to choose the defaults from measurements."""
    settings = [("rms_norm", t, rms_mod, "BACKWARD_PROGRAMS_PER_SM", v) for t in (4096, 16384) for v in (1, 2, 4)]
    settings += [("rope", t, rope_mod, "NUM_WARPS", v) for t in (4096, 16384) for v in (2, 4, 8)]
    lines, cases = [], {}
    for op, tokens, module, names, values in settings:
        names_t = names if isinstance(names, tuple) else (names,)
        values_t = values if isinstance(values, tuple) else (values,)
        saved = [getattr(module, n) for n in names_t]
        for n, v in zip(names_t, values_t):
            setattr(module, n, v)
        try:
            if (op, tokens) not in cases:
                cases[(op, tokens)] = Case(op, tokens, None)
            case = cases[(op, tokens)]
            case.impls = {"ours": case.impls["ours"]}
            ms = bench_case(case, "ours", {})["fwd_bwd_ms"]
        finally:
            for n, v in zip(names_t, saved):
                setattr(module, n, v)
        line = f"sweep {op:9s} {tokens:6d} " + " ".join(f"{n}={v}" for n, v in zip(names_t, values_t)) + f": {ms:.3f} ms"
        print(line, flush=True)
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--ops", nargs="+", default=["rms_norm", "rms_norm_residual", "rope", "swiglu", "geglu_tanh", "geglu_erf"])
    parser.add_argument("--sweep", action="store_true", help="also time ours under a few launch settings")
    args = parser.parse_args()
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    liger = try_liger()
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, "
          f"liger {liger['version'] if liger else '-'}; copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    sweep_lines = sweep(liger) if args.sweep else []
    rows = []
    for op in args.ops:
        for tokens in args.tokens:
            case = Case(op, tokens, liger)
            floor_ms = case.bytes / bandwidth * 1e3
            grads_cache: dict = {}
            for impl in ("ours", "liger", "compile", "eager"):
                if impl not in case.impls:
                    continue
                t0 = time.time()
                r = bench_case(case, impl, grads_cache)
                row = {"op": op, "tokens": tokens, "impl": impl, **r, "floor_ms": floor_ms,
                       "floor_frac": floor_ms / r["fwd_bwd_ms"]}
                rows.append(row)
                print(f"{op:18s} {tokens:6d} {impl:8s} {'' if r['graph'] else '(no graph) '}fwd {r['fwd_ms']:.3f} ms  fwd+bwd {r['fwd_bwd_ms']:.3f} ms  "
                      f"peak {r['peak_mib']:8.1f} MiB  floor {floor_ms:.3f} ms ({row['floor_frac']:.0%})  "
                      f"[{time.time() - t0:.0f} s]", flush=True)
            del case
            torch.cuda.empty_cache()

    header = "| op | tokens | impl | fwd ms | fwd+bwd ms | vs ours | peak MiB | floor ms | of floor |"
    lines = [header, "|" + " --- |" * 9]
    ours = {(r["op"], r["tokens"]): r["fwd_bwd_ms"] for r in rows if r["impl"] == "ours"}
    for r in rows:
        rel = r["fwd_bwd_ms"] / ours[(r["op"], r["tokens"])]
        impl = r["impl"] + ("" if r["graph"] else " (no graph)")
        lines.append(f"| {r['op']} | {r['tokens']} | {impl} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{rel:.2f}x | {r['peak_mib']:.0f} | {r['floor_ms']:.3f} | {r['floor_frac']:.0%} |")
    title = (f"{gpu}; torch {torch.__version__}; triton {triton.__version__}; liger {liger['version'] if liger else '-'}; "
             f"bf16; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); times are medians of CUDA-graph replays")
    table = "\n".join([title, "", *lines])
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "bench_kernels.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["gpu", "torch", "triton", *rows[0].keys()])
            writer.writeheader()
            for r in rows:
                writer.writerow({"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, **r})
        (Path(out) / "bench_kernels.md").write_text(table + "\n")
    print("\n".join(["", *sweep_lines, "", table]))


if __name__ == "__main__":
    main()
