"""Is the ASR CBPT leaves the inverted trigger's fault, or the head's? One scan per backdoored
model, then step 2 run on the same shots twice: against the inverted triggers (what `purify`
does) and against the attacker's real trigger pasted on those shots (an oracle no defender
has), each at the clean tolerances asked for (`TuningConfig.clean_tolerance`, the held-out clean
accuracy a checkpoint may lose; 0.015 is purify's), each head scored on the test split as
shipped (routed) and everywhere (docs/results.md#where-a-blends-leftover-asr-comes-from).

    python benchmarks/oracle_trigger.py zoo-out/models/bd000-blended-shapes-s1-600 --tolerances 0.015 0.05 1 \
        --out oracle.json
    python benchmarks/oracle_trigger.py zoo-out/models/bd024-* --levers base lr2e-2 strength2 --out step2.json

`--levers` runs step 2 with each named change of its `TuningConfig` (STEP2_LEVERS) on the same
scan: step-2 levers cost one tuning each (seconds on a 32-px testbed) instead of a purify each,
and each is seen beside the oracle, so a comparison at one setting cannot blame the head for what
is the optimiser's (docs/results.md#step-2-levers-beside-the-oracle).

`--levers` also takes coverage levers (COVERAGE_LEVERS), which change what the head is tuned
against rather than how: the plan without its blend-shaped triggers (purify before
docs/method.md#blend-probes) or with every blend, pulling or not, a second round against a
mask inverted through the first round's head, or every compact mask that flips the shots once
one stands in (docs/results.md#compact-masks-standing-in-together-not-kept). They run against
the inverted triggers only (the real trigger is what they try to stand in for;
docs/results.md#coverage-levers).

Where the real trigger on the shots leaves as much ASR as the inverted one at the same CA, the
inverted trigger is not what is missing: no head tuned on these shots does better at that CA
(benchmarks/head_bound.py asks the same of any linear head, with far more data). Resumable:
rows already in --out are read back. The scan takes a few minutes a model on a 32-px testbed, each tuning 5-15 s.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from head_bound import GRID, fit_head  # benchmarks/ is the script's folder

from cbpt.data import ShotBudget, Shots
from cbpt.inversion import Candidate, InversionResult, Search
from cbpt.losses import class_logits
from cbpt.model import LoadedClip
from cbpt.purify import (
    PurifyConfig,
    PushOff,
    Step2,
    TuningPlan,
    apart,
    calibration_features,
    found_targets,
    plan_tuning,
    route_for,
    side_evidence,
    trigger_side,
    tune_on_route,
    tune_routed,
    tuning_data,
)
from cbpt.scan import read_scan
from cbpt.trigger import DummyTrigger, TriggerKind
from cbpt.tuning import Ladder, TuningConfig, TuningData
from cbpt_guard import atomic
from cbpt_guard.routing import TriggerSide
from testbed.bench import scan_testbed
from testbed.evaluate import score_head
from testbed.triggers import Trigger


@dataclass(frozen=True)
class RealTrigger:
    """The attacker's trigger (`testbed.triggers.Trigger`) where step 2 expects an inverted one:
    [0, 1] pixels in, the triggered pixels out, through uint8 as the testbed applies it."""

    trigger: Trigger
    kind: TriggerKind = TriggerKind.MASK

    def apply(self, x01: torch.Tensor) -> torch.Tensor:
        u8 = (x01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = torch.from_numpy(self.trigger.apply(u8, seed=0))
        return out.permute(0, 3, 1, 2).to(x01.device, torch.float32).div(255)


def _tuning(**kw) -> Callable[[TuningConfig], TuningConfig]:
    return lambda t: replace(t, **kw)


STEP2_LEVERS: dict[str, Callable[[TuningConfig], TuningConfig]] = {
    "base": lambda t: t,  # purify's settings (without push-off unless --push-off)
    "lr1e-2": _tuning(lr=1e-2),  # livelier steps on the context vectors (purify: 5e-3)
    "lr2e-2": _tuning(lr=2e-2),
    # triggered copies whose feature shift is also taken 2 times as far (docs/method.md#trigger-strength)
    "strength2": _tuning(strengths=(1.0, 2.0)),
    "views6": _tuning(views=6),  # six augmented views of each shot instead of two
    # the trigger side's bar set by its reach alone, as before the partial copies (docs/method.md#partial-triggers)
    "reach-alone": _tuning(partial=None),
    # the triggered copies also pushed off their target (losses.away_loss), or only that
    "away1": _tuning(away=1.0),
    "away2": _tuning(away=2.0),
    "away-only": _tuning(home=0.0, away=1.0),
    "away-only2": _tuning(home=0.0, away=2.0),
    # ... with the held-out copies judged at twice their shift, so pushing them aside does not settle the ladder
    "away1-beyond2": lambda t: replace(t, away=1.0, judging=replace(t.judging, beyond=(2.0,))),
    "away2-beyond2": lambda t: replace(t, away=2.0, judging=replace(t.judging, beyond=(2.0,))),
    # one fixed rung, no ladder: does a stronger trigger loss reach what the held-out check calls settled?
    "rung0": _tuning(ladder=Ladder.off()),  # the ladder's first rung alone: what climbing cost or bought
    "rung0.5-3": _tuning(margin=3.0, ladder=Ladder.off()),
    "rung1-3": _tuning(alpha=1.0, margin=3.0, ladder=Ladder.off()),
    "rung2-3": _tuning(alpha=2.0, margin=3.0, ladder=Ladder.off()),
}


# free class embeddings instead of prompts: head_bound's fit and (trigger weight, pull) settings on the tuning cache
FREE = "free"


def free_step2(data: TuningData, route, tol: float) -> tuple[torch.Tensor, dict]:
    """Step 2 with the class embeddings themselves as the parameters, started at the original
    prompts' and fitted by cross-entropy to the tuning shots (with their views) and their triggered
    copies sent home, at each of head_bound's (trigger weight, pull toward the original) settings;
    served through purify's own `route`. The held-out check picks as purify's does: the setting
    (or the original embeddings) that sends fewest held-out copies to their trigger's target among
    those whose served held-out clean accuracy is within `tol` (at least one image) of the
    original's."""
    held, c = data.held_out, data.cache

    def read(w: torch.Tensor) -> tuple[float, float]:
        def predict(x: torch.Tensor) -> torch.Tensor:
            if route is None:
                return (x @ w.T).argmax(1)
            return torch.from_numpy(route.cosines(x.float().cpu().numpy(), w.float().cpu().numpy()).argmax(1))

        clean = float((predict(held.clean) == held.clean_labels.cpu()).float().mean())
        reach = float((predict(held.triggered) == held.triggered_targets.cpu()).float().mean())
        return clean, reach

    w0 = data.original.float()
    settings = [((0.0, 0.0), w0)] + [
        ((a, pull), fit_head(w0, c.clean, c.clean_labels, c.triggered, c.triggered_labels, a, pull, data.scale))
        for a, pull in GRID
    ]
    read_rows = [(setting, w, *read(w)) for setting, w in settings]
    floor = read_rows[0][2] - max(tol, 1.0 / len(held.clean)) - 1e-9
    setting, w, clean, reach = min((r for r in read_rows if r[2] >= floor), key=lambda r: (r[3], -r[2], r[0]))
    picked = {"alpha": setting[0], "pull": setting[1], "held_clean": round(clean, 4), "held_reach": round(reach, 4)}
    return w, picked


