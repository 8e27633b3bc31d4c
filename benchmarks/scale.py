"""What a purify costs as the label set grows: per stage seconds and peak memory, side by side.

    python benchmarks/scale.py                       # C = 10, 100, 1000 at k = 16, and k = 4
    python benchmarks/scale.py --classes 10 --shots 16 --state /tmp/scale.json

ViT-B-32 with random weights at 224 px (loaded through `cbpt.model.load_clip` from a saved
state_dict, as a user's checkpoint would be), synthetic shots (smooth random images, uint8),
C class names, k shots per class plus the default 8 held out. Each (C, k) case runs in a
fresh process so its peak resident memory is its own. What is measured:

- original head: the C x 8 template captions through the text tower (timed on the first 64
  classes, projected linearly beyond);
- inversion step: one step of a mask restart (32 shots forward and backward), timed over 3;
- shot passes: images per second through the image encoder, timed on the first batches of a
  pass over every shot (the rest of the pass runs with a stand-in encoder returning random
  features, so memory covers the whole pass but the clock does not wait an hour);
- feature cache: the same, for the default cache (3 inverted masks, 2 augmented views);
- tuning step and evaluation: real steps of `cbpt.tuning` on the cache (all C classes);
- export: `export.package.build_heads` with its parity check, timed whole.

The projection of a full default run (`project`) is: original head + the scan's 200-step
restarts and its passes over the shots, as the scan runs them on a model that reads clean
(`scan_shapes`: the inversion's 4 restarts and 8 passes, then 2 warp probes and 5 patch probes) +
the cache less the shots' own features + 300 tuning steps and 30 evaluations (one rung;
escalation can add two more) + export. The projections are arithmetic over the stored
measurements, so a stored state prints with today's scan (`--state FILE` with every case done).

Results are appended to --state (resumable: finished cases are not re-run) and printed as a
markdown table. The numbers are this machine's; run it idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE = ROOT / "docs" / "bench" / "scale.json"
HELD_OUT = 8
TIMED_BATCHES = 1  # image-encoder batches timed per pass
SMALL_HEAD = 64  # classes the original head is timed on


def _synthetic_pixels(n: int, size: int, seed: int):
    """Smooth random uint8 images [n, 3, size, size], made a chunk at a time and kept as
    `load_shots` keeps shots: in memory, or past SPILL_BYTES in a PixelStore."""
    import torch
    import torch.nn.functional as F

    from cbpt.data import SPILL_BYTES, PixelStore

    gen = torch.Generator().manual_seed(seed)
    shape = (n, 3, size, size)
    big = n * 3 * size * size > SPILL_BYTES
    out = PixelStore(shape) if big else torch.empty(shape, dtype=torch.uint8)
    for i in range(0, n, 256):
        m = min(256, n - i)
        low = torch.rand(m, 3, 8, 8, generator=gen)
        chunk = (F.interpolate(low, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)
        if big:
            out.write(i, chunk)
        else:
            out[i : i + m] = chunk
    return out


def model_file(folder: Path, arch: str) -> Path:
    import open_clip
    import torch

    path = folder / f"{arch}-random.pt"
    if not path.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        torch.save(model.state_dict(), path)
    return path


def run_case(classes: int, shots: int, arch: str, model_dir: Path, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from cbpt.data import Shots
    from cbpt.encoding import ImageEncoder
    from cbpt.features import cache_features
    from cbpt.inversion import Candidate, InversionConfig, WarpSearch, invert
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt.purify import original_head
    from cbpt.runtime import Runtime, peak_rss_mb
    from cbpt.tuning import FullAcceptance, Rung, Tuner, TuningConfig, TuningData
    from export.package import Source, build_heads

    out: dict = {"classes": classes, "shots": shots, "arch": arch, "threads": threads}
    clip = load_clip(model_file(model_dir, arch), runtime=Runtime())
    size = clip.info.image_size
    names = tuple(f"class number {i}" for i in range(classes))
    n, n_held = classes * shots, classes * HELD_OUT
    t0 = time.perf_counter()
    shot_set = Shots(
        _synthetic_pixels(n, size, 0),
        torch.arange(classes).repeat_interleave(shots),
        names,
        _synthetic_pixels(n_held, size, 1),
        torch.arange(classes).repeat_interleave(HELD_OUT),
    )
    out["shots_mb"] = round((n + n_held) * 3 * size * size / 2**20, 1)
    out["shots_in_file"] = not isinstance(shot_set.pixels, torch.Tensor)
    out["make_shots_s"] = round(time.perf_counter() - t0, 2)

    # the original head, timed on the first SMALL_HEAD classes
    t0 = time.perf_counter()
    small = original_head(clip, names[: min(classes, SMALL_HEAD)])
    out["original_head_s"] = round((time.perf_counter() - t0) * classes / small.shape[0], 2)
    d = small.shape[1]
    original = F.normalize(torch.cat([small, torch.randn(classes - small.shape[0], d)]), dim=-1)

    timing = {"seconds": 0.0, "images": 0}

    class Timed(ImageEncoder):
        """The real encoder for the first TIMED_BATCHES batches of each pass, a stand-in after."""

        def all(self, pixels, rows=None, view=None):
            rows = torch.arange(pixels.shape[0]) if rows is None else rows
            feats = []
            for b, i in enumerate(range(0, rows.shape[0], self.batch)):
                idx = rows[i : i + self.batch]
                x = self.load(pixels[idx])
                x = view(x, idx) if view is not None else x
                if b < TIMED_BATCHES:
                    t = time.perf_counter()
                    with torch.no_grad():
                        feats.append(self.encode(x))
                    timing["seconds"] += time.perf_counter() - t
                    timing["images"] += x.shape[0]
                else:
                    feats.append(F.normalize(torch.randn(x.shape[0], d), dim=-1))
            return torch.cat(feats)

    encoder = Timed(clip.encode_pixels, clip.device, clip.runtime.encode_batch)

    # inversion: 3 steps of one mask restart (the first pays for warm-up: the last 2 are kept)
    steps = []
    cfg = InversionConfig(steps=3, mask_restarts=1, warp=WarpSearch(restarts=0, probes=0))
    last = [time.perf_counter()]

    def tick(done: int, _total: int) -> None:
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now

    t0 = time.perf_counter()
    inv = invert(encoder, shot_set.pixels, shot_set.labels, original, cfg, tick)
    out["inversion_step_s"] = round(sum(steps[1:]) / len(steps[1:]), 3)
    out["encode_s_per_image"] = round(timing["seconds"] / timing["images"], 4)
    out["inversion_sample_s"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_after_inversion_mb"] = peak_rss_mb()

    # the feature cache of a found backdoor: the 3 masks, 2 views, and the held-out shots
    triggers = [Candidate(inv.trigger, 0, 1.0, None)] * 3
    tc = TuningConfig()
    t0 = time.perf_counter()
    timing.update(seconds=0.0, images=0)
    cache = cache_features(encoder, shot_set.pixels, shot_set.labels, triggers, tc.views, tc.shifts, 0, tc.strengths)
    held = cache_features(encoder, shot_set.held_pixels, shot_set.held_labels, triggers, 0, 1, 0, tc.held_out_strengths)
    out["cache_images"] = cache.encoder_passes + held.encoder_passes
    out["cache_sample_s"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_after_cache_mb"] = peak_rss_mb()

    # tuning: real steps on every class
    prompts = ClassPrompts(clip.model, clip.tokenizer(), names)
    t0 = time.perf_counter()
    tuner = Tuner(prompts, TuningData(cache, held, original, clip.logit_scale), tc, FullAcceptance())
    out["tuning_setup_s"] = round(time.perf_counter() - t0, 2)
    opt = torch.optim.Adam(prompts.parameters(), lr=tc.lr)
    rung, times = Rung(0, tc.alpha, tc.margin), []
    for _ in range(4):
        t = time.perf_counter()
        tuner.step(opt, rung)
        times.append(time.perf_counter() - t)
    out["tuning_step_s"] = round(sum(times[1:]) / 3, 3)
    out["classes_per_step"] = min(classes, tc.classes.max_classes)
    t = time.perf_counter()
    tuner.validate(tuner.texts.current(), rung.alpha)
    out["evaluation_s"] = round(time.perf_counter() - t, 3)
    out["peak_rss_after_tuning_mb"] = peak_rss_mb()

    # export: the heads of the tuned prompts, parity-checked
    with tempfile.TemporaryDirectory() as tmp:
        source = Source(
            folder=Path(tmp),
            report={"classes": list(names)},
            classes=list(names),
            weights=prompts.features().numpy(),
            original=original.numpy(),
            logit_scale=clip.logit_scale,
            centroids=inv.mean_feature[None].numpy(),
            embeddings_sha256="0" * 64,
            trigger=None,
        )
        t = time.perf_counter()
        build_heads(source, clip, 0.5)
        out["export_s"] = round(time.perf_counter() - t, 2)
    out["peak_rss_mb"] = peak_rss_mb()
    return out  # the projection is derived from these figures when printed (`project`)


@dataclass(frozen=True)
class ScanShape:
    """What a default scan runs on one kind of model: its 200-step restarts and its passes over
    the inversion shots, each pass K x C images through the tower (docs/scale.md#memory)."""

    name: str
    restarts: int
    passes: int


def scan_shapes() -> tuple[ScanShape, ScanShape, ScanShape]:
    """The inversion alone, a model read clean, a backdoor found by its masks, counted from the
    default `InversionConfig`: the inversion's clean features, a greyed pass per mask restart and
    one pass per restart and probe (cbpt/inversion.py)."""
    from cbpt.inversion import InversionConfig

    cfg = InversionConfig()
    restarts = cfg.mask_restarts + cfg.warp.restarts
    inversion = ScanShape("the inversion alone", restarts, 1 + 2 * cfg.mask_restarts + cfg.warp.restarts)

    def more(name: str, probes: int) -> ScanShape:
        return ScanShape(name, inversion.restarts + probes, inversion.passes + probes)

    clean = more(
        f"reads clean ({cfg.warp.probes} warp probes, {len(cfg.patch.places)} patch probes)",
        cfg.warp.probes + len(cfg.patch.places),
    )
    found = more(
        f"found by its masks ({cfg.compact.restarts} compact masks, {cfg.blend.restarts} blends)",
        cfg.compact.restarts + cfg.blend.restarts,
    )
    return inversion, clean, found


def project(r: dict, scan: ScanShape) -> dict:
    """A full default purify of case `r` (its measured step and per-image costs) running
    `scan`: original head + the scan's restarts x 200 steps and its passes + the feature cache
    less the shots' own features (the inversion's) + 300 tuning steps and 30 evaluations (one
    rung; escalation can add two more) + export."""
    n, per_image = r["classes"] * r["shots"], r["encode_s_per_image"]
    out = {
        "original_head_s": r["original_head_s"],
        "inversion_s": round(200 * scan.restarts * r["inversion_step_s"] + scan.passes * n * per_image, 1),
        "cache_s": round((r["cache_images"] - n) * per_image, 1),
        "tuning_s": round(300 * r["tuning_step_s"] + 30 * r["evaluation_s"] + r["tuning_setup_s"], 1),
        "export_s": r["export_s"],
    }
    return out | {"total_s": round(sum(out.values()), 1)}


COMPARE_ARGS = ["--inversion-steps", "5", "--restarts", "1", "--tuning-steps", "20", "--threads", "1"]


def shot_folder(root: Path, classes: int, per_class: int) -> Path:
    """Class folders of smooth random 64-px PNGs (the model's transform resizes them)."""
    import numpy as np
    from PIL import Image

    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c:04d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(low).resize((64, 64), Image.BILINEAR).save(root / f"class_{c:04d}" / f"{i:02d}.png")
    (root / "done").write_text("")
    return root


def cli_compare(ref: str, classes: int, arch: str, models: Path) -> list[dict]:
    """`cbpt-guard purify` of the code at git `ref` and of this tree, same short settings, same
    shots, one after the other: report.json's stage timings and the process's peak memory."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], capture_output=True, text=True, cwd=ROOT, check=True)
    sha = sha.stdout.strip()
    old = Path(tempfile.gettempdir()) / f"cbpt-ref-{sha}"
    if not old.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(old), sha], cwd=ROOT, check=True, capture_output=True)
    data = shot_folder(models / f"shots-{classes}", classes, 24)
    model = model_file(models, arch)
    rows = []
    for label, root in ((f"before ({sha})", old), ("now", ROOT)):
        out = models / f"purified-{classes}-{label.split()[0]}"
        peak_file = out.with_suffix(".peak")
        code = (
            "import atexit, resource, sys; atexit.register(lambda: open(sys.argv.pop(), 'w').write("
            "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))); "
            "from cbpt_cli.app import main; main(sys.argv[1:-1])"
        )
        cmd = [sys.executable, "-c", code, "purify", str(model), "--data", str(data), "--out", str(out)]
        cmd += [*COMPARE_ARGS, "--overwrite", "--json", str(peak_file)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}
        )
        if proc.returncode != 0:
            raise SystemExit(f"{label}: {proc.stderr[-2000:]}")
        rep = json.loads((out / "report.json").read_text())
        peak = int(peak_file.read_text()) / 1024
        rows.append({"code": label, "classes": classes, "timings": rep["timings"], "peak_rss_mb": round(peak, 1)})
    return rows


def step_ratio(class_counts: list[int], shots: int, arch: str, models: Path, threads: int, rounds: int = 6) -> dict:
    """Tuning-step seconds for each class count, measured in one process with the steps
    interleaved (C1, C2, ..., C1, C2, ...), so a busy machine slows them alike: the median per
    class count and its ratio to the first. Features are random unit vectors shaped like the
    default cache (3 views, 3 masks) of `shots` shots per class; the text tower is the model's."""
    import statistics

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from cbpt.features import FeatureCache
    from cbpt.model import load_clip
    from cbpt.prompts import ClassPrompts
    from cbpt.tuning import FullAcceptance, Rung, Tuner, TuningConfig, TuningData

    clip = load_clip(model_file(models, arch))
    tc = TuningConfig()
    gen = torch.Generator().manual_seed(0)
    tuners, opts = {}, {}
    for c in class_counts:
        names = tuple(f"class number {i}" for i in range(c))
        prompts = ClassPrompts(clip.model, clip.tokenizer(), names)
        d = prompts.features().shape[1]
        labels = torch.arange(c).repeat(3 * shots)
        trig_labels = torch.arange(1, c).repeat(9 * shots)

        clean = F.normalize(torch.randn(len(labels), d, generator=gen), dim=-1)
        trig = F.normalize(torch.randn(len(trig_labels), d, generator=gen), dim=-1)
        cache = FeatureCache(clean, labels, trig, trig_labels, trig_labels * 0, trig[:1], 0)
        data = TuningData(cache, None, prompts.features(), clip.logit_scale)
        tuners[c] = Tuner(prompts, data, tc, FullAcceptance())
        opts[c] = torch.optim.Adam(prompts.parameters(), lr=tc.lr)
    times: dict[int, list[float]] = {c: [] for c in class_counts}
    rung = Rung(0, tc.alpha, tc.margin)
    for _ in range(rounds + 1):  # the first round warms up
        for c in class_counts:
            t = time.perf_counter()
            tuners[c].step(opts[c], rung)
            times[c].append(time.perf_counter() - t)
    med = {c: statistics.median(v[1:]) for c, v in times.items()}
    base = med[class_counts[0]]
    return {
        "arch": arch,
        "shots": shots,
        "threads": threads,
        "classes_per_step": tc.classes.max_classes,
        "median_step_s": {str(c): round(v, 3) for c, v in med.items()},
        "ratio_to_first": {str(c): round(v / base, 2) for c, v in med.items()},
    }


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def table(results: list[dict]) -> str:
    """The measured costs of each case, and a full default purify projected from them for a
    model that reads clean (the scan's costliest common course)."""
    rows = [
        "| C | k | classes per tuning step | original head | inversion step | encoder s/image | cache images "
        "| tuning step | evaluation | export | peak RSS | projected default run, model read clean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    read_clean = scan_shapes()[1]
    for r in sorted(results, key=lambda r: (r["shots"] != 16, r["classes"])):
        p = project(r, read_clean)
        rows.append(
            f"| {r['classes']} | {r['shots']} | {r['classes_per_step']} | {_fmt_s(r['original_head_s'])} | "
            f"{r['inversion_step_s']:.2f} s | {r['encode_s_per_image']:.3f} | {r['cache_images']:,} | "
            f"{r['tuning_step_s']:.2f} s | {r['evaluation_s']:.2f} s | {r['export_s']:.0f} s | "
            f"{r['peak_rss_mb'] / 1024:.2f} GB | {_fmt_s(p['total_s'])} (inversion {_fmt_s(p['inversion_s'])}, "
            f"cache {_fmt_s(p['cache_s'])}, tuning {_fmt_s(p['tuning_s'])}) |"
        )
    return "\n".join(rows)


def scan_table(results: list[dict]) -> str:
    """The scan alone, projected per kind of model from each case's costs: restarts and passes."""
    shapes = scan_shapes()
    rows = ["| C | k | " + " | ".join(s.name for s in shapes) + " |", "|---|---|" + "---|" * len(shapes)]
    for r in sorted(results, key=lambda r: (r["shots"] != 16, r["classes"])):
        n, steps = r["classes"] * r["shots"], 200 * r["inversion_step_s"]
        cells = [
            f"{_fmt_s(s.restarts * steps + s.passes * n * r['encode_s_per_image'])} "
            f"({s.restarts} x {_fmt_s(steps)} + {s.passes} x {_fmt_s(n * r['encode_s_per_image'])})"
            for s in shapes
        ]
        rows.append(f"| {r['classes']} | {r['shots']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--shots", type=int, nargs="+", default=[16, 4])
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--state", type=Path, default=DEFAULT_STATE)
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "cbpt-scale-models")
    ap.add_argument(
        "--against", metavar="GIT_REF", help="also purify end to end with the code at GIT_REF and this tree (C=10)"
    )
    ap.add_argument(
        "--step-ratio", action="store_true", help="only the tuning step at each --classes, interleaved in one process"
    )
    ap.add_argument("--case", nargs=2, type=int, help=argparse.SUPPRESS)  # one case, in this process
    args = ap.parse_args()
    args.models.mkdir(parents=True, exist_ok=True)
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], args.arch, args.models, args.threads)))
        return
    if args.step_ratio:
        result = step_ratio(args.classes, args.shots[0], args.arch, args.models, args.threads)
        args.state.with_name(args.state.stem + "-steps.json").write_text(json.dumps(result, indent=1))
        print("| C | tuning step (median) | vs first |\n|---|---|---|")
        for c in args.classes:
            print(f"| {c} | {result['median_step_s'][str(c)]:.2f} s | {result['ratio_to_first'][str(c)]:.2f}x |")
        return
    if args.against:
        rows = cli_compare(args.against, 10, args.arch, args.models)
        compare = args.state.with_name(args.state.stem + "-compare.json")
        compare.write_text(json.dumps(rows, indent=1))
        print("| code | inversion s | feature cache s | tuning s (20 steps) | total s | peak RSS |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            t = r["timings"]
            print(
                f"| {r['code']} | {t['inversion_s']} | {t.get('feature_cache_s', '-')} | {t['tuning_s']} | "
                f"{t['total_s']} | {r['peak_rss_mb'] / 1024:.2f} GB |"
            )
        return
    state = json.loads(args.state.read_text()) if args.state.is_file() else []
    done = {(r["classes"], r["shots"], r["arch"]) for r in state}
    cases = [(c, k) for k in args.shots for c in args.classes]
    for c, k in cases:
        if (c, k, args.arch) in done:
            continue
        cmd = [sys.executable, __file__, "--case", str(c), str(k), "--arch", args.arch, "--threads", str(args.threads)]
        cmd += ["--models", str(args.models)]
        print(f"C={c} k={k} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case C={c} k={k} failed")
        state.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        args.state.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(args.state)
    ours = [r for r in state if r["arch"] == args.arch]
    print(table(ours) + "\n\n" + scan_table(ours))


if __name__ == "__main__":
    main()
