"""The runtime guard: torch-free, open_clip-exact preprocessing, batch classification."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli


@pytest.fixture(scope="module")
def heads(purified):
    """Purified heads of the miniature backdoored testbed (with a trigger score and alarm)."""
    return purified


def _images():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    yield "rgb-wide", Image.fromarray(rgb)
    yield "rgb-tall", Image.fromarray(rng.integers(0, 256, (301, 90, 3), dtype=np.uint8))
    yield "small", Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8))
    yield "L", Image.fromarray(rgb[..., 0])
    yield "LA", Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), mode="LA")
    yield "RGBA", Image.fromarray(np.dstack([rgb, rgb[..., :1]]), mode="RGBA")
    yield "P", Image.fromarray(rgb).convert("P")
    yield "CMYK", Image.fromarray(rgb).convert("CMYK")


@pytest.mark.parametrize("size, interpolation", [(224, "bicubic"), (32, "bilinear"), ((48, 64), "bicubic")])
def test_preprocessing_matches_open_clip(size, interpolation):
    from open_clip.transform import image_transform

    from guard.preprocess import PreprocessSpec, preprocess

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ref = image_transform(size, is_train=False, mean=mean, std=std, interpolation=interpolation)
    hw = size if isinstance(size, tuple) else (size, size)
    spec = PreprocessSpec(size=hw, mean=mean, std=std, interpolation=interpolation)
    for name, img in _images():
        expected = ref(img).numpy()
        got = preprocess(img, spec)
        assert got.shape == expected.shape == (3, *hw), name
        assert np.abs(got - expected).max() <= 1e-6, name


def test_exif_orientation_is_applied():
    from cbpt_guard.images import decode

    img = Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode(buf.getvalue()).size == (10, 20)


def test_decompression_bombs_are_refused():
    from cbpt_guard.images import decode

    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="more than the limit"):
        decode(buf.getvalue(), max_pixels=1_000_000)


def test_loading_heads_and_classifying_never_imports_torch(heads, mini_testbeds):
    img = next((mini_testbeds["blended"] / "test").glob("*/*.png"))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from guard.heads import load_heads\n"
        "from guard.classify import classify_paths\n"
        f"h = load_heads({str(heads)!r})\n"
        f"recs = list(classify_paths(h, [Path({str(img)!r})]))\n"
        "assert recs and 'label' in recs[0], recs\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'open_clip', 'torchvision')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_guard_gives_the_same_answers_as_pytorch(heads, mini_testbeds):
    import torch

    from cbpt.model import load_clip
    from cbpt_guard.images import decode
    from export.package import read_source
    from guard.heads import load_heads
    from guard.preprocess import preprocess

    h = load_heads(heads)
    clip = load_clip(mini_testbeds["blended"] / "model.pt")
    head = read_source(heads).head()  # the purified embeddings where the route says, the original elsewhere
    assert head.route is not None
    files = sorted((mini_testbeds["blended"] / "test").glob("*/*.png"))
    x = np.stack([preprocess(decode(f), h.spec) for f in files])
    ref = torch.stack([clip.transform()(decode(f)) for f in files])
    with torch.no_grad():
        unit = torch.nn.functional.normalize(clip.model.encode_image(ref), dim=-1).numpy()
    routed = head.route.routed(unit)
    assert 0 < routed.sum() < len(files)  # both sets of embeddings answer for some images
    assert np.abs(h.run(x)["logits"] - head.logits(unit)).max() <= 1e-4 * clip.logit_scale


def test_classify_streams_records_errors_and_csv(heads, mini_testbeds, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    src = sorted((mini_testbeds["blended"] / "test").glob("*/*.png"))[:5]
    for i, f in enumerate(src):
        (folder / "sub" / f"{i}.png").write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, "classify", heads, folder, "--out", out, "--batch-size", "2", "--top-k", "3")
    assert code == 0, err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6
    bad = [r for r in recs if "error" in r]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png")
    good = [r for r in recs if "error" not in r]
    assert all(len(r["top_k"]) == 3 and "trigger_score" in r and isinstance(r["trigger_alarm"], bool) for r in good)
    code, _, err = run_cli(capsys, "classify", heads, folder, "--out", tmp_path / "out.csv")
    assert code == 0, err
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0].startswith("path,label,index,prob") and len(lines) == 7


def test_resume_skips_done_paths_and_drops_a_torn_line(heads, mini_testbeds, tmp_path, capsys):
    src = sorted((mini_testbeds["blended"] / "test").glob("*/*.png"))[:4]
    out = tmp_path / "out.jsonl"
    code, _, _ = run_cli(capsys, "classify", heads, *src[:2], "--out", out)
    assert code == 0
    with open(out, "a") as f:
        f.write('{"path": "torn')  # an interrupted write
    code, _, err = run_cli(capsys, "classify", heads, *src, "--out", out, "--resume")
    assert code == 0, err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in recs] == [str(p) for p in src]
    assert "2 skipped" in err


def test_tampered_or_missing_files_are_refused(heads, tmp_path, capsys):
    import shutil

    copy = tmp_path / "h"
    shutil.copytree(heads, copy)
    with open(copy / "classifier.onnx", "ab") as f:
        f.write(b"\0")
    code, _, err = run_cli(capsys, "classify", copy, copy / "classes.txt")
    assert code == 1 and "does not match its sha256" in err
    (copy / "manifest.json").unlink()
    code, _, err = run_cli(capsys, "classify", copy, copy / "classes.txt")
    assert code == 1 and "missing manifest.json" in err
    code, _, err = run_cli(capsys, "classify", tmp_path / "nope", copy)
    assert code == 2 and "heads folder not found" in err


def test_alarm_flags_at_most_one_percent_of_the_clean_shots_it_was_calibrated_on(heads, mini_testbeds, capsys):
    """Every clean shot scored through the served classifier: the alarm's threshold lets at
    most 1% of the calibration features above it, and the shots are among them."""
    rep = json.loads((heads / "report.json").read_text())
    manifest = json.loads((heads / "manifest.json").read_text())
    assert (
        manifest["trigger_alarm_threshold"] == pytest.approx(rep["alarm"]["threshold"]) and rep["alarm"]["fpr"] == 0.01
    )
    code, stdout, err = run_cli(capsys, "classify", heads, mini_testbeds["blended"] / "fewshot", "--top-k", "1")
    assert code == 0, err
    recs = [json.loads(line) for line in stdout.splitlines()]
    assert len(recs) == 160 and all(isinstance(r["trigger_alarm"], bool) for r in recs)
    allowed = int(0.01 * rep["alarm"]["n_clean"])  # calibration features allowed above the threshold
    assert sum(r["trigger_alarm"] for r in recs) <= allowed
    # the alarm is the score against that threshold, not a constant
    assert all(r["trigger_alarm"] == (r["trigger_score"] > rep["alarm"]["threshold"]) for r in recs)
