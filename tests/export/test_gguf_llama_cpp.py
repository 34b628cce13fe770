"""The exported GGUF files as llama.cpp itself runs them (through llama-cpp-python).

For every tiny model (all five architectures, BPE and SentencePiece tokenizers):
logits of llama.cpp vs transformers on the same token ids, at every position of
several prompts; llama.cpp's tokenizer vs the HF tokenizer; greedy decoding.
Loaded with an f32 KV cache (type_k=type_v=0) so the f32 files are compared
without any f16 rounding on llama.cpp's side.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp from source)",
)

from tunedag.export import gguf_arch  # noqa: E402
from tunedag.export.gguf import export_gguf  # noqa: E402

from gguf_models import TINY_SPECS  # noqa: E402

ALL = sorted(TINY_SPECS)
PROMPTS = [
    "the quick brown fox jumps over",
    "hello world, isn't it? we'll export 12345 weights",
    "café naïve 日本 ☃\n\tllama  gemma",
]
TOKENIZER_STRINGS = PROMPTS + [
    "  two leading spaces and trailing  ",
    "\n\nnewlines\r\nand\ttabs",
    "numbers 3.14 2024 1234567 and punctuation!?;:",
    "unseen: Zürich ½ ∑ 🤖",
    "",
]
# Logits of these random models have std ~2.4 and span about ±11.
# f32: both sides compute in f32 and differ only in summation order (~1e-5 seen), except
# that ggml's CPU GELU (Gemma) looks values up in an f16 table (5.7e-3 seen).
ATOL_F32 = {"gemma": 2e-2}
ATOL_F32_DEFAULT = 1e-3
# Quantised files are judged by rms(Δlogit) / std(HF logits). q8_0 rounds weights to half a
# step of max|block|/127 and llama.cpp rounds activations to q8 too; the std-0.3 models amplify
# that (HF itself run on the dequantised q8_0 weights is 0.2-0.5 away in max |Δ|).
# A wrong layout (e.g. no Q/K permutation) gives ~1 or more; uncorrelated logits give ~1.4.
# Seen: f16 <= 0.0035, bf16 <= 0.025, q8_0 0.04-0.09, q6_k 0.16, q4_k_m 0.48; limits about 2x.
REL_RMS = {"f16": 0.01, "bf16": 0.05, "q8_0": 0.15, "q6_k": 0.3, "q4_k_m": 0.75}
ARGMAX_MARGIN = 1.0  # quantised: argmax must agree wherever HF's top-1 leads top-2 by more


@lru_cache(maxsize=None)
def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


@lru_cache(maxsize=None)
def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _model_params_without_repacking():
    """llama.cpp's default model parameters, without its CPU weight repacking ("extra buffer types"):
    with it, llama-cpp-python 0.3.36 segfaults in the first eval of the tiny models' q8_0 files.
    Repacking only reorders quantised blocks for faster CPU matmuls; the file is read the same."""
    params = default_model_params()
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = False
    return params


default_model_params = llama_cpp.llama_cpp.llama_model_default_params


def load_llama_cpp(path: Path) -> "llama_cpp.Llama":
    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", _model_params_without_repacking):
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=128, n_batch=128, logits_all=True,
            type_k=0, type_v=0, n_threads=2, verbose=False,  # type 0 = GGML_TYPE_F32
        )


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(model_dir)(torch.tensor([ids])).logits[0].numpy()


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def compare(gguf_path: Path, model_dir: Path, argmax_margin: float = ARGMAX_MARGIN) -> dict[str, float]:
    """llama.cpp vs transformers over all prompts and positions.

    argmax_ok: the argmax agrees at every position where HF's top-1 leads its top-2 by more
    than `argmax_margin` (0: everywhere).
    """
    llm = load_llama_cpp(gguf_path)
    gap, rel_rms, argmax_ok = 0.0, 0.0, True
    for prompt in PROMPTS:
        ids = hf_tokenizer(model_dir)(prompt)["input_ids"]
        want, got = hf_logits(model_dir, ids), cpp_logits(llm, ids)
        assert got.shape == want.shape
        gap = max(gap, float(np.abs(got - want).max()))
        rel_rms = max(rel_rms, float(np.sqrt(((got - want) ** 2).mean()) / want.std()))
        top2 = np.sort(want, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > argmax_margin
        argmax_ok &= bool(np.all(got.argmax(-1)[clear] == want.argmax(-1)[clear]))
    llm.close()
    return {"max_abs": gap, "rel_rms": rel_rms, "argmax_ok": argmax_ok}


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", ALL)
def test_logits_match_transformers(name, outtype, tiny_model, exported, record_property):
    r = compare(exported(name, outtype), tiny_model(name), argmax_margin=0.0 if outtype == "f32" else ARGMAX_MARGIN)
    record_property("max_abs_logit_diff", r["max_abs"])
    print(f"{name} {outtype}: max |Δlogit| = {r['max_abs']:.3g}, rms(Δ)/std = {r['rel_rms']:.3g}")
    if outtype == "f32":
        assert r["max_abs"] <= ATOL_F32.get(name, ATOL_F32_DEFAULT)
    else:
        assert r["rel_rms"] <= REL_RMS[outtype]
    assert r["argmax_ok"]


def test_a_missing_permutation_would_be_caught(tiny_model, tmp_path, monkeypatch):
    """Sensitivity check: exporting Llama without the Q/K permutation must fail the comparison above."""
    spec = gguf_arch.ARCHITECTURES["llama"]
    monkeypatch.setitem(gguf_arch.ARCHITECTURES, "llama", dataclasses.replace(spec, permute_qk=False))
    wrong = export_gguf(tiny_model("llama"), tmp_path / "unpermuted.gguf", "f32").path
    r = compare(wrong, tiny_model("llama"))
    print(f"llama f32 without permutation: max |Δlogit| = {r['max_abs']:.3g}, rms(Δ)/std = {r['rel_rms']:.3g}")
    assert r["max_abs"] > 1.0 and r["rel_rms"] > 2 * REL_RMS["q8_0"]


@pytest.mark.parametrize("name", ALL)
def test_tokenizer_matches_reference(name, tiny_model, exported):
    """llama.cpp's token ids equal the HF tokenizer's (BPE) or SentencePiece's own (tokenizer.model).

    For SentencePiece the reference is the sentencepiece library: transformers' converted
    Llama tokenizer drops one '▁' before text that starts with spaces ("legacy" behaviour),
    which llama.cpp, like SentencePiece, does not. Elsewhere HF must agree too.
    """
    model_dir = tiny_model(name)
    llm = load_llama_cpp(exported(name, "f32"))
    tok = hf_tokenizer(model_dir)
    sp = None
    if (model_dir / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    for text in TOKENIZER_STRINGS:
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        hf_ids = tok(text)["input_ids"]
        if sp is None:
            assert got == hf_ids, f"{text!r}: llama.cpp {got} vs HF {hf_ids}"
            body = got[1:] if got[:1] == [tok.bos_token_id] else got
            assert llm.detokenize(body).decode("utf-8") == text  # byte-level BPE is lossless
        else:
            want = [sp.bos_id()] + sp.encode(text)
            assert got == want, f"{text!r}: llama.cpp {got} vs sentencepiece {want}"
            if not text[:1].isspace():
                assert got == hf_ids, f"{text!r}: llama.cpp {got} vs HF {hf_ids}"
    llm.close()


@pytest.mark.parametrize("name", ALL)
def test_greedy_generation_matches(name, tiny_model, exported):
    n_new = 6
    model_dir = tiny_model(name)
    llm = load_llama_cpp(exported(name, "f32"))
    for prompt in PROMPTS[:2]:
        ids = hf_tokenizer(model_dir)(prompt)["input_ids"]
        want = list(ids)
        for _ in range(n_new):
            want.append(int(hf_logits(model_dir, want)[-1].argmax()))
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):  # llama.cpp's greedy sampler
            got.append(token)
            if len(got) == n_new:
                break
        assert got == want[len(ids):], prompt
    llm.close()


@pytest.mark.parametrize("outtype,qtype", [("q4_k_m", "Q4_K"), ("q6_k", "Q6_K")])
def test_kquant_file_runs_in_llama_cpp(outtype, qtype, tiny_model, tmp_path):
    out = export_gguf(tiny_model("llama_wide"), tmp_path / f"m-{outtype}.gguf", outtype).path
    assert qtype in {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}  # real k-quant blocks
    r = compare(out, tiny_model("llama_wide"))
    print(f"llama_wide {outtype}: max |Δlogit| = {r['max_abs']:.3g}, rms(Δ)/std = {r['rel_rms']:.3g}")
    assert r["rel_rms"] <= REL_RMS[outtype]
