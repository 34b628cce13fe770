"""Row formats (``datasets[].type``): a raw row becomes token ids and labels.

A format turns a row into a *plan*: segments made of pieces that are token ids (BOS, EOS),
text tokenized on its own (alpaca's prompt and answer, input_output's segments), or a
rendered conversation whose trained parts are character ranges (chat formats). Plans of many
rows are then tokenized in one ``encode_batch`` call, which is where the time goes.

Labels are -100 wherever the loss must not look: prompt/user/system tokens (unless
``train_on_inputs``), role headers, and always the first token of a sample (or of each
segment of a preference pair), which nothing inside it predicts; that also keeps a packed
row's loss from reaching across a sample boundary after the shift.

| type | fields (override with ``field_*``) | what is trained |
| --- | --- | --- |
| alpaca | instruction, input, output (Axolotl's prompt; ``alpaca_style``, ``field_system``) | output + EOS |
| sharegpt | conversations: [{from, value}], system, tools | roles_to_train turns + end-of-turn |
| chat_template | messages: [{role, content}], system, tools | roles_to_train turns + end-of-turn |
| completion | text | everything; long documents split into ``sequence_len`` pieces |
| pretrain | text | everything; long documents split into overlapping windows (Axolotl's pretraining) |
| input_output | segments: [{text, label}] | segments with label true (no BOS/EOS added) |
| dpo | prompt (text or messages), chosen, rejected (text, message or messages), system | the final turn of each |
| kto | messages, or prompt and completion; label (bool); system | the final turn |
| stepwise_supervised | prompt, completions: [step], labels: [bool] | each step's label, on its last token |

Chat messages are Axolotl's: roles ``human``/``gpt`` (or ``roles``) map to user/assistant;
``message_property_mappings`` names the keys; every other key of a message (``tool_calls``,
``reasoning_content``, ``name``, …) and the row's ``tools`` go to the template as they are
(JSON-string tool arguments and parameters parsed, as Axolotl does). With a prompt, a dpo or
kto response given as messages contributes its last message (Axolotl's ``chosen[-1]``);
without one, chosen and rejected are whole conversations. ``drop_system_message`` leaves out a
conversation's opening system turn (the row's system field too). An alpaca prompt is Axolotl's
in its ``alpaca_style`` (instruct, chat, chatml, phi), with the row's ``field_system`` text in
place of its preamble.

Preference samples (dpo: chosen then rejected; kto: one completion) carry a label per
segment: 1 for chosen/desirable, 0 for rejected/undesirable.

stepwise_supervised rows train a process reward model (``rl: prm``, a token classifier), as Axolotl
and TRL's PRMTrainer tokenize them: BOS (where the tokenizer has one) + the prompt, then each step
followed by ``step_separator``, each tokenized on its own. Labels are classes, not token ids: the
step's label (0 wrong, 1 right) on its last token (the separator's last, unless the separator is
empty), -100 everywhere else; ``train_on_last_step_only`` keeps only the last step's label;
``max_completion_length`` cuts the steps' tokens after that many, and a row longer than
``sequence_len`` is cut there too, whatever ``excess_length_strategy`` says (Axolotl's strategy cuts
it before any length filter). Nothing is shifted, so the first token of a sample keeps its label.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
import tokenizers

from tunedag.config import DatasetConfig
from tunedag.data.chat import ChatRenderer
from tunedag.errors import TunedagError

IGNORE_INDEX = -100
CHAT_TYPES = ("sharegpt", "chat_template", "dpo", "kto")
PREFERENCE_TYPES = ("dpo", "kto")
STEPWISE = "stepwise_supervised"
STANDARD_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_ROLES = {"human": "user", "gpt": "assistant", **{r: r for r in STANDARD_ROLES}}
CHAT_FIELDS = {"system": "system", "tools": "tools", "role": "role", "content": "content"}
DEFAULT_FIELDS: dict[str, dict[str, str | None]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": None},
    "sharegpt": {**CHAT_FIELDS, "messages": "conversations", "role": "from", "content": "value"},
    "chat_template": {**CHAT_FIELDS, "messages": "messages"},
    "completion": {"text": "text"},
    "pretrain": {"text": "text"},
    "input_output": {"segments": "segments"},
    "dpo": {**CHAT_FIELDS, "prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
    "kto": {**CHAT_FIELDS, "messages": "messages", "prompt": "prompt", "completion": "completion",
            "label": "label"},
    STEPWISE: {"prompt": "prompt", "completions": "completions", "labels": "labels"},
}
ALPACA_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                            "completes the request.")
# Axolotl's alpaca prompt styles (type: alpaca:<style>), its strings exactly, odd spacing and all:
# (system format, turn with input, turn without input)
ALPACA_STYLES: dict[str, tuple[str, str, str]] = {
    "instruct": ("{system}\n\n", "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                 "### Instruction:\n{instruction}\n\n### Response:\n"),
    "chat": ("SYSTEM: {system}\n", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"),
    "chatml": ("<|im_start|>system\n{system}<|im_end|>\n",
               "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"),
    "phi": ("<|system|>\n{system}<|end|>\n", "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
            "<|user|>\n{instruction}<|end|>\n<|assistant|>\n"),
}


class RowFormatError(TunedagError, ValueError):
    """A row that does not fit its format: names the field; the caller adds the file and row."""


@dataclass(frozen=True)
class Sample:
    """One packable item: one segment, or several kept adjacent (a preference pair)."""

    input_ids: list[int]
    labels: list[int]
    segments: tuple[int, ...] = ()  # segment lengths when there is more than one
    segment_labels: tuple[int, ...] = ()  # preference label per segment (dpo/kto)

    def __len__(self) -> int:
        return len(self.input_ids)

    def segment_lengths(self) -> tuple[int, ...]:
        return self.segments or (len(self.input_ids),)

    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass(frozen=True)
class Prompt:
    """A held-out prompt for generation (without a leading BOS), with the answer it should produce."""

    text: str
    reference: str


# --------------------------------------------------------------------------- tokenizer

@dataclass
class TextTokenizer:
    """What formatting needs of a tokenizer; picklable and free of transformers, for workers."""

    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int
    bos_token: str | None
    eos_token: str
    special_ids: frozenset[int]
    chat_template: str | None = None
    pad_id: int | None = None

    @classmethod
    def from_hf(cls, tok: Any) -> "TextTokenizer":
        template = tok.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        return cls(tok.backend_tokenizer, tok.bos_token_id, tok.eos_token_id, tok.bos_token, tok.eos_token,
                   frozenset(tok.all_special_ids) | frozenset(tok.added_tokens_decoder), template, tok.pad_token_id)

    def encode_batch(self, texts: list[str], offsets: bool = False) -> list[tokenizers.Encoding]:
        """Encodings of ``texts`` (no special tokens added); ``offsets`` when they are needed."""
        if not offsets and hasattr(self.backend, "encode_batch_fast"):
            return self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def ids(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class Ids:
    ids: tuple[int, ...]
    trained: bool


@dataclass(frozen=True)
class Text:
    text: str
    trained: bool


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: tokens overlapping ``trained`` ranges are trained; in each
    ``eos`` range, tokens up to and including its first special token (the end-of-turn)."""

    text: str
    trained: tuple[tuple[int, int], ...]
    eos: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Step:
    """A reasoning step: its text tokenized on its own, then ``separator``; ``label`` (a class, or
    IGNORE_INDEX) on the last of those tokens."""

    text: str
    separator: tuple[int, ...]
    label: int


