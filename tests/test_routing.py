"""The route (cbpt_guard/routing.py): calibrated on clean shots, gated by a found backdoor's
target on the triggers' side of its own shots, the same in numpy, in the ONNX head and in a
purify output, and off when asked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbpt_guard.routing import SIDE_REACH, Route, TriggerSide, calibrate_route, copies_apart, within_class_scatter
from tests.helpers import run_cli


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def route_case():
    rng = np.random.default_rng(0)
    d, c = 16, 5
    clean = _unit(rng.normal(size=(500, d)))
    centroids = _unit(rng.normal(size=(2, d)))
    purified, original = _unit(rng.normal(size=(c, d))), _unit(rng.normal(size=(c, d)))
    return clean, centroids, purified, original


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_the_route_takes_the_asked_share_of_the_clean_shots(route_case, share):
    clean, centroids, _, original = route_case
    route = calibrate_route(clean, centroids, share, original)
    routed = route.routed(clean).mean()
    assert share - 0.01 <= routed <= share  # the union of both centroids' neighbourhoods
    # each centroid has its own threshold, at the same quantile of its own clean cosines
    own = [(clean @ c > t).mean() for c, t in zip(centroids, route.thresholds)]
    assert abs(own[0] - own[1]) <= 2 / len(clean) and max(own) <= routed


def test_routed_images_take_the_purified_embeddings_and_the_rest_the_original(route_case):
    clean, centroids, purified, original = route_case
    route = calibrate_route(clean, centroids, 0.1, original)
    x = np.stack([centroids[0], centroids[1], -centroids[0]])  # in, in, far out
    assert route.routed(x).tolist() == [True, True, False]
    cos = route.cosines(x, purified)
    assert np.allclose(cos[:2], x[:2] @ purified.T) and np.allclose(cos[2], x[2] @ original.T)
    back = Route.from_tensors({**route.tensors(), "unrelated": np.zeros(1)}, original)
    assert np.array_equal(back.thresholds, route.thresholds) and back.share == pytest.approx(0.1)
    assert Route.from_tensors({"purified": purified}, original) is None
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        calibrate_route(clean, centroids, 1.0, original)


def test_what_the_original_embeddings_give_a_found_target_is_routed_wherever_it_lies(route_case):
    clean, centroids, purified, original = route_case
    plain = calibrate_route(clean, centroids, 0.1, original)
    gated = calibrate_route(clean, centroids, 0.1, original, targets=[3, 3])
    assert gated.targets.tolist() == [3] and np.array_equal(gated.thresholds, plain.thresholds)
    far = -centroids[0] + 0.01 * original[3]  # far from the centroids: outside the plain route
    x = _unit(np.stack([original[3] - centroids.sum(0) * 0.1, original[1], far]))
    answer = (x @ original.T).argmax(1)
    assert not plain.routed(x[:2]).any()
    assert np.array_equal(gated.ungated().routed(clean), plain.routed(clean))
    assert gated.routed(x).tolist() == [True, False, answer[2] == 3]
    assert np.allclose(gated.cosines(x[:1], purified), x[:1] @ purified.T)
    # the whole clean set: the gate adds exactly the images the original embeddings give class 3
    extra = gated.routed(clean) & ~plain.routed(clean)
    assert extra.any() and (((clean @ original.T).argmax(1) == 3) | plain.routed(clean) == gated.routed(clean)).all()
    # stored and read back; heads written before the gate read as ungated
    back = Route.from_tensors(gated.tensors(), original)
    assert back.targets.tolist() == [3] and back.describe()["targets"] == [3]
    old = {k: v for k, v in gated.tensors().items() if k != "route_targets"}
    assert Route.from_tensors(old, original).targets.tolist() == []
    # another class order moves the target with its row
    rows = [4, 3, 2, 1, 0]
    moved = gated.reordered(rows)
    assert moved.targets.tolist() == [1] and np.array_equal(moved.routed(clean), gated.routed(clean))


@pytest.fixture(scope="module")
def side_case():
    """A target class's own clean shots and a backdoor's triggered images around the same point,
    spread widely across, the triggered ones shifted a little along one trigger direction: the
    cosine to the triggered centroid does not tell them apart, the shift does."""
    rng = np.random.default_rng(1)
    d = 16
    target_dir = _unit(rng.normal(size=d))
    shift = rng.normal(size=d)
    shift = _unit(shift - (shift @ target_dir) * target_dir)

    def cloud(n, along):
        noise = 0.1 * rng.normal(size=(n, d))
        noise -= np.outer(noise @ shift, shift)  # wide across the shift, narrow along it
        return _unit(target_dir + noise + np.outer(along + 0.02 * rng.normal(size=n), shift))

    own = cloud(40, 0.0)
    copies = cloud(300, 0.3)
    centroid = _unit(copies.mean(0))[None]
    test_own, test_triggered = cloud(400, 0.0), cloud(400, 0.3)
    return own, copies, centroid, test_own, test_triggered


def test_the_trigger_side_tells_the_targets_own_images_from_triggered_ones(side_case):
    own, copies, centroid, test_own, test_triggered = side_case
    cos_own, cos_trig = test_own @ centroid[0], test_triggered @ centroid[0]
    assert (cos_own > np.quantile(cos_trig, 0.05)).mean() > 0.3  # the cosine alone mixes them up
    side = TriggerSide.calibrate([own], [copies])
    on = lambda x, s=None: ((s or side).margins(x) > 0).any(1)  # noqa: E731
    assert side.directions.shape == (1, 16) and side.thresholds.shape == (1,)
    assert not on(own).any()  # every own shot is on the target's side: the furthest sets the bar
    assert on(copies).mean() >= 0.99
    assert on(test_own).mean() <= 0.06 and on(test_triggered).mean() >= 0.99
    # copies standing within `reach` spreads of the own shots: the gate takes (nearly) every image given the target
    rng = np.random.default_rng(5)
    near = own[rng.integers(0, len(own), 300)] + 0.15 * (copies.mean(0) - own.mean(0))
    low = TriggerSide.calibrate([own], [near + 1e-3 * rng.normal(size=near.shape)])
    assert on(own, low).mean() >= 0.95 and on(test_own, low).mean() >= 0.9
    with pytest.raises(ValueError, match="own shots and copies"):
        TriggerSide.calibrate([own[:0]], [copies])


def test_partial_triggers_keep_the_bar_from_falling_below_where_they_reach(side_case):
    """Copies too near the own shots for the reach put the bar under every own shot. Partial
    copies given the target only far along the shift raise it (never past the furthest own shot):
    the target's own test images go back to the original embeddings, the triggered ones stay
    routed. The lowest partial copy sets it: one reaching among the own images brings it down there."""
    own, copies, _, test_own, test_triggered = side_case
    rng = np.random.default_rng(5)
    near = own[rng.integers(0, len(own), 300)] + 0.15 * (copies.mean(0) - own.mean(0))
    near += 1e-3 * rng.normal(size=near.shape)
    on = lambda x, s: (s.margins(x) > 0).any(1)  # noqa: E731
    reach = TriggerSide.calibrate([own], [near])
    assert on(own, reach).all() and on(test_own, reach).mean() >= 0.95
    far = TriggerSide.calibrate([own], [near], partial=[test_triggered[:200]])
    assert np.allclose(far.directions, reach.directions)
    assert np.isclose(far.thresholds[0], (own @ far.directions[0]).max())
    assert on(test_own, far).mean() <= 0.06 and on(test_triggered[200:], far).mean() >= 0.99
    one_low = np.r_[test_triggered[:200], test_own[:1]]
    mixed = TriggerSide.calibrate([own], [near], partial=[one_low])
    assert np.isclose(mixed.thresholds[0], test_own[0] @ mixed.directions[0])
    assert on(test_own, far).mean() < on(test_own, mixed).mean() <= on(test_own, reach).mean()
    # none of the partial copies given the target: the reach alone
    assert np.allclose(TriggerSide.calibrate([own], [near], partial=[own[:0]]).thresholds, reach.thresholds)
    with pytest.raises(ValueError):
        TriggerSide.calibrate([own], [near], partial=[test_own, test_own])  # a row per target


def test_copies_apart_reads_in_the_spreads_the_side_reaches_in(side_case):
    """Copies far along the trigger's shift stand many spreads from the own shots, copies mixed
    among them under one; and a side whose reach equals that distance puts its bar at the own
    shots' mean, the units being the same."""
    own, copies, *_ = side_case
    rng = np.random.default_rng(5)
    near = own[rng.integers(0, len(own), 300)] + 0.05 * (copies.mean(0) - own.mean(0))
    far, mixed = copies_apart([own, own], [copies, near + 1e-3 * rng.normal(size=near.shape)])
    assert far > SIDE_REACH and 0 < mixed < 1
    side = TriggerSide.calibrate([own], [copies], reach=far)
    assert np.isclose(side.thresholds[0], (own @ side.directions[0]).mean(), atol=1e-5)
    with pytest.raises(ValueError, match="own shots and copies"):
        copies_apart([own], [copies[:0]])


