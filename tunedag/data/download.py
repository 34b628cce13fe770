"""The download stage: bring one dataset source into ``data/raw/{dataset}/`` as Parquet.

Sources: a local file (.jsonl, .json, .csv, .parquet), an ``https://`` URL whose sha256 is
given in the config, or ``hf:org/name[:config][@split]`` through the ``datasets`` library (at
``revision:`` when the config pins one; only its first rows, streamed, with ``max_rows`` or
``max_words``: see tunedag.data.streaming).
Runs on the login node (compute nodes are often offline); writes ``data.parquet``,
``bad_rows.jsonl`` (rows set aside: invalid UTF-8, invalid JSON, not an object, a field whose
type disagrees with the other rows; the tokenize stage raises or skips them per ``on_bad_rows``)
and then ``source.json`` (where from, checksum, row count, how rows are numbered), each atomically.

Numbering, the same in every message of download and tokenize, always from 1: "line N" is the
Nth line of a line-oriented text file (JSONL, CSV: the header is line 1), "row N" the Nth record
of a JSON array, a Parquet file or a hub dataset. ``source.json`` keeps ``numbering`` and
``gaps`` (the 0-based positions absent from data.parquet: blank lines, the CSV header, rows set
aside) so that tokenize names a row by its place in the source. A CSV with a quoted field that
spans lines is numbered by row (its lines and rows differ). Invalid UTF-8 is reported with the
byte's offset in the file (as ``xxd -s OFFSET`` or ``tail -c +OFFSET+1`` take it).

Parquet has no "absent": a field missing from some JSON rows is stored as null. ``source.json``
lists such fields in ``absent_fields`` and the fields that are an explicit null somewhere in
``null_fields``, so that tokenize can say "missing field" or "is null" as the source had it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq

from tunedag.config import DatasetConfig, hash_json
from tunedag.data.streaming import stream_hub
from tunedag.errors import TunedagError
from tunedag.io import atomic_path, sha256_file, write_json

BATCH_ROWS = 10_000
BAD_ROWS_FILE = "bad_rows.jsonl"  # rows set aside: {row, where, field, error} per line
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataSourceError(TunedagError, ValueError):
    """A dataset source that cannot be read: names the file or URL, and the row where known."""


@dataclass
class Scan:
    """What the first pass learns of a source besides its rows (see the module docstring)."""

    numbering: str = "line"
    gaps: list[int] = field(default_factory=list)  # 0-based source positions absent from data.parquet
    rows: int = 0  # rows read as objects
    present: dict[str, int] = field(default_factory=dict)  # field → rows that have it (null or not)
    null: set[str] = field(default_factory=set)  # fields that are an explicit null in some row

    def seen(self, row: dict[str, Any]) -> None:
        self.rows += 1
        for key, value in row.items():
            self.present[key] = self.present.get(key, 0) + 1
            if value is None:
                self.null.add(key)


def _utf8_error(offset: int, raw: bytes, err: UnicodeDecodeError) -> str:
    """The error of a line starting at file offset ``offset`` that is not UTF-8."""
    return f"invalid UTF-8 at byte offset {offset + err.start} (0x{raw[err.start]:02x})"


def _json_rows(path: Path, bad: list[dict[str, Any]], scan: Scan) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(source position, where, row) triples; ``where`` is "line N" (JSONL) or "row N" (a JSON array).

    A line that is not UTF-8, not valid JSON or not an object is set aside in ``bad`` (the
    tokenize stage raises or skips it per ``on_bad_rows``); blank lines are gaps in the numbering.
    """
    if path.suffix == ".json":
        scan.numbering = "row"
        raw = path.read_bytes()
        try:
            rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise DataSourceError(f"{path}: line {line}: {_utf8_error(0, raw, err)}; a JSON array is read "
                                  f"whole, so fix the file (or write it as JSONL, where such a line is set aside)"
                                  ) from None
        except json.JSONDecodeError as err:
            raise DataSourceError(f"{path}: invalid JSON: {err}") from err
        if not isinstance(rows, list):
            raise DataSourceError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                bad.append({"row": i, "where": f"row {i + 1}", "field": None,
                            "error": f"expected an object, got {type(row).__name__}"})
                scan.gaps.append(i)
                continue
            scan.seen(row)
            yield i, f"row {i + 1}", row
        return
    offset = 0
    with open(path, "rb") as fh:
        for pos, raw in enumerate(fh):
            where, at = f"line {pos + 1}", offset
            offset += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad.append({"row": pos, "where": where, "field": None, "error": _utf8_error(at, raw, err)})
                scan.gaps.append(pos)
                continue
            if not line.strip():
                scan.gaps.append(pos)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append({"row": pos, "where": where, "field": None, "error": f"invalid JSON: {err.msg}"})
                scan.gaps.append(pos)
                continue
            if not isinstance(row, dict):
                bad.append({"row": pos, "where": where, "field": None,
                            "error": f"expected an object, got {type(row).__name__}"})
                scan.gaps.append(pos)
                continue
            scan.seen(row)
            yield pos, where, row


