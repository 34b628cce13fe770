"""Single-GPU training speed and memory: HF + peft (sdpa, gradient checkpointing), the same with
Liger Kernel, HF + bitsandbytes QLoRA, and tunedag's triton engine (LoRA and QLoRA).

Randomly initialised Llama-3.2-1B / Llama-3.1-8B shapes (vocab 128256), LoRA r=16 alpha=32 on
all seven projections, bf16 base weights, fp32 adapters, rows of 4096 tokens (one document per
row, so every variant does the same attention work), fused AdamW. Each variant runs in its own
process (Liger patches transformers' classes; peak memory is per process) with the same seed,
so the same weights and batch: step-1 losses must agree to bf16 noise.

Model FLOPs per trained token (stated, not measured; recomputation is not counted):
    4 * N_frozen  (forward + input gradient of every frozen matmul, lm_head included)
  + 6 * N_lora    (the adapters: forward, input and weight gradients)
  + 12 * L * Q * c  (attention scores and values, forward 4*Q*c per layer, backward twice that; Q is the
                     query width, heads x head_dim; c the mean keys a query sees: (S + 1) / 2 for causal
                     attention over an S-token document, at most the window on a sliding-window layer)
8B at S = 4096: 33.5 GFLOP/token. MFU = tokens/s * FLOP/token / 989.5e12 (H200 dense bf16 peak).

tunedag's rows: ``ours_lora`` (checkpointing on), ``ours_lora_offload`` (checkpointed inputs in host memory),
``ours_lora_nockpt`` (no checkpointing), ``ours_qlora`` (NF4 base); ``_skipK`` (``ours_lora_skip8``): checkpointing
with the last K layers kept out of it (gradient_checkpointing_skip_layers).

Unsloth (``--plan unsloth``; scripts/bench_peers.py): ``unsloth_lora`` and ``unsloth_qlora`` are Unsloth's
FastLanguageModel on the same random weights (saved to a scratch folder, loaded bf16 or quantized to NF4 on load),
the same LoRA (r=16 alpha=32, seven projections), its own offloaded checkpointing ("unsloth"), the same batch and
optimizer, each in its own process (import unsloth patches transformers); its first 3 steps compile every decoder
layer and are left out of the timing. The plan runs the HF rows whose step-1 loss each must equal (hf_peft for the
bf16 base, hf_bnb_qlora for the 4-bit one: the same NF4 bytes) in the same call; the table prints the relative gap.

DPO (``--plan dpo``; ``--batch`` counts pairs, ``--seq`` is one sequence, prompt + response): a step is
the policy forward + backward and the reference forward (LoRA adapters disabled, no gradients) over
chosen and rejected, sigmoid loss, beta 0.1, and the optimizer step. Variants:
  trl_dpo             TRL's DPOTrainer, defaults (gradient checkpointing, bf16, TRL's fused log-prob head)
                      except max_length = --seq; driven through its own training_step on a batch from its
                      own collator (trainer.train() needs a dataset pipeline, whose time is not measured).
  trl_dpo_liger       the same with use_liger_kernel=True (Liger's RMSNorm / RoPE / SwiGLU; TRL keeps its
                      own fused head).
  trl_liger_dpo_loss  HF + peft + Liger kernels with Liger's LigerFusedLinearDPOLoss on the backbone's
                      hidden states, as TRL's use_liger_loss path computed it (policy and reference).
  ours_dpo            tunedag with rl: dpo as make_engine builds it on one GPU: the triton engine (bf16 base,
                      packed varlen attention, fused LoRA kernels, per-layer checkpointing) with
                      PreferenceObjective's chunked response log-probs, one packed row per pair; the reference
                      pass runs inside disable_adapter() under no_grad, on the frozen base alone (no LoRA matmuls).
  ours_dpo_precomputed  ours_dpo with precompute_ref_log_probs: the reference's log-probs computed before the
                      timed steps (the one pass over the data at the start is not in the figure), so a step
                      runs the policy only.
  ours_dpo_torch      the same objective on the torch engine (train_engine: torch): fp32 base under bf16
                      autocast, dense 4-D packed mask.
  logp_path           the log-prob + DPO-loss path alone on random hidden states (policy with gradient,
                      reference without): materialised logits vs TRL's kernel vs Liger vs ours, chunked
                      (the torch engine's token_logps) and fused (the triton engine's LinearHead kernel).

Usage: python scripts/bench_train.py --out bench.jsonl [--budget-s 330] [--plan default]
       python scripts/bench_train.py --variant ours_lora --shape 8b --batch 4   (one measurement)
       python scripts/bench_train.py --plan profile --profile --out profile.jsonl --budget-s 500   (each row's GPU
           time split by kernel class: matmul, attention, tunedag kernels, copies, rest)
       python scripts/bench_train.py --plan unsloth --out unsloth.jsonl --budget-s 330   (Unsloth and its HF rows, 8b, batch 4)
       python scripts/bench_train.py --plan settings --out settings.jsonl --budget-s 560   (every checkpointing setting
           of the 8B shape, LoRA and QLoRA, beside HF, Unsloth and Liger; about 70 s a row)
       python scripts/bench_train.py --plan dpo --out dpo.jsonl --budget-s 390   (DPO rows, 8b, 2 pairs)
       python scripts/bench_train.py --plan real_arches --out arches.jsonl --budget-s 520   (MoE and Gemma-3
           models at their real shapes against HF + peft, batch 2)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# scripts/tokenize.py would shadow the standard library's tokenize: run from the repository root instead
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from scripts.bench_rows import print_result, run_row  # noqa: E402

SEQ = 4096
DPO_SEQ, DPO_PROMPT, DPO_BETA = 2048, 512, 0.1
DPO_VARIANTS = ("trl_dpo", "trl_dpo_liger", "trl_liger_dpo_loss", "ours_dpo", "ours_dpo_precomputed", "ours_dpo_torch",
                "logp_path")
PEAK_FLOPS = 989.5e12
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False, head_dim=128),
    # other architectures (vocab 128256 for all, as above): Phi-3-mini, Gemma-3-4B, a small Mixtral-shaped MoE
    "phi3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, head_dim=96),
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True, head_dim=256,
                      query_pre_attn_scalar=256, sliding_window=1024),
    "moe-8x": dict(model_type="mixtral", hidden_size=2048, intermediate_size=4096, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False, head_dim=128,
                   num_local_experts=8, num_experts_per_tok=2),
    # mixture-of-experts models at their real widths, depths and expert counts (vocab 128256 as above)
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, head_dim=128,
                         num_local_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          tie_word_embeddings=False, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True),
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128),
    # smoke tests only
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, head_dim=64),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLANS = {
    "default": [("ours_lora", "8b", 4), ("hf_peft", "8b", 4), ("hf_peft_liger", "8b", 4), ("ours_qlora", "8b", 4),
                ("hf_bnb_qlora", "8b", 4), ("ours_lora_offload", "8b", 4), ("ours_lora", "8b", 1),
                ("hf_peft", "8b", 1), ("ours_lora", "1b", 4), ("hf_peft", "1b", 4), ("hf_peft_liger", "1b", 4),
                ("ours_lora", "1b", 8), ("ours_qlora_long", "8b", 1)],
    # most wanted first: --budget-s cuts the tail
    "new_arches": [(v, shape, 2) for shape in ("moe-8x", "phi3-mini", "gemma3-4b") for v in ("ours_lora", "hf_peft")],
    # with --profile: where each setting's step goes, for HF, Liger, Unsloth and tunedag's checkpointing settings
    "profile": [("hf_peft", "8b", 4), ("hf_peft_liger", "8b", 4), ("unsloth_lora", "8b", 4), ("ours_lora", "8b", 4),
                ("ours_lora_offload", "8b", 4), ("ours_lora_nockpt", "8b", 4)],
    # every setting of the 8B table beside its peers (BENCHMARKS.md "Training: single GPU", 2026-12-01)
    "settings": [("hf_peft", "8b", 4), ("unsloth_lora", "8b", 4), ("ours_lora", "8b", 4), ("ours_lora_offload", "8b", 4),
                 ("ours_lora_nockpt", "8b", 4), ("ours_lora_skip8", "8b", 4), ("ours_lora_skip16", "8b", 4),
                 ("ours_qlora_offload", "8b", 4), ("ours_qlora", "8b", 4), ("hf_peft_liger", "8b", 4)],
    "real_arches": [(v, shape, 2) for shape in ("gpt-oss-20b", "gemma3-4b", "qwen3-30b-a3b", "mixtral-8x7b")
                    for v in ("ours_lora", "hf_peft")],
    "dpo": [("trl_dpo", "8b", 2), ("ours_dpo", "8b", 2), ("ours_dpo_precomputed", "8b", 2),
            ("ours_dpo_torch", "8b", 2), ("trl_dpo_liger", "8b", 2), ("trl_liger_dpo_loss", "8b", 2),
            ("logp_path", "8b", 2)],
    # Unsloth (bench_peers.py) against the HF rows whose step-1 loss it must equal, then ours of the same run
    "unsloth": [("hf_peft", "8b", 4), ("unsloth_lora", "8b", 4), ("unsloth_qlora", "8b", 4), ("hf_bnb_qlora", "8b", 4),
                ("ours_lora", "8b", 4), ("ours_qlora", "8b", 4)],
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       rope_theta=500000.0, initializer_range=0.02, attn_implementation="sdpa",
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       **SHAPES[shape])


def model_config(shape: str):
    """llama_config, or for a shape with a model_type that architecture's config (default rope)."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type", None)
    if model_type is None:
        return llama_config(shape)
    attention = "eager" if model_type == "gpt_oss" else "sdpa"  # HF's gpt-oss attends with sinks, not sdpa
    return AutoConfig.for_model(model_type, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                initializer_range=0.02, attn_implementation=attention, **fields)


