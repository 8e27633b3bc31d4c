"""`cbpt-guard bench`: attacks x defenses on the testbed, with a shots sweep.

Every (dataset, attack, method, shots, seed) run is scored on the testbed's test split by
the same code as `testbed eval`, and stored as one JSON file under `WORK/runs/`, so an
interrupted bench resumes where it stopped. `results.json`, `results.md` and the PNG plots
are then written from all stored runs.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cbpt.purify import PurifyConfig
from cbpt.runtime import Runtime
from cbpt_guard import TOOL, atomic
from cbpt_guard.artifacts import CLASSES
from cbpt_guard.errors import UsageError
from testbed.baselines import METHODS, Defended, FinetuneConfig
from testbed.datasets import DATASETS, TEN_CLASS
from testbed.triggers import ATTACKS as TRIGGERS

if TYPE_CHECKING:
    import torch

    from cbpt.data import Shots
    from cbpt.inversion import InversionResult
    from cbpt.model import LoadedClip
    from cbpt_guard.routing import Route
    from testbed.evaluate import BackdoorEval, SplitFeatures

ATTACKS = ("none", *TRIGGERS)  # "none": the clean model


@dataclass(frozen=True)
class BenchConfig:
    work: Path
    testbeds: Path | None = None  # built testbeds (DATASET-ATTACK/); default WORK/testbed
    datasets: tuple[str, ...] = TEN_CLASS
    attacks: tuple[str, ...] = ATTACKS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    shots: int = 16
    sweep_shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    sweep_attacks: tuple[str, ...] = ("badnet", "blended")  # on the first dataset
    sweep_seeds: tuple[int, ...] | None = None  # default: `seeds`
    fresh: bool = False
    purify: PurifyConfig = field(default_factory=PurifyConfig)  # CBPT; (d) shares its tuning part
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # (b) and (c)
    runtime: Runtime = field(default_factory=Runtime)  # where testbeds are built and defenses run

    @classmethod
    def quick(cls, work: Path, testbeds: Path | None = None) -> BenchConfig:
        """A minutes-long subset: shapes, the clean model and badnet, one shot set."""
        return cls(
            work=work,
            testbeds=testbeds,
            datasets=("shapes",),
            attacks=("none", "badnet"),
            seeds=(0,),
            sweep_shots=(1, 4, 16),
            sweep_attacks=("badnet",),
        )

    def check(self) -> None:
        for name, given, known in (
            ("dataset", self.datasets, DATASETS),
            ("attack", self.attacks, ATTACKS),
            ("method", self.methods, METHODS),
        ):
            unknown = [g for g in given if g not in known]
            if unknown or not given:
                raise UsageError(
                    f"unknown or missing --{name}: {', '.join(unknown) or '(none)'}", f"choose from {', '.join(known)}"
                )
        if self.shots < 1 or any(k < 1 for k in self.sweep_shots):
            raise UsageError("shots must be at least 1", "pass --shots 16")
        if not self.seeds:
            raise UsageError("pass at least one --seed", "e.g. --seed 0 --seed 1 --seed 2")


@dataclass
class Run:
    dataset: str
    attack: str
    method: str
    shots: int
    seed: int
    ca: float
    asr: float
    ra: float
    ca_before: float
    asr_before: float
    der: float
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return run_key(self.dataset, self.attack, self.method, self.shots, self.seed)


def run_key(dataset: str, attack: str, method: str, shots: int, seed: int) -> str:
    return f"{dataset}-{attack}/{method}-k{shots}-s{seed}"


def testbed_dir(cfg: BenchConfig, dataset: str, attack: str) -> Path:
    return (cfg.testbeds or cfg.work / "testbed") / f"{dataset}-{attack}"


def ensure_testbed(cfg: BenchConfig, dataset: str, attack: str, progress) -> Path:
    """Reuse a built testbed, or build it (clean pretraining is cached across builds)."""
    from testbed.build import BuildConfig, build, default_cache_dir, write

    tb = testbed_dir(cfg, dataset, attack)
    if not (tb / "metrics.json").is_file():
        bcfg = BuildConfig(dataset=dataset, attack=attack)
        write(build(bcfg, cache=default_cache_dir(), progress=progress, device=cfg.runtime.device), bcfg, tb)
    return tb


def planned(cfg: BenchConfig) -> list[tuple[str, str, str, int, int]]:
    """The main table's runs: every dataset x attack x method x seed at `shots`."""
    return [(d, a, m, cfg.shots, s) for d in cfg.datasets for a in cfg.attacks for m in cfg.methods for s in cfg.seeds]


