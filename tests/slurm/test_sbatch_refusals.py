"""sbatch refusing the train job at submission: one line naming the cluster.train key to change.

A stand-in ``sbatch`` on PATH answers as Slurm does on a cluster that cannot run the request;
no Slurm cluster is needed.
"""
import os
import stat

import pytest

from tunedag.config import ClusterResources
from tunedag.slurm.job import TrainJob
from tunedag.slurm.launcher import submit
from tunedag.slurm.sbatch_errors import SbatchRefusedError, sbatch_refusal

REFUSALS = [
    ("sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification",
     "change cluster.train.gpus_per_node in config.yaml (set it to 0 on a cluster without GPUs"),
    ("sbatch: error: Batch job submission failed: Invalid partition name specified", "cluster.train.partition"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "change cluster.train.account in config.yaml"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification", "cluster.train.qos"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     "cluster.train.time"),
    ("sbatch: error: Memory specification can not be satisfied", "cluster.train.mem_gb"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "cluster.train.gpus_per_node or cluster.train.cpus_per_task or cluster.train.mem_gb or cluster.train.nodes"),
    ("sbatch: error: something new", "sbatch refused the train job: something new; check cluster.train"),
]


@pytest.mark.parametrize("stderr, fragment", REFUSALS)
def test_each_refusal_names_the_key(stderr, fragment):
    message = str(sbatch_refusal(stderr, "train"))
    assert fragment in message and "\n" not in message


def test_a_refused_submission_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin/sbatch"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid generic resource "
                    "(gres) specification' >&2\nexit 1\n")
    (tmp_path / "bin/srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun before it submits
    for tool in (fake, tmp_path / "bin/srun"):
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    job = TrainJob("config.yaml", "demo", "data/packed/demo", "models/builtin/tiny-llama", "runs/demo")
    with pytest.raises(SbatchRefusedError) as err:
        submit(job, ClusterResources(gpus_per_node=1), tmp_path / "slurm", "tunedag-train-demo")
    assert str(err.value) == (
        "sbatch refused the train job: Batch job submission failed: Invalid generic resource (gres) specification; "
        "change cluster.train.gpus_per_node in config.yaml (set it to 0 on a cluster without GPUs, or to what a "
        "node has)")
    assert "sbatch: error" not in capsys.readouterr().err  # said once, in the error
