from __future__ import annotations

import os

import pytest

# Tests run on 2 cores; more threads only thrash.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory):
    """Random-weight ViT-B-32 and RN50 saved in every form a user may have (fp16 to save disk)."""
    import warnings

    import open_clip
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("real")
    out = {}
    for arch in ("ViT-B-32", "RN50"):
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None).eval()
        sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        paths = {
            "state_dict": root / f"{arch}.pt",
            "safetensors": root / f"{arch}.safetensors",
            "training_checkpoint": root / f"{arch}-epoch3.pt",
            "openai_torchscript": root / f"{arch}-openai.pt",
        }
        torch.save(sd, paths["state_dict"])
        save_file(sd, str(paths["safetensors"]))
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}},
                   paths["training_checkpoint"])
        # OpenAI's archives are scripted QuickGELU models in fp16.
        quick = open_clip.create_model(f"{arch}-quickgelu", pretrained=None).eval().half()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(quick), str(paths["openai_torchscript"]))
        out[arch] = paths
        del model, quick
    return out


def _mini_testbed_cfg(attack: str):
    """A miniature testbed that really is backdoored: measured, blended at 30% poison reaches
    ASR ~0.95 in ~15 s on one core, where a random-place badnet patch needs far longer."""
    from testbed.build import BuildConfig
    from testbed.train import TrainConfig

    return BuildConfig(
        dataset="shapes", attack=attack, target=2, seed=0, sizes=(512, 16, 5), poison_rate=0.3,
        pretrain=TrainConfig(steps=100, batch_size=64, warmup=5, lr=2e-3),
        finetune=TrainConfig(steps=150, batch_size=64, warmup=2, lr=1e-3),
        model_cfg={"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
                   "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    )


@pytest.fixture(scope="session")
def mini_testbeds(tmp_path_factory):
    """{"blended": dir, "none": dir}: miniature backdoored and clean testbeds."""
    from testbed.build import build, write

    root = tmp_path_factory.mktemp("mini")
    out = {}
    for attack in ("blended", "none"):
        cfg = _mini_testbed_cfg(attack)
        out[attack] = write(build(cfg, cache=root / "cache"), cfg, root / attack)
    return out
