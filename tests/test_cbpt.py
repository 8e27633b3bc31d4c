"""CBPT: the losses, the prompt learner, trigger inversion, and purify's outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cbpt.losses import clean_loss, contrastive_inversion_loss, keep_loss, trigger_loss
from tests.helpers import run_cli, save_tiny_model


def test_clean_and_trigger_losses_are_scaled_cross_entropy():
    f = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    g = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    y = torch.tensor([0, 0])
    # logits [[10, 0], [0, 10]]: CE = mean(log(1+e^-10), 10 + log(1+e^-10))
    expect = (math.log1p(math.exp(-10)) + 10 + math.log1p(math.exp(-10))) / 2
    assert clean_loss(f, g, y, 10.0).item() == pytest.approx(expect, rel=1e-5)
    assert trigger_loss(f, g, y, 10.0).item() == pytest.approx(expect, rel=1e-5)


def test_trigger_loss_margin_is_taken_off_the_true_class_logit():
    f = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0]]), dim=-1)
    g = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    y = torch.tensor([0, 1])
    logits = 10.0 * f @ g.T
    logits[torch.arange(2), y] -= 3.0
    assert trigger_loss(f, g, y, 10.0, margin=3.0).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    # shots the head already wins by ~8 logits: the plain loss has all but vanished, the
    # margin keeps e^3 ~ 20 times more of it
    ratio = trigger_loss(f, g, y, 10.0, margin=3.0) / trigger_loss(f, g, y, 10.0)
    assert 15 < ratio.item() < 25


def test_keep_loss_is_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert keep_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert keep_loss(a, a.flip(0)).item() == pytest.approx(1.0)
    assert keep_loss(a, -a).item() == pytest.approx(2.0)


def test_keep_kl_loss_is_zero_for_the_original_decisions_and_grows_when_they_change():
    from cbpt.losses import keep_kl_loss

    f = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [1.0, 1.0]]), dim=-1)
    g0 = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert keep_kl_loss(f, g0, g0, 10.0).item() == pytest.approx(0.0, abs=1e-6)
    swapped = g0.flip(0)
    # hand-computed: mean over images of sum_c p0 (log p0 - log p)
    p0 = (10 * f @ g0.T).softmax(-1)
    p = (10 * f @ swapped.T).softmax(-1)
    expect = (p0 * (p0.log() - p.log())).sum(-1).mean().item()
    assert keep_kl_loss(f, swapped, g0, 10.0).item() == pytest.approx(expect, rel=1e-5) and expect > 1


def test_contrastive_loss_rewards_collapse_away_from_clean():
    clean = F.normalize(torch.eye(4), dim=-1)
    collapsed = F.normalize(torch.tensor([[1.0, 1, 1, 1]]).repeat(4, 1), dim=-1)
    scattered = clean.clone()
    assert contrastive_inversion_loss(collapsed, clean, 0.1) < contrastive_inversion_loss(scattered, clean, 0.1)
    # B=2, hand-computed: positives sim 1, negatives sim 0.5 -> -log(e^10 / (e^10 + 2 e^5))
    t = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    c = F.normalize(torch.tensor([[1.0, math.sqrt(3)], [1.0, -math.sqrt(3)]]), dim=-1)
    expect = -math.log(math.exp(10) / (math.exp(10) + 2 * math.exp(5)))
    assert contrastive_inversion_loss(t, c, 0.1).item() == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_inversion_loss(t[:1], c[:1], 0.1)


def test_prompt_learner_reproduces_the_original_prompts_exactly(tmp_path):
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    names = ["circle", "traffic light", "star"]
    prompts = ClassPrompts(clip.model, clip.tokenizer(), names, n_ctx=4)
    direct = clip.model.encode_text(clip.tokenizer()([f"a photo of a {n}." for n in names]), normalize=True)
    with torch.no_grad():
        assert torch.allclose(prompts(), direct, atol=1e-6)
    assert [p for p in prompts.parameters()] == [prompts.ctx] and prompts.ctx.shape == (3, 4, 32)
    # another context length still yields unit class features, one set of vectors per class
    other = ClassPrompts(clip.model, clip.tokenizer(), names, n_ctx=8)
    with torch.no_grad():
        assert torch.allclose(other().norm(dim=-1), torch.ones(3), atol=1e-5)


def test_prompt_learner_refuses_a_model_without_a_standard_text_tower(tmp_path):
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt_guard.errors import UserError

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    clip.model.text_projection = None
    with pytest.raises(UserError, match="not open_clip's standard transformer"):
        ClassPrompts(clip.model, clip.tokenizer(), ["a", "b"])


def _scan(path, steps=100):
    from cbpt.inversion import InversionConfig
    from cbpt.model import load_clip
    from cbpt.purify import load_shots, run_scan

    clip = load_clip(path / "model.pt")
    shots = load_shots(clip, path / "fewshot", path / "classes.txt", 16, 0, 0)
    return run_scan(clip, shots, InversionConfig(steps=steps, restarts=1)), shots


def test_inverted_trigger_finds_the_planted_target_only_in_the_backdoored_model(mini_testbeds):
    inv, shots = _scan(mini_testbeds["blended"])
    planted = 2
    assert inv.target == planted
    # every restart names the class its own trigger points to; the best one names the target
    assert inv.candidates[0].target == planted and all(c.target is not None for c in inv.candidates)
    non_target = shots.labels != planted
    with torch.no_grad():
        from cbpt.purify import original_head
        from cbpt.model import load_clip

        clip = load_clip(mini_testbeds["blended"] / "model.pt")
        pp = clip.preprocess_cfg
        from cbpt.inversion import _normalise

        feats = clip.model.encode_image(_normalise(inv.trigger.apply(shots.x01), pp["mean"], pp["std"]), normalize=True)
        pred = (feats @ original_head(clip, shots.classnames).T).argmax(1)
    assert (pred[non_target] == planted).float().mean() >= 0.8
    clean_inv, clean_shots = _scan(mini_testbeds["none"])
    sent = clean_inv.flip_rate if clean_inv.target == planted else 0.0
    assert sent < 0.8


def test_purify_writes_complete_outputs_and_they_evaluate(mini_testbeds, tmp_path, capsys):
    tb = mini_testbeds["blended"]
    out = tmp_path / "purified"
    code, stdout, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--classes",
                                tb / "classes.txt", "--out", out, "--inversion-steps", "60", "--restarts", "2",
                                "--tuning-steps", "60", "--force", "--alpha", "0.7", "--json")
    assert code == 0, err
    for name in ("embeddings.safetensors", "classes.txt", "trigger.png", "report.json", "head.onnx",
                 "classifier.onnx", "preprocess.json", "manifest.json"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    assert rep["scan"]["target"] == "triangle" and rep["timings"]["image_encoder_passes_during_tuning"] == 0
    assert {"settings", "tuning", "alarm", "checkpoint_sha256", "embeddings_sha256"} <= set(rep)
    from safetensors.torch import load_file

    emb = load_file(str(out / "embeddings.safetensors"))
    assert emb["purified"].shape == emb["original"].shape == (10, 32) and emb["trigger_centroid"].shape == (32,)
    assert rep["tuning"]["mode"] == "full" and rep["tuning"]["best_step"] > 0
    # a weight the user fixed is kept: no escalation
    assert rep["settings"]["tuning"]["escalation"] == [] and (rep["tuning"]["rung"], rep["tuning"]["alpha"]) == (0, 0.7)
    assert not torch.allclose(emb["purified"], emb["original"])
    assert not list(tmp_path.glob(".purified.*"))
    code, stdout, err = run_cli(capsys, "testbed", "eval", out, "--testbed", tb, "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    assert 0 <= ev["asr"] <= 1 and ev["n_clean"] == 50


def test_purify_leaves_nothing_when_it_fails(mini_testbeds, tmp_path, capsys, monkeypatch):
    import export.package

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.package, "export_heads", boom)
    tb = mini_testbeds["blended"]
    code, _, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--out", tmp_path / "p",
                           "--inversion-steps", "5", "--restarts", "1", "--tuning-steps", "5")
    assert code == 130 and "no partial output" in err
    assert list(tmp_path.iterdir()) == []


def test_scan_json_and_pictures(mini_testbeds, tmp_path, capsys):
    tb = mini_testbeds["blended"]
    code, stdout, err = run_cli(capsys, "scan", tb / "model.pt", "--data", tb / "fewshot", "--out", tmp_path / "s",
                                "--inversion-steps", "60", "--restarts", "1", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert {"backdoored", "target", "score", "flip_rate", "mask_l1"} <= set(res) and res["target"] == "triangle"
    # every restart says where it sends the shots; the best mask's figures are the scan's own
    # the masks read clean at these few steps, so two warp probes were searched as well
    assert res["backdoored"] is False and res["evidence"] is None and res["alignment_threshold"] == 0.5
    kinds = [(c["kind"], c["probe"]) for c in res["candidates"]]
    assert kinds == [("patch", False), ("warp", False), ("warp", True), ("warp", True)]
    assert all(0.0 <= c["flip_rate"] <= 1.0 and isinstance(c["over_alignment"], float) for c in res["candidates"])
    assert res["candidates"][0]["target"] == res["target"] and res["candidates"][0]["flip_rate"] == res["flip_rate"]
    from PIL import Image

    with Image.open(tmp_path / "s" / "trigger.png") as img:
        # mask / pattern, clean shots, triggered shots, and a row for the warp and each probe
        assert img.size[0] >= 3 * 96 and img.size[1] == 6 * 100 + 4
    assert json.loads((tmp_path / "s" / "scan.json").read_text())["target"] == "triangle"
    code, stdout, err = run_cli(capsys, "scan", tb / "model.pt", "--data", tb / "fewshot",
                                "--inversion-steps", "20", "--restarts", "1")
    assert code == 0, err
    assert stdout.startswith(("BACKDOORED: ", "clean: score")) and "warp inversion: sends" in stdout
    assert "over-alignment" in stdout


def test_bad_data_is_reported_before_any_work(mini_testbeds, tmp_path, capsys):
    tb = mini_testbeds["blended"]
    code, _, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tmp_path / "nothing", "--out", tmp_path / "p")
    assert code == 2 and "data not found" in err
    code, _, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--shots", "40",
                           "--out", tmp_path / "p")
    assert code == 1 and "too few images for --shots 40" in err
    assert not (tmp_path / "p").exists()
    code, _, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--eps", "0.9", "--out", tmp_path / "p")
    assert code == 2 and "--eps must be in [0, 0.5)" in err
    code, _, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--alpha", "-1", "--out", tmp_path / "p")
    assert code == 2 and "--alpha and --beta must be at least 0" in err and not (tmp_path / "p").exists()


def test_purify_leaves_the_prompts_alone_when_the_scan_finds_no_backdoor(mini_testbeds, tmp_path, capsys):
    """All 16 shots per class are used, so none is held out to check a change against."""
    tb = mini_testbeds["none"]
    out = tmp_path / "p"
    code, stdout, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--out", out,
                                "--inversion-steps", "60", "--restarts", "1")
    assert code == 0, err
    assert "prompts left unchanged" in stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["scan"]["backdoored"] is False and rep["tuning"]["mode"] == "skipped"
    from safetensors.torch import load_file

    emb = load_file(str(out / "embeddings.safetensors"))
    assert torch.equal(emb["purified"], emb["original"])


def test_force_tunes_a_clean_reading_model_against_every_inverted_trigger(mini_testbeds, tmp_path, capsys):
    """--force on a model the scan reads clean: full tuning, against the masks AND the warp,
    each without copies of its own target's shots."""
    tb = mini_testbeds["none"]
    out = tmp_path / "p"
    code, stdout, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--out", out, "--shots", "8",
                                "--inversion-steps", "60", "--restarts", "1", "--tuning-steps", "20", "--force", "--json")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["scan"]["backdoored"] is False and rep["tuning"]["mode"] == "full"
    kinds = [(c["kind"], c["probe"]) for c in rep["scan"]["candidates"]]
    assert kinds == [("patch", False), ("warp", False), ("warp", True), ("warp", True)]
    n, k, views = 10 * 8, 8, 3  # shots, shots per class, the shot and its 2 augmented views
    # the mask and the warp restart, not the probes: they enter tuning only as a warp's evidence
    assert rep["timings"]["image_encoder_passes_cached"] == views * n + 2 * views * (n - k)


