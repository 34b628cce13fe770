"""Stage merge: base model + the train stage's output → {run_dir}/merged (HF safetensors folder).

A LoRA adapter is folded into the base; a full fine-tune (adapter: null) is written out in the
same form (tunedag.merge.full)."""
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.config import load_run
from tunedag.merge.adapter import merge_adapter
from tunedag.merge.full import merge_full_model


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--adapter", type=Path, required=True,
                        help="the train stage's output: the adapter, or with adapter: null the trained model")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _, run = load_run(args.config, args.run)
    merge = merge_full_model if run.adapter is None else merge_adapter
    merge(run, args.model, args.adapter, args.out)


if __name__ == "__main__":
    stage_main("merge", main)
