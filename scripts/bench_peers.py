"""Peer rows of the training benchmarks: Unsloth on the same random weights and batches as the HF and tunedag rows.

``import unsloth`` patches transformers in place (the Llama forward, gradient checkpointing) and sets
``PYTORCH_ALLOC_CONF``, so an Unsloth row runs in its own process, as every row of bench_train.py and
bench_full_finetune.py does, and unsloth is imported only when that row builds its model.

Unsloth loads a model from a folder. The random base of a shape (bench_train.random_model: seed 0, bf16, on the GPU,
so bit-for-bit the HF rows' weights) is saved once per shape and benchmark run by a child process that never imports
unsloth, with a word-level tokenizer whose vocabulary covers every id (so Unsloth resizes nothing), under the run's
scratch folder ($TUNEDAG_BENCH_SCRATCH, which the benchmark's driver creates and removes; a lone ``--variant`` run
uses a folder of its own). Unsloth writes its compiled cache into the working directory: its rows run from there too.

Usage (what random_base_folder runs): python scripts/bench_peers.py SHAPE FOLDER
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # scripts/tokenize.py shadows tokenize
sys.path.insert(0, os.path.dirname(_HERE))

SCRATCH_ENV = "TUNEDAG_BENCH_SCRATCH"
# Unsloth compiles every decoder layer during its first steps (~50 s at 8B): they stay out of the timing
UNSLOTH_WARMUP_STEPS = 3
UNSLOTH_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@contextlib.contextmanager
def scratch_folder():
    """Set $TUNEDAG_BENCH_SCRATCH to a fresh folder for the rows run inside the block (saved bases are gigabytes)."""
    folder = tempfile.mkdtemp(prefix="tunedag-bench-")
    old = os.environ.get(SCRATCH_ENV)
    os.environ[SCRATCH_ENV] = folder
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if old is None:
            del os.environ[SCRATCH_ENV]
        else:
            os.environ[SCRATCH_ENV] = old


def _scratch() -> Path:
    if SCRATCH_ENV not in os.environ:  # a lone --variant run: a folder of this process's own
        folder = tempfile.mkdtemp(prefix="tunedag-bench-")
        atexit.register(shutil.rmtree, folder, True)
        os.environ[SCRATCH_ENV] = folder
    return Path(os.environ[SCRATCH_ENV])


def random_base_folder(shape: str) -> Path:
    """The folder holding ``shape``'s random base and tokenizer, saved by a child process on first use."""
    folder = _scratch() / f"random-{shape}"
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, __file__, shape, str(folder)], check=True, timeout=600)
    return folder


def save_random_base(shape: str, folder: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from scripts.bench_train import random_model
    from tunedag.io import atomic_path

    model = random_model(shape)
    vocab = model.config.vocab_size
    # one word per id, so the tokenizer's length is the embedding's: nothing to resize, nothing to add
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0", bos_token="t1",
                                  eos_token="t2", model_max_length=model.config.max_position_embeddings)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def build_unsloth(shape: str, seq: int, *, load_in_4bit: bool = False, full_finetuning: bool = False):
    """(model, step(batch) -> loss): Unsloth's FastLanguageModel on ``shape``'s random base, bf16 or 4-bit base,
    LoRA r=16 alpha=32 on the seven projections (or every weight trained), Unsloth's offloaded checkpointing."""
    folder = random_base_folder(shape)
    for key, value in UNSLOTH_ENV.items():
        os.environ.setdefault(key, value)
    work = _scratch() / "unsloth-work"
    work.mkdir(exist_ok=True)
    os.chdir(work)  # unsloth_compiled_cache/ lands here
    import torch
    import unsloth  # noqa: F401 - first, so that its patches reach transformers
    from unsloth import FastLanguageModel

    from scripts.bench_train import TARGETS

    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=load_in_4bit, full_finetuning=full_finetuning,
                                                 use_gradient_checkpointing="unsloth")
    if not full_finetuning:
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                 random_state=0, max_seq_length=seq)
    model.train()
    torch.cuda.empty_cache()

    def step(batch):
        ids = batch["input_ids"].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=batch["labels"].cuda()).loss
        loss.backward()
        return loss.detach()

    return model, step


if __name__ == "__main__":
    save_random_base(sys.argv[1], Path(sys.argv[2]))
