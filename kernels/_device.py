"""Launch facts the kernels share: interpreter or GPU, and how many programs fill the device."""
import os

import torch


def is_interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; 4 elsewhere (the interpreter runs programs serially)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
