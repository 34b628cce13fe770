"""Stage download_model: make a base model available under models/ (login node)."""
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.models.loading import fetch_model


def main() -> None:
    parser = stage_parser(__doc__, with_run=False)
    parser.add_argument("--base-model", required=True, help="builtin:<name> or a hub id")
    parser.add_argument("--revision", default=None, help="hub revision (commit sha, tag or branch)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fetch_model(args.base_model, args.out, args.revision)


if __name__ == "__main__":
    stage_main("download_model", main)
