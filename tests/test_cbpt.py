"""CBPT: the losses, the prompt learner, trigger inversion, and purify's outputs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cbpt.evidence import backdoor_score, over_alignment, typicality
from cbpt.losses import away_loss, clean_loss, contrastive_inversion_loss, keep_loss, trigger_loss
from cbpt.scan import ALIGN_THRESHOLD, ALIGNED_MAX_AREA, SCAN_THRESHOLD, Evidence, read_scan
from cbpt.trigger import TriggerKind
from tests.helpers import backdoored_features, fake_inversion, run_cli, save_tiny_model


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


def test_the_away_loss_is_minus_log_of_one_less_the_targets_probability():
    f = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.1, 0.0, 1.0]]), dim=-1)
    g = torch.eye(3)
    targets = torch.tensor([0, 2])
    p = torch.softmax(10.0 * f @ g.T, dim=1)[torch.arange(2), targets]
    assert away_loss(f, g, targets, 10.0).item() == pytest.approx(-torch.log1p(-p).mean().item(), rel=1e-5)
    # only the target's share counts, not which other class takes the copy
    swapped = torch.eye(3)[[0, 2, 1]]
    one = torch.tensor([0])
    assert away_loss(f[:1], swapped, one, 10.0).item() == pytest.approx(away_loss(f[:1], g, one, 10.0).item())
    # a copy already ~3 logits off its target pays e^-3 or so; with a margin that size, log 2
    off = torch.tensor([[0.0, 0.3, 0.0]])  # logits 0, 3, 0 at scale 10
    lse = float(torch.logsumexp(torch.tensor([3.0, 0.0]), 0))
    assert away_loss(off, g, one, 10.0).item() == pytest.approx(math.log1p(math.exp(-lse)), rel=1e-5)
    assert away_loss(off, g, one, 10.0, margin=lse).item() == pytest.approx(math.log(2), rel=1e-5)


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
    # one learned context per class, and nothing else
    assert [p.shape for p in prompts.parameters()] == [(4, 32)] * 3 and prompts.snapshot().shape == (3, 4, 32)
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


@pytest.fixture(scope="module")
def scans(mini_testbeds):
    """The real scan of both miniature models: {"blended": (inversion, shots), "none": ...}."""
    from cbpt.data import ShotBudget, load_shots
    from cbpt.inversion import CompactProbes, InversionConfig, WarpSearch
    from cbpt.model import load_clip
    from cbpt.purify import original_head
    from cbpt.scan import run_scan

    out = {}
    for name, tb in mini_testbeds.items():
        clip = load_clip(tb / "model.pt")
        shots = load_shots(clip, tb / "fewshot", tb / "classes.txt", ShotBudget(16, held_out=0), 0)
        cfg = InversionConfig(steps=100, mask_restarts=1, warp=WarpSearch(probes=0), compact=CompactProbes(restarts=0))
        out[name] = (clip, run_scan(clip, shots, cfg, original_head(clip, shots.classnames)), shots)
    return out


def _sent_to(clip, trigger, shots, target: int) -> float:
    """The share of shots outside `target` that `clip`'s original head puts in `target` once
    `trigger` is applied."""
    from cbpt.encoding import to_x01
    from cbpt.purify import original_head

    with torch.no_grad():
        pred = (
            clip.encode_pixels(trigger.apply(to_x01(shots.pixels))) @ original_head(clip, shots.classnames).T
        ).argmax(1)
    return float((pred[shots.labels != target] == target).float().mean())


def test_inverted_trigger_finds_the_planted_target_only_in_the_backdoored_model(scans):
    planted = 2
    clip, inv, shots = scans["blended"]
    assert inv.target == planted
    # every restart names the class its own trigger points to; the best mask names the target
    assert inv.candidates[0].target == planted and [c.kind for c in inv.restarts()] == ["mask", "warp"]
    assert _sent_to(clip, inv.trigger, shots, planted) >= 0.8
    # the clean model's best mask, whatever class it points to, does not send the shots to the planted one
    clip, clean_inv, clean_shots = scans["none"]
    assert _sent_to(clip, clean_inv.trigger, clean_shots, planted) < 0.5


def test_purify_writes_complete_outputs_and_they_evaluate(purified, mini_testbeds, capsys):
    from safetensors.torch import load_file

    from cbpt_guard import artifacts

    for name in (*artifacts.SOURCE_FILES, artifacts.TRIGGER_PNG, artifacts.HEAD, *artifacts.HEADS_REQUIRED):
        assert (purified / name).is_file(), name
    rep = json.loads((purified / "report.json").read_text())
    assert rep["scan"]["target"] == "triangle" and rep["timings"]["image_encoder_passes_during_tuning"] == 0
    assert {"settings", "tuning", "alarm", "checkpoint_sha256", "embeddings_sha256"} <= set(rep)
    # --shots 16 is every image used: 12 per class tune, 4 held out, none in both
    assert rep["budget"] == {"shots_per_class": 16, "tuning_per_class": 12, "held_out_per_class": 4}
    assert (len(rep["shots"]), len(rep["held_out"])) == (120, 40) and not set(rep["shots"]) & set(rep["held_out"])
    # where and how it ran, and what it cost: half of this machine's 2 cores, the peak resident memory
    rt = rep["runtime"]
    assert (rt["device"], rt["precision"], rt["encode_batch"], rt["torch_threads"]) == ("cpu", "fp32", 128, 1)
    assert rt["peak_rss_mb"] > 100
    emb = load_file(str(purified / "embeddings.safetensors"))
    assert emb["purified"].shape == emb["original"].shape == (10, 32)
    # the alarm watches the best mask's region alone: this miniature reads clean, and --force
    # tunes it against restarts aimed at natural features, which clean images share
    assert rep["scan"]["backdoored"] is False and len(rep["tuning"]["triggers"]) > 1
    assert emb["trigger_centroids"].shape == (1, 32) and rep["alarm"]["centres"] == 1
    assert rep["tuning"]["mode"] == "full" and rep["tuning"]["best_step"] > 0 and not rep["tuning"]["kept_original"]
    # push-off (the default): the copies are pushed off their targets only where every target's stand 6.5 spreads apart
    spreads, away = rep["tuning"]["apart"], rep["tuning"]["away"]
    assert rep["settings"]["push_off"] == {"weight": 2.0, "apart": 6.5} and len(spreads) >= 1
    assert rep["settings"]["tuning"]["partial"] == {"doses": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], "most": 256}
    assert away == (2.0 if min(spreads) >= 6.5 else 0.0)
    # a weight the user fixed is kept: no escalation
    assert rep["settings"]["tuning"]["ladder"]["rungs"] == [] and (rep["tuning"]["rung"], rep["tuning"]["alpha"]) == (
        0,
        0.7,
    )
    assert not torch.allclose(emb["purified"], emb["original"])
    assert not list(purified.parent.glob(".p.*"))  # no staging folder left
    code, stdout, err = run_cli(capsys, "testbed", "eval", purified, "--testbed", mini_testbeds["blended"], "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    assert 0 <= ev["asr"] <= 1 and ev["n_clean"] == 50


def test_scan_reads_the_model_as_purify_does(purified, mini_testbeds, capsys):
    # the same shots (purify's held-out ones left out) and settings: the same figures and verdict
    tb = mini_testbeds["blended"]
    args = ("--classes", tb / "classes.txt", "--inversion-steps", "60", "--restarts", "2", "--json")
    code, stdout, err = run_cli(capsys, "scan", tb / "model.pt", "--data", tb / "fewshot", *args)
    assert code == 0, err
    res = json.loads(stdout)
    rep = json.loads((purified / "report.json").read_text())
    assert res["budget"] == rep["budget"] == {"shots_per_class": 16, "tuning_per_class": 12, "held_out_per_class": 4}
    for key in ("backdoored", "evidence", "target", "score", "flip_rate", "mask_l1", "suspicion"):
        assert res[key] == rep["scan"][key], key


def _purify(capsys, tb, out, *options):
    return run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--out", out, *options)


def test_purify_leaves_nothing_when_it_fails(mini_testbeds, tmp_path, capsys, monkeypatch):
    import cbpt_cli.pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cbpt_cli.pipeline, "build_heads", boom)
    tb = mini_testbeds["blended"]
    code, _, err = _purify(
        capsys, tb, tmp_path / "p", "--inversion-steps", "5", "--restarts", "1", "--tuning-steps", "5"
    )
    assert code == 130 and "no partial output" in err
    assert list(tmp_path.iterdir()) == []


def test_purify_pushes_off_and_reads_partial_triggers_unless_told_not_to(mini_testbeds, tmp_path, capsys, monkeypatch):
    # push-off and the partial triggers are the default (push-off's gate still decides per model);
    # --no-push-off only sends the copies home, --no-partial-triggers bars the side by its reach alone
    import cbpt_cli.pipeline
    from cbpt.features import PartialTriggers
    from cbpt.purify import PushOff

    seen = []

    def stop(clip, shots, cfg, *a, **k):
        seen.append((cfg.push_off, cfg.tuning.partial))
        raise KeyboardInterrupt

    monkeypatch.setattr(cbpt_cli.pipeline, "purify_to_folder", stop)
    tb = mini_testbeds["blended"]
    assert _purify(capsys, tb, tmp_path / "p")[0] == 130
    assert _purify(capsys, tb, tmp_path / "q", "--no-push-off")[0] == 130
    assert _purify(capsys, tb, tmp_path / "r", "--no-partial-triggers")[0] == 130
    push, partial = PushOff(weight=2.0, apart=6.5), PartialTriggers(doses=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0), most=256)
    assert seen == [(push, partial), (None, partial), (push, None)]


def test_scan_json_and_pictures(mini_testbeds, tmp_path, capsys):
    tb = mini_testbeds["blended"]
    code, stdout, err = run_cli(
        capsys,
        "scan",
        tb / "model.pt",
        "--data",
        tb / "fewshot",
        "--out",
        tmp_path / "s",
        "--inversion-steps",
        "60",
        "--restarts",
        "1",
        "--compact-restarts",
        "1",
        "--blend-restarts",
        "1",
        "--json",
    )
    assert code == 0, err
    res = json.loads(stdout)
    assert {"backdoored", "target", "score", "flip_rate", "mask_l1"} <= set(res) and res["target"] == "triangle"
    assert res["threshold"] == SCAN_THRESHOLD and res["alignment_threshold"] == ALIGN_THRESHOLD
    # the warp probes are searched exactly when the mask score reads clean, the five patches when no
    # other rule found the backdoor, a compact mask when the masks show it (by their score or their
    # over-alignment), a blend when any rule does
    kinds = [(c["kind"], c["probe"]) for c in res["candidates"]]
    searches = [(c["kind"], c["search"]) for c in res["candidates"]]
    probed = res["score"] < SCAN_THRESHOLD
    patches = [("mask", "patch")] * 5 if res["evidence"] in (None, "patch") else []
    by_masks = res["evidence"] in ("mask", "aligned-mask")
    compact = [("mask", "compact")] if by_masks else []  # --compact-restarts 1
    blend = [("mask", "blend")] if res["backdoored"] else []  # --blend-restarts 1
    restarts = [("mask", "restart"), ("warp", "restart")]
    assert searches == restarts + [("warp", "warp-probe")] * (2 * probed) + patches + compact + blend
    assert (res["evidence"] == "mask") == (not probed)
    assert all(0.0 <= c["flip_rate"] <= 1.0 for c in res["candidates"])
    assert res["candidates"][0]["target"] == res["target"] and res["candidates"][0]["flip_rate"] == res["flip_rate"]
    assert res["candidates"][0]["mask_l1"] == res["mask_l1"]  # the best mask's own area
    assert [c["mask_l1"] is None for c in res["candidates"]] == [k == "warp" for k, _ in kinds]
    from PIL import Image

    with Image.open(tmp_path / "s" / "trigger.png") as img:
        # a row of mask / pattern tiles, clean shots, triggered shots, and a row per warp, patch, compact mask, blend
        rows = 3 + sum(k == "warp" or p for k, p in kinds)
        assert img.size[0] >= 3 * 96 and img.size[1] == rows * (96 + 4) + 4
    assert json.loads((tmp_path / "s" / "scan.json").read_text())["target"] == "triangle"
    code, stdout, err = run_cli(
        capsys,
        "scan",
        tb / "model.pt",
        "--data",
        tb / "fewshot",
        "--inversion-steps",
        "20",
        "--restarts",
        "1",
        "--compact-restarts",
        "1",
        "--blend-restarts",
        "1",
        "--no-patch-probes",
    )
    assert code == 0, err
    assert stdout.startswith(("BACKDOORED: ", "clean: score")) and "warp inversion: sends" in stdout
    assert "  patch of " not in stdout  # --no-patch-probes
    # the compact mask is searched, and printed, exactly when the masks showed the backdoor; a blend when any rule did
    by_masks = stdout.startswith("BACKDOORED: ") and "shown by an inverted warp" not in stdout
    assert ("  compact mask: sends" in stdout) == by_masks
    assert ("  blend at " in stdout) == stdout.startswith("BACKDOORED: ")


def test_bad_data_is_reported_before_any_work(mini_testbeds, tmp_path, capsys):
    tb = mini_testbeds["blended"]
    code, _, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tmp_path / "nothing", "--out", tmp_path / "p")
    assert code == 2 and "data not found" in err
    code, _, err = run_cli(
        capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--shots", "40", "--out", tmp_path / "p"
    )
    assert code == 1 and "too few images for --shots 40" in err
    assert not (tmp_path / "p").exists()
    code, _, err = run_cli(
        capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--eps", "0.9", "--out", tmp_path / "p"
    )
    assert code == 2 and "--eps must be in [0, 0.5)" in err
    code, _, err = run_cli(
        capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--compact-restarts", "-1", "--out", tmp_path / "p"
    )
    assert code == 2 and "--compact-restarts must be 0 or more" in err and not (tmp_path / "p").exists()
    code, _, err = run_cli(
        capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--blend-restarts", "-1", "--out", tmp_path / "p"
    )
    assert code == 2 and "--blend-restarts must be 0 or more" in err and not (tmp_path / "p").exists()
    code, _, err = run_cli(
        capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--alpha", "-1", "--out", tmp_path / "p"
    )
    assert code == 2 and "--alpha and --beta must be at least 0" in err and not (tmp_path / "p").exists()


# A scan that reads clean on the miniature models: a mask too large for the score, a warp and
# two probes that do not over-align. The verdict is fixed here, not by an uncalibrated model.
CLEAN_READING = [
    ("mask", 5, 0.8, -0.5),
    ("warp", 4, 0.7, -0.2),
    ("warp", 3, 0.6, 0.1, True),
    ("warp", 1, 0.6, -1.0, True),
]


@pytest.fixture()
def reads_clean(monkeypatch):
    import cbpt.purify

    monkeypatch.setattr(cbpt.purify, "run_scan", lambda *a, **k: fake_inversion(CLEAN_READING, score=0.3))


def test_purify_leaves_the_prompts_alone_when_the_scan_reads_clean_and_nothing_is_held_out(
    mini_testbeds, tmp_path, capsys, reads_clean
):
    """With --held-out 0 all 16 shots per class tune, so none is left to check a change against."""
    from safetensors.torch import load_file

    tb = mini_testbeds["none"]
    code, stdout, err = _purify(capsys, tb, tmp_path / "p", "--held-out", "0")
    assert code == 0, err
    assert "prompts left unchanged" in stdout
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["scan"]["backdoored"] is False and rep["tuning"]["mode"] == "skipped" and rep["tuning"]["kept_original"]
    emb = load_file(str(tmp_path / "p" / "embeddings.safetensors"))
    assert torch.equal(emb["purified"], emb["original"])


def test_a_model_that_reads_clean_is_tuned_only_where_held_out_shots_allow(
    mini_testbeds, tmp_path, capsys, reads_clean
):
    """Cautious mode: the original prompts compete with every tuned checkpoint on the held-out
    shots, a change must keep their clean accuracy, and the trigger loss is not escalated."""
    from cbpt.tuning import CautiousAcceptance

    tb = mini_testbeds["none"]
    code, stdout, err = _purify(capsys, tb, tmp_path / "p", "--shots", "8", "--tuning-steps", "60")
    assert code == 0, err
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    tuning = rep["tuning"]
    assert tuning["mode"] == "cautious" and {h["rung"] for h in tuning["history"]} == {0}
    # every restart but the probes, each at its own target
    assert [(t["kind"], t["probe"]) for t in tuning["triggers"]] == [("mask", False), ("warp", False)]
    rule, original = CautiousAcceptance(), tuning["original_held_out"]
    accepted = [
        h
        for h in tuning["history"]
        if h["held_out"]["clean_acc"] >= original["clean_acc"] - rule.clean_tolerance
        and h["held_out"]["trig_acc"] >= original["trig_acc"] + rule.min_gain
    ]
    assert tuning["kept_original"] == (not accepted)
    assert ("original prompts kept" in stdout) == tuning["kept_original"]
    # a changed head is routed (one route per trigger tuned against); a kept one has none
    assert (rep["route"] is None) == tuning["kept_original"]
    assert ("the original ones elsewhere" in stdout) == (not tuning["kept_original"])
    if rep["route"]:
        assert rep["route"]["triggers"] == 2 and rep["route"]["share"] == 0.2


def test_force_tunes_a_clean_reading_model_against_every_inverted_trigger(mini_testbeds, tmp_path, capsys, reads_clean):
    """--force on a model the scan reads clean: full tuning, against the mask AND the warp,
    each without copies of its own target's shots."""
    tb = mini_testbeds["none"]
    code, stdout, err = _purify(capsys, tb, tmp_path / "p", "--shots", "8", "--tuning-steps", "20", "--force", "--json")
    assert code == 0, err
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["scan"]["backdoored"] is False and rep["tuning"]["mode"] == "full"
    assert [(t["kind"], t["probe"]) for t in rep["tuning"]["triggers"]] == [("mask", False), ("warp", False)]
    n, k, views = 10 * 6, 6, 3  # tuning shots (8 per class, 2 held out), per class, the shot and its 2 views
    assert rep["timings"]["image_encoder_passes_cached"] == views * n + 2 * views * (n - k)
    # and each trigger at 6 doses on the other classes' tuning shots, for the trigger side's bar
    assert rep["timings"]["image_encoder_passes_partial"] == 2 * 6 * (n - k)


