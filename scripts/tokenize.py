"""Stage tokenize: raw datasets → data/packed/{run}/ (train/, val/ Arrow shards, manifest.json)."""
import json
import logging
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.config import check_model_fits, load_run
from tunedag.data.tokenize import tokenize_run
from tunedag.model_facts import read_model_config
from tunedag.models.loading import load_run_tokenizer


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--raw", type=Path, nargs="+", required=True, help="data/raw/{dataset} folders, in config order")
    parser.add_argument("--model", type=Path, required=True, help="base model folder (for its tokenizer)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=1, help="worker processes (output is the same for any count)")
    args = parser.parse_args()
    _, run = load_run(args.config, args.run)
    # built-in and local models were checked with the config; a hub model is first read here
    model_config = read_model_config(args.model)
    if model_config is not None:
        check_model_fits(run, model_config, f"{args.config}: runs.{args.run}",
                         f"{args.model}/config.json, read by tokenize: a hub model is checked once downloaded")
    tokenizer = load_run_tokenizer(args.model, run)
    manifest = tokenize_run(run, args.raw, args.model, tokenizer, args.out, processes=args.processes)
    summary = {name: {k: split[k] for k in ("samples", "rows", "tokens", "packing_efficiency")}
               for name, split in manifest["splits"].items()}
    logging.info("wrote %s: %s; counts %s", args.out, json.dumps(summary), json.dumps(manifest["counts"]))


if __name__ == "__main__":
    stage_main("tokenize", main)