def flops_per_token(shape: str, seq: int, r: int = 16) -> float:
    """Model FLOPs a trained token costs: 4 per frozen weight, 6 per LoRA weight, and attention's
    12 x (query width) x (keys it sees, on average over the row; a sliding layer sees at most its window)."""
    s = SHAPES[shape]
    h, i, n_l = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    q = s["num_attention_heads"] * s["head_dim"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    i = s.get("moe_intermediate_size", i)  # Qwen3-MoE: each expert's width
    dims = [(h, q), (h, kv), (h, kv), (q, h)] + [(h, i), (h, i), (i, h)] * s.get("num_experts_per_tok", 1)
    frozen = n_l * sum(a * b for a, b in dims) + h * 128256
    lora = n_l * sum(r * (a + b) for a, b in dims)
    layer_types = getattr(model_config(shape), "layer_types", None) or ["full_attention"] * n_l
    window = min(s.get("sliding_window") or seq, seq)
    keys = {"full_attention": (seq + 1) / 2,
            "sliding_attention": (window * (window + 1) / 2 + (seq - window) * window) / seq}
    return 4 * frozen + 6 * lora + 12 * q * sum(keys[t] for t in layer_types)


def random_model(shape: str, dtype=None, device: str = "cuda"):
    """The random base every row of a shape starts from: seed 0, bf16 unless ``dtype``, built on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype or torch.bfloat16)


def make_batch(batch: int, seq: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128256, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq).expand(batch, seq).clone(),
            "segment_ids": torch.ones(batch, seq, dtype=torch.long)}


def build_hf(shape: str, variant: str):
    """HF Llama + peft LoRA, gradient checkpointing, sdpa; + Liger or bitsandbytes 4-bit."""
    import torch
    from peft import LoraConfig, get_peft_model

    if "liger" in variant:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    model = random_model(shape)
    if "bnb" in variant:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                                     quant_type="nf4").to("cuda")
                        setattr(parent, name, q)
                        del lin
        torch.cuda.empty_cache()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    from tunedag.models.registry import lora_target_kwargs  # packed (Phi-3) and expert (MoE) names

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                             **lora_target_kwargs(model.config, TARGETS)))
    model.train()

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                        labels=batch["labels"].cuda())
        out.loss.backward()
        return out.loss.detach()

    return model, step


def build_ours(shape: str, variant: str):
    import torch

    from tunedag.config import RunConfig
    from tunedag.data.batches import trained_token_count
    from tunedag.train.triton_engine import TritonEngine

    base = random_model(shape)
    skip = re.search(r"_skip(\d+)", variant)  # ours_lora_skip8: the last 8 layers kept out of checkpointing
    run = RunConfig(base_model="bench", datasets=[], lora_r=16, lora_alpha=32,
                    adapter="qlora" if "qlora" in variant else "lora",
                    gradient_checkpointing="nockpt" not in variant,
                    gradient_checkpointing_skip_layers=int(skip.group(1)) if skip else 0,
                    activation_offloading="offload" in variant, train_engine="triton")
    engine = TritonEngine(run, None, torch.device("cuda"), base=base)
    torch.cuda.empty_cache()

    def step(batch):
        n = trained_token_count(batch["labels"])
        loss = engine.loss_sum(batch) / n
        loss.backward()
        return loss.detach()

    return engine.model, step


def build(variant: str, shape: str, seq: int):
    if variant.startswith("unsloth"):  # its own process, like every row: import unsloth patches transformers
        from scripts.bench_peers import build_unsloth

        return build_unsloth(shape, seq, load_in_4bit=variant == "unsloth_qlora")
    return (build_ours if variant.startswith("ours") else build_hf)(shape, variant)


def measure(variant: str, shape: str, batch: int, seq: int, steps: int = 3, profile: bool = False) -> dict:
    """tokens/s and peak memory of ``steps`` optimizer steps after the warm-up; with ``profile``, then two more
    steps under torch.profiler, their GPU time split by kernel class (scripts/step_profile.py)."""
    import torch

    from scripts.bench_peers import UNSLOTH_WARMUP_STEPS

    torch.backends.cuda.matmul.allow_tf32 = True
    model, step = build(variant, shape, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    data = make_batch(batch, seq)
    torch.cuda.reset_peak_memory_stats()
    losses = []

    def train_step():
        losses.append(float(step(data)))
        opt.step()
        opt.zero_grad(set_to_none=True)

    warmup = UNSLOTH_WARMUP_STEPS if variant.startswith("unsloth") else 1
    for i in range(steps + warmup):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        train_step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tok_s = steps * batch * seq / elapsed
    result = {"variant": variant, "shape": shape, "batch": batch, "seq": seq, "tokens_per_s": round(tok_s, 1),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "mfu": round(tok_s * flops_per_token(shape, seq) / PEAK_FLOPS, 4), "step1_loss": round(losses[0], 6),
              "warmup_steps": warmup, "trainable": sum(p.numel() for p in params)}
    if profile:
        from scripts.step_profile import profile_steps

        result["profile"] = profile_steps(train_step, steps=2)
    return result


# --------------------------------------------------------------------------- DPO


def make_pairs(pairs: int, seq: int, prompt: int, seed: int = 0) -> list[dict]:
    """Token-level preference pairs: a shared prompt, chosen and rejected responses of seq - prompt tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 128256, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(seq - prompt), "rejected_ids": ids(seq - prompt)}
            for _ in range(pairs)]


