# tunedag: fine-tune LLMs as a Snakemake DAG.
#
#   snakemake --profile profiles/local          # everything on this machine
#   snakemake --profile profiles/slurm          # on a cluster's login node
#
# download ─► tokenize ─► train ─► merge ─► evaluate ─► export_gguf / export_vllm
# One chain per run in config.yaml; see README.md for the stages and their outputs.
from snakemake.utils import min_version

min_version("8.0")


# `--configfile my.yaml` replaces config.yaml rather than merging into it: the repository's demo run,
# defaults and cluster settings stay out of the user's runs.
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
