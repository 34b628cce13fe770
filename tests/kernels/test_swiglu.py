"""SwiGLU activation kernel against the float32 reference, the in-place backward, and LlamaMLP."""
import pytest
import torch

from closeness import DEVICE, FP32, assert_matches, check_gated_activation, check_mlp_matches_hf, rand

SHAPES = [(1, 1, 37), (3, 5, 1100)]  # one row, odd width; several rows, a partial 1024-column block


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["separate", "chunked"])
def test_swiglu(shape, dtype, layout):
    from tunedag.kernels.swiglu import swiglu, swiglu_reference

    check_gated_activation(swiglu, swiglu_reference, shape, dtype, DEVICE, layout)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy, by design
def test_swiglu_extreme_inputs_stay_finite():
    from tunedag.kernels.swiglu import swiglu, swiglu_reference

    # exp(-a) overflows float32 for a < -88: sigmoid must still come out as 0, not NaN.
    check_gated_activation(swiglu, swiglu_reference, (4, 50), torch.float32, DEVICE, "separate", scale=60.0)


def test_same_tensor_as_gate_and_up_is_not_overwritten_twice():
    from tunedag.kernels.swiglu import swiglu, swiglu_reference

    x = rand((3, 40), torch.float32, DEVICE, requires_grad=True)
    x32 = x.detach().clone().requires_grad_()
    h = x * 1.0
    (grad,) = torch.autograd.grad(swiglu(h, h).sum(), [x])
    (grad_ref,) = torch.autograd.grad(swiglu_reference(x32, x32).sum(), [x32])
    assert_matches(grad, grad_ref, FP32, "d x")


def test_second_backward_through_overwritten_activations_fails_loudly():
    from tunedag.kernels.swiglu import swiglu

    a, b = (rand((2, 16), torch.float32, DEVICE, requires_grad=True) * 1.0 for _ in range(2))
    c = swiglu(a, b).sum()
    c.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.backward()


def test_module_matches_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from tunedag.kernels.swiglu import TunedagSwiGLUMLP

    config = LlamaConfig(hidden_size=24, intermediate_size=70, num_attention_heads=4, hidden_act="silu")
    hf, ours = LlamaMLP(config), TunedagSwiGLUMLP(config)
    check_mlp_matches_hf(ours, hf, 24)
