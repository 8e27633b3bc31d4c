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

Where the real trigger on the shots leaves as much ASR as the inverted one at the same CA, the
inverted trigger is not what is missing: no head tuned on these shots does better at that CA
(benchmarks/head_bound.py asks the same of any linear head, with far more data). Resumable:
rows already in --out are read back. The scan takes a few minutes a model on a 32-px testbed, each tuning 5-15 s.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import torch

from cbpt.data import ShotBudget, load_shots
from cbpt.inversion import Candidate
from cbpt.model import load_clip
from cbpt.purify import (
    PurifyConfig,
    calibration_features,
    original_head,
    plan_tuning,
    route_for,
    tune_prompts,
    tuning_data,
)
from cbpt.scan import read_scan, run_scan
from cbpt.trigger import TriggerKind
from cbpt.tuning import TuningConfig
from cbpt_guard import atomic
from cbpt_guard.artifacts import CLASSES
from testbed.evaluate import class_order, encode_test_split, score_head
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
    "base": lambda t: t,  # purify's settings
    "lr1e-2": _tuning(lr=1e-2),  # livelier steps on the context vectors (purify: 5e-3)
    "lr2e-2": _tuning(lr=2e-2),
    # triggered copies whose feature shift is also taken 2 times as far (docs/method.md#trigger-strength)
    "strength2": _tuning(strengths=(1.0, 2.0)),
    "views6": _tuning(views=6),  # six augmented views of each shot instead of two
}


def _key(triggers: str, tol: float, lever: str) -> str:
    """A row's name; the base lever is left out, so rows stored before --levers read back."""
    return f"{triggers}/tol{tol:g}" + ("" if lever == "base" else f"/{lever}")


def measure(tb: Path, tolerances: list[float], levers: list[str], done: dict) -> dict:
    keys = [_key(t, tol, lever) for t, tol, lever in product(("inverted", "real"), tolerances, levers)]
    if "before" in done and all(k in done for k in keys):
        return done  # nothing to measure: no scan
    cfg = PurifyConfig(budget=ShotBudget(16))
    clip = load_clip(tb / "model.pt")
    shots = load_shots(clip, tb / "fewshot", tb / CLASSES, cfg.budget, cfg.seed)
    feats = encode_test_split(clip, tb)
    rows = class_order(list(shots.classnames), tb)
    original = original_head(clip, shots.classnames)
    inv = run_scan(clip, shots, cfg.inversion, original)
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
    }
    for (triggers_name, triggers), tol, lever in product(
        (("inverted", plan.triggers), ("real", real)), tolerances, levers
    ):
        key = _key(triggers_name, tol, lever)
        if key not in out:
            p = replace(
                plan,
                triggers=triggers,
                tuning=replace(STEP2_LEVERS[lever](plan.tuning), clean_tolerance=tol),
                acceptance=replace(plan.acceptance, clean_tolerance=tol),
            )
            data = tuning_data(clip, shots, p.triggers, p.tuning, original)
            result = tune_prompts(clip, shots.classnames, data, p.tuning, p.acceptance)
            route = None if result.kept_original else route_for(data, calibration_features(data), cfg.routed_share, p)
            chosen = result.chosen
            out[key] = scored(result.text_features, route) | {"rung": chosen.rung.index, "step": chosen.step}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="+", type=Path, help="backdoored testbed or zoo model folders")
    ap.add_argument("--tolerances", nargs="+", type=float, default=[TuningConfig.clean_tolerance])
    ap.add_argument("--levers", nargs="+", default=["base"], choices=list(STEP2_LEVERS), help="step-2 changes")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for tb in args.testbeds:
        stored[tb.name] = measure(tb, args.tolerances, args.levers, stored.get(tb.name, {}))
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