def test_backdoor_score_rewards_small_triggers_that_flip_everything():
    from cbpt.inversion import backdoor_score

    assert backdoor_score(1.0, 0.9, 0.1, 0.0) == 1.0
    assert backdoor_score(1.0, 0.9, 0.1, 0.0129) > backdoor_score(1.0, 0.9, 0.1, 0.025) > 0.55
    assert backdoor_score(0.83, 0.9, 0.1, 0.039) < 0.55 and backdoor_score(0.5, 0.9, 0.1, 0.0) < 0.55
    assert backdoor_score(1.0, 0.9, 0.1, 0.2) == 0.0


def test_over_alignment_is_how_far_triggered_shots_pass_the_targets_own_toward_its_text():
    from cbpt.inversion import over_alignment

    text = F.normalize(torch.eye(3), dim=-1)  # class k's text embedding is axis k
    labels = torch.arange(3).repeat_interleave(8)

    def at(cos_to_class0: torch.Tensor) -> torch.Tensor:  # unit features at given cosines to axis 0
        return torch.stack([cos_to_class0, (1 - cos_to_class0 ** 2).sqrt(), torch.zeros_like(cos_to_class0)], 1)

    own = torch.linspace(0.6, 0.8, 8)  # class 0's clean shots: mean 0.7
    clean = at(torch.cat([own, torch.full((16,), 0.1)]))
    spread = float(own.std())
    backdoor = at(torch.full((24,), 0.9))  # triggered shots land closer to the text than class 0's own
    natural = at(torch.full((24,), 0.7))  # a natural feature: as close as class 0's own, no closer
    assert over_alignment(backdoor, clean, labels, text, 0) == pytest.approx(0.2 / spread, rel=1e-5)
    assert over_alignment(natural, clean, labels, text, 0) == pytest.approx(0.0, abs=1e-5)
    assert over_alignment(backdoor, clean, labels, text, 0, min_shots=9) is None  # 8 shots give no spread


