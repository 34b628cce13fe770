# Stage train: packed shards + base model → adapter, metrics. Checkpoints under
# {run_dir}/checkpoints are not outputs on purpose: a rerun after a killed job resumes from them.


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
    shell:
        "{PYTHON} {SCRIPTS}/train.py --config {EFFECTIVE_CONFIG} --run {params.run} "
        "--shards {input.shards} --model {input.model} --run-dir {wildcards.run_dir} 2> {log}"
