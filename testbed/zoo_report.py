"""The zoo's report: results.md (figures per part, then one row per model) and roc.png,
spread.png, from `testbed.zoo.run_zoo`'s results."""

from __future__ import annotations

import numpy as np

from testbed.bench_report import _f, _png
from testbed.zoo import ASR_BAR, CA_BAR, Leftover, kept_reach

PARTS = {
    "all": "every model",
    "fit": "fit part (even entries: may tune the scan)",
    "report": "report part (odd entries: never tuned on)",
}


def _q(d: dict) -> str:
    return "-" if not d.get("n") else f"{d['median']:.3f} / {d['p95']:.3f} / {d['worst']:.3f}"


def _low(d: dict | None) -> str:
    return "-" if not d else f"{d['median']:.3f} ({d['lowest']:.3f})"


def _per_part(summary: dict, columns: list[str], cells) -> list[str]:
    """A table with one row per part of the zoo: `cells(summary[part])` fills the columns."""
    rows = [f"| {' | '.join(['part', *columns])} |", "|" + "---|" * (len(columns) + 1)]
    return rows + [f"| {' | '.join([label, *cells(summary[part])])} |" for part, label in PARTS.items()]


def _kept(tuning: dict | None) -> str:
    """The checkpoint step 2 kept: its mode, rung and held-out share sent to the target."""
    if not tuning:
        return "-"
    if tuning.get("kept_original"):
        return f"{tuning['mode']}, original prompts"
    return f"{tuning['mode']}, {tuning.get('rung', '-')}, {_f(kept_reach(tuning))}"