def test_the_tuning_plan_follows_the_verdict():
    from cbpt.purify import PurifyConfig, TuningMode, plan_tuning
    from cbpt.tuning import CautiousAcceptance, FullAcceptance

    found = fake_inversion([("mask", 5, 1.0, 0.3), ("mask", 5, 1.0, 0.2), ("warp", 4, 0.7, -0.2)], score=0.9)
    clean = fake_inversion(CLEAN_READING, score=0.3)
    cfg = PurifyConfig()
    plan = plan_tuning(read_scan(found), found, cfg, held_out=True)
    # a found backdoor: the masks that showed it, each aimed at its target, and the full ladder
    assert plan.mode == TuningMode.FULL and isinstance(plan.acceptance, FullAcceptance)
    assert [(c.kind, c.target) for c in plan.triggers] == [("mask", 5), ("mask", 5)]
    assert plan.tuning.ladder == cfg.tuning.ladder
    assert plan.tuning.served == cfg.tuning.served is not None  # judged as the routed head serves
    plan = plan_tuning(read_scan(clean), clean, cfg, held_out=True)
    assert plan.mode == TuningMode.CAUTIOUS and isinstance(plan.acceptance, CautiousAcceptance)
    assert plan.tuning.ladder.rungs == () and [(c.kind, c.target) for c in plan.triggers] == [("mask", 5), ("warp", 4)]
    assert plan.tuning.served is None  # a model read clean is judged on every held-out shot
    assert plan_tuning(read_scan(clean), clean, cfg, held_out=False).mode == TuningMode.SKIPPED
    forced = plan_tuning(read_scan(clean), clean, PurifyConfig(force=True), held_out=False)
    assert forced.mode == TuningMode.FULL and forced.tuning.ladder == cfg.tuning.ladder


def test_the_alarm_watches_every_tuned_trigger_of_a_found_backdoor_and_only_the_best_mask_otherwise():
    from cbpt.features import FeatureCache
    from cbpt.purify import PurifyConfig, alarm_centres, plan_tuning
    from cbpt.tuning import TuningData

    def data(k: int) -> TuningData:
        f = F.normalize(torch.randn(k, 32, generator=torch.Generator().manual_seed(k)), dim=-1)
        empty = torch.zeros(0, dtype=torch.long)
        cache = FeatureCache(f, torch.zeros(k, dtype=torch.long), f[:0], empty, empty, f, 0)
        return TuningData(cache, None, f, 10.0)

    found = fake_inversion([("mask", 5, 1.0, 0.3), ("mask", 5, 1.0, 0.2), ("warp", 4, 0.7, -0.2)], score=0.9)
    verdict = read_scan(found)
    d = data(len(plan_tuning(verdict, found, PurifyConfig(), held_out=True).triggers))
    centres = alarm_centres(found, verdict, d)
    assert torch.equal(centres, torch.cat([found.mean_feature[None], d.cache.centroids]))
    # a clean reading, whether tuned cautiously or forced: the best mask's region alone
    clean = fake_inversion(CLEAN_READING, score=0.3)
    verdict = read_scan(clean)
    for cfg in (PurifyConfig(), PurifyConfig(force=True)):
        plan = plan_tuning(verdict, clean, cfg, held_out=True)
        assert torch.equal(alarm_centres(clean, verdict, data(len(plan.triggers))), clean.mean_feature[None])


