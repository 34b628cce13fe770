"""The tokenize stage: raw Parquet rows → packed Arrow shards + manifest.json, streaming.

Each dataset's rows are cut into *units* of ``UNIT_ROWS`` consecutive rows. A unit is the unit
of work and of memory: one process reads it, formats and tokenizes its rows in batches, packs
its training samples first-fit-decreasing in windows of at most ``WINDOW_TOKENS`` tokens and
writes them as shards. Units run in parallel (``processes``); the output is the same for any
number of processes, because every random choice is seeded by (seed, dataset, unit, window),
never by which process ran what. Memory is one unit per process; the parent keeps counts.

Train/val split: exactly ``val_set_size`` rows of each dataset are held out, a uniform seeded
choice made without ever holding the row order: the count per unit is drawn from a
multivariate hypergeometric, then the rows inside the unit. Dataset weights (mixing) repeat
training rows the same way. Validation samples are packed after the units, in one stream.

``sample_packing_sequentially`` packs next-fit in sample order (a seeded order, or the rows' own
with ``curriculum_sampling``); a window's last row is closed at the window's end. With
``dataset_exact_deduplication`` the units hash every sample (tokens, labels, segments) and write
their training samples unpacked; the parent keeps each sample's first occurrence in row order
(datasets in order), in whichever split that row fell, so every distinct sample is trained or held
out once, as Axolotl's deduplication before its split leaves it; the weight's repeats of a kept row
stay. The kept training samples are packed in one stream.

The manifest records what made the shards: the config slice, the tokenizer files and this
package's data code and chat templates, each hashed, so a changed template or tokenizer never
reuses stale shards; and counts of bad rows skipped, over-long samples dropped or truncated, and
dpo pairs skipped because chosen and rejected are the same tokens (nothing to prefer). Rows are
named as the download stage numbers them, from 1: "line N" of a JSONL or CSV source, "row N"
of a JSON array, Parquet file or hub dataset (see tunedag.data.download).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tunedag.config import DatasetConfig, RunConfig
from tunedag.data import chat, download, formats, packing, shards
from tunedag.data.formats import (CHAT_TYPES, IGNORE_INDEX, PREFERENCE_TYPES, PLANNERS, STEPWISE, FormatSpec,
                                  RowFormatError, Sample, TextTokenizer, encode_plans)
from tunedag.errors import TunedagError
from tunedag.io import atomic_path, sha256_file

CODE_FILES = [Path(m.__file__) for m in (formats, chat, packing, shards, download)] + [Path(__file__)]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja")
log = logging.getLogger(__name__)
UNIT_ROWS = 32_768
WINDOW_TOKENS = 1 << 22
ENCODE_ROWS = 512
COUNT_KEYS = ("rows", "bad_rows_skipped", "too_long_dropped", "too_long_truncated", "no_trained_tokens_dropped",
              "identical_pairs_skipped", "documents_split")
UNIQUE_SEED = 1 << 21  # the seed's tail for the one training stream of a deduplicated run


class TokenizeError(TunedagError, ValueError):
    """A problem with the data as a whole (empty, too small a split, a sample too long)."""


def code_hash() -> str:
    """sha256 over the source of the code and chat templates that turn rows into shards."""
    digest = hashlib.sha256()
    for path in CODE_FILES + sorted(chat.TEMPLATE_DIR.glob("*.jinja")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def tokenizer_hash(model_path: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_path / name).is_file():
            digest.update(name.encode() + sha256_file(model_path / name).encode())
    return digest.hexdigest()


def _val_count(n_rows: int, val_set_size: float, where: str) -> int:
    count = round(n_rows * val_set_size) if val_set_size < 1 else int(val_set_size)
    if count >= n_rows:
        raise TokenizeError(f"{where}: val_set_size {val_set_size} leaves no training rows "
                            f"(the data has {n_rows} rows)")
    return max(count, 1)


# --------------------------------------------------------------------------- plan of work

@dataclass
class DatasetJob:
    """One dataset as the workers see it (picklable)."""

    index: int
    name: str
    source: str
    parquet: Path
    spec: FormatSpec
    weight: float
    gaps: list[int]  # 0-based source positions absent from the parquet (download's source.json), ascending
    numbering: str = "row"  # "line" for JSONL and CSV sources
    absent_only: frozenset[str] = frozenset()  # fields absent from some source rows, never an explicit null

    def where(self, row: int) -> str:
        """``file (source …): line N`` (or ``row N``) for parquet row ``row``, numbered from 1 as
        in the source file."""
        for gap in self.gaps:
            if gap <= row:
                row += 1
            else:
                break
        return f"{self.parquet} (source {self.source}): {self.numbering} {row + 1}"

    def as_read(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` without the nulls that Parquet stored for fields absent from the source row, so
        that formats report them as missing (and an explicit null as null)."""
        if not self.absent_only:
            return row
        return {k: v for k, v in row.items() if v is not None or k not in self.absent_only}


