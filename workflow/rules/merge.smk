# Stage merge: LoRA adapter folded into the base → a plain HF safetensors folder.


rule merge:
    input:
        adapter="{run_dir}/adapter",
        model=base_model_dir,
    output:
        directory("{run_dir}/merged"),
    params:
        config_hash=stage_hash("merge"),
        run=run_of,
    threads: 2
    resources:
        **stage_resources("merge"),
    log:
        "{run_dir}/logs/merge.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/merge.py --config {EFFECTIVE_CONFIG:q} --run {params.run:q} "
        "--model {input.model:q} --adapter {input.adapter:q} --out {output:q} 2> {log:q}"