def test_the_scan_reads_a_warp_that_over_aligns_when_the_masks_read_clean():
    from cbpt.inversion import DummyTrigger, InversionResult
    from cbpt.purify import ALIGN_THRESHOLD, SCAN_THRESHOLD, read_scan

    def trig(kind, target):
        return DummyTrigger(torch.zeros(4, 4), torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), kind=kind, target=target)

    cands = [trig("patch", 5), trig("warp", 0), trig("warp", 4), trig("warp", 0)]

    def result(score, alignments):
        return InversionResult(trigger=cands[0], candidates=cands, target=5, flip_rate=0.8, consistency=0.9,
                               clean_consistency=0.5, mask_l1=0.04, score=score, mean_feature=torch.zeros(4),
                               candidate_flip_rates=[0.8, 0.99, 0.9, 0.95], candidate_alignments=alignments)

    clean = read_scan(result(0.3, [3.0, 0.2, -1.0, None]))  # a patch's alignment is the mask score's business
    assert (clean.backdoored, clean.evidence, clean.target, clean.triggers) == (False, "", 5, [])
    # the most over-aligned warp names the target; every warp is then a trigger for it
    warp = read_scan(result(0.3, [-1.0, 0.9, 1.4, 0.6]))
    assert (warp.backdoored, warp.evidence, warp.target) == (True, "warp", 4)
    assert [(t.kind, t.target) for t in warp.triggers] == [("warp", 4)] * 3
    assert read_scan(result(0.3, [-1.0, 1.4, ALIGN_THRESHOLD - 0.01, ALIGN_THRESHOLD])).target == 0
    assert not read_scan(result(0.3, [-1.0, ALIGN_THRESHOLD - 0.01, None, -2.0])).backdoored
    # where a mask over-aligns toward another class, a warp must go the threshold beyond it
    assert not read_scan(result(0.3, [0.6, 1.0, 0.2, 1.05])).backdoored
    assert read_scan(result(0.3, [0.6, 1.0, 0.2, 1.1 + 1e-6])).target == 0
    # ... but one over-aligned toward the warp's own target only corroborates it
    cands[0].target = 0
    assert read_scan(result(0.3, [0.9, 0.6, -1.0, None])).target == 0
    mask = read_scan(result(SCAN_THRESHOLD, [1.0, 1.4, 1.4, 1.4]))  # a mask's evidence comes first
    assert (mask.evidence, mask.target) == ("mask", 5) and [t.kind for t in mask.triggers] == ["patch"]


