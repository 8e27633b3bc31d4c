"""The command surface (README), and torch-free imports of the runtime."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import run_cli

COMMANDS = ("info", "scan", "purify", "export", "classify", "serve", "testbed", "bench", "demo")


def test_help_lists_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in COMMANDS:
        assert name in out


def test_testbed_help_lists_build_and_eval(capsys):
    code, out, _ = run_cli(capsys, "testbed", "--help")
    assert code == 0 and "build" in out and "eval" in out


def test_usage_errors_exit_2(capsys):
    code, _, err = run_cli(capsys, "no-such-command")
    assert code == 2 and "No such command" in err


def test_runtime_imports_never_pull_in_torch():
    code = (
        "import sys, guard.heads, guard.classify, guard.server, cbpt_cli.app, cbpt_guard.artifacts, cbpt_guard.atomic; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'open_clip'))); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_without_an_argument_serves_purified_or_says_how_to_make_it(
    capsys, tmp_path, monkeypatch, original_heads
):
    import shutil

    import guard.server

    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "serve")
    assert code == 2 and "./purified does not exist" in err and "cbpt-guard purify MODEL --data SHOTS" in err
    shutil.copytree(original_heads, tmp_path / "purified")
    served = []
    monkeypatch.setattr(guard.server, "serve", lambda heads, host, port, *rest: served.append((heads.folder, port)))
    code, _, err = run_cli(capsys, "serve", "--port", "8123")
    assert code == 0 and [(f.resolve(), port) for f, port in served] == [((tmp_path / "purified").resolve(), 8123)]
    assert f"serving {(tmp_path / 'purified').resolve()}" in err
