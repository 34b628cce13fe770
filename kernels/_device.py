"""Launch facts the kernels share: how many programs fill the device."""
import torch


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; 4 elsewhere (the interpreter runs programs serially)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