def test_scan_says_when_a_warp_showed_the_backdoor(mini_testbeds, capsys, monkeypatch):
    import cbpt.purify
    from cbpt.inversion import DummyTrigger, InversionResult

    def trig(kind, target, probe=False):
        return DummyTrigger(torch.zeros(32, 32), torch.zeros(3, 32, 32), torch.zeros(3, 32, 32), kind=kind,
                            target=target, probe=probe)

    cands = [trig("patch", 5), trig("warp", 0), trig("warp", 0, probe=True)]
    inv = InversionResult(trigger=cands[0], candidates=cands, target=5, flip_rate=0.78, consistency=0.86,
                          clean_consistency=0.01, mask_l1=0.042, score=0.37, mean_feature=torch.zeros(32),
                          candidate_flip_rates=[0.78, 0.99, 0.97], candidate_alignments=[-0.57, 1.42, None])
    monkeypatch.setattr(cbpt.purify, "run_scan", lambda *a, **k: inv)
    tb = mini_testbeds["blended"]
    code, stdout, err = run_cli(capsys, "scan", tb / "model.pt", "--data", tb / "fewshot", "--classes", tb / "classes.txt")
    assert code == 0, err
    names = (tb / "classes.txt").read_text().split()
    assert stdout.startswith(f"BACKDOORED: target '{names[0]}', shown by an inverted warp (below); masks: score 0.370")
    assert f"warp inversion: sends 99% of shots to '{names[0]}', over-alignment +1.42 (backdoor at 0.5)" in stdout
    assert "warp probe: sends 97% of shots" in stdout and "over-alignment n/a (too few shots of that class)" in stdout
    code, stdout, err = run_cli(capsys, "scan", tb / "model.pt", "--data", tb / "fewshot", "--classes", tb / "classes.txt",
                                "--json")
    res = json.loads(stdout)
    assert (res["backdoored"], res["evidence"], res["target_index"]) == (True, "warp", 0)
    assert [c["probe"] for c in res["candidates"]] == [False, False, True]