@dataclass
class OnTestbed:
    """One defense run on a testbed, in the test split's class order: what `measure` scores,
    and what a benchmark that looks inside the head (benchmarks/leftover.py) reads."""

    feats: SplitFeatures  # the test split through the model the head is applied to
    before: BackdoorEval  # the original prompts' head
    head: torch.Tensor  # [C, D] the defended head
    route: Route | None  # where `head` answers (None: everywhere)
    defended: Defended
    seconds: float  # the defense's wall time


@dataclass(frozen=True)
class Scanned:
    """A testbed's model with one shot set drawn and scanned, its test split encoded: what the
    step-2 studies (benchmarks/oracle_trigger.py, selection_replay.py) start from."""

    clip: LoadedClip
    shots: Shots
    feats: SplitFeatures
    rows: list[int]  # the shot set's class order -> the testbed's
    original: torch.Tensor  # [C, D] the original prompts' head
    inversion: InversionResult


def scan_testbed(tb: Path, cfg: PurifyConfig) -> Scanned:
    """Draw `cfg`'s shot set of the testbed `tb` and scan its model (`cfg.inversion`)."""
    from cbpt.data import load_shots
    from cbpt.model import load_clip
    from cbpt.purify import original_head
    from cbpt.scan import run_scan
    from testbed.evaluate import class_order, encode_test_split

    clip = load_clip(tb / "model.pt")
    shots = load_shots(clip, tb / "fewshot", tb / CLASSES, cfg.budget, cfg.seed)
    original = original_head(clip, shots.classnames)
    return Scanned(
        clip,
        shots,
        encode_test_split(clip, tb),
        class_order(list(shots.classnames), tb),
        original,
        run_scan(clip, shots, cfg.inversion, original),
    )


def defend_on_testbed(
    tb: Path,
    method: str,
    shots: int,
    seed: int,
    purify: PurifyConfig = PurifyConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
    runtime: Runtime | None = None,
) -> OnTestbed:
    from cbpt.data import load_shots
    from cbpt.model import load_clip
    from testbed.baselines import defend
    from testbed.evaluate import align_classes, class_order, encode_test_split, score_head

    clip = load_clip(tb / "model.pt", runtime=runtime)
    shot_set = load_shots(clip, tb / "fewshot", tb / CLASSES, replace(purify.budget, shots=shots), seed)
    names = list(shot_set.classnames)
    feats = encode_test_split(clip, tb)  # the test split through the model, once for every head on it
    before = score_head(feats, align_classes(defend("none", clip, shot_set, seed).weights, names, tb))
    t0 = time.perf_counter()
    d = defend(method, clip, shot_set, seed, purify, finetune)
    seconds = time.perf_counter() - t0
    rows = class_order(names, tb)
    if d.model is not clip.model:  # a defense that fine-tuned the model sees the split anew
        feats = encode_test_split(replace(clip, model=d.model), tb)
    route = None if d.route is None else d.route.reordered(rows)
    return OnTestbed(feats, before, d.weights[rows], route, d, seconds)


def measure(
    tb: Path,
    dataset: str,
    attack: str,
    method: str,
    shots: int,
    seed: int,
    purify: PurifyConfig = PurifyConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
    runtime: Runtime | None = None,
) -> Run:
    from cbpt.metrics import defense_effectiveness_rate
    from testbed.evaluate import evaluate_alarm, score_head

    on = defend_on_testbed(tb, method, shots, seed, purify, finetune, runtime)
    feats, before, d = on.feats, on.before, on.defended
    after = score_head(feats, on.head, on.route)
    nan = float("nan")
    attacked = attack != "none"  # a clean model has no trigger: ASR, RA and DER do not apply
    info = d.info
    if attacked and d.alarm_centres is not None:  # the second line: the runtime alarm on the real trigger
        alarm = evaluate_alarm(feats, on.head, d.alarm_centres, d.info["alarm"]["threshold"], on.route)
        info = {**info, "alarm_eval": None if alarm is None else asdict(alarm)}
    if on.route is not None and on.route.side is not None:  # the same head gating every image given the target
        every = score_head(feats, on.head, on.route.every_assigned())
        info = {**info, "gate_every": {"ca": every.ca, "asr": every.asr if attacked else None}}
    return Run(
        dataset=dataset,
        attack=attack,
        method=method,
        shots=shots,
        seed=seed,
        ca=after.ca,
        asr=after.asr if attacked else nan,
        ra=after.ra if attacked else nan,
        ca_before=before.ca,
        asr_before=before.asr if attacked else nan,
        der=defense_effectiveness_rate(before.ca, before.asr, after.ca, after.asr) if attacked else nan,
        seconds=round(on.seconds, 2),
        info=info,
    )


