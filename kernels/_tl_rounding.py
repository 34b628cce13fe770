"""Round-to-nearest-even stores for Triton kernels, identical on the GPU and the interpreter.

Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) truncates fp32 -> bf16
casts even when ``fp_downcast_rounding="rtne"`` is asked for, while the GPU rounds to nearest
even. Rounding the fp32 bits ourselves first makes the final cast exact on both, so a kernel
gives the same bits under test as on the GPU (e.g. NF4 dequantisation equals the PyTorch
reference exactly). Costs three integer ops per element; stores are memory-bound anyway.
"""
import triton
import triton.language as tl


@triton.jit
def cast_for_store(x, ptr):
    """``x`` (fp32) converted to ``ptr``'s element type, rounding to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + (0x7FFF + ((b >> 16) & 1))) >> 16) << 16  # NaN stays NaN, overflow -> inf
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(ptr.dtype.element_ty)