def test_the_trigger_side_discounts_what_a_class_already_varies_along():
    """The copies' shift leans on an axis along which every class's clean images vary widely:
    the plain difference of means reads the own shots as near the copies and gates them all;
    whitened by the clean shots' within-class scatter it follows the narrow trigger axis and
    spares the target's own images, the triggered ones still caught."""
    rng = np.random.default_rng(3)
    d, trigger, nuisance = 12, np.eye(12)[0], np.eye(12)[1]

    def clean(n, centre):
        return centre + 0.02 * rng.normal(size=(n, d)) + np.outer(0.3 * rng.normal(size=n), nuisance)

    centre, other = np.full(d, 0.1), np.full(d, -0.1)
    shift = 0.3 * trigger + 0.3 * nuisance
    own, others = clean(40, centre), clean(40, other)
    copies, triggered, own_test = clean(300, centre + shift), clean(400, centre + shift), clean(400, centre)
    scatter = within_class_scatter(np.concatenate([own, others]), np.r_[np.zeros(40), np.ones(40)])
    assert scatter.shape == (d, d)
    assert np.isclose(scatter[1, 1], 0.09, rtol=0.3) and np.isclose(scatter[0, 0], 4e-4, rtol=0.3)
    spared = lambda side, x: float((side.margins(x)[:, 0] <= 0).mean())  # noqa: E731
    plain, whitened = TriggerSide.calibrate([own], [copies]), TriggerSide.calibrate([own], [copies], scatter)
    assert spared(plain, own_test) <= 0.1 and spared(whitened, own_test) >= 0.9
    assert spared(plain, triggered) <= 0.01 and spared(whitened, triggered) <= 0.01
    assert abs(whitened.directions[0] @ trigger) > 0.95 and np.isclose(np.linalg.norm(whitened.directions[0]), 1)