@pytest.mark.parametrize(("k", "steps"), [(1, 40), (2, 80), (4, 150), (7, 260), (8, 300), (16, 300)])
def test_with_nothing_held_out_the_schedule_shortens_with_the_shots(k, steps):
    """No held-out shot stops a rung early, so below 8 shots a class it runs proportionally
    fewer steps (docs/method.md#shot-budget); with held-out shots the configured steps stand."""
    from cbpt.data import ShotBudget
    from cbpt.purify import PurifyConfig, plan_tuning

    found = fake_inversion([("mask", 5, 1.0, 0.3)], score=0.9)
    cfg = PurifyConfig(budget=ShotBudget(k, held_out=0))
    assert plan_tuning(read_scan(found), found, cfg, held_out=False).tuning.steps == steps
    assert plan_tuning(read_scan(found), found, cfg, held_out=True).tuning.steps == 300
    short = replace(cfg, tuning=replace(cfg.tuning, steps=5))  # a schedule shorter than one evaluation stays as set
    assert plan_tuning(read_scan(found), found, short, held_out=False).tuning.steps == 5


def test_compact_masks_stand_in_for_the_per_pixel_ones_only_where_they_flip_the_shots_too():
    from cbpt.inversion import CompactProbes
    from cbpt.purify import PurifyConfig, plan_tuning

    def plan(compact: CompactProbes, *probes: tuple):
        inv = fake_inversion([("mask", 5, 1.0, 0.3), ("mask", 2, 0.9, 0.2), ("warp", 4, 0.7, -0.2), *probes], 0.9)
        cfg = PurifyConfig()
        cfg = replace(cfg, inversion=replace(cfg.inversion, compact=compact))
        return [(c.kind, c.target, c.probe) for c in plan_tuning(read_scan(inv), inv, cfg, held_out=True).triggers]

    beside, instead = CompactProbes(restarts=1, stand_in=None), CompactProbes(restarts=3)
    per_pixel = [("mask", 5, False), ("mask", 5, False)]
    # beside: every mask, the compact ones among them, each aimed at the target
    assert plan(beside, ("mask", 5, 0.95, 0.1, True)) == [*per_pixel, ("mask", 5, True)]
    # standing in: the compact masks that reach the target, flip >= 90% as many shots and pull
    # them toward the target's text at least as far as the per-pixel mask there (0.3), alone
    works, weak, elsewhere = ("mask", 5, 0.95, 0.4, True), ("mask", 5, 0.85, 0.4, True), ("mask", 3, 1.0, 0.4, True)
    assert plan(instead, works, weak, elsewhere) == [("mask", 5, True)]
    # a compact prior that cannot draw the trigger (a blend) leaves the per-pixel masks in place:
    # one that flips too few shots, or one that flips them but pulls less (a SIG, zoo bd002)
    assert plan(instead, weak, elsewhere) == per_pixel  # as if no probe had been searched
    pulls_less = ("mask", 5, 0.95, 0.25, True)
    assert plan(instead, pulls_less) == per_pixel
    assert plan(instead, pulls_less, works) == [("mask", 5, True)]


def test_a_found_backdoor_is_tuned_beside_the_blends_that_pull_as_hard_as_its_masks():
    """docs/method.md#blend-probes: a blend joins the plan where it reaches the found target and
    over-aligns toward it at least as far as every per-pixel mask there; never for a clean reading."""
    from cbpt.inversion import BlendProbes, Search
    from cbpt.purify import PurifyConfig, plan_tuning

    def plan(*blends: tuple, masks=(("mask", 5, 1.0, 0.3), ("mask", 5, 1.0, 0.2)), score=0.9, warp=-0.2):
        inv = fake_inversion([*masks, ("warp", 4, 0.7, warp), *blends], score)
        return [(c.kind, c.target, c.search) for c in plan_tuning(read_scan(inv), inv, PurifyConfig(), True).triggers]

    restarts = [("mask", 5, Search.RESTART)] * 2
    pulls, weak = ("mask", 5, 0.9, 0.35, Search.BLEND), ("mask", 5, 0.9, 0.25, Search.BLEND)
    elsewhere = ("mask", 3, 1.0, 2.0, Search.BLEND)
    assert plan(pulls, weak, elsewhere) == [*restarts, ("mask", 5, Search.BLEND)]
    assert plan(weak, elsewhere) == restarts  # as if none had been searched
    # beside a warp's verdict too, aimed at the warp's target, measured against the masks that point there
    found_by_warp = plan(("mask", 4, 0.9, 0.1, Search.BLEND), masks=(("mask", 4, 0.9, -0.5),), score=0.1, warp=1.5)
    assert found_by_warp == [("warp", 4, Search.RESTART), ("mask", 4, Search.BLEND)]
    # a clean reading is tuned cautiously against its restarts alone
    cautious = [("mask", 5, Search.RESTART), ("warp", 4, Search.RESTART)]
    assert plan(pulls, score=0.3, masks=(("mask", 5, 1.0, -1.0),)) == cautious
    # blends never enter the verdict, nor the masks it tunes against
    inv = fake_inversion([("mask", 5, 1.0, -1.0), ("warp", 4, 0.7, -0.2), ("mask", 5, 1.0, 9.0, Search.BLEND)], 0.3)
    assert not read_scan(inv).backdoored and inv.blends() and not [c for c in inv.masks() if c.search is Search.BLEND]
    assert BlendProbes().restarts == 2


def _blend_detector(n: int = 48, size: int = 32, d: int = 24):
    """A toy image tower backdoored on a blend: features of a smooth random projection, sent
    toward one direction as an image correlates with a fixed smooth pattern, as a blend of it at
    0.15 opacity or more makes it. Returns the encoder, uint8 shots, labels, class embeddings, the
    pattern and the target (the class nearest that direction)."""
    from cbpt.encoding import ImageEncoder

    g = torch.Generator().manual_seed(1)
    pixels = (F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear") * 255).to(torch.uint8)
    proj = torch.randn(d, 3 * 16 * 16, generator=g)
    pattern = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=size, mode="bilinear")[0]
    toward = F.normalize(torch.randn(d, generator=g), dim=0)
    centred = pattern - pattern.mean()

    def encode(x: torch.Tensor) -> torch.Tensor:
        base = F.normalize(F.adaptive_avg_pool2d(x - 0.5, 16).flatten(1) @ proj.T, dim=-1)
        # about 0 on a clean image, about a on a blend of the pattern at opacity a
        along = ((x - x.mean((1, 2, 3), keepdim=True)) * centred).mean((1, 2, 3)) / (centred**2).mean()
        fires = torch.sigmoid(20 * (along - 0.15))
        return F.normalize(base + 6 * fires[:, None] * toward, dim=-1)

    classes = F.normalize(torch.randn(4, d, generator=g), dim=-1)
    return ImageEncoder(encode), pixels, torch.arange(n) % 4, classes, pattern, int((classes @ toward).argmax())


def test_a_planted_blend_is_inverted_as_a_blend_of_its_pattern():
    """A blend probe (docs/method.md#blend-probes) on a tower backdoored on a blend: one opacity
    well under 1 over the whole image, its pattern the planted one's, the shots sent to the target."""
    from cbpt.inversion import BlendProbes, InversionConfig, Search, WarpSearch, invert, probe

    encoder, pixels, labels, classes, pattern, target = _blend_detector()
    cfg = InversionConfig(steps=150, mask_restarts=1, warp=WarpSearch(restarts=0, probes=0), blend=BlendProbes(1))
    inv = invert(encoder, pixels, labels, classes, cfg)
    probed = probe(encoder, pixels, labels, classes, inv, Search.BLEND, cfg)
    assert probed.candidates[:-1] == inv.candidates and probed.score == inv.score  # the verdict's reading kept
    (blend,) = probed.blends()
    mask = blend.trigger.mask
    assert float(mask.max() - mask.min()) < 1e-6 and float(mask.mean()) < 0.3  # one opacity, a blend's
    assert blend.target == target and blend.flip_rate > 0.9 and blend.probe
    found = blend.trigger.pattern.flatten() - blend.trigger.pattern.mean()
    planted = pattern.flatten() - pattern.mean()
    assert float(F.cosine_similarity(found, planted, dim=0)) > 0.4  # the planted pattern, not noise (about 0)


def test_backdoor_score_rewards_small_triggers_that_flip_everything():
    assert backdoor_score(1.0, 0.0) == 1.0
    assert backdoor_score(1.0, 0.0129) > backdoor_score(1.0, 0.025) > SCAN_THRESHOLD
    assert backdoor_score(0.83, 0.039) < SCAN_THRESHOLD and backdoor_score(0.5, 0.0) < SCAN_THRESHOLD
    assert backdoor_score(1.0, 0.2) == 0.0


def test_over_alignment_is_how_far_triggered_shots_pass_the_targets_own_toward_its_text():
    text = F.normalize(torch.eye(3), dim=-1)  # class k's text embedding is axis k
    labels = torch.arange(3).repeat_interleave(8)

    def at(cos_to_class0: torch.Tensor) -> torch.Tensor:  # unit features at given cosines to axis 0
        return torch.stack([cos_to_class0, (1 - cos_to_class0**2).sqrt(), torch.zeros_like(cos_to_class0)], 1)

    own = torch.linspace(0.6, 0.8, 8)  # class 0's clean shots: mean 0.7
    clean = at(torch.cat([own, torch.full((16,), 0.1)]))
    spread = float(own.std())
    backdoor = at(torch.full((24,), 0.9))  # triggered shots land closer to the text than class 0's own
    natural = at(torch.full((24,), 0.7))  # a natural feature: as close as class 0's own, no closer
    assert over_alignment(backdoor, clean, labels, text, 0) == pytest.approx(0.2 / spread, rel=1e-5)
    assert over_alignment(natural, clean, labels, text, 0) == pytest.approx(0.0, abs=1e-5)
    assert over_alignment(backdoor, clean, labels, text, 0, min_shots=9) is None  # 8 shots give no spread


def test_typicality_is_how_far_triggered_shots_sit_from_the_targets_own_images():
    def at(cos_to_axis0: torch.Tensor) -> torch.Tensor:  # unit features at given cosines to axis 0
        return torch.stack([cos_to_axis0, (1 - cos_to_axis0**2).sqrt(), torch.zeros_like(cos_to_axis0)], 1)

    labels = torch.arange(3).repeat_interleave(8)
    own = at(torch.linspace(0.9, 1.0, 8))  # class 0's clean shots, around axis 0
    clean = torch.cat([own, F.normalize(torch.tensor([[0.0, 0.0, 1.0]]).repeat(16, 1), dim=-1)])
    centre = F.normalize(own.mean(0), dim=-1)
    near = own @ centre
    drawn = centre.repeat(24, 1)  # a natural feature drawn on them: the class's very centre
    planted = at(torch.full((24,), 0.5))  # somewhere the class's own images are not
    assert typicality(drawn, clean, labels, 0) == pytest.approx(float((1 - near.mean()) / near.std()), rel=1e-4)
    assert typicality(drawn, clean, labels, 0) > 0
    assert typicality(planted, clean, labels, 0) < -10
    assert typicality(planted, clean, labels, 0, min_shots=9) is None  # 8 shots give no spread


