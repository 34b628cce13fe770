"""Single-GPU training speed and memory: HF + peft (sdpa, gradient checkpointing), the same with
Liger Kernel, HF + bitsandbytes QLoRA, and tunedag's triton engine (LoRA and QLoRA).

Randomly initialised Llama-3.2-1B / Llama-3.1-8B shapes (vocab 128256), LoRA r=16 alpha=32 on
all seven projections, bf16 base weights, fp32 adapters, rows of 4096 tokens (one document per
row, so every variant does the same attention work), fused AdamW. Each variant runs in its own
process (Liger patches transformers' classes; peak memory is per process) with the same seed,
so the same weights and batch: step-1 losses must agree to bf16 noise.

Model FLOPs per trained token (stated, not measured; recomputation is not counted):
    4 * N_frozen  (forward + input gradient of every frozen matmul, lm_head included)
  + 6 * N_lora    (the adapters: forward, input and weight gradients)
  + 12 * L * H * c  (attention scores and values, forward 4*H*c per layer, backward twice that;
                     c = (S + 1) / 2 is the mean causal context of an S-token document)
8B at S = 4096: 33.5 GFLOP/token. MFU = tokens/s * FLOP/token / 989.5e12 (H200 dense bf16 peak).

Usage: python scripts/bench_train.py --out bench.jsonl [--budget-s 330] [--plan default]
       python scripts/bench_train.py --variant ours_lora --shape 8b --batch 4   (one measurement)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SEQ = 4096
PEAK_FLOPS = 989.5e12
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False, head_dim=128),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLANS = {
    "default": [("ours_lora", "8b", 4), ("hf_peft", "8b", 4), ("hf_peft_liger", "8b", 4), ("ours_qlora", "8b", 4),
                ("hf_bnb_qlora", "8b", 4), ("ours_lora_offload", "8b", 4), ("ours_lora", "8b", 1),
                ("hf_peft", "8b", 1), ("ours_lora", "1b", 4), ("hf_peft", "1b", 4), ("hf_peft_liger", "1b", 4),
                ("ours_lora", "1b", 8), ("ours_qlora_long", "8b", 1)],
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       rope_theta=500000.0, initializer_range=0.02, attn_implementation="sdpa",
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       **SHAPES[shape])


def flops_per_token(shape: str, seq: int, r: int = 16) -> float:
    s = SHAPES[shape]
    h, i, n_l = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    q = s["num_attention_heads"] * s["head_dim"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    dims = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    frozen = n_l * sum(a * b for a, b in dims) + h * 128256
    lora = n_l * sum(r * (a + b) for a, b in dims)
    return 4 * frozen + 6 * lora + 12 * n_l * h * (seq + 1) / 2


def make_batch(batch: int, seq: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128256, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq).expand(batch, seq).clone(),
            "segment_ids": torch.ones(batch, seq, dtype=torch.long)}


def build_hf(shape: str, variant: str):
    """HF Llama + peft LoRA, gradient checkpointing, sdpa; + Liger or bitsandbytes 4-bit."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if "liger" in variant:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.bfloat16)
    if "bnb" in variant:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                                     quant_type="nf4").to("cuda")
                        setattr(parent, name, q)
                        del lin
        torch.cuda.empty_cache()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                        labels=batch["labels"].cuda())
        out.loss.backward()
        return out.loss.detach()

    return model, step


def build_ours(shape: str, variant: str):
    import torch
    from transformers import AutoModelForCausalLM

    from tunedag.config import RunConfig
    from tunedag.train.batching import trained_token_count
    from tunedag.train.triton_engine import TritonEngine

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.bfloat16)
    run = RunConfig(base_model="bench", datasets=[], lora_r=16, lora_alpha=32,
                    adapter="qlora" if "qlora" in variant else "lora",
                    gradient_checkpointing="nockpt" not in variant,
                    activation_offloading="offload" in variant, train_engine="triton")
    engine = TritonEngine(run, None, torch.device("cuda"), base=base)
    torch.cuda.empty_cache()

    def step(batch):
        n = trained_token_count(batch["labels"])
        loss = engine.loss_sum(batch) / n
        loss.backward()
        return loss.detach()

    return engine.model, step


