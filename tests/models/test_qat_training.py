"""qat on a model: which layers are swapped and what they compute, a few training steps in every format, and
the torch engine's run through the loop with fake_quant_after_n_steps."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tunedag.models.fake_quant import int4_weight, int8_token
from tunedag.models.qat import QATError, QATLinear, fake_quant_due, prepare_qat, set_fake_quant
from tunedag.train.loop import train
from tests.helpers import tiny_run
from tests.train.ranks import metrics

FORMATS = {"int4/int8": ("int4", "int8", 32), "mxfp4": ("mxfp4", "mxfp4", None), "nvfp4": ("nvfp4", "nvfp4", 16)}


def tiny_llama(seed=0, hidden=64):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_every_linear_is_swapped_and_keeps_its_parameters():
    model = tiny_llama()
    before = dict(model.named_parameters())
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert prepare_qat(model, "int4", "int8", 32) == len(linears) == 2 * 7 + 1  # the projections and lm_head
    assert all(isinstance(model.get_submodule(n), QATLinear) for n in linears)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_the_layer_computes_with_fake_quantized_weight_and_input():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 24, bias=True)
    layer = QATLinear(linear, "int4", "int8", 16)
    x = torch.randn(2, 5, 64)
    expected = F.linear(int8_token(x)[0], int4_weight(linear.weight, 16), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    layer.fake_quant = False
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)


def test_fake_quant_off_gives_the_plain_model_and_on_changes_it():
    model, plain = tiny_llama(), tiny_llama()
    prepare_qat(model, "mxfp4", "mxfp4", None)
    ids = torch.randint(0, 96, (2, 12))
    set_fake_quant(model, False)
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)
    set_fake_quant(model, True)
    assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-3)


def test_a_layer_the_block_does_not_divide_is_named():
    model = tiny_llama(hidden=48)  # 48 inputs: not a multiple of mxfp4's 32
    with pytest.raises(QATError, match=r"model\.layers\.0\.self_attn\.q_proj \(48 inputs\)"):
        prepare_qat(model, "mxfp4", "mxfp4", None)


def test_fake_quant_schedule_is_axolotls():
    assert [fake_quant_due(s, 2) for s in range(4)] == [False, False, True, True]
    assert fake_quant_due(0, None) and fake_quant_due(0, 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_few_steps_lower_the_loss(fmt):
    model = tiny_llama(seed=2)
    prepare_qat(model, *FORMATS[fmt])
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


COMMON = dict(adapter=None, lora_modules_to_save=[], learning_rate=1e-3, max_steps=3, train_engine="torch")
QAT = {"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 32, "fake_quant_after_n_steps": 2}


@pytest.fixture(scope="module")
def runs(sample_shards, tiny_model_dir, tmp_path_factory):
    """Run folders of the torch engine with qat (plain for 2 steps, then fake-quantized) and without."""
    src, shards = sample_shards
    root = tmp_path_factory.mktemp("qat-runs")
    train(tiny_run(src, **COMMON, qat=QAT), shards, tiny_model_dir, root / "qat")
    train(tiny_run(src, **COMMON), shards, tiny_model_dir, root / "plain")
    return root


def losses(run_dir):
    return [m["loss"] for m in metrics(run_dir)]


def test_torch_engine_trains_plain_then_fake_quantized(runs, tiny_model_dir):
    """fake_quant_after_n_steps: 2: the first two steps are a plain full fine-tune's, the third differs;
    the saved model is the plain model's tensors, trained."""
    with_qat, plain = losses(runs / "qat"), losses(runs / "plain")
    assert with_qat[:2] == plain[:2] and with_qat[2] != plain[2]
    trained, base = load_file(runs / "qat/adapter/model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert trained.keys() == base.keys() and not torch.equal(trained["lm_head.weight"], base["lm_head.weight"])


def test_fsdp_engine_shards_the_fake_quantized_layers(runs, sample_shards, tiny_model_dir, tmp_path):
    """One rank of FSDP2 (the model built on the meta device, then sharded): the torch engine's losses."""
    src, shards = sample_shards
    train(tiny_run(src, **{**COMMON, "train_engine": "fsdp"}, qat=QAT), shards, tiny_model_dir, tmp_path)
    torch.testing.assert_close(losses(tmp_path), losses(runs / "qat"), rtol=1e-4, atol=0)


def test_auto_engine_takes_the_torch_engine_for_qat(sample_shards, tiny_model_dir):
    from tunedag.train.engines import triton_blocker

    run = tiny_run(sample_shards[0], **{**COMMON, "train_engine": "auto"}, qat=QAT)
    assert "triton engine's fused kernels replace" in triton_blocker(run, tiny_model_dir, torch.device("cuda"))
