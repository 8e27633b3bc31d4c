"""The bench: baselines, DER, the results files and plots, resuming, and bad input."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import load_benchmark, run_cli


def test_der_credits_asr_drops_and_charges_ca_drops():
    from cbpt.metrics import defense_effectiveness_rate as der

    assert der(0.99, 0.95, 0.97, 0.05) == pytest.approx((0.90 - 0.02 + 1) / 2)
    assert der(0.90, 0.50, 0.95, 0.80) == pytest.approx(0.5)  # ASR up, CA up: no credit either way
    assert der(0.90, 1.0, 0.90, 0.0) == pytest.approx(1.0)
    assert math.isnan(der(0.9, float("nan"), 0.9, float("nan")))


def test_one_seed_names_a_whole_cbpt_run(monkeypatch):
    """The bench's cbpt, a recorded purify and `purify --seed` seed the shot draw, the inversion
    and the tuning alike, from one `PurifyConfig.seeded`, so a shot set's figures can be redone."""
    import testbed.baselines
    from cbpt.data import ShotBudget
    from cbpt.purify import PurifyConfig

    base = PurifyConfig(budget=ShotBudget(8), routed_share=0.5)
    cfg = base.seeded(3)
    assert (cfg.seed, cfg.inversion.seed, cfg.tuning.seed) == (3, 3, 3)
    assert (cfg.budget, cfg.routed_share, cfg.inversion.steps) == (base.budget, 0.5, base.inversion.steps)
    seen = []
    monkeypatch.setattr(testbed.baselines, "cbpt", lambda clip, shots, c: seen.append(c))
    testbed.baselines.defend("cbpt", None, None, 3, base)
    assert seen == [cfg]


@pytest.fixture(scope="module")
def bench_results(mini_testbeds, tmp_path_factory):
    """A small real bench on the miniature testbeds: every method, a 2-point shots sweep."""
    from cbpt.inversion import InversionConfig
    from cbpt.purify import PurifyConfig
    from cbpt.tuning import TuningConfig
    from testbed.baselines import FinetuneConfig
    from testbed.bench import BenchConfig, run_bench

    root = tmp_path_factory.mktemp("bench")
    (root / "tb").mkdir()
    for attack, folder in mini_testbeds.items():
        (root / "tb" / f"shapes-{attack}").symlink_to(folder)
    cfg = BenchConfig(
        work=root / "work",
        testbeds=root / "tb",
        datasets=("shapes",),
        attacks=("none", "blended"),
        seeds=(0,),
        shots=8,
        sweep_shots=(2, 8),
        sweep_attacks=("blended",),
        purify=PurifyConfig(inversion=InversionConfig(steps=30, mask_restarts=1), tuning=TuningConfig(steps=30)),
        finetune=FinetuneConfig(steps=10, batch_size=32, eval_every=5),
    )
    calls = []
    results = run_bench(cfg, lambda stage, done, total: calls.append((stage, done, total)))
    return cfg, results, calls


