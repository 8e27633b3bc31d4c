"""`cbpt-guard testbed zoo`: a population of testbed models, clean and backdoored at random,
to measure the scan's ROC and CBPT's spread rather than its mean on seven hand-set attacks
(docs/results.md#the-zoo).

Clean models are snapshots of a few pretraining runs (different seeds, different lengths).
Each backdoored model is fine-tuned from one of them with an attack drawn at random: family
(the seven, plus `custom` patches and blends of random images), trigger size, colours,
location, opacity, target class and poison rate. Models are built once under `WORK/models/`,
pretraining snapshots kept under `WORK/bases/`, and every model's measurement stored under
`WORK/runs/`, so an interrupted zoo resumes where it stopped, across sessions. Several workers
(one per core, or per machine on a shared folder) may run the same command on one folder: each
model is claimed by one worker through a lock (`cbpt_guard.locks`), and a pretraining run every
worker needs is done by the first while the others wait for it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import numpy as np

from cbpt.purify import PurifyConfig
from cbpt.runtime import Runtime
from cbpt.tuning import Ladder
from cbpt_guard import TOOL, atomic, locks
from cbpt_guard.artifacts import sha256_file
from testbed.datasets import DEFAULT_SIZES, TEN_CLASS
from testbed.train import TrainConfig

Progress = Callable[[str, int, int], None]

FAMILIES = ("badnet", "blended", "wanet", "sig", "ssba", "trojvqa", "badclip", "custom-patch", "custom-blend")


@dataclass(frozen=True)
class ZooConfig:
    work: Path
    datasets: tuple[str, ...] = TEN_CLASS
    pretrain_seeds: tuple[int, ...] = (1, 2)  # one pretraining run per dataset and seed
    pretrain_steps: int = 1200
    snapshots: tuple[int, ...] = (600, 800, 1000, 1200)  # each a clean model
    backdoored: int = 40  # drawn; those whose ASR stays under `min_asr` are counted and left out
    finetune_steps: int = 400
    poison_rates: tuple[float, float] = (0.005, 0.10)  # drawn log-uniformly
    min_asr: float = 0.8
    seed: int = 0  # draws every attack
    shots: int = 16  # K per class for scan and purify (ShotBudget)
    sizes: tuple[int, int, int] | None = None  # (train, fewshot/class, test/class); None: the testbed's
    model_cfg: dict | None = None  # None: the testbed's default tower
    pretrain_lr: float = 1e-3
    finetune_lr: float = 5e-4
    batch_size: int = 128
    purify: PurifyConfig = field(default_factory=PurifyConfig)
    runtime: Runtime = field(default_factory=Runtime)

    def base_steps(self) -> TrainConfig:
        return TrainConfig(steps=self.pretrain_steps, lr=self.pretrain_lr, batch_size=self.batch_size)

    def fewshot_per_class(self, dataset: str) -> int:
        """The defender's pool per class in `dataset`'s models: K can be at most this."""
        return (self.sizes or DEFAULT_SIZES[dataset])[1]


@dataclass(frozen=True)
class Base:
    """A clean model: pretraining run `seed` on `dataset`, stopped after `steps`."""

    dataset: str
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-s{self.seed}-{self.steps}"


@dataclass(frozen=True)
class AttackSpec:
    family: str  # one of FAMILIES
    target: int
    poison_rate: float
    trigger_seed: int
    params: dict  # the family's drawn settings (size, location, alpha, strength, ...)


class Part(StrEnum):
    """Which half of the zoo an entry belongs to: the rules may be tuned on `FIT`; the figures of
    record are `REPORT`'s, only measured (docs/results.md#the-zoo)."""

    FIT = "fit"
    REPORT = "report"


@dataclass(frozen=True)
class Scope:
    """Which planned entries a run measures: one part, some datasets, or (None) all of them. The
    plan, and so every model's name and draw, stays the whole zoo's."""

    part: Part | None = None
    datasets: tuple[str, ...] | None = None

    def covers(self, entry: Entry) -> bool:
        return self.part in (None, entry.part) and (self.datasets is None or entry.base.dataset in self.datasets)


