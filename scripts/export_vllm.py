"""Stage export_vllm: merged model + adapter → {run_dir}/export/vllm/ (model/ and adapter/)."""
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.export.vllm import export_vllm


def main() -> None:
    parser = stage_parser(__doc__, with_run=False)
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    export_vllm(args.merged, args.adapter, args.out)


if __name__ == "__main__":
    stage_main("export_vllm", main)
