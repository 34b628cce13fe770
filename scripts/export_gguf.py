"""Stage export_gguf: merged model → {run_dir}/export/{run}-{type}.gguf, with its Modelfile and metrics.

With --run, the file carries the chat template the run trained with, the Modelfile the run's
sampling settings, and the run is checked against what the export supports before anything is
written; with --shards, the file's perplexity on the held-out samples (and its 16-bit
reference's) goes to --metrics.
"""
import json
import logging
import os
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.config import load_run
from tunedag.data.shards import verify_shards
from tunedag.export.gguf import export_gguf
from tunedag.export.gguf_perplexity import held_out_samples
from tunedag.export.modelfile import modelfile_text
from tunedag.export.preflight import check_exports, quantizer_installed
from tunedag.export.run_template import eos_text, folder_chat_template, run_chat_template
from tunedag.io import atomic_path, write_json
from tunedag.model_facts import GGUF_TYPES, LLAMA_CPP_PACKAGE, read_model_config


def main() -> None:
    parser = stage_parser(__doc__, with_run=False)
    parser.add_argument("--run", help="run name: its chat template, sampling settings and export check")
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--type", required=True, help=", ".join(GGUF_TYPES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shards", type=Path, help="data/packed/{run}: held-out samples for the perplexity")
    parser.add_argument("--metrics", type=Path, help="JSON written beside the file: size and perplexity")
    parser.add_argument("--modelfile", type=Path, help="Ollama Modelfile written beside the file")
    args = parser.parse_args()
    run = load_run(args.config, args.run)[1] if args.run else None
    if run is not None:  # a hub model's config.json is first readable here
        check_exports(run, read_model_config(args.merged), f"{args.config}: runs.{args.run}",
                      f"{args.merged}/config.json", quantizer_installed())
    chat_template = run_chat_template(run, args.merged) if run else folder_chat_template(args.merged)
    samples, skipped = None, None
    if args.shards and not quantizer_installed():
        skipped = f"{LLAMA_CPP_PACKAGE} is not installed (pip install 'tunedag[export]')"
    elif args.shards:
        verify_shards(args.shards / "val", json.loads((args.shards / "manifest.json").read_text()))
        samples = held_out_samples(args.shards / "val")
    result = export_gguf(args.merged, args.out, args.type, chat_template, samples)
    if args.metrics:
        metrics = {"config_hash": run.stage_hash("export_gguf") if run else None, **result.metrics()}
        if skipped:
            metrics["perplexity_skipped"] = skipped
        write_json(args.metrics, metrics)
        logging.info("%s: %s", args.out.name, json.dumps({k: metrics[k] for k in ("bytes", "perplexity", "reference")}))
    if args.modelfile:
        sampling = {"temperature": run.eval_temperature, "top_p": run.eval_top_p} if run else None
        gguf_path = os.path.relpath(args.out, args.modelfile.parent)
        text, _ = modelfile_text(gguf_path, chat_template, eos_text(args.merged), sampling)
        with atomic_path(args.modelfile) as tmp:
            tmp.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    stage_main("export_gguf", main)
