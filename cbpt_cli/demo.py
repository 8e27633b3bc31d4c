"""`cbpt-guard demo`: the main job end to end on the embedded default.

Build (or reuse) a backdoored testbed CLIP, scan it, purify it, export the heads, and
measure CA / ASR / RA before and after, printing where every file is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cbpt.runtime import Runtime

DEFAULT_ATTACK = "badnet"


def run_demo(
    work: Path,
    attack: str = DEFAULT_ATTACK,
    dataset: str = "shapes",
    echo: Callable[[str], None] = print,
    runtime: Runtime | None = None,
) -> dict:
    from cbpt.data import load_shots
    from cbpt.model import load_clip
    from cbpt.purify import PurifyConfig, original_head
    from cbpt.runtime import Runtime
    from cbpt_cli.pipeline import purify_to_folder
    from cbpt_cli.progress import stage_progress
    from cbpt_guard.artifacts import CLASSES, REPORT, TRIGGER_PNG
    from testbed.build import BuildConfig, build, config_dict, default_cache_dir, write
    from testbed.evaluate import align_classes, evaluate_heads, evaluate_weights

    runtime = runtime or Runtime()
    t0 = time.perf_counter()
    tb = work / f"testbed-{dataset}-{attack}"
    purified = work / "purified"
    cfg = BuildConfig(dataset=dataset, attack=attack)
    with stage_progress() as progress:
        if (tb / "metrics.json").is_file() and json.loads((tb / "metrics.json").read_text())["config"] == json.loads(
            json.dumps(config_dict(cfg))
        ):
            echo(f"1/4 reusing the backdoored testbed model in {tb}")
        else:
            echo(
                f"1/4 training a small CLIP on '{dataset}' and backdooring it with '{attack}' "
                "(about 5 minutes the first time on 2 cores; cached afterwards)"
            )
            built = build(cfg, cache=default_cache_dir(), progress=progress, device=runtime.device)
            write(built, cfg, tb, overwrite=True)
        clip = load_clip(tb / "model.pt", runtime=runtime)
        shots = load_shots(clip, tb / "fewshot", tb / CLASSES, PurifyConfig().budget, 0)
        echo(
            "2/4 scanning and purifying with CBPT (16 clean images per class: 12 tune, 4 held out); "
            "3/4 exporting ONNX heads"
        )
        run = purify_to_folder(clip, shots, PurifyConfig(), purified, progress, overwrite=True)
    rep = run.report
    echo(
        "4/4 classifying the test split, clean and triggered: original prompts (PyTorch) vs the purified "
        "heads served by the runtime guard (onnxruntime)"
    )
    before = evaluate_weights(
        clip, align_classes(original_head(clip, shots.classnames), list(shots.classnames), tb), tb
    )
    after = evaluate_heads(purified, tb)
    sc = rep["scan"]
    summary = {
        "testbed": str(tb),
        "purified": str(purified),
        "trigger_png": str(purified / TRIGGER_PNG),
        "scan": sc,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "purify_s": rep["timings"]["total_s"],
        "total_s": round(time.perf_counter() - t0, 1),
    }
    echo("")
    echo(
        f"scan: {'BACKDOORED' if sc['backdoored'] else 'clean'} (score {sc['score']:.3f}); suspected target "
        f"'{sc['target']}', planted target '{json.loads((tb / 'metrics.json').read_text())['target_name']}'"
    )
    echo(f"{'':>22}{'CA':>8}{'ASR':>8}{'RA':>8}")
    echo(f"{'original prompts':>22}{before.ca:8.3f}{before.asr:8.3f}{before.ra:8.3f}")
    echo(f"{'CBPT heads (guard)':>22}{after.ca:8.3f}{after.asr:8.3f}{after.ra:8.3f}")
    echo("")
    echo(f"backdoored model:  {tb / 'model.pt'}   (its trigger: {tb / 'trigger' / 'preview.png'})")
    echo(f"inverted trigger:  {purified / TRIGGER_PNG}")
    echo(f"purified heads:    {purified}/head.onnx, classifier.onnx (+ preprocess.json, manifest.json)")
    echo(f"report:            {purified / REPORT}")
    echo(f"total {summary['total_s']:.0f} s (purify {summary['purify_s']:.0f} s)")
    return summary
