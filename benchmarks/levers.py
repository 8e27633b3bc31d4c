"""Generalisation levers: CBPT re-run with one setting changed at a time, on the zoo's models
or on testbed folders (docs/results.md#levers).

    python benchmarks/levers.py zoo-out --part fit --lever base cell2 tv --out levers.json
    python benchmarks/levers.py TB/shapes-vit32-badnet-p30 TB/shapes-resnet64-badnet --seeds 0 1 \
        --lever base cell2 --out levers.json

Each lever is a named change of `PurifyConfig` (LEVERS below). From a zoo folder (one with
`runs/`) the models are the zoo's measured ones of `--part` (fit: may be tuned on; report:
measure a lever only once it is chosen), with shot set 0 as the zoo used; other folders are
testbeds (`cbpt-guard testbed build`), purified with each of `--seeds`. Runs are stored in
`--out` as they finish, so an interrupted table resumes. The table gives, per lever, the backdoored models' ASR after
(median / 95th percentile / worst, share <= 2%), the CA drop over every model, and the alarm's
attack success through the guard.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from oracle_trigger import STEP2_LEVERS  # benchmarks/ is the script's folder

from cbpt.data import ShotBudget
from cbpt.inversion import MaskPrior
from cbpt.purify import PurifyConfig
from cbpt.runtime import Runtime
from testbed.bench import measure
from testbed.resumable import ResumableRows
from testbed.zoo import spread, stored_records


def _prior(**kw) -> Callable[[PurifyConfig], PurifyConfig]:
    return lambda c: replace(c, inversion=replace(c.inversion, prior=MaskPrior(**kw)))


def _compact(**kw) -> Callable[[PurifyConfig], PurifyConfig]:
    return lambda c: replace(c, inversion=replace(c.inversion, compact=replace(c.inversion.compact, **kw)))


def _tuning(**kw) -> Callable[[PurifyConfig], PurifyConfig]:
    return lambda c: replace(c, tuning=replace(c.tuning, **kw))


def _step2(name: str) -> Callable[[PurifyConfig], PurifyConfig]:
    """Step 2's lever `name` (`oracle_trigger.STEP2_LEVERS`) as a change of the whole purify."""
    return lambda c: replace(c, tuning=STEP2_LEVERS[name](c.tuning))


LEVERS: dict[str, Callable[[PurifyConfig], PurifyConfig]] = {
    "base": lambda c: c,  # today's settings: checks that a re-run reproduces the zoo's record
    "cell2": _prior(cell=2),  # the mask drawn in 2 x 2 px cells
    "cell4": _prior(cell=4),
    "tv": _prior(tv=1.0),  # total variation weighed like the mask's size
    "cell2-tv": _prior(cell=2, tv=1.0),
    # each inverted trigger also tuned against at 3 random places: patches that fire anywhere
    "shifts4": _tuning(shifts=4),
    # triggered copies whose feature shift is also taken 2 (1.5) times as far (docs/method.md#trigger-strength)
    "strength2": _tuning(strengths=(1.0, 2.0)),
    "reach3.5": lambda c: replace(c, side_reach=3.5),
    "strength1.5": _tuning(strengths=(1.0, 1.5)),
    # the compact probes (docs/method.md#compact-probes): 1 or 3 tuned against beside the per-pixel
    # masks; 3 standing in for them where they flip and pull the shots too, which is today's default
    "compact1": _compact(restarts=1, stand_in=None),
    "compact3": _compact(restarts=3, stand_in=None),
    "compact3-instead": _compact(restarts=3, stand_in=0.9),
    "restarts6": lambda c: replace(c, inversion=replace(c.inversion, mask_restarts=6)),  # more dummy triggers
    # held-out decisions may move at most this far (the CA losses of the first zoo models)
    "klcap": _tuning(max_clean_kl=0.02),
    "lr2e-3": _tuning(lr=2e-3),  # gentler steps on the context vectors
    # the triggered copies pushed off their target beside being sent home, or instead of it: step 2's
    # levers of the same names (oracle_trigger.STEP2_LEVERS; docs/results.md#pushed-off-the-target)
    **{name: _step2(name) for name in ("away1", "away2", "away-only", "away-only2")},
    # the trigger side's bar set by its reach alone, as before the partial copies (docs/method.md#partial-triggers)
    "reach-alone": _step2("reach-alone"),
}