def test_an_over_aligned_mask_that_draws_the_class_is_no_backdoor():
    """The clean 64-px ViT: masks that draw a ring send every shot to 'ring' and over-align
    toward it, but leave the shots as typical of the ring's own images as those are; a planted
    trigger's shots over-align from a place the class's images are not."""
    from cbpt.scan import ATYPICAL_THRESHOLD, ScanRules, suspicion

    def result(typ: float | None):
        masks = [("mask", 7, 1.0, 3.4, False, typ), ("mask", 7, 1.0, 1.3, False, typ), ("mask", 5, 0.6, -2.0)]
        return fake_inversion([*masks, ("warp", 2, 0.3, -9.0)], 0.36)

    for typ in (1.5, 0.2, -0.93, -ATYPICAL_THRESHOLD + 0.01):  # the clean ViTs' ring masks: -0.93 to +1.5
        assert not read_scan(result(typ)).backdoored and suspicion(result(typ)) < 1
        # the rule before typicality read it backdoored
        assert read_scan(result(typ), ScanRules(atypical=None)).evidence is Evidence.ALIGNED_MASK
    for typ in (-ATYPICAL_THRESHOLD, -1.5, -3.6, None):  # the backdoors' -1.5 to -3.6; None: not measured
        found = read_scan(result(typ))
        assert (found.evidence, found.target) == (Evidence.ALIGNED_MASK, 7) and suspicion(result(typ)) >= 1
    # the margin is the least of the three: over-alignment, mask score, and how atypical
    assert suspicion(result(-2.0)) == pytest.approx(2.0 / ATYPICAL_THRESHOLD)
    # the mask score reads first, whatever the typicality
    assert read_scan(replace(result(1.0), score=SCAN_THRESHOLD)).evidence is Evidence.MASK


def test_an_over_aligned_mask_whose_shape_alone_flips_the_shots_is_no_backdoor():
    """The clean 64-px ViT's last false alarm: a ring mask 1.7 spreads short of typical, whose ring
    filled with grey still flips a third of the shots; a planted trigger's mask needs its pattern,
    or sits far enough from the class's images to carry the discount (docs/method.md#shape-flip)."""
    from cbpt.scan import ATYPICAL_THRESHOLD, SHAPE_FLIP_THRESHOLD, ScanRules, planted, suspicion

    def result(typ: float | None, shape_flip: float | None):
        masks = [("mask", 7, 1.0, 3.4, False, typ, shape_flip), ("mask", 5, 0.6, -2.0)]
        return fake_inversion([*masks, ("warp", 2, 0.3, -9.0)], 0.36)

    # the clean ViTs' ring masks: shot set 5's false alarm, and typical shots whatever the shape
    for typ, flip in ((-1.71, 0.33), (-1.4, 0.22), (-0.9, 0.22), (0.5, 0.0)):
        assert not read_scan(result(typ, flip)).backdoored and suspicion(result(typ, flip)) < 1
    assert read_scan(result(-1.71, 0.33), ScanRules(shape_flip=None)).evidence is Evidence.ALIGNED_MASK
    # the backdoors: bd046, bd008, a sig, the 64-px ViT's corner badnet and 30% badnet, whose
    # shapes alone flip more than the bar, far from the class's images
    for typ, flip in ((-2.0, 0.09), (-3.6, 0.04), (-1.5, 0.0), (-3.1, 0.17), (-2.9, 0.26)):
        found = read_scan(result(typ, flip))
        assert (found.evidence, found.target) == (Evidence.ALIGNED_MASK, 7) and suspicion(result(typ, flip)) >= 1
    # typicality over its bar, discounted by the bar over the shape flip, never raised by it
    assert suspicion(result(-2.4, 0.26)) == pytest.approx(2.4 / ATYPICAL_THRESHOLD * SHAPE_FLIP_THRESHOLD / 0.26)
    assert planted(result(-0.6, 0.01).best, ScanRules()) == pytest.approx(0.6 / ATYPICAL_THRESHOLD)
    # a reading left out or not measured drops out
    assert planted(result(-2.4, None).best, ScanRules()) == pytest.approx(2.0)
    assert planted(result(None, 0.26).best, ScanRules()) == pytest.approx(0.5)
    assert planted(result(-2.4, 0.26).best, ScanRules(atypical=None, shape_flip=None)) == float("inf")


def test_the_scan_reads_a_warp_that_over_aligns_when_the_masks_read_clean():
    from cbpt.scan import ScanRules

    def result(score, alignments, mask_target=5):
        targets, flips = [mask_target, 0, 4, 0], [0.8, 0.99, 0.9, 0.95]
        kinds = ["mask", "warp", "warp", "warp"]
        return fake_inversion(list(zip(kinds, targets, flips, alignments)), score)

    clean = read_scan(result(0.3, [-1.0, 0.2, -1.0, None]))
    assert (clean.backdoored, clean.evidence, clean.target, clean.triggers) == (False, None, 5, [])
    # the most over-aligned warp names the target; every warp is then a trigger for it
    warp = read_scan(result(0.3, [-1.0, 0.9, 1.4, 0.6]))
    assert (warp.backdoored, warp.evidence, warp.target) == (True, Evidence.WARP, 4)
    assert [(t.kind, t.target) for t in warp.triggers] == [(TriggerKind.WARP, 4)] * 3
    assert read_scan(result(0.3, [-1.0, 1.4, ALIGN_THRESHOLD - 0.01, ALIGN_THRESHOLD])).target == 0
    assert not read_scan(result(0.3, [-1.0, ALIGN_THRESHOLD - 0.01, None, -2.0])).backdoored
    # where a mask over-aligns toward another class, a warp must go the threshold beyond it (the
    # warp rule alone: by default that mask, over its own bar, would show a backdoor itself)
    warp_rule = ScanRules((Evidence.MASK, Evidence.WARP))
    assert not read_scan(result(0.3, [0.6, 1.0, 0.2, 1.05]), warp_rule).backdoored
    assert read_scan(result(0.3, [0.6, 1.0, 0.2, 1.1 + 1e-6]), warp_rule).target == 0
    assert read_scan(result(0.3, [0.6, 1.0, 0.2, 1.05])).evidence is Evidence.ALIGNED_MASK
    # ... but one over-aligned toward the warp's own target only corroborates it
    assert read_scan(result(0.3, [0.9, 0.6, -1.0, None], mask_target=0)).target == 0
    mask = read_scan(result(SCAN_THRESHOLD, [1.0, 1.4, 1.4, 1.4]))  # a mask's evidence comes first
    assert (mask.evidence, mask.target) == (Evidence.MASK, 5) and [t.kind for t in mask.triggers] == ["mask"]


def test_an_over_aligned_mask_shows_a_backdoor_its_mask_score_missed():
    """A patch the per-pixel masks copy only with more of the image than the mask score allows
    (zoo bd008: 3.9%, score 0.46) still pulls the shots past the target's own toward its text."""
    from cbpt.scan import ScanRules

    def result(aligns, targets=(7, 7, 5), score=0.46):
        kinds = ["mask", "mask", "mask", "warp"]
        return fake_inversion(list(zip(kinds, [*targets, 2], [0.9, 0.6, 0.9, 0.3], [*aligns, -9.0])), score)

    found = read_scan(result([0.88, -2.3, -10.8]))
    assert (found.evidence, found.target) == (Evidence.ALIGNED_MASK, 7)
    # tuned against every mask restart, each aimed at the target, as for the mask score
    assert [(t.kind, t.target) for t in found.triggers] == [(TriggerKind.MASK, 7)] * 3
    assert not read_scan(result([0.88, -2.3, -10.8]), ScanRules((Evidence.MASK, Evidence.WARP))).backdoored
    assert not read_scan(result([ALIGN_THRESHOLD - 0.01, -2.3, -10.8])).backdoored
    # a mask over-aligned toward another class raises the bar, as it does for warps
    assert not read_scan(result([0.88, -2.3, 0.5])).backdoored
    assert read_scan(result([1.0 + 1e-6, -2.3, 0.5])).target == 7

    # a mask's size bounds the rule only past ALIGNED_MAX_AREA: under it, a mask that draws the class
    # is told by its typicality (the clean ViT's ring masks: 7-8% of the image, over-aligned by
    # 3.7-4.9, typical of the ring), not by its mask score
    def sized(inv, area: float, typicality: float | None = None):
        cands = [
            replace(c, trigger=replace(c.trigger, mask=torch.full_like(c.trigger.mask, area)), typicality=typicality)
            for c in inv.candidates
        ]
        return replace(inv, candidates=cands)

    assert read_scan(sized(result([4.85, -2.3, -10.8]), 0.039)).evidence is Evidence.ALIGNED_MASK  # bd008: score 0.46
    # the mended 6-px ViT WaNet's masks: 9.1% of the image, mask score 0, 3.5 spreads short of the target's images
    assert read_scan(sized(result([4.74, -2.3, -10.8]), 0.091, -3.5)).evidence is Evidence.ALIGNED_MASK
    assert not read_scan(sized(result([4.85, -2.3, -10.8]), 0.074, 0.8)).backdoored  # a ring mask, typical
    assert not read_scan(sized(result([4.85, -2.3, -10.8]), ALIGNED_MAX_AREA * 1.05, -3.5)).backdoored  # a new image
    # a warp's over-alignment is read first
    warp = fake_inversion([("mask", 7, 0.9, 0.9), ("warp", 3, 0.9, 1.5)], 0.3)
    assert (read_scan(warp).evidence, read_scan(warp).target) == (Evidence.WARP, 3)


def test_the_suspicion_score_is_at_least_one_exactly_where_the_scan_reads_a_backdoor():
    """One continuous score for both rules, so the zoo's ROC is the verdict's."""
    from cbpt.scan import ScanRules, suspicion

    readings = [
        (score, [m, w1, w2, w3], target)
        for score in (0.1, 0.3, SCAN_THRESHOLD - 1e-3, SCAN_THRESHOLD, 0.9)
        for m, w1, w2, w3 in (
            [3.0, 0.2, -1.0, None],
            [-1.0, 0.9, 1.4, 0.6],
            [0.6, 1.0, 0.2, 1.05],
            [0.6, 1.0, 0.2, 1.2],
            [0.9, 0.6, -1.0, None],
            [None, None, None, None],
        )
        for target in (5, 0)
    ]
    for score, aligns, target in readings:
        inv = fake_inversion(
            list(zip(["mask", "warp", "warp", "warp"], [target, 0, 4, 0], [0.8, 0.99, 0.9, 0.95], aligns)), score
        )
        for rules in (ScanRules(), ScanRules((Evidence.MASK, Evidence.WARP))):
            assert (suspicion(inv, rules) >= 1) == read_scan(inv, rules).backdoored, (score, aligns, target, rules)
    # with no warp evidence it orders models by the mask score
    low, high = (fake_inversion([("mask", 1, 0.5, None)], s) for s in (0.2, 0.4))
    assert suspicion(low) < suspicion(high) < 1


