"""The run report's GGUF table: each file's perplexity beside its 16-bit reference's, or why it was not measured."""
import re

from tunedag.report import gguf_exports_html

MEASURED = {"nll": 0.92, "perplexity": 2.5, "samples": 16, "tokens": 310}


def cells(page: str) -> list[list[str]]:
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)[1:]]


def test_a_quantised_file_shows_its_perplexity_against_the_16_bit_reference():
    page = gguf_exports_html([{"file": "r-q4_k_m.gguf", "type": "q4_k_m", "bytes": 3 * 2**20, "perplexity": MEASURED,
                               "reference": {**MEASURED, "type": "f16", "perplexity": 2.0}}])
    assert cells(page) == [["r-q4_k_m.gguf", "q4_k_m", "3", "2.5", "16 / 310", "2 (f16)", "1.25"]]


def test_a_file_not_measured_says_why_and_no_gguf_no_table():
    page = gguf_exports_html([{"file": "r-f16.gguf", "type": "f16", "bytes": 2**20, "perplexity": None,
                               "reference": None, "perplexity_skipped": "llama-cpp-python is not installed"}])
    assert cells(page)[0][3] == "not measured: llama-cpp-python is not installed"
    assert gguf_exports_html([]) == ""
