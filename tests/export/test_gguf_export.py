"""GGUF export checks that need no llama.cpp: metadata, layout, exact weights, errors, atomicity.

The files are read back with `gguf.GGUFReader`; llama.cpp's own verdict is in
test_gguf_llama_cpp.py.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

import tunedag.export.gguf as gguf_export
from tunedag.export.gguf import GGUFExportError, export_gguf
from tunedag.export.gguf_arch import ARCHITECTURES, SUPPORTED_ARCHITECTURES
from tunedag.export.gguf_tensors import permute_rope_rows, unpermute_rope_rows

from gguf_models import CHAT_TEMPLATE, TINY_SPECS

QT = gguf.GGMLQuantizationType
ALL = sorted(TINY_SPECS)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def hf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).to(torch.float32).numpy()
    return out


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("name", ALL)
def test_metadata_matches_config_and_tokenizer(name, tiny_model, exported):
    model_dir = tiny_model(name)
    config = json.loads((model_dir / "config.json").read_text())
    r = gguf.GGUFReader(exported(name, "f32"))
    arch = gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config["model_type"]].gguf_arch]
    assert field(r, "general.architecture") == arch
    assert field(r, f"{arch}.block_count") == config["num_hidden_layers"]
    assert field(r, f"{arch}.embedding_length") == config["hidden_size"]
    assert field(r, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert field(r, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert field(r, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(r, f"{arch}.attention.key_length") == config["head_dim"]
    assert field(r, f"{arch}.rope.freq_base") == config["rope_parameters"]["rope_theta"]
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32

    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]  # ids and embedding rows stay aligned
    assert field(r, "tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert field(r, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE
    kind = TINY_SPECS[name].tokenizer
    if kind == "sentencepiece":
        assert field(r, "tokenizer.ggml.model") == "llama"
        assert len(field(r, "tokenizer.ggml.scores")) == len(tokens)
        assert field(r, "tokenizer.ggml.add_space_prefix") == (name != "gemma")
        assert field(r, "tokenizer.ggml.add_bos_token") is True
    else:
        assert field(r, "tokenizer.ggml.model") == "gpt2"
        assert field(r, "tokenizer.ggml.pre") == {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2"}[kind]
        merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
        assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
        assert field(r, "tokenizer.ggml.add_bos_token") is (kind != "qwen2")
    if TINY_SPECS[name].vocab_pad:
        assert tokens[-1] == f"[PAD{len(tokens) - 1}]"


@pytest.mark.parametrize("name", ALL)
def test_f32_weights_are_hf_weights_exactly(name, tiny_model, exported):
    """Every HF tensor is in the file; undoing the Q/K permutation (and Gemma's +1) gives it back bit for bit."""
    model_dir = tiny_model(name)
    config = json.loads((model_dir / "config.json").read_text())
    spec = ARCHITECTURES[config["model_type"]]
    r = gguf.GGUFReader(exported(name, "f32"))
    got = {t.name: np.array(t.data) for t in r.tensors}
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, config["num_hidden_layers"])
    expected_names = set()
    for hf_name, w in hf_tensors(model_dir).items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        g = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        expected_names.add(g)
        a = got[g]
        assert a.dtype == np.float32 and a.shape == w.shape, g
        role = g.split(".")[-2]
        if spec.permute_qk and role in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if role == "attn_q" else config["num_key_value_heads"]
            assert not np.array_equal(a, w), f"{g} should be permuted"
            a = unpermute_rope_rows(a, heads)
        if hf_name.endswith("norm.weight") and spec.norm_shift:
            a = a - np.float32(spec.norm_shift)
            np.testing.assert_allclose(a, w, atol=1e-6, err_msg=g)  # (w + 1) - 1 rounds in f32
        else:
            np.testing.assert_array_equal(a, w, err_msg=g)
    if TINY_SPECS[name].config.get("rope_scaling"):
        expected_names.add("rope_freqs.weight")
    assert set(got) == expected_names
    assert ("output.weight" in got) == (not config.get("tie_word_embeddings"))


def test_permutation_round_trips_and_pairs_halves():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)  # 4 heads of head_dim 16
    p = permute_rope_rows(w, 4)
    np.testing.assert_array_equal(unpermute_rope_rows(p, 4), w)
    # GGML's pair (2j, 2j+1) of head h is HF's (j, j + 8) of that head.
    h, j = 2, 5
    np.testing.assert_array_equal(p[h * 16 + 2 * j], w[h * 16 + j])
    np.testing.assert_array_equal(p[h * 16 + 2 * j + 1], w[h * 16 + j + 8])


