"""gradient_checkpointing: auto: the memory model against the H200's measured peaks, the choice at its
thresholds, the config values, and the decision in train_info.json."""
import dataclasses
import json
import math

import pytest
import torch

from tunedag.config import ConfigError
from tunedag.config.axolotl import translate
from tunedag.train.loop import train
from tunedag.train.memory_model import (CALIBRATION, FASTEST_FIRST, GIB, LLAMA_1B, LLAMA_8B, RESERVE_BYTES,
                                        RESERVE_SHARE, ModelShape, StepShape, auto_record, choose, predict_peak,
                                        resolve_checkpointing)
from tests.helpers import sample_rows, tiny_run, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", sample_rows(2))


@pytest.mark.parametrize("row,model,step,setting,measured", CALIBRATION, ids=[c[0] for c in CALIBRATION])
def test_prediction_reproduces_the_measured_peak(row, model, step, setting, measured):
    predicted = predict_peak(model, step, setting)["total"] / GIB
    assert predicted == pytest.approx(measured, rel=0.10)


def test_settings_order_by_memory_and_activations_grow_with_tokens():
    step = StepShape(16384, "lora")
    peaks = [predict_peak(LLAMA_8B, step, s)["total"] for s in FASTEST_FIRST]
    assert peaks[0] > peaks[1] > peaks[2]
    longer = predict_peak(LLAMA_8B, dataclasses.replace(step, tokens=32768), "on")
    assert longer["activations"] == pytest.approx(2 * predict_peak(LLAMA_8B, step, "on")["activations"], rel=0.01)
    # QLoRA's base is about a quarter of bf16's; a full fine-tune keeps 16 bytes per weight with AdamW
    assert predict_peak(LLAMA_8B, StepShape(16384, "qlora"), "on")["weights"] < 0.3 * peaks[1]
    full = predict_peak(LLAMA_1B, StepShape(16384, None), "on")
    assert full["weights"] + full["optimizer"] + full["gradients"] == pytest.approx(16 * 1.2357e9, rel=0.01)
    with_reference = predict_peak(LLAMA_1B, StepShape(16384, None, frozen_reference=True), "on")  # dpo, kto
    assert with_reference["weights"] - full["weights"] == pytest.approx(2 * 1.2357e9, rel=0.01)


def test_skipped_layers_span_checkpointing_on_to_off():
    """Keeping k last layers out of checkpointing adds k layers' activations: all layers is off, and 0 and 1 are
    on (the last layer is never checkpointed: its recompute would come at once, beside its input)."""
    step = StepShape(16384, "lora")
    peaks = [predict_peak(LLAMA_8B, step, "on", k)["total"] for k in range(LLAMA_8B.layers + 1)]
    assert peaks[0] == predict_peak(LLAMA_8B, step, "on")["total"]
    assert peaks[-1] == predict_peak(LLAMA_8B, step, "off")["total"]
    assert peaks[1] == peaks[0] and all(a < b for a, b in zip(peaks[1:], peaks[2:]))
    offloaded = predict_peak(LLAMA_8B, step, "offload", 3)["total"]
    assert predict_peak(LLAMA_8B, step, "offload")["total"] < offloaded < peaks[3]


def _threshold(predicted: int) -> int:
    """The least free memory a prediction fits in."""
    return math.ceil(predicted * (1 + RESERVE_SHARE) + RESERVE_BYTES)


def test_chooser_takes_the_fastest_setting_that_fits_at_each_threshold():
    step = StepShape(16384, "lora")
    predicted = {s: predict_peak(LLAMA_8B, step, s)["total"] for s in FASTEST_FIRST}
    off, on, offload = (_threshold(predicted[s]) for s in FASTEST_FIRST)
    assert choose(predicted, 80 * GIB) == ("off", True)  # off is ~70 GiB (measured 70.5)
    assert choose(predicted, off) == ("off", True)
    assert choose(predicted, off - 1) == ("on", True)
    assert choose(predicted, on) == ("on", True)
    assert choose(predicted, on - 1) == ("offload", True)
    assert choose(predicted, offload) == ("offload", True)
    assert choose(predicted, offload - 1) == ("offload", False)
    assert choose(predicted, on, candidates=("off", "offload")) == ("offload", True)  # activation_offloading


def test_auto_record_holds_the_figures_and_the_shortfall():
    step = StepShape(16384, "lora")
    ok = auto_record(LLAMA_8B, step, 40 * GIB)
    assert ok["setting"] == "on" and ok["free_gib"] == 40.0 and ok["tokens_per_micro_batch"] == 16384
    assert {"off", "on", "offload"} < set(ok["predicted_peak_gib"]) and "shortfall_gib" not in ok
    # between on (~22 GiB) and off (~70): the most last layers kept out of checkpointing that still fit
    skip = ok["skip_layers"]
    assert 0 < skip < LLAMA_8B.layers
    assert _threshold(predict_peak(LLAMA_8B, step, "on", skip)["total"]) <= 40 * GIB
    assert _threshold(predict_peak(LLAMA_8B, step, "on", skip + 1)["total"]) > 40 * GIB
    assert ok["predicted_peak_gib"][f"on, last {skip} layers kept"] > ok["predicted_peak_gib"]["on"]
    short = auto_record(LLAMA_8B, step, 16 * GIB)  # the bf16 8B weights alone are 15 GiB
    assert short["setting"] == "offload" and short["shortfall_gib"] > 0
    assert short["shortfall_gib"] == pytest.approx(
        (_threshold(predict_peak(LLAMA_8B, step, "offload")["total"]) - 16 * GIB) / GIB, abs=1e-3)