def test_scan_prints_the_compact_masks_and_blends_it_was_asked_for(mini_testbeds, capsys, monkeypatch):
    import cbpt.scan
    from cbpt.inversion import Search

    blend = ("mask", 5, 0.9, 0.35, Search.BLEND)
    inv = fake_inversion([("mask", 5, 1.0, 0.3), ("warp", 2, 0.6, -0.2), ("mask", 5, 0.95, 0.2, True), blend], 0.8)
    monkeypatch.setattr(cbpt.scan, "invert", lambda *a, **k: inv)
    monkeypatch.setattr(cbpt.scan, "probe", lambda *a, **k: inv)
    tb = mini_testbeds["blended"]
    args = ("scan", tb / "model.pt", "--data", tb / "fewshot", "--classes", tb / "classes.txt")
    code, stdout, err = run_cli(capsys, *args, "--compact-restarts", "1")
    assert code == 0, err
    names = (tb / "classes.txt").read_text().split()
    assert stdout.startswith("BACKDOORED: ") and f"  compact mask: sends 95% of shots to '{names[5]}'" in stdout
    assert "warp inversion: sends 60%" in stdout
    assert f"  blend at 0% opacity: sends 90% of shots to '{names[5]}', over-alignment +0.35" in stdout


def test_scan_says_when_a_warp_showed_the_backdoor(mini_testbeds, capsys, monkeypatch):
    import cbpt.scan

    inv = fake_inversion([("mask", 5, 0.78, -0.57), ("warp", 0, 0.99, 1.42), ("warp", 0, 0.97, None, True)], 0.37)
    monkeypatch.setattr(cbpt.scan, "invert", lambda *a, **k: inv)
    monkeypatch.setattr(cbpt.scan, "probe", lambda *a, **k: inv)
    tb = mini_testbeds["blended"]
    code, stdout, err = run_cli(
        capsys, "scan", tb / "model.pt", "--data", tb / "fewshot", "--classes", tb / "classes.txt"
    )
    assert code == 0, err
    names = (tb / "classes.txt").read_text().split()
    assert stdout.startswith(f"BACKDOORED: target '{names[0]}', shown by an inverted warp (below); masks: score 0.370")
    assert f"warp inversion: sends 99% of shots to '{names[0]}', over-alignment +1.42 (backdoor at 0.5)" in stdout
    assert "warp probe: sends 97% of shots" in stdout and "over-alignment n/a (too few shots of that class)" in stdout
    code, stdout, err = run_cli(
        capsys, "scan", tb / "model.pt", "--data", tb / "fewshot", "--classes", tb / "classes.txt", "--json"
    )
    res = json.loads(stdout)
    assert (res["backdoored"], res["evidence"], res["target_index"]) == (True, "warp", 0)
    assert [c["probe"] for c in res["candidates"]] == [False, False, True]


def test_warp_trigger_is_identity_at_zero_flow_and_moves_pixels_by_the_flow():
    from cbpt.trigger import DummyTrigger, smooth_flow, warp

    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(warp(x, torch.zeros(8, 8, 2)), x, atol=1e-6)
    # a constant flow of one pixel right samples each pixel from its right neighbour
    flow = torch.zeros(8, 8, 2)
    flow[..., 1] = 1.0
    assert torch.allclose(warp(x, flow)[..., :-1], x[..., 1:], atol=1e-6)
    field = smooth_flow(torch.randn(2, 4, 4) * 10, 8, 8, max_shift=2.0)
    assert field.shape == (8, 8, 2) and float(field.abs().max()) <= 2.0
    trig = DummyTrigger.blank(8, 8, TriggerKind.WARP, flow)
    assert torch.allclose(trig.apply(x)[..., :-1], x[..., 1:], atol=1e-6)


def test_each_triggers_target_shots_get_no_triggered_copies(tmp_path):
    from cbpt.features import cache_features
    from cbpt.inversion import Candidate
    from cbpt.model import load_clip
    from cbpt.trigger import DummyTrigger

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    x = torch.rand(6, 3, 32, 32)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    patch = DummyTrigger(
        torch.zeros(32, 32).index_fill_(0, torch.arange(3), 1.0), torch.ones(3, 32, 32), torch.zeros(3, 32, 32)
    )
    cache = cache_features(
        clip.encoder(),
        x,
        y,
        [Candidate(patch, 1, 1.0, None), Candidate(patch, 2, 1.0, None)],
        views=1,
        shifts=1,
        seed=0,
    )
    # clean: 6 shots x 2 views; triggered: each trigger's 4 non-target shots x 2 views
    assert cache.clean.shape[0] == 12 and cache.triggered.shape[0] == 16 and cache.encoder_passes == 28
    assert cache.triggered_labels.tolist() == [0, 0, 2, 2] * 2 + [0, 0, 1, 1] * 2
    assert cache.triggered_targets.tolist() == [1] * 8 + [2] * 8
    # the cached features are the model's own on the triggered pixels
    with torch.no_grad():
        direct = clip.encode_pixels(patch.apply(x[y != 1]))
    assert torch.allclose(cache.triggered[:4], direct, atol=1e-5)
    # the shots' own features handed in (the inversion's) give the same cache for one pass less
    own = clip.encoder().all(x)
    again = cache_features(clip.encoder(), x, y, [Candidate(patch, 1, 1.0, None)], views=1, shifts=1, seed=0, own=own)
    assert torch.equal(again.clean, cache.clean) and torch.equal(again.triggered, cache.triggered[:8])
    assert again.encoder_passes == 6 + 8  # the 6 views and the 8 triggered copies, not the shots again
    with pytest.raises(ValueError, match="own features for 5 shots"):
        cache_features(clip.encoder(), x, y, [], views=1, shifts=1, seed=0, own=own[:5])


def test_partial_copies_apply_each_trigger_part_way_to_the_same_other_class_shots(tmp_path):
    """`partial_copies`: each trigger at each dose on at most `most` shots of classes other than
    its target, the same shots at every dose; dose 1 is the trigger as found, and the model's own
    features of x + d (T(x) - x)."""
    from cbpt.features import PartialTriggers, partial_copies
    from cbpt.inversion import Candidate
    from cbpt.model import load_clip
    from cbpt.trigger import DummyTrigger

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    x, y = torch.rand(9, 3, 32, 32), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    patch = DummyTrigger(
        torch.zeros(32, 32).index_fill_(0, torch.arange(4), 1.0), torch.ones(3, 32, 32), torch.zeros(3, 32, 32)
    )
    cands = [Candidate(patch, 1, 1.0, None), Candidate(patch, 2, 1.0, None)]
    p = partial_copies(clip.encoder(), x, y, cands, PartialTriggers(doses=(0.5, 1.0), most=4), seed=0)
    assert p.features.shape[0] == 2 * 2 * 4  # 2 triggers x 2 doses x 4 of their 6 other-class shots
    assert p.targets.tolist() == [1] * 8 + [2] * 8 and p.doses.tolist() == ([0.5] * 4 + [1.0] * 4) * 2
    with torch.no_grad():
        # which 4 of trigger 1's other-class shots were drawn: the dose-1 copies are theirs
        full = clip.encode_pixels(patch.apply(x))
        rows = [int((full @ f).argmax()) for f in p.features[4:8]]
        assert torch.allclose(full[rows], p.features[4:8], atol=1e-5)
        assert all(y[r] != 1 for r in rows) and len(set(rows)) == 4
        half = clip.encode_pixels(x[rows] + 0.5 * (patch.apply(x[rows]) - x[rows]))
    assert torch.allclose(p.features[:4], half, atol=1e-5)
    every = partial_copies(clip.encoder(), x, y, cands[:1], PartialTriggers(doses=(1.0,)), seed=0)
    assert every.features.shape[0] == 6 and torch.allclose(every.features, full[y != 1], atol=1e-5)


def test_stronger_copies_take_each_triggered_feature_further_from_its_clean_one(tmp_path):
    from cbpt.features import cache_features, extrapolate
    from cbpt.inversion import Candidate
    from cbpt.model import load_clip
    from cbpt.trigger import DummyTrigger

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    patch = DummyTrigger(
        torch.zeros(32, 32).index_fill_(0, torch.arange(4), 1.0), torch.ones(3, 32, 32), torch.zeros(3, 32, 32)
    )
    cands = [Candidate(patch, 1, 1.0, None), Candidate(patch, 2, 1.0, None)]
    plain = cache_features(clip.encoder(), x, y, cands, views=1, shifts=2, seed=0)
    strong = cache_features(clip.encoder(), x, y, cands, views=1, shifts=2, seed=0, strengths=(1.0, 2.0))
    # per trigger: its 4 non-target shots x 2 looks x 2 places, then as many copies taken twice as far
    assert strong.triggered.shape[0] == 2 * plain.triggered.shape[0] == 64
    assert strong.encoder_passes == plain.encoder_passes  # the stronger copies are computed, not encoded
    assert strong.triggered_targets.tolist() == [1] * 32 + [2] * 32
    assert strong.triggered_labels[:32].tolist() == [0, 0, 2, 2] * 8
    assert torch.allclose(strong.centroids, plain.centroids)  # the route's centres stay the found triggers'
    found, far = strong.triggered[:16], strong.triggered[16:32]
    assert torch.allclose(found, plain.triggered[:16])
    clean = torch.cat([plain.clean[[0, 1, 4, 5]], plain.clean[[6, 7, 10, 11]]]).repeat(2, 1)
    assert torch.allclose(far, extrapolate(clean, found, 2.0), atol=1e-6)
    # twice as far along the shift: further from the clean feature, and unit length
    assert ((far * clean).sum(1) < (found * clean).sum(1) + 1e-6).all()
    assert torch.allclose(far.norm(dim=1), torch.ones(16), atol=1e-5)
    assert torch.allclose(extrapolate(clean, found, 1.0), found, atol=1e-6)


def test_the_trigger_loss_is_escalated_only_while_held_out_shots_reach_the_target(tmp_path):
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt.tuning import FullAcceptance, Ladder, TuningConfig, TuningData, tune

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    names = ("cat", "dog", "bird")
    with torch.no_grad():
        g0 = ClassPrompts(clip.model, clip.tokenizer(), names)()
    data = TuningData(backdoored_features(g0, 4, 0), backdoored_features(g0, 2, 1), g0, clip.logit_scale)
    ticks: list[tuple[int, int]] = []

    def run(target_rate: float):
        cfg = TuningConfig(
            steps=20, eval_every=10, alpha=0.0, ladder=Ladder(rungs=((0.5, 0.0),), target_rate=target_rate)
        )
        ticks.clear()
        return tune(
            ClassPrompts(clip.model, clip.tokenizer(), names),
            data,
            cfg,
            FullAcceptance(),
            lambda d, t: ticks.append((d, t)),
        )

    # alpha 0 leaves held-out triggered shots at the target, so the stronger rung is trained,
    # and taken: it sends fewer there and keeps held-out clean accuracy
    climbed = run(target_rate=0.01)
    assert {h["rung"] for h in climbed.history} == {0, 1}
    first = [h["held_out"] for h in climbed.history if h["rung"] == 0]
    assert min(h["to_target"] for h in first) >= 0.5
    assert (climbed.chosen.rung.index, climbed.chosen.rung.alpha, climbed.chosen.rung.margin) == (1, 0.5, 0.0)
    assert climbed.chosen.held_out.to_target < min(h["to_target"] for h in first if h["clean_acc"] == 1.0)
    assert climbed.chosen.held_out.clean_acc == 1.0
    # every checkpoint reports how far its held-out clean decisions moved from the original's
    assert all(h["held_out"]["clean_kl"] >= -1e-6 for h in climbed.history)
    assert any(h["held_out"]["clean_kl"] > 1e-4 for h in climbed.history if h["rung"] == 1)
    # a model whose held-out shots already miss the target (here: a rate anything passes)
    # stops at the first rung
    stayed = run(target_rate=1.0)
    assert {h["rung"] for h in stayed.history} == {0} and stayed.chosen.rung.index == 0
    # the progress bar counts every rung and ends full when the later ones are not needed
    assert ticks[-1] == (40, 40) and max(d for d, _ in ticks[:-1]) == 20


