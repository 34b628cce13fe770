"""Full fine-tuning on one GPU: tunedag's triton engine (``adapter: null``) against HF transformers,
and what its precision choice costs in loss against an fp32 reference.

Speed (``--plan speed``, the default): a randomly initialised Llama-3.2-1B shape (bench_train.py's
"1b": vocab 128256, tied embeddings), every weight trained, rows of --seq tokens (one document per
row), the same seed, weights and batch for every variant, each variant in its own process (peak
memory is per process), 2 warm-up steps and --steps timed ones, tokens/s from the median step.
  hf           HF LlamaForCausalLM in bf16 (weights, gradients and AdamW moments all bf16, as a bf16
               model under HF's Trainer), sdpa, gradient checkpointing, torch's fused AdamW
  ours         tunedag's triton engine: fp32 master weights cast to bf16 inside the fused kernels,
               fp32 gradients and moments, per-layer checkpointing, torch's fused AdamW
  ours_nockpt  the same without checkpointing
  ours_kahan   the triton engine with master_weights: bf16_kahan: bf16 weights and gradients, adamw_torch_8bit's
               8-bit moments and a bf16 Kahan compensation (tunedag.train.kahan_adamw: 8 bytes per parameter),
               per-layer checkpointing
  unsloth      Unsloth's FastLanguageModel.from_pretrained(..., full_finetuning=True, dtype=bfloat16) on the
               same weights (scripts/bench_peers.py: saved once to a scratch folder): bf16 weights, gradients
               and moments like hf, its offloaded checkpointing, torch's fused AdamW; its first 3 steps
               compile the model and are not timed (import unsloth patches transformers: its own process)
Model FLOPs per token (recomputation not counted): 6 * (matmul weights, lm_head included)
+ 12 * L * H * (S + 1) / 2 for attention; MFU against 989.5 TFLOP/s (H200 dense bf16).

Precision (``--plan precision``): a small Llama (4 layers, hidden 1024, vocab 32000) trained for
--precision-steps AdamW steps (lr 1e-5, a typical full fine-tuning rate) cycling over 4 fixed batches
of 2 x 2048 random tokens (memorised, so the loss falls), from the same initial weights:
  fp32         torch engine, fp32 weights, no autocast: the reference
  autocast     torch engine, fp32 weights under bf16 autocast (tunedag's torch engine on a GPU)
  ours         triton engine, fp32 masters + bf16 compute (the choice made)
  bf16         the HF model in bf16 with torch's AdamW on bf16 weights (no master copy)
  kahan        triton engine, master_weights: bf16_kahan: bf16 weights, fp32 moments, Kahan-compensated update
  kahan_8bit   the same with adamw_torch_8bit's 8-bit moments (8 bytes per parameter)
Each row reports the mean loss of the last 4 steps and its gap to fp32.

Usage: python scripts/bench_full_finetune.py --out full.jsonl [--plan speed|precision|all]
       python scripts/bench_full_finetune.py --plan speed --variants hf,unsloth   (some of the speed rows)
       python scripts/bench_full_finetune.py --variant ours --shape 1b --batch 4   (one measurement)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # scripts/tokenize.py shadows tokenize
sys.path.insert(0, os.path.dirname(_HERE))

from scripts.bench_peers import UNSLOTH_WARMUP_STEPS, scratch_folder  # noqa: E402
from scripts.bench_rows import print_result, run_row  # noqa: E402
from scripts.bench_train import SEQ, SHAPES, make_batch, random_model  # noqa: E402

PEAK_FLOPS = 989.5e12
SPEED_VARIANTS = ("hf", "ours", "ours_nockpt", "ours_kahan", "unsloth")
KAHAN = {"kahan": "adamw_torch", "kahan_8bit": "adamw_torch_8bit", "ours_kahan": "adamw_torch_8bit"}  # optimizer
PRECISION_SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, initializer_range=0.02, pad_token_id=0, tie_word_embeddings=False)


def flops_per_token(shape: str, seq: int) -> float:
    s = SHAPES[shape]
    h, i, n_l = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    weights = n_l * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * 128256
    return 6 * weights + 12 * n_l * h * (seq + 1) / 2


def _full_run(gradient_checkpointing: bool, master_weights: str = "fp32"):
    from tunedag.config import RunConfig

    return RunConfig(base_model="bench", datasets=[], adapter=None, gradient_checkpointing=gradient_checkpointing,
                     train_engine="triton", master_weights=master_weights)


def _optimizer(variant: str, params, weight_decay: float):
    """torch's fused AdamW at lr 1e-5, or for the bf16_kahan rows their KahanAdamW."""
    import torch

    from tunedag.train.optimizers import build_optimizer

    if variant in KAHAN:
        return build_optimizer(params, KAHAN[variant], 1e-5, weight_decay, master_weights="bf16_kahan")
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=weight_decay, fused=True)


