"""What every stage script shares: argument parsing, logging, and errors a user can act on.

A stage script is a thin ``main()``; ``stage_main`` turns tunedag's own error types (bad
config, bad data, a missing file) into one line naming the problem and exit code 1, so
Snakemake's log shows the cause rather than a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from tunedag.errors import TunedagError

USER_ERRORS = (TunedagError, FileNotFoundError)


def stage_parser(description: str, with_run: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="config.yaml", help="the tunedag config file")
    if with_run:
        parser.add_argument("--run", required=True, help="run name (a key under runs:)")
    return parser


def stage_main(stage: str, body: Callable[[], object]) -> None:
    """Run ``body`` with logging set up; on a user error print one clear line and exit 1."""
    logging.basicConfig(level=os.environ.get("TUNEDAG_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {stage} %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        body()
    except USER_ERRORS as err:
        print(f"tunedag {stage}: error: {err}", file=sys.stderr)
        sys.exit(1)
