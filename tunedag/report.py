"""The run report: the figures and tables `snakemake --report report.html` gathers.

Per run: training curves (loss and learning rate against step, the held-out loss measured during
training where the run set ``eval_steps`` or ``evals_per_epoch``, and the evaluate stage's held-out
loss of the base and fine-tuned models), throughput and GPU memory, and one HTML page with the evaluation
table (base vs fine-tuned), each GGUF file's size and perplexity, sample generations, the effective config
and the data manifest summary. Across runs: a comparison table and overlaid loss curves.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # compute nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from tunedag.io import atomic_path  # noqa: E402

EVAL_ROWS = ("val_loss", "perplexity", "token_accuracy", "exact_match", "token_f1", "rouge_l")
SAMPLE_ROWS_SHOWN = 12


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(fig, dest: Path) -> None:
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def eval_points(metrics: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, held-out losses) of the metric lines that carry an evaluation during training."""
    held_out = [m for m in metrics if "eval_loss" in m]
    return [m["step"] for m in held_out], [m["eval_loss"] for m in held_out]


def plot_training_curves(metrics: list[dict[str, Any]], evaluation: dict[str, Any], dest: Path) -> None:
    """Loss and learning rate against step: the train loss, the held-out loss during training (points),
    the evaluate stage's held-out losses as horizontal lines."""
    steps = [m["step"] for m in metrics]
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_ax.plot(steps, [m["loss"] for m in metrics], label="train loss")
    eval_steps, eval_losses = eval_points(metrics)
    if eval_steps:
        loss_ax.plot(eval_steps, eval_losses, marker="o", markersize=3, color="tab:purple",
                     label="held-out loss (during training)")
    for label, style in (("base", ":"), ("finetuned", "--")):
        if "val_loss" in evaluation.get(label, {}):  # a reward model has no token loss
            loss_ax.axhline(evaluation[label]["val_loss"], linestyle=style, color="gray",
                            label=f"val loss, {label}")
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="Loss")
    loss_ax.legend()
    lr_ax.plot(steps, [m["learning_rate"] for m in metrics], color="tab:orange")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    _save(fig, dest)


def plot_throughput(metrics: list[dict[str, Any]], dest: Path) -> None:
    """Tokens/s (and peak GPU memory where recorded) against step."""
    steps = [m["step"] for m in metrics]
    has_gpu = any("gpu_memory_gib" in m for m in metrics)
    fig, axes = plt.subplots(1, 2 if has_gpu else 1, figsize=(10 if has_gpu else 5, 3.6), squeeze=False)
    axes[0][0].plot(steps, [m["tokens_per_s"] for m in metrics], color="tab:green")
    axes[0][0].set(xlabel="step", ylabel="tokens/s", title="Throughput")
    if has_gpu:
        axes[0][1].plot(steps, [m.get("gpu_memory_gib", float("nan")) for m in metrics], color="tab:red")
        axes[0][1].set(xlabel="step", ylabel="GiB", title="Peak GPU memory")
    _save(fig, dest)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>"


def run_summary_html(run: str, evaluation: dict[str, Any], samples: list[dict[str, Any]],
                     manifest: dict[str, Any], train_info: dict[str, Any], run_config: dict[str, Any],
                     dest: Path, gguf_exports: list[dict[str, Any]] = ()) -> None:
    """One page: evaluation table, the GGUF files' perplexities, sample generations, data summary, effective
    config."""
    eval_rows = [[key, evaluation["base"].get(key, ""), evaluation["finetuned"].get(key, "")]
                 for key in EVAL_ROWS if key in evaluation["base"]]
    sample_rows = [[s["prompt"][-120:], s["reference"], s.get("base", ""), s.get("finetuned", "")]
                   for s in samples[:SAMPLE_ROWS_SHOWN]]
    data_rows = [[name, split["samples"], split["rows"], split["tokens"], split["packing_efficiency"]]
                 for name, split in manifest["splits"].items()]
    page = (
        f"<html><head><meta charset='utf-8'><title>tunedag run {html.escape(run)}</title></head><body>"
        f"<h2>Run {html.escape(run)}: evaluation (held-out rows)</h2>"
        + _table(["metric", "base", "fine-tuned"], eval_rows)
        + f"<p>{evaluation.get('prompts', 0)} held-out prompts; training: {train_info['steps']} steps, "
          f"{train_info['tokens_seen']} tokens, engine {html.escape(train_info['engine'])}.</p>"
        + early_stopping_html(train_info)
        + gguf_exports_html(gguf_exports)
        + "<h3>Sample generations (greedy)</h3>"
        + _table(["prompt (end)", "reference", "base", "fine-tuned"], sample_rows)
        + "<h3>Data</h3>" + _table(["split", "samples", "rows", "tokens", "packing efficiency"], data_rows)
        + "<h3>Effective config</h3><pre>" + html.escape(json.dumps(run_config, indent=2)) + "</pre>"
        + "</body></html>")
    with atomic_path(dest) as tmp:
        tmp.write_text(page)