def test_a_target_gate_with_a_trigger_side_routes_the_targets_images_by_it_alone(route_case, side_case):
    own, copies, centroid, test_own, test_triggered = side_case
    rng = np.random.default_rng(2)
    d, target = own.shape[1], 3
    original = _unit(rng.normal(size=(5, d)))
    original[target] = _unit(own.mean(0))  # the original embeddings give the target its own images and the triggered
    clean = _unit(rng.normal(size=(500, d)))
    side = TriggerSide.calibrate([own], [copies])
    every = calibrate_route(clean, centroid, 0.2, original, [target])
    sided = calibrate_route(clean, centroid, 0.2, original, [target], side)
    x = np.concatenate([test_own, test_triggered])
    assigned = (x @ original.T).argmax(1) == target
    assert assigned.mean() > 0.9
    assert every.routed(x)[assigned].all()  # every image given the target
    assert np.array_equal(sided.routed(x)[assigned], (side.margins(x)[:, 0] > 0)[assigned])  # the cosines aside
    assert sided.routed(test_own).mean() <= 0.06 and sided.routed(test_triggered).mean() >= 0.97
    # images given another class: the cosines decide, as without the side
    elsewhere = (clean @ original.T).argmax(1) != target
    assert np.array_equal(sided.routed(clean)[elsewhere], every.ungated().routed(clean)[elsewhere])
    assert sided.every_assigned().routed(x).tolist() == every.routed(x).tolist()
    # stored and read back; a head written before the side gates every image given the target
    back = Route.from_tensors(sided.tensors(), original)
    assert np.array_equal(back.routed(x), sided.routed(x)) and back.describe()["target_gate"] == "trigger-side"
    old = {k: v for k, v in sided.tensors().items() if not k.startswith("route_side")}
    assert Route.from_tensors(old, original).describe()["target_gate"] == "every"
    assert np.array_equal(sided.reordered([4, 3, 2, 1, 0]).routed(x), sided.routed(x))
    # without a target there is nothing to gate, and no side is kept
    assert calibrate_route(clean, centroid, 0.2, original, [], side).side is None


def test_the_onnx_head_routes_on_the_trigger_side_as_the_reference_does(side_case):
    import onnxruntime as ort

    from export.graphs import HeadSpec, build_head

    own, copies, centroid, test_own, test_triggered = side_case
    rng = np.random.default_rng(3)
    original, purified = _unit(rng.normal(size=(5, own.shape[1]))), _unit(rng.normal(size=(5, own.shape[1])))
    original[1] = _unit(own.mean(0))
    route = calibrate_route(own, centroid, 0.2, original, [1], TriggerSide.calibrate([own], [copies]))
    head = HeadSpec(purified, 50.0, centroid, route)
    x = np.concatenate([test_own[:100], test_triggered[:100], _unit(rng.normal(size=(100, own.shape[1])))])
    sess = ort.InferenceSession(build_head(head).SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"image_features": 2.0 * x})[0]
    routed = route.routed(x)
    assert routed[100:200].all() and routed[:100].mean() < 0.1  # both sides of the gate are exercised
    assert np.abs(logits - head.logits(x)).max() < 1e-4