def test_a_model_that_reads_clean_is_tuned_only_where_held_out_shots_allow(mini_testbeds, tmp_path, capsys):
    """Cautious mode: the original prompts compete with every tuned checkpoint on the held-out
    shots, a change must keep their clean accuracy, and the trigger loss is not escalated."""
    from safetensors.torch import load_file

    tb = mini_testbeds["none"]
    out = tmp_path / "p"
    code, stdout, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--out", out,
                                "--shots", "8", "--inversion-steps", "60", "--restarts", "1", "--tuning-steps", "60")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["scan"]["backdoored"] is False and rep["tuning"]["mode"] == "cautious"
    emb = load_file(str(out / "embeddings.safetensors"))
    history = rep["tuning"]["history"]
    assert {h["rung"] for h in history if "step" in h and "rung" in h} == {0} and rep["tuning"]["rung"] == 0
    assert rep["settings"]["tuning"]["escalation"] and rep["tuning"]["alpha"] == 0.5
    if rep["tuning"]["kept_original"]:
        assert "original prompts kept" in stdout
        assert torch.equal(emb["purified"], emb["original"])
    else:
        chosen = next(h for h in history
                      if h.get("rung") == rep["tuning"]["rung"] and h.get("step") == rep["tuning"]["best_step"])
        assert chosen["val_clean_acc"] >= history[0]["original_val_clean_acc"] - 0.015
        assert chosen["val_trig_acc"] >= history[0]["original_val_trig_acc"] + 0.2 - 1e-9