Piece = Union[Ids, Text, Rendered, Step]


@dataclass
class Plan:
    segments: list[list[Piece]]
    segment_labels: tuple[int, ...] = ()
    prompt: Prompt | None = None
    completion_limit: int | None = None  # stepwise: the steps' tokens kept (max_completion_length)


@dataclass(frozen=True)
class FormatSpec:
    """How one dataset's rows are formatted (built once per dataset from the config)."""

    type: str
    fields: dict[str, str | None]
    train_on_inputs: bool = False
    roles_to_train: frozenset[str] = frozenset({"assistant"})
    train_on_eos: str = "turn"
    chat: ChatRenderer | None = None
    split_len: int | None = None  # completion, pretrain: split documents into pieces of at most this many tokens
    roles: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))  # name in the data -> role
    mappings: dict[str, str] = field(default_factory=dict)  # message key for the template -> key in the data
    alpaca_style: str = "instruct"
    drop_system_message: bool = False
    step_separator: tuple[int, ...] = ()  # stepwise: the separator's token ids
    max_completion_length: int | None = None
    train_on_last_step_only: bool = False

    @classmethod
    def build(cls, type: str, overrides: dict[str, str | None], tok: TextTokenizer, chat_source: str | None,
              sequence_len: int, train_on_inputs: bool = False, roles_to_train: tuple[str, ...] = ("assistant",),
              train_on_eos: str = "turn", roles: dict[str, list[str]] | None = None,
              mappings: dict[str, str] | None = None) -> "FormatSpec":
        fields = {k: (overrides.get(k) or v) for k, v in DEFAULT_FIELDS[type].items()}
        mappings = dict(mappings or {})
        for key in ("role", "content"):  # message_property_mappings wins over message_field_*
            fields[key] = mappings.pop(key, None) or fields.get(key)
        role_map = ({**{r: r for r in STANDARD_ROLES}, **{s: t for t, sources in roles.items() for s in sources}}
                    if roles else dict(DEFAULT_ROLES))
        chat = ChatRenderer(chat_source, tok.bos_token, tok.eos_token) if type in CHAT_TYPES else None
        return cls(type, fields, train_on_inputs, frozenset(role_map.get(r, r) for r in roles_to_train), train_on_eos,
                   chat, sequence_len if type in ("completion", "pretrain") else None, role_map, mappings)

    @classmethod
    def from_dataset(cls, ds: DatasetConfig, tok: TextTokenizer, chat_source: str | None, sequence_len: int,
                     train_on_inputs: bool) -> "FormatSpec":
        by_type = {"completion": "text", "pretrain": "text", "input_output": "segments"}
        overrides = {"instruction": ds.field_instruction, "input": ds.field_input, "output": ds.field_output,
                     "system": ds.field_system, "messages": ds.field_messages, "tools": ds.field_tools,
                     "role": ds.message_field_role, "content": ds.message_field_content,
                     "prompt": ds.field_prompt or (ds.field_messages if ds.type == "dpo" else None),
                     "chosen": ds.field_chosen, "rejected": ds.field_rejected, "completion": ds.field_completion,
                     "label": ds.field_label, by_type.get(ds.type, "_"): ds.field}
        spec = cls.build(ds.type, overrides, tok, chat_source, sequence_len, train_on_inputs,
                         tuple(ds.roles_to_train), ds.train_on_eos, ds.roles, ds.message_property_mappings)
        return dataclasses.replace(spec, alpaca_style=ds.alpaca_style or "instruct",
                                   drop_system_message=ds.drop_system_message,
                                   step_separator=tuple(tok.ids(ds.step_separator)) if ds.type == STEPWISE else (),
                                   max_completion_length=ds.max_completion_length,
                                   train_on_last_step_only=ds.train_on_last_step_only)


