"""Stage report: figures and tables for `snakemake --report report.html`.

    report.py run     --run NAME --run-dir DIR --shards DIR --out DIR [--exports DIR]   (one run)
    report.py compare --run-dirs NAME=DIR ... --out DIR                 (all runs side by side)
"""
import argparse
import dataclasses
import json
from pathlib import Path

from tunedag import report
from tunedag.cli import stage_main
from tunedag.config import load_run


def run_report(args) -> None:
    _, run = load_run(args.config, args.run)
    metrics = report.read_jsonl(args.run_dir / "train_metrics.jsonl")
    evaluation = json.loads((args.run_dir / "eval/metrics.json").read_text())
    samples = report.read_jsonl(args.run_dir / "eval/samples.jsonl")
    manifest = json.loads((args.shards / "manifest.json").read_text())
    train_info = json.loads((args.run_dir / "train_info.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    report.plot_training_curves(metrics, evaluation, args.out / "training_curves.png")
    report.plot_throughput(metrics, args.out / "throughput.png")
    # the export stage's {run}-{type}.json of each GGUF file (the DAG makes them first; a reward model has none)
    found = [args.exports / f"{args.run}-{t}.json" for t in run.gguf_types] if args.exports else []
    gguf_exports = [json.loads(path.read_text()) for path in found if path.is_file()]
    report.run_summary_html(args.run, evaluation, samples, manifest, train_info,
                            dataclasses.asdict(run), args.out / "summary.html", gguf_exports)


def compare_report(args) -> None:
    runs = dict(item.split("=", 1) for item in args.run_dirs)
    args.out.mkdir(parents=True, exist_ok=True)
    report.compare_runs_html(
        {name: {"train_info": json.loads((Path(d) / "train_info.json").read_text()),
                "evaluation": json.loads((Path(d) / "eval/metrics.json").read_text())}
         for name, d in runs.items()}, args.out / "runs_compared.html")
    report.plot_compared_losses({name: report.read_jsonl(Path(d) / "train_metrics.jsonl")
                                 for name, d in runs.items()}, args.out / "train_loss_by_run.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("run")
    one.add_argument("--run", required=True)
    one.add_argument("--run-dir", type=Path, required=True)
    one.add_argument("--shards", type=Path, required=True)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--exports", type=Path, help="the run's export folder: its GGUF files' perplexities")
    many = sub.add_parser("compare")
    many.add_argument("--run-dirs", nargs="+", required=True, help="NAME=DIR pairs")
    many.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    (run_report if args.what == "run" else compare_report)(args)


if __name__ == "__main__":
    stage_main("report", main)
