"""Runtime guard speed: classifier.onnx vs open_clip eager PyTorch, and the HTTP server under
concurrent clients vs raw onnxruntime batches.

    python benchmarks/guard_speed.py --arch ViT-B-32 --threads 2 --seconds 20

Builds a random-weight checkpoint of `--arch`, exports its heads, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _throughput(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def bench_models(heads_dir: Path, clip, threads: int, seconds: float) -> list[tuple]:
    import torch

    from guard.heads import load_heads

    torch.set_num_threads(threads)
    heads = load_heads(heads_dir, device="cpu", threads=threads)
    size = clip.info.image_size
    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        xt = torch.from_numpy(x)

        def eager(xt=xt):
            with torch.no_grad():
                clip.model.encode_image(xt, normalize=True)

        ort_ips = _throughput(lambda x=x: heads.run(x), batch, seconds)
        eager_ips = _throughput(eager, batch, seconds)
        rows.append((batch, eager_ips, ort_ips, ort_ips / eager_ips))
    return rows


def bench_server(heads_dir: Path, threads: int, clients: int, seconds: float) -> dict:
    import httpx
    import uvicorn
    from PIL import Image

    from guard.heads import load_heads
    from guard.server import ServerLimits, create_app

    heads = load_heads(heads_dir, device="cpu", threads=threads)
    h, w = heads.spec.size
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    body = buf.getvalue()
    x = np.random.default_rng(0).standard_normal((32, 3, h, w)).astype(np.float32)
    raw = _throughput(lambda: heads.run(x), 32, seconds / 2)
    config = uvicorn.Config(
        create_app(heads, ServerLimits(max_batch=32, max_wait_ms=5, max_queue=1024)),
        host="127.0.0.1",
        port=8765,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    latencies: list[float] = []
    errors = 0

    async def client(c: httpx.AsyncClient, stop: float):
        nonlocal errors
        while time.perf_counter() < stop:
            t = time.perf_counter()
            r = await c.post("http://127.0.0.1:8765/v1/classify", content=body)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    async def load():
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            stop = time.perf_counter() + seconds
            t0 = time.perf_counter()
            await asyncio.gather(*[client(c, stop) for _ in range(clients)])
            return time.perf_counter() - t0

    elapsed = asyncio.run(load())
    server.should_exit = True
    thread.join(timeout=10)
    lat = sorted(latencies)
    return {
        "raw_ort_ips": raw,
        "server_ips": len(lat) / elapsed,
        "ratio": len(lat) / elapsed / raw,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
        "requests": len(lat),
        "errors": errors,
        "clients": clients,
    }


def export_random(arch: str, folder: Path, int8: bool, fp16: bool) -> Path:
    """Random-weight `arch` heads (speed only), with fp16 and int8 twins; the int8 one is
    calibrated on random images, so its agreement figure means nothing here."""
    import open_clip
    import torch

    import export.int8
    from cbpt.model import load_clip
    from cbpt.outputs import write_original
    from cbpt_guard.atomic import staged_dir
    from export.int8 import Int8Inputs
    from export.package import build_heads, read_source, write_heads

    ckpt = folder / f"{arch}.pt"
    torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), ckpt)
    clip = load_clip(ckpt)
    (folder / "src").mkdir()
    write_original(folder / "src", clip, tuple(f"class {i}" for i in range(10)))
    rng = np.random.default_rng(0)
    size = clip.info.image_size
    inputs = None
    if int8:
        x = rng.standard_normal((48, 3, size, size)).astype(np.float32)
        inputs = Int8Inputs(calibration=x[:32], clean=x[32:], triggered=x[32:])
        export.int8.AGREEMENT_BAR = 0.0  # random weights: speed only
    exported = build_heads(read_source(folder / "src"), clip, fp16=fp16, int8=inputs)
    with staged_dir(folder / "heads", "heads") as stage:
        write_heads(stage, exported)
    return folder / "heads"


def bench_precisions(heads_dir: Path, threads: tuple[int, ...], batches: tuple[int, ...], seconds: float) -> list:
    """img/s of every classifier graph in `heads_dir`, side by side in one run."""
    from cbpt_guard.artifacts import CLASSIFIER, fp16_name, int8_name, ort_session

    graphs = [g for g in (CLASSIFIER, fp16_name(CLASSIFIER), int8_name(CLASSIFIER)) if (heads_dir / g).is_file()]
    size = tuple(__import__("json").loads((heads_dir / "preprocess.json").read_text())["size"])
    rows = []
    for n in threads:
        sessions = {g: ort_session(heads_dir / g, threads=n, fp16="fp16" in g) for g in graphs}
        for batch in batches:
            x = np.random.default_rng(batch).standard_normal((batch, 3, *size)).astype(np.float32)
            ips = {
                g: _throughput(lambda s=s, x=x: s.run(None, {"pixel_values": x}), batch, seconds)
                for g, s in sessions.items()
            }
            rows.append((n, batch, ips))
    return rows


def print_precisions(title: str, rows: list) -> None:
    graphs = list(rows[0][2])
    print(f"\n| {title} | " + " | ".join(f"{g} img/s" for g in graphs) + " | int8 / fp32 |")
    print("|---" * (len(graphs) + 2) + "|")
    for n, batch, ips in rows:
        q = ips.get("classifier_int8.onnx")
        ratio = f"{q / ips['classifier.onnx']:.2f}x" if q else "-"
        print(f"| {n} thread(s), batch {batch} | " + " | ".join(f"{ips[g]:.1f}" for g in graphs) + f" | {ratio} |")


def cpu_peak_gflops(cores: int) -> tuple[float, str]:
    """fp32 peak: cores x clock x FLOP per cycle (two 256-bit FMA pipes: 2 x 8 lanes x 2 = 32;
    AVX-512: 64), from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text()
    mhz = float(next(line.split(":")[1] for line in info.splitlines() if line.startswith("cpu MHz")))
    flags = next(line for line in info.splitlines() if line.startswith("flags"))
    per_cycle = 64 if " avx512f" in flags else 32 if " fma" in flags else 8
    return cores * mhz / 1000 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument(
        "--precisions",
        action="store_true",
        help="fp32 / fp16 / int8 classifier.onnx at batch 1, 8, 32 and 1, 2 threads, instead",
    )
    ap.add_argument(
        "--heads",
        type=Path,
        nargs="*",
        default=[],
        help="with --precisions: also these exported heads (e.g. a testbed's, purified with --int8)",
    )
    args = ap.parse_args()
    from cbpt.model import load_clip

    with tempfile.TemporaryDirectory() as tmp:
        heads = export_random(args.arch, Path(tmp), int8=args.precisions, fp16=args.precisions)
        if args.precisions:
            rows = bench_precisions(heads, (1, 2), (1, 8, 32), args.seconds)
            print_precisions(f"{args.arch} (random weights)", rows)
            peak, how = cpu_peak_gflops(2)
            gflop = {"ViT-B-32": 8.8, "ViT-B-16": 35.1, "RN50": 8.2}.get(args.arch)
            if gflop:
                best = max(ips["classifier.onnx"] for n, _, ips in rows if n == 2)
                print(
                    f"\nfp32 at 2 threads: {best * gflop:.0f} GFLOP/s ({gflop} GFLOP per image), "
                    f"{best * gflop / peak:.0%} of this CPU's fp32 peak of {peak:.0f} GFLOP/s ({how})"
                )
            for extra in args.heads:
                print_precisions(str(extra), bench_precisions(extra, (1, 2), (1, 8, 32), args.seconds))
            return
        clip = load_clip(Path(tmp) / f"{args.arch}.pt")
        print(f"| {args.arch}, {args.threads} threads | open_clip eager img/s | classifier.onnx img/s | ratio |")
        print("|---|---|---|---|")
        for batch, eager, ort_ips, ratio in bench_models(heads, clip, args.threads, args.seconds):
            print(f"| batch {batch} | {eager:.1f} | {ort_ips:.1f} | {ratio:.2f}x |")
        s = bench_server(heads, args.threads, args.clients, args.seconds)
        print(
            f"\nserver, {s['clients']} clients, {args.seconds:.0f} s: {s['server_ips']:.1f} img/s vs raw onnxruntime "
            f"batch-32 {s['raw_ort_ips']:.1f} img/s ({s['ratio']:.0%}); p50 {s['p50_ms']:.0f} ms, p99 "
            f"{s['p99_ms']:.0f} ms; {s['requests']} requests, {s['errors']} errors"
        )


if __name__ == "__main__":
    main()
