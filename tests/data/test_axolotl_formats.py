"""Axolotl's dataset entries (types, field keys, roles, tools, reasoning) and chat template names:
each shape's exact trained and masked tokens, with a word-level tokenizer built here (no hub)."""
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tunedag.config import ConfigError, DatasetConfig
from tunedag.config.fields import AXOLOTL_TYPES, CHAT_TEMPLATE_FILES
from tunedag.data import chat, formats
from tunedag.data.formats import PLANNERS, FormatSpec, RowFormatError, TextTokenizer, encode_plans
from tests.data.test_tokenize import _prepare
from tests.data.wordtok import save_word_tokenizer
from tests.helpers import tiny_run, tokenize_with_model, write_jsonl

M = -100
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<start_of_turn>", "<end_of_turn>"]
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]  # as Qwen's
WORDS = ("[UNK] ### Instruction Input Response : user assistant system tool model hi hello bye ok be nice good bad "
         "x y z a b c get weather city Paris sunny think hmm { } {\" \": \", \" \"}} , name arguments parameters "
         "[INST] [/INST]").split()
HF = None


def hf_tokenizer() -> PreTrainedTokenizerFast:
    global HF
    if HF is None:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + ADDED + WORDS)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.add_special_tokens(SPECIAL)
        tok.add_tokens(ADDED)
        HF = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="[UNK]")
    return HF


def encode(ds: dict, row: dict, template: str | None = "chatml", train_on_inputs: bool = False):
    """(sample, plan) of ``row`` under the dataset entry ``ds`` (the config keys, normalized)."""
    tok = TextTokenizer.from_hf(hf_tokenizer())
    config = DatasetConfig(path="unused", **ds)
    source = chat.named_template(config.chat_template or template) if template or config.chat_template else None
    spec = FormatSpec.from_dataset(config, tok, source, 512, train_on_inputs)
    plan = PLANNERS[spec.type](row, spec, tok)
    (sample,), = encode_plans([plan], tok, spec)
    return sample, plan


def words(ids: list[int]) -> str:
    return " ".join(hf_tokenizer().convert_ids_to_tokens(ids))


def trained(sample, segment: int | None = None) -> str:
    """The trained tokens (of one segment of a pair), as words."""
    at = sum(sample.segment_lengths()[:segment]) if segment else 0
    n = sample.segment_lengths()[segment] if segment is not None else len(sample)
    return words([t for t in sample.labels[at:at + n] if t != M])


# --------------------------------------------------------------------------- alpaca

def test_alpaca_prompt_is_axolotls_with_and_without_input():
    with_input, plan = encode({"type": "alpaca"}, {"instruction": "hi", "input": "x y", "output": "ok"})
    assert plan.prompt.text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nhi\n\n### Input:\nx y\n\n### Response:\n")
    assert trained(with_input) == "ok </s>" and with_input.input_ids[0] == hf_tokenizer().bos_token_id
    _, plan = encode({"type": "alpaca"}, {"instruction": "hi", "input": "", "output": "ok", "system": "be nice"})
    assert plan.prompt.text == ("Below is an instruction that describes a task. Write a response that appropriately "
                                "completes the request.\n\n### Instruction:\nhi\n\n### Response:\n")
    _, plan = encode({"type": "alpaca", "field_system": "system"}, {"instruction": "hi", "output": "ok",
                                                                   "system": "be nice"})
    assert plan.prompt.text == "be nice\n\n### Instruction:\nhi\n\n### Response:\n"


ALPACA_ROWS = ({"instruction": "hi", "input": "x y", "output": "ok"}, {"instruction": "hi", "output": "ok"})


