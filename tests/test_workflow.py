"""End to end: the Snakemake DAG on a tiny config in a temporary folder.

Checks every stage's output, that the fine-tuned model beats its base on held-out rows of the
task, and that reruns touch exactly the stages whose config slice changed.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import sample_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def snakemake(workdir: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--profile", str(REPO / "profiles/local"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_rules(proc: subprocess.CompletedProcess) -> set[str]:
    """Rule names in a dry run's job table."""
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:")[1].split("total")[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+\s*$", table, re.M)} - {"job"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag")
    write_jsonl(work / "data/animals.jsonl", sample_rows(1200, seed=5))
    config = {
        "defaults": {"sequence_len": 256, "lora_r": 16, "lora_alpha": 32,
                     "lora_modules_to_save": ["embed_tokens", "lm_head"], "micro_batch_size": 8,
                     "learning_rate": 5e-3, "warmup_steps": 10, "seed": 3},
        "runs": {"tiny": {"base_model": "builtin:tiny-llama",
                          "datasets": [{"path": "data/animals.jsonl", "type": "alpaca"}],
                          "max_steps": 120, "save_steps": 40, "val_set_size": 48,
                          "eval_max_samples": 48, "eval_max_new_tokens": 6, "gguf_types": ["f32"]}},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(work)
    return work


def test_every_stage_output_exists(workdir):
    raw = json.loads((workdir / "data/raw/animals/source.json").read_text())
    assert raw["rows"] == 1200 and raw["kind"] == "local"
    manifest = json.loads((workdir / "data/packed/tiny/manifest.json").read_text())
    assert manifest["splits"]["val"]["samples"] == 48
    assert all((workdir / "data/packed/tiny" / s["path"]).is_file() for s in manifest["splits"]["train"]["shards"])
    run = workdir / "runs/tiny"
    assert (run / "adapter/adapter_model.safetensors").is_file()
    assert len((run / "train_metrics.jsonl").read_text().splitlines()) == 120
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-120", "step-80"]
    assert (run / "merged/config.json").is_file() and list((run / "merged").glob("*.safetensors"))
    assert (run / "merged/generation_config.json").is_file() and (run / "merged/tokenizer.json").is_file()
    assert (run / "export/tiny-f32.gguf").stat().st_size > 1_000_000
    assert (run / "export/vllm/model/config.json").is_file()
    assert (run / "export/vllm/adapter/adapter_config.json").is_file()
    assert len((run / "eval/samples.jsonl").read_text().splitlines()) == 48


def test_fine_tuned_model_beats_the_base_on_held_out_rows(workdir):
    metrics = json.loads((workdir / "runs/tiny/eval/metrics.json").read_text())
    base, tuned = metrics["base"], metrics["finetuned"]
    assert base["exact_match"] < 0.1
    assert tuned["exact_match"] > base["exact_match"] + 0.5
    assert tuned["token_accuracy"] > base["token_accuracy"] + 0.5
    assert tuned["perplexity"] < base["perplexity"] / 10


def test_nothing_reruns_when_nothing_changed(workdir):
    assert planned_rules(snakemake(workdir, "-n")) == set()


def test_forcerun_tokenize_reruns_it_and_what_follows(workdir):
    planned = planned_rules(snakemake(workdir, "-n", "--forcerun", "tokenize"))
    assert planned == {"tokenize", "train", "merge", "evaluate", "export_gguf", "export_vllm", "report_run",
                       "report_compare", "all"}


def test_until_train_stops_after_training(workdir):
    planned = planned_rules(snakemake(workdir, "-n", "--forcerun", "tokenize", "--until", "train"))
    assert planned == {"tokenize", "train"}


def test_changed_training_key_reruns_train_and_later_but_not_data_stages(workdir):
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["runs"]["tiny"]["learning_rate"] = 1e-3
    changed = workdir / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(changed), "--profile", str(REPO / "profiles/local"), "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned_rules(proc) == {"train", "merge", "evaluate", "export_gguf", "export_vllm", "report_run",
                                   "report_compare", "all"}


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report_html(workdir):
    snakemake(workdir, "--report", "report.html")
    return workdir / "report.html"


def test_report_holds_the_run_figures_and_tables(report_html, workdir):
    page = report_html.read_text(errors="replace")
    for name in ("training_curves.png", "throughput.png", "summary.html", "runs_compared.html",
                 "train_loss_by_run.png"):
        assert name in page, name
    assert page.count("iVBORw0KGgo") >= 3  # the three PNG figures, embedded
    summary = (workdir / "runs/tiny/report/summary.html").read_text()
    assert "exact_match" in summary and "packing efficiency" in summary and "learning_rate" in summary
    gguf = json.loads((workdir / "runs/tiny/export/tiny-f32.json").read_text())
    assert "GGUF exports" in summary and "tiny-f32.gguf" in summary  # each GGUF file's perplexity, or why not
    measured = gguf["perplexity"]
    assert (f"{measured['perplexity']:.4g}" if measured is not None else "not measured") in summary


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian's chromium is not installed")
def test_report_renders_with_its_figures_in_headless_chromium(report_html, tmp_path):
    import numpy as np
    from PIL import Image

    profile = ["--user-data-dir=" + str(tmp_path / "profile"), "--virtual-time-budget=15000"]
    dom = subprocess.run(["/usr/bin/chromium", *CHROMIUM_FLAGS, *profile, "--dump-dom", report_html.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Runs" in dom.stdout and "Comparison" in dom.stdout  # the report's categories, rendered by its app
    shot = tmp_path / "report.png"
    subprocess.run(["/usr/bin/chromium", *CHROMIUM_FLAGS, *profile, f"--screenshot={shot}",
                    "--window-size=1400,1000", report_html.as_uri()], capture_output=True, timeout=180, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1000, 1400)
    assert pixels.std() > 10  # a blank or error page is near-uniform


def test_a_pinned_hub_model_is_downloaded_at_its_revision_into_its_own_folder(tmp_path):
    write_jsonl(tmp_path / "data/animals.jsonl", sample_rows(20, seed=1))
    run = {"base_model": "org/model", "base_model_revision": "0e9e39f",
           "datasets": [{"path": "data/animals.jsonl", "type": "alpaca"}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"runs": {"r": run}}))
    out = snakemake(tmp_path, "-n", "-p", "--until", "download_model")
    command = next(l for l in (out.stdout + out.stderr).splitlines() if "download_model.py" in l)
    assert "--base-model org/model --revision 0e9e39f --out models/hub/org--model@0e9e39f" in command
