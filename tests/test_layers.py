"""The library's layers import only downward (import-linter's contracts in pyproject.toml), and the
config layer stays torch-free so a config check never pays for torch."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    # --no-cache: grimp's cache can miss an edit made through the kernels symlink
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_imports_no_torch():
    code = ("import sys, tunedag.config; "
            "heavy = sorted({'torch', 'deepspeed', 'transformers'} & set(sys.modules)); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
