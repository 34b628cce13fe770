"""sbatch's refusals, as one line naming the ``cluster.<stage>`` key to change.

sbatch refuses a job it can never run (a GPU request on a cluster without GPUs, a partition
that does not exist) at submission; submitit reports that as its own exception with sbatch's
stderr inside. :func:`sbatch_refusal` keeps sbatch's words and adds which key of config.yaml
asks for the resource.
"""
from __future__ import annotations

from tunedag.errors import TunedagError

# (words in sbatch's message, lower case, cluster key, what to do); the first match wins ("Invalid account
# or account/partition combination" is about the account).
REFUSALS: tuple[tuple[str, str, str], ...] = (
    ("generic resource", "gpus_per_node", "set it to 0 on a cluster without GPUs, or to what a node has"),
    ("gres", "gpus_per_node", "set it to 0 on a cluster without GPUs, or to what a node has"),
    ("account", "account", "name an account that `sacctmgr show assoc user=$USER` lists, or leave it out"),
    ("partition", "partition", "name a partition that `sinfo -s` lists, or leave it out"),
    ("qos", "qos", "name a QOS your account may use, or leave it out"),
    ("feature specification", "constraint", "name features that `sinfo -o %f` lists, or leave it out"),
    ("time limit", "time", "ask for no more than the partition's limit (`sinfo -o '%P %l'`)"),
    ("memory specification", "mem_gb", "ask for no more memory than a node has (`sinfo -o '%P %m'`)"),
    ("more processors requested", "cpus_per_task", "ask for no more CPUs than a node has"),
    ("node count", "nodes", "ask for no more nodes than the partition has"),
    ("node configuration is not available", "gpus_per_node, cpus_per_task, mem_gb or nodes",
     "no node has that much; lower one of them"),
)


class SbatchRefusedError(TunedagError):
    """sbatch refused a job at submission; the message names the config key to change."""


def sbatch_refusal(stderr: str, stage: str) -> SbatchRefusedError:
    """sbatch's stderr as one line naming ``cluster.<stage>``'s key at fault."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    said = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "no message")
    said = said.removeprefix("sbatch: error: ").removeprefix("sbatch: ")
    lowered = said.lower()
    for words, key, advice in REFUSALS:
        if words in lowered:
            keys = " or ".join(f"cluster.{stage}.{k}" for k in key.replace(" or ", ", ").split(", "))
            return SbatchRefusedError(f"sbatch refused the {stage} job: {said}; change {keys} in config.yaml "
                                      f"({advice})")
    return SbatchRefusedError(f"sbatch refused the {stage} job: {said}; check cluster.{stage} in config.yaml")