@dataclass
class Unit:
    dataset: int
    index: int
    start: int
    stop: int
    n_val: int
    n_extra: int


@dataclass
class Settings:
    sequence_len: int
    sample_packing: bool
    excess_length_strategy: str
    on_bad_rows: str
    seed: int
    preference: bool
    sequential: bool = False  # sample_packing_sequentially: next-fit in sample order
    in_order: bool = False  # curriculum_sampling: the rows' own order, no seeded shuffle
    deduplicate: bool = False  # dataset_exact_deduplication

    def pack(self, samples: list[Sample], seed: list[int]) -> packing.PackedRows:
        if not self.sample_packing:
            return packing.one_per_row(samples)
        pack = packing.pack_next_fit if self.sequential else packing.pack_first_fit
        return pack(samples, self.sequence_len, None if self.in_order else seed)


def _read_source(raw_dir: Path) -> dict[str, Any]:
    path = raw_dir / "source.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_bad_rows(raw_dir: Path) -> list[dict[str, Any]]:
    path = raw_dir / download.BAD_ROWS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _units(job: DatasetJob, n_rows: int, n_val: int, seed: int) -> list[Unit]:
    bounds = list(range(0, n_rows, UNIT_ROWS)) + [n_rows]
    sizes = np.diff(bounds)
    rng = np.random.default_rng([seed, job.index, 1])
    vals = rng.multivariate_hypergeometric(sizes, n_val) if n_val else np.zeros(len(sizes), np.int64)
    whole = math.floor(job.weight)
    extra_total = round((job.weight - whole) * (n_rows - n_val))
    extras = (rng.multivariate_hypergeometric(sizes - vals, extra_total) if extra_total
              else np.zeros(len(sizes), np.int64))
    return [Unit(job.index, u, bounds[u], bounds[u + 1], int(vals[u]), int(extras[u])) for u in range(len(sizes))]


# --------------------------------------------------------------------------- one unit (in a worker)

_WORKER: dict[str, Any] = {}


def _init_worker(tok: TextTokenizer, jobs: list[DatasetJob], settings: Settings, tmp: Path) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(tok=tok, jobs=jobs, settings=settings, tmp=tmp)


def _rows(job: DatasetJob, start: int, stop: int) -> Iterator[list[dict[str, Any]]]:
    """Parquet rows [start, stop) in batches of ENCODE_ROWS, reading only the row groups needed."""
    pf = pq.ParquetFile(job.parquet)
    offset = 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            table = pf.read_row_group(rg).slice(lo - offset, hi - lo)
            for batch in table.to_batches(max_chunksize=ENCODE_ROWS):
                yield batch.to_pylist()
        offset += n
        if offset >= stop:
            break


