"""How many of Axolotl's example configs tunedag takes as written, and why it refuses the others.

    python -P scripts/check_axolotl_examples.py ~/src/axolotl llama-3 mistral qwen2 qwen3 gemma2 gemma3 phi

Each YAML under the named folders of ``<axolotl>/examples`` becomes a run ``{axolotl: <file>}`` and is
validated as the Snakefile validates config.yaml, from a copy of the checkout (its deepspeed_configs/
included, as a user's work folder would hold them). Prints one line per refused file (its first
problem), then the count that validate.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tunedag.config import ConfigError, parse_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("axolotl", type=Path, help="an Axolotl checkout (with examples/)")
    parser.add_argument("folders", nargs="+", help="folders under examples/, e.g. llama-3 mistral")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="axolotl-examples-"))
    for part in ("examples", "deepspeed_configs"):
        if (args.axolotl / part).is_dir():
            shutil.copytree(args.axolotl / part, work / part)
    os.chdir(work)
    files = sorted(p for folder in args.folders for p in Path("examples", folder).rglob("*.y*ml"))
    if not files:
        sys.exit(f"no YAML files under {', '.join(args.folders)} in {args.axolotl / 'examples'}")
    taken = 0
    for path in files:
        try:
            parse_config({"runs": {"r": {"axolotl": str(path)}}}, source=str(path))
            taken += 1
        except ConfigError as err:
            print(f"refused {path}: {err.problems[0].split('runs.r', 1)[-1]} (+{len(err.problems) - 1} more)")
    print(f"{taken} of {len(files)} validate as written ({taken / len(files):.0%})")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
