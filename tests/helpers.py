"""Shared test helpers: run the CLI in-process, make tiny models and image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from cbpt_guard.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return code, out.out, out.err


def save_tiny_model(folder: Path, seed: int = 0, name: str = "tiny-test") -> Path:
    """A random tiny open_clip CLIP saved as state_dict + arch.json sidecar."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.CLIP(**TINY_CFG)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "arch.json").write_text(json.dumps({"name": name, "model_cfg": TINY_CFG,
                                                  "templates": ["a photo of a {}."]}))
    return folder / "model.pt"


def make_image_folder(root: Path, classes: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root