def test_bench_writes_every_method_and_the_sweep(bench_results):
    cfg, results, calls = bench_results
    work = cfg.work
    table = {(r["attack"], r["method"]): r for r in results["table"]}
    assert set(table) == {
        (a, m) for a in ("none", "blended") for m in ("none", "finetune", "cleanclip", "prompt", "cbpt")
    }
    attacked = table[("blended", "none")]
    assert attacked["asr"] > 0.5 and attacked["der"] == pytest.approx(0.5)  # no defense changes nothing
    for m in ("finetune", "cleanclip", "prompt", "cbpt"):
        r = table[("blended", m)]
        assert 0 <= r["ca"] <= 1 and 0 <= r["asr"] <= 1 and 0 <= r["der"] <= 1 and r["seconds"] >= 0
        assert r["ca_before"] == pytest.approx(attacked["ca"])
    assert table[("none", "cbpt")]["asr"] is None and table[("none", "cbpt")]["der"] is None  # no trigger: n/a
    assert results["best_baseline"] in ("finetune", "cleanclip", "prompt")
    assert {(r["method"], r["shots"]) for r in results["sweep"]} == {
        (m, k) for m in ("cbpt", results["best_baseline"]) for k in (2, 8)
    }
    saved = json.loads((work / "results.json").read_text())
    assert saved["table"] == results["table"]
    md = (work / "results.md").read_text()
    assert "| blended |" in md and "(e) CBPT" in md and "Shots sweep" in md and "DER" in md
    for png in ("asr_vs_ca_shapes.png", "asr_by_attack_shapes.png", "shots_sweep.png"):
        assert (work / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("table", 10, 10) in calls


def test_cbpt_runs_measure_the_runtime_alarm_on_the_real_trigger(bench_results):
    cfg, results, _ = bench_results
    run = json.loads((cfg.work / "runs" / "shapes-blended" / "cbpt-k8-s0.json").read_text())
    alarm = run["info"]["alarm_eval"]
    # the same purified head and triggered images as the run's ASR, so the same ASR
    assert alarm["asr"] == pytest.approx(run["asr"], abs=1e-4)
    assert 0 <= alarm["asr_through_guard"] <= alarm["asr"]
    assert alarm["threshold"] == run["info"]["alarm"]["threshold"]
    assert 0 <= alarm["auroc"] <= 1 and alarm["n_clean"] > alarm["n_triggered"] > 0
    tuning = run["info"]["tuning"]  # what step 2 kept, beside the original head, for the zoo's records
    assert tuning["mode"] in ("full", "cautious", "skipped") and tuning["history"] == []
    if not tuning["kept_original"]:
        assert tuning["chosen_held_out"]["clean_acc"] >= 0 and tuning["best_step"] == run["info"]["best_step"]
    route = run["info"].get("route") or {}
    if route.get("target_gate") == "trigger-side":  # beside it, the same head gating every image given the target
        # that gate routes a superset of the images, so no more triggered ones keep the target
        assert run["info"]["gate_every"]["asr"] <= run["asr"] + 1e-9
    clean = json.loads((cfg.work / "runs" / "shapes-none" / "cbpt-k8-s0.json").read_text())
    assert "alarm_eval" not in clean["info"]  # no trigger to flag


def test_alarm_figures_on_hand_made_scores():
    from cbpt.metrics import alarm_evaluation

    clean = [0.1] * 98 + [0.5, 0.9]
    trig = [0.2, 0.6, 0.7, 0.95]
    a = alarm_evaluation(clean, trig, [True, True, False, True], threshold=0.55)
    assert a.tpr_at_threshold == 0.75 and a.fpr_at_threshold == 0.01
    assert a.asr == 0.75 and a.asr_through_guard == 0.25  # only the unflagged 0.2 gets through
    assert a.tpr_at_1pct_fpr == 0.75  # the 99th-percentile clean score is 0.5
    # 0.2 beats 98 clean, 0.6 and 0.7 beat 99, 0.95 beats all 100
    assert a.auroc == pytest.approx((98 + 99 + 99 + 100) / 400, abs=1e-4)


def test_bench_resumes_from_stored_runs(bench_results, monkeypatch):
    import testbed.bench
    from testbed.bench import run_bench

    cfg, results, _ = bench_results

    def fail(*a, **k):
        raise AssertionError("a stored run was measured again")

    monkeypatch.setattr(testbed.bench, "measure", fail)
    again = run_bench(cfg)
    assert again["table"] == results["table"]


def test_bench_refuses_unknown_names(capsys, tmp_path):
    code, _, err = run_cli(capsys, "bench", "--work", tmp_path / "w", "--attack", "badnett")
    assert code == 2 and "unknown or missing --attack: badnett" in err
    code, _, err = run_cli(capsys, "bench", "--work", tmp_path / "w", "--method", "magic")
    assert code == 2 and "--method" in err
    assert not (tmp_path / "w").exists()


def test_the_testbed_table_is_written_after_each_attack_and_keeps_other_rows(tmp_path):
    module = load_benchmark("testbed_table")
    table = tmp_path / "table-digits.json"
    module.store(table, [{"attack": "none", "ca": 0.9}, {"attack": "badnet", "ca": 0.8}])
    # a later call that rebuilds badnet and adds sig, stopped after sig: its rows replace, the rest stay
    module.store(table, [{"attack": "badnet", "ca": 0.7}])
    rows = module.store(table, [{"attack": "badnet", "ca": 0.7}, {"attack": "sig", "ca": 0.6}])
    stored = json.loads(table.read_text())
    assert stored == rows
    assert [(r["attack"], r["ca"]) for r in stored] == [("none", 0.9), ("badnet", 0.7), ("sig", 0.6)]


def test_the_testbed_table_reuses_a_folder_built_before_a_setting_was_added_only_at_its_default(tmp_path):
    from testbed.build import BuildConfig, config_dict

    module = load_benchmark("testbed_table")
    cfg = BuildConfig(attack="wanet")
    old = config_dict(cfg)
    del old["wanet_strength"]  # a folder written before the setting existed
    (tmp_path / "metrics.json").write_text(json.dumps({"ca": 0.9, "config": old}))
    assert module.stored(tmp_path, cfg)["ca"] == 0.9
    assert module.stored(tmp_path, BuildConfig(attack="wanet", wanet_strength=6.0)) is None
    assert module.stored(tmp_path, BuildConfig(attack="wanet", poison_rate=0.2)) is None


def test_a_replayed_selection_keeps_the_checkpoint_tuning_keeps(tmp_path):
    """benchmarks/selection_replay.py: full trajectories of every rung, replayed through the real
    selection, keep the checkpoint `tune` keeps, under the rule before judging, today's and two
    defined by the benchmark (ties, or shares within a band, to the checkpoint that kept the
    clean decisions), and where
    the route serves only some held-out shots."""
    import torch

    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt.tuning import FullAcceptance, Judging, Ladder, TuningConfig, TuningData, tune
    from tests.helpers import backdoored_features, save_tiny_model

    replay = load_benchmark("selection_replay")
    clip = load_clip(save_tiny_model(tmp_path / "m"))
    names = ("cat", "dog", "bird")
    with torch.no_grad():
        g0 = ClassPrompts(clip.model, clip.tokenizer(), names)()
    held = backdoored_features(g0, 2, 1)
    further = torch.nn.functional.normalize(held.triggered * 1.5 - held.triggered.mean(0) * 0.5, dim=-1)
    held = type(held)(
        held.clean,
        held.clean_labels,
        torch.cat([held.triggered, further]),
        held.triggered_labels.repeat(2),
        held.triggered_targets.repeat(2),
        held.centroids,
        0,
        torch.tensor([1.0] * 4 + [1.5] * 4),
    )
    routed = torch.tensor([True, False] * 3)  # the route serves half the held-out clean shots
    data = TuningData(backdoored_features(g0, 4, 0), held, g0, clip.logit_scale, routed)
    ladder = Ladder(rungs=((1.0, 3.0),), target_rate=0.0)  # always climbs: both rungs are weighed
    banded = replay.BandedJudging(band=0.5)
    for judging in (Judging(beyond=(), by_reach=False), Judging(beyond=(1.5,)), replay.KeptTies(), banded):
        cfg = TuningConfig(steps=30, eval_every=10, patience=1, alpha=0.0, ladder=ladder, judging=judging)
        kept = tune(ClassPrompts(clip.model, clip.tokenizer(), names), data, cfg, FullAcceptance())
        rec = {"attack": "badnet", "mode": "full", "rungs": [(cfg.alpha, cfg.margin), *ladder.rungs]}
        rec |= replay.trajectories(
            ClassPrompts(clip.model, clip.tokenizer(), names),
            data,
            cfg,
            FullAcceptance(),
            rec["rungs"],
            lambda g: {"ca": 0.0, "asr": 0.0},
            {"ca": 0.0, "asr": 0.0},
        )
        assert [len(t) for t in rec["trajectories"]] == [3, 3]  # every rung to its end, no early stop
        again = replay.replay(rec, replay.Rule(cfg))
        assert (again["rung"], again["step"]) == (kept.chosen.rung.index, kept.chosen.step)
    # the records hold both readings; purify's and the `served` rule read the head as served (the
    # accuracy capped by the tuned embeddings' everywhere reading), `everywhere` the tuned embeddings'
    late = rec["trajectories"][1][-1]
    assert late["served"]["clean_kl"] < late["clean_kl"]
    read = {r: replay._held_out(late, cfg.judging, 1.0, replay.RULES[r]) for r in ("served", "today", "everywhere")}
    assert read["served"].clean_kl == read["today"].clean_kl == late["served"]["clean_kl"]
    assert read["everywhere"].clean_kl == late["clean_kl"]
    assert read["today"].clean_acc == min(late["served"]["clean_acc"], late["clean_acc"] + 0.05)


def test_the_selection_oracle_keeps_the_lowest_asr_within_two_ca_points():
    """benchmarks/selection_replay.py --oracle: the bound any selection rule is read against. A
    drop of exactly 2 points is within; past it the lower ASR does not count; a clean model keeps
    its highest CA; with nothing within 2 points, the highest CA."""
    replay = load_benchmark("selection_replay")

    def rec(attack: str, *rungs: list[tuple[float, float]]) -> dict:
        trajectories = [
            [{"step": 10 * (j + 1), "test": {"ca": ca, "asr": asr}} for j, (ca, asr) in enumerate(r)] for r in rungs
        ]
        return {"attack": attack, "original": {"test": {"ca": 0.986, "asr": 0.95}}, "trajectories": trajectories}

    bd = rec("badnet", [(0.980, 0.30), (0.966, 0.05)], [(0.960, 0.00), (0.975, 0.10)])
    assert (replay.oracle(bd)["rung"], replay.oracle(bd)["step"]) == (0, 20)  # 0.986 - 0.966 is 2 points
    clean = rec("none", [(0.984, 0.0), (0.990, 0.0)])
    assert replay.oracle(clean)["ca"] == 0.990
    lost = rec("badnet", [(0.900, 0.0)])
    assert replay.oracle(lost)["rung"] is None  # the original prompts: the highest CA there is


def test_a_benchmarks_rows_are_written_as_they_come_and_read_back_instead_of_made_again(tmp_path):
    from testbed.resumable import ResumableRows

    made = []

    def make(key: str) -> dict:
        made.append(key)
        return {"asr": len(made) / 10}

    out = tmp_path / "rows.json"
    rows = ResumableRows.at(out)
    assert len(rows) == 0 and not out.exists()
    rows.ensure("bd001", lambda: make("bd001"))
    assert json.loads(out.read_text()) == {"bd001": {"asr": 0.1}}  # on disk before the next row is made
    rows.ensure("bd002", lambda: make("bd002"))
    again = ResumableRows.at(out)  # an interrupted run started again
    assert again.ensure("bd001", lambda: make("bd001 again")) == {"asr": 0.1} and "bd002" in again
    assert made == ["bd001", "bd002"] and dict(again.items()) == rows.rows
    assert not list(tmp_path.glob("*.tmp*"))  # written by rename, nothing half-written left beside it
    in_memory = ResumableRows.at(None)  # a run without --out: rows kept, nothing written
    assert in_memory.ensure("bd003", lambda: make("bd003")) == {"asr": 0.3} and "bd003" in in_memory


def test_the_cbpt_table_prints_from_its_stored_runs_list_shaped_ones_included(tmp_path, monkeypatch, capsys):
    """benchmarks/cbpt_table.py: runs stored before they were keyed (a list) are read back by
    testbed, K, held-out shots and shot set, and a finished table prints without a purify."""
    table = load_benchmark("cbpt_table")
    tb = tmp_path / "shapes-badnet"
    tb.mkdir()
    (tb / "metrics.json").write_text(json.dumps({"dataset": "shapes", "attack": "badnet", "target": 3}))

    def run(seed: int, asr: float) -> dict:
        scan = {"backdoored": True, "target_index": 3 if seed else 1}
        return {
            "testbed": tb.name, "dataset": "shapes", "attack": "badnet", "method": "cbpt", "shots": 16,
            "seed": seed, "ca": 0.97, "asr": asr, "ra": 0.9, "ca_before": 0.98, "asr_before": 1.0,
            "der": 0.9, "seconds": 100.0, "info": {"scan": scan},
        }  # fmt: skip

    out = tmp_path / "runs.json"
    out.write_text(json.dumps([run(0, 0.010), run(1, 0.030)]))
    runs = table.stored_runs(out)
    assert sorted(runs.rows) == ["shapes-badnet/k16-h4-s0", "shapes-badnet/k16-h4-s1"]
    monkeypatch.setattr(table, "measure", lambda *a, **k: pytest.fail("a stored run was measured again"))
    monkeypatch.setattr("sys.argv", ["cbpt_table", str(tb), "--seeds", "0", "1", "--out", str(out)])
    table.main()
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row == "| shapes-badnet | 0.980 | 1.000 | 0.970 | 0.020 (0.030) | 0.900 | 100 | " + (
        "2/2 backdoored, target named 1 |"
    )
    assert isinstance(json.loads(out.read_text()), list)  # reading rewrites nothing


def test_the_cbpt_tables_detail_rows_read_the_guard_push_off_and_planted_target_from_stored_runs():
    """benchmarks/cbpt_table.py --detail (the issue-19 write-up's table): the lowest CA, attack
    success through a rejecting guard, the shot sets where push-off opened with the copies'
    distance range, and the target named against `metrics.json`'s planted one, not class 0."""
    table = load_benchmark("cbpt_table")

    nan = float("nan")

    def run(ca: float, asr: float, guard: float | None, away: float, apart: list, target: int, s: float) -> object:
        flagged = asr == asr  # the clean model's runs (ASR nan) read clean
        info = {"scan": {"backdoored": flagged, "target_index": target}, "tuning": {"away": away, "apart": apart}}
        if guard is not None:
            info["alarm_eval"] = {"asr_through_guard": guard}
        return table._run(
            {"testbed": "x", "dataset": "shapes", "attack": "sig", "method": "cbpt", "shots": 16, "seed": 0,
             "ca": ca, "asr": asr, "ra": 0.5 if flagged else nan, "ca_before": 0.98,
             "asr_before": 1.0 if flagged else nan, "der": 0.9, "seconds": s, "info": info}
        )  # fmt: skip

    runs = [
        run(0.97, 0.0, 0.0, 2.0, [8.5], 3, 101.0),
        run(0.95, 0.02, 0.004, 0.0, [3.4], 3, 120.4),
        run(0.96, 0.01, 0.002, 2.0, [], 1, 99.6),
    ]
    planted = {"attack": "sig", "target": 3}
    row = table.detail_line("vit-sig", runs, planted)
    assert row == (
        "| vit-sig | 0.980 -> 0.960 (0.950) | 1.000 -> 0.010 (0.020) | 0.500 | 0.002 (0.004) | 2 of 3 (3.4-8.5) | "
        "3/3 backdoored, target named 2 | 100-120 |"
    )
    assert row.count("|") == table.detail_table()[0].count("|")
    unscored = [run(0.97, 0.0, None, 0.0, [], 3, 100.0)]  # a run stored before the alarm was scored
    assert "| 0.500 | – | 0 of 1 |" in table.detail_line("old", unscored, planted)
    clean = [run(0.98, nan, None, 0.0, [], 3, 100.0), run(0.97, nan, None, 0.0, [], 3, 100.0)]
    assert table.detail_line("vit-none", clean, {"attack": "none", "target": 0}) == (
        "| vit-none | 0.980 -> 0.975 (0.970) | – | – | – | 0 of 2 | 0/2 backdoored | 100-100 |"
    )


def test_the_cbpt_tables_pooled_line_reads_builds_of_one_row_against_the_targets():
    """benchmarks/cbpt_table.py --pooled: several builds of one row, each with its shot sets, read
    against issue 19's targets (a build's mean ASR <= 2%, every purify <= 5%, CA within 2 points)."""
    table = load_benchmark("cbpt_table")

    def run(ca: float, asr: float) -> object:
        return table._run(
            {"testbed": "x", "dataset": "shapes", "attack": "sig", "method": "cbpt", "shots": 16, "seed": 0,
             "ca": ca, "asr": asr, "ra": 0.5, "ca_before": 0.98, "asr_before": 1.0, "der": 0.9, "seconds": 1.0,
             "info": {}}
        )  # fmt: skip

    builds = [[run(0.97, 0.000), run(0.955, 0.020)], [run(0.975, 0.000), run(0.96, 0.060)]]
    assert table.pooled_line(builds) == (
        "| 2 builds x 2 shot sets | ASR after mean 0.020, worst 0.060; <= 5% on 3 of 4 | "
        "builds' mean ASR <= 2% on 1 of 2 | CA cost mean 1.5, worst 2.5 points; within 2 on 3 of 4 |"
    )


def test_the_compact_family_lever_tunes_against_every_flipping_compact_mask_once_one_stands_in():
    """benchmarks/oracle_trigger.py `compact-family` (docs/results.md#compact-masks-standing-in-together-not-kept):
    where one compact mask stands in (it pulls as hard as the per-pixel masks), the others at the
    target that flip as many shots join it, pulling less or not; one that flips too few or aims
    elsewhere does not; and where none stands in, the plan is left as it is."""
    from cbpt.inversion import Search
    from cbpt.purify import PurifyConfig, plan_tuning
    from cbpt.scan import read_scan
    from tests.helpers import fake_inversion

    oracle = load_benchmark("oracle_trigger")

    def levered(*probes: tuple) -> tuple[list, list]:
        inv = fake_inversion([("mask", 5, 1.0, 0.3), ("mask", 5, 0.9, 0.2), ("warp", 4, 0.7, -0.2), *probes], 0.9)
        plan = plan_tuning(read_scan(inv), inv, PurifyConfig(), held_out=True)
        r1 = oracle.Round1(None, None, inv, plan, None, None, 5)

        def read(triggers: list) -> list:
            return [(c.search, c.flip_rate) for c in triggers]

        return read(plan.triggers), read(oracle.compact_family(r1))

    pulls, flips_less_pull = ("mask", 5, 0.95, 0.4, True), ("mask", 5, 0.93, 0.1, True)
    weak, elsewhere = ("mask", 5, 0.85, 0.4, True), ("mask", 3, 1.0, 0.4, True)
    plan, family = levered(pulls, flips_less_pull, weak, elsewhere)
    assert plan == [(Search.COMPACT, 0.95)]
    assert family == [(Search.COMPACT, 0.95), (Search.COMPACT, 0.93)]
    plan, family = levered(flips_less_pull, weak)  # none stands in: the per-pixel masks, as planned
    assert family == plan == [(Search.RESTART, 1.0), (Search.RESTART, 0.9)]


def test_other_alarm_scores_read_what_a_rejecting_guard_lets_through_at_both_thresholds():
    """benchmarks/alarm_scores.py (docs/results.md#other-alarm-scores-not-kept): "through" counts
    the triggered images the head gives the target that score at or under the threshold, once as
    calibrated on the clean calibration scores and once at the test's own 1% FPR; purify's
    step-2 data is kept only inside `kept_step2`."""
    import numpy as np

    import cbpt.purify

    scores = load_benchmark("alarm_scores")
    clean = np.linspace(0.0, 0.5, 200)  # the test's 1% FPR threshold: its 198th value
    triggered = np.array([0.2, 0.45, 0.6, 0.9])
    hit = np.array([True, True, True, False])
    read = scores.read_score(clean, triggered, hit, calibration=np.array([0.1, 0.3]))
    assert read["fpr"] == pytest.approx(0.4, abs=0.01) and read["through"] == 0.25  # 0.2 lets by; 0.45, 0.6 flagged
    assert read["through_at_1pct"] == 0.5 and read["tpr_at_1pct"] == 0.5  # 0.2 and 0.45 let by
    assert read["auroc"] == 0.825  # 0.2 beats 80 of the 200 clean scores, 0.45 180, the others all
    bank = scores.Bank(np.eye(3)[:1], np.eye(3)[1:2], np.eye(3)[2:])
    x = np.array([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8]])
    assert np.allclose(scores.SCORES["copy-minus-shot"](bank, x), [0.6, -0.2])
    assert np.allclose(scores.SCORES["centres"](bank, x), [0.8, 0.0])
    tune = cbpt.purify.tune_routed
    with scores.kept_step2() as kept:
        assert cbpt.purify.tune_routed is not tune and kept == {}
    assert cbpt.purify.tune_routed is tune