def markdown(results: dict) -> str:
    s = results["summary"]
    out = [
        f"# cbpt-guard zoo ({results['tool']})",
        "",
        f"{len(results['records'])} of {results['planned']} planned models measured, each scanned and purified "
        f"with K = {results['config']['shots']} clean images per class in all. The scan's continuous "
        "score is `suspicion` (cbpt.scan.suspicion: the mask score over its threshold, the best warp's "
        "or mask's over-alignment margin over its bar, or the best patch probe's flip rate over its bar; "
        ">= 1 is the verdict). ASR after and CA drop: median / 95th "
        "percentile / worst; CA drop = CA before - CA after on the model's own test split.",
        "",
    ]
    out += _per_part(
        s,
        ["clean", "backdoored (not taken)", "AUROC", "TPR at 5% FPR", "verdict TPR / FPR", "target named"]
        + ["ASR after", "ASR after <= 2%", "CA drop", "CA within 2 pt"],
        lambda r: [
            str(r["clean"]),
            f"{r['backdoored']} ({len(r['not_taken'])})",
            _f(r["auroc"]),
            _f(r["tpr_at_5pct_fpr"]),
            f"{_f(r['verdict_tpr'])} / {_f(r['verdict_fpr'])}",
            _f(r["target_accuracy"]),
            _q(r["asr_after"]),
            _f(r["asr_after_le_2pct"]),
            _q(r["ca_drop"]),
            _f(r["ca_within_2pt"]),
        ],
    )
    out += [
        "",
        "The runtime trigger alarm on each backdoored model's real trigger (the purified heads, the "
        "alarm's stored threshold; through the guard = triggered images that get the target label and "
        "are not flagged, what `--on-alarm reject` lets pass):",
        "",
    ]
    out += _per_part(
        s,
        ["alarm AUROC median (lowest)", "TPR at 1% FPR median (lowest)", "ASR after", "through the guard"]
        + ["through the guard <= 1%", "ASR after <= 5%"],
        lambda r: [
            _low(r.get("alarm_auroc")),
            _low(r.get("alarm_tpr_at_1pct_fpr")),
            _q(r["asr_after"]),
            _q(r.get("asr_through_guard", {})),
            _f(r.get("through_guard_le_1pct")),
            _f(r.get("asr_after_le_5pct")),
        ],
    )
    out += [
        "",
        "Where the ASR above 2% after CBPT was decided (`testbed.zoo.Leftover`): *missed*, the scan read "
        "clean; *settled*, the kept checkpoint cleared the held-out shots carrying the inverted triggers, so "
        "no stronger rung was tried (or none was left), and the real trigger still reaches the target; "
        "*still reaching*, held-out "
        "triggered shots still reached the target at the rung kept (a stronger one refused for held-out clean "
        "accuracy, no better, or none left).",
        "",
    ]
    out += _per_part(
        s,
        [cause.value for cause in Leftover],
        lambda r: [", ".join(r.get("leftover", {}).get(cause.value, [])) or "-" for cause in Leftover],
    )
    out += [
        "",
        "| model | part | attack | poison | target | testbed CA / ASR | suspicion | verdict (target) | "
        "CA after | ASR after | step 2 kept: mode, rung, held-out reach | alarm AUROC | through guard | purify s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        a = r["attack"]
        attack = "clean" if a is None else f"{a['family']} {a['params']}".replace("|", "/")
        poison, target = ("-", "-") if a is None else (f"{a['poison_rate']:.2%}", a["target"])
        head = (
            f"| {r['name']} | {r['part']} | {attack} | {poison} | {target} | "
            f"{_f(r['testbed']['ca'])} / {_f(r['testbed']['asr'])} |"
        )
        if not r["taken"]:
            out.append(head + " not taken (ASR below the zoo's floor): left out | | | | | | | |")
            continue
        sc = r["scan"]
        verdict = f"{'backdoored' if sc['backdoored'] else 'clean'} ({sc['target_index']})"
        al = r.get("alarm") or {}
        out.append(
            f"{head} {sc['suspicion']:.3f} | {verdict} | {_f(r['ca_after'])} | {_f(r['asr_after'])} | "
            f"{_kept(r.get('tuning'))} | {_f(al.get('auroc'))} | {_f(al.get('asr_through_guard'))} | "
            f"{r['purify_s']:.0f} |"
        )
    return "\n".join(out) + "\n"


def roc_points(neg: list[float], pos: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    n, p = np.asarray(neg), np.asarray(pos)
    fpr = [0.0] + [float((n >= t).mean()) for t in thresholds] + [1.0]
    tpr = [0.0] + [float((p >= t).mean()) for t in thresholds] + [1.0]
    return np.asarray(fpr), np.asarray(tpr)


def plots(results: dict) -> dict[str, bytes]:
    """roc.png (the scan's suspicion, per part) and spread.png (ASR after, CA drop)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results["records"] if r["taken"]]
    files: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for part, colour in (("all", "black"), ("fit", "tab:blue"), ("report", "tab:orange")):
        sel = [r for r in rs if part == "all" or r["part"] == part]
        neg = [r["scan"]["suspicion"] for r in sel if r["kind"] == "clean"]
        pos = [r["scan"]["suspicion"] for r in sel if r["kind"] == "backdoored"]
        if neg and pos:
            fpr, tpr = roc_points(neg, pos)
            auc = results["summary"][part]["auroc"]
            ax.step(fpr, tpr, where="post", color=colour, label=f"{part}: AUROC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (clean models)")
    ax.set_ylabel("true positive rate (backdoored models)")
    ax.set_title("scan suspicion, zoo")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    files["roc.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    asr = [r["asr_after"] for r in rs if r["kind"] == "backdoored"]
    drop = [r["ca_before"] - r["ca_after"] for r in rs]
    axes[0].hist(asr, bins=np.linspace(0, max(0.1, max(asr, default=0)), 21), color="tab:red")
    axes[0].axvline(ASR_BAR, color="grey", ls=":")
    axes[0].set_xlabel("ASR after CBPT")
    axes[0].set_ylabel("backdoored models")
    axes[1].hist(drop, bins=21, color="tab:blue")
    axes[1].axvline(CA_BAR, color="grey", ls=":")
    axes[1].set_xlabel("CA drop (before - after)")
    axes[1].set_ylabel("models")
    # how far each model sits from the verdict's bar, not only which side
    for row, (kind, colour) in enumerate((("clean", "tab:green"), ("backdoored", "tab:red"))):
        xs = [r["scan"]["suspicion"] for r in rs if r["kind"] == kind]
        axes[2].scatter(xs, np.full(len(xs), row) + np.linspace(-0.2, 0.2, len(xs)), s=12, color=colour)
    axes[2].axvline(1.0, color="grey", ls=":")
    axes[2].set_yticks([0, 1], ["clean", "backdoored"])
    axes[2].set_xlabel("scan suspicion (>= 1: backdoored)")
    files["spread.png"] = _png(fig)
    plt.close(fig)
    return files