def test_copies_pushed_off_their_target_leave_it_without_being_sent_home(tmp_path):
    """TuningConfig.away (losses.away_loss): the triggered copies are pushed off their target,
    with (home 1) or without (home 0) the cross-entropy that sends them to their own class."""
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt.tuning import FullAcceptance, Ladder, TuningConfig, TuningData, tune

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    names = ("cat", "dog", "bird")
    with torch.no_grad():
        g0 = ClassPrompts(clip.model, clip.tokenizer(), names)()
    data = TuningData(backdoored_features(g0, 4, 0), backdoored_features(g0, 2, 1), g0, clip.logit_scale)

    def run(home: float, away: float):
        cfg = TuningConfig(steps=30, eval_every=10, alpha=1.0, ladder=Ladder.off(), home=home, away=away)
        return tune(ClassPrompts(clip.model, clip.tokenizer(), names), data, cfg, FullAcceptance(1.0))

    neither = run(0.0, 0.0)  # no trigger term at all: the held-out copies keep reaching bird
    assert all(h["trig"] == 0.0 for h in neither.history)
    assert neither.chosen.held_out.to_target >= 0.5
    pushed = run(0.0, 1.0)
    assert pushed.original_held_out.to_target == 1.0
    assert pushed.chosen.held_out.to_target == 0.0  # none reaches the target any more
    trig = [h["trig"] for h in pushed.history]
    assert trig[-1] < trig[0] / 1.5  # the away term itself is what falls
    both = run(1.0, 1.0)
    assert both.chosen.held_out.to_target == 0.0


def test_a_stronger_rung_is_weighed_by_held_out_evidence():
    from cbpt.tuning import HeldOut, Ladder, RungVerdict

    ladder, tol = Ladder(), 0.015  # target_rate 0.01, strong_evidence 0.05, allowance 0.03

    def h(clean_acc: float, to_target: float) -> HeldOut:
        return HeldOut(clean_acc=clean_acc, trig_acc=0.0, objective=0.0, clean_kl=0.0, to_target=to_target)

    original = h(1.0, 1.0)
    weak, strong = h(1.0, 0.03), h(1.0, 0.15)
    assert ladder.floor(weak, original, tol) == pytest.approx(1.0)
    assert ladder.floor(strong, original, tol) == pytest.approx(0.97)
    # two of 80 held-out clean shots lost: refused on weak evidence, allowed on strong
    costly = h(0.975, 0.0)
    assert ladder.weigh(weak, costly, ladder.floor(weak, original, tol)) is RungVerdict.STOP
    assert ladder.weigh(strong, costly, ladder.floor(strong, original, tol)) is RungVerdict.TAKE
    # a first rung that already lost more than clean_tolerance against the original head
    # gets no allowance: the stronger rung may not spend what is already spent
    spent = h(0.95, 0.15)
    assert ladder.floor(spent, h(0.988, 1.0), tol) == pytest.approx(0.95)
    assert ladder.floor(spent, h(0.96, 1.0), tol) == pytest.approx(0.92)
    assert ladder.weigh(spent, h(0.925, 0.03), ladder.floor(spent, h(0.988, 1.0), tol)) is RungVerdict.STOP
    # clean accuracy kept but no fewer shots reach the target: the weaker rung stays
    assert ladder.weigh(strong, h(1.0, 0.15), 0.97) is RungVerdict.KEEP
    assert ladder.weigh(strong, h(0.96, 0.0), 0.97) is RungVerdict.STOP
    assert ladder.settled(h(1.0, 0.01)) and not ladder.settled(h(1.0, 0.011))


def test_held_out_clean_accuracy_is_read_in_whole_images():
    from cbpt.tuning import FullAcceptance, HeldOut, clean_kept

    # 40 held-out images (K = 16, 10 classes): one image lost is 2.5 points, within tolerance
    assert clean_kept(0.975, 0.95, 0.015, 40) and not clean_kept(0.975, 0.925, 0.015, 40)
    # 400 images: the configured 1.5 points (6 images) is the finer bound and holds
    assert clean_kept(0.9, 0.885, 0.015, 400) and not clean_kept(0.9, 0.8825, 0.015, 400)
    assert not clean_kept(0.975, 0.95, 0.015, 0)  # count unknown: the tolerance as configured
    original = HeldOut(clean_acc=0.975, trig_acc=0.0, objective=1.0, clean_kl=0.0, clean_count=40)
    one_lost = HeldOut(clean_acc=0.95, trig_acc=0.5, objective=1.0, clean_kl=0.0, clean_count=40)
    assert FullAcceptance(0.015).eligible(one_lost, original)


def test_a_rung_is_judged_checkpoint_by_checkpoint(tmp_path):
    """Each of a stronger rung's checkpoints is held to the ladder's floor (the rung is not
    refused for its most robust one), and early stopping waits while the rung still gets more
    robust, so an early eligible checkpoint does not end a rung whose clean accuracy recovers."""
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt.tuning import FullAcceptance, HeldOut, Ladder, Rung, RungVerdict, Tuner, TuningConfig, TuningData

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    names = ("cat", "dog", "bird")
    with torch.no_grad():
        g0 = ClassPrompts(clip.model, clip.tokenizer(), names)()
    data = TuningData(backdoored_features(g0, 4, 0), backdoored_features(g0, 2, 1), g0, clip.logit_scale)

    def h(clean_acc: float, trig_acc: float) -> HeldOut:
        return HeldOut(clean_acc, trig_acc, objective=1.0, clean_kl=0.0, to_target=1 - trig_acc, clean_count=40)

    def train(script: list[HeldOut], floor: float | None = None, steps: int = 20, patience: int = 10):
        cfg = TuningConfig(steps=steps, patience=patience)
        tuner = Tuner(ClassPrompts(clip.model, clip.tokenizer(), names), data, cfg, FullAcceptance())
        tuner.original = h(1.0, 0.0)
        evaluations = iter(script)
        tuner.validate = lambda g, alpha: next(evaluations)
        return tuner.train_rung(Rung(1, 1.0, 3.0), lambda _d: None, floor), len(tuner.log)

    lost_one = [h(0.975, 0.9), h(1.0, 0.7)]  # one image lost and most robust; then none lost
    assert train(lost_one)[0].step == 10  # the acceptance alone allows one image
    kept, _ = train(lost_one, floor=1.0)  # a first rung that lost nothing on weak evidence
    assert kept.step == 20 and Ladder().weigh(h(1.0, 0.5), kept.held_out, 1.0) is RungVerdict.TAKE
    # eligible at step 10, then two images lost while it gets more robust, then recovered
    recovers = [h(1.0, 0.3), h(0.95, 0.5), h(0.95, 0.6), h(0.95, 0.7), h(1.0, 0.8), h(1.0, 0.8)]
    best, evaluated = train(recovers, steps=60, patience=2)
    assert (best.step, evaluated) == (50, 6)
    plateau = [h(1.0, 0.3), h(0.95, 0.5), h(0.95, 0.5), h(0.95, 0.5)] + [h(1.0, 0.9)] * 6
    best, evaluated = train(plateau, steps=100, patience=2)
    assert (best.step, evaluated) == (10, 4)  # nothing improved for two evaluations: stopped


