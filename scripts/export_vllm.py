"""Stage export_vllm: merged model + adapter → {run_dir}/export/vllm/ (model/ and adapter/).

With --run, the model folder carries the chat template the run trained with."""
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.config import load_run
from tunedag.export.run_template import run_chat_template
from tunedag.export.vllm import export_vllm


def main() -> None:
    parser = stage_parser(__doc__, with_run=False)
    parser.add_argument("--run", help="run name: the chat template it trained with")
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run = load_run(args.config, args.run)[1] if args.run else None
    export_vllm(args.merged, args.adapter, args.out, run_chat_template(run, args.merged) if run else None)


if __name__ == "__main__":
    stage_main("export_vllm", main)
