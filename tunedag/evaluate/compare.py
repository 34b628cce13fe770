"""The evaluate stage: the base model and the fine-tuned one, side by side, on held-out data.

Two kinds of evidence: teacher-forced metrics on the packed validation shards (mean token loss,
perplexity = exp(loss), next-token accuracy on trained tokens, with the same sample-boundary
masking as training) and the task itself: answers generated for held-out prompts (rendered in
the run's own prompt format), greedy and sampled, scored against the reference answers by
exact match, token F1 and ROUGE-L. With ``rl: dpo`` or ``orpo``, the validation pairs are scored too:
preference accuracy and log-prob margin of each model, and the fine-tuned model's DPO rewards
(accuracy, margin) with the base as reference; with ``rl: kto``, the validation samples' mean log-probs
and the fine-tuned model's KTO rewards (share whose sign matches the label, desirable minus undesirable).
lm-evaluation-harness tasks run when the package and the tasks' data are available locally; otherwise
metrics.json says why they did not.

``rl: reward`` trains a scorer, not a generator: only its pairwise accuracy (r_chosen > r_rejected)
and mean margin on the validation pairs are reported, for the trained model and for the untrained
one training started from (the base under a score head seeded with the run's seed). ``rl: prm`` likewise
reports only step accuracy on the validation rows (tunedag.evaluate.step_scores), of the same two models.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from tunedag.config import RunConfig
from tunedag.data.batches import collate
from tunedag.data.formats import IGNORE_INDEX
from tunedag.data.shards import ShardReader, verify_shards
from tunedag.evaluate.scores import kto_metrics, pair_logps, pair_rewards, preference_metrics, reward_metrics, sample_logps
from tunedag.evaluate.step_scores import step_metrics
from tunedag.evaluate.text_metrics import score_answers
from tunedag.io import atomic_path
from tunedag.models.batch_inputs import loss_sum, model_inputs
from tunedag.models.loading import load_causal_lm, load_run_tokenizer
from tunedag.models.classifiers import BY_RL

EVAL_BATCH_ROWS = 8


@torch.no_grad()
def teacher_forced_metrics(model, val_dir: Path, pad_id: int) -> dict[str, float]:
    reader = ShardReader(val_dir)
    total_loss, tokens, correct = 0.0, 0, 0
    order = reader.epoch_order(0, seed=0, shuffle=False)
    for start in range(0, len(order), EVAL_BATCH_ROWS):
        batch = collate([reader.row(i) for i in order[start: start + EVAL_BATCH_ROWS]], pad_id)
        logits = model(**model_inputs(batch, model.device, model.dtype, model.config)).logits.float()
        labels = batch["labels"].to(model.device)
        total_loss += float(loss_sum(logits, labels))
        trained = labels[:, 1:] != IGNORE_INDEX
        tokens += int(trained.sum())
        correct += int(((logits[:, :-1].argmax(-1) == labels[:, 1:]) & trained).sum())
    if tokens == 0:
        return {"val_loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "val_tokens": 0}
    loss = total_loss / tokens
    return {"val_loss": loss, "perplexity": math.exp(loss), "token_accuracy": correct / tokens, "val_tokens": tokens}


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int,
                     sampling: dict[str, float] | None = None) -> list[str]:
    """Answers batched with left padding; prompts tokenized exactly as in training.

    Greedy unless ``sampling`` gives ``temperature`` and ``top_p``.
    """
    decoding = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), EVAL_BATCH_ROWS):
        encoded = [([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
                   + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start: start + EVAL_BATCH_ROWS]]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=model.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **decoding)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


def lm_eval_tasks(model_path: Path, tasks: list[str], device: torch.device) -> dict[str, Any]:
    """Scores of lm-evaluation-harness ``tasks``, or the reason they could not run here."""
    try:
        import lm_eval
    except ImportError:
        return {"skipped": "lm-evaluation-harness is not installed (pip install lm-eval)"}
    try:
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path}",
                                          tasks=tasks, device=str(device), batch_size=8)
    except Exception as err:  # the harness raises many types, often for data it cannot download
        return {"skipped": f"lm-evaluation-harness could not run {tasks}: {err} (compute nodes are "
                           "often offline: cache the tasks' datasets on the login node first)"}
    return results["results"]


# what a scorer (rl: reward, prm) is measured by: (metrics key, (model, val dir, pad id) → metrics, compared keys)
SCORER_METRICS = {
    "reward": ("reward", lambda model, val_dir, pad_id: reward_metrics(pair_rewards(model, val_dir, pad_id)),
               ("accuracy", "margin")),
    "prm": ("steps", step_metrics, ("accuracy",)),
}


def reward_model_metrics(run: RunConfig, base_path: Path, merged_path: Path, val_dir: Path, pad_id: int,
                         device: torch.device) -> dict[str, Any]:
    """The scores of the untrained reward model (the base under a head seeded with the run's seed, where
    training started) and of the trained one on the validation rows: pairwise accuracy and margin with
    ``rl: reward``, step accuracy with ``rl: prm``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    classifier = BY_RL[run.rl]
    key, score, compared = SCORER_METRICS[run.rl]
    metrics: dict[str, Any] = {}
    for label in ("base", "finetuned"):
        if label == "base":
            model = classifier.load(base_path, dtype, run.trust_remote_code, run.seed)
        else:
            model = classifier.auto.from_pretrained(
                merged_path, dtype=dtype, use_safetensors=True, trust_remote_code=run.trust_remote_code)
        metrics[label] = {key: score(model.to(device).eval(), val_dir, pad_id)}
        del model
    metrics["base"]["head"] = (f"score head freshly initialised with seed {run.seed} (untrained: the "
                               "fine-tuned head's starting point)")
    metrics["improvement"] = {k: metrics["finetuned"][key][k] - metrics["base"][key][k]
                              for k in compared if k in metrics["base"][key]}
    return metrics


