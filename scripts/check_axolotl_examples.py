"""How many of Axolotl's example configs tunedag takes as written, and why it refuses the others.

    python -P scripts/check_axolotl_examples.py ~/src/axolotl llama-3 mistral qwen2 qwen3 gemma2 gemma3 phi [--plan]

Each YAML under the named folders of ``<axolotl>/examples`` becomes a run ``{axolotl: <file>}`` and is
validated as the Snakefile validates config.yaml, from a copy of the checkout (its deepspeed_configs/
included, as a user's work folder would hold them). Prints one line per refused file (its first
problem), then the count that validate. ``--plan`` then puts every validated config in one config.yaml
(each with its own output_dir: the examples share ./outputs/lora-out) and has ``snakemake -n`` plan the DAG.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tunedag.config import ConfigError, parse_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("axolotl", type=Path, help="an Axolotl checkout (with examples/)")
    parser.add_argument("folders", nargs="+", help="folders under examples/, e.g. llama-3 mistral")
    parser.add_argument("--plan", action="store_true", help="snakemake -n the validated configs in one DAG")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="axolotl-examples-"))
    for part in ("examples", "deepspeed_configs"):
        if (args.axolotl / part).is_dir():
            shutil.copytree(args.axolotl / part, work / part)
    os.chdir(work)
    files = sorted(p for folder in args.folders for p in Path("examples", folder).rglob("*.y*ml"))
    if not files:
        sys.exit(f"no YAML files under {', '.join(args.folders)} in {args.axolotl / 'examples'}")
    taken: dict[str, dict[str, str]] = {}
    for path in files:
        name = "_".join(path.with_suffix("").parts[1:]).replace(".", "_")
        try:
            parse_config({"runs": {"r": {"axolotl": str(path)}}}, source=str(path))
            taken[name] = {"axolotl": str(path), "output_dir": f"outputs/{name}"}
        except ConfigError as err:
            print(f"refused {path}: {err.problems[0].split('runs.r', 1)[-1]} (+{len(err.problems) - 1} more)")
    print(f"{len(taken)} of {len(files)} validate as written ({len(taken) / len(files):.0%})")
    if args.plan:
        plan(taken, work)
    shutil.rmtree(work)


def plan(runs: dict[str, dict[str, str]], work: Path) -> None:
    """``snakemake -n`` over one config.yaml holding ``runs``: the jobs it would run, or its error."""
    Path("config.yaml").write_text(yaml.safe_dump({"runs": runs}))
    snakefile = Path(__file__).resolve().parents[1] / "Snakefile"
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--configfile", "config.yaml",
                             "-n", "--cores", "1", "--quiet", "rules"], capture_output=True, text=True, cwd=work)
    if result.returncode != 0:
        sys.exit(f"snakemake -n failed:\n{result.stderr[-4000:]}")
    jobs = [line.split() for line in result.stdout.splitlines() if line.strip()]
    total = next((int(j[1]) for j in jobs if j and j[0] == "total" and len(j) > 1 and j[1].isdigit()), None)
    print(f"snakemake -n plans the {len(runs)} runs in one DAG: {total} jobs")


if __name__ == "__main__":
    main()
