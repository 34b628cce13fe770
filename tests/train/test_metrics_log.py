"""Training metrics: JSONL, line-based progress without a TTY, W&B offline with no secret."""
import dataclasses
import io
import json
import re
import time

from tunedag.train.metrics_log import MetricsLog, format_eta
from tests.helpers import tiny_run, write_jsonl, sample_rows


def record(step):
    return {"step": step, "loss": 2.0 / step, "learning_rate": 1e-3, "tokens_per_s": 1234.5,
            "grad_norm": 0.5, "tokens_seen": 100 * step}


def test_progress_without_a_tty_is_one_plain_line_per_logged_step(tmp_path):
    run = tiny_run(write_jsonl(tmp_path / "d.jsonl", sample_rows(3)))
    stream = io.StringIO()  # not a TTY, as in a Slurm log file
    log = MetricsLog(run, tmp_path, tmp_path / "m.jsonl", total_steps=10, start_step=4, stream=stream)
    for step in (5, 6):
        log.log(record(step))
    log.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert re.fullmatch(r"step 5/10 loss 0\.4000 lr 0\.001 tokens/s 1234 eta \d+:\d\d:\d\d", lines[0])
    assert [json.loads(l)["step"] for l in (tmp_path / "m.jsonl").read_text().splitlines()] == [5, 6]


def test_format_eta():
    assert format_eta(3725.4) == "1:02:05" and format_eta(-3) == "0:00:00"


def test_wandb_offline_run_holds_the_metrics_and_no_secret(tmp_path, monkeypatch):
    secret = "tunedag-test-secret-0123456789abcdef0123"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = dataclasses.replace(tiny_run(write_jsonl(tmp_path / "d.jsonl", sample_rows(3))),
                              wandb_project="tunedag-tests", wandb_tags=["ci"])
    log = MetricsLog(run, tmp_path / "run", tmp_path / "m.jsonl", total_steps=3, start_step=0, stream=io.StringIO())
    for step in (1, 2, 3):
        log.log(record(step))
    log.close()
    (offline,) = (tmp_path / "run/wandb").glob("offline-run-*")
    history = b""
    for _ in range(60):  # wandb's writer process may still be flushing after finish() returns
        history = b"".join(p.read_bytes() for p in offline.glob("*.wandb"))
        if b"tokens_per_s" in history:
            break
        time.sleep(0.5)
    assert b"tokens_per_s" in history and b"1234.5" in history and b"tunedag-tests" in history
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
