"""An Ollama Modelfile beside each GGUF file: FROM, TEMPLATE, stop tokens, sampling, SYSTEM.

Ollama renders TEMPLATE with Go's text/template over ``.Messages`` (``.Role``, ``.Content``); a
Modelfile's SYSTEM is put first as a system message when a conversation has none. The Go
template is not translated from the Jinja source (Jinja is far larger than what Ollama runs):
tunedag holds one hand-written Go template per chat-template family it knows, renders each and
the model's Jinja template on the same probe conversations, and writes the first family that
agrees on all of them, with the default system prompt the Jinja template adds (Qwen's) as
SYSTEM. So a written TEMPLATE renders what the model was trained on; a template of no known
family gets no TEMPLATE line (Ollama then uses the GGUF's tokenizer.chat_template if it
recognises it) and a warning naming the families.

Rendering differences Ollama cannot express are avoided, not hidden: the BOS token is left out
of both renderings (llama.cpp adds it from the GGUF's add_bos_token) and the probes use message
text without surrounding whitespace (Jinja templates that ``trim`` content; Go has no trim).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedag.data.chat import ChatRenderer, ChatTemplateError
from tunedag.errors import TunedagError
from tunedag.export.go_template import GoTemplateError, render_go_template

log = logging.getLogger(__name__)

# The generation prompt: after the last message, unless the model is continuing its own.
_LAST = "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
_OPEN = "{{ if and $last (ne .Role \"assistant\") }}"


@dataclass(frozen=True)
class Family:
    name: str
    template: str  # Go template; EOS stands for the tokenizer's eos text
    stops: tuple[str, ...]  # end-of-turn texts; EOS likewise


FAMILIES = (
    Family("llama3", "{{ range $i, $_ := .Messages }}" + _LAST
           + "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           + _OPEN + "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}{{ end }}", ("<|eot_id|>",)),
    # chatml; Qwen's is chatml plus a default system prompt, which becomes SYSTEM
    Family("chatml", "{{ range $i, $_ := .Messages }}" + _LAST
           + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
           + _OPEN + "<|im_start|>assistant\n{{ end }}{{ end }}", ("<|im_start|>", "<|im_end|>")),
    # Gemma has no system turn: a system message opens the first user turn
    Family("gemma", "{{ $prev := \"\" }}{{ range $i, $_ := .Messages }}" + _LAST
           + "{{ if eq .Role \"system\" }}<start_of_turn>user\n{{ .Content }}\n\n"
           + "{{ else }}{{ if not (and (eq $prev \"system\") (eq .Role \"user\")) }}<start_of_turn>"
           + "{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n{{ end }}"
           + "{{ .Content }}<end_of_turn>\n{{ end }}{{ $prev = .Role }}"
           + _OPEN + "<start_of_turn>model\n{{ end }}{{ end }}", ("<start_of_turn>", "<end_of_turn>")),
    Family("mistral", "{{ range .Messages }}{{ if eq .Role \"system\" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]"
           + "{{ else if eq .Role \"user\" }}[INST]{{ .Content }}[/INST]"
           + "{{ else if eq .Role \"assistant\" }}{{ .Content }}EOS{{ end }}{{ end }}", ("EOS", "[INST]")),
    Family("mistral-v1", "{{ range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
           + "{{ else if eq .Role \"assistant\" }}{{ .Content }}EOS{{ end }}{{ end }}", ("EOS", "[INST]")),
    # tunedag's built-in model: the Alpaca layout as a chat template
    Family("instruction", "{{ range .Messages }}{{ if eq .Role \"user\" }}### Instruction:\n{{ .Content }}\n\n"
           + "### Response:\n{{ else if eq .Role \"assistant\" }}{{ .Content }}EOS{{ end }}{{ end }}",
           ("EOS", "### Instruction:")),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)

PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "What is 2 + 2?"),),
    (("user", "What is 2 + 2?"), ("assistant", "4")),
    (("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "Name a colour.\nOne word.")),
    (("system", "Answer in one word."), ("user", "Sky colour?")),
    (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")),
)
_MARK = "\u2063SYSTEM\u2063"


class ModelfileError(TunedagError, ValueError):
    """A Modelfile that would not parse (a value Ollama's quoting cannot hold)."""


@dataclass(frozen=True)
class OllamaTemplate:
    family: str
    template: str  # Go template, EOS filled in
    stops: tuple[str, ...]
    system: str | None  # the Jinja template's default system prompt


def as_messages(conversation: tuple[tuple[str, str], ...] | list[dict[str, str]]) -> list[dict[str, str]]:
    return [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in conversation]


def render_ollama(t: OllamaTemplate, messages: list[dict[str, str]]) -> str:
    """What Ollama renders for ``messages`` (SYSTEM first when they have no system message)."""
    if t.system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": t.system}, *messages]
    return render_go_template(t.template, {"Messages": [{"Role": m["role"], "Content": m["content"]}
                                                       for m in messages]})


def render_jinja(jinja: ChatRenderer, messages: list[dict[str, str]]) -> str:
    """The Jinja rendering llama.cpp's and transformers' chat use, asking for the reply after a non-assistant turn."""
    return jinja.render(messages, add_generation_prompt=messages[-1]["role"] != "assistant")


def _default_system(jinja: ChatRenderer, family: Family, eos: str) -> str | None:
    """The system prompt the Jinja template adds when a conversation has none, read by rendering."""
    probe = as_messages(PROBES[0])
    with_mark = render_go_template(family.template.replace("EOS", eos), {"Messages": [
        {"Role": "system", "Content": _MARK}, *({"Role": m["role"], "Content": m["content"]} for m in probe)]})
    before, _, after = with_mark.partition(_MARK)
    text = render_jinja(jinja, probe)
    if after and text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after):
        return text[len(before):len(text) - len(after)]
    return None


