"""Export a merged Hugging Face model folder to one GGUF file llama.cpp loads.

Supported: the model_types of `gguf_arch.ARCHITECTURES`; byte-level BPE and SentencePiece
tokenizers (see `gguf_vocab`); output types f32, f16, bf16, q8_0 written by the `gguf` package,
and every other type of `model_facts.GGUF_TYPES` made by llama.cpp's quantizer (through
llama-cpp-python, `gguf_quantize`) from a 16-bit file written first: bf16 for a bf16 model
(no range lost), f16 otherwise. That 16-bit file is the reference a quantised file's
perplexity is reported next to (`gguf_perplexity`).

The chat template written into the file (tokenizer.chat_template) is the one the run trained
with when the caller passes it, else the folder's own.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tunedag.export.gguf_arch import add_hparams, read_config, read_hparams, resolve_arch
from tunedag.export.gguf_errors import GGUFExportError
from tunedag.export.gguf_perplexity import gguf_perplexity
from tunedag.export.gguf_quantize import import_llama_cpp, quantize
from tunedag.export.gguf_tensors import FILE_TYPES, QT, encode, plan_tensors
from tunedag.export.gguf_vocab import add_vocab
from tunedag.io import remove_stale_temporaries
from tunedag.model_facts import GGUF_QUANTIZER_TYPES, GGUF_TYPES, GGUF_WRITER_TYPES

__all__ = ["GGUFExport", "GGUFExportError", "export_gguf"]

log = logging.getLogger(__name__)
Samples = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class GGUFExport:
    """What export_gguf wrote: the file, and its perplexity beside its 16-bit reference's."""

    path: Path
    outtype: str
    perplexity: dict[str, Any] | None = None  # gguf_perplexity's result; None: not measured
    reference: dict[str, Any] | None = None  # {"type": "f16"|"bf16", **perplexity}; None for 16/32-bit files

    def metrics(self) -> dict[str, Any]:
        return {"file": self.path.name, "type": self.outtype, "bytes": self.path.stat().st_size,
                "perplexity": self.perplexity, "reference": self.reference}


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


def write_gguf(model_dir: Path, path: Path, outtype: str, chat_template: str | None = None) -> None:
    """Write the GGUF file for `model_dir` at `path` (not atomic: see `export_gguf`)."""
    config = read_config(model_dir)
    spec = resolve_arch(config)
    hp = read_hparams(config, spec)
    plans = plan_tensors(model_dir, spec, hp, outtype)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[spec.gguf_arch])
    add_hparams(writer, hp, int(FILE_TYPES[outtype]), name=model_dir.resolve().name)
    kind = add_vocab(writer, model_dir, hp.vocab_size, chat_template)
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


def reference_type(model_dir: Path) -> str:
    """The 16-bit type a quantised file is made from and compared with: the model's own if bf16, else f16."""
    config = read_config(model_dir)
    return "bf16" if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else "f16"


def _measure(path: Path, samples: Samples | None) -> dict[str, Any] | None:
    return None if samples is None else gguf_perplexity(path, samples)


def export_gguf(model_dir: Path, out_path: Path, outtype: str, chat_template: str | None = None,
                samples: Samples | None = None) -> GGUFExport:
    """Export the merged HF folder `model_dir` to `out_path` as `outtype`.

    `chat_template` replaces the folder's own in the file's metadata; with `samples` (held-out
    token ids and labels, see `gguf_perplexity.held_out_samples`), the file's perplexity and,
    for a quantised type, its 16-bit reference's are measured before the file is renamed into place.

    Raises `GGUFExportError` (a ValueError) for an unsupported architecture,
    output type or tokenizer, a missing file, or a missing llama-cpp-python
    where llama.cpp is needed; nothing is left at `out_path` (or beside it) after a failure.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    outtype = outtype.lower()
    if outtype not in GGUF_TYPES:
        raise GGUFExportError(f"unsupported GGUF outtype {outtype!r}; choose one of: {', '.join(GGUF_TYPES)}")
    if not model_dir.is_dir():
        raise GGUFExportError(f"model folder {model_dir} does not exist")
    if outtype in GGUF_QUANTIZER_TYPES or samples is not None:
        import_llama_cpp(f"GGUF type {outtype!r}" if samples is None else "measuring the GGUF file's perplexity")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_path, ".{name}.*.partial")  # what a killed export of this file left
    if outtype in ("f32", "f16", "bf16"):  # a reference type itself
        with atomic_path(out_path) as tmp:
            write_gguf(model_dir, tmp, outtype, chat_template)
            perplexity = _measure(tmp, samples)
        return GGUFExport(out_path, outtype, perplexity)
    ref_type = reference_type(model_dir)
    with contextlib.ExitStack() as stack:
        ref_path = None
        if outtype in GGUF_QUANTIZER_TYPES or samples is not None:  # the 16-bit file is a stepping stone
            ref_path = stack.enter_context(temporary_path(out_path))
            write_gguf(model_dir, ref_path, ref_type, chat_template)
        with atomic_path(out_path) as tmp:
            if outtype in GGUF_WRITER_TYPES:
                write_gguf(model_dir, tmp, outtype, chat_template)
            else:
                quantize(ref_path, tmp, outtype)
            perplexity = _measure(tmp, samples)
            reference = None if samples is None else {"type": ref_type, **_measure(ref_path, samples)}
    return GGUFExport(out_path, outtype, perplexity, reference)
