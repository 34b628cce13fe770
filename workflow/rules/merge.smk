# Stage merge: the train stage's output → a plain HF safetensors folder. A LoRA adapter is folded
# into the base; a full fine-tune (adapter: null, whose {run_dir}/adapter holds the trained model)
# is cast to merge_dtype and re-sharded. Evaluate and the exports read merged/ alike either way.


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