def _fit(sample: Sample, limit: int) -> Sample:
    """Truncate ``sample``'s segments (from their ends) so it fits ``limit`` tokens: the largest
    common cap that fits, so a short segment of a pair keeps all of it."""
    lengths = list(sample.segment_lengths())
    lo, hi = 0, max(lengths)
    while lo < hi:
        cap = (lo + hi + 1) // 2
        lo, hi = (cap, hi) if sum(min(n, cap) for n in lengths) <= limit else (lo, cap - 1)
    ids, labels, new, at = [], [], [], 0
    for n in lengths:
        keep = min(n, lo)
        ids += sample.input_ids[at:at + keep]
        labels += sample.labels[at:at + keep]
        new.append(keep)
        at += n
    return Sample(ids, labels, tuple(new) if sample.segments else (), sample.segment_labels)


def _usable(sample: Sample) -> bool:
    """Every segment keeps at least one trained token (a pair needs both)."""
    at = 0
    for n in sample.segment_lengths():
        if sample.labels[at:at + n].count(IGNORE_INDEX) == n:
            return False
        at += n
    return True


def _identical_pair(sample: Sample) -> bool:
    """A dpo pair whose chosen and rejected trained tokens are the same: nothing to prefer (train's
    check_preference_shards compares the same, as the last line of defence)."""
    chosen, _ = sample.segment_lengths()
    labels = np.asarray(sample.labels)
    a, b = labels[:chosen], labels[chosen:]
    return np.array_equal(a[a != IGNORE_INDEX], b[b != IGNORE_INDEX])


class _Window:
    """Training samples waiting to be packed; packs and writes every WINDOW_TOKENS tokens."""

    def __init__(self, writer: shards.ShardWriter, settings: Settings, seed: list[int]):
        self.writer, self.settings, self.seed = writer, settings, seed
        self.samples: list[Sample] = []
        self.tokens = self.windows = self.count = 0

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        self.tokens += len(sample)
        self.count += 1
        if self.tokens >= WINDOW_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.samples:
            self.writer.write(self.settings.pack(self.samples, self.seed + [self.windows]))
        self.samples, self.tokens = [], 0
        self.windows += 1