def build(variant: str, shape: str, seq: int):
    """(trained parameters, step(batch) -> loss) for one speed variant, on random weights of seed 0."""
    import torch

    if variant == "unsloth":
        from scripts.bench_peers import build_unsloth

        model, step = build_unsloth(shape, seq, full_finetuning=True)
        return [p for p in model.parameters() if p.requires_grad], step
    base = random_model(shape)
    if variant == "hf":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.train()

        def step(batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = base(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                           labels=batch["labels"].cuda())
            out.loss.backward()
            return out.loss.detach()

        return list(base.parameters()), step
    from tunedag.data.batches import trained_token_count
    from tunedag.train.triton_engine import TritonEngine

    run = _full_run(variant != "ours_nockpt", "bf16_kahan" if variant in KAHAN else "fp32")
    engine = TritonEngine(run, None, torch.device("cuda"), base=base)
    torch.cuda.empty_cache()

    def step(batch):
        loss = engine.loss_sum(batch) / trained_token_count(batch["labels"])
        loss.backward()
        return loss.detach()

    return engine.trainable_parameters(), step


def measure(variant: str, shape: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    params, step = build(variant, shape, seq)
    opt = _optimizer(variant, params, weight_decay=0.01)  # torch's default
    data = make_batch(batch, seq)
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    warmup = UNSLOTH_WARMUP_STEPS if variant == "unsloth" else 2
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(float(step(data)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tok_s = batch * seq / statistics.median(times[warmup:])
    return {"variant": variant, "shape": shape, "batch": batch, "seq": seq, "tokens_per_s": round(tok_s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "mfu": round(tok_s * flops_per_token(shape, seq) / PEAK_FLOPS, 4), "step1_loss": round(losses[0], 6),
            "last_loss": round(losses[-1], 4), "warmup_steps": warmup, "trained": sum(p.numel() for p in params)}


def precision(steps: int) -> list[dict]:
    """Loss after ``steps`` AdamW steps for each precision scheme (see the module docstring)."""
    import contextlib
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunedag.train.engines import TorchEngine
    from tunedag.train.triton_engine import TritonEngine

    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**PRECISION_SHAPE)).float().save_pretrained(folder)
    batches = [make_batch(2, 2048, seed=s) for s in range(4)]
    for b in batches:
        b["input_ids"] %= PRECISION_SHAPE["vocab_size"]
        b["labels"] = b["input_ids"].clone()
    run, dev = _full_run(False), torch.device("cuda")
    n_tokens = batches[0]["labels"][:, 1:].numel()
    rows = []
    for scheme in ("fp32", "autocast", "ours", "bf16", "kahan", "kahan_8bit"):
        if scheme in ("ours", *KAHAN):
            engine = TritonEngine(_full_run(False, "bf16_kahan") if scheme in KAHAN else run, folder, dev)
            params, loss_of = engine.trainable_parameters(), engine.loss_sum
        elif scheme == "bf16":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(dev).train()
            params = list(model.parameters())

            def loss_of(b, model=model):
                out = model(input_ids=b["input_ids"].to(dev), labels=b["labels"].to(dev))
                return out.loss * n_tokens
        else:
            engine = TorchEngine(run, folder, dev)
            if scheme == "fp32":
                engine.autocast = contextlib.nullcontext
            params, loss_of = engine.trainable_parameters(), engine.loss_sum
        opt = _optimizer(scheme, params, weight_decay=0.0)
        losses = []
        for i in range(steps):
            loss = loss_of(batches[i % len(batches)]) / n_tokens
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        rows.append({"scheme": scheme, "steps": steps, "first_loss": round(losses[0], 5),
                     "last4_loss": round(sum(losses[-4:]) / 4, 5)})
        del opt, params, loss_of
        torch.cuda.empty_cache()
    ref = rows[0]["last4_loss"]
    for r in rows:
        r["gap_to_fp32"] = round(r["last4_loss"] - ref, 5)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=SPEED_VARIANTS)
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per speed variant")
    ap.add_argument("--precision-steps", type=int, default=200)
    ap.add_argument("--plan", default="all", choices=("speed", "precision", "all"))
    ap.add_argument("--variants", default=",".join(SPEED_VARIANTS), help="the speed rows to run, comma-separated")
    ap.add_argument("--out", default="bench_full_finetune.jsonl")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in SPEED_VARIANTS]:
        ap.error(f"--variants: unknown speed rows {unknown} (known: {', '.join(SPEED_VARIANTS)})")
    if args.variant:
        print_result(measure(args.variant, args.shape, args.batch, args.seq, args.steps))
        return
    results = []
    if args.plan in ("precision", "all"):
        results += precision(args.precision_steps)
        for r in results:
            print(json.dumps(r), flush=True)
    if args.plan in ("speed", "all"):
        with scratch_folder():  # where the Unsloth row saves the random base it loads
            for variant in variants:
                cmd = [sys.executable, __file__, "--variant", variant, "--shape", args.shape, "--batch",
                       str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
                results.append(run_row(cmd, 240, {"variant": variant}))
                print(json.dumps(results[-1]), flush=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    print_speed([r for r in results if r.get("variant") in SPEED_VARIANTS])


def print_speed(rows: list[dict]) -> None:
    """The speed rows against hf of the same call: tokens/s, peak memory, step-1 loss (same weights and batch)."""
    hf = next((r for r in rows if r["variant"] == "hf" and "tokens_per_s" in r), None)
    print(f"\n{'variant':12} {'tok/s':>9} {'x hf':>6} {'peak GiB':>9} {'MFU':>6} {'loss1':>10} {'vs hf':>8} "
          f"{'last':>8}")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"{r['variant']:12} {str(r.get('error', ''))[-300:]}")
            continue
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}" if hf else "-"
        rel = f"{abs(r['step1_loss'] - hf['step1_loss']) / hf['step1_loss']:.1e}" if hf else "-"
        print(f"{r['variant']:12} {r['tokens_per_s']:>9.0f} {ratio:>6} {r['peak_gib']:>9.2f} {r['mfu']:>6.1%} "
              f"{r['step1_loss']:>10.6f} {rel:>8} {r['last_loss']:>8.4f}")


if __name__ == "__main__":
    main()
