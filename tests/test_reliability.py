"""Defects a hostile or careless user found (docs/security.md): each case reproduced, and held."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_cli, save_tiny_model


def test_non_finite_weights_are_refused_at_load_and_never_reach_the_warp(tmp_path, capsys, mini_testbeds):
    from cbpt.trigger import warp

    path = save_tiny_model(tmp_path / "m")
    state = torch.load(path, weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, path)
    tb = mini_testbeds["blended"]
    code, _, err = run_cli(capsys, "purify", path, "--data", tb / "fewshot", "--out", tmp_path / "p")
    assert code == 1 and "non-finite weights (NaN or inf)" in err and "re-download" in err
    assert not (tmp_path / "p").exists()
    # grid_sample's backward crashed (SIGSEGV) on a NaN grid: a NaN field is refused before it
    flow = torch.full((8, 8, 2), float("nan"), requires_grad=True)
    with pytest.raises(FloatingPointError, match="not finite"):
        warp(torch.rand(1, 3, 8, 8), flow)


def test_classify_never_writes_over_an_input(original_heads, tmp_path, capsys, mini_testbeds):
    src = sorted((mini_testbeds["none"] / "test").glob("*/*.png"))[:3]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in src:
        (folder / f.name).write_bytes(f.read_bytes())
    victim = folder / src[0].name
    before = victim.read_bytes()
    code, _, err = run_cli(capsys, "classify", original_heads, folder, "--out", victim)
    assert code == 2 and "must end in .jsonl, .csv or .parquet" in err
    listed = tmp_path / "list.jsonl"
    listed.write_text("")
    code, _, err = run_cli(capsys, "classify", original_heads, folder, listed, "--out", listed)
    assert code == 2 and "is one of the inputs" in err
    assert victim.read_bytes() == before


def test_resume_knows_a_path_however_it_is_spelled(original_heads, tmp_path, capsys, mini_testbeds, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in sorted((mini_testbeds["none"] / "test").glob("*/*.png"))[:6]:
        (folder / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    out = tmp_path / "out.jsonl"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "classify", original_heads, "imgs", "--out", out)
    assert code == 0, err
    code, _, err = run_cli(capsys, "classify", original_heads, folder.resolve(), "--out", out, "--resume")
    assert code == 0, err
    assert "classified 0 image(s), 0 unreadable, 6 skipped" in err
    assert len(out.read_text().splitlines()) == 6


def test_purify_refuses_a_folder_it_did_not_write_before_any_work(tmp_path, capsys, mini_testbeds):
    tb = mini_testbeds["blended"]
    mine = tmp_path / "tbcopy"
    mine.mkdir()
    (mine / "classes.txt").write_text("mine\n")
    (mine / "report.json").write_text('{"user": "notes"}')
    code, _, err = run_cli(capsys, "purify", tmp_path / "no-such-model.pt", "--data", tb / "fewshot", "--out", mine)
    assert code == 2 and "not written by cbpt-guard" in err and "--overwrite" in err  # checked before loading
    assert (mine / "classes.txt").read_text() == "mine\n" and (mine / "report.json").read_text() == '{"user": "notes"}'
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(
        capsys, "export", "--model", tb / "model.pt", "--classes", tb / "classes.txt", "--out", tmp_path / "afile"
    )
    assert code == 2 and "is a file" in err


def test_an_export_replaces_its_own_outputs_and_triton_models_whole(tmp_path, capsys, mini_testbeds):
    tb = mini_testbeds["none"]
    args = (
        "export",
        "--model",
        tb / "model.pt",
        "--classes",
        tb / "classes.txt",
        "--out",
        tmp_path / "h",
        "--triton",
        tmp_path / "tr",
    )
    (tmp_path / "tr" / "someone_elses").mkdir(parents=True)
    code, _, err = run_cli(capsys, *args, "--fp16")
    assert code == 0, err
    assert (tmp_path / "h" / "classifier_fp16.onnx").is_file() and (tmp_path / "tr" / "cbpt_head_fp16").is_dir()
    code, _, err = run_cli(capsys, *args)  # again, without the fp16 twins
    assert code == 0, err
    assert not (tmp_path / "h" / "classifier_fp16.onnx").exists()
    files = json.loads((tmp_path / "h" / "manifest.json").read_text())["files"]
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == sorted([*files, "manifest.json", ".cbpt-guard"])
    assert sorted(p.name for p in (tmp_path / "tr").iterdir()) == ["cbpt_classifier", "cbpt_head", "someone_elses"]


def _copy_heads(src, dst, edit=None, rehash=True):
    """A copy of exported heads, edited by `edit(folder)`, with the manifest rehashed (a careless
    user 'fixing' it) or not."""
    import hashlib
    import shutil

    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    if rehash:
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["files"] = {n: hashlib.sha256((dst / n).read_bytes()).hexdigest() for n in manifest["files"]}
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _edit_json(name, **changes):
    def edit(folder):
        data = json.loads((folder / name).read_text())
        data.update(changes)
        (folder / name).write_text(json.dumps(data))

    return edit


@pytest.mark.parametrize(
    "case, needle",
    [
        ("unlisted", "does not list preprocess.json"),
        ("std0", "std positive"),
        ("size", "exported for [32, 32] px, preprocess.json says [64, 64]"),
        ("head", "inputs are ['image_features'], not pixel_values"),
        ("notjson", "is not valid JSON"),
    ],
)
def test_heads_that_would_answer_wrongly_are_refused_before_serving(original_heads, tmp_path, capsys, case, needle):
    import shutil

    def unlist(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        del manifest["files"]["preprocess.json"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
        _edit_json("preprocess.json", std=[-1.0, -1.0, -1.0])(folder)

    edits = {
        "unlisted": (unlist, False),
        "std0": (_edit_json("preprocess.json", std=[0.0, 0.2, 0.2]), True),
        "size": (_edit_json("preprocess.json", size=[64, 64]), True),
        "head": (lambda f: shutil.copy(f / "head.onnx", f / "classifier.onnx"), True),
        "notjson": (lambda f: (f / "preprocess.json").write_text("{nope"), True),
    }
    edit, rehash = edits[case]
    heads = _copy_heads(original_heads, tmp_path / "h", edit, rehash)
    code, _, err = run_cli(capsys, "classify", heads, heads / "classes.txt", "--out", tmp_path / "o.jsonl")
    assert code in (1, 2) and needle in err, err
    assert "internal error" not in err and not (tmp_path / "o.jsonl").exists()


def test_preprocess_json_is_validated():
    from cbpt_guard.errors import UserError
    from guard.preprocess import PreprocessSpec

    good = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.2] * 3}
    assert PreprocessSpec.from_dict(good).size == (32, 32)
    for bad, needle in [
        ({"size": [0, 32]}, "not positive"),
        ({"mean": [0.5]}, "three values"),
        ({"std": [0.2, float("nan"), 0.2]}, "finite"),
        ({"resize_mode": "crop"}, "resize_mode"),
        ({"size": None}, "invalid"),
    ]:
        with pytest.raises(UserError, match=needle):
            PreprocessSpec.from_dict({**good, **bad})


def _write_csv(tmp_path, rows, encoding="utf-8", bom=False):
    from tests.helpers import make_image_folder

    make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    text = "path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows)
    data = text.encode(encoding)
    (tmp_path / "data.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return tmp_path / "data.csv"


def test_careless_csvs_are_refused_or_read_as_meant(tmp_path):
    from cbpt.data import discover, sample_shots
    from cbpt_guard.errors import UserError

    rows = [(f"imgs/{c}/{i:03d}.png", c) for c in "ab" for i in range(3)]
    ds = discover(_write_csv(tmp_path, rows, bom=True))  # Excel's byte-order mark
    assert ds.classnames == ("a", "b") and len(ds) == 6
    with pytest.raises(UserError, match="numbers.*--classes"):
        discover(_write_csv(tmp_path, [(p, str("ab".index(c))) for p, c in rows]))
    with pytest.raises(UserError, match="more than once"):
        discover(_write_csv(tmp_path, rows + rows[:1]))
    with pytest.raises(UserError, match="not UTF-8"):
        discover(_write_csv(tmp_path, [*rows, ("imgs/a/000.png", "caf\u00e9")], encoding="latin-1"))
    with pytest.raises(UserError, match="one class"):
        sample_shots(discover(_write_csv(tmp_path, rows[:3])), 1)


def _png(w, h, rows):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + bytes(w) for _ in range(rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_truncated_images_are_refused_and_16_bit_ones_keep_their_brightness():
    import io

    import numpy as np
    from PIL import Image

    from cbpt_guard.images import TruncatedImage, decode

    assert decode(_png(64, 64, 64)).size == (64, 64)
    with pytest.raises(TruncatedImage, match="missing"):
        decode(_png(7000, 5000, 1))  # 87 bytes that Pillow alone decodes as a black 35-megapixel image
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # up to 65520
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    img = decode(buf.getvalue())
    assert img.mode == "L" and np.asarray(img).max() == 255 and np.asarray(img).mean() == pytest.approx(127.5, abs=1)


def test_checkpoint_bombs_are_refused_before_they_inflate(tmp_path):
    import pickle
    import zipfile

    from cbpt.checkpoint import _rebuild_tensor, read_checkpoint
    from cbpt_guard.errors import UserError

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", bytes(64 << 20))  # 64 MB of zeros in a ~65 KB file
    with pytest.raises(UserError, match="zip bomb"):
        read_checkpoint(bomb)
    with pytest.raises(pickle.UnpicklingError, match="Damaged tensor"):  # a zero-stride view of 4 floats
        _rebuild_tensor(torch.zeros(4), 0, (32768, 16384), (0, 0))
    assert _rebuild_tensor(torch.arange(6.0), 1, (2, 2), (2, 1)).tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_a_compressed_checkpoint_and_a_bad_sidecar_get_clear_answers(tmp_path, capsys):
    import zipfile

    from cbpt.checkpoint import read_checkpoint

    path = save_tiny_model(tmp_path / "m")
    deflated = tmp_path / "m" / "deflated.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert read_checkpoint(deflated).state_dict.keys() == read_checkpoint(path).state_dict.keys()
    arch = json.loads((tmp_path / "m" / "arch.json").read_text())
    arch["model_cfg"]["bogus_kw"] = 1
    (tmp_path / "m" / "arch.json").write_text(json.dumps(arch))
    code, _, err = run_cli(capsys, "info", path)
    assert code == 1 and "arch.json's model_cfg does not build an open_clip CLIP" in err and "bogus_kw" in err


def test_classify_says_its_records_are_kept_when_interrupted(
    original_heads, tmp_path, capsys, mini_testbeds, monkeypatch
):
    import guard.classify

    real = guard.classify.classify_paths

    def interrupted(*a, **k):
        yield next(real(*a, **k))
        raise KeyboardInterrupt

    monkeypatch.setattr(guard.classify, "classify_paths", interrupted)
    out = tmp_path / "o.jsonl"
    code, _, err = run_cli(capsys, "classify", original_heads, mini_testbeds["none"] / "test", "--out", out)
    assert code == 130 and "records written so far are kept; rerun with --resume" in err
    assert len(out.read_text().splitlines()) == 1


def test_classify_names_what_it_cannot_read_without_hanging(original_heads, tmp_path, capsys):
    import os

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    code, stdout, err = run_cli(capsys, "classify", original_heads, fifo)
    assert code == 0, err
    rec = json.loads(stdout.splitlines()[0])
    assert rec["path"] == str(fifo) and "not a regular file" in rec["error"]
    code, _, err = run_cli(capsys, "classify", original_heads, fifo, "--top-k", "-3")
    assert code == 2


def test_cuda_asked_for_and_not_there_is_refused_not_silently_cpu(original_heads, tmp_path, capsys):
    from guard.heads import _cuda_device_present

    if _cuda_device_present():
        pytest.skip("a GPU is present: CUDA is really used")
    code, _, err = run_cli(capsys, "classify", original_heads, tmp_path, "--device", "cuda")
    assert code == 2 and "--device cuda" in err and "--device cpu" in err


def test_a_damaged_torchscript_archive_is_named_not_an_internal_error(tmp_path, capsys):
    import zipfile

    path = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/constants.pkl", b"\x80\x02).")
        z.writestr("archive/data.pkl", b"\x80\x02ctorch\nFloatStorage\n)R.")  # calls a dtype: TypeError inside
    code, _, err = run_cli(capsys, "info", path)
    assert code == 1 and "damaged TorchScript archive (TypeError" in err and "internal error" not in err


def test_an_infinite_logit_scale_is_refused_at_load(tmp_path, capsys, mini_testbeds):
    path = save_tiny_model(tmp_path / "m")
    state = torch.load(path, weights_only=True)
    state["logit_scale"] = torch.tensor(float("inf"))
    torch.save(state, path)
    code, _, err = run_cli(capsys, "scan", path, "--data", mini_testbeds["blended"] / "fewshot")
    assert code == 1 and "non-finite weights" in err and "logit_scale" in err and "--fp16" not in err
