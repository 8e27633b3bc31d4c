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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()
    import open_clip
    import torch

    from cbpt.model import load_clip
    from cbpt.purify import write_original
    from export.package import export_heads, read_source

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{args.arch}.pt"
        torch.save(open_clip.create_model(args.arch, pretrained=None).state_dict(), ckpt)
        clip = load_clip(ckpt)
        write_original(clip, tuple(f"class {i}" for i in range(10)), Path(tmp) / "src")
        export_heads(read_source(Path(tmp) / "src"), Path(tmp) / "heads", clip=clip)
        print(f"| {args.arch}, {args.threads} threads | open_clip eager img/s | classifier.onnx img/s | ratio |")
        print("|---|---|---|---|")
        for batch, eager, ort_ips, ratio in bench_models(Path(tmp) / "heads", clip, args.threads, args.seconds):
            print(f"| batch {batch} | {eager:.1f} | {ort_ips:.1f} | {ratio:.2f}x |")
        s = bench_server(Path(tmp) / "heads", args.threads, args.clients, args.seconds)
        print(
            f"\nserver, {s['clients']} clients, {args.seconds:.0f} s: {s['server_ips']:.1f} img/s vs raw onnxruntime "
            f"batch-32 {s['raw_ort_ips']:.1f} img/s ({s['ratio']:.0%}); p50 {s['p50_ms']:.0f} ms, p99 "
            f"{s['p99_ms']:.0f} ms; {s['requests']} requests, {s['errors']} errors"
        )


if __name__ == "__main__":
    main()
