# Stages export_gguf and export_vllm: files llama.cpp and vLLM load (no GGUF for rl: reward runs).


rule export_gguf:
    input:
        "{run_dir}/merged",
    output:
        "{run_dir}/export/{name}-{gguf_type}.gguf",
    wildcard_constraints:
        name=_alternation(gguf_runs()) or "(?!)",  # no rule makes a reward model's GGUF
        gguf_type="f32|f16|bf16|q8_0|q4_k_m|q5_k_m|q6_k",
    resources:
        **stage_resources("export_gguf"),
    log:
        "{run_dir}/logs/export_gguf-{name}-{gguf_type}.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/export_gguf.py --merged {input:q} --type {wildcards.gguf_type:q} --out {output:q} "
        "2> {log:q}"


rule export_vllm:
    input:
        merged="{run_dir}/merged",
        adapter="{run_dir}/adapter",
    output:
        directory("{run_dir}/export/vllm"),
    resources:
        **stage_resources("export_vllm"),
    log:
        "{run_dir}/logs/export_vllm.log",
    conda:
        CONDA_ENV
    shell:
        "{PYTHON} {SCRIPTS:q}/export_vllm.py --merged {input.merged:q} --adapter {input.adapter:q} --out {output:q} "
        "2> {log:q}"
