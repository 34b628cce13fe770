"""Several training ranks on the CPU, started by torchrun: the code path of a Slurm job's tasks."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml


def write_runs(path: Path, src: Path, runs: dict[str, dict]) -> Path:
    """config.yaml with ``runs``, each over the alpaca file ``src`` with the tiny model's settings."""
    base = {"base_model": "builtin:tiny-llama", "datasets": [{"path": str(src), "type": "alpaca"}],
            "sequence_len": 128, "micro_batch_size": 4, "seed": 1, "learning_rate": 5e-3,
            "lora_modules_to_save": ["lm_head"]}
    path.write_text(yaml.safe_dump({"runs": {name: {**base, **over} for name, over in runs.items()}}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(config: Path, run: str, shards: Path, model: Path, run_dir: Path, ranks: int = 2,
                   timeout: float = 600) -> str:
    """Train ``run`` on ``ranks`` gloo processes (torchrun sets OMP_NUM_THREADS=1 each); return the log."""
    code = "import sys; from tunedag.slurm.job import TrainJob; TrainJob(*sys.argv[1:])()"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), "--no-python", sys.executable, "-c", code,
           str(config), run, str(shards), str(model), str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log