def _clean_csv(path: Path, bad: list[dict[str, Any]], scan: Scan, tmp_dir: Path) -> Path:
    """``path``, or a copy without its lines that are not UTF-8 (set aside in ``bad``).

    pyarrow would read such a line into a binary column without a word. Positions: line k is
    position k-1; the header and blank lines are gaps. When pyarrow's row count then disagrees
    with the lines (a quoted field spanning lines), rows are numbered instead (see convert_to_parquet).
    """
    offset, dropped = 0, False
    with open(path, "rb") as fh:
        for pos, raw in enumerate(fh):
            at = offset
            offset += len(raw)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if pos == 0:
                    raise DataSourceError(f"{path}: line 1 (the header): {_utf8_error(at, raw, err)}") from None
                bad.append({"row": pos, "where": f"line {pos + 1}", "field": None,
                            "error": _utf8_error(at, raw, err)})
                scan.gaps.append(pos)
                dropped = True
                continue
            if pos == 0 or not raw.strip(b"\r\n"):
                scan.gaps.append(pos)
    if not dropped:
        return path
    clean = tmp_dir / path.name
    bad_lines = {b["row"] for b in bad}
    with open(path, "rb") as src, open(clean, "wb") as out:
        out.writelines(raw for pos, raw in enumerate(src) if pos not in bad_lines)
    return clean


def _shape(value: Any) -> str:
    """A value's nested type, for telling which rows disagree with the rest."""
    if isinstance(value, list):
        return "list[" + ",".join(sorted({_shape(v) for v in value if v is not None})) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_shape(v)}" for k, v in sorted(value.items()) if v is not None) + "}"
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


Batch = tuple[pa.Table, list[tuple[int, str]] | None]  # a table and each row's (number, where) if known


def _rows_table(path: Path, batch: list[tuple[int, str, dict[str, Any]]], bad: list[dict[str, Any]]) -> Batch | None:
    """One Arrow table from JSON rows; rows whose field type disagrees with most rows go to ``bad``."""
    try:
        return pa.Table.from_pylist([row for _, _, row in batch]), [(n, where) for n, where, _ in batch]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        failure = err
    odd: dict[int, dict[str, Any]] = {}
    for key in dict.fromkeys(k for _, _, row in batch for k in row):
        groups: dict[str, list[int]] = {}
        for k, (_, _, row) in enumerate(batch):
            if row.get(key) is not None:
                groups.setdefault(_shape(row[key]), []).append(k)
        if len(groups) < 2:
            continue
        ranked = sorted(groups.values(), key=len, reverse=True)
        base = [batch[k][2][key] for k in ranked[0]]
        seen_type = type(base[0]).__name__
        for members in ranked[1:]:
            try:
                pa.array(base + [batch[k][2][key] for k in members])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                for k in members:
                    got = type(batch[k][2][key]).__name__
                    detail = (f"field {key!r} is {got}, other rows have {seen_type}" if got != seen_type
                              else f"field {key!r} has a different structure from other rows")
                    odd.setdefault(k, {"row": batch[k][0], "where": batch[k][1], "field": key, "error": detail})
    if not odd:
        raise DataSourceError(f"{path}: rows cannot be stored as a table: {failure}") from failure
    bad.extend(odd.values())
    rest = [item for k, item in enumerate(batch) if k not in odd]
    try:
        return (pa.Table.from_pylist([row for _, _, row in rest]), [(n, where) for n, where, _ in rest]) if rest else None
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataSourceError(f"{path}: rows cannot be stored as a table: {err}") from err


