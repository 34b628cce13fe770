"""Training speed on one GPU and on two, through the training stage itself: tokens/s per GPU of each
engine against the 1-GPU triton engine, measured in one run.

The model is a randomly initialised Llama-3.1-8B shape (``bench_train.SHAPES["8b"]``, vocab
128256) saved once as a bf16 safetensors folder; the data are packed shards of random
4096-token rows (one document per row); LoRA r=16 alpha=32 on the seven projections, micro-batch
4 per GPU, gradient checkpointing. Every row runs the real stage: ``scripts/train.py --launcher
local`` on one GPU, and the Slurm job's ``TrainJob`` on two torchrun ranks (one per GPU), so data
loading, metrics and checkpoint writes are in the figures. tokens/s per GPU is read from
train_metrics.jsonl: tokens trained after the warm-up steps over the time they took, divided by
the number of GPUs, and compared with the first one-GPU row of the same kind (LoRA or full).

The ``full_*`` rows train every weight (``adapter: null``, lr 1e-5) with 8-bit AdamW moments
(``adamw_torch_8bit``): on one GPU over fp32 master weights or over bf16 weights with Kahan
compensation, and on two GPUs with fsdp (FSDP2) and DeepSpeed ZeRO-3, which shard weights, gradients
and optimizer state. (With fp32 moments an 8B model's final checkpoint is 96 GB, which with the
model and the final weights outgrows the benchmark machine's 128 GiB disk.)

Usage: python scripts/bench_multi_gpu.py --out multi_gpu.jsonl [--rows triton_1gpu,ddp,fsdp,zero2,zero3]
       [--steps 8 --warmup 3] [--shape 8b]   (rows: the names in ROWS, full_* among them)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # scripts/tokenize.py shadows tokenize
sys.path.insert(0, str(_HERE.parent))

MICRO_BATCH = 4
FULL = {"adapter": None, "learning_rate": 1e-5, "train_engine": "auto", "optimizer": "adamw_torch_8bit"}
ROWS = {  # name: (GPUs, run keys)
    "triton_1gpu": (1, {"train_engine": "auto"}),
    "triton_1gpu_auto": (1, {"train_engine": "auto", "gradient_checkpointing": "auto"}),  # what auto picks here
    "ddp": (2, {"train_engine": "ddp"}),
    "fsdp": (2, {"train_engine": "fsdp"}),
    "zero2": (2, {"train_engine": "deepspeed", "deepspeed_zero_stage": 2}),
    "zero3": (2, {"train_engine": "deepspeed", "deepspeed_zero_stage": 3}),
    # full fine-tuning (adapter: null, every weight trained, lr 1e-5, 8-bit AdamW moments): one GPU with fp32
    # masters or bf16 + Kahan compensation, two GPUs sharding weights, gradients and moments
    "full_1gpu_8bit": (1, FULL),
    "full_1gpu_kahan_8bit": (1, {**FULL, "master_weights": "bf16_kahan"}),
    "full_fsdp": (2, {**FULL, "train_engine": "fsdp"}),
    "full_zero3": (2, {**FULL, "train_engine": "deepspeed", "deepspeed_zero_stage": 3}),
}


def save_model(shape: str, dest: Path) -> Path:
    """The random bf16 model, saved once (reused when ``dest`` holds it)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM

    from scripts.bench_train import llama_config

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(llama_config(shape), torch_dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def write_shards(dest: Path, rows: int, vocab: int, seq: int) -> Path:
    """Packed shards of random ``seq``-token rows and the manifest the loop reads."""
    import numpy as np

    from tunedag.data.packing import PackedRows
    from tunedag.data.shards import ShardWriter
    from tunedag.io import write_json

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=rows * seq, dtype=np.int32)
    packed = PackedRows(input_ids=ids, labels=ids.copy(), position_ids=np.tile(np.arange(seq, dtype=np.int32), rows),
                        row_offsets=np.arange(rows + 1, dtype=np.int64) * seq,
                        cu_seqlens=np.tile(np.array([0, seq], dtype=np.int32), rows),
                        cu_offsets=np.arange(rows + 1, dtype=np.int64) * 2, samples_per_row=np.ones(rows, np.int64))
    writer = ShardWriter(dest / "train")
    writer.write(packed)
    write_json(dest / "manifest.json", {"config_hash": "bench", "pad_token_id": 0, "objective": "sft",
                                        "splits": {"train": {"shards": writer.close()}}})
    return dest


