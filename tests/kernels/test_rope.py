"""RoPE kernel (q and k in one launch, in place, GQA, packed positions) against float64 references."""
import pytest
import torch

from closeness import DEVICE, FP32, assert_matches, poisoned_allocations, rand, tol_for

LLAMA3 = dict(rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


def _cos_sin(batch, seq, head_dim, dtype, device, mode):
    """'positions': packed rows (row b > 0 restarts at 0 mid-row); 'shared': (1, S, D) from 0..S-1;
    '2d': (S, D); 'random': arbitrary cos/sin rows, so that every output element must change."""
    from tunedag.kernels.rope import llama3_inv_freq, packed_position_ids, rope_cos_sin

    # original_max_position_embeddings small enough that the smoothing band is hit at head_dim 16+
    inv_freq = llama3_inv_freq(head_dim, **LLAMA3, original_max_position_embeddings=8192, device=device)
    if mode == "random":
        return rand((batch, seq, head_dim), dtype, device), rand((batch, seq, head_dim), dtype, device)
    if mode == "positions":
        rows = [torch.arange(seq, device=device)]
        for b in range(1, batch):
            cut = 1 + (b * 3) % max(seq - 1, 1)
            rows.append(packed_position_ids([cut, seq - cut], device=device)[0])
        return rope_cos_sin(torch.stack(rows), inv_freq, dtype)
    cos, sin = rope_cos_sin(torch.arange(seq, device=device)[None], inv_freq, dtype)
    return (cos[0], sin[0]) if mode == "2d" else (cos, sin)


def check_rope(batch, n_q, n_k, seq, head_dim, dtype, device, cos_mode="positions"):
    """Forward and both gradients of ``rope`` on HF's layout (a transposed view of (B, S, H*D))."""
    from tunedag.kernels.rope import rope, rope_reference

    qp = rand((batch, seq, n_q * head_dim), dtype, device, requires_grad=True)
    kp = rand((batch, seq, n_k * head_dim), dtype, device, requires_grad=True)
    cos, sin = _cos_sin(batch, seq, head_dim, dtype, device, cos_mode)
    qp64, kp64 = (t.detach().double().requires_grad_() for t in (qp, kp))

    def heads(t, n):  # (B, S, n*D) -> (B, n, S, D), a strided view as in HF's attention
        return t.view(batch, seq, n, head_dim).transpose(1, 2)

    with poisoned_allocations():
        q, k = heads(qp.clone(), n_q), heads(kp.clone(), n_k)
        q_out, k_out = rope(q, k, cos, sin)
        assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
        gq, gk = rand(q_out.shape, dtype, device), rand(k_out.shape, dtype, device)
        torch.autograd.backward([q_out, k_out], [gq, gk])

    q_ref, k_ref = rope_reference(heads(qp64, n_q), heads(kp64, n_k), cos.double(), sin.double())
    torch.autograd.backward([q_ref, k_ref], [gq.double(), gk.double()])
    tol = tol_for(dtype)
    assert_matches(q_out, q_ref, tol, "q")
    assert_matches(k_out, k_ref, tol, "k")
    assert_matches(qp.grad, qp64.grad, tol, "dq")
    assert_matches(kp.grad, kp64.grad, tol, "dk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, n_q, n_k, seq, head_dim, cos_mode",
    [
        (2, 4, 2, 7, 16, "positions"),  # GQA, packed positions per row
        (1, 3, 3, 1, 24, "2d"),  # one token, MHA, half = 12 (not a power of two)
        (2, 6, 1, 5, 8, "random"),  # MQA; arbitrary cos/sin rows, so every output element moves
        (1, 300, 2, 2, 16, "shared"),  # more q heads than one register tile: the head loop
    ],
)
def test_rope(batch, n_q, n_k, seq, head_dim, cos_mode, dtype):
    check_rope(batch, n_q, n_k, seq, head_dim, dtype, DEVICE, cos_mode)


def test_packed_documents_rotate_as_if_alone():
    from tunedag.kernels.rope import llama3_inv_freq, packed_position_ids, rope, rope_cos_sin

    lengths, n_q, n_k, d = [3, 5], 2, 1, 16
    inv_freq = llama3_inv_freq(d, **LLAMA3, device=DEVICE)
    q, k = rand((1, n_q, sum(lengths), d), torch.float32, DEVICE), rand((1, n_k, sum(lengths), d), torch.float32, DEVICE)
    q_doc, k_doc = q[:, :, 3:].clone(), k[:, :, 3:].clone()
    rope(q, k, *rope_cos_sin(packed_position_ids(lengths, device=DEVICE), inv_freq, torch.float32))
    rope(q_doc, k_doc, *rope_cos_sin(torch.arange(5, device=DEVICE)[None], inv_freq, torch.float32))
    assert torch.equal(q[:, :, 3:], q_doc) and torch.equal(k[:, :, 3:], k_doc)


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_inv_freq_and_cos_sin_match_hf(rope_type):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from tunedag.kernels.rope import default_inv_freq, llama3_inv_freq, packed_position_ids, rope_cos_sin

    head_dim = 16
    params = {"rope_type": "llama3", **LLAMA3, "original_max_position_embeddings": 8192}
    if rope_type == "default":
        params = {"rope_type": "default", "rope_theta": 10000.0}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, rope_parameters=params)
    hf = LlamaRotaryEmbedding(config).to(DEVICE)
    ours = default_inv_freq(head_dim, 10000.0) if rope_type == "default" else llama3_inv_freq(head_dim, **LLAMA3)
    assert torch.equal(ours.to(DEVICE), hf.inv_freq)
    position_ids = packed_position_ids([9000, 300, 5], device=DEVICE)  # past the original context, then restarts
    x = torch.zeros(1, dtype=torch.bfloat16, device=DEVICE)  # HF reads only x's dtype and device
    for got, want in zip(rope_cos_sin(position_ids, ours, torch.bfloat16), hf(x, position_ids)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_drop_in_matches_hf_apply_rotary_pos_emb(unsqueeze_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    from tunedag.kernels.rope import apply_rotary_pos_emb, llama3_inv_freq, rope_cos_sin

    b, s, n_q, n_k, d = 2, 6, 4, 2, 16
    shape = (lambda n: (b, n, s, d)) if unsqueeze_dim == 1 else (lambda n: (b, s, n, d))
    q, k = rand(shape(n_q), torch.float32, DEVICE), rand(shape(n_k), torch.float32, DEVICE)
    positions = torch.stack([torch.arange(s), torch.arange(s) % 4]).to(DEVICE)
    cos, sin = rope_cos_sin(positions, llama3_inv_freq(d), torch.float32)
    q_hf, k_hf = hf_apply(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    q_ours, k_ours = apply_rotary_pos_emb(q.clone(), k.clone(), cos, sin, unsqueeze_dim=unsqueeze_dim)
    assert_matches(q_ours, q_hf, FP32, "q vs HF")
    assert_matches(k_ours, k_hf, FP32, "k vs HF")


def test_unrotated_q_saved_elsewhere_fails_loudly():
    from tunedag.kernels.rope import rope

    qp = rand((1, 3, 16), torch.float32, DEVICE, requires_grad=True)
    q = qp.clone().view(1, 3, 1, 16).transpose(1, 2)
    k = q.detach().clone()
    side = torch.sin(q)  # saves the unrotated q for its backward
    cos, sin = rand((1, 3, 16), torch.float32, DEVICE), rand((1, 3, 16), torch.float32, DEVICE)
    q_out, _ = rope(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (q_out.sum() + side.sum()).backward()


def test_rejects_leaf_and_bad_cos():
    from tunedag.kernels.rope import rope

    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    for leaf_or_view in (q, q.transpose(1, 2).transpose(1, 2)):
        with pytest.raises(ValueError, match="in place"):
            rope(leaf_or_view, torch.randn(1, 1, 3, 8), torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="cos/sin"):
        rope(torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(4, 8), torch.randn(4, 8))