def _not_parquet(path: Path) -> DataSourceError:
    """What a file named .parquet that pyarrow cannot open seems to be instead."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    text = head.lstrip()
    if not head:
        what = "it is empty"
    elif head.startswith(b"PAR1"):
        what = "it starts as Parquet but has no footer: truncated?"
    elif text[:1] in (b"{", b"["):
        what = "it is JSON text: name it .jsonl or .json"
    elif b"," in text and text.isascii():
        what = "it looks like CSV text: name it .csv"
    else:
        what = f"no Parquet footer; it starts with {head[:8]!r}"
    return DataSourceError(f"{path}: not a Parquet file ({what})")


def _batches(path: Path, bad: list[dict[str, Any]], scan: Scan) -> Iterator[Batch]:
    """Stream a local file as Arrow tables of at most BATCH_ROWS rows (bad rows set aside)."""
    if path.suffix == ".parquet":
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError):
            raise _not_parquet(path) from None
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                yield pa.Table.from_batches([batch]), None
        except (pa.ArrowInvalid, OSError) as err:
            raise DataSourceError(f"{path}: unreadable Parquet (truncated or corrupt?): {err}") from None
    elif path.suffix == ".csv":
        try:
            for batch in pyarrow.csv.open_csv(path):
                yield pa.Table.from_batches([batch]), None
        except pa.ArrowInvalid as err:  # "CSV parse error: Expected 3 columns, got 2: …"
            raise DataSourceError(f"{path}: {err}") from None
    else:
        rows: list[tuple[int, str, dict[str, Any]]] = []
        for item in _json_rows(path, bad, scan):
            rows.append(item)
            if len(rows) == BATCH_ROWS:
                if (table := _rows_table(path, rows, bad)) is not None:
                    yield table
                rows = []
        if rows and (table := _rows_table(path, rows, bad)) is not None:
            yield table


def _settle_schema(schemas: list[tuple[pa.Schema, int]]) -> tuple[pa.Schema, dict[str, set[pa.DataType]]]:
    """One schema for all batches, and per field the types it refuses.

    Batches are typed one at a time, so a field can be a string in one and a number in another.
    Each field takes the type held by the most rows, widened by every type that promotes with it
    (int with float); the rows of a batch whose type does not promote are set aside as bad rows.
    """
    try:
        return pa.unify_schemas([s for s, _ in schemas], promote_options="permissive"), {}
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    fields, refused = [], {}
    for name in dict.fromkeys(n for s, _ in schemas for n in s.names):
        rows: dict[pa.DataType, int] = {}
        for s, n in schemas:
            if name in s.names and s.field(name).type != pa.null():
                rows[s.field(name).type] = rows.get(s.field(name).type, 0) + n
        kept = pa.schema([pa.field(name, pa.null())])
        for kind in sorted(rows, key=rows.get, reverse=True):
            try:
                kept = pa.unify_schemas([kept, pa.schema([pa.field(name, kind)])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                refused.setdefault(name, set()).add(kind)
        fields.append(kept.field(name))
    return pa.schema(fields), refused


def _set_aside(path: Path, batch: Batch, schema: pa.Schema, refused: dict[str, set[pa.DataType]],
               bad: list[dict[str, Any]]) -> pa.Table:
    """``batch`` without the rows whose field has a refused type (listed in ``bad``)."""
    table, where = batch
    for name, kinds in refused.items():
        if name not in table.column_names or table.schema.field(name).type not in kinds:
            continue
        if where is None:
            raise DataSourceError(f"{path}: field {name!r} is {table.schema.field(name).type} in some rows, "
                                  f"{schema.field(name).type} in others")
        has = table.column(name).is_valid().to_pylist()
        error = f"field {name!r} is {table.schema.field(name).type}, most rows have {schema.field(name).type}"
        bad.extend({"row": n, "where": w, "field": name, "error": error} for (n, w), h in zip(where, has) if h)
        keep = [not h for h in has]
        table = table.filter(pa.array(keep)).drop_columns([name])
        where = [w for w, k in zip(where, keep) if k]
    return table


def convert_to_parquet(path: Path, dest: Path) -> tuple[int, Scan]:
    """Write ``path`` as one Parquet file at ``dest``; return the row count and what the scan learnt.

    Two streaming passes: the first settles one schema for all batches (a field missing from
    early rows still gets its column; see _settle_schema), the second writes; memory stays one batch.
    """
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataSourceError(f"{path}: unsupported file type {path.suffix!r}; "
                              f"use one of {', '.join(LOCAL_SUFFIXES)}")
    bad: list[dict[str, Any]] = []
    scan = Scan(numbering="row" if path.suffix == ".parquet" else "line")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp_dir:
        source = _clean_csv(path, bad, scan, Path(tmp_dir)) if path.suffix == ".csv" else path
        schemas = [(table.schema, len(table)) for table, _ in _batches(source, bad, scan)]
        if not schemas:
            first = f"; first bad row: {bad[0]['where']}: {bad[0]['error']}" if bad else ""
            raise DataSourceError(f"{path}: no rows{first}")
        schema, refused = _settle_schema(schemas)
        rows = 0
        with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for batch in _batches(source, [], Scan()):
                table = _set_aside(path, batch, schema, refused, bad)
                for name in schema.names:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
                writer.write_table(table.select(schema.names).cast(schema))
                rows += len(table)
    if rows == 0:
        raise DataSourceError(f"{path}: no rows")
    bad.sort(key=lambda b: b["row"])
    scan.gaps = sorted(set(scan.gaps) | {b["row"] for b in bad})
    if path.suffix == ".csv" and rows + len(scan.gaps) != _line_count(path):
        scan.numbering, scan.gaps = "row", []  # a quoted field spans lines: number the rows read instead
    with atomic_path(dest.parent / BAD_ROWS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(b) + "\n" for b in bad))
    return rows, scan


def _line_count(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def fetch_url(url: str, sha256: str, dest: Path) -> None:
    """Download ``url`` to ``dest``, refusing it unless its sha256 matches the config's."""
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except OSError as err:
            raise DataSourceError(f"{url}: download failed: {err}") from err
        got = sha256_file(tmp)
        if got != sha256.lower():
            raise DataSourceError(f"{url}: sha256 mismatch: config says {sha256}, downloaded file has {got}")


