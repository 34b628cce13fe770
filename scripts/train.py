"""Stage train: packed shards + base model → {run_dir}/adapter, train_metrics.jsonl, train_info.json."""
from pathlib import Path

from tunedag.cli import load_run, stage_main, stage_parser
from tunedag.train.loop import train


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--shards", type=Path, required=True, help="data/packed/{run}")
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    _, run = load_run(args.config, args.run)
    train(run, args.shards, args.model, args.run_dir)


if __name__ == "__main__":
    stage_main("train", main)
