# Stages export_gguf and export_vllm: files llama.cpp, Ollama and vLLM load (no GGUF for rl: reward or prm runs, no vLLM folder for prm runs: common.smk).
from tunedag.export.preflight import base_model_config, check_exports, quantizer_installed
from tunedag.model_facts import GGUF_TYPES

# What the exports would refuse after training is refused now, for every base model whose config.json
# is readable (built-in, local, a hub model downloaded already; the stage checks the others when it
# starts). llama-cpp-python is looked for here unless the jobs run in their own conda environment.
try:
    for _name, _run in CFG.runs.items():
        _folder = model_dir(_run.base_model, _run.base_model_revision)
        check_exports(_run, base_model_config(_run, _folder), f"runs.{_name}", f"{_folder}/config.json",
                      DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method or quantizer_installed())
except ConfigError as err:
    sys.exit(f"tunedag: config error: {err}")


def export_settings(wildcards):
    """What the exports read from the run besides the merged model: a change makes them again."""
    run = run_config(wildcards)
    return [run.chat_template, run.chat_template_jinja, run.eval_temperature, run.eval_top_p]


rule export_gguf:
    input:
        merged="{run_dir}/merged",
        shards=lambda w: f"data/packed/{run_of(w)}",
    output:
        gguf="{run_dir}/export/{name}-{gguf_type}.gguf",
        metrics="{run_dir}/export/{name}-{gguf_type}.json",
        modelfile="{run_dir}/export/{name}-{gguf_type}.Modelfile",
    wildcard_constraints:
        name=_alternation(gguf_runs()) or "(?!)",  # no rule makes a reward model's GGUF
        gguf_type=_alternation(GGUF_TYPES),
    params:
        run=run_of,
        settings=export_settings,
    resources:
        **stage_resources("export_gguf"),
    log:
        "{run_dir}/logs/export_gguf-{name}-{gguf_type}.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/export_gguf.py --config {EFFECTIVE_CONFIG:q} --run {params.run:q} "
        "--merged {input.merged:q} --shards {input.shards:q} --type {wildcards.gguf_type:q} --out {output.gguf:q} "
        "--metrics {output.metrics:q} --modelfile {output.modelfile:q} 2> {log:q}"


rule export_vllm:
    input:
        merged="{run_dir}/merged",
        adapter="{run_dir}/adapter",
    output:
        directory("{run_dir}/export/vllm"),
    params:
        run=run_of,
        settings=export_settings,
    resources:
        **stage_resources("export_vllm"),
    log:
        "{run_dir}/logs/export_vllm.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/export_vllm.py --config {EFFECTIVE_CONFIG:q} --run {params.run:q} "
        "--merged {input.merged:q} --adapter {input.adapter:q} --out {output:q} 2> {log:q}"
