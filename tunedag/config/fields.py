"""The keys of config.yaml as typed, frozen dataclasses: each field's default, the stages that read
it and its doc (the README's key table and the JSON schema come from them), and the per-stage
hash a changed key reruns exactly its stages by."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional


from tunedag.errors import TunedagError
from tunedag.model_facts import GGUF_TYPES

STAGES = ("download", "tokenize", "train", "merge", "evaluate", "export_gguf", "export_vllm")


class ConfigError(TunedagError, ValueError):
    """One or more config.yaml problems, each naming the key path and value that cause it.

    Validation goes on past the first problem, so a user sees every problem of a config at once;
    ``problems`` holds them one per line."""

    def __init__(self, *problems: str):
        self.problems = [line for p in problems for line in (p.problems if isinstance(p, ConfigError) else [p])]
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems))


class Problems:
    """Collects ConfigErrors over independent checks: ``with problems.check(): ...`` per check, then
    ``problems.raise_if_any()``."""

    def __init__(self) -> None:
        self.found: list[str] = []

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as err:
            self.found.extend(err.problems)

    def raise_if_any(self) -> None:
        if self.found:
            raise ConfigError(*self.found)


def _field(default: Any = dataclasses.MISSING, *, stages: tuple[str, ...], doc: str,
           factory: Any = dataclasses.MISSING) -> Any:
    meta = {"stages": stages, "doc": doc}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# chat_template names: the template file in tunedag/data/templates/ and the settings it renders with;
# names that share a file differ only in a setting (Axolotl's names where the format is the same).
CHAT_TEMPLATE_FILES: dict[str, tuple[str, dict[str, Any]]] = {
    "chatml": ("chatml", {}),
    "llama3": ("llama3", {}),
    "llama3_2_vision": ("llama3_2_vision", {}),
    "mistral": ("mistral", {}),
    "mistral_v1": ("mistral_inst", {"inst": " [INST] ", "close": " [/INST]", "reply": " "}),
    "mistral_v2v3": ("mistral_inst", {"inst": "[INST] ", "close": "[/INST]", "reply": " "}),
    "mistral_v3_tekken": ("mistral_inst", {"inst": "[INST]", "close": "[/INST]", "reply": ""}),
    "gemma": ("gemma", {}),
    "gemma3": ("gemma", {}),
    "qwen": ("qwen", {"default_system": "You are a helpful assistant."}),
    "qwen_25": ("qwen", {"default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}),
    "qwen3": ("qwen3", {}),
    "phi_3": ("phi_3", {"add_bos": True}),
    "phi_35": ("phi_3", {"add_bos": False}),
}
ChatTemplateName = Literal[("tokenizer_default", "jinja", *CHAT_TEMPLATE_FILES,
                            *(f"tokenizer_default_fallback_{name}" for name in CHAT_TEMPLATE_FILES))]
FORMATS = ("alpaca", "sharegpt", "chat_template", "completion", "pretrain", "input_output", "dpo", "kto",
           "stepwise_supervised")
# Axolotl's dataset types that are a tunedag format with some keys set (a key the entry sets wins):
# its DPO strategies (chatml.*/llama3.* render with that fixed template) and its reward-model pairs.
AXOLOTL_TYPES: dict[str, dict[str, str]] = {
    "chat_template.default": {"type": "dpo", "field_messages": "messages"},  # read as the prompt field
    "chat_template.argilla_chat": {"type": "dpo"},
    "bradley_terry.chat_template": {"type": "dpo", "field_prompt": "input"},
    "chat_template.argilla": {"type": "dpo", "field_prompt": "prompt"},
    **{f"alpaca:{style}": {"type": "alpaca", "alpaca_style": style}
       for style in ("instruct", "chat", "chatml", "phi")},
    **{f"{template}.{name}": {"type": "dpo", "chat_template": template, **keys}
       for template in ("chatml", "llama3")
       for name, keys in {"prompt_pairs": {}, "ultra": {}, "argilla_chat": {},
                          "intel": {"field_prompt": "question"}, "icr": {"field_prompt": "input"},
                          "argilla": {"field_prompt": "instruction", "field_chosen": "chosen_response",
                                      "field_rejected": "rejected_response"}}.items()},
}


@dataclass(frozen=True)
class DatasetConfig:
    """One entry of ``datasets``: where the rows come from and how they are formatted. An Axolotl
    type spelling (``AXOLOTL_TYPES``) becomes the tunedag format it means here, once."""

    path: str = _field(stages=("download", "tokenize"),
                       doc="local file (jsonl/json/csv/parquet), https:// URL, or hf:org/name[:config][@split]")
    type: Literal[(*FORMATS, *AXOLOTL_TYPES)] = _field(
        "alpaca", stages=("tokenize",), doc="row format (see tunedag/data/formats.py); Axolotl's DPO and reward "
                                            "spellings (chat_template.default, chatml.intel, …) become dpo, "
                                            "alpaca:<style> becomes alpaca with that alpaca_style")
    name: Optional[str] = _field(None, stages=("download", "tokenize"),
                                 doc="name of data/raw/{name}/ (default: derived from path)")
    sha256: Optional[str] = _field(None, stages=("download",), doc="required for https:// sources")
    revision: Optional[str] = _field(None, stages=("download",),
                                     doc="hf: sources: the hub revision to read (a commit sha, tag or branch); "
                                         "a commit sha pins the data")
    max_rows: Optional[int] = _field(None, stages=("download",),
                                     doc="hf: sources: stream the split and keep only its first max_rows rows (the "
                                         "rest is never downloaded); null: the whole split")
    max_words: Optional[int] = _field(None, stages=("download",),
                                      doc="hf: sources: stream the split and keep its first rows until their text "
                                          "(field, default text) holds this many whitespace-separated words, at "
                                          "least as many tokens for a tokenizer that splits at whitespace")
    weight: float = _field(1.0, stages=("tokenize",),
                           doc="sampling weight of the training rows: each is used floor(w) times, a seeded "
                               "share frac(w) once more")
    roles_to_train: list[str] = _field(stages=("tokenize",), doc="chat roles whose turns are trained",
                                       factory=lambda: ["assistant"])
    train_on_eos: Literal["turn", "all", "none", "last"] = _field(
        "turn", stages=("tokenize",), doc="end-of-turn tokens trained: of trained turns, all, none, or the last")
    chat_template: Optional[ChatTemplateName] = _field(
        None, stages=("tokenize",), doc="this dataset's chat template (default: the run's chat_template)")
    chat_template_jinja: Optional[str] = _field(
        None, stages=("tokenize",), doc="chat_template: jinja: the template text (jinja)")
    roles: Optional[dict[str, list[str]]] = _field(
        None, stages=("tokenize",), doc="chat roles as {role: [names in the data]} (default: user: [human, user], "
                                        "assistant: [gpt, assistant], system, tool)")
    message_property_mappings: Optional[dict[str, str]] = _field(
        None, stages=("tokenize",), doc="message keys as {template key: key in the data}, e.g. {role: from, "
                                        "content: value}; other keys (tool_calls, reasoning_content) pass as they are")
    drop_system_message: bool = _field(
        False, stages=("tokenize",), doc="sharegpt/chat_template: leave out a conversation's opening system turn "
                                         "(the row's system field too)")
    alpaca_style: Optional[Literal["instruct", "chat", "chatml", "phi"]] = _field(
        None, stages=("tokenize",), doc="alpaca: Axolotl's prompt style (type: alpaca:<style>); null: instruct")
    field: Optional[str] = _field(None, stages=("tokenize",), doc="text field (completion; segments for input_output)")
    field_instruction: Optional[str] = _field(None, stages=("tokenize",), doc="alpaca instruction field")
    field_input: Optional[str] = _field(None, stages=("tokenize",), doc="alpaca input field")
    field_output: Optional[str] = _field(None, stages=("tokenize",), doc="alpaca output field")
    field_system: Optional[str] = _field(None, stages=("tokenize",), doc="alpaca/chat/dpo/kto system field")
    field_messages: Optional[str] = _field(None, stages=("tokenize",),
                                           doc="sharegpt/chat_template/kto messages field (dpo: the prompt field)")
    field_tools: Optional[str] = _field(None, stages=("tokenize",), doc="chat tools field (default tools)")
    message_field_role: Optional[str] = _field(None, stages=("tokenize",), doc="role key inside a message")
    message_field_content: Optional[str] = _field(None, stages=("tokenize",), doc="content key inside a message")
    field_prompt: Optional[str] = _field(None, stages=("tokenize",), doc="dpo/kto prompt field")
    field_chosen: Optional[str] = _field(None, stages=("tokenize",), doc="dpo chosen field")
    field_rejected: Optional[str] = _field(None, stages=("tokenize",), doc="dpo rejected field")
    field_completion: Optional[str] = _field(None, stages=("tokenize",), doc="kto completion field")
    field_label: Optional[str] = _field(None, stages=("tokenize",), doc="kto label field (true = desirable)")
    step_separator: str = _field("\n", stages=("tokenize",),
                                 doc="stepwise_supervised: text after every step; a step's label sits on its last token")
    max_completion_length: Optional[int] = _field(
        None, stages=("tokenize",), doc="stepwise_supervised: keep at most this many tokens of the steps (null: all)")
    train_on_last_step_only: bool = _field(
        False, stages=("tokenize",), doc="stepwise_supervised: train only the last step's label")

    def __post_init__(self) -> None:
        for key, value in AXOLOTL_TYPES.get(self.type, {}).items():
            if key == "type" or getattr(self, key) is None:
                object.__setattr__(self, key, value)

    def download_slice(self) -> dict[str, Any]:
        """The keys that make data/raw/{dataset_name}: entries alike in these share one download."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if "download" in f.metadata["stages"]}

    def download_identity(self) -> dict[str, Any]:
        """What data/raw/{dataset_name} holds, as the download stage's rerun key: the download keys that are
        set, and under max_words the field whose words it counts."""
        keys = {k: v for k, v in self.download_slice().items() if v is not None}
        if self.max_words is not None:
            keys["field"] = self.field
        return keys

    @property
    def dataset_name(self) -> str:
        if self.name:
            return self.name
        source, _, split = self.path.removeprefix("hf:").partition("@")
        stem = Path(source.replace(":", "-")).name
        stem = re.sub(r"\.(jsonl|json|csv|parquet)(\.gz)?$", "", stem)
        if split not in ("", "train"):  # a slice of the split is other data: its own folder
            stem += "-" + re.sub(r"[^A-Za-z0-9]+", "-", split).strip("-")
        return re.sub(r"[^A-Za-z0-9_.-]", "-", stem)