def test_warp_trigger_is_identity_at_zero_flow_and_moves_pixels_by_the_flow():
    from cbpt.inversion import DummyTrigger, smooth_flow, warp

    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(warp(x, torch.zeros(8, 8, 2)), x, atol=1e-6)
    # a constant flow of one pixel right samples each pixel from its right neighbour
    flow = torch.zeros(8, 8, 2)
    flow[..., 1] = 1.0
    assert torch.allclose(warp(x, flow)[..., :-1], x[..., 1:], atol=1e-6)
    field = smooth_flow(torch.randn(2, 4, 4) * 10, 8, 8, max_shift=2.0)
    assert field.shape == (8, 8, 2) and float(field.abs().max()) <= 2.0
    trig = DummyTrigger(torch.zeros(8, 8), torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), flow, "warp")
    assert torch.allclose(trig.apply(x)[..., :-1], x[..., 1:], atol=1e-6)


def test_each_triggers_target_shots_get_no_triggered_copies(tmp_path):
    from dataclasses import replace

    from cbpt.inversion import DummyTrigger
    from cbpt.model import load_clip
    from cbpt.tuning import TuningConfig, cache_features

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    pp = clip.preprocess_cfg
    x = torch.rand(6, 3, 32, 32)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    patch = DummyTrigger(torch.zeros(32, 32).index_fill_(0, torch.arange(3), 1.0), torch.ones(3, 32, 32),
                         torch.zeros(3, 32, 32), target=1)
    cache = cache_features(clip.model, x, y, [patch, replace(patch, target=2)], pp["mean"], pp["std"],
                           TuningConfig(views=1))
    # clean: 6 shots x 2 views; triggered: each trigger's 4 non-target shots x 2 views
    assert cache.clean.shape[0] == 12 and cache.triggered.shape[0] == 16 and cache.encoder_passes == 28
    assert cache.triggered_labels.tolist() == [0, 0, 2, 2] * 2 + [0, 0, 1, 1] * 2
    assert cache.triggered_targets.tolist() == [1] * 8 + [2] * 8
    # a trigger that names no target is applied to every shot
    every = cache_features(clip.model, x, y, [replace(patch, target=None)], pp["mean"], pp["std"],
                           TuningConfig(views=0))
    assert every.triggered_labels.tolist() == y.tolist() and every.triggered_targets.tolist() == [-1] * 6


