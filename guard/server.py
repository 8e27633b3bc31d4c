"""`cbpt-guard serve`: the runtime guard over HTTP.

Requests are decoded and preprocessed on worker threads, then queued for a micro-batcher
that packs whatever is waiting (up to `max_batch`, waiting at most `max_wait_ms` for more)
into one onnxruntime call, so concurrent clients share the accelerator. The queue is
bounded: when it is full the answer is 503 at once. Bad input is always a 4xx with
`{"error": ...}`; nothing a client sends can produce a 500.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from guard.classify import make_record
from guard.heads import Heads
from guard.preprocess import decode, preprocess


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 32
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting for the model; beyond this: 503


class ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Overloaded(Exception):
    pass


class MicroBatcher:
    """Packs queued images into shared onnxruntime calls on one worker thread."""

    def __init__(self, heads: Heads, limits: ServerLimits):
        self.heads, self.limits = heads, limits
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.calls = 0
        self.images = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.limits.max_queue)
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def submit(self, arrays: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        assert self.queue is not None
        if self.queue.qsize() + len(arrays) > self.limits.max_queue:
            raise Overloaded()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in arrays]
        for arr, fut in zip(arrays, futures):
            self.queue.put_nowait((arr, fut))
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        assert self.queue is not None
        while True:
            items = [await self.queue.get()]
            deadline = time.perf_counter() + self.limits.max_wait_ms / 1000
            while len(items) < self.limits.max_batch:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            batch = np.stack([a for a, _ in items])
            try:
                out = await asyncio.to_thread(self.heads.run, batch)
            except Exception as e:  # the model failed: fail these requests, keep serving
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.calls += 1
            self.images += len(items)
            for i, (_, fut) in enumerate(items):
                if not fut.done():
                    fut.set_result({k: v[i:i + 1] for k, v in out.items()})


def create_app(heads: Heads, limits: ServerLimits = ServerLimits()):
    from contextlib import asynccontextmanager

    batcher = MicroBatcher(heads, limits)

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="cbpt-guard", version=heads.manifest.get("tool", ""), lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(Exception)
    async def _any(_request, exc):  # the contract: never a 500
        return error(503, f"temporarily unable to classify: {type(exc).__name__}")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model():
        m = heads.manifest
        return {"classes": heads.classes, "input_size": list(heads.spec.size), "embed_dim": m.get("embed_dim"),
                "architecture": m.get("architecture"), "source_checkpoint_sha256": m.get("source_checkpoint_sha256"),
                "embeddings_sha256": m.get("embeddings_sha256"), "files": m.get("files"),
                "trigger_alarm_threshold": heads.alarm_threshold, "providers": heads.providers,
                "graph": heads.graph, "batching": {"max_batch": limits.max_batch, "max_wait_ms": limits.max_wait_ms}}

    async def _bodies(request: Request) -> list[tuple[str, bytes]]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ClientError(413, f"body of {declared} bytes exceeds the limit of {limits.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ClientError(413, f"body exceeds the limit of {limits.max_body_bytes} bytes")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            return await _multipart(bytes(body), ctype)
        if not body:
            raise ClientError(400, "empty body: send one image as the body, or several as multipart 'images'")
        return [("image", bytes(body))]

    async def _multipart(body: bytes, ctype: str) -> list[tuple[str, bytes]]:
        from starlette.datastructures import Headers
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(Headers({"content-type": ctype}), stream(),
                                         max_files=limits.max_images + 1, max_fields=limits.max_images + 1).parse()
        except (MultiPartException, ValueError, KeyError) as e:
            raise ClientError(400, f"malformed multipart body: {e}") from None
        files = []
        for key, value in form.multi_items():
            if key != "images":
                continue
            data = await value.read() if hasattr(value, "read") else str(value).encode()
            files.append((getattr(value, "filename", None) or f"image{len(files)}", data))
        if not files:
            raise ClientError(400, "multipart body has no 'images' field")
        if len(files) > limits.max_images:
            raise ClientError(413, f"{len(files)} images exceed the limit of {limits.max_images} per request")
        return files

    def _prepare(name: str, data: bytes) -> np.ndarray:
        if not data:
            raise ClientError(400, f"{name}: empty image")
        try:
            img = decode(data, limits.max_pixels)
        except ValueError as e:
            if "more than the limit" in str(e):
                raise ClientError(413, f"{name}: {e}") from None
            raise ClientError(415, f"{name}: not a decodable image") from None
        except Exception:  # Pillow raises many types on hostile data
            raise ClientError(415, f"{name}: not a decodable image") from None
        try:
            return preprocess(img, heads.spec)
        except Exception:
            raise ClientError(415, f"{name}: image could not be converted to RGB") from None

    @app.post("/v1/classify")
    async def classify(request: Request, top_k: int | None = Query(default=None, ge=1)):
        try:
            files = await _bodies(request)
            arrays = [await asyncio.to_thread(_prepare, n, d) for n, d in files]
            outs = await batcher.submit(arrays)
        except ClientError as e:
            return error(e.status, str(e))
        except Overloaded:
            return error(503, "server overloaded: the queue is full; retry shortly")
        k = min(top_k, len(heads.classes)) if top_k else None
        results = []
        for (name, _), out in zip(files, outs):
            rec = make_record(heads, name, out, 0, k)
            rec.pop("path")
            results.append(rec)
        return {"results": results}

    app.state.batcher = batcher
    return app


def serve(heads: Heads, host: str, port: int, limits: ServerLimits) -> None:
    import uvicorn

    uvicorn.run(create_app(heads, limits), host=host, port=port, log_level="warning")
