"""Fused linear-CE, NF4 and LoRA-fused projections on CUDA at Llama-3.1-8B shapes.

hidden 4096, intermediate 14336, vocab 128256, 4096 tokens, LoRA r = 16, bf16 activations
and base weights, fp32 adapters (peft's default). Each kernel is compared with its plain
PyTorch reference run in fp32 on the same (bf16-rounded) inputs. Where bitsandbytes imports,
NF4 bytes and dequantisation are compared with it.
"""
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

H, I, V, N, R = 4096, 14336, 128256, 4096, 16
KV = 1024  # Llama-3.1-8B: 8 KV heads of 128


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values in the kernel's output"
    assert torch.isfinite(b).all(), "non-finite values in the reference"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def leaf32(t):
    return t.detach().float().requires_grad_()


def gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("train_head,softcap", [(False, None), (True, None), (True, 5.0)])
def test_fused_linear_cross_entropy_llama_shape(train_head, softcap):
    from tunedag.kernels.cross_entropy import (
        fused_linear_cross_entropy, fused_linear_cross_entropy_reference)

    g = gen(0)
    hid = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) * (4.0 / H**0.5)).bfloat16()
    w.requires_grad_(train_head)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[torch.rand(N, device="cuda", generator=g) < 0.1] = -100  # ~10% ignored (prompt tokens)
    t[:64] = -100

    loss = fused_linear_cross_entropy(hid, w, t, softcap=softcap)
    loss.backward()
    grads = [hid.grad] + ([w.grad] if train_head else [])
    h32, w32 = leaf32(hid), (leaf32(w) if train_head else w.detach().float())
    ref = fused_linear_cross_entropy_reference(h32, w32, t, softcap=softcap)
    ref.backward()
    grads_ref = [h32.grad] + ([w32.grad] if train_head else [])
    # Logits of size ~4 rounded once to bf16, as eager bf16 code rounds them (CPU test: the
    # grad error equals eager bf16's); the loss averages over ~3.6k tokens.
    assert rel(loss, ref) < 1e-3
    for gk, gr in zip(grads, grads_ref):
        assert rel(gk.float(), gr) < 2e-2
    assert torch.count_nonzero(hid.grad[:64]) == 0