def _stored(cfg: BenchConfig, key: str) -> Run | None:
    path = cfg.work / "runs" / f"{key}.json"
    if cfg.fresh or not path.is_file():
        return None
    return Run(**json.loads(path.read_text()))


def _nan_to_none(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _run_all(
    cfg: BenchConfig,
    todo: list[tuple[str, str, str, int, int]],
    runs: dict[str, Run],
    progress: Callable[[str, int, int], None],
    label: str,
) -> None:
    for i, (d, a, m, k, s) in enumerate(todo):
        key = run_key(d, a, m, k, s)
        if key not in runs:
            run = _stored(cfg, key)
            if run is None:
                run = measure(ensure_testbed(cfg, d, a, progress), d, a, m, k, s, cfg.purify, cfg.finetune, cfg.runtime)
                atomic.write_text(cfg.work / "runs" / f"{key}.json", json.dumps(_nan_to_none(asdict(run)), indent=1))
            runs[key] = run
        progress(label, i + 1, len(todo))


def run_bench(cfg: BenchConfig, progress: Callable[[str, int, int], None] = lambda *_: None) -> dict:
    cfg.check()
    t0 = time.perf_counter()
    runs: dict[str, Run] = {}
    _run_all(cfg, planned(cfg), runs, progress, "table")
    table = aggregate(list(runs.values()))
    best = best_baseline(table, cfg.methods)
    sweep_methods = [m for m in ("cbpt", best) if m in cfg.methods and m is not None]
    sweep = [
        (cfg.datasets[0], a, m, k, s)
        for a in cfg.sweep_attacks
        if a in cfg.attacks
        for m in sweep_methods
        for k in cfg.sweep_shots
        for s in (cfg.sweep_seeds or cfg.seeds)
    ]
    _run_all(cfg, sweep, runs, progress, "shots sweep")
    sweep_rows = aggregate([runs[run_key(*x)] for x in sweep])
    results = {
        "tool": TOOL,
        "config": _nan_to_none(json.loads(json.dumps(asdict(cfg), default=str))),
        "best_baseline": best,
        "table": _nan_to_none(table),
        "sweep": _nan_to_none(sweep_rows),
        "runs": [_nan_to_none(asdict(r)) for r in runs.values()],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_results(cfg.work, results)
    return results


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return statistics.mean(xs) if xs else float("nan")


def aggregate(runs: list[Run]) -> list[dict]:
    """Mean over seeds per (dataset, attack, method, shots); the worst ASR too."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.dataset, r.attack, r.method, r.shots), []).append(r)
    rows = []
    for (d, a, m, k), rs in groups.items():
        asr = [r.asr for r in rs if r.asr is not None and r.asr == r.asr]
        rows.append(
            {
                "dataset": d,
                "attack": a,
                "method": m,
                "shots": k,
                "seeds": len(rs),
                "ca": _mean([r.ca for r in rs]),
                "asr": _mean(asr),
                "asr_max": max(asr) if asr else float("nan"),
                "ra": _mean([r.ra for r in rs]),
                "ca_before": _mean([r.ca_before for r in rs]),
                "asr_before": _mean([r.asr_before for r in rs]),
                "der": _mean([r.der for r in rs]),
                "seconds": _mean([r.seconds for r in rs]),
            }
        )
    return rows


def best_baseline(table: list[dict], methods: tuple[str, ...]) -> str | None:
    """The baseline (b-d) with the highest mean DER over every attacked testbed."""
    scores = {m: _mean([r["der"] for r in table if r["method"] == m]) for m in methods if m not in ("none", "cbpt")}
    scores = {m: s for m, s in scores.items() if s == s}
    return max(scores, key=scores.get) if scores else None


def write_results(work: Path, results: dict) -> None:
    from testbed.bench_report import plots, results_markdown

    atomic.write_text(work / "results.json", json.dumps(results, indent=1))
    atomic.write_text(work / "results.md", results_markdown(results))
    for name, png in plots(results).items():
        atomic.write_bytes(work / name, png)
