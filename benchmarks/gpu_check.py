"""The GPU check: purify at default settings on CUDA, and the guard on CUDA vs the CPU.

    bash benchmarks/gpu_check.sh              # on a machine with a GPU, under 10 minutes
    python benchmarks/gpu_check.py --smoke --model M.pt   # the same steps, tiny, on this CPU

In one go, with ViT-B-32 at random weights (speed and memory only; no efficacy):
1. purify on the CPU and on CUDA at C = 10 with short settings (the same on both): the ratio;
2. purify on CUDA at default settings for C = 100 and C = 1,000 (16 shots and 8 held out per
   class, written as image folders and read back as a user's would be);
3. classify the C = 100 shot folder with the exported heads on onnxruntime's CPU and CUDA
   execution providers (CUDA only where onnxruntime-gpu is installed; else said so).
Prints a markdown table and writes it, with the raw figures, to OUT/gpu_check.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale import model_file, shot_folder  # noqa: E402  (benchmarks/ is the script's folder)


def purify_case(model: Path, data: Path, device: str, out: Path, short: bool, precision: str = "fp32") -> dict:
    from cbpt.data import load_shots
    from cbpt.inversion import InversionConfig
    from cbpt.model import load_clip
    from cbpt.purify import PurifyConfig
    from cbpt.runtime import Runtime
    from cbpt.tuning import TuningConfig
    from cbpt_cli.pipeline import purify_to_folder

    runtime = Runtime.of(device, precision)
    runtime.start()
    cfg = PurifyConfig()
    if short:
        cfg = PurifyConfig(inversion=InversionConfig(steps=10, mask_restarts=1), tuning=TuningConfig(steps=10))
    t0 = time.perf_counter()
    clip = load_clip(model, runtime=runtime)
    shots = load_shots(clip, data, None, cfg.budget, cfg.seed)
    t_load = time.perf_counter() - t0
    run = purify_to_folder(clip, shots, cfg, out, overwrite=True)
    rep = run.report
    return {
        "device": device,
        "precision": precision,
        "classes": len(shots.classnames),
        "settings": "short (10 inversion steps, 1 mask restart, 10 tuning steps)" if short else "default",
        "load_s": round(t_load, 1),
        "timings": rep["timings"],
        "export_s": round(run.export_seconds, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "runtime": rep["runtime"],
        "scan": {k: rep["scan"][k] for k in ("backdoored", "target", "score")},
    }


def classify_case(heads: Path, data: Path, device: str) -> dict:
    from guard.batch import BatchJob, Engine, Graph, run_batch

    out = heads.parent / f"classify-{device}.jsonl"
    out.unlink(missing_ok=True)
    job = BatchJob(heads=heads, inputs=[str(data)], out=out, engine=Engine.LOCAL, graph=Graph(device=device), workers=4)
    t0 = time.perf_counter()
    summary = run_batch(job, lambda _total: None, lambda _n: None)
    seconds = time.perf_counter() - t0
    return {"device": device, "images": summary.classified, "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--model", type=Path, help="a checkpoint to use instead of --arch with random weights")
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--smoke", action="store_true", help="tiny classes and steps on the CPU: checks the script")
    args = ap.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else args.device
    classes = [3] if args.smoke else args.classes
    model = args.model or model_file(args.out, args.arch)
    results: dict = {
        "arch": args.arch,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "purify": [],
        "classify": [],
    }

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))

    small = shot_folder(args.out / "shots-10", 10 if not args.smoke else 2, 24)
    for dev in ("cpu", device):
        print(f"purify C=10 short on {dev}", flush=True)
        results["purify"].append(purify_case(model, small, dev, args.out / f"purified-10-{dev}", short=True))
        save()
    for c in classes:
        data = shot_folder(args.out / f"shots-{c}", c, 24)
        print(f"purify C={c} {'short' if args.smoke else 'default'} on {device}", flush=True)
        results["purify"].append(
            purify_case(model, data, device, args.out / f"purified-{c}", short=args.smoke, precision=args.precision)
        )
        save()
    import onnxruntime as ort

    heads = args.out / f"purified-{classes[0]}"
    data = args.out / f"shots-{classes[0]}"
    eps = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])
    from cbpt_guard.errors import UserError

    for ep in eps:
        print(f"classify on onnxruntime {ep}", flush=True)
        try:
            results["classify"].append(classify_case(heads, data, ep))
        except UserError as e:  # onnxruntime-gpu lists CUDA even where it cannot load it
            results["classify_note"] = f"classify on {ep}: {e}"
        save()
    if len(eps) == 1:
        results["classify_note"] = "onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu)"
    save()
    lines = [
        f"GPU check: {results['gpu'] or 'no GPU'}, torch {results['torch']}, "
        + (str(args.model) if args.model else f"{args.arch} random weights"),
        "",
        "| run | device | classes | settings | inversion s | cache s | tuning s | export s | total s | peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["purify"]:
        t, rt = r["timings"], r["runtime"]
        peak = f"{rt['peak_cuda_mb'] / 1024:.1f} GB GPU, " if "peak_cuda_mb" in rt else ""
        lines.append(
            f"| purify | {r['device']} | {r['classes']} | {r['settings']} | {t['inversion_s']} | "
            f"{t.get('feature_cache_s', 0)} | {t['tuning_s']} | {r['export_s']} | {r['total_s']} | "
            f"{peak}{rt['peak_rss_mb'] / 1024:.1f} GB RSS |"
        )
    cpu, gpu = results["purify"][0]["total_s"], results["purify"][1]["total_s"]
    lines += ["", f"C=10 short purify: CPU {cpu} s, {device} {gpu} s: {cpu / gpu:.1f}x", ""]
    for r in results["classify"]:
        lines.append(
            f"classify on onnxruntime {r['device']}: {r['images'] / r['seconds']:.0f} images/s ({r['images']})"
        )
    if "classify_note" in results:
        lines.append(results["classify_note"])
    text = "\n".join(lines)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