def test_shape_from_an_hf_config(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    shape = ModelShape.from_config(config)
    assert (shape.hidden, shape.layers, shape.vocab) == (config.hidden_size, config.num_hidden_layers,
                                                         config.vocab_size)
    assert shape.kv_dim == config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)


def test_config_takes_auto_by_default_and_every_setting(data, tmp_path):
    assert tiny_run(data).gradient_checkpointing == "auto"
    for value in (True, False, "auto", "offload"):
        assert tiny_run(data, gradient_checkpointing=value).gradient_checkpointing == value
    with pytest.raises(ConfigError, match="gradient_checkpointing: 'sometimes' is not one of"):
        tiny_run(data, gradient_checkpointing="sometimes")
    translated, _, problems = translate({"base_model": "x", "gradient_checkpointing": "offload"}, "a.yml", tmp_path)
    assert translated["gradient_checkpointing"] and translated["activation_offloading"] and not problems


@pytest.mark.parametrize("asked,engine,setting", [
    (dict(), "triton", "off"),  # auto on the CPU
    (dict(gradient_checkpointing=True), "triton", "on"),
    (dict(gradient_checkpointing=True, activation_offloading=True), "triton", "offload"),
    (dict(gradient_checkpointing="offload"), "torch", "on"),  # the torch engine checkpoints on the GPU only
    (dict(gradient_checkpointing=False), "fsdp", "off"),
])
def test_resolved_run_holds_the_decision(data, tiny_model_dir, asked, engine, setting):
    run, record = resolve_checkpointing(tiny_run(data, **asked), tiny_model_dir, CPU, engine)
    assert record["setting"] == setting
    assert (run.gradient_checkpointing, run.activation_offloading) == {
        "off": (False, False), "on": (True, False), "offload": ("offload", True)}[setting]


def test_train_info_records_the_decision_of_a_cpu_run(sample_shards, tiny_model_dir, tmp_path):
    src, shards = sample_shards
    info = train(tiny_run(src, max_steps=1), shards, tiny_model_dir, tmp_path / "run")
    written = json.loads((tmp_path / "run/train_info.json").read_text())
    assert info["gradient_checkpointing"] == written["gradient_checkpointing"] == {
        "requested": "auto", "setting": "off", "reason": "no CUDA GPU: checkpointing saves GPU memory only"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offloading", [False, True])
def test_auto_on_a_gpu_reads_free_memory_and_picks_what_fits(data, tiny_model_dir, offloading):
    """A tiny model fits any GPU without checkpointing; with activation_offloading auto picks off too."""
    cuda = torch.device("cuda")
    free_before = torch.cuda.mem_get_info(cuda)[0]
    run, record = resolve_checkpointing(tiny_run(data, activation_offloading=offloading), tiny_model_dir, cuda,
                                        "triton")
    assert record["setting"] == "off" and run.gradient_checkpointing is False
    assert record["free_gib"] == pytest.approx(free_before / GIB, rel=0.05)
    assert record["predicted_peak_gib"]["off"] > record["predicted_peak_gib"]["on"] > 0
    _, other = resolve_checkpointing(tiny_run(data), tiny_model_dir, cuda, "torch")
    assert other["setting"] == "on" and "no measured memory model" in other["reason"]


def test_skipped_layers_reach_the_run_when_it_checkpoints(data, tiny_model_dir):
    asked = tiny_run(data, gradient_checkpointing=True, gradient_checkpointing_skip_layers=3)
    run, record = resolve_checkpointing(asked, tiny_model_dir, torch.device("cpu"), "triton")
    assert run.gradient_checkpointing_skip_layers == 3 and record["skip_layers"] == 3
    run, record = resolve_checkpointing(dataclasses.replace(asked, gradient_checkpointing=False), tiny_model_dir,
                                        torch.device("cpu"), "triton")
    assert run.gradient_checkpointing_skip_layers == 0 and "skip_layers" not in record


def test_bf16_kahan_full_finetune_counts_eight_bytes_a_weight_with_8bit_moments():
    """master_weights: bf16_kahan keeps bf16 weights and gradients and a bf16 compensation beside 8-bit moments:
    8 bytes a trained weight where fp32 masters with fused AdamW take 16."""
    step = StepShape(16384, None, optimizer="adamw_torch_8bit", master_weights="bf16_kahan")
    fp32 = dataclasses.replace(step, optimizer="adamw_torch_fused", master_weights="fp32")
    params = LLAMA_1B.projection_params() + LLAMA_1B.other_params()
    per_weight = {name: sum(predict_peak(LLAMA_1B, s, "on")[k] for k in ("weights", "optimizer", "gradients"))
                  / params for name, s in (("kahan", step), ("fp32", fp32))}
    assert per_weight == {"kahan": 8, "fp32": 16}