def _value(row: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool = True,
           where: str | None = None) -> Any:
    value = row.get(key)
    name = where or key
    if value is None:
        if required:
            raise RowFormatError(_absent(row, key, name))
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {str: "a string", bool: "true or false", list: "a list", dict: "an object"}
        want = expected.get(kind, " or ".join(expected.get(k, k.__name__) for k in kind)
                            if isinstance(kind, tuple) else kind.__name__)
        raise RowFormatError(f"field {name!r} must be {want}, got {type(value).__name__}")
    return value


def _absent(row: dict[str, Any], key: str, name: str) -> str:
    """Why a required field has no value: the row lacks ``key`` ("missing"), or holds null there."""
    return f"field {name!r} is null" if key in row else f"missing field {name!r}"


def _json(value: Any, where: str) -> Any:
    """A JSON string's value (Axolotl's rows keep tool arguments, tools and messages as strings)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RowFormatError(f"field {where!r} is a string but not JSON ({err.msg} at character {err.pos})") from None


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RowFormatError(f"field {where!r} must be a list of tool calls, got {type(value).__name__}")
    calls = []
    for k, call in enumerate(value):
        if not isinstance(call, dict):
            raise RowFormatError(f"field '{where}[{k}]' must be an object, got {type(call).__name__}")
        function = call.get("function")
        if isinstance(function, dict) and "arguments" in function:
            args = _json(function["arguments"], f"{where}[{k}].function.arguments")
            call = {**call, "function": {**function, "arguments": args}}
        calls.append(call)
    return calls


def _message(message: Any, spec: FormatSpec, where: str) -> dict[str, Any]:
    """One message as the template reads it: role mapped, keys renamed, other keys kept."""
    if not isinstance(message, dict):
        raise RowFormatError(f"field {where!r} must be an object, got {type(message).__name__}")
    role_key, content_key = spec.fields["role"], spec.fields["content"]
    role = _value(message, role_key, str, where=f"{where}.{role_key}")
    if role not in spec.roles:
        raise RowFormatError(f"field '{where}.{role_key}': unknown role {role!r} "
                             f"(expected one of {', '.join(sorted(spec.roles))}; map others with roles:)")
    renamed = {role_key, content_key, *spec.mappings.values()}
    out = {k: v for k, v in message.items() if k not in renamed and v is not None}
    out.update({k: message[v] for k, v in spec.mappings.items() if message.get(v) is not None})
    if out.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(out["tool_calls"], f"{where}.tool_calls")
    content = _value(message, content_key, str, required=not out.get("tool_calls"), where=f"{where}.{content_key}")
    return {**out, "role": spec.roles[role], "content": content or ""}


def _messages(value: Any, spec: FormatSpec, name: str) -> list[dict[str, Any]]:
    value = _json(value, name)
    if not isinstance(value, list):
        raise RowFormatError(f"field {name!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RowFormatError(f"field {name!r} is an empty conversation")
    return [_message(m, spec, f"{name}[{i}]") for i, m in enumerate(value)]


def _with_system(messages: list[dict[str, Any]], row: dict[str, Any], spec: FormatSpec) -> list[dict[str, Any]]:
    """The row's system field as a first turn, unless the conversation has one (Axolotl's rule)."""
    system = _value(row, spec.fields["system"], str, required=False)
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _tools(row: dict[str, Any], spec: FormatSpec) -> list[dict[str, Any]] | None:
    name = spec.fields["tools"]
    tools = _json(row.get(name), name)
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowFormatError(f"field {name!r} must be a list of tool objects, got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        function = tool.get("function")
        if isinstance(function, dict) and "parameters" in function:
            params = _json(function["parameters"], f"{name}[{k}].function.parameters")
            tool = {**tool, "function": {**function, "parameters": params}}
        out.append(tool)
    return out


def _strip_bos(text: str, tok: TextTokenizer) -> str:
    return text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text


def alpaca_prompt(row: dict[str, Any], fields: dict[str, str | None] = DEFAULT_FIELDS["alpaca"],
                  style: str = "instruct") -> Prompt:
    """Axolotl's Alpaca prompt in one of its styles: the preamble (or the row's system text, with
    ``field_system``) in the style's system format, then the instruction and the optional input."""
    instruction = _value(row, fields["instruction"], str)
    extra = _value(row, fields["input"], str, required=False)
    system = _value(row, fields["system"], str, required=False) if fields["system"] else None
    system_format, turn, turn_no_input = ALPACA_STYLES[style]
    text = system_format.format(system=system or (ALPACA_PREAMBLE if extra else ALPACA_PREAMBLE_NO_INPUT))
    text += (turn.format(instruction=instruction, input=extra) if extra
             else turn_no_input.format(instruction=instruction))
    return Prompt(text=text, reference=_value(row, fields["output"], str))


