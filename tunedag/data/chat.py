"""Chat templates: the named ones tunedag ships, and rendering with each turn's character span.

A conversation is rendered once, whole: that text is what is tokenized. Message ``i``'s
*payload* (content, reasoning, tool calls: whatever it carries) is where that text differs from
the conversation rendered with message ``i`` reduced to its role and a placeholder content
(what is common at the end, the end-of-turn text, is never cut). An assistant payload starts
where the template's generation prompt ends, so what the model generates is trained (Qwen3's
``<think>`` block, a tool call). The text from one payload's end to the next payload's start
holds the end-of-turn token (the first special token there). This needs no template to be
prefix-stable: Qwen3 hides earlier turns' reasoning, Qwen2.5 closes consecutive tool results
together. Masking then works on these character ranges, mapped to tokens through the
tokenizer's offsets; a message whose content the template rewrites is refused, naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunedag.config.fields import CHAT_TEMPLATE_FILES
from tunedag.errors import TunedagError

TEMPLATE_DIR = Path(__file__).parent / "templates"
NAMED_TEMPLATES = tuple(CHAT_TEMPLATE_FILES)
FALLBACK = "tokenizer_default_fallback_"
PLACEHOLDER = "\x00"


class ChatTemplateError(TunedagError, ValueError):
    """A template that is missing, does not compile, or cannot be split into turns."""


def named_template(name: str) -> str:
    """The source of a template shipped with tunedag: its file in tunedag/data/templates/, after
    the variables that name sets (one file serves the names that differ in a setting)."""
    if name not in CHAT_TEMPLATE_FILES:
        raise ChatTemplateError(f"unknown chat_template {name!r}; named templates are {', '.join(NAMED_TEMPLATES)}")
    stem, settings = CHAT_TEMPLATE_FILES[name]
    head = "".join(f"{{% set {k} = {json.dumps(v)} %}}" for k, v in settings.items())
    return head + (TEMPLATE_DIR / f"{stem}.jinja").read_text().rstrip("\n")


def resolve_template(choice: str, jinja: str | None, tokenizer_template: str | None) -> str | None:
    """The template source a ``chat_template`` choice means: a named one; ``jinja`` (the
    ``chat_template_jinja`` text); the tokenizer's; or ``tokenizer_default_fallback_<name>``: the
    tokenizer's, else the named one. None when the tokenizer has none and nothing else applies
    (the caller says which dataset needs one)."""
    if choice == "jinja":
        if not jinja or "{" not in jinja:
            raise ChatTemplateError("chat_template: jinja needs chat_template_jinja to hold the template text "
                                    f"(got {jinja!r}); a file's path is not taken, as its content would escape "
                                    "the tokenize stage's config hash")
        return jinja
    if choice == "tokenizer_default":
        return tokenizer_template
    if choice.startswith(FALLBACK):
        return tokenizer_template or named_template(choice.removeprefix(FALLBACK))
    return named_template(choice)


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps (Jinja's own escapes <, > and & for HTML)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile like transformers does (sandboxed, trim_blocks, lstrip_blocks, its tojson)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: "2026-01-01"  # fixed: a date must not change the shards
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template does not compile: {err}") from err


@dataclass(frozen=True)
class Turn:
    """Character offsets of one message in the rendered text: [start, content_start) is its
    header, [content_start, content_end) its payload, [content_end, end) its end-of-turn text."""

    role: str
    start: int
    content_start: int
    content_end: int
    end: int


def _common_prefix(a: str, b: str) -> int:
    """len of the longest common prefix (binary search over slices: C-speed comparisons)."""
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; the answer is at most hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[lo:mid] == b[lo:mid] else (lo, mid - 1)
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    """len of the longest common suffix, at most ``limit``."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[len(a) - mid:len(a) - lo] == b[len(b) - mid:len(b) - lo] else (lo, mid - 1)
    return lo


class ChatRenderer:
    """Render conversations with one template; ``bos``/``eos`` fill ``bos_token``/``eos_token``."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        self.source = source
        self.template = compile_template(source)
        self.variables = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def __getstate__(self) -> dict[str, Any]:  # compiled templates do not pickle: recompile
        return {"source": self.source, "variables": self.variables}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.source, self.variables = state["source"], state["variables"]
        self.template = compile_template(self.source)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               tools: list[dict[str, Any]] | None = None) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, **self.variables)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, IndexError) as err:
            raise ChatTemplateError(f"chat template failed: {err}") from err

    def render_turns(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                     exact: list[bool] | None = None) -> tuple[str, list[Turn]]:
        """The full rendering and each message's span (see the module docstring). A turn not
        ``exact`` (untrained: only its start matters, as the end of the turn before) is found by
        its content when that is verbatim in the text, which saves two renderings."""
        full = self.render(messages, tools=tools)
        spans, done = [], 0
        for i, message in enumerate(messages):
            content = str(message.get("content") or "").strip()
            at = -1 if exact is None or exact[i] or not content else full.find(content, done)
            begin, stop = (at, at + len(content)) if at >= 0 else self._payload(full, messages, i, done, tools)
            spans.append((done, begin, stop))
            done = stop
        ends = [begin for _, begin, stop in spans[1:]] + [len(full)]
        turns = [Turn(m["role"], start, begin, stop, end if stop > begin else stop)
                 for m, (start, begin, stop), end in zip(messages, spans, ends)]
        return full, turns

    def _payload(self, full: str, messages: list[dict[str, Any]], i: int, done: int,
                 tools: list[dict[str, Any]] | None) -> tuple[int, int]:
        """[begin, stop) of message ``i``'s payload in ``full``, at or after ``done`` (where the
        previous payload ends): what changes when the message is emptied of everything but its role
        (its content a placeholder, so that templates that skip empty messages still render it)."""
        message = messages[i]
        content = str(message.get("content") or "").strip()
        bare_message = {"role": message["role"], "content": PLACEHOLDER}
        try:
            bare = self.render(messages[:i] + [bare_message] + messages[i + 1:], tools=tools)
        except ChatTemplateError:
            bare = None
        if bare == full:  # the template leaves this message out (e.g. no system slot)
            return done, done
        begin = stop = -1
        if bare is not None:
            tail = _common_suffix(full, bare, min(len(full), len(bare)))  # the end-of-turn text is never cut
            begin = _common_prefix(full[:len(full) - tail], bare[:len(bare) - tail])
            stop = len(full) - tail
            if begin < done or (content and not 0 <= full.find(content, begin) <= stop - len(content)):
                begin = -1
        if begin < 0:  # the emptied conversation is not comparable: find the content itself
            at = full.find(content, done) if content else -1
            if at < 0:
                raise ChatTemplateError(f"the chat template changes the content of message {i} "
                                        f"(role {message['role']!r}), so it cannot be located for masking")
            begin, stop = at, at + len(content)
        if message["role"] == "assistant" and i > 0:
            try:
                prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            except ChatTemplateError:
                prompt = ""
            if done <= len(prompt) <= begin and full.startswith(prompt):
                begin = len(prompt)  # what the model generates after the generation prompt is trained
        return begin, stop
