"""Perplexity of a GGUF file as llama.cpp runs it, on the run's held-out samples.

The samples are the validation shards' own token ids (tokenized by tokenize, exactly as trained
and as the evaluate stage scores them), one packed sample at a time (llama.cpp has no packed-
attention mask), cut to ``MAX_TOKENS`` and to the first ``MAX_SAMPLES``: enough to tell a
quantisation that hurts from one that does not, cheap enough for a CPU job. Perplexity =
exp(mean negative log-likelihood of the trained tokens), the evaluate stage's definition.

llama.cpp is driven through llama-cpp-python's binding directly rather than its `Llama` class:
CPU weight repacking is turned off (llama-cpp-python 0.3.36 crashes with it on some q8_0 files;
repacking only reorders blocks for speed) and the KV cache is f32, so the 16-bit reference is
not rounded again.
"""
from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tunedag.data.formats import IGNORE_INDEX
from tunedag.data.shards import ShardReader
from tunedag.export.gguf_errors import GGUFExportError
from tunedag.export.gguf_quantize import import_llama_cpp

MAX_SAMPLES = 16
MAX_TOKENS = 512
GGML_TYPE_F32 = 0


def held_out_samples(val_dir: Path, max_samples: int = MAX_SAMPLES,
                     max_tokens: int = MAX_TOKENS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) of the first samples of the val shards that have a trained token."""
    reader = ShardReader(val_dir)
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(reader.num_rows):
        row = reader.row(i)
        bounds = row["cu_seqlens"]
        for start, end in zip(bounds[:-1], bounds[1:]):
            end = min(int(end), int(start) + max_tokens)
            ids, labels = row["input_ids"][start:end], row["labels"][start:end]
            if (labels[1:] != IGNORE_INDEX).any():
                samples.append((ids.astype(np.int32), labels))
                if len(samples) == max_samples:
                    return samples
    return samples


class _Model:
    """A GGUF file loaded into a llama.cpp context that returns logits at every position."""

    def __init__(self, path: Path, n_ctx: int):
        self.lib = import_llama_cpp("measuring a GGUF file's perplexity")
        lib = self.lib
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        if hasattr(mparams, "use_extra_bufts"):
            mparams.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise GGUFExportError(f"llama.cpp could not load {path} (its reason is in the lines above)")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.type_k = cparams.type_v = GGML_TYPE_F32
        cparams.n_threads = cparams.n_threads_batch = len(os.sched_getaffinity(0))
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise GGUFExportError(f"llama.cpp could not make a context of {n_ctx} tokens for {path}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), n_vocab) logits of one sequence, from a fresh cache."""
        lib, batch, n = self.lib, self.batch, len(ids)
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch.n_tokens = n
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, 1
        status = lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise GGUFExportError(f"llama.cpp could not evaluate a held-out sample of {n} tokens (status {status})")
        ptr = lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n, self.n_vocab)).copy()

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _nll(logits: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> Iterator[float]:
    """Negative log-likelihood of each trained token (label at t predicted from position t-1)."""
    logits = logits[:-1].astype(np.float64)
    targets = labels[1:]
    trained = targets != IGNORE_INDEX
    top = logits.max(-1, keepdims=True)
    log_z = (top[:, 0] + np.log(np.exp(logits - top).sum(-1)))
    picked = logits[np.arange(len(targets)), np.where(trained, targets, 0)]
    yield from (log_z - picked)[trained].tolist()


def gguf_perplexity(path: Path, samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float | int]:
    """{"perplexity", "nll", "tokens", "samples"} of the GGUF at ``path`` on ``samples``."""
    if not samples:
        return {"perplexity": float("nan"), "nll": float("nan"), "tokens": 0, "samples": 0}
    model = _Model(path, n_ctx=max(len(ids) for ids, _ in samples))
    try:
        losses = [x for ids, labels in samples for x in _nll(model.logits(ids), ids, labels)]
    finally:
        model.close()
    nll = sum(losses) / len(losses)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": len(losses), "samples": len(samples)}