TOKENIZER_STAGES = ("tokenize", "train", "merge", "evaluate")  # read the run's tokenizer (and its vocab size)


@dataclass(frozen=True)
class SpecialTokens:
    """``special_tokens``: the tokenizer's special tokens as the run sets them (Axolotl's key). A token the
    vocabulary lacks is added, and grows the model's embeddings (see tunedag.data.run_tokenizer)."""

    bos_token: Optional[str] = _field(None, stages=TOKENIZER_STAGES, doc="beginning-of-sequence token")
    eos_token: Optional[str] = _field(None, stages=TOKENIZER_STAGES,
                                      doc="end-of-sequence token: ends every sample of the data formats and "
                                          "stops generation")
    pad_token: Optional[str] = _field(None, stages=TOKENIZER_STAGES, doc="padding token (masked from the loss)")
    unk_token: Optional[str] = _field(None, stages=TOKENIZER_STAGES, doc="unknown-token token")
    additional_special_tokens: list[str] = _field(stages=TOKENIZER_STAGES, factory=list,
                                                  doc="more special tokens (never split, added when new)")


@dataclass(frozen=True)
class QATConfig:
    """``qat``: quantization-aware training (Axolotl's key): every linear layer computes with fake-quantized
    weights and activations (tunedag.models.qat); the trained weights are saved in full precision."""

    weight_dtype: Literal["int4", "mxfp4", "nvfp4"] = _field(
        stages=("train",), doc="weight grid: int4 (asymmetric min-max per group_size inputs), mxfp4 (FP4 E2M1, a "
                               "power-of-two scale per 32) or nvfp4 (FP4 E2M1, an E4M3 scale per 16 and one per tensor)")
    activation_dtype: Optional[Literal["int8", "mxfp4", "nvfp4"]] = _field(
        None, stages=("train",), doc="activation grid: int8 (asymmetric per token) with int4 weights; mxfp4 or "
                                     "nvfp4 as the weights")
    group_size: Optional[int] = _field(None, stages=("train",),
                                       doc="inputs per weight scale: int4 any divisor of the layers' input "
                                           "size (null: 32); mxfp4 32 and nvfp4 16 only")
    fake_quant_after_n_steps: Optional[int] = _field(
        None, stages=("train",), doc="train the first this many optimizer steps without fake quantization "
                                     "(null: from the start)")


