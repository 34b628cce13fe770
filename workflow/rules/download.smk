# Stage download (login node: compute nodes are often offline): datasets and base models.


localrules:
    download,
    download_model,


rule download:
    input:
        local_source,
    output:
        parquet="data/raw/{dataset}/data.parquet",
        source="data/raw/{dataset}/source.json",
    params:
        run=lambda w: DATASETS[w.dataset][0],
        source=lambda w: hash_json(DATASETS[w.dataset][1].download_identity()),  # a change downloads again
    log:
        "logs/download/{dataset}.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/download.py --config {EFFECTIVE_CONFIG:q} --run {params.run:q} "
        "--dataset {wildcards.dataset:q} --out data/raw/{wildcards.dataset:q} 2> {log:q}"


rule download_model:
    output:
        directory("models/{kind}/{model}"),
    wildcard_constraints:
        kind="builtin|hub",
    params:
        # models/hub/<org>--<name>[@<revision>]
        base_model=lambda w: f"builtin:{w.model}" if w.kind == "builtin" else w.model.partition("@")[0].replace("--", "/", 1),
        revision=lambda w: ["--revision", w.model.partition("@")[2]] if "@" in w.model else [],
    log:
        "logs/download_model/{kind}-{model}.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/download_model.py --base-model {params.base_model:q} {params.revision:q} "
        "--out {output:q} 2> {log:q}"
