"""Math for Triton kernels that must also run on the CPU interpreter (which lacks libdevice)."""
import triton
import triton.language as tl


@triton.jit
def tanh(y):
    # odd Taylor series near 0, where (1 - e) / (1 + e) would cancel; else the exp form on |y|
    # (e in (0, 1], so it never overflows)
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y2 = a * a
    small = a * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(y < 0, -t, t)