@pytest.mark.parametrize("style, with_input, without_input", [
    ("instruct", "### Instruction:\nhi\n\n### Input:\nx y\n\n### Response:\n",
     "### Instruction:\nhi\n\n### Response:\n"),
    ("chat", "USER: hi\nx y\nASSISTANT:", "USER: hi\nASSISTANT:"),
    ("chatml", "<|im_start|>user\nhi\nx y<|im_end|>\n<|im_start|>assistant\n",
     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ("phi", "<|user|>\nhi<|end|>x y<|assistant|>", "<|user|>\nhi<|end|>\n<|assistant|>\n"),
])
def test_alpaca_styles_are_axolotls_prompts_with_the_answer_and_eos_trained(style, with_input, without_input):
    system = {"instruct": "{}\n\n", "chat": "SYSTEM: {}\n", "chatml": "<|im_start|>system\n{}<|im_end|>\n",
              "phi": "<|system|>\n{}<|end|>\n"}[style]
    assert DatasetConfig(path="unused", type=f"alpaca:{style}").alpaca_style == style
    for row, turn, preamble in zip(ALPACA_ROWS, (with_input, without_input),
                                   (formats.ALPACA_PREAMBLE, formats.ALPACA_PREAMBLE_NO_INPUT)):
        s, plan = encode({"type": f"alpaca:{style}"}, row)
        assert plan.prompt.text == system.format(preamble) + turn
        prompt_ids = [hf_tokenizer().bos_token_id] + hf_tokenizer()(plan.prompt.text, add_special_tokens=False)[
            "input_ids"]
        assert s.input_ids == prompt_ids + hf_tokenizer()("ok", add_special_tokens=False)["input_ids"] + [2]
        assert s.labels == [M] * len(prompt_ids) + s.input_ids[len(prompt_ids):]
        assert trained(s) == "ok </s>"
    _, plan = encode({"type": f"alpaca:{style}", "field_system": "system"}, {**ALPACA_ROWS[1], "system": "be nice"})
    assert plan.prompt.text == system.format("be nice") + without_input


def test_alpaca_style_is_for_alpaca_rows_only(tmp_path):
    with pytest.raises(ConfigError, match=r"alpaca_style: applies to type: alpaca, not type: completion"):
        tiny_run(tmp_path, datasets=[{"path": str(write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])),
                                      "type": "completion", "alpaca_style": "phi"}])


# --------------------------------------------------------------------------- chat_template

SHAREGPT = {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                              {"from": "gpt", "value": "ok"}]}
SHAREGPT_KEYS = {"type": "chat_template", "field_messages": "conversations",
                 "message_property_mappings": {"role": "from", "content": "value"}}


@pytest.mark.parametrize("train_on_eos, expected", [
    ("turn", "hello <|im_end|> ok <|im_end|>"), ("none", "hello ok"), ("last", "hello ok <|im_end|>"),
    ("all", "<|im_end|> <|im_end|> hello <|im_end|> <|im_end|> ok <|im_end|>"),
])
def test_chat_template_with_sharegpt_keys_trains_the_assistant_turns(train_on_eos, expected):
    s, plan = encode({**SHAREGPT_KEYS, "train_on_eos": train_on_eos}, SHAREGPT)
    assert words(s.input_ids) == ("<|im_start|> system be nice <|im_end|> <|im_start|> user hi <|im_end|> "
                                  "<|im_start|> assistant hello <|im_end|> <|im_start|> user bye <|im_end|> "
                                  "<|im_start|> assistant ok <|im_end|>")
    assert trained(s) == expected
    assert plan.prompt.reference == "ok" and plan.prompt.text.endswith("<|im_start|>assistant\n")


def test_roles_mapping_and_roles_to_train_by_the_datas_names():
    row = {"messages": [{"role": "asker", "content": "hi"}, {"role": "answerer", "content": "ok"}]}
    ds = {"type": "chat_template", "roles": {"user": ["asker"], "assistant": ["answerer"]},
          "roles_to_train": ["asker", "answerer"]}
    s, _ = encode(ds, row)
    assert words(s.input_ids) == "<|im_start|> user hi <|im_end|> <|im_start|> assistant ok <|im_end|>"
    assert trained(s) == "hi <|im_end|> ok <|im_end|>"
    with pytest.raises(RowFormatError, match=r"field 'messages\[0\].role': unknown role 'human'"):
        encode(ds, {"messages": [{"role": "human", "content": "hi"}]})  # given roles replace human/gpt


