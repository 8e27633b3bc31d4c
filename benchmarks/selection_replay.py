"""Which checkpoint a selection rule keeps, measured without re-tuning
(docs/results.md#judging-checkpoints-beyond-the-inverted-trigger).

Step 2 trains each rung from the same start with no randomness, so a rung's trajectory does not
depend on where an earlier rung stopped or on which rung was kept. `record` trains every rung of
the ladder for all its steps (no early stopping; in cautious mode too, which today does not
climb) and stores, at every evaluation, the held-out figures at each strength of the held-out
triggered copies (`STRENGTHS`) and the routed head's CA and ASR on the testbed's test split.
`replay` then runs the real selection (`cbpt.tuning.RungSearch`, `Climb`, `Judging`, the plan's
acceptance) over those records under each rule in `RULES` (`--oracle` adds the best checkpoint
the test split allows): seconds for a rule on every run, and the rule `purify` uses gives the
CA / ASR `purify` gives (the bench's seeding: shot set, inversion and tuning seed all equal the
shot set). A zoo's models are testbeds too (`zoo-out/models/NAME`, shot set 0 as the zoo used).

    python benchmarks/selection_replay.py record TB/digits-* TB/shapes-* --seeds 0 1 2 --out records.json
    python benchmarks/selection_replay.py replay records.json [--rules as-found by-reach beyond1.5]
    python benchmarks/selection_replay.py replay docs/bench/judging/records.json.gz   # the 48 runs of docs/results.md

`record` costs a scan and three full rungs per run (2-3 minutes on a 32-px testbed, one
thread) and resumes from --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from cbpt.data import ShotBudget
from cbpt.features import FeatureCache
from cbpt.prompts import ClassPrompts
from cbpt.purify import (
    PurifyConfig,
    TuningMode,
    calibration_features,
    plan_tuning,
    route_for,
    served_by,
    tuning_data,
)
from cbpt.scan import read_scan
from cbpt.tuning import (
    Acceptance,
    CautiousAcceptance,
    CleanFigures,
    Climb,
    Copies,
    FullAcceptance,
    HeldOut,
    Judging,
    Ladder,
    Rung,
    RungSearch,
    RungVerdict,
    ServedReading,
    Tuner,
    TuningConfig,
    TuningData,
    evaluate,
)
from cbpt_guard import atomic
from testbed.bench import scan_testbed
from testbed.evaluate import score_head
from testbed.zoo import ASR_BAR, ASR_WORST_BAR, CA_BAR, at_most

STRENGTHS = (1.0, 1.25, 1.5, 2.0)  # the held-out copies recorded, as found and further out


@dataclass(frozen=True)
class KeptTies(Judging):
    """Ties in the share reaching the target go to the checkpoint whose held-out clean decisions
    moved least (KL), not to the one sending most copies home. Measured on the zoo's fit part,
    not taken (docs/results.md#selection-rules-replayed-on-the-zoo)."""

    def key(self, h: HeldOut, eligible: bool) -> tuple:
        return (eligible, -(h.reach if self.rank_beyond else h.found_reach), -h.clean_kl)


@dataclass(frozen=True)
class BandedJudging(Judging):
    """Shares reaching the target that differ by less than `band` count as one (a few of the
    held-out copies); within a band the checkpoint whose clean decisions moved least (KL) ranks
    first. Measured on the zoo's fit part, not taken (docs/results.md#reach-read-in-bands-not-taken)."""

    band: float = 0.05

    def key(self, h: HeldOut, eligible: bool) -> tuple:
        share = h.reach if self.rank_beyond else h.found_reach
        return (eligible, -math.ceil(share / self.band - 1e-9), -h.clean_kl)


@dataclass(frozen=True)
class BandedLadder(Ladder):
    """A stronger rung is taken only where it sends at least `band` fewer held-out copies to the
    target than the best so far."""

    band: float = 0.05

    def weigh(self, best: HeldOut, run: HeldOut, floor: float) -> RungVerdict:
        if not self.holds(run, floor):
            return RungVerdict.STOP
        return RungVerdict.TAKE if run.reach <= best.reach - self.band + 1e-9 else RungVerdict.KEEP


def _banded(band: float) -> Rule:
    return Rule(TuningConfig(judging=BandedJudging(band=band), ladder=BandedLadder(band=band)))


@dataclass(frozen=True)
class Rule:
    """A selection replayed: the tuning settings it reads (judging, acceptance, ladder, how the
    held-out clean shots are read), and what cautious mode may do (docs/method.md#cautious-mode)."""

    tuning: TuningConfig = field(default_factory=TuningConfig)
    min_gain: float = CautiousAcceptance.min_gain
    cautious_ladder: bool = False  # cautious mode climbs the ladder too (where its rungs were recorded)
    # cautious mode reads the held-out clean shots as `tuning.served` says too (purify: on every shot)
    cautious_served: bool = False
    # a stronger rung's checkpoints are held to the ladder's floor alone, not also to the
    # acceptance's tolerance against the original head (which leaves the allowance no room)
    floor_decides: bool = False
    # the held-out clean accuracy may always lose one image (`cbpt.tuning.clean_kept`); False: only
    # the tolerance as configured (1.5 points: none of 40)
    whole_images: bool = True


# the held-out clean shots read with the tuned embeddings answering all of them: purify's reading
# before docs/method.md#served-reading, and the one every rule below it varies
EVERYWHERE = TuningConfig(served=None)


def _judged(**kw) -> Rule:
    return Rule(replace(EVERYWHERE, judging=Judging(**kw)))


def _laddered(**kw) -> Rule:
    return Rule(replace(EVERYWHERE, ladder=Ladder(**kw)))


def _read(**kw) -> Rule:
    return Rule(replace(EVERYWHERE, **kw))


def _served(slack: float, cautious: bool = False) -> Rule:
    return Rule(TuningConfig(served=ServedReading(slack)), cautious_served=cautious)


RULES: dict[str, Rule] = {
    "today": Rule(),  # what purify does (docs/method.md#judging, #served-reading)
    # the reading before: the tuned embeddings answer every held-out clean shot (docs/results.md's
    # tables before #served-reading call it "today")
    "everywhere": Rule(EVERYWHERE),
    # read as the routed head serves them (docs/results.md#judged-as-served), in cautious mode too,
    # with no cap on the tuned embeddings read everywhere; or, as purify reads, capped at the
    # tolerance plus 2.5, 7.5 or 10 points, in cautious mode too or not
    "served": _served(1.0, cautious=True),
    "served-no-spare-image": replace(_served(1.0, cautious=True), whole_images=False),
    "served-capped2.5": _served(0.025),
    "served-capped7.5": _served(0.075),
    "served-capped10": _served(0.10),
    "served-capped5-cautious": _served(0.05, cautious=True),  # purify's reading in its first version
    # today's reading with the copies judged further out, the ladder climbing while any copy reaches
    # the target, or half the allowance (docs/results.md#served-reading)
    "today-beyond1.5": Rule(TuningConfig(judging=Judging(beyond=(1.5,)))),
    "today-beyond2": Rule(TuningConfig(judging=Judging(beyond=(2.0,)))),
    "today-settle-at-0": Rule(TuningConfig(ladder=Ladder(target_rate=0.0))),
    "today-allowance1.5": Rule(TuningConfig(ladder=Ladder(allowance=0.015))),
    # today's reading with no allowance, or the first rung alone: what the climbs bought and cost
    # (docs/results.md#one-row-several-builds)
    "today-allowance0": Rule(TuningConfig(ladder=Ladder(allowance=0.0))),
    "today-rung0": Rule(TuningConfig(ladder=Ladder.off())),
    "no-spare-image": Rule(EVERYWHERE, whole_images=False),
    # the held-out clean accuracy's tolerance as the one image K = 16 allows (2.5 points), at any K
    "tolerance2.5": _read(clean_tolerance=0.025),
    "as-found": _judged(beyond=(), by_reach=False),  # the rule before judging (4210b3a)
    "by-reach": _judged(beyond=()),
    "beyond1.25": _judged(beyond=(1.25,), by_reach=False),
    "beyond1.5": _judged(beyond=(1.5,), by_reach=False),
    "beyond2": _judged(beyond=(2.0,), by_reach=False),
    "by-reach-beyond1.25": _judged(beyond=(1.25,)),
    "by-reach-beyond1.5": _judged(beyond=(1.5,)),
    "by-reach-beyond2": _judged(beyond=(2.0,)),
    "found-rank-beyond1.25": _judged(beyond=(1.25,), rank_beyond=False),
    "found-rank-beyond1.5": _judged(beyond=(1.5,), rank_beyond=False),
    "found-rank-beyond2": _judged(beyond=(2.0,), rank_beyond=False),
    # ties in the share reaching the target go to the checkpoint whose clean decisions moved least
    "kept-ties": _read(judging=KeptTies()),
    # the ladder's clean-accuracy allowance for a stronger rung: half, none
    "allowance1.5": _laddered(allowance=0.015),
    "allowance0": _laddered(allowance=0.0),
    # climb while any held-out copy still reaches the target
    "settle-at-0": _laddered(target_rate=0.0),
    # held-out decisions may move at most this far (docs/method.md#acceptance)
    "klcap0.05": _read(max_clean_kl=0.05),
    "klcap0.1": _read(max_clean_kl=0.1),
    # a model the scan reads clean: a smaller gain on the held-out triggered shots lets a tuned
    # head in; or the ladder climbed as for a found backdoor
    "cautious-gain0.1": Rule(EVERYWHERE, min_gain=0.1),
    "cautious-ladder": Rule(EVERYWHERE, cautious_ladder=True),
    "cautious-ladder-gain0.1": Rule(EVERYWHERE, min_gain=0.1, cautious_ladder=True),
    "floor-decides": Rule(EVERYWHERE, floor_decides=True),
    # today's reading with the share reaching the target read in bands of 5 or 10 points, ties to the
    # least-moved clean decisions, and the ladder taking a stronger rung only a band lower
    "band0.05": _banded(0.05),
    "band0.1": _banded(0.1),
}


def _figures(
    g: torch.Tensor, held: FeatureCache, original: torch.Tensor, scale: float, routed: torch.Tensor | None = None
) -> dict:
    """One evaluation of the head `g` on the held-out cache (`cbpt.tuning.evaluate`), per strength
    of its copies, with the tuned embeddings answering everywhere; with `routed` ([N]
    bool over the held-out clean shots), also the clean figures of the head as served (`served`)."""
    e = evaluate(held, g, original, scale, routed)
    out = {
        "clean_acc": e.clean_acc,
        "clean_count": e.clean_count,
        "clean_loss": e.clean_loss,
        "clean_kl": e.clean_kl,
        "copies": [asdict(c) for c in e.copies],
    }
    if e.served is not None:
        out["served"] = {"clean_acc": e.served.acc, "clean_loss": e.served.loss, "clean_kl": e.served.kl}
    return out


def record(tb: Path, seed: int, held_out: int | None = None, shots: int = 16) -> dict:
    """Every rung of one purify of the testbed `tb` (shot set `seed`, K = `shots` with `held_out`
    of them held out per class; None: ShotBudget's quarter)."""
    cfg = PurifyConfig(budget=ShotBudget(shots, held_out)).seeded(seed)
    cfg = replace(cfg, tuning=replace(cfg.tuning, judging=Judging(beyond=STRENGTHS[1:])))
    sc = scan_testbed(tb, cfg)
    clip, shots, feats, rows, original, inv = sc.clip, sc.shots, sc.feats, sc.rows, sc.original, sc.inversion
    plan = plan_tuning(read_scan(inv), inv, cfg, held_out=True)
    tc = plan.tuning
    data = tuning_data(clip, shots, plan.triggers, tc, original)
    route = route_for(data, calibration_features(data), cfg.routed_share, plan, cfg.target_gate, cfg.side_reach)
    data = served_by(data, route)  # as purify tunes; recorded in every mode, a rule may read it
    prompts = ClassPrompts(
        clip.model, clip.tokenizer(), shots.classnames, n_ctx=tc.n_ctx, seed=tc.seed, autocast=clip.runtime.autocast
    )

    def test_of(g: torch.Tensor, head_route) -> dict:
        e = score_head(feats, g[rows], None if head_route is None else head_route.reordered(rows))
        return {"ca": e.ca, "asr": e.asr}

    # every mode records the ladder's rungs: a rule may let cautious mode climb too
    rungs = [(tc.alpha, tc.margin), *cfg.tuning.ladder.rungs]
    attack = json.loads((tb / "metrics.json").read_text())["attack"]
    return {"attack": attack, "mode": str(plan.mode), "rungs": rungs} | trajectories(
        prompts, data, tc, plan.acceptance, rungs, lambda g: test_of(g, route), test_of(original, None)
    )


def trajectories(
    prompts: ClassPrompts,
    data: TuningData,
    tc: TuningConfig,
    acceptance: Acceptance,
    rungs: list[tuple[float, float]],
    test_of: Callable[[torch.Tensor], dict],
    original_test: dict,
) -> dict:
    """Every rung trained from the same start for all its steps, each evaluation recorded (where
    `data.served` marks the held-out clean shots the route sends to the tuned head, the served
    figures too)."""
    torch.manual_seed(tc.seed)  # as `tune` does
    tuner = Tuner(prompts, data, tc, acceptance)
    init = prompts.snapshot()
    held, routed = data.held_out or data.cache, data.served
    out = {"original": _figures(data.original, held, data.original, data.scale, routed) | {"test": original_test}}
    out["trajectories"] = []
    for i, (alpha, margin) in enumerate(rungs):
        prompts.restore(init)
        opt = torch.optim.Adam(prompts.parameters(), lr=tc.lr)
        tuner.texts.reset()
        trajectory = []
        for step in range(1, tc.steps + 1):
            tuner.step(opt, Rung(i, alpha, margin))
            if step % tc.eval_every == 0 or step == tc.steps:
                with torch.no_grad():
                    g = tuner.texts.current()
                    figures = _figures(g, held, data.original, data.scale, routed)
                    trajectory.append({"step": step} | figures | {"test": test_of(g)})
        out["trajectories"].append(trajectory)
    return out


def _held_out(e: dict, judging: Judging, alpha: float, rule: Rule) -> HeldOut:
    """A recorded evaluation as the selection under `rule` reads it."""
    strengths = (1.0, *judging.beyond)
    copies = [Copies(**c) for c in e["copies"] if c["strength"] in strengths]
    everywhere = CleanFigures(e["clean_acc"], e["clean_loss"], e["clean_kl"])
    # records made before the served figures were stored hold only the tuned embeddings' reading;
    # the first that stored them hold the served accuracy and KL, not the loss
    as_served = e | e["served"] if "served" in e else None
    served = (
        None if as_served is None else CleanFigures(*(as_served[k] for k in ("clean_acc", "clean_loss", "clean_kl")))
    )
    reading = rule.tuning.served
    clean = everywhere if reading is None else reading.read(everywhere, served)
    count = e["clean_count"] if rule.whole_images else 0
    return Judging.read(clean.acc, clean.loss, clean.kl, count, copies, alpha)


def replay(rec: dict, rule: Rule = Rule()) -> dict:
    """The checkpoint the selection keeps under `rule` (acceptance and ladder as
    `cbpt.purify.plan_tuning` sets them from its tuning settings), and its test CA / ASR."""
    cfg = rule.tuning
    cautious = rec["mode"] == str(TuningMode.CAUTIOUS)
    judging, tol, kl = cfg.judging, cfg.clean_tolerance, cfg.max_clean_kl
    acceptance = CautiousAcceptance(tol, rule.min_gain, kl) if cautious else FullAcceptance(tol, kl)
    ladder = Ladder.off() if cautious and not rule.cautious_ladder else cfg.ladder
    if cautious and not rule.cautious_served:  # as `cbpt.purify.plan_tuning` plans cautious mode
        rule = replace(rule, tuning=replace(cfg, served=None))
    original = _held_out(rec["original"], judging, cfg.alpha, rule)
    climb = Climb(ladder, original, tol)
    for i, (alpha, margin) in enumerate(rec["rungs"][: 1 + len(ladder.rungs)]):
        # floor_decides: no tolerance to the original head (a whole one), `RungSearch` checks the floor
        accepts = FullAcceptance(1.0, kl) if i and rule.floor_decides and not cautious else acceptance
        search = RungSearch(Rung(i, alpha, margin), accepts, original, judging, climb.floor, cfg.patience)
        for e in rec["trajectories"][i]:
            if search.offer(e["step"], _held_out(e, judging, alpha, rule), lambda: torch.zeros(1)):
                break
        assert search.best is not None
        if not climb.add(search.best):
            break
    chosen = climb.chosen
    assert chosen is not None
    if chosen.ctx is None:  # cautious mode kept the original prompts
        return {"rung": None, "step": None, **rec["original"]["test"]}
    test = next(e["test"] for e in rec["trajectories"][chosen.rung.index] if e["step"] == chosen.step)
    return {"rung": chosen.rung.index, "step": chosen.step, **test}


def oracle(rec: dict, max_drop: float = CA_BAR) -> dict:
    """What no selection rule can beat: of every recorded checkpoint (and the original prompts)
    that keeps test CA within `max_drop`, the one with the lowest test ASR (a clean model: the
    highest CA). Read on the test split, so a bound, not a rule."""
    before = rec["original"]["test"]
    options = [{"rung": None, "step": None, **before}] + [
        {"rung": i, "step": e["step"], **e["test"]} for i, t in enumerate(rec["trajectories"]) for e in t
    ]
    kept = [o for o in options if at_most(before["ca"] - o["ca"], max_drop)] or [max(options, key=lambda o: o["ca"])]
    if rec["attack"] == "none":
        return max(kept, key=lambda o: o["ca"])
    return min(kept, key=lambda o: (o["asr"], -o["ca"]))


def summarise(records: dict[str, dict], rules: list[str], with_oracle: bool = False) -> str:
    """Per run the CA / ASR each rule keeps; per rule the spread over the backdoored runs (ASR)
    and over every run (CA drop); `with_oracle`: beside them, `oracle`'s bound."""
    kept = {r: {k: replay(rec, RULES[r]) for k, rec in records.items()} for r in rules}
    unread = not any(e["clean_kl"] for rec in records.values() for t in rec["trajectories"] for e in t)
    if with_oracle:
        kept["oracle"] = {k: oracle(rec) for k, rec in records.items()}
        rules = [*rules, "oracle"]
    names = sorted(records)
    lines = ["| run | CA / ASR before | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules)]
    for k in names:
        b = records[k]["original"]["test"]
        clean = records[k]["attack"] == "none"
        before = f"{b['ca']:.3f} / " + ("-" if clean else f"{b['asr']:.3f}")
        cells = []
        for r in rules:
            x = kept[r][k]
            asr = "-" if clean else f"{x['asr']:.3f}"
            cells.append(f"{x['ca']:.3f} / {asr} ({'orig' if x['rung'] is None else x['rung']})")
        lines.append(f"| {k} | {before} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| rule | runs | CA drop mean / worst | CA drop > 2 pt | backdoored runs | ASR mean | ASR > 2% | ASR > 5% "
        "| worst ASR | runs meeting both goals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rules:
        drops = {k: records[k]["original"]["test"]["ca"] - kept[r][k]["ca"] for k in names}
        bd = [k for k in names if records[k]["attack"] != "none"]
        asr = [kept[r][k]["asr"] for k in bd]
        # the zoo's goals (docs/results.md#the-zoo): CA within 2 points, and ASR after <= 2%
        met = sum(at_most(drops[k], CA_BAR) and (k not in bd or at_most(kept[r][k]["asr"], ASR_BAR)) for k in names)
        drop = f"{statistics.mean(drops.values()):.4f} / {max(drops.values()):.3f}"
        lines.append(
            f"| {r} | {len(names)} | {drop} | {sum(not at_most(d, CA_BAR) for d in drops.values())} | "
            f"{len(asr)} | {statistics.mean(asr):.4f} | {sum(not at_most(a, ASR_BAR) for a in asr)} | "
            f"{sum(not at_most(a, ASR_WORST_BAR) for a in asr)} | {max(asr):.3f} | {met} |"
        )
    if unread:  # records made before `evaluate` read the KL store 0 for it
        lines += ["", "These records hold no KL of the clean decisions: rules that read it (klcap, kept-ties) read 0."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="full trajectories of every rung")
    rec.add_argument("testbeds", nargs="+", type=Path)
    rec.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--shots", type=int, default=16, help="K per class, held-out ones included")
    rec.add_argument("--held-out", type=int, default=None, help="held-out shots per class of the K (default: K / 4)")
    rep = sub.add_parser("replay", help="the selection rules over stored records")
    rep.add_argument("records", nargs="+", type=Path)
    rep.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    rep.add_argument("--oracle", action="store_true", help="add the best checkpoint the test split allows")
    rep.add_argument("--only", default=None, help="replay only the runs whose name holds this text (e.g. -shapes-)")
    args = ap.parse_args()
    if args.command == "record":
        torch.set_num_threads(1)
        stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
        for seed in args.seeds:
            for tb in args.testbeds:
                key = f"{tb.name}/s{seed}"
                if key not in stored:
                    stored[key] = record(tb, seed, args.held_out, args.shots)
                    atomic.write_text(args.out, json.dumps(stored))
                    print(key, "recorded", flush=True)
        return
    records: dict[str, dict] = {}
    for f in args.records:
        records.update(json.loads(gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_text()))
    if args.only is not None:
        records = {k: v for k, v in records.items() if args.only in k}
    print(summarise(records, args.rules, args.oracle))


if __name__ == "__main__":
    main()