def parse_hf_source(path: str) -> tuple[str, str | None, str]:
    """``hf:org/name[:config][@split]`` → (repo id, config name or None, split)."""
    spec = path.removeprefix("hf:")
    spec, _, split = spec.partition("@")
    repo, _, config_name = spec.partition(":")
    if not repo:
        raise DataSourceError(f"{path}: expected hf:org/name[:config][@split]")
    return repo, (config_name or None), (split or "train")


def download_dataset(ds: DatasetConfig, out_dir: str | Path) -> dict[str, Any]:
    """Bring ``ds`` into ``out_dir`` (data.parquet + source.json); return the source record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet = out_dir / "data.parquet"
    record: dict[str, Any] = {"source": ds.path, "config_hash": hash_json(ds.download_identity())}
    if ds.path.startswith(("https://", "http://")):
        suffix = next((s for s in LOCAL_SUFFIXES if ds.path.split("?")[0].endswith(s)), ".jsonl")
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            local = Path(tmp) / f"download{suffix}"
            fetch_url(ds.path, ds.sha256 or "", local)
            record.update(kind="url", sha256=ds.sha256.lower())
            record["rows"], scan = convert_to_parquet(local, parquet)
    elif ds.path.startswith("hf:") and (ds.max_rows is not None or ds.max_words is not None):
        repo, config_name, split = parse_hf_source(ds.path)
        kept = stream_hub(repo, config_name, split, ds.revision, parquet, ds.path, ds.max_rows, ds.max_words,
                          ds.field or "text")
        record.update(kind="hf", repo=repo, config=config_name, split=split, revision=ds.revision, streamed=True,
                      max_rows=ds.max_rows, max_words=ds.max_words, **kept)
        scan = Scan(numbering="row")
    elif ds.path.startswith("hf:"):
        import datasets

        repo, config_name, split = parse_hf_source(ds.path)
        try:
            data = datasets.load_dataset(repo, config_name, split=split, revision=ds.revision)
        except Exception as err:  # the hub raises many types; name the source either way
            raise DataSourceError(f"{ds.path}: could not load from the Hugging Face hub: {err}") from err
        with atomic_path(parquet) as tmp:
            data.to_parquet(str(tmp))
        record.update(kind="hf", repo=repo, config=config_name, split=split, revision=ds.revision,
                      fingerprint=getattr(data, "_fingerprint", None), rows=len(data))
        scan = Scan(numbering="row")
    else:
        local = Path(ds.path)
        if not local.is_file():
            raise DataSourceError(f"{ds.path}: file not found")
        record.update(kind="local", sha256=sha256_file(local))
        record["rows"], scan = convert_to_parquet(local, parquet)
    record.update(numbering=scan.numbering, gaps=scan.gaps, null_fields=sorted(scan.null),
                  absent_fields=sorted(k for k, n in scan.present.items() if n < scan.rows))
    bad_file = out_dir / BAD_ROWS_FILE
    if record["kind"] == "hf":
        bad_file.unlink(missing_ok=True)
    record["bad_rows"] = len(bad_file.read_text().splitlines()) if bad_file.is_file() else 0
    record["parquet_sha256"] = sha256_file(parquet)
    record["written_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(out_dir / "source.json", record)
    return record