# the trigger side read from the shots as they are (no augmented views) with its bar at the lowest copy
SHOTS_SIDE = "shots-side"


def shots_side(clip: LoadedClip, shots: Shots, plan: TuningPlan, original: torch.Tensor) -> TriggerSide:
    """The gate's side as `trigger_side` draws it, but from the tuning shots and their copies as they
    are, without the augmented views that widen the target's own shots along it, and with each
    target's bar at its lowest copy's projection instead of `reach` spreads below their mean
    (docs/results.md#what-the-shipped-head-could-hold-this-version)."""
    bare = tuning_data(clip, shots, plan.triggers, replace(plan.tuning, views=0, partial=None), original)
    targets = found_targets(plan)
    evidence = side_evidence(bare, targets)
    side = trigger_side(bare, targets, evidence=evidence)  # its direction; the bar is set below
    lowest = [float((copies @ w).min()) for copies, w in zip(evidence.copies, side.directions, strict=True)]
    return TriggerSide(side.directions, np.asarray(lowest, dtype=np.float32))


def step2_sided(clip: LoadedClip, classnames, data: TuningData, plan: TuningPlan, cfg: PurifyConfig, side) -> Step2:
    """`tune_routed` with the route's trigger side replaced by `side`."""
    route = route_for(data, calibration_features(data), cfg.routed_share, plan, cfg.target_gate, cfg.side_reach)
    route = route if route is None or route.side is None else replace(route, side=side)
    return tune_on_route(clip, classnames, data, plan, cfg, route)


@dataclass(frozen=True)
class Round1:
    """What a coverage lever reads: the model, its tuning shots, the scan, the plan, and the
    head step 2 tuned against the plan's triggers (purify's own result)."""

    clip: LoadedClip
    shots: Shots
    inversion: InversionResult
    plan: TuningPlan
    original: torch.Tensor
    head: torch.Tensor | None  # [C, D] round 1's tuned class features; None where the lever does not read it
    target: int  # the scan's target


