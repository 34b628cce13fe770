"""Stage merge: base model + LoRA adapter → {run_dir}/merged (HF safetensors folder)."""
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.config import load_run
from tunedag.merge.adapter import merge_adapter


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _, run = load_run(args.config, args.run)
    merge_adapter(run, args.model, args.adapter, args.out)


if __name__ == "__main__":
    stage_main("merge", main)