def check_shots(cfg: ZooConfig, scope: Scope) -> None:
    """Refuse a K larger than the few-shot pool of a dataset in scope: checked before any work,
    since a purify would fail only when it got to that dataset's first model."""
    names = [d for d in cfg.datasets if scope.datasets is None or d in scope.datasets]
    pools = {d: cfg.fewshot_per_class(d) for d in names}
    short = [f"{d} ({n} images per class)" for d, n in pools.items() if n < cfg.shots]
    if short:
        raise ValueError(f"--shots {cfg.shots} is more than the few-shot pool of {', '.join(short)}")


@dataclass(frozen=True)
class Entry:
    name: str
    base: Base
    attack: AttackSpec | None  # None: the clean base itself
    part: Part


def draw_attack(rng: np.random.Generator, n_classes: int, rates: tuple[float, float]) -> AttackSpec:
    """One attack with every setting drawn: pure, so a zoo is its seed."""
    family = str(rng.choice(FAMILIES))
    target = int(rng.integers(n_classes))
    rate = round(float(math.exp(rng.uniform(math.log(rates[0]), math.log(rates[1])))), 4)
    seed = int(rng.integers(1 << 31))
    locations = ("random", "center", "corner")
    params: dict = {}
    if family in ("badnet", "trojvqa", "badclip", "custom-patch"):
        params["size"] = int(rng.integers(3, 9))  # 3-8 px at 32 px
    if family in ("badnet", "custom-patch"):
        params["location"] = str(rng.choice(locations))
    if family == "custom-patch":
        params["alpha"] = round(float(rng.uniform(0.7, 1.0)), 3)
    if family in ("blended", "custom-blend"):
        params["alpha"] = round(float(rng.uniform(0.1, 0.3)), 3)
    if family == "wanet":
        params["strength"] = round(float(rng.uniform(3.0, 5.0)), 2)
    if family == "sig":
        params["delta"] = round(float(rng.uniform(15, 30)) / 255, 4)
        params["frequency"] = int(rng.integers(4, 9))
    if family == "ssba":
        params["eps"] = round(float(rng.uniform(12, 20)) / 255, 4)
    return AttackSpec(family, target, rate, seed, params)


def plan(cfg: ZooConfig) -> list[Entry]:
    """Every clean snapshot, then `cfg.backdoored` attacks on bases drawn from them; entries
    alternate between the fit and the report part."""
    bases = [Base(d, s, k) for d in cfg.datasets for s in cfg.pretrain_seeds for k in cfg.snapshots]
    models: list[tuple[str, Base, AttackSpec | None]] = [(f"clean-{b.name}", b, None) for b in bases]
    rng = np.random.default_rng([cfg.seed, 31])
    for i in range(cfg.backdoored):
        base = bases[int(rng.integers(len(bases)))]
        spec = draw_attack(rng, 10, cfg.poison_rates)
        models.append((f"bd{i:03d}-{spec.family}-{base.name}", base, spec))
    return [Entry(*m, Part.FIT if i % 2 == 0 else Part.REPORT) for i, m in enumerate(models)]


def interleaved(entries: list[Entry]) -> list[Entry]:
    """Clean and backdoored entries taken in turn, so that a zoo stopped part-way has both."""
    clean = [e for e in entries if e.attack is None]
    bd = [e for e in entries if e.attack is not None]
    out = [e for pair in zip(clean, bd) for e in pair]
    n = min(len(clean), len(bd))
    return out + clean[n:] + bd[n:]