def test_the_rows_system_field_opens_the_conversation_untrained():
    s, _ = encode({"type": "chat_template"}, {"system": "be nice", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    assert words(s.input_ids[:4]) == "<|im_start|> system be nice" and trained(s) == "ok <|im_end|>"


@pytest.mark.parametrize("row", [SHAREGPT, {"system": "be nice", "conversations": SHAREGPT["conversations"][1:]}])
def test_drop_system_message_leaves_out_the_opening_system_turn(row):
    s, plan = encode({**SHAREGPT_KEYS, "drop_system_message": True}, row)
    assert words(s.input_ids) == ("<|im_start|> user hi <|im_end|> <|im_start|> assistant hello <|im_end|> "
                                  "<|im_start|> user bye <|im_end|> <|im_start|> assistant ok <|im_end|>")
    assert trained(s) == "hello <|im_end|> ok <|im_end|>"
    assert not plan.prompt.text.startswith("<|im_start|>system")
    later = {"conversations": [*SHAREGPT["conversations"][1:3], {"from": "system", "value": "be nice"}]}
    s, _ = encode({**SHAREGPT_KEYS, "drop_system_message": True}, later)  # only the first turn, as Axolotl
    assert "system be nice" in words(s.input_ids)


def test_drop_system_message_is_for_conversations_only(tmp_path):
    with pytest.raises(ConfigError, match=r"drop_system_message: applies to conversations .* not type: alpaca"):
        tiny_run(tmp_path, datasets=[{"path": str(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)), "type": "alpaca",
                                      "drop_system_message": True}])


TOOLS = [{"type": "function", "function": {"name": "get", "parameters": '{"city": "x"}'}}]
TOOL_CHAT = [{"role": "user", "content": "weather Paris"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny"}]


def test_tool_calls_and_tools_reach_the_template_and_the_call_is_trained():
    s, plan = encode({"type": "chat_template", "chat_template": "qwen_25"},
                     {"messages": json.dumps(TOOL_CHAT), "tools": json.dumps(TOOLS)})
    parsed = json.loads(json.dumps(TOOL_CHAT).replace('"{\\"city\\": \\"Paris\\"}"', '{"city": "Paris"}'))
    text = chat.ChatRenderer(chat.named_template("qwen_25"), "<s>", "</s>").render(
        [{**m, "content": m["content"] or ""} for m in parsed], tools=[
            {"type": "function", "function": {"name": "get", "parameters": {"city": "x"}}}])
    assert '"arguments": {"city": "Paris"}}' in text  # the JSON-string arguments were parsed
    assert '\n{"type": "function", "function": {"name": "get", "parameters": {"city": "x"}}}\n</tools>' in text
    assert words(s.input_ids) == words(hf_tokenizer()(text, add_special_tokens=False)["input_ids"])
    assert trained(s) == ('<tool_call> {" name ": " get ", " arguments ": {" city ": " Paris "}} </tool_call> '
                          "<|im_end|> sunny <|im_end|>")
    assert "</tools>" in plan.prompt.text  # the held-out prompt carries the tools too


def test_qwen3_trains_the_reasoning_of_the_turns_after_the_last_user_message():
    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello", "reasoning_content": "hmm"},
                        {"role": "user", "content": "bye"},
                        {"role": "assistant", "content": "ok", "reasoning_content": "think"}]}
    s, _ = encode({"type": "chat_template", "chat_template": "qwen3"}, row)
    # the first answer's reasoning is not shown once a later user turn exists (Qwen3's format)
    assert trained(s) == "hello <|im_end|> <think> think </think> ok <|im_end|>"
    deepseek = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nok"}]}
    s, _ = encode({"type": "chat_template", "chat_template": "qwen3"}, deepseek)
    assert trained(s) == "<think> hmm </think> ok <|im_end|>"


def test_an_axolotl_thinking_field_reaches_the_templates_reasoning_key():
    """field_thinking: thinking (gpt-oss's data) under the template's reasoning_content key: Axolotl's mapping."""
    from tunedag.config.axolotl import translate

    entry = {"path": "hf:org/d", "type": "chat_template", "chat_template": "qwen3", "field_thinking": "thinking"}
    mapped = translate({"datasets": [entry]}, "c.yaml: runs.r", None)[0]["datasets"][0]
    assert mapped["message_property_mappings"] == {"reasoning_content": "thinking"}
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "thinking": "hmm"}]}
    s, _ = encode({k: v for k, v in mapped.items() if k != "path"}, row)
    assert trained(s) == "<think> hmm </think> ok <|im_end|>"