def write_config(dest: Path, model: Path, steps: int, seq: int) -> Path:
    import yaml

    data = dest / "unused.jsonl"  # the config names a dataset; the shards above stand for it
    data.write_text('{"instruction": "x", "output": "y"}\n')
    base = {"base_model": str(model), "datasets": [{"path": str(data), "type": "alpaca"}], "sequence_len": seq,
            "micro_batch_size": MICRO_BATCH, "max_steps": steps, "save_steps": 10**6, "logging_steps": 1,
            "lora_r": 16, "lora_alpha": 32, "gradient_checkpointing": True, "seed": 0}
    runs = {name: {**base, **keys} for name, (_, keys) in ROWS.items()}
    (dest / "config.yaml").write_text(yaml.safe_dump({"runs": runs}))
    return dest / "config.yaml"


def launch(name: str, config: Path, shards: Path, model: Path, run_dir: Path) -> float:
    """Train row ``name`` through the stage; wall seconds."""
    gpus, _ = ROWS[name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",  # tunedag from this checkout, installed or not
           "PYTHONPATH": os.pathsep.join(p for p in (str(_HERE.parent), os.environ.get("PYTHONPATH")) if p)}
    if gpus == 1:
        cmd = [sys.executable, "-P", str(_HERE / "train.py"), "--config", str(config), "--run", name,
               "--shards", str(shards), "--model", str(model), "--run-dir", str(run_dir), "--launcher", "local"]
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    else:
        code = "import sys; from tunedag.slurm.job import TrainJob; TrainJob(*sys.argv[1:])()"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               "--no-python", sys.executable, "-c", code, str(config), name, str(shards), str(model), str(run_dir)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=_HERE.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{(proc.stdout + proc.stderr)[-5000:]}")
    return time.perf_counter() - started


def measured(run_dir: Path, gpus: int, warmup: int) -> dict:
    records = [json.loads(l) for l in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    info = json.loads((run_dir / "train_info.json").read_text())
    first, last = records[warmup - 1], records[-1]
    rate = (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_s"] - first["elapsed_s"])
    return {"tokens_per_s": round(rate, 1), "tokens_per_s_per_gpu": round(rate / gpus, 1),
            "peak_gib_rank0": last.get("gpu_memory_gib"), "step1_loss": records[0]["loss"],
            "engine": info["engine"], "model_engine": info.get("model_engine"), "world_size": info["world_size"],
            "gradient_checkpointing": info.get("gradient_checkpointing")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=4096, help="row length (smaller for smoke tests)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tunedag-bench-multi-gpu"))
    ap.add_argument("--out", type=Path, default=Path("bench_multi_gpu.jsonl"))
    args = ap.parse_args()
    import torch
    import transformers

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = save_model(args.shape, work / f"model-{args.shape}")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rows_needed = 2 * MICRO_BATCH * args.steps
    shards = write_shards(work / "packed", rows_needed, vocab, args.seq)
    config = write_config(work, model, args.steps, args.seq)
    versions = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "gpus_on_host": torch.cuda.device_count(), "torch": torch.__version__,
                "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}
    baselines = {}  # LoRA or full: the first one-GPU row of that kind, which the others are compared with
    with open(args.out, "a") as out:
        for name in args.rows.split(","):
            gpus, keys = ROWS[name]
            run_dir = work / "runs" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            wall = launch(name, config, shards, model, run_dir)
            row = {"row": name, "gpus": gpus, "shape": args.shape, "seq": args.seq, "wall_s": round(wall, 1),
                   **measured(run_dir, gpus, args.warmup), **versions}
            shutil.rmtree(run_dir)  # an 8B full fine-tune's final checkpoint is over 100 GB: one row's at a time
            kind = "full" if keys.get("adapter", "lora") is None else "lora"
            if gpus == 1 and kind not in baselines:
                baselines[kind] = (name, row["tokens_per_s_per_gpu"])
            if kind in baselines:
                row["per_gpu_vs"] = baselines[kind][0]
                row["per_gpu_ratio"] = round(row["tokens_per_s_per_gpu"] / baselines[kind][1], 3)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
