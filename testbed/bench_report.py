"""The bench's report: results.md tables and PNG plots, from results.json alone."""

from __future__ import annotations

import io

from testbed.baselines import LABELS


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _rows(results: dict, dataset: str) -> list[dict]:
    k = results["config"]["shots"]
    return [r for r in results["table"] if r["dataset"] == dataset and r["shots"] == k]


def _methods(results: dict) -> list[str]:
    return list(results["config"]["methods"])


def results_markdown(results: dict) -> str:
    cfg = results["config"]
    methods = _methods(results)
    out = [
        f"# cbpt-guard bench ({results['tool']})",
        "",
        f"k = {cfg['shots']} clean shots per class, mean over {len(cfg['seeds'])} shot set(s) "
        f"(seeds {', '.join(map(str, cfg['seeds']))}). CA: clean accuracy; ASR: attack success rate on "
        "non-target triggered test images; RA: their accuracy; DER = (max(0, ΔASR) − max(0, ΔCA) + 1) / 2 "
        "(0.5 = no change, 1 = every triggered image rescued at no clean cost). Best DER per attack in bold. "
        f"Defense time summed over all {len(results['runs'])} runs: "
        f"{sum(r['seconds'] for r in results['runs']) / 60:.0f} min (one CPU thread each).",
        "",
    ]
    for dataset in cfg["datasets"]:
        rows = _rows(results, dataset)
        cell = {(r["attack"], r["method"]): r for r in rows}
        attacks = [a for a in cfg["attacks"] if any((a, m) in cell for m in methods)]
        out += [
            f"## {dataset}: DER",
            "",
            "| attack | " + " | ".join(LABELS[m] for m in methods) + " |",
            "|---" * (len(methods) + 1) + "|",
        ]
        for a in [a for a in attacks if a != "none"]:  # DER needs an attack
            ders = {m: cell[(a, m)]["der"] for m in methods if (a, m) in cell and cell[(a, m)]["der"] is not None}
            top = max(ders.values()) if ders else None
            out.append(
                f"| {a} | "
                + " | ".join(
                    (
                        "**" + _f(ders[m]) + "**"
                        if ders.get(m) is not None and abs(ders[m] - top) < 5e-4
                        else _f(ders.get(m))
                    )
                    for m in methods
                )
                + " |"
            )
        out += [
            "",
            f"## {dataset}: CA / ASR (mean; worst ASR of the shot sets in brackets)",
            "",
            "| attack | " + " | ".join(LABELS[m] for m in methods) + " |",
            "|---" * (len(methods) + 1) + "|",
        ]
        for a in attacks:
            parts = []
            for m in methods:
                r = cell.get((a, m))
                parts.append(
                    ""
                    if r is None
                    else f"{_f(r['ca'])} / {_f(r['asr'])}"
                    + ("" if r["asr_max"] is None or len(cfg["seeds"]) == 1 else f" ({_f(r['asr_max'])})")
                )
            out.append(f"| {a} | " + " | ".join(parts) + " |")
        out += [
            "",
            f"## {dataset}: RA and wall time (s)",
            "",
            "| attack | " + " | ".join(LABELS[m] for m in methods) + " |",
            "|---" * (len(methods) + 1) + "|",
        ]
        for a in attacks:
            out.append(
                f"| {a} | "
                + " | ".join(
                    "" if (a, m) not in cell else f"{_f(cell[(a, m)]['ra'])} / {cell[(a, m)]['seconds']:.0f}"
                    for m in methods
                )
                + " |"
            )
        out.append("")
    if results["sweep"]:
        best = results["best_baseline"]
        seeds = cfg.get("sweep_seeds") or cfg["seeds"]
        out += [
            f"## Shots sweep ({cfg['datasets'][0]}; CBPT and the best baseline by mean DER, "
            f"{LABELS.get(best, best)}; mean over {len(seeds)} shot set(s)): CA / ASR",
            "",
            "| attack | method | " + " | ".join(f"k={k}" for k in cfg["sweep_shots"]) + " |",
            "|---|---" + "|---" * len(cfg["sweep_shots"]) + "|",
        ]
        cell = {(r["attack"], r["method"], r["shots"]): r for r in results["sweep"]}
        for a in cfg["sweep_attacks"]:
            for m in sorted({r["method"] for r in results["sweep"]}, key=_methods(results).index):
                out.append(
                    f"| {a} | {LABELS[m]} | "
                    + " | ".join(
                        "" if (a, m, k) not in cell else f"{_f(cell[(a, m, k)]['ca'])} / {_f(cell[(a, m, k)]['asr'])}"
                        for k in cfg["sweep_shots"]
                    )
                    + " |"
                )
        out.append("")
    return "\n".join(out)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots(results: dict) -> dict[str, bytes]:
    """asr_vs_ca_DATASET.png, asr_by_attack_DATASET.png, shots_sweep.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = results["config"]
    methods = _methods(results)
    colours = dict(zip(methods, plt.get_cmap("tab10").colors))
    markers = dict(zip(methods, "osD^v*"))
    files: dict[str, bytes] = {}
    for dataset in cfg["datasets"]:
        rows = [r for r in _rows(results, dataset) if r["asr"] is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for m in methods:
            pts = [r for r in rows if r["method"] == m]
            ax.scatter(
                [r["ca"] for r in pts],
                [r["asr"] for r in pts],
                label=LABELS[m],
                color=colours[m],
                marker=markers[m],
                s=46,
                alpha=0.85,
            )
        ax.set_xlabel("clean accuracy (CA)")
        ax.set_ylabel("attack success rate (ASR)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{dataset}: one point per attack, k={cfg['shots']} (lower right is better)")
        ax.legend(fontsize=8, loc="center left")
        ax.grid(alpha=0.3)
        files[f"asr_vs_ca_{dataset}.png"] = _png(fig)
        plt.close(fig)
        attacks = [a for a in cfg["attacks"] if any(r["attack"] == a for r in rows)]
        cell = {(r["attack"], r["method"]): r["asr"] for r in rows}
        fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(attacks) + 2), 4.2))
        width = 0.8 / len(methods)
        xs = np.arange(len(attacks))
        for i, m in enumerate(methods):
            ax.bar(
                xs + (i - (len(methods) - 1) / 2) * width,
                [cell.get((a, m), np.nan) for a in attacks],
                width,
                label=LABELS[m],
                color=colours[m],
            )
        ax.set_xticks(xs, attacks)
        ax.set_ylabel("ASR (lower is better)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{dataset}: attack success rate per attack and defense, k={cfg['shots']}")
        ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
        ax.grid(axis="y", alpha=0.3)
        files[f"asr_by_attack_{dataset}.png"] = _png(fig)
        plt.close(fig)
    if results["sweep"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for a, m in sorted({(r["attack"], r["method"]) for r in results["sweep"]}):
            pts = sorted(
                (r for r in results["sweep"] if r["attack"] == a and r["method"] == m), key=lambda r: r["shots"]
            )
            style = "-" if m == "cbpt" else "--"
            for ax, key in zip(axes, ("asr", "ca")):
                ax.plot(
                    [r["shots"] for r in pts],
                    [r[key] for r in pts],
                    style,
                    marker=markers[m],
                    color=colours[m],
                    label=f"{LABELS[m]}, {a}",
                    alpha=0.9 if a == cfg["sweep_attacks"][0] else 0.55,
                )
        for ax, key in zip(axes, ("ASR", "CA")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["sweep_shots"], [str(k) for k in cfg["sweep_shots"]])
            ax.set_xlabel("clean shots per class (k)")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[0].set_ylim(-0.03, 1.03)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{cfg['datasets'][0]}: shots sweep")
        files["shots_sweep.png"] = _png(fig)
        plt.close(fig)
    return files
