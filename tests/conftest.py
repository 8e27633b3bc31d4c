from __future__ import annotations

import os

import pytest

# One torch thread: on a shared 2-core machine more collapse (docs/security.md#threads), and the
# CLI's own default (half the cores) is one here too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
        torch.save(
            {
                "epoch": 3,
                "name": "run",
                "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            },
            paths["training_checkpoint"],
        )
        # OpenAI's archives are scripted QuickGELU models in fp16.
        quick = open_clip.create_model(f"{arch}-quickgelu", pretrained=None).eval().half()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(quick), str(paths["openai_torchscript"]))
        out[arch] = paths
        del model, quick
    return out


def _mini_testbed_cfg(attack: str):
    """A miniature testbed that really is backdoored: blended at 30% poison reaches a high ASR
    in seconds, where a random-place badnet patch needs far longer. Too small to be calibrated:
    tests that need a given scan verdict fix it (tests.helpers.fake_inversion)."""
    from tests.helpers import mini_build_config

    return mini_build_config(attack)


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


@pytest.fixture(scope="session")
def purified(mini_testbeds, tmp_path_factory):
    """One full purify of the miniature backdoored testbed, shared by every test that reads a
    purify output: forced full tuning against its inverted triggers at a fixed alpha."""
    from tests.helpers import run_cli_plain

    out = tmp_path_factory.mktemp("purified") / "p"
    tb = mini_testbeds["blended"]
    code, stdout, err = run_cli_plain(
        "purify",
        tb / "model.pt",
        "--data",
        tb / "fewshot",
        "--classes",
        tb / "classes.txt",
        "--out",
        out,
        "--inversion-steps",
        "60",
        "--restarts",
        "2",
        "--tuning-steps",
        "60",
        "--force",
        "--alpha",
        "0.7",
    )
    assert code == 0, err
    return out


@pytest.fixture(scope="session")
def original_heads(mini_testbeds, tmp_path_factory):
    """The clean miniature model's original prompts exported as heads (no trigger score)."""
    from tests.helpers import run_cli_plain

    out = tmp_path_factory.mktemp("original") / "heads"
    tb = mini_testbeds["none"]
    code, _, err = run_cli_plain("export", "--model", tb / "model.pt", "--classes", tb / "classes.txt", "--out", out)
    assert code == 0, err
    return out
