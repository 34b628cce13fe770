"""Training as a real Slurm job: the DAG on profiles/slurm, 2 ranks over gloo, requeue and resume, failures.

Every wait is bounded; a cluster without accounting would make submitit and the Snakemake plugin
hang, which slurm-up.sh avoids by running slurmdbd.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunedag.config import load_run
from tunedag.slurm.job import TrainJob
from tunedag.slurm.launcher import SlurmJobError, make_executor, sbatch_script, submit, wait
from tunedag.train.loop import train
from tests.helpers import sample_rows, write_jsonl
from tests.slurm.conftest import REPO, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _until(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _job(config: Path, run: str, packed: Path, model: Path, run_dir: Path) -> TrainJob:
    return TrainJob(str(config), run, str(packed / "packed"), str(model), str(run_dir))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "train_metrics.jsonl").read_text().splitlines()]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_two_rank_fsdp_job_matches_the_single_process_loss(slurm_packed, tiny_model_dir, tmp_path):
    """2 tasks x micro-batch 4 over gloo = 1 process x micro-batch 8: same rows per step, same token mean."""
    root, src = slurm_packed
    config = write_config(tmp_path / "config.yaml", src,
                          {"fsdp": {"train_engine": "fsdp", "max_steps": 4, "micro_batch_size": 4},
                           "single": {"max_steps": 4, "micro_batch_size": 8}}, tasks_per_node=2)
    _, res = load_run(config, "fsdp")
    from tunedag.config import load_config
    cluster = load_config(config).cluster["train"]
    script = sbatch_script(make_executor(cluster, tmp_path / "slurm", "t"))
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --requeue" in script
    job = submit(_job(config, "fsdp", root, tiny_model_dir, tmp_path / "fsdp"), cluster, tmp_path / "slurm", "fsdp")
    info = wait(job, poll_s=1, max_wait_s=240)
    assert info["world_size"] == 2 and info["engine"] == "fsdp" and info["steps"] == 4
    train(load_run(config, "single")[1], root / "packed", tiny_model_dir, tmp_path / "single")
    # fp32 sums in another order (two ranks, then an all-reduce): a few ulps of a loss near 5
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    a, b = _adapter(tmp_path / "fsdp"), _adapter(tmp_path / "single")
    assert a.keys() == b.keys()
    # Adam's g/sqrt(v) turns summation-order rounding of near-zero gradients into up to a whole
    # lr-sized (5e-3) step per element; seen: 1.03e-4 after 4 steps. A wrong row split or
    # gradient scale already fails the loss check above from step 2 on.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-4)


def _state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
    return out.stdout.strip()


def test_requeue_on_the_timeout_signal_and_scancel_then_rerun_resume_to_the_same_weights(
        slurm_packed, tiny_model_dir, tmp_path):
    root, src = slurm_packed
    config = write_config(tmp_path / "config.yaml", src,
                          {"r": {"max_steps": 60, "save_steps": 5, "keep_last_checkpoints": 3}})
    _, run = load_run(config, "r")
    from tunedag.config import load_config
    cluster = load_config(config).cluster["train"]
    run_dir, ckpts = tmp_path / "r", tmp_path / "r" / "checkpoints"
    job = submit(_job(config, "r", root, tiny_model_dir, run_dir), cluster, tmp_path / "slurm", "r")

    # 1. the pre-timeout signal (what Slurm sends signal_delay_s before the limit): checkpoint, requeue
    _until(lambda: (ckpts / "step-5").is_dir(), 180, "the first checkpoint")
    job._interrupt(timeout=True)
    _until(lambda: _state(job.job_id) == "PENDING", 60, "the job to be requeued")
    stop_step = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert 5 <= stop_step < 60
    # the requeue holds the job for cred_expire + 1 s; release it now
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True, timeout=20)
    log = Path(job.paths.stderr)
    _until(lambda: log.is_file() and f"resuming from {ckpts / f'step-{stop_step}'}" in log.read_text(),
           180, "the requeued job to resume")

    # 2. scancel mid-run (at once: the remaining steps take seconds): the job fails with its
    #    state and log path, and a new submission resumes from the newest checkpoint
    subprocess.run(["scancel", job.job_id], check=True, timeout=20)
    with pytest.raises(SlurmJobError) as err:
        wait(job, poll_s=1, max_wait_s=120, stream=None)
    assert err.value.state.startswith("CANCELLED") and err.value.job_id == job.job_id
    assert str(job.paths.stderr) in str(err.value)
    assert not (run_dir / "adapter").exists()
    # SIGTERM stops the loop at a step boundary with a checkpoint; the rerun starts once it is gone
    _until(lambda: _state(job.job_id) == "", 90, "the cancelled job's processes to end")
    last = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))

    again = submit(_job(config, "r", root, tiny_model_dir, run_dir), cluster, tmp_path / "slurm", "r")
    info = wait(again, poll_s=1, max_wait_s=240)
    assert info["steps"] == 60 and info["resumed_from"].endswith(f"step-{last}")
    steps = [json.loads(l)["step"] for l in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))

    train(run, root / "packed", tiny_model_dir, tmp_path / "straight")
    a, b = _adapter(tmp_path / "straight"), _adapter(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_failing_job_names_its_slurm_state_and_log(slurm_packed, tiny_model_dir, tmp_path):
    root, src = slurm_packed
    config = write_config(tmp_path / "config.yaml", src, {"r": {"max_steps": 2}})
    from tunedag.config import load_config
    cluster = load_config(config).cluster["train"]
    broken = TrainJob(str(config), "r", str(tmp_path / "no-shards"), str(tiny_model_dir), str(tmp_path / "r"))
    job = submit(broken, cluster, tmp_path / "slurm", "broken")
    with pytest.raises(SlurmJobError) as err:
        wait(job, poll_s=1, max_wait_s=180, stream=None)
    message = str(err.value)
    assert err.value.state == "FAILED" and f"Slurm job {job.job_id} ended in state FAILED" in message
    assert str(job.paths.stderr) in message and Path(job.paths.stderr).is_file()
    assert "manifest.json" in message  # the cause, from the log


SNAKEMAKE_OVERRIDES = ["--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--jobs", "2",
                       "--default-resources", "runtime=10", "mem_mb=1500", "cpus_per_task=1"]


def test_snakemake_slurm_profile_runs_the_dag_with_training_as_a_slurm_job(tmp_path):
    work = tmp_path / "dag"
    write_jsonl(work / "data/animals.jsonl", sample_rows(400, seed=5))
    small = {"cpus_per_task": 1, "mem_gb": 1.5, "time": "00:10:00"}
    config = {
        "defaults": {"sequence_len": 128, "micro_batch_size": 8, "learning_rate": 5e-3, "seed": 3},
        "runs": {"tiny": {"base_model": "builtin:tiny-llama",
                          "datasets": [{"path": "data/animals.jsonl", "type": "alpaca"}],
                          "max_steps": 6, "save_steps": 3, "val_set_size": 16, "eval_max_samples": 8,
                          "eval_max_new_tokens": 4, "gguf_types": ["f32"]}},
        "cluster": {stage: small for stage in ("tokenize", "train", "merge", "evaluate", "export_gguf",
                                                 "export_vllm")},
    }
    import yaml
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--profile", str(REPO / "profiles/slurm"),
           *SNAKEMAKE_OVERRIDES]
    # 9 Slurm jobs, each starting Python + Snakemake: ~7 min on 2 busy cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    run = work / "runs/tiny"
    assert (run / "adapter/adapter_model.safetensors").is_file() and (run / "eval/metrics.json").is_file()
    assert (run / "export/tiny-f32.gguf").is_file()
    train_log = (run / "logs/train.log").read_text()
    assert "submitted Slurm job" in train_log and "--launcher slurm" in out
    info = json.loads((run / "train_info.json").read_text())
    assert info["steps"] == 6
    # the other stages ran as Slurm jobs submitted by the plugin (named by its run id)
    import re
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    jobs = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-1days", "--name", run_id, "-o", "State"],
                          capture_output=True, text=True, timeout=30).stdout.split()
    assert len(jobs) >= 4 and set(jobs) == {"COMPLETED"}, jobs