def _process_unit(unit: Unit) -> dict[str, Any]:
    tok, settings, tmp = _WORKER["tok"], _WORKER["settings"], _WORKER["tmp"]
    job: DatasetJob = _WORKER["jobs"][unit.dataset]
    # Axolotl's stepwise_supervised strategy cuts its rows at sequence_len itself, before any length filter
    excess = "truncate" if job.spec.type == STEPWISE else settings.excess_length_strategy
    size = unit.stop - unit.start
    rng = np.random.default_rng([settings.seed, job.index, 2, unit.index])
    is_val = np.zeros(size, bool)
    is_val[rng.choice(size, unit.n_val, replace=False)] = True
    repeats = np.full(size, math.floor(job.weight), np.int64)
    train_at = np.flatnonzero(~is_val)
    repeats[train_at[rng.choice(len(train_at), unit.n_extra, replace=False)]] += 1
    tag = f"u{unit.dataset:03d}-{unit.index:05d}-"
    # deduplicated: the samples unpacked, each once, with its repeat count; the parent keeps and packs them
    train = _Window(shards.ShardWriter(tmp / "units" / "train", tag, settings.preference),
                    dataclasses.replace(settings, sample_packing=False) if settings.deduplicate else settings,
                    [settings.seed, job.index, unit.index])
    train_repeats: list[int] = []
    sequence: list[tuple[bool, bytes]] = []  # deduplication: (held out?, digest) of every sample, in row order
    val_writer = shards.ShardWriter(tmp / "units" / "val", tag, settings.preference)
    val_samples: list[Sample] = []
    prompts: list[str] = []
    prompt_samples: list[int] = []  # per prompt: its row's val sample in this unit (-1: none kept)
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts.update(train_samples=0, val_samples=0, train_rows=0, val_rows=0)
    local = 0
    for batch in _rows(job, unit.start, unit.stop):
        plans, kept = [], []
        for row in batch:
            i = unit.start + local
            local += 1
            try:
                plans.append(PLANNERS[job.spec.type](job.as_read(row), job.spec, tok))
                kept.append(i)
            except (RowFormatError, chat.ChatTemplateError) as err:
                if settings.on_bad_rows == "raise" or isinstance(err, chat.ChatTemplateError):
                    raise type(err)(f"{job.where(i)}: {err}") from None
                counts["bad_rows_skipped"] += 1
        for i, plan, samples in zip(kept, plans, encode_plans(plans, tok, job.spec)):
            val = bool(is_val[i - unit.start])
            val_before = len(val_samples)
            counts["val_rows" if val else "train_rows"] += 1
            if len(samples) > 1:
                counts["documents_split"] += 1
            for sample in samples:
                if len(sample) > settings.sequence_len:
                    if excess == "raise":
                        raise TokenizeError(f"{job.where(i)}: sample of {len(sample)} tokens is longer than "
                                            f"sequence_len {settings.sequence_len} (excess_length_strategy: raise)")
                    if excess == "drop":
                        counts["too_long_dropped"] += 1
                        continue
                    sample = _fit(sample, settings.sequence_len)
                    counts["too_long_truncated"] += 1
                if not _usable(sample):
                    counts["no_trained_tokens_dropped"] += 1
                    continue
                if job.spec.type == "dpo" and _identical_pair(sample):
                    if settings.on_bad_rows == "raise":
                        raise RowFormatError(f"{job.where(i)}: chosen and rejected responses are the same tokens, "
                                             f"so there is nothing to prefer (set on_bad_rows: skip to skip and "
                                             f"count such pairs)")
                    counts["identical_pairs_skipped"] += 1
                    continue
                if settings.deduplicate:
                    sequence.append((val, _digest(sample)))
                if val:
                    val_samples.append(sample)
                    counts["val_samples"] += 1
                else:
                    n = int(repeats[i - unit.start])
                    for _ in range(1 if settings.deduplicate else n):
                        train.add(sample)
                    train_repeats.append(n)
                    counts["train_samples"] += n
            if val and plan.prompt is not None:
                prompts.append(json.dumps({"dataset": job.name, "prompt": plan.prompt.text,
                                           "reference": plan.prompt.reference}))
                prompt_samples.append(val_before if len(val_samples) > val_before else -1)
    counts["rows"] = local
    train.flush()
    if val_samples:
        val_writer.write(packing.one_per_row(val_samples))
    if prompts:
        (tmp / "units" / "prompts").mkdir(parents=True, exist_ok=True)
        (tmp / "units" / "prompts" / f"{tag}.jsonl").write_text("\n".join(prompts) + "\n")
    return {"unit": (unit.dataset, unit.index), "tag": tag, "counts": counts, "train": train.writer.close(),
            "val": val_writer.close(), "repeats": train_repeats, "sequence": sequence,
            "prompt_samples": prompt_samples, "val_dropped": set()}


# --------------------------------------------------------------------------- the stage

def _text_tokenizer(tok: Any, model_path: Path) -> TextTokenizer:
    if tok.eos_token_id is None:
        raise TokenizeError(f"{model_path}: the tokenizer has no eos_token; set one in tokenizer_config.json")
    if not getattr(tok, "is_fast", False):
        raise TokenizeError(f"{model_path}: tokenize needs a fast (tokenizers-backed) tokenizer")
    return TextTokenizer.from_hf(tok)


