"""Shared test helpers: run the CLI in-process, make tiny models and image folders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _exit_code(exc: SystemExit) -> int:
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    from cbpt_cli.app import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return _exit_code(exc.value), out.out, out.err


def run_cli_plain(*args) -> tuple[int, str, str]:
    """run_cli for session fixtures, which have no capsys."""
    import contextlib
    import io

    from cbpt_cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return _exit_code(exc.value), out.getvalue(), err.getvalue()


def fake_inversion(candidates: list[tuple], score: float, side: int = 32, dim: int = 32):
    """An InversionResult with the given (kind, target, flip rate, over-alignment[, search[,
    typicality[, shape flip]]]) candidates, best mask first, and identity triggers of `side` px: a
    scan reading fixed by the test rather than by a miniature model too small to be calibrated.
    `search` True reads as the kind's probe (a warp probe, a compact mask), False as a restart."""
    import torch

    from cbpt.inversion import Candidate, InversionResult, Search
    from cbpt.trigger import DummyTrigger, TriggerKind

    def search(kind: TriggerKind, given: Search | bool) -> Search:
        if not isinstance(given, bool):
            return given
        return (Search.WARP if kind is TriggerKind.WARP else Search.COMPACT) if given else Search.RESTART

    cands = []
    for kind, target, flip, align, *rest in candidates:
        kind = TriggerKind(kind)
        if rest:
            rest[0] = search(kind, rest[0])
        cands.append(Candidate(DummyTrigger.blank(side, side, kind), target, flip, align, *rest))
    return InversionResult(
        candidates=cands,
        mean_feature=torch.nn.functional.normalize(torch.ones(dim), dim=0),
        consistency=0.9,
        clean_consistency=0.1,
        mask_l1=0.04,
        score=score,
    )


def save_tiny_model(folder: Path, seed: int = 0, name: str = "tiny-test") -> Path:
    """A random tiny open_clip CLIP saved as state_dict + arch.json sidecar."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.CLIP(**TINY_CFG)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "arch.json").write_text(
        json.dumps({"name": name, "model_cfg": TINY_CFG, "templates": ["a photo of a {}."]})
    )
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


def mini_build_config(
    attack: str,
    width: int = 16,
    sizes=(512, 16, 5),
    pretrain_steps: int = 100,
    finetune_steps: int = 150,
    poison_rate: float | None = 0.3,
):
    """A miniature testbed build: a ResNet tower `width` channels wide, target 2, seconds to train."""
    from testbed.build import BuildConfig
    from testbed.train import TrainConfig

    return BuildConfig(
        dataset="shapes",
        attack=attack,
        target=2,
        seed=0,
        sizes=sizes,
        poison_rate=poison_rate,
        pretrain=TrainConfig(steps=pretrain_steps, batch_size=64, warmup=min(5, pretrain_steps // 4), lr=2e-3),
        finetune=TrainConfig(steps=finetune_steps, batch_size=64, warmup=min(2, finetune_steps // 4), lr=1e-3),
        model_cfg={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": width},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
    )


def backdoored_features(g0, n: int, seed: int):
    """Clean shots on their class's text feature; triggered shots of cat and dog in one region
    off bird's feature, in a direction no class text takes: a backdoor to class 2 that the
    original head obeys and that prompts can learn to undo."""
    import torch
    import torch.nn.functional as F

    from cbpt.features import FeatureCache

    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.cat([g0.T, torch.randn(g0.shape[1], 1, generator=torch.Generator().manual_seed(9))], 1)
    )
    away = q[:, -1]  # orthogonal to every class's text feature
    noise = 0.05 * torch.randn(2 * n, g0.shape[1], generator=gen)
    trig = F.normalize(g0[2].expand(2 * n, -1) + 0.1 * away + noise, dim=-1)
    return FeatureCache(
        g0.repeat_interleave(n, 0),
        torch.arange(3).repeat_interleave(n),
        trig,
        torch.tensor([0] * n + [1] * n),
        torch.full((2 * n,), 2),
        F.normalize(trig.mean(0, keepdim=True), dim=-1),
        0,
    )


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ as a module (registered, so its dataclasses resolve their module),
    importing its neighbours as it does when run as a script (benchmarks/ on the path)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