def test_llama3_rope_freqs_match_transformers(tiny_model, exported):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(tiny_model("llama3"))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = config.rope_parameters["rope_theta"]
    plain = 1.0 / (base ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    r = gguf.GGUFReader(exported("llama3", "f32"))
    (freqs,) = [np.array(t.data) for t in r.tensors if t.name == "rope_freqs.weight"]
    np.testing.assert_allclose(freqs, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert freqs.min() == 1.0 and freqs.max() == 8.0  # both ends of the ramp are exercised
    assert "llama.rope.scaling.type" not in r.fields  # the factors alone: no double scaling


@pytest.mark.parametrize("outtype,qtype,file_type", [
    ("f16", QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    ("bf16", QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    ("q8_0", QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
])
def test_outtypes_store_matrices_quantised_and_vectors_f32(outtype, qtype, file_type, exported):
    r = gguf.GGUFReader(exported("qwen2", outtype))
    ref = {t.name: np.array(t.data) for t in gguf.GGUFReader(exported("qwen2", "f32")).tensors}
    assert field(r, "general.file_type") == file_type
    for t in r.tensors:
        want = qtype if len(t.shape) == 2 else QT.F32  # norms and biases stay f32
        assert t.tensor_type == want, t.name
        back = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(ref[t.name].shape)
        want_ref = ref[t.name]
        if t.tensor_type == QT.Q8_0:  # per 32-block: half a step d = max|x|/127, plus d's own f16 rounding
            step = np.abs(want_ref).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            bound = np.broadcast_to((0.5 + 127 * 2**-11) * step, (step.shape[0], 32)).reshape(want_ref.shape)
        else:  # round-to-nearest: f16 keeps 11 significant bits, bf16 8
            bound = {QT.F32: 0.0, QT.F16: 2**-11, QT.BF16: 2**-8}[t.tensor_type] * np.abs(want_ref)
        bound = bound + 1e-7
        assert np.all(np.abs(back - ref[t.name]) <= bound), t.name


def test_sharded_weights_are_read_through_the_index(tiny_model, exported):
    model_dir = tiny_model("llama3")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    r = gguf.GGUFReader(exported("llama3", "f32"))
    assert len(r.tensors) == 1 + 1 + 1 + 2 * 9  # rope_freqs, token_embd, output_norm, 9 per layer


def test_output_file_has_ordinary_permissions(exported):
    mode = stat.S_IMODE(os.stat(exported("llama", "f32")).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


# ---------------------------------------------------------------- bad input


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_model(name), tmp_path / name))
    return copy


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_unsupported_architecture_names_it_and_the_supported_list(model_copy, tmp_path):
    d = model_copy("llama")
    edit_json(d / "config.json", model_type="phi", architectures=["PhiForCausalLM"])
    with pytest.raises(GGUFExportError) as e:
        export_gguf(d, tmp_path / "out" / "m.gguf", "f16")
    assert "'phi'" in str(e.value) and "PhiForCausalLM" in str(e.value)
    assert all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)
    assert not (tmp_path / "out" / "m.gguf").exists()


@pytest.mark.parametrize("name,remove,named", [
    ("llama", ["tokenizer.json"], "tokenizer.json"),
    ("mistral", ["tokenizer.model"], "tokenizer.model"),  # tokenizer.json alone is SentencePiece-style
    ("mistral", ["tokenizer.model", "tokenizer.json"], "tokenizer.model"),
    ("llama", ["config.json"], "config.json"),
])
def test_missing_file_is_named(name, remove, named, model_copy, tmp_path):
    d = model_copy(name)
    for f in remove:
        (d / f).unlink()
    with pytest.raises(GGUFExportError, match=named.replace(".", r"\.")):
        export_gguf(d, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists() and not no_leftovers(tmp_path)


def test_missing_shard_is_named(model_copy, tmp_path):
    d = model_copy("llama3")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(GGUFExportError, match=victim.name):
        export_gguf(d, tmp_path / "m.gguf", "f32")


def test_unknown_pre_tokenizer_is_refused(model_copy, tmp_path):
    d = model_copy("llama")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(GGUFExportError, match="pre_tokenizer.*Whitespace.*supported"):
        export_gguf(d, tmp_path / "m.gguf", "f32")


def test_unsupported_outtype_lists_choices(tiny_model, tmp_path):
    with pytest.raises(GGUFExportError, match="q9_0.*f32, f16, bf16, q8_0, q4_0, .*q4_k_m.*iq4_xs"):
        export_gguf(tiny_model("llama"), tmp_path / "m.gguf", "q9_0")


def test_quantizer_type_without_llama_cpp_python_names_the_package(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` meets when it is not installed
    with pytest.raises(GGUFExportError, match="'q4_k_m' needs the llama-cpp-python package.*f32, f16, bf16, q8_0"):
        export_gguf(tiny_model("llama"), tmp_path / "m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("preexisting", [False, True])
def test_failure_midway_leaves_no_partial_file(preexisting, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    if preexisting:
        out.write_bytes(b"previous export")
    real_encode, calls = gguf_export.encode, []

    def failing_encode(plan):
        calls.append(plan.gguf_name)
        if len(calls) == 4:
            raise KeyboardInterrupt  # also what an interrupted (Ctrl-C / SIGINT) export looks like
        return real_encode(plan)
    monkeypatch.setattr(gguf_export, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_model("llama"), out, "q8_0")
    assert len(calls) == 4
    assert no_leftovers(tmp_path) == []
    if preexisting:
        assert out.read_bytes() == b"previous export"
    else:
        assert not out.exists()


def test_weights_are_read_lazily_one_tensor_at_a_time(tiny_model, tmp_path, monkeypatch):
    """Planning reads headers only; writing reads each tensor once, right before it is written."""
    import tunedag.export.gguf_tensors as tensors

    events: list[str] = []
    real_safe_open = tensors.safe_open

    class CountingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return self.f.get_slice(name)

        def get_tensor(self, name):
            events.append(f"read {name}")
            return self.f.get_tensor(name)

    real_write = gguf.GGUFWriter.write_tensor_data

    def counting_write(self, tensor, *args, **kwargs):
        events.append("write")
        return real_write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(tensors, "safe_open", CountingSafeOpen)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", counting_write)
    model_dir = tiny_model("llama")
    plans = tensors.plan_tensors(model_dir, ARCHITECTURES["llama"], gguf_export.read_hparams(
        gguf_export.read_config(model_dir), ARCHITECTURES["llama"]), "q8_0")
    assert events == [] and len(plans) == len(hf_tensors(model_dir))
    export_gguf(model_dir, tmp_path / "m.gguf", "q8_0")
    assert len(events) == 2 * len(plans)  # each tensor read once, then written before the next read
    assert all(a.startswith("read ") and b == "write" for a, b in zip(events[::2], events[1::2]))
