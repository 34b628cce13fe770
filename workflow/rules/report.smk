# Stage report: what `snakemake --report report.html` shows, per run and across runs.


rule report_run:
    input:
        metrics="{run_dir}/train_metrics.jsonl",
        info="{run_dir}/train_info.json",
        evaluation="{run_dir}/eval",
        shards=lambda w: f"data/packed/{run_of(w)}",
        gguf=lambda w: gguf_metrics(run_of(w)),
    output:
        curves=report("{run_dir}/report/training_curves.png", caption="../report/training_curves.rst",
                      category="Runs", subcategory="{run_dir}"),
        throughput=report("{run_dir}/report/throughput.png", caption="../report/throughput.rst",
                          category="Runs", subcategory="{run_dir}"),
        summary=report("{run_dir}/report/summary.html", caption="../report/summary.rst",
                       category="Runs", subcategory="{run_dir}"),
    params:
        run=run_of,
    log:
        "{run_dir}/logs/report.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/report.py --config {EFFECTIVE_CONFIG:q} run --run {params.run:q} "
        "--run-dir {wildcards.run_dir:q} --shards {input.shards:q} --out {wildcards.run_dir:q}/report "
        "--exports {wildcards.run_dir:q}/export 2> {log:q}"


rule report_compare:
    input:
        [f"{CFG.run_dir(name)}/{f}" for name in CFG.runs for f in ("train_metrics.jsonl", "train_info.json", "eval")],
    output:
        table=report("reports/runs_compared.html", caption="../report/runs_compared.rst", category="Comparison"),
        curves=report("reports/train_loss_by_run.png", caption="../report/train_loss_by_run.rst",
                      category="Comparison"),
    params:
        runs=[f"{name}={CFG.run_dir(name)}" for name in CFG.runs],
    log:
        "logs/report_compare.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/report.py compare --run-dirs {params.runs:q} --out reports 2> {log:q}"
