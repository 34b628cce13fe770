"""llama.cpp's quantizer through llama-cpp-python, the files' perplexity, Ollama Modelfiles, one chat
template through every export, and the config check that refuses an export before any job."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tunedag.config import ConfigError, parse_config
from tunedag.data.chat import ChatRenderer, named_template
from tunedag.export.gguf import export_gguf
from tunedag.export.go_template import GoTemplateError, render_go_template
from tunedag.export.modelfile import PROBES, as_messages, modelfile_text, ollama_template, render_jinja
from tunedag.export.preflight import check_exports, export_problems
from tunedag.export.vllm import export_vllm
from tunedag.model_facts import GGUF_WRITER_TYPES

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'tunedag[export]')")

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, we'll export 12345 weights",
         "model file token llama gemma qwen mistral weights layer norm rope cache"]


def samples_of(model_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out samples as the val shards hold them: ids, and labels -100 on the first (prompt) tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for text in TEXTS:
        ids = np.array(tok(text)["input_ids"], dtype=np.int32)
        labels = ids.copy()
        labels[:3] = -100
        out.append((ids, labels))
    return out


def hf_perplexity(model_dir: Path, samples) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in samples:
            logits = model(torch.tensor(ids[None].astype(np.int64))).logits[0, :-1]
            target = torch.tensor(labels[1:].astype(np.int64))
            total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return math.exp(total / count)


# ---------------------------------------------------------------- quantizer and perplexity

@pytest.mark.parametrize("outtype,qtype", [("q4_k_m", "Q4_K"), ("q4_0", "Q4_0")])
def test_quantized_file_and_its_perplexity_beside_the_reference(outtype, qtype, tiny_model, tmp_path):
    model_dir = tiny_model("llama_wide")
    samples = samples_of(model_dir)
    result = export_gguf(model_dir, tmp_path / f"m-{outtype}.gguf", outtype, samples=samples)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m-{outtype}.gguf"]  # the f16 stepping stone is gone
    assert qtype in {t.tensor_type.name for t in gguf.GGUFReader(result.path).tensors}
    metrics = result.metrics()
    ref, quant = metrics["reference"], metrics["perplexity"]
    assert ref["type"] == "f16" and ref["samples"] == quant["samples"] == 3 and ref["tokens"] == quant["tokens"]
    # the f16 file scores what transformers scores (f16 weights: ~0.1% seen); 4 bits moves it more
    want = hf_perplexity(model_dir, samples)
    print(f"{outtype}: HF {want:.1f}, f16 GGUF {ref['perplexity']:.1f}, {outtype} {quant['perplexity']:.1f}")
    assert abs(ref["perplexity"] / want - 1) < 0.02
    assert quant["perplexity"] != ref["perplexity"] and abs(math.log(quant["perplexity"] / ref["perplexity"])) < 0.5


def test_sixteen_bit_file_is_its_own_reference(tiny_model, tmp_path):
    result = export_gguf(tiny_model("llama"), tmp_path / "m.gguf", "f16", samples=samples_of(tiny_model("llama")))
    assert result.reference is None and result.perplexity["tokens"] > 0


# ---------------------------------------------------------------- Go templates and Modelfiles

def test_go_renderer_on_a_template_written_out_by_hand():
    t = ollama_template(named_template("llama3"), "</s>")
    messages = as_messages(PROBES[2])
    assert render_go_template(t.template, {"Messages": [{"Role": m["role"], "Content": m["content"]}
                                                        for m in messages]}) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a colour.\nOne word.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(GoTemplateError, match="outside the Go template subset"):
        render_go_template("{{ with .X }}{{ end }}", {"X": 1})


@pytest.mark.parametrize("name,family,system", [("llama3", "llama3", None), ("chatml", "chatml", None),
                                                ("qwen", "chatml", "You are a helpful assistant."),
                                                ("gemma", "gemma", None), ("mistral", "mistral", None)])
def test_each_known_family_renders_as_its_jinja_template(name, family, system):
    t = ollama_template(named_template(name), "</s>")
    assert (t.family, t.system) == (family, system)


def test_unknown_template_gets_no_template_line(caplog):
    text, summary = modelfile_text("m.gguf", "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}", "</s>")
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and summary["family"] is None
    assert "no TEMPLATE" in caplog.text


def test_modelfile_content():
    text, _ = modelfile_text("demo-q4_k_m.gguf", named_template("qwen"), "<|endoftext|>",
                             {"temperature": 0.7, "top_p": 0.9})
    lines = text.splitlines()
    assert lines[1] == "FROM ./demo-q4_k_m.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0.7" in lines
    assert "PARAMETER top_p 0.9" in lines and lines[-1] == 'SYSTEM """You are a helpful assistant."""'
    assert text.count('TEMPLATE """') == 1


