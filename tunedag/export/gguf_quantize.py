"""llama.cpp's own quantizer (k-quants, q4_0 …) through llama-cpp-python's binding to libllama.

The `gguf` package writes f32/f16/bf16/q8_0 only. Everything else is made the way llama.cpp's
`llama-quantize` makes it, by the same library function (`llama_model_quantize`), from a 16-bit
GGUF written first: no binary on PATH, no compiler at export time. llama.cpp picks per tensor (a
q4_k_m file keeps some tensors at q6_k; rows not a multiple of 256 fall back to a legacy type).
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from tunedag.export.gguf_errors import GGUFExportError
from tunedag.model_facts import GGUF_QUANTIZER_TYPES, GGUF_WRITER_TYPES, LLAMA_CPP_PACKAGE


def import_llama_cpp(why: str) -> ModuleType:
    """The llama_cpp module, or a GGUFExportError naming the package to install and ``why``."""
    try:
        import llama_cpp
    except ImportError as err:
        raise GGUFExportError(
            f"{why} needs the {LLAMA_CPP_PACKAGE} package (llama.cpp's library), which is not installed "
            f"({err}); install it with `pip install 'tunedag[export]'` (it compiles llama.cpp once), "
            f"or export only {', '.join(GGUF_WRITER_TYPES)}, which tunedag writes itself"
        ) from None
    return llama_cpp


def llama_ftype(llama_cpp: ModuleType, outtype: str) -> int:
    """llama.cpp's file-type number for a gguf_types name (q4_k_m -> LLAMA_FTYPE_MOSTLY_Q4_K_M)."""
    if outtype not in GGUF_QUANTIZER_TYPES:
        raise GGUFExportError(f"{outtype!r} is not made by llama.cpp's quantizer; it makes "
                              f"{', '.join(GGUF_QUANTIZER_TYPES)}")
    name = f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}"
    if not hasattr(llama_cpp, name):
        raise GGUFExportError(f"this {LLAMA_CPP_PACKAGE} ({getattr(llama_cpp, '__version__', '?')}) has no {name}; "
                              f"upgrade it (`pip install -U {LLAMA_CPP_PACKAGE}`)")
    return int(getattr(llama_cpp, name))


def quantize(src: Path, dst: Path, outtype: str, threads: int | None = None) -> None:
    """Quantise the 16-bit GGUF ``src`` into ``dst`` (which the caller renames into place)."""
    llama_cpp = import_llama_cpp(f"GGUF type {outtype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(llama_cpp, outtype)
    params.nthread = threads or len(os.sched_getaffinity(0))
    # llama.cpp logs each tensor to stderr (the stage's log) and returns non-zero on failure
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0 or not dst.is_file():
        raise GGUFExportError(f"llama.cpp's quantizer failed ({status}) making {outtype} from {src.name}; "
                              "its reason is in the lines above")