def evaluate_run(run: RunConfig, base_path: Path, merged_path: Path, shards_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir``/metrics.json and samples.jsonl comparing base and fine-tuned."""
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    verify_shards(shards_dir / "val", manifest)  # a changed shard stops here, naming it and the fix
    if run.rl in SCORER_METRICS:  # scores, not text: no loss, perplexity or generations to compare
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        metrics = {"config_hash": run.stage_hash("evaluate"), "prompts": 0,
                   **reward_model_metrics(run, base_path, merged_path, shards_dir / "val",
                                          manifest["pad_token_id"], device)}
        _write_metrics(out_dir, metrics, [], {})
        return metrics
    prompts = [json.loads(l) for l in (shards_dir / "val_prompts.jsonl").read_text().splitlines() if l.strip()]
    prompts = prompts[: run.eval_max_samples]
    tokenizer = load_run_tokenizer(merged_path, run)  # the merged folder holds the run's tokenizer already
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics: dict[str, Any] = {"config_hash": run.stage_hash("evaluate"), "prompts": len(prompts)}
    answers: dict[str, list[str]] = {}
    references = [p["reference"] for p in prompts]
    sampling = {"temperature": run.eval_temperature, "top_p": run.eval_top_p}
    logps: dict[str, torch.Tensor] = {}
    for label, path in (("base", base_path), ("finetuned", merged_path)):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # the base's embeddings grow to the tokens the run added, as training started from them
        model = load_causal_lm(path, dtype, run.trust_remote_code, vocab_size=len(tokenizer)).to(device).eval()
        result = teacher_forced_metrics(model, shards_dir / "val", manifest["pad_token_id"])
        if prompts:
            texts = [p["prompt"] for p in prompts]
            answers[label] = generate_answers(model, tokenizer, texts, run.eval_max_new_tokens)
            result.update(score_answers(answers[label], references))
            torch.manual_seed(run.seed)
            answers[f"{label}_sampled"] = generate_answers(model, tokenizer, texts, run.eval_max_new_tokens, sampling)
            result["sampled"] = score_answers(answers[f"{label}_sampled"], references)
        if run.lm_eval_tasks:
            result["lm_eval"] = lm_eval_tasks(path, run.lm_eval_tasks, device)
        # the base is the reference of the fine-tuned model's implicit rewards
        if run.rl in ("dpo", "orpo"):
            logps[label] = pair_logps(model, shards_dir / "val", manifest["pad_token_id"])
            result["preference"] = preference_metrics(logps[label], logps["base"] if label != "base" else None,
                                                      run.rl_beta)
        if run.rl == "kto":
            logps[label], kto_labels = sample_logps(model, shards_dir / "val", manifest["pad_token_id"])
            result["preference"] = kto_metrics(logps[label], kto_labels, logps["base"] if label != "base" else None,
                                               run.rl_beta)
        metrics[label] = result
        del model
    metrics["improvement"] = {k: metrics["finetuned"][k] - metrics["base"][k]
                              for k in ("val_loss", "token_accuracy", "exact_match", "token_f1", "rouge_l")
                              if k in metrics["base"]}
    _write_metrics(out_dir, metrics, prompts, answers)
    return metrics


def _write_metrics(out_dir: Path, metrics: dict[str, Any], prompts: list[dict], answers: dict[str, list[str]]) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(tmp / "samples.jsonl", "w") as fh:
            for i, p in enumerate(prompts):
                fh.write(json.dumps({**p, **{label: answers[label][i] for label in answers}}) + "\n")
