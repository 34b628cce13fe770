"""Preference training as a full fine-tune (``adapter: null``) on one GPU: step-1 loss against log 2,
the loss over a few steps, time per step, the frozen reference's size and the peak memory.

A randomly initialised Qwen2.5-0.5B shape (hidden 896, 24 layers, vocab 151936, tied embeddings) is
saved as bf16 to --model-dir and each run is built from it by ``make_engine`` as the train stage
builds it (``auto``: the triton engine on one GPU; ``torch``), with gradient checkpointing and AdamW
at lr 1e-5. Every step is a fresh micro-batch of 2 rows x 4 pairs x (256 prompt + 128 response
tokens); chosen responses are token ids 1000-1999, rejected ones 2000-2999, so the loss can fall.
Runs: dpo_triton, dpo_torch, orpo_triton (no reference model: the memory the reference costs).

Usage: python scripts/bench_preference_full.py --out pref.json [--runs dpo_triton,orpo_triton] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

RUNS = {"dpo_triton": ("dpo", "auto"), "dpo_torch": ("dpo", "torch"), "orpo_triton": ("orpo", "auto")}


def save_model(folder: str) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                         tie_word_embeddings=True, rope_theta=1e6, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)


def pair_batch(seed: int, rows: int = 2, pairs: int = 4, prompt: int = 256, response: int = 128) -> dict:
    """A packed preference batch: per row, ``pairs`` x (prompt + chosen, prompt + rejected), prompts masked."""
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
    for _ in range(rows):
        row = {k: [] for k in out}
        for k in range(pairs):
            p = torch.randint(3000, 100000, (prompt,), generator=g).tolist()
            for j, low in enumerate((1000, 2000)):  # chosen, then rejected
                answer = torch.randint(low, low + 1000, (response,), generator=g).tolist()
                row["input_ids"] += p + answer
                row["labels"] += [-100] * prompt + answer
                row["position_ids"] += list(range(prompt + response))
                row["segment_ids"] += [2 * k + j + 1] * (prompt + response)
        for k in out:
            out[k].append(row[k])
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    batch["segment_labels"] = torch.tensor([[1, 0] * pairs] * rows, dtype=torch.long)
    return batch


def measure(name: str, model_dir: str, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    from tunedag.config import RunConfig
    from tunedag.train.engines import make_engine
    from tunedag.train.ranks import DistEnv

    rl, engine_name = RUNS[name]
    run = RunConfig(base_model="bench", datasets=[], adapter=None, rl=rl, rl_beta=0.1, learning_rate=1e-5,
                    weight_decay=0.0, gradient_checkpointing=True, train_engine=engine_name)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = make_engine(run, model_dir, DistEnv())
    reference = engine.objective.reference
    losses, times = [], []
    for step in range(steps):
        batch = pair_batch(step)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine.loss_sum(batch) / engine.objective.loss_units(batch)
        engine.backward(loss)
        engine.step(1.0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(round(float(loss.detach()), 5))
    result = {"engine": engine.name, "model_engine": engine.info.get("model_engine"), "losses": losses,
              "step1_minus_log2": round(losses[0] - math.log(2), 6),
              "median_step_s": round(statistics.median(times[2:]), 4),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "reference_gib": 0.0}
    if reference is not None:
        fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        result["reference_gib"] = round(sum(p.numel() * p.element_size() for p in reference.parameters()) / 2**30, 3)
        result["reference_max_abs_change"] = max(float((a - b).abs().max())
                                                 for a, b in zip(reference.parameters(), fresh.parameters()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model-dir", default="/tmp/bench-qwen2-0.5b")
    args = parser.parse_args()
    save_model(args.model_dir)
    results = {}
    for name in args.runs.split(","):
        results[name] = measure(name, args.model_dir, args.steps)
        print(name, json.dumps(results[name]), flush=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
