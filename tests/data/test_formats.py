"""Every format's exact token ids and labels, against ids written by hand (tests/data/wordtok.py)."""
import pytest

from tunedag.data import chat
from tunedag.data.formats import (ALPACA_PREAMBLE, ALPACA_PREAMBLE_NO_INPUT, PLANNERS, FormatSpec, RowFormatError,
                                  TextTokenizer, encode_plans)
from tunedag.models.builtin import _CHAT_TEMPLATE
from tests.data.wordtok import ids, word_tokenizer

M = -100
CONVERSATION = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ok"}]
# chatml: <|im_start|>role\ncontent<|im_end|>\n per turn; newlines vanish in the word tokenizer
CHATML_IDS = ids("<|im_start|> system be nice <|im_end|> <|im_start|> user hi <|im_end|> "
                 "<|im_start|> assistant hello <|im_end|> <|im_start|> user bye <|im_end|> "
                 "<|im_start|> assistant ok <|im_end|>")


def encode(type_, row, template=None, sequence_len=512, **options):
    tok = TextTokenizer.from_hf(word_tokenizer(_CHAT_TEMPLATE))
    source = chat.named_template(template) if template else tok.chat_template
    overrides = options.pop("overrides", {})
    spec = FormatSpec.build(type_, overrides, tok, source, sequence_len, **options)
    plan = PLANNERS[type_](row, spec, tok)
    return encode_plans([plan], tok, spec)[0], plan


def one(type_, row, **kw):
    samples, _ = encode(type_, row, **kw)
    assert len(samples) == 1
    return samples[0]


ALPACA = {"instruction": "hi", "input": "x y", "output": "ok"}
PREAMBLE_IDS = {text: word_tokenizer()(text, add_special_tokens=False)["input_ids"]  # mostly [UNK]
                for text in (ALPACA_PREAMBLE, ALPACA_PREAMBLE_NO_INPUT)}
ALPACA_PROMPT = ids("<s>") + PREAMBLE_IDS[ALPACA_PREAMBLE] + ids("### Instruction : hi ### Input : x y ### Response :")


def test_alpaca_masks_the_prompt_and_trains_answer_and_eos():
    s = one("alpaca", ALPACA)
    assert s.input_ids == ALPACA_PROMPT + ids("ok </s>")
    assert s.labels == [M] * len(ALPACA_PROMPT) + ids("ok </s>")


def test_alpaca_train_on_inputs_trains_all_but_the_first_token():
    s = one("alpaca", ALPACA, train_on_inputs=True)
    assert s.labels == [M] + s.input_ids[1:]


def test_alpaca_without_eos_training_and_with_renamed_fields():
    s = one("alpaca", {"q": "hi", "a": "ok"}, overrides={"instruction": "q", "output": "a"}, train_on_eos="none")
    prompt = ids("<s>") + PREAMBLE_IDS[ALPACA_PREAMBLE_NO_INPUT] + ids("### Instruction : hi ### Response :")
    assert s.input_ids == prompt + ids("ok </s>")
    assert s.labels == [M] * len(prompt) + ids("ok") + [M]


def test_alpaca_prompt_tokenized_like_transformers():
    """The batch path (backend encode_batch) gives the ids transformers' __call__ gives."""
    from tunedag.models.builtin import build_tokenizer

    hf = build_tokenizer(512)
    tok = TextTokenizer.from_hf(hf)
    text = "### Instruction:\nWhich word in the list is an animal?\n\nfox rain\n\n### Response:\n"
    assert [e.ids for e in tok.encode_batch([text, "owl"])] == [hf(t, add_special_tokens=False)["input_ids"]
                                                                for t in (text, "owl")]


@pytest.mark.parametrize("train_on_eos, expected", [
    ("turn", [M] * 11 + ids("hello <|im_end|>") + [M] * 6 + ids("ok <|im_end|>")),
    ("none", [M] * 11 + ids("hello") + [M] * 7 + ids("ok") + [M]),
    ("last", [M] * 11 + ids("hello") + [M] * 7 + ids("ok <|im_end|>")),
    ("all", [M, M, M, M, 4, M, M, M, 4, M, M] + ids("hello <|im_end|>") + [M, M, M, 4, M, M] + ids("ok <|im_end|>")),
])
def test_chat_template_trains_assistant_turns_and_their_end_of_turn(train_on_eos, expected):
    s = one("chat_template", {"messages": CONVERSATION}, template="chatml", train_on_eos=train_on_eos)
    assert s.input_ids == CHATML_IDS
    assert s.labels == expected


def test_roles_to_train_and_train_on_inputs_for_chat():
    s = one("chat_template", {"messages": CONVERSATION}, template="chatml", roles_to_train=("user", "assistant"))
    assert s.labels == [M] * 7 + ids("hi <|im_end|>") + [M, M] + ids("hello <|im_end|>") + [M, M] + \
        ids("bye <|im_end|>") + [M, M] + ids("ok <|im_end|>")
    s = one("chat_template", {"messages": CONVERSATION}, template="chatml", train_on_inputs=True)
    assert s.labels == [M] + CHATML_IDS[1:]


