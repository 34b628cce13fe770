# Stage evaluate: base vs fine-tuned on the held-out split.


rule evaluate:
    input:
        merged="{run_dir}/merged",
        model=base_model_dir,
        shards=lambda w: f"data/packed/{run_of(w)}",
    output:
        directory("{run_dir}/eval"),
    params:
        config_hash=stage_hash("evaluate"),
        run=run_of,
    threads: 2
    resources:
        **stage_resources("evaluate"),
    log:
        "{run_dir}/logs/evaluate.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/evaluate.py --config {EFFECTIVE_CONFIG:q} --run {params.run:q} "
        "--model {input.model:q} --merged {input.merged:q} --shards {input.shards:q} --out {output:q} 2> {log:q}"
