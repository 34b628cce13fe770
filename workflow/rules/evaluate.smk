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
        "{PYTHON} {SCRIPTS}/evaluate.py --config {EFFECTIVE_CONFIG} --run {params.run} "
        "--model {input.model} --merged {input.merged} --shards {input.shards} --out {output} 2> {log}"