def plan_alpaca(row: dict[str, Any], spec: FormatSpec, tok: TextTokenizer) -> Plan:
    prompt = alpaca_prompt(row, spec.fields, spec.alpaca_style)
    bos = [Ids((tok.bos_id,), False)] if tok.bos_id is not None else []
    pieces = bos + [Text(prompt.text, spec.train_on_inputs), Text(prompt.reference, True),
                    Ids((tok.eos_id,), spec.train_on_eos != "none")]
    return Plan([pieces], prompt=prompt)


def plan_completion(row: dict[str, Any], spec: FormatSpec, tok: TextTokenizer) -> Plan:
    bos = [Ids((tok.bos_id,), True)] if tok.bos_id is not None else []
    return Plan([bos + [Text(_value(row, spec.fields["text"], str), True), Ids((tok.eos_id,), True)]])


def plan_input_output(row: dict[str, Any], spec: FormatSpec, tok: TextTokenizer) -> Plan:
    name = spec.fields["segments"]
    segments = _value(row, name, list)
    if not segments:
        raise RowFormatError(f"field {name!r} is empty")
    pieces: list[Piece] = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise RowFormatError(f"field '{name}[{i}]' must be an object, got {type(seg).__name__}")
        text = _value(seg, "text", str, where=f"{name}[{i}].text")
        label = _value(seg, "label", bool, where=f"{name}[{i}].label")
        pieces.append(Text(text, label or spec.train_on_inputs))
    return Plan([pieces])