def _chat_source(run: RunConfig, ds: DatasetConfig, tok: TextTokenizer, model_path: Path) -> str | None:
    """The template ``ds`` renders with: its own chat_template, else the run's."""
    if ds.type not in CHAT_TYPES:
        return None
    choice, jinja = ((ds.chat_template, ds.chat_template_jinja) if ds.chat_template
                     else (run.chat_template, run.chat_template_jinja))
    source = chat.resolve_template(choice, jinja, tok.chat_template)
    if source is None:
        raise TokenizeError(f"{model_path}: the tokenizer has no chat template, which dataset {ds.dataset_name!r} "
                            f"(type {ds.type}) needs; set chat_template: to one of {', '.join(chat.NAMED_TEMPLATES)}")
    return source


def _objective(run: RunConfig) -> str:
    kinds = {ds.type if ds.type in PREFERENCE_TYPES else "prm" if ds.type == STEPWISE else "sft"
             for ds in run.datasets}
    if len(kinds) > 1:
        raise TokenizeError(f"datasets of types {sorted(kinds)} cannot be mixed in one run: "
                            "sft, dpo, kto and stepwise_supervised (prm) rows train different objectives")
    return kinds.pop()


def _jobs(run: RunConfig, raw_dirs: list[Path], tok: TextTokenizer, model_path: Path
          ) -> tuple[list[DatasetJob], list[Unit], list[dict[str, Any]]]:
    jobs, units, records = [], [], []
    for index, (ds, raw_dir) in enumerate(zip(run.datasets, raw_dirs)):
        parquet = Path(raw_dir) / "data.parquet"
        if not parquet.is_file():
            raise FileNotFoundError(f"{parquet}: not found (run the download stage)")
        bad = _read_bad_rows(Path(raw_dir))
        if bad and run.on_bad_rows == "raise":
            first = bad[0]
            raise RowFormatError(f"{ds.path}: {first['where']}: {first['error']} "
                                 f"(set on_bad_rows: skip to skip and count such rows)")
        n_rows = pq.ParquetFile(parquet).metadata.num_rows
        if n_rows == 0:
            skipped = f" ({len(bad)} bad rows skipped)" if bad else ""
            raise TokenizeError(f"{parquet} (source {ds.path}): dataset {ds.dataset_name!r} has no rows{skipped}")
        spec = FormatSpec.from_dataset(ds, tok, _chat_source(run, ds, tok, model_path), run.sequence_len,
                                       run.train_on_inputs)
        source = _read_source(Path(raw_dir))
        job = DatasetJob(index, ds.dataset_name, ds.path, parquet, spec, ds.weight, source.get("gaps", []),
                         source.get("numbering", "row"),
                         frozenset(source.get("absent_fields", [])) - frozenset(source.get("null_fields", [])))
        n_val = _val_count(n_rows, run.val_set_size, f"dataset {ds.dataset_name!r}")
        jobs.append(job)
        units += _units(job, n_rows, n_val, run.seed)
        records.append({"name": ds.dataset_name, "type": ds.type, "weight": ds.weight, "bad_rows": len(bad)})
    return jobs, units, records


def _run_units(units: list[Unit], processes: int, init_args: tuple) -> Iterator[dict[str, Any]]:
    if processes <= 1 or len(units) <= 1:
        _init_worker(*init_args)
        try:
            yield from map(_process_unit, units)
        finally:
            _WORKER.clear()
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(processes, len(units)), initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap(_process_unit, units)


def _sample_stream(paths: list[Path]) -> Iterator[Sample]:
    """Samples back from unpacked unit files (one sample per row)."""
    for path in paths:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        seg = table.column("segment_labels").to_pylist() if "segment_labels" in table.column_names else None
        for r, (ids, labels, cu) in enumerate(zip(table.column("input_ids").to_pylist(),
                                                  table.column("labels").to_pylist(),
                                                  table.column("cu_seqlens").to_pylist())):
            lengths = tuple(np.diff(cu).tolist())
            yield Sample(ids, labels, lengths if len(lengths) > 1 else (), tuple(seg[r]) if seg else ())