# ---------------------------------------------------------------- one chat template through every export

def _modelfile_render(text: str, messages: list[dict[str, str]]) -> str:
    """Render as Ollama does from the Modelfile's own TEMPLATE and SYSTEM."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    return render_go_template(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


@pytest.mark.parametrize("name", ["qwen", "llama3", "gemma"])
def test_gguf_vllm_and_modelfile_render_the_same_conversation(name, tiny_model, tmp_path):
    model_dir, template = tiny_model("llama"), named_template(name)
    out = export_gguf(model_dir, tmp_path / "m-f16.gguf", "f16", chat_template=template).path
    field = gguf.GGUFReader(out).fields["tokenizer.chat_template"]
    from_gguf = bytes(field.parts[field.data[0]]).decode("utf-8")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    save_file({"x": torch.zeros(1)}, adapter / "adapter_model.safetensors")
    export_vllm(model_dir, adapter, tmp_path / "vllm", chat_template=template)
    from transformers import AutoTokenizer

    vllm_tok = AutoTokenizer.from_pretrained(tmp_path / "vllm/model")  # what vLLM loads
    modelfile, _ = modelfile_text(out.name, from_gguf, "</s>")
    for probe in PROBES:
        messages = as_messages(probe)
        if name == "gemma" and messages[0]["role"] == "system":
            continue  # the GGUF's and vLLM's jinja render it too; kept to the common turns
        want = render_jinja(ChatRenderer(template, "", "</s>"), messages)
        assert render_jinja(ChatRenderer(from_gguf, "", "</s>"), messages) == want
        gen = messages[-1]["role"] != "assistant"
        got = vllm_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert got.removeprefix(vllm_tok.bos_token or "") == want
        assert _modelfile_render(modelfile, messages) == want


# ---------------------------------------------------------------- the check before any job

def _run(gguf_types: list[str], model: str = "builtin:tiny-llama", rl: str | None = None):
    raw = {"runs": {"r": {"base_model": model, "datasets": [{"path": "d.jsonl"}], "gguf_types": gguf_types,
                          **({"rl": rl, "datasets": [{"path": "d.jsonl", "type": "dpo"}]} if rl else {})}}}
    return raw


def test_export_check_names_what_fails_and_the_alternatives(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    run = parse_config(_run(["f16", "q4_k_m"]), base_dir=tmp_path).runs["r"]
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    problems = export_problems(run, gpt2, "runs.r", "m/config.json", quantizer=False)
    assert len(problems) == 2
    assert "q4_k_m are made by llama.cpp's quantizer" in problems[0] and "llama-cpp-python" in problems[0]
    assert ", ".join(GGUF_WRITER_TYPES) in problems[0]
    assert "'gpt2' (GPT2LMHeadModel)" in problems[1] and "gguf_types: []" in problems[1] and "llama" in problems[1]
    assert export_problems(run, {"model_type": "llama"}, "runs.r", "m", quantizer=True) == []
    assert export_problems(run, None, "runs.r", "m", quantizer=True) == []  # a hub model not downloaded yet
    with pytest.raises(ConfigError, match="2 problems"):
        check_exports(run, gpt2, "runs.r", "m/config.json", quantizer=False)
    none = parse_config(_run([]), base_dir=tmp_path).runs["r"]
    assert export_problems(none, gpt2, "runs.r", "m", quantizer=False) == []


def test_the_check_needs_no_torch():
    code = "import sys, tunedag.export.preflight; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO).returncode == 0


def test_snakemake_refuses_a_gguf_export_of_an_unsupported_model_before_any_job(tmp_path):
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""\
        runs:
          r:
            base_model: ./base
            datasets: [{path: d.jsonl}]
            gguf_types: [f16]
        """))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--cores", "1", "-n"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("tunedag: config error:") and "'gpt2'" in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