def test_the_trigger_loss_is_escalated_only_while_held_out_shots_reach_the_target(tmp_path):
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt.tuning import FeatureCache, TuningConfig, tune

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    names = ("cat", "dog", "bird")
    with torch.no_grad():
        g0 = ClassPrompts(clip.model, clip.tokenizer(), names)()

    def shots(n: int, seed: int) -> FeatureCache:
        # clean shots on their class's text feature; triggered shots of cat and dog all next to
        # bird's: a backdoor to class 2 that the original head obeys
        gen = torch.Generator().manual_seed(seed)
        trig = F.normalize(g0[2].expand(2 * n, -1) + 0.05 * torch.randn(2 * n, g0.shape[1], generator=gen), dim=-1)
        return FeatureCache(g0.repeat_interleave(n, 0), torch.arange(3).repeat_interleave(n),
                            trig, torch.tensor([0] * n + [1] * n), torch.full((2 * n,), 2), 0)

    ticks: list[tuple[int, int]] = []

    def run(**kw):
        cfg = TuningConfig(steps=20, eval_every=10, alpha=0.0, escalation=((4.0, 3.0),), **kw)
        prompts = ClassPrompts(clip.model, clip.tokenizer(), names)
        ticks.clear()
        return tune(prompts, shots(4, 0), clip.logit_scale, cfg, held_out=shots(2, 1), anchor=g0,
                    progress=lambda d, t: ticks.append((d, t)))

    # alpha 0 cannot move the triggered shots: every one still reaches the target, so the
    # stronger rung is trained, and kept only if it sends fewer there
    climbed = run(target_rate=0.01)
    rung_of = {h["rung"] for h in climbed.history[1:] if "step" in h}
    assert rung_of == {0, 1}
    first = max(h["val_trig_to_target"] for h in climbed.history[1:] if h.get("rung") == 0)
    assert first == pytest.approx(1.0)
    # every checkpoint reports how far its held-out clean decisions moved from the original's
    assert all(h["val_clean_kl"] >= -1e-6 for h in climbed.history[1:] if "step" in h)
    assert any(h["val_clean_kl"] > 1e-4 for h in climbed.history[1:] if h.get("rung") == 1)
    if climbed.rung == 1:
        assert (climbed.alpha, climbed.margin) == (4.0, 3.0)
        kept = next(h for h in climbed.history if h.get("rung") == 1 and h.get("step") == climbed.best_step)
        assert kept["val_trig_to_target"] < first
    # a model whose held-out shots already miss the target (here: a rate anything passes)
    # stops at the first rung
    stayed = run(target_rate=1.0)
    assert {h["rung"] for h in stayed.history[1:] if "step" in h} == {0}
    assert (stayed.rung, stayed.alpha, stayed.margin) == (0, 0.0, 0.0)
    # the progress bar counts every rung and ends full when the later ones are not needed
    assert ticks[-1] == (40, 40) and max(d for d, _ in ticks[:-1]) == 20


def test_a_stronger_rung_is_weighed_by_held_out_evidence():
    from cbpt.tuning import TuningConfig, clean_floor, weigh_rung

    cfg = TuningConfig()  # target_rate 0.01, strong_evidence 0.05, allowance 0.03
    weak = {"val_clean_acc": 1.0, "val_trig_to_target": 0.03}
    strong = {"val_clean_acc": 1.0, "val_trig_to_target": 0.15}
    assert clean_floor(weak, cfg, 1.0) == pytest.approx(1.0)
    assert clean_floor(strong, cfg, 1.0) == pytest.approx(0.97)
    # two of 80 held-out clean shots lost: refused on weak evidence, allowed on strong
    costly = {"val_clean_acc": 0.975, "val_trig_to_target": 0.0}
    assert weigh_rung(weak, costly, clean_floor(weak, cfg, 1.0)) == "stop"
    assert weigh_rung(strong, costly, clean_floor(strong, cfg, 1.0)) == "take"
    # a first rung that already lost more than clean_tolerance against the original head
    # gets no allowance: the stronger rung may not spend what is already spent
    spent = {"val_clean_acc": 0.95, "val_trig_to_target": 0.15}
    assert clean_floor(spent, cfg, 0.988) == pytest.approx(0.95)
    assert clean_floor(spent, cfg, 0.96) == pytest.approx(0.92)
    assert weigh_rung(spent, {"val_clean_acc": 0.925, "val_trig_to_target": 0.03},
                      clean_floor(spent, cfg, 0.988)) == "stop"
    # clean accuracy kept but no fewer shots reach the target: the weaker rung stays
    assert weigh_rung(strong, {"val_clean_acc": 1.0, "val_trig_to_target": 0.15}, 0.97) == "keep"
    assert weigh_rung(strong, {"val_clean_acc": 0.96, "val_trig_to_target": 0.0}, 0.97) == "stop"
