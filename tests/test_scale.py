"""Scale: the device a run takes, memory bounded by the batch (uint8 shots, passes a batch at a
time give the features one pass gives), and the class-bounded tuning step (docs/scale.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_image_folder, save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cbpt.model import load_clip

    return load_clip(save_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


def test_device_selection_takes_what_torch_sees_and_refuses_what_it_does_not():
    from cbpt.runtime import Precision, Runtime, resolve_device
    from cbpt_guard.errors import UsageError

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want and resolve_device("CPU") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="sees no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(UsageError, match="GPU index must be a number"):
        resolve_device("cuda:x")
    with pytest.raises(UsageError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(UsageError, match="fp32, bf16 or fp16"):
        Runtime.of("cpu", "int4")
    with pytest.raises(UsageError, match="--batch-size"):
        Runtime.of("cpu", "fp32", 0)
    rt = Runtime.of("cpu", "bf16", 7)
    assert rt.precision is Precision.BF16 and rt.encode_batch == 7
    described = Runtime.of("cpu").describe()
    assert described["device"] == "cpu" and described["precision"] == "fp32" and described["peak_rss_mb"] > 50


def test_shots_are_kept_as_uint8_and_give_the_models_own_pixels_exactly(tmp_path, tiny):
    from cbpt.data import ShotBudget, load_shots
    from cbpt.encoding import to_x01
    from cbpt_guard.images import decode

    data = make_image_folder(tmp_path / "d", {"cat": 3, "dog": 3}, size=40)
    shots = load_shots(tiny, data, None, ShotBudget(3, held_out=1), 0)
    assert shots.pixels.dtype == torch.uint8 and shots.held_pixels.dtype == torch.uint8
    assert tuple(shots.pixels.shape) == (4, 3, 32, 32)
    # the model's full eval transform, Normalize included, from the same file
    pp = tiny.preprocess_cfg
    full = tiny.transform()(decode(shots.paths[0]))
    mean, std = torch.tensor(pp["mean"]).view(3, 1, 1), torch.tensor(pp["std"]).view(3, 1, 1)
    assert torch.equal((to_x01(shots.pixels[0]) - mean) / std, full)


def test_a_pass_a_batch_at_a_time_gives_the_features_of_one_big_batch(tiny):
    from cbpt.features import cache_features
    from cbpt.inversion import Candidate
    from cbpt.trigger import DummyTrigger

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (13, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0, 1, 2] * 4 + [0])
    with torch.no_grad():
        whole = tiny.encode_pixels(pixels.float() / 255)
    small = tiny.encoder().__class__(tiny.encode_pixels, tiny.device, 4)
    assert torch.allclose(small.all(pixels), whole, atol=1e-5)
    patch = DummyTrigger(
        torch.zeros(32, 32).index_fill_(0, torch.arange(4), 1.0), torch.rand(3, 32, 32), torch.zeros(3, 32, 32)
    )
    triggers = [Candidate(patch, 1, 1.0, None), Candidate(patch, 2, 1.0, None)]
    big = small.__class__(tiny.encode_pixels, tiny.device, 1000)
    a = cache_features(small, pixels, labels, triggers, views=2, shifts=2, seed=3)
    b = cache_features(big, pixels, labels, triggers, views=2, shifts=2, seed=3)
    assert a.clean.shape == (39, 32) and a.triggered.shape == b.triggered.shape
    assert torch.allclose(a.clean, b.clean, atol=1e-5) and torch.allclose(a.triggered, b.triggered, atol=1e-5)
    assert torch.equal(a.triggered_labels, b.triggered_labels) and torch.equal(a.triggered_targets, b.triggered_targets)


def test_inversion_statistics_over_every_shot_need_no_n_by_n_matrix():
    from cbpt.evidence import mean_pairwise_cos
    from cbpt.losses import contrastive_inversion_loss

    gen = torch.Generator().manual_seed(1)
    trig = F.normalize(torch.randn(37, 16, generator=gen) + 2, dim=-1)
    clean = F.normalize(torch.randn(37, 16, generator=gen), dim=-1)
    one = contrastive_inversion_loss(trig, clean, 0.1)
    assert contrastive_inversion_loss(trig, clean, 0.1, rows=5).item() == pytest.approx(one.item(), rel=1e-6)
    sim = trig @ trig.T
    direct = (sim.sum() - sim.diagonal().sum()) / (37 * 36)
    assert mean_pairwise_cos(trig) == pytest.approx(direct.item(), rel=1e-5)


def _tuner(clip, num_classes: int, max_classes: int):
    from cbpt.features import FeatureCache
    from cbpt.prompts import ClassPrompts
    from cbpt.tuning import ClassSchedule, FullAcceptance, Tuner, TuningConfig, TuningData

    names = [f"thing {i}" for i in range(num_classes)]
    prompts = ClassPrompts(clip.model, clip.tokenizer(), names)
    with torch.no_grad():
        g0 = prompts()
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat(3)
    clean = F.normalize(g0[labels] + 0.3 * torch.randn(len(labels), g0.shape[1], generator=gen), dim=-1)
    trig_labels = labels[labels != 0]
    trig = F.normalize(g0[0] + 0.3 * torch.randn(len(trig_labels), g0.shape[1], generator=gen), dim=-1)
    cache = FeatureCache(clean, labels, trig, trig_labels, torch.zeros_like(trig_labels), trig[:1], 0)
    cfg = TuningConfig(classes=ClassSchedule(max_classes=max_classes, confusers=1))
    return Tuner(prompts, TuningData(cache, None, g0, clip.logit_scale), cfg, FullAcceptance()), prompts


def _grads(prompts) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in prompts.parameters()]


def test_a_class_bounded_step_with_every_class_is_the_full_step(tiny):
    from cbpt.tuning import Rung

    tuner, prompts = _tuner(tiny, 6, 16)
    rung = Rung(0, 0.5, 3.0)
    every = tuner.picker.next()
    assert every.tolist() == list(range(6))
    loss, _ = tuner.loss(tuner.texts.step(every), rung, every)
    loss.backward()
    bounded = _grads(prompts)
    prompts.zero_grad(set_to_none=True)
    full, _ = tuner.loss(prompts(), rung, torch.arange(6))  # the whole label set through the text tower
    full.backward()
    assert loss.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(bounded, _grads(prompts)):
        assert torch.allclose(a, b, atol=1e-7)


def test_a_class_bounded_step_moves_only_its_classes_and_matches_the_full_loss_on_their_shots(tiny):
    from cbpt.losses import clean_loss, keep_kl_loss, keep_loss, trigger_loss
    from cbpt.tuning import Rung

    tuner, prompts = _tuner(tiny, 12, 4)
    rung = Rung(0, 0.5, 3.0)
    picked = tuner.picker.next()
    assert len(picked) == 4 and 0 in picked.tolist()  # the triggers' target is in every step
    loss, _ = tuner.loss(tuner.texts.step(picked), rung, picked)
    loss.backward()
    grads = _grads(prompts)
    assert [i for i, g in enumerate(grads) if g is not None] == picked.tolist()
    # the same loss written out over every class's live text feature, on the picked classes' shots
    prompts.zero_grad(set_to_none=True)
    g = prompts()
    c, scale = tuner.data.cache, tuner.data.scale
    on = torch.isin(c.clean_labels, picked)
    t_on = torch.isin(c.triggered_labels, picked)
    ref = (
        clean_loss(c.clean[on], g, c.clean_labels[on], scale)
        + 0.5 * trigger_loss(c.triggered[t_on], g, c.triggered_labels[t_on], scale, 3.0)
        + 2.0
        * (keep_loss(g[picked], tuner.data.original[picked]) + keep_kl_loss(c.clean[on], g, tuner.data.original, scale))
    )
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for i in picked.tolist():
        assert torch.allclose(grads[i], list(prompts.parameters())[i].grad, atol=1e-6)


def test_the_text_cache_stays_exact_while_steps_move_a_few_classes_at_a_time(tiny):
    from cbpt.tuning import Rung

    tuner, prompts = _tuner(tiny, 12, 4)
    opt = torch.optim.Adam(prompts.parameters(), lr=0.05)
    before = prompts.snapshot()

    def moved() -> int:
        return int((prompts.snapshot() != before).flatten(1).any(1).sum())

    tuner.step(opt, Rung(0, 0.5, 0.0))
    assert moved() == 4  # a step moves its classes and no other
    for _ in range(4):
        tuner.step(opt, Rung(0, 0.5, 0.0))
    assert moved() > 4  # the cycle reached classes beyond the first step's
    assert torch.allclose(tuner.texts.current(), prompts.features(), atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU takes --device cuda")
@pytest.mark.parametrize("command", ["scan", "purify"])
def test_the_cli_refuses_a_gpu_it_does_not_have_before_reading_anything(command, tmp_path, capsys):
    from tests.helpers import run_cli

    code, _, err = run_cli(capsys, command, tmp_path / "missing.pt", "--data", tmp_path, "--device", "cuda")
    assert code == 2 and "sees no CUDA device" in err and "--device cpu" in err
    code, _, err = run_cli(capsys, command, tmp_path / "missing.pt", "--data", tmp_path, "--batch-size", "0")
    assert code == 2 and "--batch-size must be at least 1" in err


def test_shots_past_the_spill_size_live_in_a_file_and_read_back_the_same(tmp_path, tiny):
    from cbpt.data import PixelStore, ShotBudget, load_shots

    data = make_image_folder(tmp_path / "d", {"cat": 5, "dog": 5}, size=40)
    in_memory = load_shots(tiny, data, None, ShotBudget(5, held_out=2), 0)
    spilled = load_shots(tiny, data, None, ShotBudget(5, held_out=2), 0, spill_bytes=0)
    assert isinstance(spilled.pixels, PixelStore) and isinstance(spilled.held_pixels, PixelStore)
    assert spilled.pixels.shape == in_memory.pixels.shape
    rows = torch.tensor([4, 0, 5])
    assert torch.equal(spilled.pixels[rows], in_memory.pixels[rows])
    assert torch.equal(spilled.pixels[1::2], in_memory.pixels[1::2]) and torch.equal(
        spilled.pixels[2], in_memory.pixels[2]
    )
    # the encoder's passes read it a batch at a time and give the same features
    small = tiny.encoder().__class__(tiny.encode_pixels, tiny.device, 4)
    assert torch.allclose(small.all(spilled.held_pixels), small.all(in_memory.held_pixels), atol=0)


def test_the_cpu_projection_counts_the_scans_probes_and_passes_as_the_scan_runs_them(monkeypatch):
    """benchmarks/scale.py's projection (docs/scale.md): a clean-reading scan is 11 restarts of
    200 steps and 15 passes over the k x C shots, a backdoor its masks found 9 and 13; the cache
    no longer encodes the shots themselves (the inversion's features)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).parents[1] / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scale", scale)  # its dataclasses look their module up there
    spec.loader.exec_module(scale)
    case = {
        "classes": 10,
        "shots": 2,
        "inversion_step_s": 1.0,
        "encode_s_per_image": 0.5,
        "cache_images": 100,
        "original_head_s": 3.0,
        "tuning_step_s": 0.1,
        "evaluation_s": 0.2,
        "tuning_setup_s": 1.0,
        "export_s": 4.0,
    }
    _, clean, found = scale.scan_shapes()
    assert (clean.restarts, clean.passes, found.restarts, found.passes) == (11, 15, 9, 13)
    p = scale.project(case, clean)
    assert p["inversion_s"] == 11 * 200 * 1.0 + 15 * 20 * 0.5 and p["cache_s"] == (100 - 20) * 0.5
    assert p["tuning_s"] == 300 * 0.1 + 30 * 0.2 + 1.0 and p["total_s"] == pytest.approx(
        sum(v for k, v in p.items() if k != "total_s")
    )