def _agrees(jinja: ChatRenderer, t: OllamaTemplate) -> bool:
    compared = 0
    for probe in PROBES:
        messages = as_messages(probe)
        try:
            want = render_jinja(jinja, messages)
        except ChatTemplateError:
            continue  # e.g. a template that refuses a system message: nothing to agree with
        try:
            if render_ollama(t, messages) != want:
                return False
        except GoTemplateError:
            return False
        compared += 1
    return compared >= 2


def ollama_template(chat_template: str, eos: str) -> OllamaTemplate | None:
    """The Go template of the first family that renders as ``chat_template`` does; None if none does."""
    jinja = ChatRenderer(chat_template, bos_token="", eos_token=eos)
    for family in FAMILIES:
        template = family.template.replace("EOS", eos)
        stops = tuple(dict.fromkeys(s.replace("EOS", eos) for s in family.stops if s.replace("EOS", eos)))
        default = _default_system(jinja, family, eos)
        for system in (None, default) if default is not None else (None,):
            candidate = OllamaTemplate(family.name, template, stops, system)
            if _agrees(jinja, candidate):
                return candidate
    return None


def _quoted(key: str, value: str) -> str:
    if '"""' in value:
        raise ModelfileError(f"the Modelfile's {key} would contain '\"\"\"', which ends Ollama's quoting")
    return f'{key} """{value}"""'


def _param_text(value: str) -> str:
    if '"' in value or "\n" in value:
        raise ModelfileError(f"stop text {value!r} holds a quote or a newline, which a PARAMETER cannot")
    return f'"{value}"'


def modelfile_text(gguf_path: str, chat_template: str | None, eos: str | None,
                   sampling: dict[str, float] | None = None) -> tuple[str, dict[str, Any]]:
    """The Modelfile for the GGUF at ``gguf_path`` (relative to the Modelfile's folder, where Ollama
    resolves it) and a summary of what it holds."""
    gguf_name = Path(gguf_path).name
    lines = ["# Ollama: ollama create <name> -f <this file>, then ollama run <name>",
             f"FROM ./{gguf_path}"]
    found = ollama_template(chat_template, eos or "") if chat_template else None
    if found is None:
        why = "the model has no chat template" if not chat_template else (
            f"its chat template is not one of the families tunedag converts ({', '.join(FAMILY_NAMES)})")
        log.warning("Modelfile for %s has no TEMPLATE: %s; Ollama falls back to the GGUF's tokenizer.chat_template "
                    "if it recognises it", gguf_name, why)
        lines.append(f"# no TEMPLATE: {why}")
    else:
        lines.append(_quoted("TEMPLATE", found.template))
        lines += [f"PARAMETER stop {_param_text(s)}" for s in found.stops]
    for key, value in (sampling or {}).items():
        lines.append(f"PARAMETER {key} {value:g}")
    system = found.system if found else None
    if system is not None:
        lines.append(_quoted("SYSTEM", system))
    summary = {"family": found.family if found else None, "stops": list(found.stops) if found else [],
               "system": system, **(sampling or {})}
    return "\n".join(lines) + "\n", summary