def without_blends(r: Round1) -> list[Candidate]:
    """The plan's triggers without its blends: what purify tuned against before
    docs/method.md#blend-probes."""
    return _no_blends(r.plan.triggers)


def _no_blends(triggers: list[Candidate]) -> list[Candidate]:
    return [c for c in triggers if c.search is not Search.BLEND]


def every_blend(r: Round1) -> list[Candidate]:
    """The plan's other triggers and every blend aimed at the scan's target, whether it pulls as
    hard as the per-pixel masks or not (`BlendProbes.tuned_beside` keeps those that do)."""
    blends = [replace(c, target=r.target) for c in r.inversion.blends() if c.target == r.target]
    return without_blends(r) + blends


def reinverted(r: Round1, steps: int = 200, goal: float = 0.9, seed: int = 100) -> list[Candidate]:
    """The plan's triggers and a mask inverted through round 1's head (Neural-Cleanse style:
    cross-entropy to the target over the other classes' shots, plus lambda times the mask's
    mean, lambda raised while at least `goal` of a batch reaches the target): whatever still
    reaches the target after round 1, tuned against in a second round."""
    enc, scale = r.clip.encoder(), r.clip.logit_scale
    gen = torch.Generator().manual_seed(seed)
    rows = (r.shots.labels != r.target).nonzero().flatten()
    pixels = r.shots.pixels[rows]
    _, _, h, w = pixels.shape
    a = (torch.full((h, w), -3.0) + torch.randn(h, w, generator=gen) * 0.5).to(enc.device).requires_grad_()
    b = torch.randn(3, h, w, generator=gen).to(enc.device).requires_grad_()
    opt = torch.optim.Adam([a, b], lr=0.1)
    assert r.head is not None, "reinvert reads round 1's head (READS_ROUND1)"
    lam, head = 1.0, r.head.to(enc.device)

    def build() -> DummyTrigger:
        return DummyTrigger(torch.sigmoid(a), torch.sigmoid(b), torch.zeros(3, h, w, device=enc.device))

    for step in range(steps):
        idx = torch.randperm(pixels.shape[0], generator=gen)[:32]
        trigger = build()
        logits = class_logits(enc(trigger.apply(enc.load(pixels[idx]))), head, scale)
        want = torch.full((len(idx),), r.target, device=enc.device)
        loss = F.cross_entropy(logits, want) + lam * trigger.mask.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 9:
            reached = float((logits.argmax(1) == r.target).float().mean())
            lam = lam * 1.5 if reached >= goal else lam / 1.5
    with torch.no_grad():
        trigger = build().to(enc.device)
        feats = enc.all(pixels, view=lambda x, _rows: trigger.apply(x))
        flips = float((class_logits(feats, head, scale).argmax(1) == r.target).float().mean())
    return r.plan.triggers + [Candidate(trigger, r.target, flips, None)]


def compact_family(r: Round1) -> list[Candidate]:
    """Where a compact mask stands in, every compact mask aimed at the target that flips as many
    shots (purify's `CompactProbes.stand_in` share of the best per-pixel mask's flips) stands in
    with it, pulling as hard as the per-pixel masks or not: the pull tells a compact backdoor from
    one spread over the image, and once it has, several compact masks cover more of the trigger
    than the one that pulled hardest (docs/method.md#compact-probes). Elsewhere the plan's
    triggers as they are."""
    share = PurifyConfig().inversion.compact.stand_in
    if share is None or not any(c.search is Search.COMPACT for c in r.plan.triggers):
        return r.plan.triggers
    bar = share * r.inversion.flip_rate
    family = [replace(c, target=r.target) for c in r.inversion.compact() if c.target == r.target and c.flip_rate >= bar]
    return family + [c for c in r.plan.triggers if c.search is not Search.COMPACT]


COVERAGE_LEVERS: dict[str, Callable[[Round1], list[Candidate]]] = {
    "no-blends": without_blends,  # purify before its blends (docs/method.md#blend-probes)
    "blends2": every_blend,  # both blends beside the plan's other triggers, pulling or not
    "reinvert": reinverted,  # a second round against what still reaches the target through round 1's head
    "compact-family": compact_family,  # every flipping compact mask stands in once one does
}
# the coverage levers that read round 1's head (the others are planned from the scan alone)
READS_ROUND1 = ("reinvert",)


