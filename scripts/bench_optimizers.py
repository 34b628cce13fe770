"""State memory and step time of the optimizers on one GPU: adamw_torch (fused) against tunedag's
adamw_torch_8bit, adamw_torch_4bit and muon, over 8 fp32 weights of 4096 x 4096 (134M elements),
3 cycled random gradients, 8 steps (median of the last 6), and how far the quantized AdamWs' total
update is from AdamW's. Usage (repository root): PYTHONPATH=$PWD python3 scripts/bench_optimizers.py"""
import time

import torch

from tunedag.train.optimizers import build_optimizer
from tunedag.train.quantized_adamw import state_bytes

print("torch", torch.__version__, "Muon in torch.optim:", hasattr(torch.optim, "Muon"))
dev = "cuda"
names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(8)]
torch.manual_seed(0)
start = [torch.randn(4096, 4096, device=dev) * 0.02 for _ in names]
grads = [[torch.randn(4096, 4096, device=dev) * 1e-3 for _ in names] for _ in range(3)]
ref = None
for opt_name in ("adamw_torch", "adamw_torch_8bit", "adamw_torch_4bit", "muon"):
    params = [torch.nn.Parameter(s.clone()) for s in start]
    opt = build_optimizer(list(zip(names, params)), opt_name, lr=1e-3, weight_decay=0.0, fused=True)
    times = []
    for step in range(8):
        for p, g in zip(params, grads[step % 3]):
            p.grad = g
        torch.cuda.synchronize()
        t = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    delta = torch.cat([(p - s).flatten() for p, s in zip(params, start)])
    rel = "" if ref is None or opt_name == "muon" else f" update vs adamw {((delta - ref).norm() / ref.norm()).item():.3f}"
    ref = delta if ref is None else ref
    print(f"{opt_name}: state {state_bytes(opt) / 2**20:.0f} MiB for 8 x 4096x4096 fp32, "
          f"step {sorted(times[2:])[3] * 1e3:.1f} ms{rel}")