def test_nf4_dequantize_llama_mlp_weight_and_bitsandbytes_bytes():
    from tunedag.kernels.nf4 import (
        NF4Weight, dequantize_nf4, dequantize_nf4_reference, quantize_nf4_reference)

    w = (torch.randn(I, H, device="cuda", generator=gen(1)) * 0.02).bfloat16()
    q = quantize_nf4_reference(w)
    out = torch.full_like(w, float("nan"))
    got = dequantize_nf4(q, torch.bfloat16, out=out)
    assert torch.equal(got, dequantize_nf4_reference(q, torch.bfloat16))
    assert 0.05 < rel(got.float(), w.float()) < 0.12

    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                       quant_type="nf4", quant_storage=torch.uint8)
    ours_bytes = q.packed
    theirs = packed.reshape(-1)
    assert theirs.shape == ours_bytes.shape
    nib = lambda p: torch.stack([p >> 4, p & 15], 1).reshape(-1)  # noqa: E731
    code_mismatch = (nib(ours_bytes) != nib(theirs)).float().mean().item()
    absmax_mismatch = (q.absmax_q != state.absmax.reshape(-1)).float().mean().item()
    print(f"nf4 code mismatch {code_mismatch:.2e}, absmax code mismatch {absmax_mismatch:.2e}")
    # Same nearest-code rule; only a reciprocal rounded differently at a threshold may flip.
    assert code_mismatch < 1e-4 and absmax_mismatch < 1e-3
    torch.testing.assert_close(q.absmax_offset, state.offset.float().reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(q.absmax_scale, state.state2.absmax.float(), rtol=1e-6, atol=0)
    # Reading bitsandbytes' own bytes: our Triton dequantiser equals bitsandbytes' exactly.
    theirs_dq = bnbf.dequantize_4bit(packed, state)
    ours_dq = dequantize_nf4(NF4Weight.from_bnb(packed, state), torch.bfloat16)
    assert torch.equal(ours_dq, theirs_dq)


def _mlp_inputs(seed, nf4):
    from tunedag.kernels.nf4 import quantize_nf4_reference

    g = gen(seed)
    x = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
    ws = [(torch.randn(o, k, device="cuda", generator=g) / k**0.5).bfloat16()
          for o, k in ((I, H), (I, H), (H, I))]
    ab = []
    for o, k in ((I, H), (I, H), (H, I)):
        ab += [(torch.randn(R, k, device="cuda", generator=g) / k**0.5).requires_grad_(),
               (torch.randn(o, R, device="cuda", generator=g) / R**0.5).requires_grad_()]
    if nf4:
        ws = [quantize_nf4_reference(w) for w in ws]
    return x, ws, ab


@pytest.mark.parametrize("activation,nf4", [("silu", False), ("gelu_tanh", False), ("silu", True)])
def test_lora_mlp_llama_shape(activation, nf4):
    from tunedag.kernels.lora_mlp import lora_mlp, lora_mlp_reference
    from tunedag.kernels.nf4 import dequantize_nf4_reference

    x, ws, ab = _mlp_inputs(2, nf4)
    y = lora_mlp(x, ws[0], ab[0], ab[1], ws[1], ab[2], ab[3], ws[2], ab[4], ab[5], 2.0,
                 activation)
    dy = torch.randn(y.shape, device="cuda", generator=gen(3)).bfloat16()
    y.backward(dy)
    grads = [x.grad] + [t.grad for t in ab]
    dense = [dequantize_nf4_reference(w, torch.float32) if nf4 else w.float() for w in ws]
    x32, ab32 = leaf32(x), [leaf32(t) for t in ab]
    y_ref = lora_mlp_reference(x32, dense[0], ab32[0], ab32[1], dense[1], ab32[2], ab32[3],
                               dense[2], ab32[4], ab32[5], 2.0, activation)
    y_ref.backward(dy.float())
    grads_ref = [x32.grad] + [t.grad for t in ab32]
    # bf16 operands, fp32 accumulation: 0.5-0.6% at CPU test shapes, as eager bf16 peft.
    assert rel(y.float(), y_ref) < 1.5e-2
    for gk, gr in zip(grads, grads_ref):
        assert rel(gk.float(), gr) < 1.5e-2


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_qkv_and_o_llama_shape(nf4):
    from tunedag.kernels.lora_qkv import lora_o, lora_o_reference, lora_qkv, lora_qkv_reference
    from tunedag.kernels.nf4 import dequantize_nf4_reference, quantize_nf4_reference

    g = gen(4)
    x = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
    ws, ab = [], []
    for o in (H, KV, KV, H):
        ws.append((torch.randn(o, H, device="cuda", generator=g) / H**0.5).bfloat16())
        ab += [(torch.randn(R, H, device="cuda", generator=g) / H**0.5).requires_grad_(),
               (torch.randn(o, R, device="cuda", generator=g) / R**0.5).requires_grad_()]
    if nf4:
        ws = [quantize_nf4_reference(w) for w in ws]
    q, k, v = lora_qkv(x, ws[0], ab[0], ab[1], ws[1], ab[2], ab[3], ws[2], ab[4], ab[5], 2.0)
    o = lora_o(x, ws[3], ab[6], ab[7], 2.0)
    douts = [torch.randn(t.shape, device="cuda", generator=gen(5)).bfloat16() for t in (q, k, v, o)]
    torch.autograd.backward([q, k, v, o], douts)
    grads = [x.grad] + [t.grad for t in ab]

    dense = [dequantize_nf4_reference(w, torch.float32) if nf4 else w.float() for w in ws]
    x32, ab32 = leaf32(x), [leaf32(t) for t in ab]
    ref = list(lora_qkv_reference(x32, dense[0], ab32[0], ab32[1], dense[1], ab32[2], ab32[3],
                                  dense[2], ab32[4], ab32[5], 2.0))
    ref.append(lora_o_reference(x32, dense[3], ab32[6], ab32[7], 2.0))
    torch.autograd.backward(ref, [d.float() for d in douts])
    grads_ref = [x32.grad] + [t.grad for t in ab32]
    # One bf16 projection each: 0.2-0.4% at CPU test shapes.
    for t, t_ref in zip((q, k, v, o), ref):
        assert rel(t.float(), t_ref) < 1e-2
    for gk, gr in zip(grads, grads_ref):
        assert rel(gk.float(), gr) < 1e-2
