"""The layers flow one way (docs/architecture.md): every import in the source tree, top-level
or inside a function, is checked against them, and the check itself is shown to fail."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("cbpt_guard", "cbpt", "export", "guard", "testbed", "cbpt_cli")
# package -> the packages of ours it may import (besides itself)
ALLOWED = {
    "cbpt_guard": set(),  # the bottom layer: errors, atomic writes, the artifact format
    "cbpt": {"cbpt_guard"},
    "export": {"cbpt", "cbpt_guard"},
    "guard": {"cbpt_guard"},
    "testbed": {"cbpt", "cbpt_guard", "guard"},  # beside cbpt; scores exported heads through the guard
    "cbpt_cli": set(OURS),  # the top
}
# The base install (the guard) has none of the purify extra: these never load in its layers.
PURIFY_ONLY = {"torch", "torchvision", "open_clip", "onnx", "safetensors", "sklearn", "matplotlib"}
TORCH_FREE = {"cbpt_guard", "guard"}
# The distributed extra: loaded only inside the functions that need it, so the base install
# (and every command but `classify --engine ray` and Parquet output) starts without it.
DISTRIBUTED_ONLY = {"ray", "pyarrow"}


def _module_level_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def violations(root: Path) -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, top in _imports(path):
                where = f"{path.relative_to(root)}:{line}"
                if top in OURS and top != package and top not in allowed:
                    found.append(f"{where} imports {top}, against the layers")
                if package in TORCH_FREE and top in PURIFY_ONLY:
                    found.append(f"{where} imports {top}, which the base install does not have")
            for line, top in _module_level_imports(path):
                if top in DISTRIBUTED_ONLY:
                    found.append(
                        f"{path.relative_to(root)}:{line} imports {top} at load time, outside the base install"
                    )
    return found


def test_every_import_follows_the_layers():
    assert violations(ROOT) == []


def test_the_layer_check_fails_on_a_forbidden_import(tmp_path):
    for package in ALLOWED:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "guard" / "extra.py").write_text("def f():\n    import torch\n    from cbpt.model import load_clip\n")
    (tmp_path / "cbpt" / "extra.py").write_text("from export.package import read_source\n")
    (tmp_path / "cbpt_guard" / "extra.py").write_text("import cbpt_cli.app\n")
    (tmp_path / "cbpt_cli" / "extra.py").write_text("import ray\n\n\ndef f():\n    import pyarrow\n")
    assert sorted(violations(tmp_path)) == [
        "cbpt/extra.py:1 imports export, against the layers",
        "cbpt_cli/extra.py:1 imports ray at load time, outside the base install",
        "cbpt_guard/extra.py:1 imports cbpt_cli, against the layers",
        "guard/extra.py:2 imports torch, which the base install does not have",
        "guard/extra.py:3 imports cbpt, against the layers",
    ]