def packed_pairs(examples: list[dict]) -> dict:
    """tunedag's packed preference batch: one row per pair, [prompt + chosen, prompt + rejected], prompts masked."""
    import torch

    rows = []
    for ex in examples:
        segs = [ex["prompt_ids"] + ex["chosen_ids"], ex["prompt_ids"] + ex["rejected_ids"]]
        rows.append(dict(ids=sum(segs, []), labels=sum(([-100] * len(ex["prompt_ids"]) + s[len(ex["prompt_ids"]):]
                                                        for s in segs), []),
                         pos=sum((list(range(len(s))) for s in segs), []),
                         seg=sum(([k + 1] * len(s) for k, s in enumerate(segs)), [])))
    t = lambda key: torch.tensor([r[key] for r in rows], dtype=torch.long)  # noqa: E731
    return {"input_ids": t("ids"), "labels": t("labels"), "position_ids": t("pos"), "segment_ids": t("seg"),
            "segment_labels": torch.tensor([[1, 0]] * len(rows), dtype=torch.long)}


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")


def build_trl_dpo(shape: str, variant: str, examples: list[dict], device: str):
    """TRL's DPOTrainer (defaults; max_length = the sequence length), one step = its own training_step."""
    import tempfile

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    # TRL tokenizes its dataset at construction: a word-level tokenizer built here stands in for a hub one
    word = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2}, unk_token="a"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, eos_token="<eos>", pad_token="<pad>")
    data = Dataset.from_dict({"prompt": ["a a"], "chosen": [" a"], "rejected": [" a a"]})
    seq = len(examples[0]["prompt_ids"]) + len(examples[0]["chosen_ids"])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(examples), max_length=seq,
                     report_to="none", bf16=device == "cuda", use_liger_kernel="liger" in variant,
                     use_cpu=device == "cpu")
    base = random_model(shape, torch.bfloat16 if device == "cuda" else torch.float32, device)
    trainer = DPOTrainer(model=base, args=args, train_dataset=data, processing_class=tok, peft_config=_lora_config())
    # what trainer.train() does before its first step: Liger's kernels, checkpointing, accelerate's autocast
    if args.use_liger_kernel:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=trainer.model.get_base_model(), **(args.liger_kernel_config or {}))
    if args.gradient_checkpointing:
        kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        trainer.model.enable_input_require_grads()
    model = trainer.accelerator.prepare(trainer.model)
    trainer.model_wrapped = model
    if not hasattr(trainer, "current_gradient_accumulation_steps"):
        trainer.current_gradient_accumulation_steps = 1
    inputs = trainer.data_collator(examples)  # [chosen..., rejected...], right-padded

    def step():
        return trainer.training_step(model, inputs)

    return trainer.model, step, {"trl_max_length": args.max_length, "trl_grad_ckpt": bool(args.gradient_checkpointing),
                                 "trl_precompute_ref": bool(args.precompute_ref_log_probs)}


