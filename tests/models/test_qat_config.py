"""qat and fp8 in config.yaml and in Axolotl configs: what is accepted, and each refusal naming its key."""
import pytest

from tunedag.config import ConfigError, parse_config
from tests.helpers import tiny_run

FULL = {"adapter": None, "lora_modules_to_save": []}
INT4 = {"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 32}


def test_accepted_qat_and_fp8(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("")
    run = tiny_run(src, **FULL, qat={**INT4, "fake_quant_after_n_steps": 5})
    assert (run.qat.weight_dtype, run.qat.activation_dtype, run.qat.fake_quant_after_n_steps) == ("int4", "int8", 5)
    assert tiny_run(src, **FULL, qat={"weight_dtype": "nvfp4", "activation_dtype": "nvfp4"}).qat.group_size is None
    assert tiny_run(src, **FULL, fp8=True, fp8_enable_fsdp_float8_all_gather=True, train_engine="fsdp").fp8


@pytest.mark.parametrize("over,message", [
    ({"qat": INT4, "adapter": "lora"}, r"\.qat: trains every weight: set adapter: null"),
    ({"fp8": True, "train_engine": "deepspeed"}, r"\.fp8: runs on the torch, ddp and fsdp engines"),
    ({"qat": INT4, "train_engine": "triton"}, r"\.qat: runs on the torch, ddp and fsdp engines"),
    ({"qat": INT4, "fp8": True}, r"\.fp8: beside qat"),
    ({"qat": {"weight_dtype": "int4", "activation_dtype": "mxfp4"}}, r"\.qat: weight_dtype int4 with activation_dtype "
                                                                     r"mxfp4 is not offered"),
    ({"qat": {"weight_dtype": "nvfp4", "activation_dtype": "nvfp4", "group_size": 32}},
     r"\.qat\.group_size: nvfp4 takes 16 \(or null\), got 32"),
    ({"qat": {"weight_dtype": "int4", "activation_dtype": "int8", "fake_quant_after_n_steps": -1}},
     r"fake_quant_after_n_steps: must be 0 or more"),
    ({"qat": {"activation_dtype": "int8"}}, r"\.qat: missing required key 'weight_dtype'"),
    ({"qat": {"weight_dtype": "int8"}}, r"\.qat\.weight_dtype: 'int8' is not one of 'int4', 'mxfp4', 'nvfp4'"),
    ({"fp8_enable_fsdp_float8_all_gather": True, "fp8": True}, r"applies to fp8: true on train_engine: fsdp"),
])
def test_refusals_name_the_key(tmp_path, over, message):
    src = tmp_path / "d.jsonl"
    src.write_text("")
    with pytest.raises(ConfigError, match=message):
        tiny_run(src, **{**FULL, **over})


def axolotl_run(tmp_path, body: str):
    (tmp_path / "a.yml").write_text("strict: false\nbase_model: builtin:tiny-llama\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n"
                                    + body)
    (tmp_path / "d.jsonl").write_text("")
    return parse_config({"runs": {"r": {"axolotl": "a.yml"}}}, base_dir=tmp_path).runs["r"]


def test_axolotl_qat_with_quantize_embedding_false_is_taken_and_true_refused(tmp_path):
    body = "qat:\n  weight_dtype: int4\n  activation_dtype: int8\n  group_size: 32\n  quantize_embedding: {}\n"
    assert axolotl_run(tmp_path, body.format("false")).qat.group_size == 32  # adapter unset: a full fine-tune
    with pytest.raises(ConfigError, match=r"\.qat: .*quantize_embedding: true is not offered"):
        axolotl_run(tmp_path, body.format("true"))
