"""Atomic outputs: complete under the final name, or absent."""
import os
import stat

import pytest

from tunedag.io import atomic_path


class Interrupted(Exception):
    pass


def test_a_failed_write_leaves_neither_the_output_nor_temporaries(tmp_path):
    with pytest.raises(Interrupted):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise Interrupted()
    assert list(tmp_path.iterdir()) == []


def test_a_folder_output_replaces_the_old_one_whole(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/stale.txt").write_text("old")
    with atomic_path(tmp_path / "dir") as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dir"]


def test_files_get_the_users_umask_not_the_writers_0600(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.bin") as tmp:
            tmp.write_bytes(b"x")
            os.chmod(tmp, 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.bin").stat().st_mode) == 0o644