def build_liger_dpo_loss(shape: str, examples: list[dict], device: str):
    """HF + peft + Liger kernels, loss = LigerFusedLinearDPOLoss on hidden states (TRL's former use_liger_loss)."""
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from peft import get_peft_model

    base = random_model(shape, torch.bfloat16, device)
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False, cross_entropy=False)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    model = get_peft_model(base, _lora_config())
    model.train()
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=-100, beta=DPO_BETA, use_ref_model=True, loss_type="sigmoid")
    ids = torch.tensor([e["prompt_ids"] + e["chosen_ids"] for e in examples]
                       + [e["prompt_ids"] + e["rejected_ids"] for e in examples], device=device)
    labels = ids.clone()
    labels[:, :len(examples[0]["prompt_ids"])] = -100
    decoder, head = model.get_base_model().model, model.get_base_model().lm_head

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            with torch.no_grad(), model.disable_adapter():
                ref = decoder(input_ids=ids, use_cache=False).last_hidden_state
            out = loss_fn(head.weight, hidden[:, :-1], labels[:, 1:], ref_input=ref[:, :-1], ref_weight=head.weight)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach()

    return model, step, {}


def build_ours_dpo(shape: str, variant: str, examples: list[dict], device: str):
    """tunedag's rl: dpo engine, driven through its own loss_sum (policy + adapters-off reference) and loss_units."""
    import torch

    from tunedag.config import RunConfig
    from tunedag.models.registry import fast_path_blocker
    from tunedag.train import engines
    from tunedag.train.preference import REFERENCE_LOGPS, PreferenceObjective
    from tunedag.train.triton_engine import TritonEngine

    batch = packed_pairs(examples)
    run = RunConfig(base_model="bench", datasets=[], lora_r=16, lora_alpha=32, lora_dropout=0.0, rl="dpo",
                    rl_beta=DPO_BETA, gradient_checkpointing=True,
                    train_engine="torch" if variant == "ours_dpo_torch" else "triton")
    if variant in ("ours_dpo", "ours_dpo_precomputed"):  # what make_engine builds for rl: dpo on one GPU
        base = random_model(shape, torch.bfloat16, device)
        assert fast_path_blocker(base.config, rl=run.rl, lora_dropout=run.lora_dropout,
                                 lora_target_modules=run.lora_target_modules,
                                 lora_modules_to_save=run.lora_modules_to_save) is None
        engine = TritonEngine(run, None, torch.device(device), base=base)
    else:  # ours_dpo_torch: the torch engine (fp32 base under bf16 autocast, dense 4-D packed mask)
        base = random_model(shape, torch.float32, device)
        loader, engines.load_causal_lm = engines.load_causal_lm, lambda *a, **k: base
        try:
            engine = engines.TorchEngine(run, None, torch.device(device))
        finally:
            engines.load_causal_lm = loader
    assert isinstance(engine.objective, PreferenceObjective)
    if variant == "ours_dpo_precomputed":  # precompute_ref_log_probs: the table's values, computed before the steps
        with torch.no_grad():
            batch[REFERENCE_LOGPS] = engine.reference_logps(batch).logps.float().cpu()
    if device == "cuda":
        torch.cuda.empty_cache()

    def step():
        loss = engine.loss_sum(batch) / engine.objective.loss_units(batch)
        loss.backward()
        return loss.detach()

    return engine.model, step, {"engine": engine.name}


