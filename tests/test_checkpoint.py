"""Loading suspicious checkpoints: every form, architecture detection, and every refusal."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import pytest

from tests.helpers import TINY_CFG, run_cli, save_tiny_model

FORMS = ("state_dict", "safetensors", "training_checkpoint", "openai_torchscript")


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
@pytest.mark.parametrize("form", FORMS)
def test_info_identifies_real_architectures_in_every_form(capsys, real_checkpoints, arch, form):
    code, out, err = run_cli(capsys, "info", real_checkpoints[arch][form], "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == form
    # OpenAI archives were trained with QuickGELU: same shapes, different activation.
    expected = f"{arch}-quickgelu" if form == "openai_torchscript" else arch
    assert info["architecture"] == expected
    assert info["arch_source"] == "detected"
    assert {arch, f"{arch}-quickgelu"} <= set(info["candidates"])
    assert info["image_size"] == 224
    assert info["embed_dim"] == {"ViT-B-32": 512, "RN50": 1024}[arch]
    assert info["num_params"] == {"ViT-B-32": 151_277_313, "RN50": 102_007_137}[arch]


def test_info_prints_a_readable_table(capsys, real_checkpoints):
    code, out, _ = run_cli(capsys, "info", real_checkpoints["RN50"]["state_dict"])
    assert code == 0
    assert "RN50 (detected)" in out and "102,007,137" in out and "1024" in out


def test_loaded_weights_equal_the_saved_ones(real_checkpoints):
    import torch

    from cbpt.model import load_clip

    reference = torch.load(real_checkpoints["RN50"]["state_dict"], weights_only=True)
    for form in FORMS[:3]:
        loaded = load_clip(real_checkpoints["RN50"][form]).model.state_dict()
        for key in ("visual.conv1.weight", "text_projection", "visual.attnpool.c_proj.bias"):
            assert torch.equal(loaded[key], reference[key].float()), (form, key)


def test_openai_archive_weights_survive_restricted_unpickling(real_checkpoints):
    import warnings

    import torch

    from cbpt.checkpoint import read_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(real_checkpoints["ViT-B-32"]["openai_torchscript"]))
    ours = read_checkpoint(real_checkpoints["ViT-B-32"]["openai_torchscript"]).state_dict
    theirs = scripted.state_dict()
    assert set(ours) == set(theirs) - {"attn_mask"}  # the causal mask is a buffer, not a weight
    for key in ("visual.proj", "visual.transformer.resblocks.11.mlp.c_proj.weight", "token_embedding.weight"):
        assert torch.equal(ours[key], theirs[key].float())


def test_sidecar_architecture_is_read(tmp_path, capsys):
    path = save_tiny_model(tmp_path / "m", name="tiny-test")
    code, out, err = run_cli(capsys, "info", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["architecture"], info["arch_source"], info["image_size"], info["embed_dim"]) == (
        "tiny-test",
        "sidecar",
        32,
        32,
    )


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": _RunsCode(marker)}}, evil)
    code, out, err = run_cli(capsys, "info", evil)
    assert code == 1
    assert "refused to load" in err and "system" in err and "nothing was executed" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not marker.exists()


def test_torchscript_archive_with_code_is_refused(tmp_path, capsys, real_checkpoints):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil-openai.pt"
    with zipfile.ZipFile(real_checkpoints["RN50"]["openai_torchscript"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(_RunsCode(marker), protocol=2)
            dst.writestr(item, data)
    code, _, err = run_cli(capsys, "info", evil)
    assert code == 1 and "refused to load" in err and "system" in err
    assert not marker.exists()


def test_benign_but_non_tensor_pickle_is_refused(tmp_path, capsys):
    import argparse

    import torch

    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, path)
    code, _, err = run_cli(capsys, "info", path)
    assert code == 1 and "refused to load" in err and "Namespace" in err


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "is empty"),
        (b"hello, this is a text file\n", "not a checkpoint"),
        (os.urandom(4096), "not a checkpoint"),
    ],
)
def test_not_a_checkpoint(tmp_path, capsys, content, needle):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "info", path)
    assert code == 1 and needle in err and "Traceback" not in err


def test_pickle_without_tensors_is_not_a_checkpoint(tmp_path, capsys):
    import torch

    path = tmp_path / "model.pt"
    torch.save({"epoch": 1, "name": "x"}, path)
    code, _, err = run_cli(capsys, "info", path)
    assert code == 1 and "no tensors" in err


def test_missing_file_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", tmp_path / "nope.pt")
    assert code == 2 and "checkpoint not found" in err


def test_unknown_architecture_names_the_closest_and_the_difference(tmp_path, capsys):
    import open_clip
    import torch

    cfg = json.loads(json.dumps(TINY_CFG))
    torch.save(open_clip.CLIP(**cfg).state_dict(), tmp_path / "odd.pt")  # no sidecar
    code, _, err = run_cli(capsys, "info", tmp_path / "odd.pt")
    assert code == 1 and "unknown architecture" in err and "--arch" in err


def test_not_a_clip_is_an_unknown_architecture(tmp_path, capsys):
    import torch

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "mlp.pt")
    code, _, err = run_cli(capsys, "info", tmp_path / "mlp.pt")
    assert code == 1 and "unknown architecture" in err and "text_projection" in err


def test_shape_mismatch_names_the_first_mismatched_tensors(capsys, real_checkpoints):
    code, _, err = run_cli(capsys, "info", real_checkpoints["RN50"]["safetensors"], "--arch", "ViT-B-16")
    assert code == 1 and "shape mismatch" in err
    assert "text_projection is [512, 1024] in the checkpoint but [512, 512] in the model" in err


def test_unknown_arch_name_is_a_usage_error(capsys, real_checkpoints):
    code, _, err = run_cli(capsys, "info", real_checkpoints["RN50"]["safetensors"], "--arch", "ViT-Q-99")
    assert code == 2 and "unknown architecture 'ViT-Q-99'" in err


def test_explicit_arch_resolves_the_quickgelu_ambiguity(capsys, real_checkpoints):
    code, out, _ = run_cli(capsys, "info", real_checkpoints["RN50"]["state_dict"], "--arch", "RN50-quickgelu", "--json")
    assert code == 0 and json.loads(out)["architecture"] == "RN50-quickgelu"
