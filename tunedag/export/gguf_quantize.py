"""K-quants (Q4_K_M, Q5_K_M, Q6_K) through llama.cpp's own `llama-quantize`.

The `gguf` Python package cannot produce k-quants, and tunedag never compiles
llama.cpp at export time: the binary must already be on PATH (a llama.cpp
release, or a cluster module).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tunedag.export.gguf_errors import GGUFExportError

LLAMA_QUANTIZE = "llama-quantize"
KQUANT_TYPES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def find_llama_quantize(outtype: str) -> str:
    binary = shutil.which(LLAMA_QUANTIZE)
    if binary is None:
        raise GGUFExportError(
            f"outtype {outtype!r} needs llama.cpp's `{LLAMA_QUANTIZE}` binary on PATH and none was found; "
            "install a llama.cpp release (or load its module) so that `llama-quantize` runs, "
            "or export f16/bf16/q8_0, which need no binary"
        )
    return binary


def run_llama_quantize(binary: str, src: Path, dst: Path, outtype: str) -> None:
    """Quantise the f16 file `src` into `dst` (which the caller renames into place)."""
    cmd = [binary, str(src), str(dst), KQUANT_TYPES[outtype]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not dst.is_file():
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise GGUFExportError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}")
