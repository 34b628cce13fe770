"""Atomic writes: every stage output appears under its final name complete, or not at all."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds.

    Works for files and folders alike: whatever the block writes at the temporary path
    replaces ``dest`` in one rename (an existing ``dest`` folder is removed first). What a
    killed writer of ``dest`` left behind is removed first (one writer per output: Snakemake's
    lock keeps a second run out of the folder). Files get
    the user's umask, as plainly written files would: some writers (safetensors) create 0600
    files, which labmates on a shared filesystem could not read.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    target = tmp / "out"
    try:
        yield target
        _apply_umask(target)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(dest: Path, pattern: str = ".{name}.tmp-*") -> None:
    """Remove the temporaries an earlier, killed writer of ``dest`` left beside it (at 8B, gigabytes)."""
    for stale in dest.parent.glob(pattern.format(name=glob.escape(dest.name))):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _apply_umask(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_file() and not item.is_symlink():
            os.chmod(item, 0o666 & ~mask)


def write_json(dest: str | Path, value: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
