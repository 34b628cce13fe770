"""Stage evaluate: base vs fine-tuned on held-out data → {run_dir}/eval (metrics.json, samples.jsonl)."""
import json
import logging
from pathlib import Path

from tunedag.cli import stage_main, stage_parser
from tunedag.config import load_run
from tunedag.evaluate.compare import evaluate_run


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _, run = load_run(args.config, args.run)
    metrics = evaluate_run(run, args.model, args.merged, args.shards, args.out)
    logging.info("base %s", json.dumps(metrics["base"]))
    logging.info("finetuned %s", json.dumps(metrics["finetuned"]))


if __name__ == "__main__":
    stage_main("evaluate", main)
