"""Stage download: one dataset source → data/raw/{dataset}/ (data.parquet, source.json)."""
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.config import load_run
from tunedag.data.download import download_dataset


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="dataset name (data/raw/{dataset})")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _, run = load_run(args.config, args.run)
    spec = next(d for d in run.datasets if d.dataset_name == args.dataset)  # a repeated entry: the same source
    download_dataset(spec, args.out)


if __name__ == "__main__":
    stage_main("download", main)