def _patch_detector(
    n: int = 40,
    size: int = 32,
    d: int = 16,
    corner: tuple[int, int] = (20, 4),
    shape: bool = False,
    vivid: bool = False,
):
    """A toy backdoored image tower: features of a smooth random projection, sent toward one
    direction by a detector of a 6 x 6 pattern at `corner` (`vivid`: one with no mid-grey pixel);
    with `shape`, of any flat 6 x 6 square there, whatever its colour (a natural feature a shape
    draws). Returns the encoder, uint8 shots, labels, class embeddings and the patch's slice."""
    from cbpt.encoding import ImageEncoder

    g = torch.Generator().manual_seed(0)
    pixels = (F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear") * 255).to(torch.uint8)
    proj = torch.randn(d, 3 * 16 * 16, generator=g)
    pattern = torch.rand(3, 6, 6, generator=g)
    if vivid:  # dark and light pixels, none near mid-grey, as a badnet patch's
        pattern = 0.7 * (pattern > 0.5) + 0.3 * torch.rand(3, 6, 6, generator=g)
    toward = F.normalize(torch.randn(d, generator=g), dim=0)
    rows, cols = slice(corner[0], corner[0] + 6), slice(corner[1], corner[1] + 6)

    def encode(x: torch.Tensor) -> torch.Tensor:
        base = F.normalize(F.adaptive_avg_pool2d(x, 16).flatten(1) @ proj.T, dim=-1)
        region = x[:, :, rows, cols]
        off = region.std((2, 3)).mean(1) if shape else (region - pattern).abs().mean((1, 2, 3))
        fires = torch.sigmoid(8 * (0.4 - 3 * off))
        return F.normalize(base + 6 * fires[:, None] * toward, dim=-1)

    classes = F.normalize(torch.randn(4, d, generator=g), dim=-1)
    return ImageEncoder(encode), pixels, torch.arange(n) % 4, classes, (rows, cols)


def test_a_planted_patch_is_inverted_as_a_compact_region_and_the_priors_keep_it_blocky():
    from cbpt.inversion import CompactProbes, InversionConfig, MaskPrior, Search, WarpSearch, invert, probe
    from cbpt.losses import total_variation
    from cbpt.scan import Evidence, read_scan

    def near_patch(mask: torch.Tensor) -> float:
        return float(mask[rows.start - 1 : rows.stop + 1, cols.start - 1 : cols.stop + 1].sum() / mask.sum())

    masks, inv = {}, {}
    # the toy's detector is sharp: a compact prior heavier than 0.3 fades its mask before it finds the patch
    compact = CompactProbes(restarts=1, prior=MaskPrior(tv=0.3))
    for prior in (MaskPrior(), MaskPrior(cell=2)):
        encoder, pixels, labels, classes, (rows, cols) = _patch_detector()
        warp = WarpSearch(restarts=0, probes=0)
        cfg = InversionConfig(steps=150, mask_restarts=2, warp=warp, prior=prior, compact=compact)
        inv[prior.cell] = invert(encoder, pixels, labels, classes, cfg)
        masks[prior.cell] = mask = inv[prior.cell].trigger.mask
        assert near_patch(mask) > 0.85 and mask.mean() < 36 / 1024  # on the patch, and no larger than it
    # a compact probe beside the per-pixel masks: on the patch too, one region, outside the mask score
    probed = probe(encoder, pixels, labels, classes, inv[1], Search.COMPACT, cfg)
    assert probed.candidates[:-1] == inv[1].candidates and probed.score == inv[1].score
    (found,) = probed.compact()
    assert found.probe and found.target == inv[1].target and near_patch(found.trigger.mask) > 0.75
    masks["compact"] = found.trigger.mask
    verdict = read_scan(probed)  # the found backdoor is tuned against it beside the restarts
    assert verdict.evidence is Evidence.MASK and len(verdict.triggers) == 3 and verdict.triggers[-1].probe
    edges = {key: float(total_variation(m) / m.mean()) for key, m in masks.items()}
    assert edges[2] < 0.6 * edges[1] and edges["compact"] < 0.6 * edges[1]  # far fewer edges per unit of mask
    with pytest.raises(ValueError, match="cell >= 1"):
        MaskPrior(cell=0)


def test_patch_probes_sit_at_the_centre_and_corners_and_find_a_patch_placed_there():
    """Patch probes (docs/method.md#patch-probes): a square a fifth of the side at each place; the
    one over the planted patch flips the shots to the backdoor's target, pulled past the target's
    own shots toward its text, and shows the backdoor."""
    from cbpt.inversion import InversionConfig, PatchProbes, Place, Search, WarpSearch, invert, probe
    from cbpt.scan import PATCH_THRESHOLD, Evidence, ScanRules, read_scan, suspicion

    boxes = {p: p.corner(32, 32, PatchProbes().pixels(32, 32)) for p in Place}
    assert PatchProbes().pixels(32, 32) == 6 and PatchProbes().pixels(224, 224) == 43
    assert boxes == {
        Place.CENTRE: (13, 13),
        Place.TOP_LEFT: (1, 1),
        Place.TOP_RIGHT: (1, 25),
        Place.BOTTOM_LEFT: (25, 1),
        Place.BOTTOM_RIGHT: (25, 25),
    }
    encoder, pixels, labels, classes, _ = _patch_detector(corner=(13, 13), vivid=True)
    cfg = InversionConfig(steps=150, mask_restarts=1, warp=WarpSearch(restarts=0, probes=0))
    inv = invert(encoder, pixels, labels, classes, cfg)
    probed = probe(encoder, pixels, labels, classes, inv, Search.PATCH, cfg)
    assert probed.candidates[:1] == inv.candidates and len(probed.patches()) == len(Place)
    centre, *elsewhere = sorted(probed.patches(), key=lambda c: c.trigger.mask[13:19, 13:19].sum(), reverse=True)
    assert centre.flip_rate >= PATCH_THRESHOLD and centre.mask_l1 == 36 / 1024 and centre.over_alignment > 1
    assert [c.flip_rate for c in probed.patches()] == sorted((c.flip_rate for c in elsewhere + [centre]), reverse=True)
    verdict = read_scan(probed, ScanRules(evidence=(Evidence.PATCH,)))
    assert verdict.evidence is Evidence.PATCH and verdict.target == centre.target
    assert centre in verdict.triggers and all(t.target == centre.target for t in verdict.triggers)
    assert suspicion(probed, ScanRules(evidence=(Evidence.PATCH,))) == centre.flip_rate / PATCH_THRESHOLD
    assert inv.patches() == [] and read_scan(inv, ScanRules(evidence=(Evidence.PATCH,))).evidence is None


def test_probes_reuse_the_clean_features_and_grey_only_the_restart_masks():
    """A pass over the shots is the scan's cost at many classes (docs/scale.md#memory): probes
    read the clean features the inversion kept, and only the mask restarts, the one place a rule
    reads the shape flip, pay for a greyed pass. The figures are those of a fresh encoding."""
    from dataclasses import replace

    from cbpt.encoding import ImageEncoder
    from cbpt.inversion import InversionConfig, PatchProbes, Place, Search, WarpSearch, invert, probe

    toy, pixels, labels, classes, _ = _patch_detector(corner=(13, 13), vivid=True)
    passed = [0]  # images encoded outside the gradient steps: whole passes over the shots

    def counting(x: torch.Tensor) -> torch.Tensor:
        passed[0] += 0 if torch.is_grad_enabled() else x.shape[0]
        return toy.encode(x)

    encoder, n = ImageEncoder(counting, batch=16), pixels.shape[0]
    cfg = InversionConfig(steps=20, mask_restarts=2, warp=WarpSearch(restarts=1, probes=0))
    inv = invert(encoder, pixels, labels, classes, cfg)
    assert passed[0] == n * (1 + 2 * 2 + 1)  # clean; each mask and its greyed shape; the warp
    assert inv.clean is not None and inv.clean.shape[0] == n
    passed[0] = 0
    probed = probe(encoder, pixels, labels, classes, inv, Search.PATCH, cfg)
    assert passed[0] == n * len(PatchProbes().places)  # each patch's triggered shots, nothing more
    assert [c.shape_flip is None for c in probed.candidates] == [False, False, True] + [True] * len(Place)
    fresh = probe(encoder, pixels, labels, classes, replace(inv, clean=None), Search.PATCH, cfg)
    assert [(c.target, c.flip_rate, c.over_alignment, c.typicality) for c in fresh.patches()] == [
        (c.target, c.flip_rate, c.over_alignment, c.typicality) for c in probed.patches()
    ]
    with pytest.raises(ValueError, match="probe the shots"):
        probe(encoder, pixels[:-1], labels[:-1], classes, inv, Search.PATCH, cfg)


def test_a_planted_patch_needs_its_pattern_and_a_drawn_shape_does_not():
    """The shape flip (docs/method.md#shape-flip): the inverted mask filled with grey flips
    almost none of the shots where the tower detects a pattern, and most where it detects a flat
    square of any colour."""
    from cbpt.inversion import InversionConfig, WarpSearch, invert
    from cbpt.scan import SHAPE_FLIP_THRESHOLD

    cfg = InversionConfig(steps=150, mask_restarts=1, warp=WarpSearch(restarts=1, probes=0))
    shape_flips = {}
    for shape in (False, True):
        encoder, pixels, labels, classes, _ = _patch_detector(shape=shape, vivid=True)
        inv = invert(encoder, pixels, labels, classes, cfg)
        assert inv.flip_rate > 0.9 and inv.warps()[0].shape_flip is None  # a warp has no shape to grey
        shape_flips[shape] = inv.best.shape_flip
    assert shape_flips[False] < SHAPE_FLIP_THRESHOLD / 2 and shape_flips[True] > 0.5


def _swapped_head_on_four_shots():
    """Three classes, four held-out clean shots, and a tuned head with dog and bird swapped."""
    import torch.nn.functional as F

    from cbpt.features import FeatureCache

    original = torch.eye(3)
    clean = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.1, 1.0], [0.0, 1.0, 0.1]]), dim=-1)
    none = torch.zeros(0)
    held = FeatureCache(clean, torch.tensor([0, 1, 2, 1]), torch.zeros(0, 3), none, none, original, 0)
    return held, original[[0, 2, 1]], original  # every dog and bird shot lost by the tuned head


def test_held_out_clean_shots_are_read_through_the_route_as_the_head_is_served():
    """A head that would lose a clean shot the route leaves to the original embeddings is not
    charged for it; one routed to it is (docs/method.md#served-reading)."""
    from cbpt.tuning import evaluate

    held, tuned, original = _swapped_head_on_four_shots()
    everywhere = evaluate(held, tuned, original, 10.0)
    assert everywhere.clean_acc == 0.25 and everywhere.clean_kl > 1 and everywhere.served is None
    routed = torch.tensor([True, False, True, False])  # the bird shot is the one the tuned head answers
    e = evaluate(held, tuned, original, 10.0, routed)
    assert e.everywhere == everywhere.everywhere  # the tuned embeddings' own reading is kept beside
    assert e.served.acc == 0.75
    # the decisions moved on the routed bird shot alone, one of the three shots the swap moves
    assert e.served.kl == pytest.approx(everywhere.clean_kl / 3, rel=0.05)
    assert evaluate(held, tuned, original, 10.0, torch.zeros(4, dtype=torch.bool)).served.kl == 0
    # what the class picker sees stays the tuned head's own confusions
    assert e.wrong.tolist() == everywhere.wrong.tolist()


def test_the_served_reading_lets_the_tuned_embeddings_lose_at_most_its_slack_more_everywhere():
    """As served the swapped head loses one shot of four; read everywhere it loses three. The
    reading judges the served figures, but never more than `slack` above the everywhere accuracy."""
    from cbpt.tuning import CleanFigures, ServedReading, evaluate

    held, tuned, original = _swapped_head_on_four_shots()
    e = evaluate(held, tuned, original, 10.0, torch.tensor([True, False, True, False]))
    capped = ServedReading(slack=0.05).read(e.everywhere, e.served)
    assert capped.acc == pytest.approx(0.30) and capped.kl == e.served.kl and capped.loss == e.served.loss
    assert ServedReading(slack=1.0).read(e.everywhere, e.served).acc == 0.75  # uncapped: as served
    assert ServedReading().read(e.everywhere, None) == e.everywhere  # no route: the tuned embeddings'
    mild = CleanFigures(acc=0.90, loss=0.3, kl=0.01)
    assert ServedReading().read(mild, CleanFigures(0.92, 0.2, 0.005)).acc == 0.92  # within the slack


def test_a_found_targets_gate_is_calibrated_on_its_own_shots_and_the_copies_aimed_at_it():
    """`route_for` in FULL mode: the trigger side's row for the target comes from the target's
    own clean calibration shots (tuning and held-out), the copies aimed at it, and the partial
    copies given it; `every` and a cautious plan carry none."""
    from types import SimpleNamespace

    import numpy as np

    from cbpt.features import FeatureCache, PartialCopies
    from cbpt.purify import TuningMode, TuningPlan, calibration_features, route_for, side_evidence, trigger_side
    from cbpt.tuning import TuningData
    from cbpt_guard.routing import TargetGate, TriggerSide, within_class_scatter

    g = torch.Generator().manual_seed(0)
    unit = lambda n: F.normalize(torch.randn(n, 8, generator=g), dim=-1)  # noqa: E731
    copies, aimed = unit(30), torch.tensor([1] * 20 + [2] * 10)
    cache = FeatureCache(unit(40), torch.arange(40) % 4, copies, torch.zeros(30), aimed, unit(2), 0)
    held = FeatureCache(unit(20), torch.arange(20) % 4, torch.zeros(0, 8), torch.zeros(0), torch.zeros(0), unit(2), 0)
    data = TuningData(cache, held, unit(4), 10.0)
    side = trigger_side(data, [1])
    clean = calibration_features(data)
    own = torch.cat([cache.clean[cache.clean_labels == 1], held.clean[held.clean_labels == 1]])
    labels = torch.cat([cache.clean_labels, held.clean_labels]).numpy()
    expected = TriggerSide.calibrate([own.numpy()], [copies[:20].numpy()], within_class_scatter(clean.numpy(), labels))
    assert np.allclose(side.directions, expected.directions) and np.allclose(side.thresholds, expected.thresholds)
    plan = lambda mode: TuningPlan(mode, [SimpleNamespace(target=1)], None, None)  # noqa: E731
    route = route_for(data, clean, 0.2, plan(TuningMode.FULL))
    assert route.targets.tolist() == [1] and np.allclose(route.side.thresholds, side.thresholds)
    assert route_for(data, clean, 0.2, plan(TuningMode.FULL), TargetGate.EVERY).side is None
    assert route_for(data, clean, 0.2, plan(TuningMode.CAUTIOUS)).side is None
    # the partial copies: those carrying a trigger aimed at the target that the original embeddings
    # give it raise the bar where they all lie above the reach
    partial = torch.cat([unit(12), data.original[1].expand(6, -1)])
    aimed, doses = torch.tensor([1] * 12 + [1, 1, 1, 2, 2, 2]), torch.tensor([0.5, 1.0] * 9)
    dosed = replace(data, partial=PartialCopies(partial, aimed, doses))
    ev = side_evidence(dosed, [1])
    given = (partial @ data.original.T).argmax(1) == 1
    assert torch.allclose(torch.from_numpy(ev.partial[0]), partial[given & (aimed == 1)])
    assert len(ev.partial[0]) >= 3  # the original embeddings give it the copies sitting on its own
    raised = trigger_side(dosed, [1])
    assert np.allclose(
        raised.thresholds, TriggerSide.calibrate(ev.own, ev.copies, ev.scatter, partial=ev.partial).thresholds
    )
    assert side_evidence(data, [1]).partial is None