def _conversation(messages: list[dict[str, Any]], spec: FormatSpec, tools: list[dict[str, Any]] | None = None,
                  last_only: bool = False) -> Rendered:
    n = len(messages)
    if last_only:
        train = [k == n - 1 for k in range(n)]
    else:
        train = [spec.train_on_inputs or m["role"] in spec.roles_to_train for m in messages]
    last = max((k for k, t in enumerate(train) if t), default=-1)
    eos_on = {"turn": train, "all": [True] * n, "none": [False] * n,
              "last": [k == last for k in range(n)]}[spec.train_on_eos]
    text, turns = spec.chat.render_turns(messages, tools, [t or e for t, e in zip(train, eos_on)])
    trained = tuple((t.content_start, t.content_end) for t, on in zip(turns, train) if on)
    eos = tuple((t.content_end, t.end) for t, on in zip(turns, eos_on) if on)
    if spec.train_on_inputs and not last_only:
        trained = ((0, len(text)),)
    return Rendered(text, trained, eos)


def _chat_prompt(messages: list[dict[str, Any]], spec: FormatSpec, tok: TextTokenizer,
                 tools: list[dict[str, Any]] | None = None) -> Prompt | None:
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return None
    text = spec.chat.render(messages[:-1], add_generation_prompt=True, tools=tools)
    return Prompt(_strip_bos(text, tok), messages[-1]["content"])


def plan_chat(row: dict[str, Any], spec: FormatSpec, tok: TextTokenizer) -> Plan:
    name = spec.fields["messages"]
    if row.get(name) is None:
        raise RowFormatError(_absent(row, name, name))
    messages = _with_system(_messages(row[name], spec, name), row, spec)
    if spec.drop_system_message and messages[0]["role"] == "system":  # Axolotl drops the first turn only
        messages = messages[1:]
    tools = _tools(row, spec)
    return Plan([[_conversation(messages, spec, tools)]], prompt=_chat_prompt(messages, spec, tok, tools))


def _turns(row: dict[str, Any], key: str, spec: FormatSpec, role: str, reply: bool) -> list[dict[str, Any]]:
    """Text (one ``role`` message), a message, or messages; a ``reply`` keeps only the last message."""
    value = _value(row, key, (str, list, dict))
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [_message(value, spec, key)]
    messages = _messages(value, spec, key)
    return messages[-1:] if reply else messages


