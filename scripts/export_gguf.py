"""Stage export_gguf: merged model → {run_dir}/export/{run}-{type}.gguf."""
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.export.gguf import export_gguf


def main() -> None:
    parser = stage_parser(__doc__, with_run=False)
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--type", required=True, help="f32, f16, bf16, q8_0, q4_k_m, q5_k_m or q6_k")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    export_gguf(args.merged, args.out, args.type)


if __name__ == "__main__":
    stage_main("export_gguf", main)
