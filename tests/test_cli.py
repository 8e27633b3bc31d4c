"""The command surface of INTERFACE.md, and torch-free imports of the runtime."""

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
    code = ("import sys, guard, cbpt_guard.cli, cbpt_guard.errors, cbpt_guard.atomic; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'open_clip'))); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