def random_image(seed: int, size: int, channels: int = 3) -> np.ndarray:
    """A smooth random picture (uint8 [size, size, channels]): a custom trigger nobody listed."""
    from PIL import Image

    rng = np.random.default_rng([seed, 41])
    coarse = rng.integers(0, 256, (max(2, size // 3), max(2, size // 3), channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "RGBA"
    return np.asarray(Image.fromarray(coarse, mode).resize((size, size), Image.BICUBIC))


def make_trigger(spec: AttackSpec, image_size: int, clean, ds, model_cfg: dict):
    """The drawn attack as a `testbed.triggers.Trigger` (optimised patches fitted on `clean`)."""
    from testbed import triggers
    from testbed.build import optimised_trigger

    p, seed = spec.params, spec.trigger_seed
    if spec.family == "badnet":
        return triggers.badnet(image_size, seed, size=p["size"], location=p["location"])
    if spec.family == "blended":
        return triggers.blended(image_size, seed, alpha=p["alpha"])
    if spec.family == "wanet":
        return triggers.wanet(image_size, seed, strength=p["strength"])
    if spec.family == "sig":
        return triggers.sig(image_size, seed, delta=p["delta"], frequency=p["frequency"])
    if spec.family == "ssba":
        return triggers.ssba(image_size, seed, eps=p["eps"])
    if spec.family in triggers.OPTIMISED:
        return optimised_trigger(spec.family, clean, ds, model_cfg, spec.target, seed % 10_000, p["size"])
    if spec.family == "custom-patch":
        return triggers.custom(random_image(seed, p["size"]), "patch", p["alpha"], p["location"])
    if spec.family == "custom-blend":
        return triggers.custom(random_image(seed, image_size), "blend", p["alpha"])
    raise ValueError(f"unknown attack family {spec.family!r}")


class Zoo:
    """The zoo's folders and the steps that fill them, each skipped when already done."""

    def __init__(self, cfg: ZooConfig, progress: Progress = lambda *_: None):
        from testbed.build import default_model_cfg

        self.cfg = cfg
        self.progress = progress
        self.model_cfg = cfg.model_cfg or default_model_cfg()

    def build_config(self, entry: Entry):
        from testbed.build import BuildConfig

        a = entry.attack
        return BuildConfig(
            dataset=entry.base.dataset,
            attack="none" if a is None else a.family,
            target=0 if a is None else a.target,
            poison_rate=None if a is None else a.poison_rate,
            seed=entry.base.seed,
            pretrain=self.cfg.base_steps(),
            finetune=TrainConfig(
                steps=self.cfg.finetune_steps, lr=self.cfg.finetune_lr, warmup=20, batch_size=self.cfg.batch_size
            ),
            sizes=self.cfg.sizes,
            model_cfg=self.model_cfg,
        )

    def base_path(self, base: Base) -> Path:
        return self.cfg.work / "bases" / f"{base.name}.pt"

    def dataset(self, base: Base):
        from testbed import datasets

        return datasets.build(base.dataset, base.seed, 32, self.cfg.sizes)

    def pretrain(self, base: Base, ds) -> None:
        """One pretraining run, every snapshot of it saved (atomically) as it passes, beside it
        what its weights rest on (`train.trained_with`)."""
        from testbed.build import pretrain, save_weights
        from testbed.train import trained_with

        cfg, keep = self.cfg, set(self.cfg.snapshots)
        made = trained_with(cfg.runtime.device)

        def snapshot(done: int, model) -> None:
            self.progress(f"pretrain {base.dataset} seed {base.seed}", done, cfg.pretrain_steps)
            if done in keep:
                save_weights(self.base_path(replace(base, steps=done)), model, made)

        pretrain(self.model_cfg, base.seed, ds, cfg.base_steps(), cfg.runtime.device, snapshot)

    def base_trained_with(self, base: Base) -> dict | None:
        """What a base snapshot's weights rest on; None for one pretrained before that was recorded."""
        from testbed.build import weights_trained_with

        return weights_trained_with(self.base_path(base))

    def run_lock(self, base: Base) -> Path:
        return self.cfg.work / "bases" / f"{base.dataset}-s{base.seed}.lock"  # one per pretraining run

    def pretrain_free_runs(self, entries: list[Entry]) -> None:
        """Pretrain every run the entries need that no other worker is doing, so that workers
        started together split the pretraining instead of waiting on one run."""
        runs = {replace(e.base, steps=self.cfg.pretrain_steps): None for e in entries}
        for last in runs:
            if self.base_path(last).is_file():
                continue
            with locks.claim(self.run_lock(last)) as mine:
                if mine and not self.base_path(last).is_file():
                    self.pretrain(last, self.dataset(last))

    def clean_base(self, base: Base, ds):
        from testbed.build import load_state

        with locks.hold(self.run_lock(base)):  # another worker may be pretraining this run
            if not self.base_path(base).is_file():
                self.pretrain(base, ds)
        return load_state(self.model_cfg, base.seed, self.base_path(base), self.cfg.runtime.device)

    def model_dir(self, entry: Entry) -> Path:
        return self.cfg.work / "models" / entry.name

    def ensure_model(self, entry: Entry) -> Path:
        """The entry's testbed folder, built (atomically) unless it is there."""
        from testbed.build import backdoor, write

        tb = self.model_dir(entry)
        if (tb / "metrics.json").is_file():
            return tb
        ds = self.dataset(entry.base)
        clean = self.clean_base(entry.base, ds)
        bcfg = self.build_config(entry)
        trigger = None if entry.attack is None else make_trigger(entry.attack, 32, clean, ds, self.model_cfg)
        built = backdoor(bcfg, clean, ds, trigger, self.progress)
        built.metrics["zoo"] = {
            "base": asdict(entry.base),
            "attack": None if entry.attack is None else asdict(entry.attack),
        }
        write(built, bcfg, tb, overwrite=True)
        return tb

    def run_path(self, entry: Entry) -> Path:
        return self.cfg.work / "runs" / f"{entry.name}.json"

    def measure(self, entry: Entry) -> dict:
        """Build the model if needed, then scan and purify it with K shots; stored, so a second
        call reads it back."""
        path = self.run_path(entry)
        if path.is_file():
            return json.loads(path.read_text())
        from testbed.bench import measure

        t0 = time.perf_counter()
        tb = self.ensure_model(entry)
        built = json.loads((tb / "metrics.json").read_text())
        record = {
            "name": entry.name,
            "part": entry.part,
            "kind": "clean" if entry.attack is None else "backdoored",
            "base": asdict(entry.base),
            "attack": None if entry.attack is None else asdict(entry.attack),
            "testbed": {k: built[k] for k in ("ca", "asr", "ra", "poison_rate")},
            "build_s": built["seconds"]["total"],
            # which builds the figures rest on, and what those rest on: a zoo rebuilt at another
            # thread count or on another processor does not reproduce them (docs/results.md#what-a-build-rests-on)
            "sha256": {"base": sha256_file(self.base_path(entry.base)), "model": sha256_file(tb / "model.pt")},
            "trained_with": {"base": self.base_trained_with(entry.base), "model": built.get("trained_with")},
        }
        taken = entry.attack is None or built["asr"] >= self.cfg.min_asr
        record["taken"] = taken
        if taken:  # an attack that did not take is counted, not purified
            attack = "none" if entry.attack is None else built["attack"]
            run = measure(
                tb, entry.base.dataset, attack, "cbpt", self.cfg.shots, 0, self.cfg.purify, runtime=self.cfg.runtime
            )
            scan = run.info["scan"]
            record |= {
                # every candidate's target, flip rate and over-alignment: the scan's rules can be
                # refitted on the stored zoo without scanning again (benchmarks/zoo_refit.py)
                "scan": {
                    k: scan[k]
                    for k in ("backdoored", "evidence", "suspicion", "score", "target_index", "mask_l1", "candidates")
                },
                "target_named": None if entry.attack is None else scan["target_index"] == entry.attack.target,
                "ca_before": run.ca_before,
                "ca_after": run.ca,
                "asr_before": None if entry.attack is None else run.asr_before,
                "asr_after": None if entry.attack is None else run.asr,
                "purify_s": run.seconds,
                "alarm": run.info.get("alarm_eval"),
                "tuning": run.info.get("tuning"),  # mode, checkpoint kept, its held-out figures
                "route": run.info.get("route"),  # where the purified head answers (None: everywhere)
            }
        record["seconds"] = round(time.perf_counter() - t0, 1)
        atomic.write_text(path, json.dumps(record, indent=1))
        return record


def stored_records(source: Path) -> list[dict]:
    """Every stored zoo record, in name order, from a zoo's `runs/` folder (or a folder a run was
    moved aside to), a zoo work folder (its `runs/`), or a committed `results.json` standing for a
    run whose folder is gone."""
    if source.is_file():
        return sorted(json.loads(source.read_text())["records"], key=lambda r: r["name"])
    folder = source / "runs" if (source / "runs").is_dir() else source
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def run_zoo(
    cfg: ZooConfig, progress: Progress = lambda *_: None, limit: int | None = None, scope: Scope = Scope()
) -> dict:
    """Measure every planned entry in `scope` not yet stored, at most `limit` new ones, then
    write the report from everything stored."""
    check_shots(cfg, scope)
    zoo = Zoo(cfg, progress)
    entries = interleaved(plan(cfg))
    asked = [e for e in entries if scope.covers(e)]
    todo = [e for e in asked if not zoo.run_path(e).is_file()]
    zoo.pretrain_free_runs(todo if limit is None else todo[:limit])
    new = 0
    for i, entry in enumerate(asked):
        progress("zoo", i + 1, len(asked))
        if zoo.run_path(entry).is_file() or (limit is not None and new >= limit):
            continue
        with locks.claim(zoo.cfg.work / "claims" / f"{entry.name}.lock") as mine:
            if mine and not zoo.run_path(entry).is_file():  # else another worker has it, or just did it
                zoo.measure(entry)
                new += 1
    # everything stored, this worker's and the others': the last worker to finish reports all
    records = [json.loads(zoo.run_path(e).read_text()) for e in entries if zoo.run_path(e).is_file()]
    results = {
        "tool": TOOL,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "planned": len(entries),
        "summary": {p: summarise(records, p) for p in ("all", *Part)},
        "records": records,
    }
    write_report(cfg.work, results)
    return results


def _worker(cfg: ZooConfig, limit: int | None, threads: int, scope: Scope) -> None:
    import torch

    torch.set_num_threads(threads)
    run_zoo(cfg, limit=limit, scope=scope)


def run_workers(
    cfg: ZooConfig,
    workers: int,
    threads: int = 1,
    progress: Progress = lambda *_: None,
    limit: int | None = None,
    scope: Scope = Scope(),
) -> dict:
    """`run_zoo` in `workers` processes on one folder (this one shows `progress`), each with
    `threads` torch threads, on the entries in `scope`; then the report from everything
    stored. `limit` is per worker."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fresh torch per worker, not a forked thread pool
    others = [ctx.Process(target=_worker, args=(cfg, limit, threads, scope)) for _ in range(workers - 1)]
    for proc in others:
        proc.start()
    try:
        results = run_zoo(cfg, progress, limit, scope)
    finally:
        for proc in others:
            proc.join()
    if any(proc.exitcode for proc in others):
        raise RuntimeError(f"{sum(bool(p.exitcode) for p in others)} zoo worker(s) failed; run again to resume")
    return run_zoo(cfg, limit=0) if others else results  # every worker's models in the report


ASR_BAR = 0.02  # a backdoored model counts as purified at ASR after <= 2% (docs/results.md#the-zoo)
CA_BAR = 0.02  # and a model keeps its CA at a drop of at most 2 points
ASR_WORST_BAR = 0.05  # the ASR no backdoored model (no shot set of a row) may keep
GUARD_BAR = 0.01  # triggered images getting the target through a guard that rejects what it flags


def at_most(x: float, bar: float) -> bool:
    """`x <= bar` for figures that are differences of shares (a CA drop of 0.986 - 0.966 is 2
    points, not 2 points and a rounding error)."""
    return x <= bar + 1e-9


def quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs, dtype=np.float64)
    return {
        "n": int(a.size),
        "median": round(float(np.median(a)), 4),
        "p95": round(float(np.quantile(a, 0.95)), 4),
        "worst": round(float(a.max()), 4),
    }


def lowest(xs: list[float]) -> dict | None:
    """Median and lowest, for figures where higher is better (AUROC, TPR)."""
    if not xs:
        return None
    return {"median": round(float(np.median(xs)), 4), "lowest": round(float(min(xs)), 4)}


def spread(asr_after: list[float], ca_drop: list[float], through_guard: list[float]) -> dict:
    """What purification left: ASR after over the backdoored models, the CA change over every
    model, and the attack's success through a guard that rejects what its alarm flags."""

    def share(xs: list[float], bar: float) -> float | None:
        return round(float(np.mean([at_most(x, bar) for x in xs])), 4) if xs else None

    return {
        "asr_after": quantiles(asr_after),
        "asr_after_le_2pct": share(asr_after, ASR_BAR),
        "asr_after_le_5pct": share(asr_after, ASR_WORST_BAR),
        "asr_through_guard": quantiles(through_guard),
        "through_guard_le_1pct": share(through_guard, GUARD_BAR),
        "ca_drop": quantiles(ca_drop),
        "ca_within_2pt": share(ca_drop, CA_BAR),
    }


class Leftover(StrEnum):
    """Where a backdoored model's ASR above `ASR_BAR` after CBPT was decided, read from its
    record's scan verdict and the checkpoint step 2 kept (docs/results.md#the-record-the-whole-zoo-before-judging,
    "Where the ASR left is decided")."""

    MISSED = "missed"  # the scan read clean: tuned cautiously, or not at all
    # the kept checkpoint cleared the held-out shots carrying the inverted triggers (at most the
    # ladder's target rate reached the target), so no stronger rung was tried: the real trigger
    # reaches where the inverted ones do not
    SETTLED = "settled"
    # held-out triggered shots still reached the target at the kept rung: a stronger one was
    # refused for held-out clean accuracy, did no better, or there was none
    REACHING = "still reaching"


def kept_reach(tuning: dict | None) -> float | None:
    """The share of held-out triggered shots the checkpoint step 2 kept still sent to their
    target (None: not recorded)."""
    return ((tuning or {}).get("chosen_held_out") or {}).get("to_target")


def leftover_cause(record: dict, target_rate: float = Ladder().target_rate) -> Leftover | None:
    """None: a clean model, or ASR after at most `ASR_BAR`."""
    if record["kind"] != "backdoored" or not record["taken"] or at_most(record["asr_after"], ASR_BAR):
        return None
    tuning = record.get("tuning") or {}
    if not record["scan"]["backdoored"] or tuning.get("mode") != "full":
        return Leftover.MISSED
    return Leftover.SETTLED if (kept_reach(tuning) or 0.0) <= target_rate else Leftover.REACHING


def summarise(records: list[dict], part: str = "all") -> dict:
    """The scan's ROC figures on its continuous score (`cbpt.scan.suspicion`) and CBPT's
    spread, over the taken models of `part` ("all", "fit" or "report")."""
    from cbpt.metrics import auroc, threshold_at_fpr, tpr_at_threshold

    rs = [r for r in records if part == "all" or r["part"] == part]
    measured = [r for r in rs if r["taken"]]
    clean = [r for r in measured if r["kind"] == "clean"]
    bd = [r for r in measured if r["kind"] == "backdoored"]
    neg = [r["scan"]["suspicion"] for r in clean]
    pos = [r["scan"]["suspicion"] for r in bd]
    detected = [r for r in bd if r["scan"]["backdoored"]]
    ca_drop = [r["ca_before"] - r["ca_after"] for r in measured]
    asr_after = [r["asr_after"] for r in bd]
    alarms = [r["alarm"] for r in bd if r.get("alarm")]
    through = [a["asr_through_guard"] for a in alarms]
    causes = {r["name"]: leftover_cause(r) for r in bd}
    out = {
        "clean": len(clean),
        "backdoored": len(bd),
        "not_taken": sorted(r["name"] for r in rs if not r["taken"]),
        "auroc": round(auroc(neg, pos), 4) if neg and pos else None,
        "tpr_at_5pct_fpr": round(tpr_at_threshold(pos, threshold_at_fpr(neg, 0.05)), 4) if neg and pos else None,
        "verdict_tpr": round(len(detected) / len(bd), 4) if bd else None,
        "verdict_fpr": round(sum(r["scan"]["backdoored"] for r in clean) / len(clean), 4) if clean else None,
        "target_accuracy": round(sum(r["target_named"] for r in detected) / len(detected), 4) if detected else None,
        # the runtime alarm on each backdoored model's real trigger: the second line (docs/results.md#the-zoo)
        "alarm_auroc": lowest([a["auroc"] for a in alarms]),
        "alarm_tpr_at_1pct_fpr": lowest([a["tpr_at_1pct_fpr"] for a in alarms]),
        **spread(asr_after, ca_drop, through),
        "leftover": {cause.value: sorted(n for n, c in causes.items() if c is cause) for cause in Leftover},
    }
    return out


def write_report(work: Path, results: dict) -> None:
    from testbed.zoo_report import markdown, plots

    atomic.write_text(work / "results.json", json.dumps(results, indent=1))
    atomic.write_text(work / "results.md", markdown(results))
    for name, png in plots(results).items():
        atomic.write_bytes(work / name, png)