def measure_dpo(variant: str, shape: str, pairs: int, seq: int, prompt: int, steps: int = 3) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    examples = make_pairs(pairs, seq, prompt)
    if variant.startswith("trl_dpo"):
        model, step, extra = build_trl_dpo(shape, variant, examples, device)
    elif variant == "trl_liger_dpo_loss":
        model, step, extra = build_liger_dpo_loss(shape, examples, device)
    else:
        model, step, extra = build_ours_dpo(shape, variant, examples, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(steps + 1):
        if i == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        losses.append(float(step()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = 2 * pairs * seq  # chosen and rejected, prompt included, per step
    return {"variant": variant, "shape": shape, "batch": pairs, "seq": seq, "prompt": prompt,
            "pairs_per_s": round(steps * pairs / elapsed, 3), "tokens_per_s": round(steps * tokens / elapsed, 1),
            "step_s": round(elapsed / steps, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "step1_loss": round(losses[0], 4), "losses": [round(x, 4) for x in losses],
            "trainable": sum(p.numel() for p in params), **extra}


def measure_logp_path(shape: str, pairs: int, seq: int, prompt: int, reps: int = 3) -> dict:
    """Peak memory above the inputs (and time) of the DPO head alone: policy log-probs with gradient, reference
    log-probs without, sigmoid loss, backward to the hidden states, for 2 * pairs sequences of ``seq`` tokens."""
    import torch

    from tunedag.models.logprobs import LinearHead, token_logps
    from tunedag.train.preference import dpo_losses

    dev = "cuda"
    h_size, vocab = SHAPES[shape]["hidden_size"], 128256
    g = torch.Generator(device=dev).manual_seed(0)
    n_seq = 2 * pairs
    hidden = (torch.randn(n_seq, seq, h_size, device=dev, generator=g) * 1.5).bfloat16()
    ref_hidden = (hidden.float() + 0.01 * torch.randn(hidden.shape, device=dev, generator=g)).bfloat16()
    weight = (torch.randn(vocab, h_size, device=dev, generator=g) * 0.02).bfloat16()
    labels = torch.randint(3, vocab, (n_seq, seq), device=dev, generator=g)
    labels[:, :prompt] = -100
    target, mask = labels[:, 1:], labels[:, 1:] != -100

    def seq_logps_eager(h):  # full [tokens, vocab] fp32 logits, as DPO trainers did before fused heads
        logits = (h[:, :-1] @ weight.T).float()
        lp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0)[..., None])[..., 0]
        return (lp * mask).sum(-1)

    def seq_logps_trl(h):
        from trl.kernels import ChunkedLogProbFunction

        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        hs = h[:, :-1]
        out = ChunkedLogProbFunction.apply(hs[mask], weight, None, target[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                           None, 1.0, ("log_probs", "entropy", "mean_logits", "is_top1"))
        return out[0].new_zeros(mask.shape).masked_scatter(mask, out[0]).sum(-1)

    def seq_logps_ours(head):  # a callable head: the chunked PyTorch path; a LinearHead: the fused kernel
        def run(h):
            hs = h[:, :-1]
            lp = token_logps(hs[mask], target[mask], head)
            return lp.new_zeros(mask.shape).masked_scatter(mask, lp).sum(-1)
        return run

    def dpo_from(fn):
        def run(h):
            pol = fn(h)
            with torch.no_grad():
                ref = fn(ref_hidden)
            return dpo_losses(pol[:pairs], pol[pairs:], ref[:pairs], ref[pairs:], DPO_BETA).mean()
        return run

    def liger(h):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        out = LigerFusedLinearDPOLoss(ignore_index=-100, beta=DPO_BETA, use_ref_model=True)(
            weight, h[:, :-1], target, ref_input=ref_hidden[:, :-1], ref_weight=weight)
        return out[0] if isinstance(out, tuple) else out

    results = {}
    for name, fn in [("eager_logits", dpo_from(seq_logps_eager)), ("trl_fused", dpo_from(seq_logps_trl)),
                     ("liger_dpo_loss", liger), ("ours_chunked", dpo_from(seq_logps_ours(lambda x: x @ weight.T))),
                     ("ours_fused", dpo_from(seq_logps_ours(LinearHead(weight))))]:
        try:
            times, loss = [], None
            for i in range(reps + 1):
                h = hidden.detach().requires_grad_(True)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                loss = fn(h)
                loss.backward()
                torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated() - before
                del h
            results[name] = {"peak_gib": round(peak / 2**30, 3), "ms": round(1e3 * sorted(times)[len(times) // 2], 1),
                             "loss": round(float(loss), 5)}
        except Exception as err:  # noqa: BLE001 - a failing method is reported, the others still run
            results[name] = {"error": repr(err)[-300:]}
        print(json.dumps({name: results[name]}), flush=True)
    return {"variant": "logp_path", "shape": shape, "batch": pairs, "seq": seq, "prompt": prompt,
            "response_tokens": int(mask.sum()), "methods": results}


def longest(shape: str, budget_s: float) -> dict:
    """Longest row (in 8192-token documents) for which one QLoRA step of ours fits (doubling)."""
    import torch

    model, step = build_ours(shape, "ours_qlora_long")
    params = [p for p in model.parameters() if p.requires_grad]
    best, seq, start = 0, 65536, time.perf_counter()
    while time.perf_counter() - start < budget_s and seq <= 262144:
        data = make_batch(1, seq)
        data["segment_ids"] = (torch.arange(seq) // 8192 + 1).expand(1, seq).clone()
        data["position_ids"] = (torch.arange(seq) % 8192).expand(1, seq).clone()
        try:
            torch.cuda.reset_peak_memory_stats()
            step(data)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            break
        finally:
            for p in params:
                p.grad = None
        best, peak = seq, torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps({"longest_ok": seq, "peak_gib": round(peak, 2)}), flush=True)
        seq *= 2
    return {"variant": "ours_qlora_longest", "shape": shape, "batch": 1, "seq": best, "doc_len": 8192}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant")
    ap.add_argument("--shape", default="8b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=4, help="rows of --seq tokens; DPO: pairs")
    ap.add_argument("--seq", type=int, help=f"row length (default {SEQ}); DPO: one sequence (default {DPO_SEQ})")
    ap.add_argument("--prompt", type=int, default=DPO_PROMPT, help="DPO: prompt tokens of each sequence")
    ap.add_argument("--plan", default="default", choices=list(PLANS))
    ap.add_argument("--plan-shape", choices=list(SHAPES), help="run the plan's rows at this shape (smoke tests)")
    ap.add_argument("--budget-s", type=float, default=330)
    ap.add_argument("--out", default="bench_train.jsonl")
    ap.add_argument("--profile", action="store_true",
                    help="also split two more steps' GPU time into matmul, attention, tunedag kernels, copies, "
                         "rest (training rows)")
    args = ap.parse_args()
    if args.variant:
        if args.variant == "ours_qlora_long":
            result = longest(args.shape, budget_s=60)
        elif args.variant == "logp_path":
            result = measure_logp_path(args.shape, args.batch, args.seq or DPO_SEQ, args.prompt)
        elif args.variant in DPO_VARIANTS:
            result = measure_dpo(args.variant, args.shape, args.batch, args.seq or DPO_SEQ, args.prompt)
        else:
            result = measure(args.variant, args.shape, args.batch, args.seq or SEQ, profile=args.profile)
        print_result(result)
        return
    from scripts.bench_peers import scratch_folder

    with scratch_folder():  # where Unsloth rows save the random base they load (gigabytes, removed after)
        results = run_rows(args)
    if args.plan == "dpo":
        print_dpo(results)
    else:
        print_train(results)


def run_rows(args) -> list[dict]:
    """Each row of the plan in its own process, until --budget-s is spent; results appended to --out as they come."""
    start = time.perf_counter()
    results = []
    for variant, shape, batch in PLANS[args.plan]:
        shape = args.plan_shape or shape
        left = args.budget_s - (time.perf_counter() - start)
        if left < 40:
            print(f"skipped {variant} {shape} b{batch}: budget spent", flush=True)
            continue
        cmd = [sys.executable, __file__, "--variant", variant, "--shape", shape, "--batch", str(batch),
               "--prompt", str(args.prompt)] + (["--seq", str(args.seq)] if args.seq else []) + (
            ["--profile"] if args.profile else [])
        # Unsloth: save, load, compile; real-shape MoE rows: tens of GB of weights, HF's experts one by one
        slow = variant in DPO_VARIANTS or variant.startswith("unsloth") or args.plan == "real_arches"
        results.append(run_row(cmd, min(left, 240 if slow else 150), {"variant": variant, "shape": shape,
                                                                      "batch": batch}))
        print(json.dumps(results[-1]), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(results[-1]) + "\n")
    return results


def loss_reference(variant: str) -> str:
    """The HF row a row's step-1 loss must equal: HF + bitsandbytes for a 4-bit base (the same NF4 bytes)."""
    return "hf_bnb_qlora" if "qlora" in variant else "hf_peft"


def print_train(results: list[dict]) -> None:
    """Speed and memory against hf_peft, and the step-1 loss against loss_reference, of the same shape and batch."""
    done = {(r["variant"], r["shape"], r["batch"]): r for r in results if "tokens_per_s" in r}
    print(f"\n{'variant':22} {'shape':5} {'batch':>5} {'tok/s':>9} {'x base':>7} {'peak GiB':>9} {'mem/base':>8} "
          f"{'MFU':>6} {'loss1':>10} {'vs ref':>8}")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"{r['variant']:22} {r['shape']:5} {r['batch']:>5} {r.get('seq', r.get('error', ''))!s:>9}")
            continue
        b = done.get(("hf_peft", r["shape"], r["batch"]))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b else "-"
        ref = done.get((loss_reference(r["variant"]), r["shape"], r["batch"]))
        rel = f"{abs(r['step1_loss'] - ref['step1_loss']) / ref['step1_loss']:.1e}" if ref else "-"
        print(f"{r['variant']:22} {r['shape']:5} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {ratio:>7} "
              f"{r['peak_gib']:>9.2f} {mem:>8} {r['mfu']:>6.1%} {r['step1_loss']:>10.6f} {rel:>8}")
    if profiled := [r for r in results if "profile" in r]:
        from scripts.step_profile import format_table

        print("\nGPU time per step (ms) by kernel class:\n" + format_table(profiled))


def print_dpo(results: list[dict]) -> None:
    """The DPO rows against trl_dpo of the same shape and pairs, measured in the same run."""
    base = {(r["shape"], r["batch"]): r for r in results if r.get("variant") == "trl_dpo" and "tokens_per_s" in r}
    print(f"\n{'variant':20} {'shape':5} {'pairs':>5} {'pairs/s':>8} {'tok/s':>8} {'x TRL':>6} {'peak GiB':>9} "
          f"{'mem/TRL':>8} {'losses'}")
    for r in results:
        if r.get("variant") == "logp_path" and "methods" in r:
            for name, m in r["methods"].items():
                print(f"  logp path {name:16} {m.get('peak_gib', '-')!s:>8} GiB {m.get('ms', '-')!s:>8} ms "
                      f"loss {m.get('loss', m.get('error', ''))}")
            continue
        if "tokens_per_s" not in r:
            print(f"{r['variant']:20} {r['shape']:5} {r['batch']:>5} {str(r.get('error', ''))[-300:]}")
            continue
        b = base.get((r["shape"], r["batch"]))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b and r["peak_gib"] else "-"
        print(f"{r['variant']:20} {r['shape']:5} {r['batch']:>5} {r['pairs_per_s']:>8.3f} {r['tokens_per_s']:>8.0f} "
              f"{ratio:>6} {r['peak_gib']!s:>9} {mem:>8} {r['losses']}")


if __name__ == "__main__":
    main()