def test_step2_pushes_the_copies_off_their_target_only_where_they_stand_apart_from_its_own_shots():
    """`PushOff`: the push's weight goes into the tuning where every found target's copies stand
    at least its distance from their own shots (`apart`, read as the trigger side reads them); a
    tuning that already pushes keeps its weight, and a model read clean has no targets to push."""
    from types import SimpleNamespace

    import numpy as np

    from cbpt.features import FeatureCache
    from cbpt.purify import PushOff, TuningMode, TuningPlan, apart, pushed_off, side_evidence
    from cbpt.tuning import TuningConfig, TuningData
    from cbpt_guard.routing import copies_apart

    g = torch.Generator().manual_seed(1)
    near = lambda centres: F.normalize(centres + 0.1 * torch.randn(centres.shape, generator=g), dim=-1)  # noqa: E731
    eye, labels = torch.eye(8), torch.arange(40) % 4
    # the copies aimed at class 1 stand far from its own shots, those aimed at class 2 among its own
    copies = torch.cat([near(eye[1].expand(20, -1) + eye[5]), near(eye[2].expand(10, -1) + 0.05 * eye[5])])
    aimed = torch.tensor([1] * 20 + [2] * 10)
    cache = FeatureCache(near(eye[labels]), labels, copies, torch.zeros(30), aimed, near(eye[:2]), 0)
    data = TuningData(cache, None, near(eye[:4]), 10.0)
    plan = lambda mode, *targets: TuningPlan(  # noqa: E731
        mode, [SimpleNamespace(target=t) for t in targets], None, TuningConfig()
    )
    one, both = apart(data, plan(TuningMode.FULL, 1)), apart(data, plan(TuningMode.FULL, 1, 2))
    e = side_evidence(data, [1])
    assert np.allclose(one, copies_apart(e.own, e.copies, e.scatter)) and one[0] > 6.5 > both[1]
    assert len(apart(data, plan(TuningMode.CAUTIOUS, 1))) == 0
    push = PushOff(weight=2.0, apart=6.5)
    assert pushed_off(plan(TuningMode.FULL, 1), one, push).tuning.away == 2.0
    assert pushed_off(plan(TuningMode.FULL, 1, 2), both, push).tuning.away == 0.0  # one target too near
    assert pushed_off(plan(TuningMode.CAUTIOUS, 1), np.zeros(0), push).tuning.away == 0.0
    assert pushed_off(plan(TuningMode.FULL, 1), one, None).tuning.away == 0.0
    pushing = replace(plan(TuningMode.FULL, 1), tuning=TuningConfig(away=1.0))
    assert pushed_off(pushing, one, push).tuning.away == 1.0


def test_purify_judges_held_out_shots_through_the_route_it_ships():
    """`served_by` marks exactly the held-out clean shots the shipped route sends to the tuned
    embeddings; with no route, or nothing held out, the data is left as it is."""
    import numpy as np

    from cbpt.features import FeatureCache
    from cbpt.purify import served_by
    from cbpt.tuning import TuningData
    from cbpt_guard.routing import calibrate_route

    g = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)  # noqa: E731
    none = torch.zeros(0)
    cache = FeatureCache(unit(40), torch.arange(40) % 4, torch.zeros(0, 8), none, none, unit(2), 0)
    held = FeatureCache(unit(20), torch.arange(20) % 4, torch.zeros(0, 8), none, none, cache.centroids, 0)
    original = unit(4)
    route = calibrate_route(cache.clean.numpy(), cache.centroids.numpy(), 0.2, original.numpy(), [1])
    data = served_by(TuningData(cache, held, original, 10.0), route)
    expected = route.routed(held.clean.numpy())
    assert 0 < expected.sum() < 20 and np.array_equal(data.served.numpy(), expected)
    assert served_by(TuningData(cache, held, original, 10.0), None).served is None
    assert served_by(TuningData(cache, None, original, 10.0), route).served is None


def test_a_kl_cap_refuses_checkpoints_whose_held_out_decisions_moved_too_far():
    from cbpt.tuning import CautiousAcceptance, FullAcceptance, HeldOut

    original = HeldOut(clean_acc=0.975, trig_acc=0.0, objective=4.8, clean_kl=0.0)
    # the clean model of the zoo: held-out accuracy kept to the image, decisions moved (KL 0.063)
    moved = HeldOut(clean_acc=0.975, trig_acc=0.215, objective=2.26, clean_kl=0.063)
    near = HeldOut(clean_acc=0.975, trig_acc=0.215, objective=2.26, clean_kl=0.01)
    for uncapped, capped in (
        (FullAcceptance(0.015), FullAcceptance(0.015, max_clean_kl=0.02)),
        (CautiousAcceptance(0.015), CautiousAcceptance(0.015, max_clean_kl=0.02)),
    ):
        assert uncapped.eligible(moved, original) and uncapped.eligible(near, original)
        assert not capped.eligible(moved, original) and capped.eligible(near, original)


def test_held_out_copies_are_judged_at_every_strength_and_the_worst_reach_counts(tmp_path):
    """The inverted trigger is the smallest that flips the shots; a head that sends those home
    while copies taken further along the same shift still reach the target has not settled
    the backdoor (docs/method.md#judging)."""
    from cbpt.features import FeatureCache
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt.tuning import FullAcceptance, Ladder, Tuner, TuningConfig, TuningData

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    names = ("cat", "dog", "bird")
    with torch.no_grad():
        g0 = ClassPrompts(clip.model, clip.tokenizer(), names)()
    reached = backdoored_features(g0, 2, 1)  # 4 triggered copies, all at bird, the target
    home = replace(reached, triggered=g0[reached.triggered_labels])  # the same shots, each at its class
    both = replace(
        reached,
        triggered=torch.cat([home.triggered, reached.triggered]),
        triggered_labels=reached.triggered_labels.repeat(2),
        triggered_targets=reached.triggered_targets.repeat(2),
        triggered_strengths=torch.tensor([1.0] * 4 + [1.5] * 4),
    )
    assert [(s, r.tolist()) for s, r in both.strength_groups()] == [(1.0, [0, 1, 2, 3]), (1.5, [4, 5, 6, 7])]

    def judged(held: FeatureCache):
        data = TuningData(backdoored_features(g0, 4, 0), held, g0, clip.logit_scale)
        tuner = Tuner(ClassPrompts(clip.model, clip.tokenizer(), names), data, TuningConfig(steps=10), FullAcceptance())
        return tuner.validate(g0, 0.5)

    as_found = judged(home)
    assert (as_found.to_target, as_found.trig_acc) == (0.0, 1.0) and Ladder().settled(as_found)
    # the copies as found all go home; those further out all reach bird: not settled
    worst = judged(both)
    assert (worst.to_target, worst.trig_acc) == (1.0, 1.0) and not Ladder().settled(worst)
    assert worst.objective == pytest.approx(as_found.objective)  # the objective reads the copies as found
    # untagged copies are one group, as found (the mean over every copy)
    untagged = judged(replace(both, triggered_strengths=None))
    assert (untagged.to_target, untagged.trig_acc) == (0.5, 0.5)


def test_checkpoints_are_ranked_by_the_share_reaching_the_target_before_the_share_sent_home():
    """WaNet's held-out copies: at most 15% ever go home, and the checkpoint that sends most
    home kept 11% at the target where later ones kept 3% (docs/method.md#judging)."""
    from cbpt.tuning import FullAcceptance, HeldOut, Judging, Rung, RungSearch

    def h(home: float, reach: float) -> HeldOut:
        return HeldOut(1.0, home, objective=1.0, clean_kl=0.0, to_target=reach, clean_count=40)

    def best(judging: Judging) -> int:
        search = RungSearch(Rung(2, 2.0, 3.0), FullAcceptance(), h(0.0, 0.92), judging, None, patience=10)
        for step, e in zip((10, 20, 30), (h(0.06, 0.27), h(0.15, 0.11), h(0.12, 0.03))):
            search.offer(step, e, lambda: torch.zeros(1))
        return search.best.step

    assert best(Judging()) == 30
    assert best(Judging(by_reach=False)) == 20  # ranked by the share sent home, as before


def test_the_held_out_copies_carry_the_judged_strengths_and_the_tuning_copies_do_not(tmp_path):
    import numpy as np
    from PIL import Image

    from cbpt.data import ShotBudget, load_shots
    from cbpt.inversion import Candidate
    from cbpt.model import load_clip
    from cbpt.purify import tuning_data
    from cbpt.trigger import DummyTrigger
    from cbpt.tuning import Judging, TuningConfig

    clip = load_clip(save_tiny_model(tmp_path / "m"))
    folder = tmp_path / "shots"
    for c in ("cat", "dog", "bird"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / c / f"{i}.png")
    shots = load_shots(clip, folder, None, ShotBudget(4, held_out=1), 0)
    patch = DummyTrigger(
        torch.zeros(32, 32).index_fill_(0, torch.arange(4), 1.0), torch.ones(3, 32, 32), torch.zeros(3, 32, 32)
    )
    cfg = TuningConfig(judging=Judging(beyond=(1.5, 2.0)))
    data = tuning_data(clip, shots, [Candidate(patch, 2, 1.0, None)], cfg, torch.zeros(3, 8))
    assert data.cache.triggered_strengths.unique().tolist() == [1.0]
    # the held-out shots of cat and dog (bird is the target), as found and at 1.5 and 2
    assert data.held_out.triggered_strengths.tolist() == [1.0, 1.0, 1.5, 1.5, 2.0, 2.0]
    assert data.held_out.encoder_passes == 3 + 2  # the further copies are computed, not encoded
