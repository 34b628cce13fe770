"""GeGLU activation kernel (exact erf and tanh forms) against float32 references and GemmaMLP."""
import functools

import pytest
import torch

from closeness import DEVICE, check_gated_activation, check_mlp_matches_hf


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, layout", [((1, 1, 37), "separate"), ((3, 5, 1100), "separate"), ((2, 3, 1030), "chunked")]
)
def test_geglu(shape, layout, dtype, approximate):
    from tunedag.kernels.geglu import geglu, geglu_reference

    fn = functools.partial(geglu, approximate=approximate)
    ref = functools.partial(geglu_reference, approximate=approximate)
    check_gated_activation(fn, ref, shape, dtype, DEVICE, layout)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy, by design
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_extreme_inputs_stay_finite(approximate):
    from tunedag.kernels.geglu import geglu, geglu_reference

    # exp(-2 z) overflows float32 for z < -44 (sigmoid -> 0), erf saturates: no NaN, same values.
    fn = functools.partial(geglu, approximate=approximate)
    ref = functools.partial(geglu_reference, approximate=approximate)
    check_gated_activation(fn, ref, (4, 50), torch.float32, DEVICE, "separate", scale=30.0)


def test_rejects_unknown_approximation():
    from tunedag.kernels.geglu import geglu

    with pytest.raises(ValueError, match="approximate"):
        geglu(torch.randn(2, 4), torch.randn(2, 4), approximate="sigmoid")


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_module_matches_gemma_mlp(hidden_act):
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    from tunedag.kernels.geglu import TunedagGEGLUMLP

    config = GemmaConfig(hidden_size=24, intermediate_size=70, num_attention_heads=4, head_dim=6, hidden_act=hidden_act)
    hf, ours = GemmaMLP(config), TunedagGEGLUMLP(config)
    check_mlp_matches_hf(ours, hf, 24)
