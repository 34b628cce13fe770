"""Tokenize throughput and peak memory: tunedag's streaming stage vs a `datasets.map` + pack baseline.

Both run in the same invocation, on the same generated alpaca corpus (Parquet, as the download
stage leaves it), with the same tokenizer (the built-in tiny Llama's byte-level BPE), the same
masking and the same number of processes, each in its own child process so that peak RSS (the
whole process tree, sampled every 20 ms) is its own. The baseline is what one writes first:
`Dataset.map(batched=True, num_proc=N)` calling the HF tokenizer on prompts and answers, then
every sample's ids in Python lists, packed best-fit-decreasing and written as one Arrow file.

    python scripts/bench_tokenize.py --rows 1000000 --processes 2
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("cat dog fox owl bear wolf horse mouse apple banana cherry grape lemon mango peach plum red green "
         "blue yellow black white orange purple sun moon star rain snow wind cloud river").split()


def make_corpus(path: Path, rows: int) -> None:
    """Alpaca rows with a log-normal spread of lengths (median ~45 tokens, tail to ~500)."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    with open(path, "w") as fh:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            lens = np.clip(rng.lognormal(np.log(8), 0.8, n).astype(int), 1, 400)
            outs = rng.integers(1, 12, n)
            picks = rng.integers(0, len(words), int(lens.sum() + outs.sum()))
            at = 0
            for k in range(n):
                inp = " ".join(words[picks[at:at + lens[k]]])
                at += lens[k]
                out = " ".join(words[picks[at:at + outs[k]]])
                at += outs[k]
                fh.write(json.dumps({"instruction": "Which word in the list is an animal?", "input": inp,
                                     "output": out}) + "\n")


def run_tunedag(raw: Path, model: Path, out: Path, processes: int) -> dict:
    from tests.helpers import tiny_run
    from tunedag.data.tokenize import tokenize_run
    from tunedag.models.loading import load_tokenizer

    run = tiny_run(raw / "data.parquet", sequence_len=2048, val_set_size=0.001)
    manifest = tokenize_run(run, [raw], model, load_tokenizer(model), out, processes=processes)
    return {"tokens": manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"],
            "samples": manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"],
            "efficiency": manifest["splits"]["train"]["packing_efficiency"]}


def run_baseline(raw: Path, model: Path, out: Path, processes: int) -> dict:
    import bisect

    import datasets
    import pyarrow as pa
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(model)
    ds = datasets.load_dataset("parquet", data_files=str(raw / "data.parquet"), split="train",
                               cache_dir=str(out / "cache"))

    def encode(batch):
        prompts = [f"### Instruction:\n{i}\n\n" + (f"### Input:\n{x}\n\n" if x else "") + "### Response:\n"
                   for i, x in zip(batch["instruction"], batch["input"])]
        p = tok(prompts, add_special_tokens=False)["input_ids"]
        a = tok(batch["output"], add_special_tokens=False)["input_ids"]
        ids = [[tok.bos_token_id] + pi + ai + [tok.eos_token_id] for pi, ai in zip(p, a)]
        labels = [[-100] * (len(pi) + 1) + ai + [tok.eos_token_id] for pi, ai in zip(p, a)]
        return {"input_ids": ids, "labels": labels}

    ds = ds.map(encode, batched=True, num_proc=processes, remove_columns=ds.column_names)
    ids, labels = ds["input_ids"][:], ds["labels"][:]  # every sample in Python lists ([:]: datasets >= 4 returns a lazy column)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    rows, free = [], []
    for i in order:
        n = len(ids[i])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([])
            r, room = len(rows) - 1, 2048
        else:
            room, r = free.pop(at)
        rows[r].append(i)
        bisect.insort(free, (room - n, r))
    table = pa.table({
        "input_ids": [sum((ids[i] for i in row), []) for row in rows],
        "labels": [sum((labels[i] for i in row), []) for row in rows],
        "position_ids": [[p for i in row for p in range(len(ids[i]))] for row in rows],
    })
    with pa.OSFile(str(out / "shard.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    tokens = sum(len(x) for x in ids)
    return {"tokens": tokens, "samples": len(ids), "efficiency": tokens / (len(rows) * 2048)}


def _child(fn_name: str, args: tuple, conn) -> None:
    start = time.perf_counter()
    result = globals()[fn_name](*args)
    result["seconds"] = time.perf_counter() - start
    conn.send(result)


def measure(fn_name: str, *args) -> dict:
    """Run ``fn_name`` in a child; sample the RSS of the child and its descendants."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_child, args=(fn_name, args, child))
    proc.start()
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.is_alive() and not parent.poll():
        try:
            procs = [ps] + ps.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    result = parent.recv()
    proc.join()
    result["peak_rss_mb"] = peak / 2**20
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import datasets
    import tokenizers
    import transformers

    from tunedag.config import DatasetConfig
    from tunedag.data.download import download_dataset
    from tunedag.models.builtin import materialize_builtin

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tokenize-"))
    model = materialize_builtin("tiny-llama", work / "model")
    print(f"# {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs visible, "
          f"{args.processes} processes; python {platform.python_version()}, tokenizers {tokenizers.__version__}, "
          f"transformers {transformers.__version__}, datasets {datasets.__version__}")
    for rows in args.rows:
        corpus = work / f"corpus-{rows}.jsonl"
        raw = work / f"raw-{rows}"
        if not (raw / "data.parquet").exists():
            make_corpus(corpus, rows)
            download_dataset(DatasetConfig(path=str(corpus)), raw)
            corpus.unlink()
        variants = [("tunedag", "run_tunedag")] + ([] if args.skip_baseline else [("baseline", "run_baseline")])
        for label, fn in variants:
            out = work / f"out-{label}-{rows}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True) if label == "baseline" else None
            r = measure(fn, raw, model, out, args.processes)
            print(json.dumps({"variant": label, "rows": rows, **{k: round(v, 3) if isinstance(v, float) else v
                                                                 for k, v in r.items()}}), flush=True)
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
