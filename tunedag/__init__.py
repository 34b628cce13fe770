"""tunedag: fine-tune LLMs on Slurm/HPC clusters as a Snakemake DAG."""

__version__ = "0.1.0"