# --------------------------------------------------------------------------- preference types

def test_dpo_chat_template_default_reads_messages_and_the_last_chosen_message():
    row = {"messages": [{"role": "user", "content": "hi"}],
           "chosen": {"role": "assistant", "content": "good"},
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad"}]}
    s, _ = encode({"type": "chat_template.default"}, row)
    head = "<|im_start|> user hi <|im_end|> <|im_start|> assistant"
    assert words(s.input_ids) == f"{head} good <|im_end|> {head} bad <|im_end|>"
    assert (trained(s, 0), trained(s, 1)) == ("good <|im_end|>", "bad <|im_end|>")
    assert s.segment_labels == (1, 0)


ARGILLA = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad"}]}


@pytest.mark.parametrize("type_, row, header", [
    ("chatml.intel", {"system": "be nice", "question": "hi", "chosen": "good", "rejected": "bad"},
     "<|im_start|> system be nice <|im_end|> <|im_start|> user hi <|im_end|> <|im_start|> assistant"),
    ("chatml.argilla", {"instruction": "hi", "chosen_response": "good", "rejected_response": "bad"},
     "<|im_start|> user hi <|im_end|> <|im_start|> assistant"),
    ("llama3.ultra", {"prompt": "hi", "chosen": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "good"}],
                      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad"}]},
     "<s> <|start_header_id|> user <|end_header_id|> hi <|eot_id|> <|start_header_id|> assistant <|end_header_id|>"),
    ("chat_template.argilla", {"system": "be nice", "prompt": "hi", **ARGILLA},  # Axolotl's ORPO rows
     "<|im_start|> system be nice <|im_end|> <|im_start|> user hi <|im_end|> <|im_start|> assistant"),
    ("chat_template.argilla", ARGILLA, "<|im_start|> user hi <|im_end|> <|im_start|> assistant"),
    ("bradley_terry.chat_template", {"input": "hi", "chosen": "good", "rejected": "bad"},
     "<|im_start|> user hi <|im_end|> <|im_start|> assistant"),
])
def test_axolotl_dpo_spellings_are_dpo_with_their_fields_and_template(type_, row, header):
    assert DatasetConfig(path="unused", type=type_).type == "dpo"
    s, _ = encode({"type": type_}, row)
    end = "<|eot_id|>" if type_.startswith("llama3") else "<|im_end|>"
    assert words(s.input_ids) == f"{header} good {end} {header} bad {end}"
    assert (trained(s, 0), trained(s, 1)) == (f"good {end}", f"bad {end}")


def test_an_entrys_own_keys_win_over_its_axolotl_type():
    ds = DatasetConfig(path="unused", type="chatml.intel", field_prompt="q", chat_template="llama3")
    assert (ds.type, ds.field_prompt, ds.chat_template, ds.field_chosen) == ("dpo", "q", "llama3", None)
    assert all(v["type"] == ("alpaca" if t.startswith("alpaca:") else "dpo") for t, v in AXOLOTL_TYPES.items())


def test_kto_rows_of_prompt_completion_label():
    s, plan = encode({"type": "kto"}, {"prompt": "hi", "completion": "good", "label": False})
    assert words(s.input_ids) == "<|im_start|> user hi <|im_end|> <|im_start|> assistant good <|im_end|>"
    assert trained(s) == "good <|im_end|>" and s.segment_labels == (0,) and plan.prompt is None


# --------------------------------------------------------------------------- chat template names

