"""Chat templates: the named ones tunedag ships, and rendering with each turn's character span.

A conversation is rendered once per turn prefix (``messages[:1]``, ``messages[:2]``, …); every
rendering must extend the previous one, so turn ``i`` owns the text between them. Inside that
span the turn's content is found verbatim (after the template's own ``trim``): what precedes
it is the role header, what follows is the end-of-turn text. Masking then works on character
ranges, mapped to tokens through the tokenizer's offsets, so it is exact for any template that
renders turns in order, whatever its markup. A template that rewrites earlier turns when a
later one is added (not prefix-stable) is refused with the turn it broke at.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunedag.errors import TunedagError

TEMPLATE_DIR = Path(__file__).parent / "templates"
NAMED_TEMPLATES = ("llama3", "chatml", "mistral", "gemma", "qwen")


class ChatTemplateError(TunedagError, ValueError):
    """A template that is missing, does not compile, or cannot be split into turns."""


def named_template(name: str) -> str:
    """The source of a template shipped with tunedag (tunedag/data/templates/{name}.jinja)."""
    if name not in NAMED_TEMPLATES:
        raise ChatTemplateError(f"unknown chat_template {name!r}; named templates are {', '.join(NAMED_TEMPLATES)}")
    return (TEMPLATE_DIR / f"{name}.jinja").read_text().rstrip("\n")


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile like transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: "2026-01-01"  # fixed: a date must not change the shards
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template does not compile: {err}") from err


@dataclass(frozen=True)
class Turn:
    """Character offsets of one message in the rendered text: [start, content_start) is its
    header, [content_start, content_end) its content, [content_end, end) its end-of-turn text."""

    role: str
    start: int
    content_start: int
    content_end: int
    end: int


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

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat template failed: {err}") from err

    def render_turns(self, messages: list[dict[str, Any]]) -> tuple[str, list[Turn]]:
        """The full rendering and each message's span (see the module docstring)."""
        turns, prev = [], ""
        for i, message in enumerate(messages):
            text = self.render(messages[: i + 1])
            if not text.startswith(prev):
                raise ChatTemplateError(f"the chat template renders messages[:{i}] differently once message {i} "
                                        "is added (not prefix-stable), so turns cannot be masked")
            content = message["content"].strip()
            at = text.find(content, len(prev)) if content else len(text)
            if at < 0:
                if text == prev:  # the template leaves this message out (e.g. no system slot)
                    at = len(text)
                    content = ""
                else:
                    raise ChatTemplateError(f"the chat template changes the content of message {i} "
                                            f"(role {message['role']!r}), so it cannot be located for masking")
            turns.append(Turn(message["role"], len(prev), at, at + len(content), len(text)))
            prev = text
        return prev, turns