def tokenize_run(run: RunConfig, raw_dirs: list[Path], model_path: Path, tokenizer: Any, out_dir: Path,
                 processes: int = 1) -> dict[str, Any]:
    """Build ``out_dir`` (train/, val/, val_prompts.jsonl, manifest.json) for ``run``.

    ``tokenizer`` is the run's HF (fast) tokenizer: the base model's at ``model_path`` as the caller
    prepared it (tunedag.models.loading.load_run_tokenizer); the files there are hashed into the manifest
    and the run's special_tokens and tokens into its config hash.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    tok = _text_tokenizer(tokenizer, model_path)
    objective = _objective(run)
    jobs, units, ds_records = _jobs(run, [Path(d) for d in raw_dirs], tok, model_path)
    settings = Settings(run.sequence_len, run.sample_packing, run.excess_length_strategy, run.on_bad_rows,
                        run.seed, objective in PREFERENCE_TYPES, run.sample_packing_sequentially, run.curriculum_sampling,
                        run.dataset_exact_deduplication)
    totals = {k: 0 for k in (*COUNT_KEYS, "train_samples", "val_samples", "train_rows", "val_rows")}
    if settings.deduplicate:
        totals["duplicates_dropped"] = 0
    manifest: dict[str, Any] = {
        "sequence_len": run.sequence_len, "sample_packing": run.sample_packing,
        "padded": not run.sample_packing, "config_hash": run.stage_hash("tokenize"),
        "tokenizer_hash": tokenizer_hash(model_path), "code_hash": code_hash(),
        "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_id, "objective": objective,
        "sample_packing_sequentially": run.sample_packing_sequentially, "curriculum_sampling": run.curriculum_sampling,
        "dataset_exact_deduplication": run.dataset_exact_deduplication,
        "eos_token_id": tok.eos_id, "vocab_size": len(tokenizer),  # the run's tokenizer (special_tokens, tokens)
        "excess_length_strategy": run.excess_length_strategy, "on_bad_rows": run.on_bad_rows,
        "columns": (shards.PREFERENCE_SCHEMA if settings.preference else shards.ROW_SCHEMA).names,
        "counts": totals, "datasets": ds_records, "splits": {},
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        results = []
        for result in _run_units(units, processes, (tok, jobs, settings, tmp)):
            results.append(result)
            record = ds_records[result["unit"][0]]
            for key, value in result["counts"].items():
                totals[key] += value
                record[key] = record.get(key, 0) + value
        for record in ds_records:
            record["rows"] += record["bad_rows"]
            record["bad_rows_skipped"] += record["bad_rows"]
            totals["rows"] += record["bad_rows"]
            totals["bad_rows_skipped"] += record["bad_rows"]
            del record["bad_rows"]
        if totals["identical_pairs_skipped"]:
            log.warning("skipped %d dpo pairs whose chosen and rejected responses are the same tokens "
                        "(on_bad_rows: skip)", totals["identical_pairs_skipped"])
        if totals["train_samples"] == 0:
            raise TokenizeError(f"run has no training samples left of {totals['rows']} rows (all longer than "
                                f"sequence_len {run.sequence_len}, without trained tokens, or bad?)")
        if settings.deduplicate:
            _deduplicate(results, ds_records, totals)
        manifest["splits"]["train"] = (_pack_unique_train(results, tmp, settings) if settings.deduplicate
                                       else _gather_train(results, tmp, settings))
        manifest["splits"]["val"] = _pack_val(results, tmp, settings)
        if totals["train_samples"] == 0:
            raise TokenizeError(f"run has no training samples left of {totals['rows']} rows after "
                                "dataset_exact_deduplication")
        with open(tmp / "val_prompts.jsonl", "w") as fh:
            for result in results:
                piece = tmp / "units" / "prompts" / f"{result['tag']}.jsonl"
                if piece.is_file():  # less the prompts of held-out samples deduplication dropped
                    fh.writelines(line + "\n" for line, k in zip(piece.read_text().splitlines(),
                                                                  result["prompt_samples"], strict=True)
                                  if k not in result["val_dropped"])
        shutil.rmtree(tmp / "units")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _split_record(records: list[dict[str, Any]], samples: int, sequence_len: int) -> dict[str, Any]:
    rows = sum(r["rows"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {"samples": samples, "rows": rows, "shards": records, "tokens": tokens,
            "trained_tokens": sum(r["trained_tokens"] for r in records),
            "packing_efficiency": round(packing.packing_efficiency(tokens, rows, sequence_len), 4)}


def _gather_train(results: list[dict[str, Any]], tmp: Path, settings: Settings) -> dict[str, Any]:
    """Rename the units' train shards to shard-00000… in unit order."""
    (tmp / "train").mkdir()
    records = []
    for result in results:
        for record in result["train"]:
            name = f"shard-{len(records):05d}.arrow"
            os.replace(tmp / "units" / record["path"], tmp / "train" / name)
            records.append({**record, "path": f"train/{name}"})
    samples = sum(r["samples"] for r in records)
    return _split_record(records, samples, settings.sequence_len)


