"""Packed causal attention on the GPU: which backend is fastest, and are its gradients right.

For Llama-3.1-8B heads (32 query / 8 key-value heads of 128), bf16, forward + backward of
``sum(out * grad)``, median over CUDA-event-timed repeats, TFLOP/s counted as
``4 * Hq * D * sum_doc(L * (L + 1) / 2)`` forward and 2.5 times that backward:

- ``flash_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 varlen kernels),
  what ``packed_attention`` runs for documents of mixed lengths;
- ``cudnn_dense``: ``equal_docs_attention``, ``scaled_dot_product_attention`` on the cuDNN backend over
  (docs, H, L, D), what ``packed_attention`` runs when every document of the batch has one length;
- ``cudnn_varlen``: cuDNN's ragged kernels through ``aten._cudnn_attention_forward`` with cumulative
  sequence lengths, for mixed lengths.

Every backend's output and q/k/v gradients are compared with an fp32 reference on the first
document (``max |x - ref| / max |ref|``), beside flash_varlen's own error: a backend whose error
is far above flash's is wrong, not rounded. The matmul ceiling of the same run is printed too.

    python scripts/bench_attention.py                      # 4 x 4096 (the training benchmark's batch), mixed docs
    python scripts/bench_attention.py --docs 131072        # one long document (issue: long context)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HQ, HK, D = 32, 8, 128


def cuda_ms(fn, reps: int = 8) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = cuda_ms(lambda: a @ a, reps=20)
    return 2 * 8192**3 / ms / 1e9


def flash_varlen(q, k, v, cu, lens, scale):
    from tunedag.models.packed_attention import PackedSequences, packed_attention

    n = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device, dtype=torch.int32),
                                  torch.tensor(lens, device=q.device))
    seq = PackedSequences(torch.ones(n, dtype=torch.bool, device=q.device), doc, None, cu, max(lens))
    return packed_attention(q, k, v, seq, scale)


def cudnn_dense(q, k, v, cu, lens, scale):
    from tunedag.models.packed_attention import equal_docs_attention

    return equal_docs_attention(q, k, v, lens[0], scale)


def cudnn_varlen(q, k, v, cu, lens, scale):
    rep = HQ // HK
    out = torch.ops.aten._cudnn_attention_forward(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), None, cu, cu, max(lens), max(lens),
        True, 0.0, True, False, scale=scale)[0]
    return out


BACKENDS = {"flash_varlen": flash_varlen, "cudnn_dense": cudnn_dense, "cudnn_varlen": cudnn_varlen}


def reference(q, k, v, scale):
    rep = HQ // HK
    qh, kh, vh = (x.float().transpose(0, 1) for x in (q, k, v))
    kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale).transpose(0, 1)


def errors(name, q, k, v, g, cu, lens, scale) -> dict:
    """Relative error of out, dq, dk, dv on the first document against fp32."""
    first = lens[0]
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = BACKENDS[name](*xs, cu, lens, scale)
    out.backward(g)
    rs = [x[:first].detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference(*rs, scale)
    ref.backward(g[:first].float())
    pairs = [(out[:first], ref)] + [(x.grad[:first], r.grad) for x, r in zip(xs, rs)]
    return {n: float((a.float() - b).abs().max() / b.abs().max()) for n, (a, b) in zip(("out", "dq", "dk", "dv"), pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[4096] * 4, help="document lengths of the batch")
    ap.add_argument("--mixed", type=int, nargs="*", default=[1000, 3096, 2500, 1596, 4096, 3000, 1096],
                    help="a second batch of mixed lengths for the varlen backends' gradient check")
    args = ap.parse_args()
    torch.manual_seed(0)
    ceiling = matmul_tflops()
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

    qs, ks = torch.empty(1, HQ, 128, D, device="cuda", dtype=torch.bfloat16), torch.empty(1, HK, 128, D, device="cuda",
                                                                                        dtype=torch.bfloat16)
    print(json.dumps({"matmul_tflops": round(ceiling, 1), "torch": torch.__version__,
                      "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name(),
                      "cudnn_takes_gqa": can_use_cudnn_attention(SDPAParams(qs, ks, ks, None, 0.0, True, True), False)}),
          flush=True)
    scale = 1 / math.sqrt(D)
    for lens in (args.docs, args.mixed):
        if not lens:
            continue
        n = sum(lens)
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n, HK, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(n, HK, D, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
        fwd_flop = 4 * HQ * D * sum(length * (length + 1) // 2 for length in lens)
        for name in BACKENDS:
            if name == "cudnn_dense" and len(set(lens)) > 1:
                continue
            row = {"backend": name, "docs": lens if len(lens) < 9 else f"{len(lens)} docs", "tokens": n}
            try:
                if lens[0] <= 16384:  # the fp32 reference holds Hq x L x L scores
                    row["errors"] = {k_: f"{e:.1e}" for k_, e in errors(name, q, k, v, g, cu, lens, scale).items()}
                qs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                fwd = cuda_ms(lambda: BACKENDS[name](*[x.detach() for x in qs], cu, lens, scale))

                def fwd_bwd():
                    BACKENDS[name](*qs, cu, lens, scale).backward(g)

                both = cuda_ms(fwd_bwd)
                row.update(fwd_ms=round(fwd, 2), bwd_ms=round(both - fwd, 2),
                           fwd_tflops=round(fwd_flop / fwd / 1e9, 1),
                           fwd_bwd_tflops=round(3.5 * fwd_flop / both / 1e9, 1),
                           share_of_matmul=round(3.5 * fwd_flop / both / 1e9 / ceiling, 3))
            except Exception as e:  # a backend this build lacks: say so, measure the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