def _final_assistant(messages: list[dict[str, Any]], name: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise RowFormatError(f"field {name!r}: the last message must be the assistant's, "
                             f"got role {messages[-1]['role']!r}")


def _prompt(row: dict[str, Any], spec: FormatSpec) -> list[dict[str, Any]]:
    """A preference row's prompt turns (with its system field), or [] when it has no prompt."""
    if row.get(spec.fields["prompt"]) is None:
        return []
    return _with_system(_turns(row, spec.fields["prompt"], spec, "user", reply=False), row, spec)


def plan_dpo(row: dict[str, Any], spec: FormatSpec, tok: TextTokenizer) -> Plan:
    f = spec.fields
    prompt = _prompt(row, spec)
    chosen = _turns(row, f["chosen"], spec, "assistant", reply=bool(prompt))
    rejected = _turns(row, f["rejected"], spec, "assistant", reply=bool(prompt))
    for key, turns in ((f["chosen"], chosen), (f["rejected"], rejected)):
        _final_assistant(turns, key)
    if not prompt and (len(chosen) < 2 or len(rejected) < 2):
        raise RowFormatError(f"{_absent(row, f['prompt'], f['prompt'])} (needed unless {f['chosen']!r} and "
                             f"{f['rejected']!r} are whole conversations)")
    segments = [[_conversation(prompt + chosen, spec, last_only=True)],
                [_conversation(prompt + rejected, spec, last_only=True)]]
    return Plan(segments, segment_labels=(1, 0), prompt=_chat_prompt(prompt + chosen, spec, tok))


def plan_kto(row: dict[str, Any], spec: FormatSpec, tok: TextTokenizer) -> Plan:
    f = spec.fields
    if row.get(f["messages"]) is not None:
        messages = _with_system(_messages(row[f["messages"]], spec, f["messages"]), row, spec)
        name = f["messages"]
    else:
        prompt = _prompt(row, spec)
        completion = _turns(row, f["completion"], spec, "assistant", reply=bool(prompt))
        if not prompt and len(completion) < 2:
            raise RowFormatError(f"missing field {f['messages']!r} (or {f['prompt']!r} and {f['completion']!r})")
        messages, name = prompt + completion, f["completion"]
    _final_assistant(messages, name)
    label = _value(row, f["label"], bool)
    prompt_ = _chat_prompt(messages, spec, tok) if label else None
    return Plan([[_conversation(messages, spec, last_only=True)]], segment_labels=(int(label),), prompt=prompt_)


def plan_stepwise(row: dict[str, Any], spec: FormatSpec, tok: TextTokenizer) -> Plan:
    f = spec.fields
    prompt = _value(row, f["prompt"], str)
    steps, labels = _value(row, f["completions"], list), _value(row, f["labels"], list)
    if not steps:
        raise RowFormatError(f"field {f['completions']!r} is empty")
    if len(labels) != len(steps):
        raise RowFormatError(f"fields {f['completions']!r} and {f['labels']!r}: {len(steps)} steps but "
                             f"{len(labels)} labels (one per step)")
    for i, (step, label) in enumerate(zip(steps, labels)):
        if not isinstance(step, str):
            raise RowFormatError(f"field '{f['completions']}[{i}]' must be a string, got {type(step).__name__}")
        if label not in (0, 1) or not isinstance(label, (bool, int)):
            raise RowFormatError(f"field '{f['labels']}[{i}]' must be true or false (or 1 or 0), got {label!r}")
    classes = [int(label) for label in labels]
    if spec.train_on_last_step_only:
        classes = [IGNORE_INDEX] * (len(classes) - 1) + classes[-1:]
    bos = [Ids((tok.bos_id,), False)] if tok.bos_id is not None else []
    return Plan([bos + [Text(prompt, False)] + [Step(s, spec.step_separator, c) for s, c in zip(steps, classes)]],
                completion_limit=spec.max_completion_length)


PLANNERS: dict[str, Callable[[dict[str, Any], FormatSpec, TextTokenizer], Plan]] = {
    "alpaca": plan_alpaca, "sharegpt": plan_chat, "chat_template": plan_chat, "completion": plan_completion,
    "pretrain": plan_completion,
    "input_output": plan_input_output, "dpo": plan_dpo, "kto": plan_kto, STEPWISE: plan_stepwise,
}


# --------------------------------------------------------------------------- tokenizing plans

def _rendered_labels(ids: list[int], offsets: list[tuple[int, int]], piece: Rendered,
                     special: frozenset[int]) -> list[int]:
    if not ids:
        return []
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    trained = np.zeros(len(ids), bool)
    for s, e in piece.trained:
        trained |= (off[:, 0] < e) & (off[:, 1] > s)
    for s, e in piece.eos:
        inside = np.flatnonzero((off[:, 0] < e) & (off[:, 1] > s))
        ends = [k for k in inside.tolist() if ids[k] in special]
        if ends:  # up to and including the end-of-turn token; text after it stays untrained
            trained[inside[inside <= ends[0]]] = True
    return np.where(trained, np.asarray(ids), IGNORE_INDEX).tolist()


def encode_plans(plans: list[Plan], tok: TextTokenizer, spec: FormatSpec) -> list[list[Sample]]:
    """Tokenize the plans of many rows at once; each row gives one sample, or several for a
    completion document longer than ``spec.split_len``."""
    pieces = [p for plan in plans for seg in plan.segments for p in seg if not isinstance(p, Ids)]
    offsets = any(isinstance(p, Rendered) for p in pieces)
    encodings = iter(tok.encode_batch([p.text for p in pieces], offsets) if pieces else [])
    out = []
    for plan in plans:
        seg_ids, seg_labels = [], []
        for seg in plan.segments:
            ids: list[int] = []
            labels: list[int] = []
            steps_at = None  # where the first step starts
            for piece in seg:
                if isinstance(piece, Ids):
                    ids += piece.ids
                    labels += piece.ids if piece.trained else [IGNORE_INDEX] * len(piece.ids)
                    continue
                enc = next(encodings)
                piece_ids = enc.ids
                if isinstance(piece, Step):
                    steps_at = len(ids) if steps_at is None else steps_at
                    piece_ids = piece_ids + list(piece.separator)
                    labels += [IGNORE_INDEX] * (len(piece_ids) - 1) + [piece.label] if piece_ids else []
                ids += piece_ids
                if isinstance(piece, Text):
                    labels += piece_ids if piece.trained else [IGNORE_INDEX] * len(piece_ids)
                elif isinstance(piece, Rendered):
                    labels += _rendered_labels(piece_ids, enc.offsets, piece, tok.special_ids)
            if plan.completion_limit is not None and steps_at is not None:
                del ids[steps_at + plan.completion_limit:], labels[steps_at + plan.completion_limit:]
            seg_ids.append(ids)
            seg_labels.append(labels)
        if spec.type == "pretrain":
            (ids,) = seg_ids
            bos = ids[:1] if tok.bos_id is not None else []
            out.append(pretrain_windows(ids[len(bos):-1], bos, ids[-1], spec.split_len))
            continue
        if spec.split_len is not None:
            (ids,), (labels,) = seg_ids, seg_labels
            n = spec.split_len
            out.append([Sample(ids[a:a + n], [IGNORE_INDEX] + labels[a + 1:a + n]) for a in range(0, len(ids), n)])
            continue
        for labels in seg_labels:
            if labels and spec.type != STEPWISE:  # a class label is not predicted from the token before
                labels[0] = IGNORE_INDEX
        if len(seg_ids) == 1:
            out.append([Sample(seg_ids[0], seg_labels[0], (), plan.segment_labels)])
        else:
            out.append([Sample(sum(seg_ids, []), sum(seg_labels, []), tuple(len(s) for s in seg_ids),
                               plan.segment_labels)])
    return out


def pretrain_windows(content: list[int], bos: list[int], eos: int, sequence_len: int) -> list[Sample]:
    """A document as Axolotl's ``type: pretrain`` cuts it: windows of at most ``sequence_len`` tokens, each
    BOS (where the tokenizer has one) + a stretch of the document + EOS, consecutive stretches overlapping
    by min(256, (sequence_len - 1) // 2) tokens (the tokenizer's overflow ``stride`` there), every token
    trained. A document that fits is one window: BOS + document + EOS, as type: completion makes it."""
    width = max(1, sequence_len - 1 - len(bos))  # document tokens per window
    step = max(1, width - min(256, (sequence_len - 1) // 2))
    starts = [0]
    while starts[-1] + width < len(content):
        starts.append(starts[-1] + step)
    windows = [bos + content[a:a + width] + [eos] for a in starts]
    return [Sample(ids, [IGNORE_INDEX] + ids[1:]) for ids in windows]