def _digest(sample: Sample) -> bytes:
    """What dataset_exact_deduplication compares: a sample's tokens, labels, segments and their labels."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (sample.input_ids, sample.labels, sample.segments, sample.segment_labels):
        digest.update(np.asarray(part, np.int64).tobytes() + b"|")
    return digest.digest()


def _deduplicate(results: list[dict[str, Any]], ds_records: list[dict[str, Any]], totals: dict[str, Any]) -> None:
    """Mark in each unit's result the training samples to keep (``train_keep``) and the held-out ones
    to drop (``val_dropped``): a sample is kept where it first occurs, in unit and row order."""
    seen: set[bytes] = set()
    for result in results:
        record = ds_records[result["unit"][0]]
        result["train_keep"], trained = [], iter(result["repeats"])
        held_out = 0
        for val, key in result["sequence"]:
            new = key not in seen
            seen.add(key)
            if val:
                split, dropped = "val_samples", 1
                if not new:
                    result["val_dropped"].add(held_out)
                held_out += 1
            else:
                split, dropped = "train_samples", next(trained)  # a kept row's weight repeats stay
                result["train_keep"].append(new)
            if not new:
                for counts in (record, totals):
                    counts[split] -= dropped
                    counts["duplicates_dropped"] = counts.get("duplicates_dropped", 0) + 1


def _pack_unique_train(results: list[dict[str, Any]], tmp: Path, settings: Settings) -> dict[str, Any]:
    """The units' unpacked training samples that deduplication keeps, in unit order, each with its weight's
    repeats, packed in one stream."""
    writer = shards.ShardWriter(tmp / "train", "shard-", settings.preference)
    window = _Window(writer, settings, [settings.seed, UNIQUE_SEED])
    for result in results:
        paths = [tmp / "units" / r["path"] for r in result["train"]]
        kept = zip(_sample_stream(paths), result["repeats"], result["train_keep"], strict=True)
        for sample, repeats, keep in kept:
            for _ in range(repeats if keep else 0):
                window.add(sample)
    window.flush()
    return _split_record(writer.close(keep_empty=True), window.count, settings.sequence_len)


def _pack_val(results: list[dict[str, Any]], tmp: Path, settings: Settings) -> dict[str, Any]:
    """Pack every unit's validation samples in one stream (bounded windows), unit order, less those
    deduplication drops."""
    writer = shards.ShardWriter(tmp / "val", "shard-", settings.preference)
    window = _Window(writer, settings, [settings.seed, 1 << 20])
    for result in results:
        paths = [tmp / "units" / r["path"] for r in result["val"]]
        for k, sample in enumerate(_sample_stream(paths)):
            if k not in result["val_dropped"]:
                window.add(sample)
    window.flush()
    records = writer.close(keep_empty=True)  # an empty split still has its shard file
    return _split_record(records, window.count, settings.sequence_len)
