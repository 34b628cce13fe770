"""The download stage: local files, https with sha256, hf: specs; outputs and errors."""
import hashlib
import http.server
import json
import threading
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tunedag.config import DatasetConfig
from tunedag.data.download import DataSourceError, download_dataset, parse_hf_source
from tests.helpers import sample_rows, write_jsonl


def read_rows(out: Path) -> list[dict]:
    return pq.read_table(out / "data.parquet").to_pylist()


def test_local_jsonl_becomes_parquet_with_source_record(tmp_path):
    rows = sample_rows(25)
    rows[3].pop("input")  # a field missing from one row still gets its column (null)
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    record = download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    got = read_rows(tmp_path / "raw")
    assert len(got) == 25 and got[3]["input"] is None and got[4] == rows[4]
    source = json.loads((tmp_path / "raw/source.json").read_text())
    assert source == record
    assert source["rows"] == 25 and source["kind"] == "local"
    assert source["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_other_local_formats(tmp_path, suffix):
    rows = sample_rows(5)
    src = tmp_path / f"d{suffix}"
    if suffix == ".json":
        src.write_text(json.dumps(rows))
    else:
        src.write_text("instruction,input,output\n" + "".join(f"{r['instruction']},{r['input']},{r['output']}\n" for r in rows))
    download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    assert read_rows(tmp_path / "raw") == rows


def test_bad_lines_are_set_aside_with_their_line_and_field(tmp_path):
    """Invalid JSON, a non-object, a field whose type disagrees: kept out of the Parquet and listed
    in bad_rows.jsonl for the tokenize stage (which raises or skips them per on_bad_rows)."""
    src = tmp_path / "d.jsonl"
    src.write_text('{"output": "a"}\n{"output": oops}\n\n[1, 2]\n{"output": "b"}\n{"output": ["x"]}\n{"output": "c"}\n')
    record = download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    assert read_rows(tmp_path / "raw") == [{"output": "a"}, {"output": "b"}, {"output": "c"}]
    bad = [json.loads(l) for l in (tmp_path / "raw/bad_rows.jsonl").read_text().splitlines()]
    # "row" is the 0-based source position (line - 1 here), which tokenize maps parquet rows past
    assert [(b["row"], b["where"], b["field"]) for b in bad] == [(1, "line 2", None), (3, "line 4", None),
                                                                 (5, "line 6", "output")]
    assert bad[0]["error"].startswith("invalid JSON") and bad[1]["error"] == "expected an object, got list"
    assert bad[2]["error"] == "field 'output' is list, other rows have str"
    assert record["rows"] == 3 and record["bad_rows"] == 3
    assert record["numbering"] == "line" and record["gaps"] == [1, 2, 3, 5]  # line 3 is blank


def test_a_type_that_changes_between_batches_sets_only_those_rows_aside(tmp_path, monkeypatch):
    """Batches are typed one at a time: a field that is a string in most batches and a number in
    one loses only that batch's rows (listed with their lines), and int/float batches promote."""
    monkeypatch.setattr("tunedag.data.download.BATCH_ROWS", 3)
    outputs = ["a", "b", "c", 1, 2, None, "d", "e", "f"]
    scores = [1, 2, 3, 0.5, 1.5, 2.5, 4, 5, 6]
    src = write_jsonl(tmp_path / "d.jsonl", [{"output": o, "score": s} for o, s in zip(outputs, scores)])
    record = download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    got = read_rows(tmp_path / "raw")
    assert [r["output"] for r in got] == ["a", "b", "c", None, "d", "e", "f"]
    assert [r["score"] for r in got] == [1.0, 2.0, 3.0, 2.5, 4.0, 5.0, 6.0]
    bad = [json.loads(l) for l in (tmp_path / "raw/bad_rows.jsonl").read_text().splitlines()]
    assert [(b["row"], b["where"], b["field"]) for b in bad] == [(3, "line 4", "output"), (4, "line 5", "output")]
    assert bad[0]["error"] == "field 'output' is int64, most rows have string"
    assert record["rows"] == 7 and record["bad_rows"] == 2


def test_a_file_of_only_bad_rows_is_an_error(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"instruction": oops}\n')
    with pytest.raises(DataSourceError, match=r"d\.jsonl: no rows; first bad row: line 1: invalid JSON"):
        download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    assert not (tmp_path / "raw/data.parquet").exists()
    assert not (tmp_path / "raw/source.json").exists()


def test_empty_file_is_an_error(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("\n")
    with pytest.raises(DataSourceError, match=r"d\.jsonl: no rows"):
        download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_source_is_checked_against_its_sha256(tmp_path, http_root):
    root, base = http_root
    src = write_jsonl(root / "d.jsonl", sample_rows(7))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    record = download_dataset(DatasetConfig(path=f"{base}/d.jsonl", sha256=digest), tmp_path / "raw")
    assert record["kind"] == "url" and record["rows"] == 7
    assert read_rows(tmp_path / "raw") == sample_rows(7)


def test_url_with_wrong_sha256_is_refused(tmp_path, http_root):
    root, base = http_root
    write_jsonl(root / "d.jsonl", sample_rows(3))
    with pytest.raises(DataSourceError, match="sha256 mismatch: config says 0000"):
        download_dataset(DatasetConfig(path=f"{base}/d.jsonl", sha256="0" * 64), tmp_path / "raw")
    assert not (tmp_path / "raw/data.parquet").exists()


def test_unreachable_url_names_the_url(tmp_path, http_root):
    _, base = http_root
    with pytest.raises(DataSourceError, match=r"/missing\.jsonl: download failed"):
        download_dataset(DatasetConfig(path=f"{base}/missing.jsonl", sha256="0" * 64), tmp_path / "raw")


def test_hf_source_spec_parsing():
    assert parse_hf_source("hf:tatsu-lab/alpaca") == ("tatsu-lab/alpaca", None, "train")
    assert parse_hf_source("hf:org/name:cfg@validation") == ("org/name", "cfg", "validation")


def test_hf_source_that_cannot_be_reached_names_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataSourceError, match="hf:tunedag-test/no-such-dataset: could not load"):
        download_dataset(DatasetConfig(path="hf:tunedag-test/no-such-dataset"), tmp_path / "raw")


# --------------------------------------------------------------------------- text that is not what it claims

def test_invalid_utf8_line_is_set_aside_with_its_line_and_byte_offset(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b'{"output": "a"}\n{"output": "caf\xe9"}\n{"output": "b"}\n')
    record = download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    assert read_rows(tmp_path / "raw") == [{"output": "a"}, {"output": "b"}]
    bad = [json.loads(l) for l in (tmp_path / "raw/bad_rows.jsonl").read_text().splitlines()]
    # line 2 starts at offset 16; "caf" ends at 16 + 15: the byte 0xe9 is at 31
    assert bad == [{"row": 1, "where": "line 2", "field": None, "error": "invalid UTF-8 at byte offset 31 (0xe9)"}]
    assert record["bad_rows"] == 1 and record["gaps"] == [1]


def test_invalid_utf8_in_a_csv_is_set_aside_not_read_as_bytes(tmp_path):
    """pyarrow alone would turn the whole column into binary without a word."""
    src = tmp_path / "d.csv"
    src.write_bytes(b"instruction,output\nhi,a\nyo,caf\xe9\nhey,b\n")
    record = download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    assert read_rows(tmp_path / "raw") == [{"instruction": "hi", "output": "a"}, {"instruction": "hey", "output": "b"}]
    bad = [json.loads(l) for l in (tmp_path / "raw/bad_rows.jsonl").read_text().splitlines()]
    # line 3 starts at offset 19 + 5 = 24; "yo,caf" puts the byte 0xe9 at 30
    assert [(b["where"], b["error"]) for b in bad] == [("line 3", "invalid UTF-8 at byte offset 30 (0xe9)")]
    assert record["numbering"] == "line" and record["gaps"] == [0, 2]  # the header and the bad line


def test_json_array_rows_count_from_one(tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps([{"output": "a"}, 7, {"output": "b"}]))
    record = download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    bad = [json.loads(l) for l in (tmp_path / "raw/bad_rows.jsonl").read_text().splitlines()]
    assert [(b["where"], b["error"]) for b in bad] == [("row 2", "expected an object, got int")]
    assert record["numbering"] == "row" and record["gaps"] == [1]


@pytest.mark.parametrize("name, content, message", [
    ("d.json", b'[{"output": "a"},\n {"output": "\xff"}]',
     "d.json: line 2: invalid UTF-8 at byte offset 31 (0xff); a JSON array is read whole, so fix the file "
     "(or write it as JSONL, where such a line is set aside)"),
    ("d.parquet", b'{"output": "a"}\n', "d.parquet: not a Parquet file (it is JSON text: name it .jsonl or .json)"),
    ("d.parquet", b"output\na\n", "d.parquet: not a Parquet file (no Parquet footer; it starts with b'output\\na')"),
    ("d.parquet", b"PAR1\x15\x04", "d.parquet: not a Parquet file (it starts as Parquet but has no footer: truncated?)"),
    ("d.csv", b"instruction,output\nhi\n", "d.csv: CSV parse error: Expected 2 columns, got 1: hi"),
])
def test_a_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    with pytest.raises(DataSourceError) as err:
        download_dataset(DatasetConfig(path=str(src)), tmp_path / "raw")
    assert str(err.value) == f"{tmp_path}/{message}"
    assert list((tmp_path / "raw").iterdir()) == []  # nothing written