def gguf_exports_html(exports: list[dict[str, Any]]) -> str:
    """A table of the run's GGUF files (the export stage's ``{run}-{type}.json``): size, and perplexity on
    held-out samples as llama.cpp runs the file beside its 16-bit reference's, so a quantisation that hurts
    shows; empty when the run has no GGUF files."""
    if not exports:
        return ""
    rows = []
    for e in exports:
        measured, reference = e.get("perplexity"), e.get("reference")
        row = [e["file"], e["type"], round(e["bytes"] / 2**20, 2)]
        if measured is None:
            rows.append(row + [f"not measured: {e.get('perplexity_skipped', 'no held-out samples')}", "", "", ""])
            continue
        ppl = measured["perplexity"]
        ref = reference["perplexity"] if reference else None
        rows.append(row + [ppl, f"{measured['samples']} / {measured['tokens']}",
                           f"{ref:.4g} ({reference['type']})" if ref is not None else "the file is 16/32-bit",
                           ppl / ref if ref else ""])
    return ("<h3>GGUF exports (llama.cpp, held-out samples)</h3>"
            + _table(["file", "type", "MiB", "perplexity", "samples / tokens", "16-bit perplexity", "ratio"], rows))


def early_stopping_html(train_info: dict[str, Any]) -> str:
    """One paragraph on the held-out loss during training: its best, where the run stopped, which step
    the adapter holds (empty when the run did not evaluate during training)."""
    if train_info.get("best_eval_loss") is None:
        return ""
    text = (f"Held-out loss during training: best {train_info['best_eval_loss']:.4g} at step "
            f"{train_info['best_eval_step']}")
    if train_info.get("stopped_early"):
        text += (f"; stopped early at step {train_info['steps']} after {train_info['evals_since_best']} "
                 "evaluations without improvement")
    return f"<p>{text}; the adapter holds the weights of step {train_info.get('adapter_step', train_info['steps'])}.</p>"


def compare_runs_html(runs: dict[str, dict[str, Any]], dest: Path) -> None:
    """A table with one row per run: final train loss, best held-out loss during training (where the run
    evaluated during training) and the fine-tuned evaluation metrics."""
    rows = [[name, r["train_info"]["final_loss"], r["train_info"]["steps"],
             r["train_info"].get("best_eval_loss") if r["train_info"].get("best_eval_loss") is not None else "",
             *[r["evaluation"]["finetuned"].get(k, "") for k in EVAL_ROWS]] for name, r in runs.items()]
    page = ("<html><head><meta charset='utf-8'><title>tunedag runs</title></head><body><h2>Runs compared</h2>"
            + _table(["run", "final train loss", "steps", "best held-out loss in training", *EVAL_ROWS], rows)
            + "</body></html>")
    with atomic_path(dest) as tmp:
        tmp.write_text(page)


def plot_compared_losses(runs: dict[str, list[dict[str, Any]]], dest: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, metrics in runs.items():
        (line,) = ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label=name)
        eval_steps, eval_losses = eval_points(metrics)
        if eval_steps:
            ax.plot(eval_steps, eval_losses, linestyle="--", marker="o", markersize=3, color=line.get_color(),
                    label=f"{name}, held-out")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="Train loss (and held-out loss) by run")
    ax.legend()
    _save(fig, dest)