def test_the_head_bound_picks_a_setting_as_purifys_held_out_check_would():
    """benchmarks/head_bound.py `--check-shots` (docs/results.md#what-the-shipped-head-could-hold-this-version):
    of the settings that keep the check's clean accuracy within one image of the original's, the
    one sending fewest check copies to the target, ties to the higher clean accuracy; none when
    every setting loses more; both goals are ASR <= 2% with CA within 2 points."""
    bound = load_benchmark("head_bound")

    def row(alpha, check_ca, check_asr, ca=0.97, asr=0.01):
        return {"alpha": alpha, "check_ca": check_ca, "check_asr": check_asr, "ca": ca, "asr": asr}

    record = {"check_ca_before": 0.95, "check_images": 40, "ca_before": 0.98}
    record["routed_grid"] = [
        row(0.1, 0.95, 0.10),
        row(0.5, 0.925, 0.02, asr=0.03),  # one image lost: allowed
        row(1.0, 0.90, 0.00),  # two images lost: refused, though it reaches least
        row(0.25, 0.95, 0.02),  # as few copies as 0.5, more clean accuracy: kept
    ]
    picked = bound.checked_pick(record)
    assert picked["alpha"] == 0.25
    assert bound.both_goals(record, picked)
    assert not bound.both_goals(record, record["routed_grid"][1])  # ASR 3%
    assert not bound.both_goals(record, row(0.1, 0.95, 0.0, ca=0.955))  # 2.5 CA points
    record["routed_grid"] = [row(1.0, 0.90, 0.0)]
    assert bound.checked_pick(record) is None