CLASSIFIER_OBJECTIVES = frozenset({"reward", "prm"})  # rl values that train a score head (RunConfig.trains_classifier)
REFERENCE_OBJECTIVES = frozenset({"dpo", "kto"})  # rl values that compare with a reference model


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, after ``defaults`` are merged in."""

    base_model: str = _field(stages=("tokenize", "train", "merge", "evaluate"),
                             doc="builtin:tiny-llama, a hub id, or a local HF folder")
    datasets: list[DatasetConfig] = _field(stages=("tokenize",), doc="training data sources")
    base_model_revision: Optional[str] = _field(None, stages=("tokenize", "train", "merge", "evaluate"),
                                                doc="hub base_model: the revision to download (a commit sha, tag "
                                                    "or branch); a commit sha pins the weights")
    trust_remote_code: bool = _field(False, stages=("tokenize", "train", "merge", "evaluate"),
                                     doc="allow model code from the hub (off unless turned on)")
    reinit_weights: bool = _field(False, stages=("train",),
                                  doc="start from the model class's own random initialisation of base_model's "
                                      "config.json (seeded by seed), not its weights: pretraining from scratch; "
                                      "needs adapter: null")
    sequence_len: int = _field(512, stages=("tokenize",), doc="tokens per packed row")
    sample_packing: bool = _field(True, stages=("tokenize",), doc="pack samples into full rows")
    sample_packing_sequentially: bool = _field(
        False, stages=("tokenize",), doc="pack samples in their order, next-fit (a row is closed when the next "
                                         "sample does not fit), instead of first-fit-decreasing by length")
    curriculum_sampling: bool = _field(
        False, stages=("tokenize", "train"), doc="no shuffling: samples are packed in dataset order (datasets in "
                                                 "their order) and rows are trained in that order")
    dataset_exact_deduplication: bool = _field(
        False, stages=("tokenize",), doc="keep each distinct sample (tokens and labels equal) once, where it first "
                                         "occurs in row order (datasets in order), in the training or held-out split")
    val_set_size: float = _field(0.05, stages=("tokenize",),
                                 doc="held-out share of rows (<1) or number of rows (>=1)")
    train_on_inputs: bool = _field(False, stages=("tokenize",), doc="also train on prompt tokens")
    chat_template: ChatTemplateName = _field(
        "tokenizer_default", stages=("tokenize",),
        doc="template for chat and preference formats (Axolotl's names; see tunedag/data/templates/)")
    chat_template_jinja: Optional[str] = _field(
        None, stages=("tokenize",), doc="chat_template: jinja: the template text (jinja)")
    special_tokens: Optional[SpecialTokens] = _field(
        None, stages=TOKENIZER_STAGES,
        doc="set the tokenizer's bos/eos/pad/unk tokens ({eos_token: <|im_end|>}); a token the vocabulary lacks is "
            "added and the embeddings grow (with adapter: lora/qlora, lora_modules_to_save must hold embed_tokens "
            "and lm_head unless it is only a pad_token)")
    tokens: list[str] = _field(stages=TOKENIZER_STAGES, factory=list,
                               doc="tokens added to the vocabulary (each one id, never split); new ones grow the "
                                   "embeddings, as special_tokens")
    excess_length_strategy: Literal["drop", "truncate", "raise"] = _field(
        "drop", stages=("tokenize",), doc="samples longer than sequence_len: drop, truncate or raise")
    on_bad_rows: Literal["raise", "skip"] = _field("raise", stages=("tokenize",),
                                                   doc="a malformed row stops the stage, or is skipped and counted")
    adapter: Optional[Literal["lora", "qlora"]] = _field(
        "lora", stages=("train", "merge"),
        doc="lora, qlora (LoRA over a 4-bit NF4 base), or null: full fine-tuning (every weight, or those "
            "unfrozen_parameters names); train then writes the whole model")
    unfrozen_parameters: list[str] = _field(
        stages=("train",), factory=list,
        doc="adapter: null: train only the parameters whose names one of these Python regular expressions "
            "matches (re.search, as Axolotl: anchor with ^ and $), e.g. ['^model.layers.(2[4-9]|3[01])\\.', "
            "'^lm_head']; empty: every parameter")
    keep_sparsity: list[str] = _field(
        stages=("train",), factory=list,
        doc="adapter: null: the weights of the parameters these Python regular expressions match (re.search) "
            "that are zero in the base model stay zero (a pruned, e.g. 2:4 sparse, model stays sparse); "
            "their gradients are masked before each step and their values after it")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_torch_8bit", "adamw_torch_4bit", "adamw_bnb_8bit",
                       "paged_adamw_8bit", "adafactor", "muon"] = _field(
        "adamw_torch", stages=("train",),
        doc="adamw_torch (fused on CUDA where the engine allows), adamw_torch_fused, adamw_torch_8bit and "
            "adamw_torch_4bit (AdamW with block-wise 8- or 4-bit moments, every engine), adamw_bnb_8bit and "
            "paged_adamw_8bit (need bitsandbytes), adafactor (transformers'), muon (Muon on the hidden weight "
            "matrices, AdamW on embeddings, lm_head, norms and biases)")
    adam_beta1: float = _field(0.9, stages=("train",), doc="AdamW's first-moment decay (the adamw_* optimizers)")
    adam_beta2: float = _field(0.999, stages=("train",), doc="AdamW's second-moment decay")
    adam_epsilon: float = _field(1e-8, stages=("train",), doc="AdamW's epsilon")
    master_weights: Literal["fp32", "bf16_kahan"] = _field(
        "fp32", stages=("train",),
        doc="adapter: null: fp32 keeps the trained weights in fp32 (bf16 compute; 16 bytes per parameter with "
            "adamw_torch); bf16_kahan keeps them in bf16 with a bf16 Kahan compensation per weight, so updates "
            "smaller than a bf16 step still add up (8 bytes per parameter with adamw_torch_8bit, 14 with "
            "adamw_torch); optimizer adamw_torch, adamw_torch_8bit or adamw_torch_4bit, any engine but deepspeed")
    lora_r: int = _field(16, stages=("train",), doc="LoRA rank")
    lora_alpha: float = _field(32, stages=("train",), doc="LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = _field(0.0, stages=("train",), doc="dropout on the LoRA input")
    lora_target_modules: list[str] = _field(
        stages=("train",), doc="module names that get adapters",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_modules_to_save: list[str] = _field(
        stages=("train",), doc="modules trained in full beside the adapters (e.g. embed_tokens, lm_head)",
        factory=list)
    micro_batch_size: int = _field(4, stages=("train",), doc="rows per forward pass")
    gradient_accumulation_steps: int = _field(1, stages=("train",), doc="micro-batches per optimizer step")
    num_epochs: int = _field(1, stages=("train",), doc="passes over the training shards")
    max_steps: Optional[int] = _field(None, stages=("train",), doc="stop after this many optimizer steps")
    learning_rate: float = _field(2e-4, stages=("train",), doc="peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant"] = _field("cosine", stages=("train",),
                                                                  doc="decay after warmup")
    cosine_min_lr_ratio: Optional[float] = _field(
        None, stages=("train",), doc="lr_scheduler: cosine: decay to this share of learning_rate instead of 0 "
                                     "(1.0: constant after the warmup)")
    cosine_constant_lr_ratio: Optional[float] = _field(
        None, stages=("train",), doc="lr_scheduler: cosine with cosine_min_lr_ratio: the cosine reaches its floor "
                                     "at this share of the steps and holds it; null or 0: at the last step")
    warmup_steps: int = _field(0, stages=("train",), doc="linear warmup steps")
    warmup_ratio: Optional[float] = _field(None, stages=("train",),
                                           doc="warmup as a share of all optimizer steps (instead of warmup_steps)")
    weight_decay: float = _field(0.0, stages=("train",), doc="AdamW weight decay")
    max_grad_norm: float = _field(1.0, stages=("train",), doc="gradient clipping norm (0 disables)")
    gradient_checkpointing: Literal[True, False, "auto", "offload"] = _field(
        "auto", stages=("train",),
        doc="recompute activations in backward; offload: also keep the layer inputs in pinned CPU memory (triton "
            "engine); auto: on one GPU with the triton engine the fastest of false, true, offload whose predicted "
            "peak memory fits the free GPU memory (tunedag.train.memory_model, recorded in train_info.json), with "
            "true keeping as many last layers out of checkpointing as fit (gradient_checkpointing_skip_layers); "
            "true on the other engines' GPUs, false on the CPU")
    gradient_checkpointing_skip_layers: int = _field(
        0, stages=("train",),
        doc="with gradient_checkpointing true or offload (triton engine): the last N decoder layers keep their "
            "activations instead of recomputing them in backward, each trading one layer's activations of GPU "
            "memory for a layer's forward of time (the last layer always does: 0 and 1 are the same); auto sets "
            "it to the most that fit beside checkpointing on")
    activation_offloading: bool = _field(False, stages=("train",),
                                         doc="with gradient_checkpointing true (or auto, when it checkpoints): keep "
                                             "layer inputs in pinned CPU memory (triton engine)")
    qat: Optional[QATConfig] = _field(
        None, stages=("train",), doc="quantization-aware training of a full fine-tune (torch, ddp and fsdp "
                                     "engines): weight_dtype, activation_dtype, group_size, fake_quant_after_n_steps")
    fp8: bool = _field(False, stages=("train",),
                       doc="full fine-tune with the linear layers' matmuls in float8 (E4M3 forward, E5M2 "
                           "gradients, per-tensor dynamic scales; first and last linear layer in bf16); needs a "
                           "GPU of compute capability 8.9+ (torch, ddp and fsdp engines)")
    fp8_enable_fsdp_float8_all_gather: bool = _field(
        False, stages=("train",), doc="fp8 on fsdp (Axolotl's key): accepted; tunedag all-gathers the bf16 "
                                      "weights and casts them to float8 after the gather (twice the traffic; "
                                      "the scale is taken from the gathered bf16 weight)")
    train_engine: Literal["auto", "triton", "torch", "ddp", "fsdp", "deepspeed"] = _field(
        "auto", stages=("train",),
        doc="training engine; auto: triton on exactly one CUDA GPU, else torch; in a Slurm job with "
            "several ranks: ddp (replicated model, summed gradients), fsdp (FSDP2 per decoder layer) or "
            "deepspeed (ZeRO stage 1, 2 or 3)")
    deepspeed_zero_stage: Literal[1, 2, 3] = _field(
        2, stages=("train",), doc="deepspeed: ZeRO stage; 1 shards the optimizer state, 2 also the gradients, "
                                  "3 also the weights")
    deepspeed_offload: Literal["none", "optimizer", "all"] = _field(
        "none", stages=("train",),
        doc="deepspeed: keep in CPU memory the optimizer state (optimizer) or also the weights (all, stage 3)")
    deepspeed_config: Optional[str] = _field(
        None, stages=("train",),
        doc="deepspeed: a DeepSpeed JSON used instead of the generated one; batch sizes, accumulation and "
            "clipping still come from config.yaml (the JSON may leave them out or write \"auto\")")
    rl: Optional[Literal["dpo", "orpo", "kto", "reward", "prm"]] = _field(
        None, stages=("train", "evaluate"),
        doc="preference objective on dpo (dpo, orpo, reward) or kto (kto) data; null: supervised fine-tuning; "
            "reward: a reward model (the decoder with a scalar score head) trained on the pairs; prm: a process "
            "reward model (the decoder with a 2-label token head) trained on stepwise_supervised data; with adapter: "
            "null every weight trains, and dpo and kto compare with a frozen copy of the base")
    rl_beta: float = _field(0.1, stages=("train", "evaluate"),
                            doc="dpo/kto: strength of the pull to the reference model (Axolotl's rl_beta, "
                                "formerly dpo_beta); IPO: its tau")
    dpo_loss_type: Literal["sigmoid", "ipo"] = _field(
        "sigmoid", stages=("train",), doc="dpo loss: sigmoid (DPO) or ipo (squared, per-token log-ratios)")
    dpo_label_smoothing: float = _field(0.0, stages=("train",),
                                        doc="dpo sigmoid: assumed share of flipped labels (conservative DPO), "
                                            "in [0, 0.5)")
    orpo_alpha: float = _field(0.1, stages=("train",), doc="orpo: weight of the odds-ratio term beside the NLL")
    precompute_ref_log_probs: bool = _field(
        False, stages=("train",),
        doc="dpo/kto: compute the reference model's log-probs of every training row once, before the first "
            "step, instead of a reference forward pass in every step (held-out batches still run it)")
    center_rewards_coefficient: float = _field(
        0.0, stages=("train",), doc="reward: weight of the (r_chosen + r_rejected)² term that keeps rewards "
                                    "centred on zero (TRL's name; 0 disables)")
    kto_desirable_weight: float = _field(1.0, stages=("train",), doc="kto: weight of desirable samples")
    kto_undesirable_weight: float = _field(1.0, stages=("train",), doc="kto: weight of undesirable samples")
    save_steps: int = _field(50, stages=("train",), doc="checkpoint every this many optimizer steps")
    saves_per_epoch: Optional[int] = _field(None, stages=("train",),
                                            doc="checkpoints per epoch (instead of save_steps)")
    keep_last_checkpoints: int = _field(2, stages=("train",), doc="complete checkpoints kept on disk")
    logging_steps: int = _field(1, stages=("train",), doc="steps between metric lines")
    eval_steps: Optional[int] = _field(
        None, stages=("train",), doc="held-out loss on the val shards every this many optimizer steps and at "
                                     "the last (eval_loss in train_metrics.jsonl; null: none)")
    evals_per_epoch: Optional[int] = _field(
        None, stages=("train",), doc="instead of eval_steps: this many held-out evaluations per epoch "
                                     "(every steps-per-epoch // n steps)")
    eval_batch_size: Optional[int] = _field(None, stages=("train",),
                                            doc="rows per forward pass of the held-out loss (null: micro_batch_size)")
    early_stopping_patience: Optional[int] = _field(
        None, stages=("train",), doc="stop after this many evaluations without a lower held-out loss; the "
                                     "adapter is then the best evaluation's")
    seed: int = _field(42, stages=("tokenize", "train", "evaluate"), doc="seed for split, shuffle and init")
    merge_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", stages=("merge",), doc="dtype of the merged weights (auto: the base model's)")
    max_shard_size: str = _field("2GB", stages=("merge",), doc="safetensors shard size of the merged model")
    eval_max_samples: int = _field(200, stages=("evaluate",), doc="held-out prompts generated from")
    eval_max_new_tokens: int = _field(48, stages=("evaluate",), doc="generation length in evaluation")
    eval_temperature: float = _field(0.7, stages=("evaluate",), doc="temperature of the sampled answers")
    eval_top_p: float = _field(0.9, stages=("evaluate",), doc="nucleus share of the sampled answers")
    lm_eval_tasks: list[str] = _field(stages=("evaluate",), factory=list,
                                      doc="lm-evaluation-harness tasks (their data must be available offline)")
    wandb_project: Optional[str] = _field(None, stages=(), doc="Weights & Biases project (off when unset)")
    wandb_entity: Optional[str] = _field(None, stages=(), doc="Weights & Biases entity")
    wandb_name: Optional[str] = _field(None, stages=(), doc="Weights & Biases run name (default: the run's)")
    wandb_tags: list[str] = _field(stages=(), factory=list, doc="Weights & Biases tags")
    # logging settings change no output: stages=() keeps them from rerunning training
    wandb_mode: Literal["offline", "online", "disabled"] = _field(
        "offline", stages=(), doc="offline by default: compute nodes have no internet; `wandb sync` later")
    gguf_types: list[Literal[GGUF_TYPES]] = _field(
        stages=("export_gguf",), factory=lambda: ["f16"],
        doc="GGUF files to write: f32, f16, bf16, q8_0 by tunedag; q4_0 … q6_k, iq4_nl, iq4_xs by llama.cpp's "
            "quantizer (llama-cpp-python) from the f16/bf16 file")
    output_dir: str = _field("", stages=(), doc="run folder, relative to the work folder (default runs/{run})")

    @property
    def trains_classifier(self) -> bool:
        """rl: reward or prm: the decoder under a score head (sequence or token classification), not a
        language model: no triton engine, no GGUF, and no new tokens."""
        return self.rl in CLASSIFIER_OBJECTIVES

    @property
    def compares_with_reference(self) -> bool:
        """rl: dpo (sigmoid or ipo) or kto: the loss compares the policy with a reference model (the base with
        the adapters off, or a full fine-tune's frozen copy); orpo and the score heads have none."""
        return self.rl in REFERENCE_OBJECTIVES

    @property
    def reinit_seed(self) -> int | None:
        """The seed of base_model's fresh initialisation (reinit_weights), or None: its weights are loaded."""
        return self.seed if self.reinit_weights else None

    def stage_slice(self, stage: str) -> dict[str, Any]:
        """The keys ``stage`` reads, as plain JSON-able values."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if stage in f.metadata["stages"]}

    def stage_hash(self, stage: str) -> str:
        """sha256 of the stage's config slice: recorded in the stage's outputs."""
        return hash_json(self.stage_slice(stage))


@dataclass(frozen=True)
class ClusterResources:
    """Slurm resources of one stage (``cluster.<stage>``); account/partition may come from the profile."""

    nodes: int = _field(1, stages=(), doc="nodes")
    gpus_per_node: int = _field(0, stages=(), doc="GPUs per node (= tasks per node)")
    cpus_per_task: int = _field(2, stages=(), doc="CPUs per task")
    mem_gb: float = _field(8, stages=(), doc="memory per node in GB")
    time: str = _field("01:00:00", stages=(), doc="wall-clock limit HH:MM:SS, MM:SS or D-HH:MM:SS")
    partition: Optional[str] = _field(None, stages=(), doc="Slurm partition")
    account: Optional[str] = _field(None, stages=(), doc="Slurm account")
    qos: Optional[str] = _field(None, stages=(), doc="Slurm QOS")
    constraint: Optional[str] = _field(None, stages=(), doc="Slurm node constraint")
    tasks_per_node: Optional[int] = _field(None, stages=(),
                                           doc="tasks (ranks) per node (default: gpus_per_node, at least 1)")
    sbatch_args: list[str] = _field(stages=(), doc="extra sbatch options, e.g. ['--exclusive', "
                                                   "'--gres-flags=enforce-binding']", factory=list)
    signal_delay_s: int = _field(120, stages=(),
                                 doc="train job: seconds before the time limit when it checkpoints and requeues")


@dataclass(frozen=True)
class Config:
    """The whole config.yaml: runs by name, cluster resources by stage."""

    runs: dict[str, RunConfig]
    cluster: dict[str, ClusterResources]
    notes: dict[str, list[str]] = field(default_factory=dict)  # per run: Axolotl keys accepted without effect

    def run_dir(self, run: str) -> str:
        return self.runs[run].output_dir or f"runs/{run}"


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
