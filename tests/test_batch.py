"""Batch classification: the local engine's pool, Parquet output, resuming after a crash, and
the Ray engine on a local Ray (num_cpus=2) started and stopped here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def images(mini_testbeds, tmp_path_factory):
    """40 test images of the backdoored miniature, a corrupt PNG and a text file named .jpg."""
    folder = tmp_path_factory.mktemp("batch") / "imgs"
    folder.mkdir()
    for i, src in enumerate(sorted((mini_testbeds["blended"] / "test").glob("*/*.png"))[:40]):
        shutil.copy(src, folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.jpg").write_text("hello")
    return folder


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _rows(out) -> dict[str, dict]:
    table = pq.read_table(out)
    return {r["path"]: r for r in table.to_pylist()}


def test_local_engine_writes_parquet_with_the_jsonl_answers(purified, images, tmp_path, capsys):
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", tmp_path / "r.jsonl", "--workers", "2")
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "classify", purified, images, "--out", tmp_path / "r.parquet", "--rows-per-part", "16"
    )
    assert code == 0, err
    assert "classified 40 image(s), 2 unreadable" in err
    parts = sorted((tmp_path / "r.parquet").glob("part-*.parquet"))
    assert len(parts) == 3  # 42 rows, 16 a part
    schema = pq.read_schema(parts[0])
    assert schema.names == ["path", "label", "index", "probs", "trigger_score", "trigger_alarm", "error"]
    classes = json.loads(schema.metadata[b"cbpt_guard.classes"])
    rows = _rows(tmp_path / "r.parquet")
    jsonl = {r["path"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert rows.keys() == jsonl.keys() and len(rows) == 42
    for path, want in jsonl.items():
        got = rows[path]
        if "error" in want:
            assert got["error"] == want["error"] and got["label"] is None
            continue
        assert got["label"] == want["label"] and got["error"] is None
        assert got["probs"] == pytest.approx([want["probs"][c] for c in classes], abs=1e-6)
        assert got["trigger_score"] == pytest.approx(want["trigger_score"], abs=1e-6)
        assert got["trigger_alarm"] == want["trigger_alarm"]
    assert rows[str(images / "notes.jpg")]["error"] == (
        "NotAnImage: not an image file Pillow can read (unknown format, or corrupt header)"
    )


def test_the_decoding_pool_keeps_input_order_and_answers():
    from guard.loading import ordered_map

    assert list(ordered_map(lambda x: x * x, range(50), workers=3, ahead=4)) == [x * x for x in range(50)]
    assert list(ordered_map(lambda x: -x, [1, 2], workers=0, ahead=1)) == [-1, -2]


def test_a_crashed_parquet_run_resumes_with_every_path_once(purified, images, tmp_path, capsys, monkeypatch):
    import guard.results

    real = guard.results.ParquetSink._write_part
    calls = {"n": 0}

    def dies_after_the_first_part(self, n):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("disk went away")  # as if the process died: nothing more is written
        real(self, n)

    monkeypatch.setattr(guard.results.ParquetSink, "_write_part", dies_after_the_first_part)
    out = tmp_path / "r.parquet"
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", out, "--rows-per-part", "10")
    assert code == 1 and "disk went away" in err
    assert len(_rows(out)) == 10
    monkeypatch.setattr(guard.results.ParquetSink, "_write_part", real)
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", out, "--resume", "--top-k", "1")
    assert code == 1 and "--top-k None, not 1" in err  # a resumed run keeps the output's shape
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", out, "--resume", "--rows-per-part", "10")
    assert code == 0, err
    assert "10 skipped (already done)" in err
    paths = pq.read_table(out)["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 42


def test_parquet_output_refuses_what_is_not_its_own(purified, images, tmp_path, capsys):
    (tmp_path / "r.parquet").write_text("a file")
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", tmp_path / "r.parquet")
    assert code == 2 and "is a file; Parquet output is a folder" in err
    (tmp_path / "theirs.parquet").mkdir()
    (tmp_path / "theirs.parquet" / "data.csv").write_text("x")
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", tmp_path / "theirs.parquet")
    assert code == 2 and "did not write" in err
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", images / "in.parquet")
    assert code == 2 and "overlaps the inputs" in err
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", tmp_path / "r.txt")
    assert code == 2 and "must end in .jsonl, .csv or .parquet" in err
    code, _, err = run_cli(capsys, "classify", purified, images, "--engine", "ray")
    assert code == 2 and "--engine ray needs --out" in err


def test_a_heads_bundle_loads_on_a_worker_and_leaves_no_files_behind(purified, images, tmp_path, monkeypatch):
    import tempfile

    from guard.classify import classify_paths
    from guard.distributed import HeadsBundle
    from guard.heads import load_heads

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the bundle unpacks
    heads = HeadsBundle.read(purified).load(threads=1)
    assert list(tmp_path.iterdir()) == []
    paths = sorted(images.glob("0*.png"))[:5]
    got = [r["label"] for r in classify_paths(heads, paths)]
    assert got == [r["label"] for r in classify_paths(load_heads(purified, threads=1), paths)]


def test_ray_engine_gives_the_local_engines_answers(purified, images, tmp_path, capsys, ray_cluster):
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", tmp_path / "local.parquet", "--top-k", "3")
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "classify", purified, images, "--out", tmp_path / "ray.parquet", "--top-k", "3", "--engine", "ray"
    )
    assert code == 0, err
    assert "classified 40 image(s), 2 unreadable" in err
    local, remote = _rows(tmp_path / "local.parquet"), _rows(tmp_path / "ray.parquet")
    assert local.keys() == remote.keys()
    for path, want in local.items():
        got = remote[path]
        assert (got["label"], got["index"], got["error"], got["trigger_alarm"]) == (
            want["label"],
            want["index"],
            want["error"],
            want["trigger_alarm"],
        )
        if want["top_k"]:
            assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
            assert [t["prob"] for t in got["top_k"]] == pytest.approx([t["prob"] for t in want["top_k"]], abs=1e-6)


def test_an_interrupted_ray_run_resumes_with_every_path_once(
    purified, images, tmp_path, capsys, ray_cluster, monkeypatch
):
    import guard.distributed

    real = guard.distributed._unseen
    calls = {"n": 0}

    def interrupted(table, seen):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(table, seen)

    monkeypatch.setattr(guard.distributed, "ROWS_PER_TASK", 8)  # several Ray blocks for 42 images
    monkeypatch.setattr(guard.distributed, "_unseen", interrupted)
    out = tmp_path / "r.parquet"
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", out, "--engine", "ray", "--batch-size", "8")
    assert code == 130
    first = pq.read_table(out)["path"].to_pylist()
    assert 0 < len(first) < 42
    monkeypatch.setattr(guard.distributed, "_unseen", real)
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", out, "--engine", "ray", "--resume")
    assert code == 0, err
    assert f"{len(first)} skipped (already done)" in err
    paths = pq.read_table(out)["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 42


def test_classify_dataset_on_a_users_ray_dataset(purified, images, tmp_path, capsys, ray_cluster):
    import ray.data

    from guard.distributed import classify_dataset, decode_batch
    from guard.loading import load_image
    from guard.preprocess import PreprocessSpec

    ds = ray.data.read_binary_files(str(images), include_paths=True)
    rows = {Path(r["path"]).name: r for r in classify_dataset(ds, purified, top_k=1).take_all()}
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", tmp_path / "l.jsonl", "--top-k", "1")
    assert code == 0, err
    local = {Path(r["path"]).name: r for r in map(json.loads, (tmp_path / "l.jsonl").read_text().splitlines())}
    assert rows.keys() == local.keys() and len(rows) == 42
    assert all(rows[n]["label"] == local[n].get("label") for n in rows)
    assert rows["broken.png"]["error"] == local["broken.png"]["error"]
    # the Ray stage preprocesses from bytes exactly as the local guard does from the file
    spec = json.loads((purified / "preprocess.json").read_text())
    png = images / "000.png"
    one = decode_batch({"path": np.array([str(png)], dtype=object), "bytes": np.array([png.read_bytes()])}, spec)
    assert np.abs(one["pixels"][0] - load_image(png, PreprocessSpec.from_dict(spec)).pixels).max() <= 1e-6


def test_the_base_install_never_imports_torch_ray_or_pyarrow(purified, images, tmp_path):
    code = (
        "import sys\n"
        "import guard.batch, guard.classify, guard.distributed, guard.loading, guard.results, guard.server\n"
        "import cbpt_cli.app\n"
        "from cbpt_cli.app import main\n"
        f"try:\n    main(['classify', {str(purified)!r}, {str(images)!r}, '--out', {str(tmp_path / 'o.jsonl')!r}])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'pyarrow', 'open_clip'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def triggered(mini_testbeds, tmp_path_factory):
    """12 test images of the backdoored miniature carrying its trigger, and 12 clean ones (the
    miniature's alarm, calibrated on few shots, flags a clean one now and then)."""
    from PIL import Image

    from testbed.triggers import Trigger

    tb = mini_testbeds["blended"]
    files = sorted((tb / "test").glob("*/*.png"))[:12]
    clean = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    folder = tmp_path_factory.mktemp("alarm")
    for i, (c, t) in enumerate(zip(clean, Trigger.load(tb / "trigger").apply(clean, seed=0))):
        Image.fromarray(c).save(folder / f"clean-{i:02d}.png")
        Image.fromarray(t).save(folder / f"trig-{i:02d}.png")
    return folder


def test_on_alarm_flags_rejects_or_abstains_in_classify(purified, triggered, tmp_path, capsys):
    results = {}
    for policy in ("flag", "reject", "abstain"):
        out = tmp_path / f"{policy}.jsonl"
        code, _, err = run_cli(capsys, "classify", purified, triggered, "--out", out, "--on-alarm", policy)
        assert code == 0, err
        results[policy] = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    flagged = {n for n, r in results["flag"].items() if r["trigger_alarm"]}
    assert sum(n.startswith("trig") for n in flagged) >= 9 and sum(n.startswith("clean") for n in flagged) <= 3
    assert f"0 unreadable, 0 skipped (already done), {len(flagged)} raised the trigger alarm" in err
    for name, flag in results["flag"].items():
        rejected, abstained = results["reject"][name], results["abstain"][name]
        if name in flagged:
            assert "label" not in rejected and rejected["error"].startswith("rejected: trigger alarm (trigger_score")
            assert "label" not in abstained and "error" not in abstained and abstained["trigger_alarm"]
        else:
            assert rejected == abstained == flag


def test_on_alarm_reject_answers_422_naming_the_images(purified, triggered, capsys):
    from fastapi.testclient import TestClient

    from guard.heads import load_heads
    from guard.server import create_app

    heads = load_heads(purified)
    files = [("images", (p.name, p.read_bytes())) for p in sorted(triggered.glob("trig-*.png"))[:3]]
    with TestClient(create_app(heads, on_alarm="reject")) as c:
        r = c.post("/v1/classify", files=files)
        assert r.status_code == 422
        body = r.json()
        assert "raised the trigger alarm; rejected" in body["error"]
        assert {a["image"] for a in body["alarms"]} <= {f[1][0] for f in files} and body["alarms"]
        clean = (triggered / "clean-00.png").read_bytes()
        assert c.post("/v1/classify", content=clean).status_code == 200
    with TestClient(create_app(heads, on_alarm="abstain")) as c:
        res = c.post("/v1/classify", files=files).json()["results"]
        assert any("label" not in r and r["trigger_alarm"] for r in res)
        assert 'label="(withheld)"' in c.get("/metrics").text


def test_on_alarm_needs_heads_that_raise_alarms(original_heads, triggered, capsys):
    code, _, err = run_cli(capsys, "classify", original_heads, triggered, "--on-alarm", "abstain")
    assert code == 2 and "has no trigger score or alarm threshold" in err


def test_uris_are_read_through_pyarrow(purified, images, tmp_path, capsys):
    out = tmp_path / "u.jsonl"
    code, _, err = run_cli(capsys, "classify", purified, f"file://{images}", "--out", out, "--top-k", "1")
    assert code == 0, err
    by_uri = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(by_uri) == 42 and all(p.startswith(f"file://{images}/") for p in by_uri)
    code, _, err = run_cli(capsys, "classify", purified, images, "--out", tmp_path / "p.jsonl", "--top-k", "1")
    by_path = {r["path"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert {p.removeprefix("file://"): r.get("label") for p, r in by_uri.items()} == {
        p: r.get("label") for p, r in by_path.items()
    }


def test_the_ray_engine_starts_and_stops_its_own_local_ray(purified, images, tmp_path):
    out = tmp_path / "own.parquet"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "cbpt-guard"), "classify", str(purified), str(images), "--engine", "ray",
         "--out", str(out), "--top-k", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "classified 40 image(s), 2 unreadable" in run.stderr
    assert len(pq.read_table(out)) == 42
