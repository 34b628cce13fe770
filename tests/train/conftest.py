import pytest

from tunedag.config import DatasetConfig
from tests.helpers import sample_rows, tiny_run, write_jsonl


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory, tiny_model_dir):
    """(alpaca source file, packed shards) of 240 rows of the built-in task."""
    from tunedag.data.download import download_dataset
    from tunedag.data.tokenize import tokenize_run

    root = tmp_path_factory.mktemp("sample-shards")
    src = write_jsonl(root / "src.jsonl", sample_rows(240))
    download_dataset(DatasetConfig(path=str(src)), root / "raw")
    tokenize_run(tiny_run(src), [root / "raw"], tiny_model_dir, root / "packed")
    return src, root / "packed"
