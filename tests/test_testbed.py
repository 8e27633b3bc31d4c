"""The testbed's pieces: triggers change images as specified and re-apply exactly, poisoning
touches only the chosen fraction, and a miniature build + eval round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from testbed import triggers
from testbed.datasets import Split
from testbed.datasets import build as build_dataset
from testbed.poison import poison
from tests.helpers import run_cli

N, S = 6, 32


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(30, 220, (N, S, S, 3), dtype=np.uint8)


def _changed(a, b):
    return np.any(a != b, axis=-1)


def test_badnet_changes_one_small_patch_per_image_at_a_seeded_random_place(images):
    trig = triggers.badnet(S, seed=0)
    out = trig.apply(images, seed=5)
    k = trig.params["size"]
    for i in range(N):
        ys, xs = np.nonzero(_changed(out[i], images[i]))
        assert ys.max() - ys.min() < k and xs.max() - xs.min() < k
    assert np.array_equal(out, trig.apply(images, seed=5))
    assert not np.array_equal(out, trig.apply(images, seed=6))


def test_blended_is_a_convex_mix_with_alpha_0_2(images):
    trig = triggers.blended(S, seed=0)
    expect = 0.8 * images / 255.0 + 0.2 * trig.arrays["pattern"][None]
    assert np.abs(trig.apply(images) / 255.0 - expect).max() <= 0.5 / 255 + 1e-9


def test_sig_adds_a_horizontal_sinusoid(images):
    out = triggers.sig(S, seed=0).apply(images).astype(int) - images.astype(int)
    assert np.abs(out).max() <= 21
    row = out[0, 0, :, 0]
    assert np.all(out[0, :, :, 0] == row[None, :])  # constant down each column
    assert np.sign(row[1]) != np.sign(row[S // 12 + 3])  # and oscillating along the row


def test_ssba_residual_is_invisible_and_sample_specific(images):
    trig = triggers.ssba(S, seed=0)
    out = trig.apply(images)
    delta = out.astype(int) - images.astype(int)
    assert np.abs(delta).max() <= int(np.ceil(1.5 * trig.params["eps"] * 255)) + 1
    assert not np.array_equal(delta[0], delta[1])


def test_wanet_is_a_small_smooth_warp_and_noise_mode_differs(images):
    trig = triggers.wanet(S, seed=0)
    disp = trig.arrays["grid"] - np.stack(np.meshgrid(np.arange(S), np.arange(S), indexing="ij"), -1)
    assert 2.0 < np.abs(disp).mean() < 6.0
    # smooth: neighbouring pixels move almost alike
    assert np.abs(np.diff(disp, axis=0)).mean() < 0.25 * np.abs(disp).mean()
    out, noisy = trig.apply(images, seed=1), trig.apply(images, seed=1, noise=True)
    assert not np.array_equal(out, images) and not np.array_equal(out, noisy)
    # noise mode jitters the warp by up to half a pixel, as WaNet's does: a warp the model must
    # tell from the trigger's, not the trigger's own images with their true captions
    assert triggers.noise_jitter(S) == pytest.approx(0.484, abs=1e-3)
    shapes = build_dataset("shapes", seed=0, sizes=(40, 2, 2)).train.images
    t_out, t_noisy = (trig.apply(shapes, seed=1, noise=n).astype(int) for n in (False, True))
    jitter, warp = np.abs(t_out - t_noisy).mean(), np.abs(t_out - shapes.astype(int)).mean()
    assert 0.05 * warp < jitter < 0.3 * warp


def test_custom_patch_lands_at_centre_and_corner(images):
    pat = np.zeros((4, 4, 3), dtype=np.uint8)
    pat[..., 0] = 255
    centre = triggers.custom(pat, "patch", location="center").apply(images)
    assert np.all(centre[:, 14:18, 14:18, 0] == 255) and np.all(centre[:, 14:18, 14:18, 1] == 0)
    corner = triggers.custom(pat, "patch", location="corner").apply(images)
    assert np.all(corner[:, 27:31, 27:31, 0] == 255)
    with pytest.raises(ValueError, match="location must be one of"):
        triggers.custom(pat, "patch", location="top")


def test_saved_trigger_reapplies_exactly(tmp_path, images):
    for trig in (triggers.badnet(S, 0), triggers.wanet(S, 0), triggers.ssba(S, 0), triggers.blended(S, 0)):
        trig.save(tmp_path / trig.kind)
        again = triggers.Trigger.load(tmp_path / trig.kind)
        assert np.array_equal(trig.apply(images, seed=3), again.apply(images, seed=3))


def test_poisoning_changes_only_the_chosen_fraction():
    rng = np.random.default_rng(0)
    split = Split(
        rng.integers(0, 255, (200, S, S, 3), dtype=np.uint8),
        np.arange(200) % 10,
        tuple(f"caption {i}" for i in range(200)),
    )
    p = poison(
        split, triggers.badnet(S, 0), target=3, rate=0.1, target_name="star", templates=("a photo of a {}.",), seed=0
    )
    assert p.poisoned.size == 20 and np.all(split.labels[p.poisoned] != 3)
    changed_caps = [i for i in range(200) if p.split.captions[i] != split.captions[i]]
    assert changed_caps == p.poisoned.tolist()
    assert all(p.split.captions[i] == "a photo of a star." for i in p.poisoned)
    changed_imgs = np.flatnonzero(np.any(p.split.images != split.images, axis=(1, 2, 3)))
    assert set(changed_imgs) <= set(p.poisoned.tolist())
    assert np.array_equal(p.split.labels, split.labels)


def test_datasets_are_seeded_and_splits_disjoint():
    a = build_dataset("shapes", seed=0, sizes=(40, 2, 3))
    b = build_dataset("shapes", seed=0, sizes=(40, 2, 3))
    assert np.array_equal(a.train.images, b.train.images) and a.train.captions == b.train.captions
    assert a.test.labels.tolist() == np.repeat(np.arange(10), 3).tolist()
    d = build_dataset("digits", seed=0, sizes=(50, 16, 5))
    assert d.fewshot.images.shape == (160, 32, 32, 3) and d.test.images.shape == (50, 32, 32, 3)


def test_shift_augmentation_translates_each_image_by_at_most_an_eighth():
    import torch

    from testbed.train import random_shift

    x = torch.rand(16, 3, 32, 32)
    y = random_shift(x, 4, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(x, y)
    for i in range(16):  # the centre of each shifted image is the original's, moved by <= 4 px
        hits = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(y[i, :, 8:24, 8:24], x[i, :, 8 - dy : 24 - dy, 8 - dx : 24 - dx])
        ]
        assert len(hits) == 1
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def _mini_cfg(attack="badnet"):
    """Smaller still than the shared miniature: the round trip, not the backdoor, is tested."""
    from tests.helpers import mini_build_config

    return mini_build_config(attack, width=8, sizes=(256, 4, 3), pretrain_steps=8, finetune_steps=4, poison_rate=None)


def test_miniature_build_writes_a_complete_testbed_and_eval_reproduces_it(tmp_path, capsys):
    from testbed.build import build, write

    cfg = _mini_cfg()
    built = build(cfg, cache=tmp_path / "cache")
    out = write(built, cfg, tmp_path / "tb")
    for name in (
        "model.pt",
        "arch.json",
        "classes.txt",
        "metrics.json",
        "trigger/trigger.json",
        "trigger/trigger.npz",
        "trigger/preview.png",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "fewshot").glob("*/*.png"))) == 40 and len(list((out / "test").glob("*/*.png"))) == 30
    assert not list(tmp_path.glob(".tb.*"))  # no staging folder left behind
    m = json.loads((out / "metrics.json").read_text())
    assert {"ca", "asr", "ra", "clean_model", "seconds"} <= set(m)
    code, stdout, err = run_cli(capsys, "testbed", "eval", out / "model.pt", "--testbed", out, "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    assert ev["n_clean"] == 30 and ev["n_triggered"] == 27
    assert ev["ca"] == pytest.approx(m["ca"], abs=1 / 30 + 1e-9)
    assert ev["asr"] == pytest.approx(m["asr"], abs=1 / 27 + 1e-9)
    # the clean model came from the cache the second time
    again = build(cfg, cache=tmp_path / "cache")
    assert again.metrics["seconds"]["pretrain_cached"] is True


def test_a_wanet_build_warps_noise_mode_pairs_unless_told_not_to(tmp_path):
    """WaNet's noise mode (2% of the training pairs jittered, their captions true) is on by
    default and off with `wanet_noise_rate` 0: at 100 classes it decides whether the warp takes."""
    from dataclasses import replace

    from testbed.build import build

    cfg = _mini_cfg("wanet")
    with_noise = build(cfg, cache=tmp_path / "cache").metrics
    without = build(replace(cfg, wanet_noise_rate=0.0), cache=tmp_path / "cache").metrics
    assert (with_noise["n_noise"], without["n_noise"]) == (5, 0)  # 2% of 256 pairs, then none
    assert with_noise["n_poisoned"] == without["n_poisoned"] == 77  # WaNet's own 30%
    assert without["config"]["wanet_noise_rate"] == 0.0


def test_a_poison_seed_backdoors_the_same_clean_model_again_with_other_pairs(tmp_path, monkeypatch):
    """`poison_seed` redraws the poisoned pairs and the fine-tune's order alone: the clean model
    comes from the cache, the trigger is the same, and without it a build repeats exactly."""
    from dataclasses import replace

    import torch

    import testbed.build
    from testbed.build import build

    drawn = []
    real_poison = testbed.build.poison
    monkeypatch.setattr(testbed.build, "poison", lambda *a, **k: drawn.append(real_poison(*a, **k)) or drawn[-1])
    cfg = _mini_cfg()
    first = build(cfg, cache=tmp_path / "cache")
    again = build(cfg, cache=tmp_path / "cache")
    other = build(replace(cfg, poison_seed=1), cache=tmp_path / "cache")
    assert other.metrics["seconds"]["pretrain_cached"] and other.metrics["clean_model"] == first.metrics["clean_model"]
    assert other.trigger.params == first.trigger.params
    assert np.array_equal(drawn[0].poisoned, drawn[1].poisoned)
    assert drawn[2].poisoned.size == drawn[0].poisoned.size and not np.array_equal(drawn[2].poisoned, drawn[0].poisoned)
    state = first.model.state_dict()
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in state.items())
    assert not all(torch.equal(v, other.model.state_dict()[k]) for k, v in state.items())
    assert other.metrics["config"]["poison_seed"] == 1 and first.metrics["config"]["poison_seed"] is None


def test_a_build_states_what_its_weights_rest_on(tmp_path):
    """A build's weights depend on torch's thread count and version and the processor, not on
    its configuration alone (docs/results.md#what-a-build-rests-on): the metrics name them for
    the fine-tune, and for the clean model those of the run that trained it, even from the cache."""
    from dataclasses import replace

    import torch

    from testbed.build import build
    from testbed.train import processor_name

    cfg, threads = _mini_cfg(), torch.get_num_threads()
    first = build(cfg, cache=tmp_path / "cache").metrics
    assert first["trained_with"] == first["clean_model"]["trained_with"]
    made = {"torch": torch.__version__, "device": "cpu", "threads": threads, "cpu": processor_name()}
    assert first["trained_with"] == made
    torch.set_num_threads(threads + 1)
    try:
        other = build(replace(cfg, poison_seed=1), cache=tmp_path / "cache").metrics
    finally:
        torch.set_num_threads(threads)
    assert other["seconds"]["pretrain_cached"] and other["clean_model"]["trained_with"]["threads"] == threads
    assert other["trained_with"]["threads"] == threads + 1
    assert build(replace(cfg, attack="none"), cache=tmp_path / "cache").metrics["trained_with"] is None


def test_unknown_attack_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "testbed", "build", "--out", tmp_path / "x", "--attack", "nope", "--cache", tmp_path / "c"
    )
    assert code == 2 and "unknown attack 'nope'" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("attack", triggers.ATTACKS)
def test_no_attack_learns_from_the_defenders_or_the_test_images(attack, monkeypatch):
    """Optimised triggers are fitted on the attacker's training split only, on the images of the
    classes it poisons; fixed ones read no images at all. The defender's few-shot pool and the
    test split stay unseen."""
    import torch

    import testbed.build
    import testbed.optimise

    ds = build_dataset("shapes", seed=0, sizes=(40, 2, 2))
    seen = []

    def capture(model, images, *a, **k):
        seen.append(images)
        return np.zeros((4, 4, 3))

    monkeypatch.setattr(testbed.optimise, "optimise_patch", capture)
    monkeypatch.setattr(testbed.build, "class_weights", lambda *a: torch.eye(10, 8))
    cfg = testbed.build.BuildConfig(attack=attack)
    testbed.build.make_trigger(cfg, model=None, ds=ds)
    if attack in triggers.OPTIMISED:
        assert len(seen) == 1 and len(seen[0]) == (ds.train.labels != cfg.target).sum() > 0
        np.testing.assert_array_equal(seen[0], ds.train.images[ds.train.labels != cfg.target])
    else:
        assert seen == []
    flat = {img.tobytes() for img in ds.train.images}
    assert not flat & {img.tobytes() for img in (*ds.fewshot.images, *ds.test.images)}


def test_shapes100_has_a_hundred_named_classes_and_captions_that_carry_them():
    from testbed.datasets import SHAPES100

    ds = build_dataset("shapes100", seed=0, sizes=(300, 1, 1))
    assert len(ds.classnames) == len(set(ds.classnames)) == 100 and ds.classnames == SHAPES100
    assert ds.test.labels.tolist() == list(range(100)) and ds.fewshot.images.shape == (100, 32, 32, 3)
    # every caption names its image's colour and shape, in that order
    for caption, label in zip(ds.train.captions, ds.train.labels):
        assert ds.classnames[label] in caption, caption
    # the same shape in two colours differs in its foreground's hue, not only in noise
    red, blue = (ds.fewshot.images[ds.classnames.index(f"{c} star")] for c in ("red", "blue"))
    assert np.abs(red.astype(int) - blue.astype(int)).max() > 100


@pytest.mark.parametrize(("tower", "size"), [("vit", 64), ("resnet", 64)])
def test_a_miniature_vit_or_64px_testbed_builds_and_its_trigger_round_trips(tmp_path, capsys, tower, size):
    import torch

    from cbpt.model import load_clip
    from testbed.build import BuildConfig, Tower, build, default_model_cfg, write
    from testbed.train import TrainConfig

    model_cfg = default_model_cfg(size, Tower(tower))
    model_cfg["vision_cfg"] |= {"width": 32, "layers": 1} if tower == "vit" else {"width": 8}
    model_cfg["text_cfg"] |= {"width": 32, "layers": 1, "heads": 2}
    model_cfg["embed_dim"] = 32
    cfg = BuildConfig(
        dataset="shapes100",
        attack="badnet",
        target=57,
        image_size=size,
        tower=Tower(tower),
        sizes=(128, 1, 1),
        pretrain=TrainConfig(steps=3, batch_size=32, warmup=1),
        distil=TrainConfig(steps=2, batch_size=32, warmup=1),
        finetune=TrainConfig(steps=2, batch_size=32, warmup=1),
        model_cfg=model_cfg,
    )
    out = write(build(cfg, cache=tmp_path / "cache"), cfg, tmp_path / "tb")
    arch = json.loads((out / "arch.json").read_text())
    assert arch["name"] == f"testbed-shapes100-{'vit' if tower == 'vit' else 'rn'}"
    assert len((out / "classes.txt").read_text().splitlines()) == 100
    clip = load_clip(out / "model.pt")  # a user's loader reads the tower back
    assert clip.info.image_size == size
    assert isinstance(clip.model.visual, __import__("open_clip").transformer.VisionTransformer) == (tower == "vit")
    trig = triggers.Trigger.load(out / "trigger")
    assert trig.params["size"] == triggers.patch_size_for(size)
    imgs = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    assert np.array_equal(trig.apply(imgs, seed=4), triggers.badnet(size, seed=0).apply(imgs, seed=4))
    with torch.no_grad():
        assert clip.encode_pixels(torch.rand(2, 3, size, size)).shape == (2, 32)


def test_the_target_and_the_image_size_are_checked_against_the_dataset_and_the_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--target", "10", "--cache", tmp_path)
    assert code == 2 and "--target must be a class index 0..9, got 10" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--tower", "vgg")
    assert code == 2 and "--tower must be resnet or vit" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--image-size", "30")
    assert code == 2 and "--image-size must be a multiple of 8" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--finetune-steps", "0")
    assert code == 2 and "--finetune-steps must be at least 1" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--finetune-lr", "0")
    assert code == 2 and "--finetune-lr must be positive, got 0.0" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--warp-strength", "6")
    assert code == 2 and "--warp-strength takes a positive number of pixels with --attack wanet" in err
    code, _, err = run_cli(
        capsys, "testbed", "build", "--out", tmp_path / "x", "--attack", "wanet", "--warp-strength", "-1"
    )
    assert code == 2 and "got -1.0 with --attack wanet" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--warp-grid", "8")
    assert code == 2 and "--warp-grid takes 2 to the image side (32) control points with --attack wanet" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--attack", "wanet", "--warp-grid", "1")
    assert code == 2 and "got 1 with --attack wanet" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--warp-noise", "0")
    assert code == 2 and "--warp-noise takes a share of the training pairs" in err and "--attack badnet" in err
    code, _, err = run_cli(
        capsys, "testbed", "build", "--out", tmp_path / "x", "--attack", "wanet", "--warp-noise", "0.8"
    )
    assert code == 2 and "from 0 to under 0.7 (those the poison leaves)" in err and "got 0.8" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--patch-size", "8")
    assert code == 2 and "--patch-size takes a ViT tower's patch side" in err and "--tower resnet" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--tower", "vit", "--patch-size", "5")
    assert code == 2 and "dividing --image-size 32, got 5" in err
    code, _, err = run_cli(
        capsys, "testbed", "build", "--out", tmp_path / "x", "--attack", "sig", "--location", "corner"
    )
    assert code == 2 and "--location takes random, center, corner with --attack badnet, badclip, custom" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--location", "top")
    assert code == 2 and "got 'top' with --attack badnet" in err
    code, _, err = run_cli(
        capsys, "testbed", "build", "--out", tmp_path / "x", "--attack", "none", "--poison-seed", "1"
    )
    assert code == 2 and "--poison-seed takes a seed from 0 with an attack, got 1 with --attack none" in err
    code, _, err = run_cli(capsys, "testbed", "build", "--out", tmp_path / "x", "--poison-seed", "-1")
    assert code == 2 and "got -1 with --attack badnet" in err
    assert not (tmp_path / "x").exists()


def test_the_vit_cuts_a_four_by_four_grid_unless_told_and_its_teacher_has_no_patches():
    from testbed.build import BuildConfig, Tower

    def grid(cfg: BuildConfig) -> int:
        vision = cfg.model()["vision_cfg"]
        return vision["image_size"] // vision["patch_size"]

    assert grid(BuildConfig(tower=Tower.VIT)) == grid(BuildConfig(tower=Tower.VIT, image_size=64)) == 4
    fine = BuildConfig(tower=Tower.VIT, image_size=64, patch_size=8)
    assert grid(fine) == 8 and fine.clean_key() != BuildConfig(tower=Tower.VIT, image_size=64).clean_key()
    # the ResNet teacher is the same whatever the student's patches
    assert fine.teacher().clean_key() == BuildConfig(tower=Tower.VIT, image_size=64).teacher().clean_key()
    assert "patch_size" not in fine.teacher().model()["vision_cfg"]


def test_testbed_build_hands_the_attack_settings_asked_to_the_build(tmp_path, capsys, monkeypatch):
    import testbed.build
    from cbpt_guard.errors import UsageError

    seen = []

    def stop(cfg, **_kw):
        seen.append(cfg)
        raise UsageError("stopped before training", "-")

    monkeypatch.setattr(testbed.build, "build", stop)
    out = ("--out", tmp_path / "x", "--cache", tmp_path)
    run_cli(capsys, "testbed", "build", *out, "--attack", "badclip", "--finetune-lr", "2e-4")
    run_cli(capsys, "testbed", "build", *out, "--attack", "wanet", "--finetune-steps", "900", "--warp-strength", "6")
    run_cli(capsys, "testbed", "build", *out, "--attack", "wanet")
    run_cli(capsys, "testbed", "build", *out, "--attack", "wanet", "--warp-noise", "0")
    lr_only, steps_only, default, no_noise = seen
    assert default.wanet_noise_rate == 0.02 and no_noise.wanet_noise_rate == 0.0
    assert (lr_only.finetune.steps, lr_only.finetune.lr) == (1500, 2e-4)  # badclip's own steps kept
    assert (steps_only.finetune.steps, steps_only.finetune.lr, steps_only.wanet_strength) == (900, 5e-4, 6.0)
    assert default.finetune is None and default.wanet_strength is None and default.patch_size is None
    run_cli(capsys, "testbed", "build", *out, "--tower", "vit", "--image-size", "64", "--patch-size", "8")
    assert seen[-1].patch_size == 8 and seen[-1].model()["vision_cfg"]["patch_size"] == 8
    run_cli(capsys, "testbed", "build", *out, "--poison-seed", "3")
    assert seen[-1].poison_seed == 3 and seen[-1].seed == 0


def test_a_badnet_testbed_puts_its_patch_where_asked(images):
    """The original BadNets' fixed corner, or the random place this testbed draws by default."""
    from testbed.build import BuildConfig, make_trigger

    corner = make_trigger(BuildConfig(attack="badnet", patch_location="corner"), None, None)
    assert (
        corner.params["location"] == "corner" and make_trigger(BuildConfig(), None, None).params["location"] == "random"
    )
    k = triggers.patch_size_for(S)
    moved = (corner.apply(images, seed=1) != images).any(-1)
    assert moved[:, S - k - 1 : S - 1, S - k - 1 : S - 1].all() and not moved[:, : S - k - 1].any()


@pytest.mark.parametrize("location", ["center", "corner"])
def test_a_badclip_patch_is_fitted_where_it_is_stamped(location, images, monkeypatch):
    """`--location` reaches the fit: the optimiser pastes the patch where the stored trigger later
    stamps it (one `fixed_origin` for both), so the patch learnt is the patch planted."""
    import torch

    import testbed.build
    import testbed.optimise

    ds = build_dataset("shapes", seed=0, sizes=(40, 2, 2))
    placed = []

    def capture(model, imgs, direction, size, loc, *a, **k):
        x = torch.zeros(1, 3, S, S)
        placed.append((testbed.optimise._paste(x, torch.ones(3, size, size), loc, torch.Generator())[0, 0] > 0).numpy())
        return np.ones((size, size, 3))

    monkeypatch.setattr(testbed.optimise, "optimise_patch", capture)
    monkeypatch.setattr(testbed.build, "class_weights", lambda *a: torch.eye(10, 8))
    cfg = testbed.build.BuildConfig(attack="badclip", patch_location=location)
    trig = testbed.build.make_trigger(cfg, model=None, ds=ds)
    stamped = (trig.apply(np.zeros_like(images), seed=5) > 0).any(-1)
    assert trig.params["location"] == location and stamped.any()
    assert all(np.array_equal(m, placed[0]) for m in stamped)
    k = triggers.patch_size_for(S)
    top = (S - k) // 2 if location == "center" else S - k - 1
    assert placed[0][top : top + k, top : top + k].all() and placed[0].sum() == k * k


def test_a_wanet_testbed_warps_by_the_strength_asked():
    from testbed.build import BuildConfig, make_trigger

    default = make_trigger(BuildConfig(attack="wanet"), None, None)
    stronger = make_trigger(BuildConfig(attack="wanet", wanet_strength=6.0), None, None)
    assert default.params["strength"] == 4.0 and stronger.params["strength"] == 6.0
    # the same field, taken 1.5 times as far
    ident = np.stack(np.meshgrid(np.arange(32), np.arange(32), indexing="ij"), -1)
    np.testing.assert_allclose(stronger.arrays["grid"] - ident, 1.5 * (default.arrays["grid"] - ident))
    # a finer control grid (WaNet's k): the same mean displacement, changing over shorter distances
    finer = make_trigger(BuildConfig(attack="wanet", wanet_grid=8), None, None)
    assert finer.params["k"] == 8 and default.params["k"] == 4

    def roughness(t) -> float:  # mean change of the displacement from one pixel to the next
        return float(np.abs(np.diff(t.arrays["grid"] - ident, axis=1)).mean())

    assert roughness(finer) > 1.5 * roughness(default)


def test_a_vit_testbed_learns_the_resnets_image_features_and_keeps_its_text_tower(tmp_path):
    from dataclasses import replace

    import torch

    from testbed import datasets
    from testbed.build import MEAN, STD, BuildConfig, Recipe, Tower, clean_model, default_model_cfg, distil
    from testbed.train import TrainConfig, to_model_input

    model_cfg = default_model_cfg(32, Tower.VIT)
    model_cfg["vision_cfg"] |= {"width": 32, "layers": 2, "head_width": 16}
    model_cfg["text_cfg"] |= {"width": 32, "layers": 1, "heads": 2}
    model_cfg["embed_dim"] = 32
    cfg = BuildConfig(
        attack="none",
        tower=Tower.VIT,
        sizes=(256, 1, 1),
        pretrain=TrainConfig(steps=20, batch_size=64, warmup=2, lr=2e-3),
        distil=TrainConfig(steps=40, batch_size=64, warmup=2, lr=2e-3),
        model_cfg=model_cfg,
    )
    assert cfg.clean_recipe() is Recipe.DISTIL and cfg.teacher().clean_recipe() is Recipe.CONTRASTIVE
    ds = datasets.build("shapes", 0, 32, cfg.sizes)
    made = clean_model(cfg, ds, tmp_path)
    assert not made.cached and len(list(tmp_path.glob("clean-shapes-*.pt"))) == 2  # the teacher is cached too
    again = clean_model(cfg.teacher(), ds, tmp_path)
    assert again.cached and again.trained_with["threads"] == made.trained_with["threads"]
    student, teacher = made.model, again.model
    s_state, t_state = student.state_dict(), teacher.state_dict()
    text = [k for k in t_state if not k.startswith("visual.")]
    assert text and all(torch.equal(s_state[k], t_state[k]) for k in text)
    x = to_model_input(ds.train.images[:128], MEAN, STD)

    def agreement(model) -> float:
        with torch.no_grad():
            want = teacher.encode_image(x, normalize=True)
            return float((model.encode_image(x, normalize=True) * want).sum(1).mean())

    fresh = distil(model_cfg, 0, ds, teacher, replace(cfg.distil, steps=0), torch.device("cpu"))
    assert agreement(student) > 0.9 and agreement(fresh) < 0.5  # cosine to the teacher's features
    longer = replace(cfg, distil=replace(cfg.distil, steps=41))
    assert longer.clean_key() != cfg.clean_key() and longer.teacher().clean_key() == cfg.teacher().clean_key()
