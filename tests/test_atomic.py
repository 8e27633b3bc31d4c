"""Atomic outputs keep the usual permissions: other users (a Triton server, a service) can read them."""

from __future__ import annotations

import os
import stat

import pytest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    from cbpt_guard import atomic

    atomic.write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~_umask()
    with atomic.staged_dir(tmp_path / "heads") as stage:
        (stage / "sub").mkdir()
        (stage / "sub" / "f").write_text("y")
    for d in (tmp_path / "heads", tmp_path / "heads" / "sub"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~_umask()


def test_a_failed_staging_leaves_nothing(tmp_path):
    from cbpt_guard import atomic

    with pytest.raises(RuntimeError):
        with atomic.staged_dir(tmp_path / "out") as stage:
            (stage / "half.onnx").write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
