# Stage train: packed shards + base model → adapter, metrics. Checkpoints under
# {run_dir}/checkpoints are not outputs on purpose: a rerun after a killed job resumes from them.
# The shards input is the whole packed folder: train/ trains, and val/ gives the held-out loss
# during training (eval_steps / evals_per_epoch, early_stopping_patience).
#
# Under the slurm executor (profiles/slurm) train is a local rule: it runs on the login node and
# submits ONE Slurm job itself through submitit (nodes x tasks-per-node ranks, cluster.train's
# resources), streams its log into the rule's log and waits. Elsewhere it trains in-process.


localrules:
    train,


class _Launcher:
    """'slurm' when Snakemake runs the slurm executor, else 'local' (read when the job runs)."""

    def __str__(self):
        plugin = workflow.executor_plugin
        return "slurm" if plugin is not None and plugin.name.endswith("slurm") else "local"


LAUNCHER = _Launcher()


rule train:
    input:
        shards=lambda w: f"data/packed/{run_of(w)}",
        model=base_model_dir,
    output:
        adapter=directory("{run_dir}/adapter"),
        metrics="{run_dir}/train_metrics.jsonl",
        info="{run_dir}/train_info.json",
    params:
        config_hash=stage_hash("train"),
        run=run_of,
    threads: 2
    resources:
        **stage_resources("train"),
    log:
        "{run_dir}/logs/train.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/train.py --config {EFFECTIVE_CONFIG:q} --run {params.run:q} "
        "--shards {input.shards:q} --model {input.model:q} --run-dir {wildcards.run_dir:q} "
        "--launcher {LAUNCHER} 2> {log:q}"