TURNS = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("name", list(CHAT_TEMPLATE_FILES))
def test_every_named_template_renders_like_transformers_and_splits_into_turns(name):
    source = chat.named_template(name)
    full, turns = chat.ChatRenderer(source, "<s>", "</s>").render_turns(TURNS)
    hf = hf_tokenizer()
    assert full == hf.apply_chat_template(TURNS, chat_template=source, tokenize=False)
    answer = "<think>\n\n</think>\n\nok" if name == "qwen3" else "ok"  # Qwen3 generates its (empty) think block
    assert [full[t.content_start:t.content_end].strip() for t in turns] == ["be nice", "hi", answer]


def test_template_choices_resolve_in_one_place():
    named = chat.named_template("chatml")
    assert chat.resolve_template("tokenizer_default", None, "{{ x }}") == "{{ x }}"
    assert chat.resolve_template("tokenizer_default_fallback_chatml", None, "{{ x }}") == "{{ x }}"
    assert chat.resolve_template("tokenizer_default_fallback_chatml", None, None) == named
    assert chat.resolve_template("jinja", "{{ messages }}", None) == "{{ messages }}"
    with pytest.raises(chat.ChatTemplateError, match="chat_template: jinja needs chat_template_jinja"):
        chat.resolve_template("jinja", "my.jinja", None)
    assert chat.named_template("gemma3") == chat.named_template("gemma")  # an alias: the same file, no twin


def test_a_template_without_a_tool_format_refuses_tool_calls():
    with pytest.raises(chat.ChatTemplateError, match="no tool-call format"):
        encode({"type": "chat_template"}, {"messages": TOOL_CHAT[:2]})


# --------------------------------------------------------------------------- malformed rows

@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "get", "arguments": "{city"}}]}]},
     r"field 'messages\[1\].tool_calls\[0\].function.arguments' is a string but not JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": "get"}]},
     r"field 'messages\[1\].tool_calls' must be a list of tool calls, got str"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": {"name": "get"}},
     "field 'tools' must be a list of tool objects, got dict"),
    ({"messages": [{"role": "assistant"}]}, r"missing field 'messages\[0\].content'"),
])
def test_malformed_chat_rows_name_the_field(row, message):
    with pytest.raises(RowFormatError, match=message):
        encode({"type": "chat_template", "chat_template": "qwen_25"}, row)


def test_tokenize_stage_uses_each_datasets_template_and_names_a_bad_row(tmp_path):
    model = save_word_tokenizer(tmp_path / "tok")  # a tokenizer without a chat template
    rows = [{"question": "hi", "chosen": "good", "rejected": "bad"}] * 4
    src = _prepare(tmp_path, rows)
    run = tiny_run(src, datasets=[{"path": str(src), "type": "chatml.intel"}], val_set_size=1, rl="dpo")
    manifest = tokenize_with_model(run, [tmp_path / "raw/src"], model, tmp_path / "packed")
    assert manifest["objective"] == "dpo" and manifest["counts"]["train_samples"] == 3
    src = _prepare(tmp_path, rows[:2] + [{"question": "hi", "chosen": "good"}], name="bad")
    run = tiny_run(src, datasets=[{"path": str(src), "type": "chatml.intel"}], val_set_size=1, rl="dpo")
    with pytest.raises(RowFormatError, match=r"bad.jsonl\): line 3: missing field 'rejected'"):
        tokenize_with_model(run, [tmp_path / "raw/bad"], model, tmp_path / "packed-bad")


def test_chat_template_jinja_goes_with_chat_template_jinja(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "hi", "output": "ok"}])
    with pytest.raises(ConfigError, match=r"runs.t.chat_template_jinja: chat_template: jinja needs the template text"):
        tiny_run(src, chat_template="jinja", chat_template_jinja="my.jinja")
    with pytest.raises(ConfigError, match=r"datasets\[0\].chat_template_jinja: used only with chat_template: jinja"):
        tiny_run(src, datasets=[{"path": str(src), "type": "chat_template", "chat_template_jinja": "{{ x }}"}])
    run = tiny_run(src, datasets=[{"path": str(src), "type": "chat_template", "chat_template": "jinja",
                                   "chat_template_jinja": "{{ messages }}"}])
    assert run.datasets[0].chat_template_jinja == "{{ messages }}"
