"""Slurm: the training job submitted by submitit (launcher) and what runs inside it (job)."""
