# Stage tokenize: raw rows → packed Arrow shards + manifest.json.


def raw_dirs(wildcards):
    return [f"data/raw/{ds.dataset_name}" for ds in run_config(wildcards).datasets]


rule tokenize:
    input:
        raw=lambda w: [f"{d}/data.parquet" for d in raw_dirs(w)],
        model=base_model_dir,
    output:
        directory("data/packed/{run}"),
    params:
        config_hash=stage_hash("tokenize"),
        # a changed template or packer must never reuse stale shards
        code_hash=code_hash(),
        raw=raw_dirs,
    # one process per thread; the shards are the same for any count
    threads: CFG.cluster["tokenize"].cpus_per_task if "tokenize" in CFG.cluster else 2
    resources:
        **stage_resources("tokenize"),
    log:
        "logs/tokenize/{run}.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/tokenize.py --config {EFFECTIVE_CONFIG:q} --run {wildcards.run:q} "
        "--raw {params.raw:q} --model {input.model:q} --out {output:q} --processes {threads} 2> {log:q}"
