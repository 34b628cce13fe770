"""The leading rows of a hub dataset, streamed: ``max_rows`` and ``max_words`` on an ``hf:`` source.

A pretraining corpus (Axolotl's ``pretraining_dataset``: C4, FineWeb) is far larger than a run
reads, so Axolotl streams it and stops after ``max_steps``. tunedag's download stage does the same
ahead of time: it streams the split (``datasets.load_dataset(..., streaming=True)``) and writes only
its first rows to data.parquet, stopping at ``max_rows`` rows or once the rows' text holds
``max_words`` whitespace-separated words, whichever comes first; the rest is never fetched.

Why words: the bound must hold enough tokens, and the download stage has no tokenizer. A tokenizer
that splits text at whitespace before encoding it (byte-level BPE as in Llama 3, Qwen and GPT-2,
SentencePiece's default) gives every word at least one token, so rows holding W words hold at least
W tokens, and about 1.3 W for English text. Rows are kept in the source's order; a row whose text
field is missing or not a string stops the stage, naming the row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from tunedag.errors import TunedagError
from tunedag.io import atomic_path

BATCH_ROWS = 10_000


class StreamError(TunedagError, ValueError):
    """A streamed source whose rows cannot be kept: names the source and the row."""


def words(text: str) -> int:
    """Whitespace-separated words: a lower bound on a whitespace-splitting tokenizer's token count."""
    return len(text.split())


def write_prefix(rows: Iterable[dict[str, Any]], dest: Path, source: str, max_rows: int | None,
                 max_words: int | None, text_field: str = "text",
                 schema: pa.Schema | None = None) -> dict[str, Any]:
    """Write the leading rows of ``rows`` to Parquet at ``dest`` (atomically) and return what was kept:
    ``rows``, ``words`` (of ``text_field``, when ``max_words`` is set) and ``exhausted`` (the source
    ended before a bound was reached). ``rows`` is read lazily: no row after the last kept is pulled."""
    if max_rows is None and max_words is None:
        raise ValueError("write_prefix needs max_rows or max_words")
    kept, counted, batch, exhausted = 0, 0, [], True
    with atomic_path(dest) as tmp:
        writer = None
        try:
            for row in rows:
                kept += 1
                if max_words is not None:
                    text = row.get(text_field)
                    if not isinstance(text, str):
                        found = "no such field" if text_field not in row else f"a {type(text).__name__}"
                        raise StreamError(f"{source}: row {kept}: field {text_field!r} holds the text to count "
                                          f"words of, but it is {found} (fields: {', '.join(row)}); set field: "
                                          "to the column that holds the text")
                    counted += words(text)
                batch.append(row)
                if len(batch) == BATCH_ROWS:
                    writer = _write(writer, tmp, batch, schema, source, kept)
                    batch = []
                if kept == max_rows or (max_words is not None and counted >= max_words):
                    exhausted = False
                    break
            if batch:
                writer = _write(writer, tmp, batch, schema, source, kept)
            if writer is None:
                raise StreamError(f"{source}: no rows")
        finally:
            if writer is not None:
                writer.close()
    record: dict[str, Any] = {"rows": kept, "exhausted": exhausted}
    if max_words is not None:
        record["words"] = counted
    return record


def _write(writer: pq.ParquetWriter | None, path: Path, batch: list[dict[str, Any]], schema: pa.Schema | None,
           source: str, last: int) -> pq.ParquetWriter:
    """Append ``batch`` (ending at row ``last``) to the Parquet file, opening it on the first batch."""
    if writer is not None:
        schema = writer.schema
    try:
        table = pa.Table.from_pylist(batch, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise StreamError(f"{source}: rows {last - len(batch) + 1}-{last} do not fit the columns of the rows "
                          f"before them: {err}") from err
    if writer is None:
        writer = pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
    return writer


def stream_hub(repo: str, config_name: str | None, split: str, revision: str | None, dest: Path, source: str,
               max_rows: int | None, max_words: int | None, text_field: str) -> dict[str, Any]:
    """Stream ``repo`` (a hub id, or a local folder as ``datasets`` reads one) and keep its leading rows."""
    import datasets

    try:
        stream = datasets.load_dataset(repo, config_name, split=split, revision=revision, streaming=True)
    except Exception as err:  # the hub raises many types; name the source either way
        raise StreamError(f"{source}: could not stream from the Hugging Face hub: {err}") from err
    features = getattr(stream, "features", None)
    schema = features.arrow_schema if features is not None else None
    return write_prefix(stream, dest, source, max_rows, max_words, text_field, schema)
