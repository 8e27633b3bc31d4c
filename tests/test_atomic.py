"""Atomic outputs: whole or nothing, readable by other users, never merged into or over what a
user wrote, and no staging folder left behind by a killed run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from cbpt_guard import atomic
from cbpt_guard.errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~_umask()
    with atomic.staged_dir(tmp_path / "heads", "heads") as stage:
        (stage / "sub").mkdir()
        (stage / "sub" / "f").write_text("y")
    for d in (tmp_path / "heads", tmp_path / "heads" / "sub"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~_umask()
    assert json.loads((tmp_path / "heads" / atomic.MARKER).read_text())["kind"] == "heads"


def test_a_failed_staging_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic.staged_dir(tmp_path / "out", "heads") as stage:
        (stage / "half.onnx").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_an_output_of_ours_is_replaced_whole_never_merged(tmp_path):
    with atomic.staged_dir(tmp_path / "out", "heads") as stage:
        (stage / "classifier_fp16.onnx").write_text("old model")
        (stage / "classes.txt").write_text("b\na\n")
    with atomic.staged_dir(tmp_path / "out", "heads") as stage:
        (stage / "classes.txt").write_text("a\nb\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [atomic.MARKER, "classes.txt"]
    assert (tmp_path / "out" / "classes.txt").read_text() == "a\nb\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing aside left


def test_a_folder_cbpt_guard_did_not_write_is_refused_unless_overwrite(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"my": "notes"}')
    with pytest.raises(UsageError, match="not empty and was not written by cbpt-guard.*report.json") as e:
        atomic.check_target(mine)
    assert "--overwrite" in str(e.value)
    with pytest.raises(UsageError), atomic.staged_dir(mine, "purify") as stage:
        (stage / "x").write_text("never")
    assert (mine / "report.json").read_text() == '{"my": "notes"}'
    with atomic.staged_dir(mine, "purify", overwrite=True) as stage:
        (stage / "x").write_text("new")
    assert sorted(p.name for p in mine.iterdir()) == [atomic.MARKER, "x"]
    (tmp_path / "file").write_text("f")
    with pytest.raises(UsageError, match="is a file"):
        atomic.check_target(tmp_path / "file", overwrite=True)
    (tmp_path / "empty").mkdir()
    atomic.check_target(tmp_path / "empty")


def test_staging_left_by_a_killed_run_is_cleaned_up(tmp_path):
    code = (
        "import os, sys\n"
        "from cbpt_guard import atomic\n"
        "with atomic.staged_dir(sys.argv[1], 'heads') as stage:\n"
        "    (stage / 'half').write_text('x')\n"
        "    os._exit(9)  # killed mid-write: no cleanup runs\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], check=False)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.") and left[0].endswith(".staging")
    with atomic.staged_dir(tmp_path / "out", "heads") as stage:
        (stage / "whole").write_text("y")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_shared_repository_keeps_others_models_and_loses_our_stale_ones(tmp_path):
    repo = tmp_path / "triton"
    (repo / "their_model").mkdir(parents=True)
    owned = ("m", "m_fp16")
    with atomic.staged_entries(repo, "triton-model", owned) as stage:
        for name in owned:
            (stage / name).mkdir()
            (stage / name / "config.pbtxt").write_text("old")
    with atomic.staged_entries(repo, "triton-model", owned) as stage:  # a new export without the fp16 twin
        (stage / "m").mkdir()
        (stage / "m" / "config.pbtxt").write_text("new")
    assert sorted(p.name for p in repo.iterdir()) == ["m", "their_model"]
    assert (repo / "m" / "config.pbtxt").read_text() == "new"
    (repo / "m_fp16").mkdir()  # someone else's model under one of our names
    with (
        pytest.raises(UsageError, match="m_fp16, not written by cbpt-guard"),
        atomic.staged_entries(repo, "triton-model", owned),
    ):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["triton"]
