"""A renderer for the subset of Go's text/template that tunedag's Ollama templates use.

Ollama renders a Modelfile's TEMPLATE with Go's text/template. The export checks each template
it writes against the model's Jinja chat template by rendering both on the same conversations,
so it needs a Go renderer in Python; this one covers what `modelfile.FAMILIES` uses and refuses
anything else (a template outside the subset is an error here, not a silent difference):

- text, ``{{ pipeline }}``, trim markers ``{{-`` / ``-}}``;
- ``{{ if p }} … {{ else if p }} … {{ else }} … {{ end }}``;
- ``{{ range .X }}``, ``{{ range $i, $m := .X }}`` (dot is the element inside), ``{{ $v := p }}``,
  ``{{ $v = p }}`` (sets the variable where it was declared, across range iterations);
- operands ``.A.B``, ``$``, ``$.A``, ``$v.A``, ``"string"``, integers, ``(p)``; functions
  eq, ne, and, or, not, len, slice, index, with Go's truthiness (empty and zero are false).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tunedag.errors import TunedagError


class GoTemplateError(TunedagError, ValueError):
    """A template outside the supported subset, or one that fails on its data."""


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|:=|,|[^\s(),]+')


@dataclass
class _Node:
    kind: str  # text, print, declare ($v := p), assign ($v = p), if, range
    text: str = ""
    expr: list[str] = field(default_factory=list)
    var: str = ""
    index_var: str = ""
    branches: list[tuple[list[str] | None, list["_Node"]]] = field(default_factory=list)
    body: list["_Node"] = field(default_factory=list)


def _pieces(source: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) in order, with trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            out.append(("text", text))
        out.append(("action", m.group(2)))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = source[pos:].lstrip() if trim_next else source[pos:]
    if tail:
        out.append(("text", tail))
    return out


def _parse(pieces: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[_Node], int, str]:
    nodes: list[_Node] = []
    while i < len(pieces):
        kind, s = pieces[i]
        i += 1
        if kind == "text":
            nodes.append(_Node("text", text=s))
            continue
        words = _TOKEN.findall(s)
        head = words[0] if words else ""
        if head in stop:
            return nodes, i, s
        if head == "if":
            node = _Node("if")
            cond: list[str] | None = words[1:]
            while True:
                body, i, ended = _parse(pieces, i, ("else", "end"))
                node.branches.append((cond, body))
                rest = _TOKEN.findall(ended)
                if rest[0] == "end":
                    break
                cond = rest[2:] if rest[1:2] == ["if"] else None
            nodes.append(node)
        elif head == "range":
            node = _Node("range")
            if ":=" in words:
                names = [w for w in words[1:words.index(":=")] if w != ","]
                node.index_var, node.var = (names if len(names) == 2 else ["", names[0]])
                node.expr = words[words.index(":=") + 1:]
            else:
                node.expr = words[1:]
            node.body, i, _ = _parse(pieces, i, ("end",))
            nodes.append(node)
        elif len(words) > 2 and words[1] in (":=", "=") and head.startswith("$"):
            nodes.append(_Node("declare" if words[1] == ":=" else "assign", var=head, expr=words[2:]))
        elif head in ("end", "else", "define", "template", "block", "with", "break", "continue"):
            raise GoTemplateError(f"{{{{ {s} }}}} is outside the Go template subset tunedag renders")
        else:
            nodes.append(_Node("print", expr=words))
    if stop:
        raise GoTemplateError("template ends inside a block: {{ end }} missing")
    return nodes, i, ""


def _truth(v: Any) -> bool:
    return bool(v) if v is not None else False


def _field(value: Any, path: str) -> Any:
    for name in [p for p in path.split(".") if p]:
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"no field {name!r} in {type(value).__name__}")
        value = value[name]
    return value


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda a, lo=0, hi=None: a[lo:hi],
    "index": lambda a, *ix: _index(a, ix),
}


def _index(a: Any, ix: tuple[Any, ...]) -> Any:
    for i in ix:
        a = a[i]
    return a


class _Scope:
    """Dot and the variables in reach: a chain of frames, innermost last (``=`` sets where ``:=`` made it)."""

    def __init__(self, dot: Any, frames: list[dict[str, Any]]):
        self.dot, self.frames = dot, frames

    def lookup(self, name: str) -> dict[str, Any]:
        for frame in reversed(self.frames):
            if name in frame:
                return frame
        raise GoTemplateError(f"undefined variable {name}")

    def operand(self, tokens: list[str], i: int) -> tuple[Any, int]:
        t = tokens[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            return self.command(tokens[i + 1:j - 1]), j
        if t.startswith('"'):
            return bytes(t[1:-1], "utf-8").decode("unicode_escape"), i + 1
        if re.fullmatch(r"-?\d+", t):
            return int(t), i + 1
        if t in ("true", "false"):
            return t == "true", i + 1
        if t.startswith("."):
            return _field(self.dot, t), i + 1
        if t.startswith("$"):
            name, _, path = t.partition(".")
            return _field(self.lookup(name)[name], path), i + 1
        raise GoTemplateError(f"unknown operand {t!r}")

    def command(self, tokens: list[str]) -> Any:
        head = tokens[0]
        if head in ("and", "or"):  # short-circuit, returning the deciding operand as Go does
            i, value = 1, None
            while i < len(tokens):
                value, i = self.operand(tokens, i)
                if _truth(value) != (head == "and"):
                    return value
            return value
        if head in _FUNCS:
            args, i = [], 1
            while i < len(tokens):
                value, i = self.operand(tokens, i)
                args.append(value)
            return _FUNCS[head](*args)
        value, i = self.operand(tokens, 0)
        if i != len(tokens):
            raise GoTemplateError(f"cannot call {head!r} (functions: and, or, {', '.join(_FUNCS)})")
        return value


def _run(nodes: list[_Node], scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "print":
            value = scope.command(node.expr)
            out.append("" if value is None else str(value))
        elif node.kind == "declare":
            scope.frames[-1][node.var] = scope.command(node.expr)
        elif node.kind == "assign":
            scope.lookup(node.var)[node.var] = scope.command(node.expr)
        elif node.kind == "if":
            for cond, body in node.branches:
                if cond is None or _truth(scope.command(cond)):
                    _run(body, scope, out)
                    break
        elif node.kind == "range":
            for i, item in enumerate(scope.command(node.expr) or []):
                frame = {node.index_var: i, node.var: item} if node.var else {}
                _run(node.body, _Scope(item, [*scope.frames, frame]), out)


def render_go_template(source: str, data: dict[str, Any]) -> str:
    """Render ``source`` with dot = ``data`` (``$`` too), as Go's text/template would."""
    nodes, _, _ = _parse(_pieces(source), 0, ())
    out: list[str] = []
    _run(nodes, _Scope(data, [{"$": data}]), out)
    return "".join(out)