def test_sharegpt_maps_roles_and_uses_the_tokenizer_template():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    s = one("sharegpt", row)  # the tokenizer's own template: "### Instruction:\n…\n\n### Response:\n" + answer + eos
    assert s.input_ids == ids("### Instruction : hi ### Response : ok </s>")
    assert s.labels == [M] * 7 + ids("ok </s>")
    _, plan = encode("sharegpt", row)
    assert plan.prompt.text == "### Instruction:\nhi\n\n### Response:\n" and plan.prompt.reference == "ok"


def test_chat_field_overrides():
    row = {"turns": [{"who": "user", "text": "hi"}, {"who": "assistant", "text": "ok"}]}
    s = one("chat_template", row, template="chatml", overrides={"messages": "turns", "role": "who", "content": "text"})
    assert s.input_ids == ids("<|im_start|> user hi <|im_end|> <|im_start|> assistant ok <|im_end|>")


def test_completion_splits_long_documents_into_sequence_len_pieces():
    samples, _ = encode("completion", {"text": "a b c a b c a"}, sequence_len=4)
    assert [s.input_ids for s in samples] == [ids("<s> a b c"), ids("a b c a"), ids("</s>")]
    assert [s.labels for s in samples] == [[M] + ids("a b c"), [M] + ids("b c a"), [M]]


def test_input_output_trains_flagged_segments_only():
    row = {"segments": [{"text": "hi x", "label": False}, {"text": "ok", "label": True},
                        {"text": "</s>", "label": True}]}
    s = one("input_output", row)
    assert s.input_ids == ids("hi x ok </s>") and s.labels == [M, M] + ids("ok </s>")


@pytest.mark.parametrize("row", [
    {"prompt": "hi", "chosen": "good", "rejected": "bad"},
    {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad"}]},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]},
])
def test_dpo_pair_is_two_segments_with_prompts_masked(row):
    s = one("dpo", row, template="chatml")
    head = ids("<|im_start|> user hi <|im_end|> <|im_start|> assistant")
    assert s.input_ids == head + ids("good <|im_end|>") + head + ids("bad <|im_end|>")
    assert s.labels == [M] * 6 + ids("good <|im_end|>") + [M] * 6 + ids("bad <|im_end|>")
    assert s.segments == (8, 8) and s.segment_labels == (1, 0)


def test_kto_trains_the_final_turn_and_keeps_its_label():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}], "label": False}
    s = one("kto", row, template="chatml")
    assert s.labels == [M] * 6 + ids("good <|im_end|>") and s.segment_labels == (0,)


TURNS = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("name, text", [
    ("llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"),
    ("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
    ("qwen", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
    ("mistral", "<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][INST]U[/INST]A</s>"),
    ("gemma", "<s><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"),
])
def test_named_templates_render_and_split_into_turns(name, text):
    renderer = chat.ChatRenderer(chat.named_template(name), "<s>", "</s>")
    full, turns = renderer.render_turns(TURNS)
    assert full == text
    assert [full[t.content_start:t.content_end] for t in turns] == ["S", "U", "A"]
    assert full[turns[2].content_end:turns[2].end].strip() in ("<|eot_id|>", "<|im_end|>", "</s>", "<end_of_turn>")


def test_qwen_adds_its_default_system_turn_untrained():
    s = one("chat_template", {"messages": TURNS[1:]}, template="qwen")
    assert s.labels[-2:] != [M, M] and all(l == M for l in s.labels[:-3])


@pytest.mark.parametrize("type_, row, message", [
    ("alpaca", {"output": "b"}, "missing field 'instruction'"),
    ("alpaca", {"instruction": "a", "output": 3}, "field 'output' must be a string, got int"),
    ("chat_template", {"messages": []}, "field 'messages' is an empty conversation"),
    ("chat_template", {"messages": "hi"}, "field 'messages' is a string but not JSON"),
    ("chat_template", {"messages": "3"}, "field 'messages' must be a list of messages, got int"),
    ("chat_template", {"messages": [{"role": "bot", "content": "hi"}]}, r"field 'messages\[0\].role': unknown role 'bot'"),
    ("chat_template", {"messages": [{"role": "user", "content": 1}]}, r"field 'messages\[0\].content' must be a string"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
     r"field 'conversations\[1\].from': unknown role 'robot'"),
    ("input_output", {"segments": [{"text": "x", "label": "yes"}]}, r"field 'segments\[0\].label' must be true or false"),
    ("dpo", {"prompt": "hi", "chosen": "good"}, "missing field 'rejected'"),
    ("kto", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "label": "y"},
     "field 'label' must be true or false, got str"),
    ("kto", {"messages": [{"role": "user", "content": "hi"}], "label": True}, "the last message must be the assistant's"),
])
def test_malformed_rows_name_the_field(type_, row, message):
    with pytest.raises(RowFormatError, match=message):
        encode(type_, row, template="chatml")