# the plan's triggers tuned against, its blends left out of the held-out check: they widen what the
# head is tuned against without deciding the escalation or the checkpoint
UNCHECKED_BLENDS = "unchecked-blends"
# the plan's triggers tuned against, the held-out check reading the whole compact family: a rung is
# settled only when none of the compact masks that flip the shots still reaches the target
CHECKED_FAMILY = "checked-family"
# levers that change the plan's inverted triggers: never run against the real trigger
PLAN_LEVERS = (*COVERAGE_LEVERS, UNCHECKED_BLENDS, CHECKED_FAMILY)


def row_key(triggers: str, tol: float, lever: str) -> str:
    """A row's name; the base lever is left out, so rows stored before --levers read back."""
    return f"{triggers}/tol{tol:g}" + ("" if lever == "base" else f"/{lever}")


TRIGGERS = ("inverted", "real")


def _apart(clip: LoadedClip, shots: Shots, plan: TuningPlan, original: torch.Tensor) -> list[float]:
    data = tuning_data(clip, shots, plan.triggers, replace(plan.tuning, partial=None), original)  # apart reads none
    return [round(float(a), 2) for a in apart(data, plan)]


def measure(
    tb: Path,
    tolerances: list[float],
    levers: list[str],
    done: dict,
    seed: int = 0,
    against: tuple[str, ...] = TRIGGERS,
    push_off: PushOff | None = None,
    settings: dict[str, float] | None = None,
) -> dict:
    keys = [
        row_key(t, tol, lever)
        for t, tol, lever in product(against, tolerances, levers)
        if not (t == "real" and lever in PLAN_LEVERS)
    ]
    if "before" in done and "apart" in done and all(k in done for k in keys):
        return done  # nothing to measure: no scan
    cfg = replace(PurifyConfig(budget=ShotBudget(16)), push_off=push_off, **(settings or {})).seeded(seed)
    sc = scan_testbed(tb, cfg)
    clip, shots, feats, rows, original, inv = sc.clip, sc.shots, sc.feats, sc.rows, sc.original, sc.inversion
    verdict = read_scan(inv)
    plan = plan_tuning(verdict, inv, cfg, held_out=True)
    meta = json.loads((tb / "metrics.json").read_text())
    target = list(shots.classnames).index(meta["target_name"])
    real = [Candidate(RealTrigger(Trigger.load(tb / "trigger")), target, 1.0, None)]

    def scored(head: torch.Tensor, route) -> dict:
        routed = score_head(feats, head[rows], None if route is None else route.reordered(rows))
        everywhere = score_head(feats, head[rows])
        return {"ca": round(routed.ca, 4), "asr": round(routed.asr, 4), "asr_everywhere": round(everywhere.asr, 4)}

    out = {
        **done,
        "scan": {"backdoored": verdict.backdoored, "target_named": verdict.target == target},
        "before": scored(original, None),
        # the found targets' copies from their own shots, in spreads (purify.apart; docs/method.md#push-off)
        "apart": _apart(clip, shots, plan, original),
    }

    def step2(
        triggers: list[Candidate],
        tuning: TuningConfig,
        tol: float,
        checked: list[Candidate] | None = None,
        side: str | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Step 2 against `triggers`; `checked`: the triggers the held-out check reads, if not those;
        `side`: SHOTS_SIDE for the gate's side from the shots as they are (`shots_side`)."""
        p = replace(
            plan,
            triggers=triggers,
            tuning=replace(tuning, clean_tolerance=tol),
            acceptance=replace(plan.acceptance, clean_tolerance=tol),
        )
        data = tuning_data(clip, shots, p.triggers, p.tuning, original)
        if checked is not None:
            bare = replace(p.tuning, partial=None)  # only its held-out copies are read
            data = replace(data, held_out=tuning_data(clip, shots, checked, bare, original).held_out)
        # as purify runs it: a lever that pushes the copies off their target keeps its own weight
        if side is None or not found_targets(p):  # a model read clean has no gate, so no side to change
            s2 = tune_routed(clip, shots.classnames, data, p, cfg)
        else:
            s2 = step2_sided(clip, shots.classnames, data, p, cfg, shots_side(clip, shots, p, original))
        result, chosen = s2.result, s2.result.chosen
        row = scored(result.text_features, s2.shipped_route) | {"rung": chosen.rung.index, "step": chosen.step}
        return result.text_features, row | {"triggers": len(triggers)}

    round1: dict[float, torch.Tensor] = {}  # purify's own step 2 at each tolerance, for the coverage levers

    candidates = {"inverted": plan.triggers, "real": real}
    for (triggers_name, triggers), tol, lever in product(((t, candidates[t]) for t in against), tolerances, levers):
        key = row_key(triggers_name, tol, lever)
        if key in out or (triggers_name == "real" and lever in PLAN_LEVERS):
            continue
        if lever in STEP2_LEVERS:
            out[key] = step2(triggers, STEP2_LEVERS[lever](plan.tuning), tol)[1]
            continue
        if lever == SHOTS_SIDE:
            out[key] = step2(triggers, plan.tuning, tol, side=SHOTS_SIDE)[1]
            continue
        if lever == FREE:  # no push-off term: the free fit only sends the copies home
            p = replace(plan, triggers=triggers)
            data = tuning_data(clip, shots, triggers, p.tuning, original)
            route = route_for(data, calibration_features(data), cfg.routed_share, p, cfg.target_gate, cfg.side_reach)
            head, picked = free_step2(data, route, tol)
            out[key] = scored(head, route) | picked | {"triggers": len(triggers)}
            continue
        if lever == UNCHECKED_BLENDS:
            out[key] = step2(plan.triggers, plan.tuning, tol, _no_blends(plan.triggers))[1]
            continue
        if lever == CHECKED_FAMILY:
            family = compact_family(Round1(clip, shots, inv, plan, original, None, verdict.target))
            out[key] = step2(plan.triggers, plan.tuning, tol, family)[1] | {"checked": len(family)}
            continue
        if lever in READS_ROUND1 and tol not in round1:
            round1[tol] = step2(plan.triggers, plan.tuning, tol)[0]
        r1 = Round1(clip, shots, inv, plan, original, round1.get(tol), verdict.target)
        more = COVERAGE_LEVERS[lever](r1)
        out[key] = step2(more, plan.tuning, tol)[1] | {
            "added": [
                {"flip_rate": round(c.flip_rate, 3), "mask_l1": round(c.mask_l1, 4), "over_alignment": c.over_alignment}
                for c in more
                if all(c is not t for t in plan.triggers)
            ]
        }
    return out


def setting(text: str) -> tuple[str, float]:
    """NAME=NUMBER for a PurifyConfig field that holds a float."""
    name, _, value = text.partition("=")
    if name not in {f.name for f in fields(PurifyConfig) if f.type in ("float", float)}:
        raise argparse.ArgumentTypeError(f"PurifyConfig has no float field {name!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} takes a number, not {value!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="+", type=Path, help="backdoored testbed or zoo model folders")
    ap.add_argument("--tolerances", nargs="+", type=float, default=[TuningConfig.clean_tolerance])
    ap.add_argument(
        "--levers",
        nargs="+",
        default=["base"],
        choices=[*STEP2_LEVERS, *PLAN_LEVERS, FREE, SHOTS_SIDE],
        help="step-2 changes",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="shot sets (purify's --seed)")
    ap.add_argument(
        "--against", nargs="+", default=list(TRIGGERS), choices=TRIGGERS, help="what step 2 is tuned against"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--push-off",
        action="store_true",
        help="step 2 pushes the copies off their target where purify's gate does (its default); without it, "
        "as purify --no-push-off, so `base` and `away2` are the gate's two branches (push_off_replay.py)",
    )
    ap.add_argument(
        "--set",
        nargs="+",
        type=setting,
        default=[],
        metavar="NAME=NUMBER",
        help="numeric PurifyConfig fields, e.g. side_reach=2.5 routed_share=0.01; rows are keyed without them: "
        "use another --out",
    )
    args = ap.parse_args()
    args.set = dict(args.set)
    torch.set_num_threads(1)
    push_off = PushOff() if args.push_off else None
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for tb, seed in product(args.testbeds, args.seeds):
        name = tb.name if seed == 0 else f"{tb.name}@{seed}"  # rows stored before --seeds read back
        stored[name] = measure(
            tb, args.tolerances, args.levers, stored.get(name, {}), seed, tuple(args.against), push_off, args.set
        )
        atomic.write_text(args.out, json.dumps(stored, indent=1))
    print(
        "| model | CA / ASR before | triggers tuned against | clean tolerance | lever | CA / ASR after (routed) | "
        "ASR everywhere | rung, step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in stored.items():
        b = r["before"]
        for key, v in r.items():
            if "/tol" not in key:
                continue
            which, rest = key.split("/tol")
            tol, _, lever = rest.partition("/")
            kept = f"{v.get('rung', '-')}, {v.get('step', '-')}"
            print(
                f"| {name} | {b['ca']:.3f} / {b['asr']:.3f} | {which} | {tol} | {lever or 'base'} | "
                f"{v['ca']:.3f} / {v['asr']:.3f} | {v['asr_everywhere']:.3f} | {kept} |"
            )


if __name__ == "__main__":
    main()
