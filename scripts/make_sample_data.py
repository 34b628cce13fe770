"""Write the sample dataset shipped in the repo: data/sample/animals.jsonl (alpaca rows).

    python scripts/make_sample_data.py [--rows 3000] [--seed 0] [--out data/sample/animals.jsonl]
"""
import argparse
import json
from pathlib import Path

from tunedag.data.sample_task import animal_rows
from tunedag.io import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/sample/animals.jsonl"))
    args = parser.parse_args()
    with atomic_path(args.out) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in animal_rows(args.rows, args.seed)))
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
