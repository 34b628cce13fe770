"""A live single-node Slurm cluster (slurmctld + slurmd + munge + slurmdbd/MariaDB) for the session.

Started with scripts/slurm-up.sh (it installs Debian's packages when missing) and stopped with
scripts/slurm-down.sh at the end, unless a cluster was already up before the session. Needs
root and apt-get; CI runs as root on a fresh Debian machine.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    return proc.returncode == 0 and "idle" in proc.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm cluster needs root")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no apt-get to install Slurm (and no slurmctld installed)")
    started_here = not _cluster_up()
    if started_here:
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(REPO / "scripts/slurm-up.sh")], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"slurm-up.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        print(f"slurm cluster up in {time.monotonic() - t0:.1f} s")
    yield
    if started_here:
        subprocess.run(["bash", str(REPO / "scripts/slurm-down.sh")], capture_output=True, timeout=180)


@pytest.fixture(scope="session")
def slurm_packed(sample_shards):
    """(folder holding packed/, source file) of the sample task, for the runs the tests submit."""
    src, packed = sample_shards
    return packed.parent, src


def write_config(path: Path, src: Path, runs: dict, **train_resources) -> Path:
    """config.yaml with ``runs`` (each over ``src``, tiny settings) and cluster.train resources."""
    base = {"base_model": "builtin:tiny-llama", "datasets": [{"path": str(src), "type": "alpaca"}],
            "sequence_len": 128, "micro_batch_size": 4, "seed": 1, "learning_rate": 5e-3,
            "lora_modules_to_save": ["lm_head"]}
    res = {"cpus_per_task": 1, "mem_gb": 2, "time": "00:10:00", "signal_delay_s": 30, **train_resources}
    raw = {"runs": {name: {**base, **over} for name, over in runs.items()}, "cluster": {"train": res}}
    path.write_text(yaml.safe_dump(raw))
    return path
