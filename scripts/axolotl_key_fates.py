"""Write the key lists of README's "Coming from Axolotl" from tunedag.config.axolotl_keys.

    python -P scripts/axolotl_key_fates.py          # rewrites the marked blocks of README.md

The blocks between ``<!-- axolotl-keys -->`` and ``<!-- /axolotl-keys -->`` (top-level keys) and between
``<!-- axolotl-dataset-keys -->`` and ``<!-- /axolotl-dataset-keys -->`` are generated; the prose around them
is written by hand. Axolotl's key names come from tests/axolotl_configs/schema_keys.txt.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tunedag.config.axolotl_keys import DATASET_REFUSED, DATASET_TRANSLATED, IGNORED, REFUSED, TRANSLATED
from tunedag.config.fields import DatasetConfig, RunConfig

REPO = Path(__file__).resolve().parents[1]


def _keys(items) -> str:
    return ", ".join(f"`{k}`" for k in items)


def _groups(groups: dict[str, tuple[str, ...]]) -> list[str]:
    return [f"- {_keys(keys)}: {text}." for text, keys in groups.items()]


def _table(head: str, rows: dict[str, str]) -> list[str]:
    return [f"| {head} | in tunedag |", "| --- | --- |", *(f"| `{k}` | {v} |" for k, v in rows.items())]


def top_level(schema: list[str]) -> list[str]:
    same = sorted(k for k in schema if "." not in k and k in {f.name for f in dataclasses.fields(RunConfig)})
    return [f"**Same name, same meaning** (tunedag keys, see Config keys): {_keys(same)}.", "",
            "**Translated** into tunedag's keys:", "", *_table("Axolotl key", TRANSLATED), "",
            "**Accepted without effect**, with a note (a key set to null, false or empty gets none):", "",
            *_groups(IGNORED), "",
            "**Refused** when set to anything but null, false or empty, with what tunedag does instead:", "",
            *_groups(REFUSED)]


def dataset_level(schema: list[str]) -> list[str]:
    own = {f.name for f in dataclasses.fields(DatasetConfig)}
    same = sorted(k.split(".", 1)[1] for k in schema if k.startswith("datasets.") and k.split(".", 1)[1] in own)
    return [f"Same name, same meaning: {_keys(same)}.", "", *_table("Axolotl dataset key", DATASET_TRANSLATED),
            "", "Refused in a dataset entry:", "", *_groups(DATASET_REFUSED)]


def replace_block(text: str, marker: str, lines: list[str]) -> str:
    pattern = re.compile(rf"(<!-- {marker} -->\n).*?(\n<!-- /{marker} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {marker} --> block")
    return pattern.sub(lambda m: m.group(1) + "\n".join(lines) + m.group(2), text)


def main() -> None:
    schema = [l for l in (REPO / "tests/axolotl_configs/schema_keys.txt").read_text().splitlines()
              if l and not l.startswith("#")]
    readme = REPO / "README.md"
    text = replace_block(readme.read_text(), "axolotl-keys", top_level(schema))
    readme.write_text(replace_block(text, "axolotl-dataset-keys", dataset_level(schema)))


if __name__ == "__main__":
    main()
