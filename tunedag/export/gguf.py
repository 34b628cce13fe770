"""Export a merged Hugging Face model folder to one GGUF file llama.cpp loads.

Supported: model_type llama, mistral, qwen2, qwen3, gemma (see `gguf_arch`);
byte-level BPE and SentencePiece tokenizers (see `gguf_vocab`); output types
f32, f16, bf16, q8_0 written by the `gguf` package, and q4_k_m, q5_k_m, q6_k made
from the f16 file by llama.cpp's `llama-quantize` when it is on PATH.

Memory: the tensor table is planned from safetensors headers, then tensors are
read, converted and written one at a time, so peak memory is about one tensor
in f32 plus its encoded copy.

Atomicity: everything is written under a temporary name in the output folder and
renamed over `out_path` only when complete; any failure removes the temporary
file and leaves an existing `out_path` untouched.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from tunedag.export.gguf_arch import add_hparams, read_config, read_hparams, resolve_arch
from tunedag.export.gguf_errors import GGUFExportError
from tunedag.export.gguf_quantize import KQUANT_TYPES, find_llama_quantize, run_llama_quantize
from tunedag.export.gguf_tensors import FILE_TYPES, OUTTYPE_QTYPES, QT, encode, plan_tensors
from tunedag.export.gguf_vocab import add_vocab
from tunedag.io import remove_stale_temporaries

__all__ = ["GGUFExportError", "OUTTYPES", "export_gguf"]

log = logging.getLogger(__name__)
OUTTYPES = (*OUTTYPE_QTYPES, *KQUANT_TYPES)


@contextlib.contextmanager
def temporary_path(out_path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `out_path`; it is always removed on exit."""
    # Not mkstemp: that creates mode 0600; the writer creating the file gives the usual umask mode.
    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(out_path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out_path`; rename it into place on success."""
    with temporary_path(out_path) as tmp_path:
        yield tmp_path
        with open(tmp_path, "rb") as f:  # data on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(tmp_path, out_path)


def write_gguf(model_dir: Path, path: Path, outtype: str) -> None:
    """Write the GGUF file for `model_dir` at `path` (not atomic: see `export_gguf`)."""
    config = read_config(model_dir)
    spec = resolve_arch(config)
    hp = read_hparams(config, spec)
    plans = plan_tensors(model_dir, spec, hp, outtype)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[spec.gguf_arch])
    add_hparams(writer, hp, int(FILE_TYPES[outtype]), name=model_dir.resolve().name)
    kind = add_vocab(writer, model_dir, hp.vocab_size)
    for p in plans:
        if p.qtype in (QT.F32, QT.F16):
            dtype = np.float32 if p.qtype == QT.F32 else np.float16
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(dtype), p.nbytes)
        else:
            writer.add_tensor_info(p.gguf_name, p.byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
    log.info("writing %s: %s %s, %d tensors, %s tokenizer", path, spec.model_type, outtype, len(plans), kind)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plans:
            writer.write_tensor_data(encode(p))
    finally:
        writer.close()


def export_gguf(model_dir: Path, out_path: Path, outtype: str) -> Path:
    """Export the merged HF folder `model_dir` to `out_path` as `outtype`; returns `out_path`.

    Raises `GGUFExportError` (a ValueError) for an unsupported architecture,
    output type or tokenizer, a missing file, or a missing `llama-quantize` for
    k-quants; nothing is left at `out_path` (or beside it) after a failure.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unsupported GGUF outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    if not model_dir.is_dir():
        raise GGUFExportError(f"model folder {model_dir} does not exist")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_path, ".{name}.*.partial")  # what a killed export of this file left
    if outtype in KQUANT_TYPES:
        binary = find_llama_quantize(outtype)  # before any work
        with temporary_path(out_path) as f16_path:  # the f16 file is only a stepping stone
            write_gguf(model_dir, f16_path, "f16")
            with atomic_path(out_path) as tmp:
                run_llama_quantize(binary, f16_path, tmp, outtype)
        return out_path
    with atomic_path(out_path) as tmp:
        write_gguf(model_dir, tmp, outtype)
    return out_path