def _q(d: dict) -> str:
    return "-" if not d.get("n") else f"{d['median']:.3f} / {d['p95']:.3f} / {d['worst']:.3f}"


def summary(runs: list[dict]) -> dict:
    bd = [r for r in runs if r["asr_after"] is not None]
    return {
        "models": len(runs),
        "backdoored": len(bd),
        **spread(
            [r["asr_after"] for r in bd],
            [r["ca_before"] - r["ca_after"] for r in runs],
            [r["through_guard"] for r in bd if r["through_guard"] is not None],
        ),
    }


@dataclass(frozen=True)
class Model:
    """One model a lever is measured on, with the figures of its reference run if it has one."""

    name: str
    folder: Path
    dataset: str
    attack: str  # "none" for a clean model
    seed: int  # the shot set
    reference: dict | None = None  # the zoo's own run: CA and ASR after


def zoo_models(zoo: Path, part: str, kind: str) -> list[Model]:
    records = stored_records(zoo)
    return [
        Model(
            r["name"],
            zoo / "models" / r["name"],
            r["base"]["dataset"],
            "none" if r["attack"] is None else r["attack"]["family"],
            0,
            {"ca_after": r["ca_after"], "asr_after": r["asr_after"]},
        )
        for r in records
        if r["taken"] and part in ("all", r["part"]) and kind in ("both", r["kind"])
    ]


def testbed_models(folders: list[Path], seeds: list[int]) -> list[Model]:
    metas = [(tb, json.loads((tb / "metrics.json").read_text())) for tb in folders]
    return [Model(f"{tb.name}/s{s}", tb, m["dataset"], m["attack"], s) for tb, m in metas for s in seeds]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sources", nargs="+", type=Path, help="a `cbpt-guard testbed zoo` work folder, or testbeds")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="testbeds: the shot sets")
    ap.add_argument("--part", choices=("fit", "report", "all"), default="fit")
    ap.add_argument("--lever", nargs="+", choices=sorted(LEVERS), default=["base", "cell2"])
    ap.add_argument("--kind", choices=("backdoored", "clean", "both"), default="both")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    runtime = Runtime.of("cpu")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    zoo = [z for z in args.sources if (z / "runs").is_dir()]
    models = [m for z in zoo for m in zoo_models(z, args.part, args.kind)]
    models += testbed_models([tb for tb in args.sources if tb not in zoo], args.seeds)
    stored = ResumableRows.at(args.out)

    def row(lever: str, m: Model, cfg: PurifyConfig) -> dict:
        run = measure(m.folder, m.dataset, m.attack, "cbpt", 16, m.seed, cfg, runtime=runtime)
        alarm = run.info.get("alarm_eval") or {}
        return {
            "lever": lever,
            "model": m.name,
            "ca_before": run.ca_before,
            "ca_after": run.ca,
            "asr_before": None if m.attack == "none" else run.asr_before,
            "asr_after": None if m.attack == "none" else run.asr,
            "through_guard": alarm.get("asr_through_guard"),
            "backdoored_verdict": run.info["scan"]["backdoored"],
            "evidence": run.info["scan"]["evidence"],  # what showed it (cbpt.scan.Evidence)
            "tuning": run.info.get("tuning"),  # the checkpoint kept and its held-out figures
            "seconds": run.seconds,
            "zoo": m.reference,
        }

    for lever in args.lever:
        cfg = LEVERS[lever](PurifyConfig(budget=ShotBudget(16)))
        for m in models:
            stored.ensure(f"{lever}/{m.name}", lambda m=m, lever=lever, cfg=cfg: row(lever, m, cfg))
    which = f"the zoo's {args.part} part" if zoo else "testbeds"
    print(
        f"| lever ({which}) | models | ASR after median / p95 / worst | ASR <= 2% | "
        "CA drop median / p95 / worst | through the guard worst |"
    )
    print("|---|---|---|---|---|---|")
    for lever in args.lever:
        s = summary([v for v in stored.rows.values() if v["lever"] == lever])
        q, c = s["asr_after"], s["ca_drop"]
        le2 = "-" if s["asr_after_le_2pct"] is None else f"{s['asr_after_le_2pct']:.2f}"
        print(f"| {lever} | {s['models']} | {_q(q)} | {le2} | {_q(c)} | {s['asr_through_guard'].get('worst', '-')} |")
    print(
        json.dumps({lever: summary([v for v in stored.rows.values() if v["lever"] == lever]) for lever in args.lever})
    )


if __name__ == "__main__":
    main()
