"""Stage train: packed shards + base model → {run_dir}/adapter (the PEFT adapter, or with adapter: null the
whole trained model as an HF folder), train_metrics.jsonl, train_info.json.

--launcher local (profiles/local): train in this process.
--launcher slurm (profiles/slurm; the train rule picks it when Snakemake runs the slurm executor):
submit one Slurm job with cluster.train's resources through submitit, stream its log, wait;
--dry-run prints the sbatch script instead of submitting it.
"""
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.config import ClusterResources, load_run


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--shards", type=Path, required=True, help="data/packed/{run}")
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="train here, or in one Slurm job submitted with submitit")
    parser.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch script, submit nothing")
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="slurm: seconds between status checks")
    parser.add_argument("--max-wait-hours", type=float, default=None,
                        help="slurm: give up waiting (the job keeps running) after this long")
    args = parser.parse_args()
    config, run = load_run(args.config, args.run)
    if args.launcher == "local":  # one process, or each rank under torchrun
        from tunedag.train.loop import train
        from tunedag.train.ranks import DistEnv

        train(run, args.shards, args.model, args.run_dir, DistEnv.from_environment())
        return
    from tunedag.slurm.launcher import run_training_job

    resources = config.cluster.get("train") or ClusterResources()
    run_training_job(Path(args.config), args.run, args.shards, args.model, args.run_dir, resources,
                     dry_run=args.dry_run, poll_s=args.poll_seconds,
                     max_wait_s=args.max_wait_hours * 3600 if args.max_wait_hours else None)


if __name__ == "__main__":
    stage_main("train", main)