@pytest.mark.parametrize("targets", [(), (2,), (0, 4)])
def test_the_onnx_head_routes_as_the_reference_does(route_case, targets):
    import onnxruntime as ort

    from export.graphs import HeadSpec, build_head

    clean, centroids, purified, original = route_case
    head = HeadSpec(purified, 50.0, centroids[0], calibrate_route(clean, centroids, 0.3, original, targets))
    sess = ort.InferenceSession(build_head(head).SerializeToString(), providers=["CPUExecutionProvider"])
    feats = 3.0 * clean[:200]  # any norm: the graph normalises
    logits, score = sess.run(["logits", "trigger_score"], {"image_features": feats})
    routed = head.route.routed(clean[:200])
    assert 0 < routed.sum() < 200  # both branches are exercised
    if targets:  # the gate adds images the cosines alone leave out
        assert (routed & ~head.route.ungated().routed(clean[:200])).any()
    assert np.abs(logits - head.logits(clean[:200])).max() < 1e-4
    assert np.allclose(score, clean[:200] @ centroids[0], atol=1e-5)


def test_a_purify_output_routes_in_torch_and_in_its_exported_heads_alike(purified, mini_testbeds):
    from safetensors.numpy import load_file

    from testbed.evaluate import evaluate_heads, evaluate_purified

    rep = json.loads((purified / "report.json").read_text())
    assert rep["route"]["share"] == pytest.approx(0.2) and rep["settings"]["routed_share"] == 0.2
    emb = load_file(str(purified / "embeddings.safetensors"))
    assert emb["route_centroids"].shape[1] == 32 and emb["route_thresholds"].shape == (emb["route_centroids"].shape[0],)
    manifest = json.loads((purified / "manifest.json").read_text())
    assert manifest["route"] == rep["route"]
    # a found backdoor gates the route at its target; forced, at every tuned trigger's target
    names = (mini_testbeds["blended"] / "classes.txt").read_text().split("\n")
    aimed = sorted({names.index(t["target"]) for t in rep["tuning"]["triggers"]})
    assert rep["route"]["targets"] == ([rep["scan"]["target_index"]] if rep["scan"]["backdoored"] else aimed)
    assert emb["route_targets"].tolist() == rep["route"]["targets"]
    # the gate reads the trigger side, a row per gated target (docs/method.md#trigger-side)
    assert rep["settings"]["target_gate"] == "trigger-side" and rep["route"]["target_gate"] == "trigger-side"
    assert emb["route_side_directions"].shape == (len(rep["route"]["targets"]), 32)
    assert emb["route_side_thresholds"].shape == (len(rep["route"]["targets"]),)
    tb = mini_testbeds["blended"]
    torch_side, onnx_side = evaluate_purified(purified, tb), evaluate_heads(purified, tb)
    assert torch_side.ca == pytest.approx(onnx_side.ca, abs=0.021)  # 50 images: one may sit on a threshold
    assert torch_side.asr == pytest.approx(onnx_side.asr, abs=0.021)


@pytest.mark.parametrize(
    "option, message",
    [(("--routed-share", "0"), "--routed-share must be in (0, 1]"), (("--target-gate", "sideways"), "'every'")],
)
def test_route_options_out_of_range_are_refused_before_any_work(mini_testbeds, tmp_path, capsys, option, message):
    tb = mini_testbeds["blended"]
    out = tmp_path / "p"
    code, _, err = run_cli(capsys, "purify", tb / "model.pt", "--data", tb / "fewshot", "--out", out, *option)
    assert code == 2 and message in err and not out.exists()


@pytest.mark.parametrize("sided", [False, True])
def test_the_fp16_head_routes_too(route_case, side_case, sided):
    from cbpt_guard.artifacts import ort_session
    from export.fp16 import to_fp16
    from export.graphs import HeadSpec, build_head

    clean, centroids, purified, original = route_case
    side = None
    if sided:  # the target's own images and triggered ones around class 2
        own, copies, _, test_own, test_triggered = side_case
        original = original.copy()
        original[2] = _unit(own.mean(0))
        side = TriggerSide.calibrate([own], [copies])
        clean = np.concatenate([clean[:200], test_own[:100], test_triggered[:100]])
    head = HeadSpec(purified, 50.0, centroids[0], calibrate_route(clean, centroids, 0.3, original, [2], side))
    sess = ort_session(to_fp16(build_head(head)).SerializeToString(), fp16=True)
    logits = sess.run(["logits"], {"image_features": clean})[0]
    assert logits.dtype == np.float32  # the fp32 interface is kept
    # half-precision cosines may fall the other side of a threshold for an image right on it
    assert (logits.argmax(1) == head.logits(clean).argmax(1)).mean() >= 0.97
