"""ONNX export: parity with PyTorch for real architectures, Triton configs, errors, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import run_cli


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_original_head_export_matches_pytorch_at_batch_1_and_5(arch, real_checkpoints, tmp_path, capsys):
    import onnx
    import torch

    from cbpt.model import load_clip
    from cbpt.purify import original_head

    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    out = tmp_path / "heads"
    code, stdout, err = run_cli(
        capsys,
        "export",
        "--model",
        real_checkpoints[arch]["state_dict"],
        "--classes",
        tmp_path / "classes.txt",
        "--out",
        out,
        "--triton",
        tmp_path / "triton",
        "--fp16",
        "--json",
    )
    assert code == 0, err
    parity = json.loads(stdout)["parity"]
    # random weights give near-tied logits, so fp16 may swap a close pair; its probabilities stay close
    assert parity["classifier_fp16.onnx"]["max_abs_probs"] < 0.05 and parity["classifier_fp16.onnx"]["inputs"] == 6
    clip = load_clip(real_checkpoints[arch]["state_dict"])
    weights = original_head(clip, ("cat", "dog", "bird"))
    scale = clip.logit_scale
    sess = _ort(out / "classifier.onnx")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = scale * torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1) @ weights.T
        logits, probs, feats = sess.run(["logits", "probs", "image_features"], {"pixel_values": x.numpy()})
        assert logits.shape == (batch, 3)
        assert np.abs(logits - ref.numpy()).max() <= 1e-4 * scale
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
    model = onnx.load(str(out / "classifier.onnx"))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == ["cat", "dog", "bird"] and meta["embed_dim"] == str(weights.shape[1])
    assert {
        "image_size",
        "mean",
        "std",
        "resize_mode",
        "source_checkpoint_sha256",
        "embeddings_sha256",
        "tool_version",
    } <= set(meta)
    assert model.opset_import[0].version >= 17 and model.ir_version <= 10
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib

    for name, sha in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["size"] == [224, 224] and pre["interpolation"] == "bicubic" and pre["resize_mode"] == "shortest"


def test_triton_configs_parse_with_tritons_schema(tmp_path, real_checkpoints, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from export.triton import config_pbtxt

    text = config_pbtxt("cbpt_classifier", [("pixel_values", [3, 224, 224])], 3, 512, True, True)
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size > 0
    assert [o.name for o in cfg.output] == ["logits", "probs", "trigger_score", "image_features"]
    assert list(cfg.input[0].dims) == [3, 224, 224] and cfg.output[0].label_filename == "labels.txt"
    assert cfg.HasField("dynamic_batching")


def test_purified_heads_carry_the_trigger_score_and_alarm(purified, tmp_path, capsys):
    import onnx
    from safetensors.torch import load_file

    from export.graphs import HeadSpec, build_head

    out = purified
    sess = _ort(out / "head.onnx")
    assert [o.name for o in sess.get_outputs()] == ["logits", "probs", "trigger_score"]
    centres = load_file(str(out / "embeddings.safetensors"))["trigger_centroids"].numpy()
    assert centres.shape[0] >= 1 and np.allclose(np.linalg.norm(centres, axis=1), 1, atol=1e-5)
    # the score is the largest cosine to the alarm's centres, whatever the features' norm: the
    # purified folder's own, and a head with several centres as a found backdoor's has
    rng = np.random.default_rng(0)
    several = rng.normal(size=(3, 32)).astype(np.float32)
    several /= np.linalg.norm(several, axis=1, keepdims=True)
    weights = load_file(str(out / "embeddings.safetensors"))["purified"].numpy()
    built = tmp_path / "several.onnx"
    built.write_bytes(build_head(HeadSpec(weights, 10.0, several)).SerializeToString())
    for session, cs in ((sess, centres), (_ort(built), several)):
        feats = np.concatenate([2.0 * cs, -cs[:1], np.ones((1, 32), np.float32)])
        score = session.run(["trigger_score"], {"image_features": feats})[0]
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        assert score.shape == (len(feats),) and np.allclose(score, (unit @ cs.T).max(1), atol=1e-5)
        assert np.allclose(score[: len(cs)], 1.0, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(out / "head.onnx")).metadata_props}
    assert "trigger_alarm_threshold" in meta
    # re-export from the folder into Triton
    code, _, err = run_cli(capsys, "export", out, "--out", tmp_path / "again", "--triton", tmp_path / "tr")
    assert code == 0, err
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for model in ("cbpt_head", "cbpt_classifier"):
        text_format.Parse((tmp_path / "tr" / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert (tmp_path / "tr" / model / "1" / "model.onnx").is_file()


def test_incomplete_or_tampered_sources_are_refused(purified, tmp_path, capsys):
    import shutil

    src = purified
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "report.json").unlink()
    code, _, err = run_cli(capsys, "export", broken, "--out", tmp_path / "h1")
    assert code == 1 and "missing report.json" in err and not (tmp_path / "h1").exists()
    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    data = bytearray((tampered / "embeddings.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "embeddings.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "export", tampered, "--out", tmp_path / "h2")
    assert code == 1 and "hash mismatch" in err and not (tmp_path / "h2").exists()
    code, _, err = run_cli(capsys, "export", "--out", tmp_path / "h3")
    assert code == 2 and "either a purify output folder" in err


def test_alarm_centres_of_older_folders_and_bad_shapes():
    from cbpt_guard.errors import UserError
    from export.package import _alarm_centres

    one = np.ones(8, np.float32)
    # folders purified when the alarm had one centre keep serving it
    assert _alarm_centres({"trigger_centroid": one}, 8).shape == (1, 8)
    assert _alarm_centres({"trigger_centroids": np.ones((3, 8), np.float32)}, 8).shape == (3, 8)
    assert _alarm_centres({}, 8) is None
    with pytest.raises(UserError, match="centres have shape"):
        _alarm_centres({"trigger_centroids": np.ones((3, 7), np.float32)}, 8)


def test_failed_parity_writes_nothing(mini_testbeds, tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    import export.parity

    real = export.parity.check_parity

    def corrupt(clip, blobs, head, seed=0):
        return real(clip, blobs, replace(head, weights=head.weights * -1), seed)

    monkeypatch.setattr(export.parity, "check_parity", corrupt)
    tb = mini_testbeds["none"]
    code, _, err = run_cli(
        capsys, "export", "--model", tb / "model.pt", "--classes", tb / "classes.txt", "--out", tmp_path / "h"
    )
    assert code == 1 and "parity check failed" in err
    assert not (tmp_path / "h").exists()


def _float_types(model):
    import onnx

    g = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def test_fp16_twins_compute_in_half_with_layernorm_and_softmax_in_fp32(
    mini_testbeds, real_checkpoints, tmp_path, capsys
):
    """The fp16 classifier keeps the fp32 interface, halves the file, agrees with fp32 on the
    test split, and its fragile ops see fp32 inputs; the guard and Triton can run it."""
    import onnx
    from onnx import TensorProto

    from cbpt.model import load_clip
    from export.fp16 import to_fp16
    from export.onnx_encoder import export_encoder

    tb = mini_testbeds["blended"]
    out = tmp_path / "heads"
    code, stdout, err = run_cli(
        capsys,
        "export",
        "--model",
        tb / "model.pt",
        "--classes",
        tb / "classes.txt",
        "--out",
        out,
        "--fp16",
        "--triton",
        tmp_path / "tr",
    )
    assert code == 0, err
    assert "fp16: top-1 agreement" in stdout
    # the classifier's weights dominate its file: halved, it is little over half the size
    assert (out / "classifier_fp16.onnx").stat().st_size < 0.6 * (out / "classifier.onnx").stat().st_size
    for name in ("head", "classifier"):
        full, half = out / f"{name}.onnx", out / f"{name}_fp16.onnx"
        s32, s16 = _ort(full), _ort_fp16(half)
        assert [(i.name, i.type) for i in s16.get_inputs()] == [(i.name, i.type) for i in s32.get_inputs()]
        assert [(o.name, o.type) for o in s16.get_outputs()] == [(o.name, o.type) for o in s32.get_outputs()]
    # the runtime guard on the test split: same decisions on >= 98% of images
    code, out32, err = run_cli(capsys, "classify", out, tb / "test", "--top-k", "1", "--device", "cpu")
    assert code == 0, err
    code, out16, err = run_cli(capsys, "classify", out, tb / "test", "--top-k", "1", "--device", "cpu", "--fp16")
    assert code == 0, err
    top = lambda text: {r["path"]: r["label"] for r in map(json.loads, text.splitlines())}  # noqa: E731
    a, b = top(out32), top(out16)
    assert len(a) >= 50 and sum(a[k] == b[k] for k in a) / len(a) >= 0.98
    assert (tmp_path / "tr" / "cbpt_classifier_fp16" / "1" / "model.onnx").is_file()
    # the fragile ops run in fp32 in every architecture; matrix products in fp16
    for model in (load_clip(tb / "model.pt"), load_clip(real_checkpoints["ViT-B-32"]["state_dict"])):
        half = to_fp16(export_encoder(model))
        types = _float_types(half)
        ops = {}
        for node in half.graph.node:
            ins = {types.get(i) for i in node.input[:1]}
            ops.setdefault(node.op_type, set()).update(ins)
        for op in ("Softmax", "LayerNormalization", "ReduceMean"):
            assert ops.get(op, {TensorProto.FLOAT}) == {TensorProto.FLOAT}, op
        assert ops["MatMul"] == {TensorProto.FLOAT16} and ops["Conv"] == {TensorProto.FLOAT16}
        assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
        onnx.checker.check_model(half, full_check=True)


def test_guard_refuses_fp16_when_not_exported(original_heads, mini_testbeds, capsys):
    code, _, err = run_cli(capsys, "classify", original_heads, mini_testbeds["none"] / "test", "--fp16")
    assert code == 1 and "no classifier_fp16.onnx" in err and "--fp16" in err


def _ort_fp16(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])


def test_int8_classifier_is_calibrated_checked_and_served(mini_testbeds, purified, tmp_path, capsys, monkeypatch):
    """The miniature model is too undertrained for a meaningful agreement figure (its logits are
    near-tied), so the bar is forced: above any graph for the refusal, below for the plumbing."""
    import export.int8

    monkeypatch.setattr(export.int8, "AGREEMENT_BAR", 1.01)
    code, _, err = run_cli(capsys, "export", purified, "--out", tmp_path / "refused", "--int8")
    assert code == 1 and "under the 101% bar; nothing was written" in err and not (tmp_path / "refused").exists()
    assert "with MatMul, Gemm, Conv in int8 and" in err  # the convolutions were left in float on the second try
    monkeypatch.setattr(export.int8, "AGREEMENT_BAR", 0.0)
    out = tmp_path / "h"
    code, stdout, err = run_cli(capsys, "export", purified, "--out", out, "--int8", "--triton", tmp_path / "tr")
    assert code == 0, err
    report = json.loads((out / "manifest.json").read_text())["parity"]["classifier_int8.onnx"]
    # K = 16: 12 tuning shots per class, every other one (60) and its triggered copy calibrate;
    # the other 60 and the 40 held out check
    assert report["quantised_ops"] == ["MatMul", "Gemm", "Conv"] and report["n_calibration"] == 120
    assert report["n_clean"] == report["n_triggered"] == 100 and f"{report['top1_agreement']:.1%}" in stdout
    # the recorded agreement is the written graph's, on the check images
    import onnx

    q = onnx.load(str(out / "classifier_int8.onnx"))
    assert {n.op_type for n in q.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert any(n.name.startswith("head/") and n.op_type == "MatMul" for n in q.graph.node)  # the head stays float
    assert {p.key: p.value for p in q.metadata_props}["precision"].startswith("int8")
    code, out8, err = run_cli(capsys, "classify", out, mini_testbeds["blended"] / "test", "--int8", "--top-k", "1")
    assert code == 0, err and len(out8.splitlines()) == 50
    assert (tmp_path / "tr" / "cbpt_classifier_int8" / "1" / "model.onnx").is_file()
    code, _, err = run_cli(
        capsys,
        "export",
        "--model",
        mini_testbeds["none"] / "model.pt",
        "--classes",
        mini_testbeds["none"] / "classes.txt",
        "--out",
        tmp_path / "o",
        "--int8",
    )
    assert code == 2 and "calibrates on the defender's shots" in err


def test_the_embeddings_file_is_the_same_bytes_whatever_order_safetensors_keeps_its_metadata_in(tmp_path):
    """safetensors keeps metadata in a hash map whose order changes from process to process, so
    the same purify gave a different embeddings_sha256 (and different heads) on every run. Written
    canonically, any order of the same metadata gives one file, which reads back the same."""
    import struct

    import torch
    from safetensors import safe_open
    from safetensors.torch import load

    from cbpt.outputs import _embeddings
    from cbpt_guard.artifacts import canonical_safetensors

    tensors = {"purified": torch.arange(12.0).reshape(3, 4), "original": torch.ones(3, 4)}
    meta = {"tool": "t", "classes": '["ä", "b"]', "architecture": "x", "checkpoint_sha256": "0" * 64}
    blob = _embeddings(tensors, meta)

    def reordered(b: bytes, keys: list[str]) -> bytes:  # the same file with its metadata in `keys` order
        (n,) = struct.unpack("<Q", b[:8])
        header = json.loads(b[8 : 8 + n])
        header["__metadata__"] = {k: header["__metadata__"][k] for k in keys}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return struct.pack("<Q", len(text)) + text + b[8 + n :]

    orders = [sorted(meta), sorted(meta, reverse=True), list(meta)]
    assert len({reordered(blob, keys) for keys in orders}) == 3  # the orders are different files...
    assert {canonical_safetensors(reordered(blob, keys)) for keys in orders} == {blob}  # ...one written
    back = load(blob)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    path = tmp_path / "e.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
