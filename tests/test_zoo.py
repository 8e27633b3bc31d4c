"""The model zoo: attacks drawn from a seed, a miniature zoo that resumes, and its figures."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from testbed.zoo import FAMILIES, Part, Scope, ZooConfig, check_shots, draw_attack, interleaved, plan, summarise


def test_attacks_are_drawn_from_the_seed_across_every_family_and_setting():
    rng = np.random.default_rng(0)
    specs = [draw_attack(rng, 10, (0.005, 0.10)) for _ in range(400)]
    again = [draw_attack(np.random.default_rng(0), 10, (0.005, 0.10))]
    assert again[0] == specs[0]
    assert {s.family for s in specs} == set(FAMILIES)
    assert {s.target for s in specs} == set(range(10))
    rates = [s.poison_rate for s in specs]
    assert 0.005 <= min(rates) < 0.01 and 0.05 < max(rates) <= 0.10
    patches = [s for s in specs if "size" in s.params]
    assert {s.params["size"] for s in patches} == set(range(3, 9))
    assert {s.params["location"] for s in specs if "location" in s.params} == {"random", "center", "corner"}
    assert all(0.1 <= s.params["alpha"] <= 0.3 for s in specs if s.family in ("blended", "custom-blend"))


def test_the_plan_has_every_snapshot_clean_and_alternates_fit_and_report(tmp_path):
    cfg = ZooConfig(work=tmp_path, backdoored=6)
    entries = plan(cfg)
    clean = [e for e in entries if e.attack is None]
    assert len(clean) == 2 * 2 * 4 and len(entries) == 16 + 6  # datasets x seeds x snapshots, + attacks
    assert len({e.name for e in entries}) == len(entries)
    assert [e.part for e in entries[:4]] == ["fit", "report", "fit", "report"]
    assert plan(cfg) == entries  # the zoo is its seed
    # measured clean and backdoored in turn, so a zoo stopped part-way has both
    kinds = [e.attack is None for e in interleaved(entries)]
    assert kinds[:12] == [True, False] * 6 and sorted(interleaved(entries), key=entries.index) == entries


def test_a_scope_picks_entries_without_changing_the_plan_and_shots_are_checked_against_its_pools(tmp_path):
    cfg = ZooConfig(work=tmp_path, backdoored=12, shots=32)
    entries = plan(cfg)
    shapes_fit = [e for e in entries if Scope(Part.FIT, ("shapes",)).covers(e)]
    assert shapes_fit and all(e.part == "fit" and e.base.dataset == "shapes" for e in shapes_fit)
    assert shapes_fit == [e for e in entries if e.part == "fit" and e.base.dataset == "shapes"]
    assert all(Scope().covers(e) for e in entries)
    # digits keep 20 images per class for the defender, shapes 32: K = 32 fits shapes alone
    with pytest.raises(ValueError, match=r"--shots 32 is more than the few-shot pool of digits \(20 images per"):
        check_shots(cfg, Scope())
    check_shots(cfg, Scope(datasets=("shapes",)))
    check_shots(ZooConfig(work=tmp_path, shots=20), Scope())


def _record(name, kind, suspicion, part="report", named=True, asr_after=0.0, drop=0.0, taken=True, reach=0.0):
    return {
        # step 2's kept checkpoint: tuned as for a found backdoor where the scan read one
        "tuning": {"mode": "full" if suspicion >= 1 else "cautious", "chosen_held_out": {"to_target": reach}},
        "name": name,
        "part": part,
        "kind": kind,
        "taken": taken,
        "scan": {"suspicion": suspicion, "backdoored": suspicion >= 1},
        "target_named": named if kind == "backdoored" else None,
        "ca_before": 0.9,
        "ca_after": 0.9 - drop,
        "asr_after": asr_after if kind == "backdoored" else None,
        # the alarm lets through a tenth of what the purified head still sends to the target
        "alarm": {"auroc": 1 - asr_after, "tpr_at_1pct_fpr": 0.9, "asr_through_guard": asr_after / 10}
        if kind == "backdoored"
        else None,
    }


def test_the_summary_gives_the_scans_roc_and_cbpts_spread():
    records = [_record(f"c{i}", "clean", s) for i, s in enumerate([0.2, 0.3, 0.5, 0.9, 1.2])] + [
        _record("b0", "backdoored", 0.4, asr_after=0.5),
        _record("b1", "backdoored", 1.1, named=False, asr_after=0.01),
        _record("b2", "backdoored", 1.5, asr_after=0.0, drop=0.05),
        _record("b3", "backdoored", 2.0, asr_after=0.02, drop=0.02),  # 2 points is within 2 points
        _record("b4", "backdoored", 0.1, taken=False),
        _record("b5", "backdoored", 3.0, part="fit"),
        _record("b6", "backdoored", 1.2, part="fit", asr_after=0.3),  # held-out inverted-trigger shots cleared
        _record("b7", "backdoored", 1.3, part="fit", asr_after=0.1, reach=0.2),
    ]
    s = summarise(records, "report")
    assert (s["clean"], s["backdoored"], s["not_taken"]) == (5, 4, ["b4"])
    # 4 x 5 pairs: 0.4 beats 2 clean scores, 1.1 beats 4, 1.5 and 2.0 beat all 5
    assert s["auroc"] == pytest.approx((2 + 4 + 5 + 5) / 20)
    assert s["verdict_tpr"] == 0.75 and s["verdict_fpr"] == 0.2
    assert s["target_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["asr_after"]["worst"] == 0.5 and s["asr_after"]["median"] == pytest.approx(0.015)
    assert s["asr_after_le_2pct"] == 0.75 and s["ca_within_2pt"] == pytest.approx(8 / 9, abs=1e-4)
    assert s["asr_after_le_5pct"] == 0.75
    assert s["alarm_auroc"] == {"median": pytest.approx(0.985), "lowest": 0.5}  # of 0.5, 0.99, 1, 0.98
    assert s["asr_through_guard"]["worst"] == 0.05 and s["through_guard_le_1pct"] == 0.75
    assert summarise(records, "all")["backdoored"] == 7
    # where the ASR above 2% was decided: the scan missed b0; b6's held-out shots were cleared of
    # the inverted triggers so no stronger rung was tried; b7's still reached the target
    assert s["leftover"] == {"missed": ["b0"], "settled": [], "still reaching": []}
    assert summarise(records, "fit")["leftover"] == {"missed": [], "settled": ["b6"], "still reaching": ["b7"]}


def test_the_zoo_history_counts_each_part_and_tells_the_same_builds_from_rebuilt_ones(tmp_path):
    """benchmarks/zoo_history.py (docs/results.md#the-zoos-history): rows of records that measured
    the same builds share a fingerprint, a build that measured other figures changes it."""
    from tests.helpers import load_benchmark

    history = load_benchmark("zoo_history")

    def built(r: dict, ca: float = 0.95) -> dict:
        return r | {"testbed": {"ca": ca, "asr": None if r["kind"] == "clean" else 0.99}}

    before = [built(_record("c0", "clean", 0.2)), built(_record("b0", "backdoored", 1.5, asr_after=0.1, drop=0.03))]
    after = [built(_record("c0", "clean", 0.2)), built(_record("b0", "backdoored", 1.5, asr_after=0.01))]
    rebuilt = [after[0], built(_record("b0", "backdoored", 1.5, asr_after=0.01), ca=0.96)]
    paths = []
    for i, records in enumerate((before, after, rebuilt)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps({"records": records}))
    rows = history.table([(f"r{i}", "", ("report",), p) for i, p in enumerate(paths)]).splitlines()[2:]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[5:9] for c in cells] == [
        ["0 of 1", "0 of 1", "1 of 2", "1 of 1"],  # ASR 0.1: neither bar; CA lost 3 points on b0
        ["1 of 1", "1 of 1", "2 of 2", "1 of 1"],
        ["1 of 1", "1 of 1", "2 of 2", "1 of 1"],
    ]
    assert cells[0][3] == cells[1][3] != cells[2][3]


def test_a_miniature_zoo_builds_measures_and_resumes_without_redoing_anything(tmp_path, monkeypatch):
    from cbpt.inversion import InversionConfig, WarpSearch
    from cbpt.purify import PurifyConfig
    from cbpt.tuning import TuningConfig
    from cbpt_guard import locks
    from testbed import zoo as zoo_module
    from tests.helpers import mini_build_config

    mini = mini_build_config("none")
    cfg = ZooConfig(
        work=tmp_path / "zoo",
        datasets=("shapes",),
        pretrain_seeds=(0,),
        pretrain_steps=10,
        snapshots=(10,),
        backdoored=1,
        finetune_steps=5,
        sizes=(128, 16, 4),
        model_cfg=mini.model_cfg,
        batch_size=32,
        purify=PurifyConfig(
            inversion=InversionConfig(steps=10, mask_restarts=1, warp=WarpSearch(restarts=0, probes=0)),
            tuning=TuningConfig(steps=5),
        ),
    )
    with pytest.raises(ValueError, match=r"--shots 17 is more than the few-shot pool of shapes \(16 images"):
        zoo_module.run_zoo(replace(cfg, shots=17))
    assert not cfg.work.exists()  # refused before any work
    assert zoo_module.run_zoo(cfg, limit=0)["records"] == []  # --limit 0: nothing new measured
    # one part only: the fit part's clean model, not the report part's backdoored one
    first = zoo_module.run_zoo(cfg, limit=5, scope=Scope(Part.FIT))
    assert len(first["records"]) == 1 and first["planned"] == 2
    rec = first["records"][0]
    assert rec["kind"] == "clean" and rec["part"] == "fit" and rec["taken"] and "suspicion" in rec["scan"]
    # every candidate is stored, so the scan's rules can be refitted without scanning again
    assert [c["kind"] for c in rec["scan"]["candidates"] if not c["probe"]] == ["mask"]
    stats = {"target", "flip_rate", "mask_l1", "over_alignment", "typicality", "shape_flip"}
    assert stats <= set(rec["scan"]["candidates"][0])
    assert (cfg.work / "bases" / "shapes-s0-10.pt").is_file() and (cfg.work / "runs" / f"{rec['name']}.json").is_file()
    # the record names the builds its figures rest on
    from cbpt_guard.artifacts import sha256_file

    assert rec["sha256"] == {
        "base": sha256_file(cfg.work / "bases" / "shapes-s0-10.pt"),
        "model": sha256_file(cfg.work / "models" / rec["name"] / "model.pt"),
    }
    import torch

    assert rec["trained_with"]["base"]["threads"] == torch.get_num_threads()  # a clean model: the base alone
    assert rec["trained_with"]["model"] is None
    stored = (cfg.work / "runs" / f"{rec['name']}.json").read_text()

    # another worker holding the backdoored model's claim: this one leaves it to them
    bd_entry = [e for e in zoo_module.plan(cfg) if e.attack is not None][0]
    with locks.claim(cfg.work / "claims" / f"{bd_entry.name}.lock") as held:
        assert held
        assert len(zoo_module.run_zoo(cfg)["records"]) == 1
        assert not (cfg.work / "models" / bd_entry.name).exists()

    # two workers (one spawned) left with one model: it is measured once, the report has both
    second = zoo_module.run_workers(cfg, workers=2)
    assert len(second["records"]) == 2
    bd = second["records"][1]
    assert bd["kind"] == "backdoored" and bd["attack"]["family"] in FAMILIES
    meta = json.loads((cfg.work / "models" / bd["name"] / "metrics.json").read_text())
    assert meta["zoo"]["attack"] == bd["attack"] and meta["poison_rate"] == bd["attack"]["poison_rate"]
    assert bd["taken"] == (meta["asr"] >= cfg.min_asr)
    assert bd["trained_with"]["model"]["threads"] == 1 and bd["trained_with"]["model"] == meta["trained_with"]
    assert (cfg.work / "runs" / f"{rec['name']}.json").read_text() == stored  # not measured again

    # a third run measures nothing: every step is read back
    def nothing_again(*a, **k):
        raise AssertionError("rebuilt or re-measured")

    monkeypatch.setattr(zoo_module.Zoo, "ensure_model", nothing_again)
    monkeypatch.setattr(zoo_module.Zoo, "pretrain", nothing_again)
    third = zoo_module.run_zoo(cfg)
    assert third["records"] == second["records"]
    assert {"results.json", "results.md", "roc.png", "spread.png"} <= {p.name for p in cfg.work.iterdir()}
    report = (cfg.work / "results.md").read_text()
    assert bd["name"] in report and "with K = 16 clean images per class in all" in report
    # the benchmarks read the same records from the work folder, its runs/, or the committed results.json
    by_name = sorted(third["records"], key=lambda r: r["name"])
    for source in (cfg.work, cfg.work / "runs", cfg.work / "results.json"):
        assert zoo_module.stored_records(source) == by_name


def test_locks_let_one_worker_claim_a_step_and_make_the_others_wait(tmp_path):
    import threading
    import time

    from cbpt_guard import locks

    path = tmp_path / "claims" / "m.lock"
    with locks.claim(path) as first:
        with locks.claim(path) as second:
            assert first and not second  # taken: the second worker moves on
        order = []

        def wait() -> None:
            with locks.hold(path):
                order.append("waited")

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)
        assert order == []  # still waiting on the first worker
        order.append("released")
    waiter.join(5)
    assert order == ["released", "waited"]
    with locks.claim(path) as again:
        assert again  # released with its holder


def test_zoo_refuses_bad_counts_before_any_work(tmp_path, capsys):
    from tests.helpers import run_cli

    for args, says in (
        (["--workers", "0"], "--workers must be at least 1"),
        (["--limit", "-1"], "--limit"),
        (["--part", "test"], "--part must be one of fit, report"),
        (["--dataset", "mnist"], "--dataset must be one of shapes, digits, got mnist"),
        (["--shots", "32"], "--shots 32 is more than the few-shot pool of digits (20 images per class)"),
    ):
        code, _, err = run_cli(capsys, "testbed", "zoo", "--work", tmp_path / "zoo", *args)
        assert code == 2 and says in err
    assert not (tmp_path / "zoo").exists()


def test_build_repeat_pretrains_a_zoo_base_bit_for_bit(tmp_path):
    """benchmarks/build_repeat.py: its snapshot is the zoo's own base (the same weights, hashed),
    and two runs at one thread count repeat (docs/results.md#what-a-build-rests-on)."""
    from cbpt_guard.artifacts import sha256_file
    from testbed.zoo import Base, Zoo
    from tests.helpers import load_benchmark, mini_build_config

    cfg = ZooConfig(
        work=tmp_path / "zoo",
        datasets=("shapes",),
        pretrain_seeds=(0,),
        pretrain_steps=6,
        snapshots=(4, 6),
        sizes=(128, 16, 4),
        model_cfg=mini_build_config("none").model_cfg,
        batch_size=32,
    )
    zoo = Zoo(cfg)
    base = Base("shapes", 0, 6)
    zoo.pretrain(base, zoo.dataset(base))
    repeat = load_benchmark("build_repeat")
    first = repeat.snapshot_at(cfg, "shapes", 0, 4, 1)
    assert first["sha256"] == sha256_file(tmp_path / "zoo" / "bases" / "shapes-s0-4.pt")
    assert repeat.snapshot_at(cfg, "shapes", 0, 4, 1)["sha256"] == first["sha256"]
    assert first["trained_with"]["threads"] == 1 and 0 <= first["ca"] <= 1
    side = json.loads((tmp_path / "zoo" / "bases" / "shapes-s0-4.json").read_text())
    assert side["trained_with"] == first["trained_with"]
    with pytest.raises(ValueError, match="--steps must be 1..6"):
        repeat.snapshot_at(cfg, "shapes", 0, 7, 1)