def measure(variant: str, shape: str, batch: int, seq: int, steps: int = 3) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    model, step = (build_ours if variant.startswith("ours") else build_hf)(shape, variant)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    data = make_batch(batch, seq)
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(steps + 1):
        if i == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        losses.append(float(step(data)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tok_s = steps * batch * seq / elapsed
    return {"variant": variant, "shape": shape, "batch": batch, "seq": seq, "tokens_per_s": round(tok_s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "mfu": round(tok_s * flops_per_token(shape, seq) / PEAK_FLOPS, 4), "step1_loss": round(losses[0], 4),
            "trainable": sum(p.numel() for p in params)}


def longest(shape: str, budget_s: float) -> dict:
    """Longest row (in 8192-token documents) for which one QLoRA step of ours fits (doubling)."""
    import torch

    model, step = build_ours(shape, "ours_qlora_long")
    params = [p for p in model.parameters() if p.requires_grad]
    best, seq, start = 0, 65536, time.perf_counter()
    while time.perf_counter() - start < budget_s and seq <= 262144:
        data = make_batch(1, seq)
        data["segment_ids"] = (torch.arange(seq) // 8192 + 1).expand(1, seq).clone()
        data["position_ids"] = (torch.arange(seq) % 8192).expand(1, seq).clone()
        try:
            torch.cuda.reset_peak_memory_stats()
            step(data)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            break
        finally:
            for p in params:
                p.grad = None
        best, peak = seq, torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps({"longest_ok": seq, "peak_gib": round(peak, 2)}), flush=True)
        seq *= 2
    return {"variant": "ours_qlora_longest", "shape": shape, "batch": 1, "seq": best, "doc_len": 8192}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant")
    ap.add_argument("--shape", default="8b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--plan", default="default", choices=list(PLANS))
    ap.add_argument("--budget-s", type=float, default=330)
    ap.add_argument("--out", default="bench_train.jsonl")
    args = ap.parse_args()
    if args.variant:
        if args.variant == "ours_qlora_long":
            result = longest(args.shape, budget_s=60)
        else:
            result = measure(args.variant, args.shape, args.batch, args.seq)
        print("RESULT " + json.dumps(result), flush=True)
        return
    start = time.perf_counter()
    results = []
    for variant, shape, batch in PLANS[args.plan]:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 40:
            print(f"skipped {variant} {shape} b{batch}: budget spent", flush=True)
            continue
        cmd = [sys.executable, __file__, "--variant", variant, "--shape", shape, "--batch", str(batch)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(left, 150), env=os.environ)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if lines:
                results.append(json.loads(lines[-1][7:]))
            else:
                results.append({"variant": variant, "shape": shape, "batch": batch,
                                "error": (proc.stderr or proc.stdout)[-600:]})
        except subprocess.TimeoutExpired as err:
            results.append({"variant": variant, "shape": shape, "batch": batch, "error": "timeout",
                            "stdout": (err.stdout or b"")[-400:].decode(errors="replace")
                            if isinstance(err.stdout, bytes) else str(err.stdout)[-400:]})
        print(json.dumps(results[-1]), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(results[-1]) + "\n")
    base = {(r["shape"], r["batch"]): r for r in results if r.get("variant") == "hf_peft" and "tokens_per_s" in r}
    print(f"\n{'variant':22} {'shape':5} {'batch':>5} {'tok/s':>9} {'x base':>7} {'peak GiB':>9} {'mem/base':>8} "
          f"{'MFU':>6} {'loss1':>8}")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"{r['variant']:22} {r['shape']:5} {r['batch']:>5} {r.get('seq', r.get('error', ''))!s:>9}")
            continue
        b = base.get((r["shape"], r["batch"]))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b else "-"
        print(f"{r['variant']:22} {r['shape']:5} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {ratio:>7} "
              f"{r['peak_gib']:>9.2f} {mem:>8} {r['mfu']:>6.1%} {r['step1_loss']:>8.4f}")


if __name__ == "__main__":
    main()
