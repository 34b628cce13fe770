"""fp8 and qat linear layers against bf16 ``nn.Linear``: forward + backward time of one layer at a model's
shapes (default Llama-3.2-3B's MLP up projection and o_proj, 8192 tokens), median of triton's do_bench.

    python scripts/bench_fp8.py [--tokens 8192]
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from tunedag.models.fp8 import Float8Linear
from tunedag.models.qat import QATLinear

SHAPES = {"up_proj 3072→8192": (3072, 8192), "down_proj 8192→3072": (8192, 3072), "o_proj 3072→3072": (3072, 3072)}
QAT = {"qat int4/int8": ("int4", "int8", 32), "qat mxfp4": ("mxfp4", "mxfp4", None), "qat nvfp4": ("nvfp4", "nvfp4", 16)}


def step_ms(layer: torch.nn.Module, x: torch.Tensor) -> float:
    grad = torch.randn(x.shape[0], layer.out_features, device=x.device, dtype=torch.bfloat16)

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad)
    return do_bench(run, warmup=10, rep=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, fwd+bwd ms (TFLOP/s)")
    for name, (k, n) in SHAPES.items():
        flop = 6 * args.tokens * k * n
        base = torch.nn.Linear(k, n, bias=False, device="cuda")
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layers = {"bf16 nn.Linear": base, "fp8 Float8Linear": Float8Linear(base)}
        layers.update({label: QATLinear(base, *spec) for label, spec in QAT.items()})
        cells = []
        for label, layer in layers.items():
            ms = step_ms(layer, x)
            cells.append(f"{label} {ms:.3f} ({flop / ms / 1e9:.0f})")
        print(f"{name}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
