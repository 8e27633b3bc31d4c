"""`cbpt-guard serve`: the runtime guard over HTTP.

Requests are decoded and preprocessed on worker threads, then queued for a micro-batcher
that packs whatever is waiting (up to `max_batch`, waiting at most `max_wait_ms` for more)
into one onnxruntime call, so concurrent clients share the accelerator. The queue is
bounded: when it is full the answer is 503 at once. Bad input is always a 4xx with
`{"error": ...}`; nothing a client sends can produce a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cbpt_guard.images import TooManyPixels, TruncatedImage, decode
from guard.classify import OnAlarm, make_record
from guard.heads import Heads
from guard.preprocess import preprocess
from guard.telemetry import Metrics, log_access


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server (docs/serving.md#limits)."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 32
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting for the model; beyond this: 503
    body_timeout_s: float = 30.0  # to receive a request's whole body, once its headers are in
    idle_timeout_s: float = 10.0  # for a connection to send its request headers (and between requests)
    max_connections: int = 512  # open connections and tasks; beyond this uvicorn answers 503


log = logging.getLogger("cbpt_guard.server")


class TopK(BaseModel):
    label: str
    index: int
    prob: float


class Result(BaseModel):
    """One image's answer."""

    label: str | None = Field(
        None, description="The most likely class; absent when the server abstains on a trigger alarm."
    )
    index: int | None = Field(None, description="Its index in /v1/model's classes.")
    probs: dict[str, float] | None = Field(None, description="Every class's probability (without top_k).")
    top_k: list[TopK] | None = Field(None, description="The K most likely classes (with top_k).")
    trigger_score: float | None = Field(
        None, description="Cosine of the image's features to the inverted trigger's region (purified heads only)."
    )
    trigger_alarm: bool | None = Field(
        None, description="trigger_score above the threshold calibrated at 1% false positives on clean shots."
    )


class ClassifyResponse(BaseModel):
    results: list[Result]


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong with the request, or why it could not be served.")


class Alarm(BaseModel):
    image: str = Field(description="The image's name: its multipart file name, or 'image' for a raw body.")
    trigger_score: float


class RejectedBody(ErrorBody):
    alarms: list[Alarm] = Field(description="The images whose trigger score raised the alarm.")


# The body is read as a stream (to enforce the size limit before buffering it all), so FastAPI
# cannot infer it: it is declared here for /openapi.json.
CLASSIFY_BODY = {
    "required": True,
    "content": {
        "image/*": {
            "schema": {"type": "string", "format": "binary"},
            "description": "One image (PNG, JPEG, WebP, ...) as the raw body.",
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "Several images, each a part named 'images'.",
                    }
                },
            }
        },
    },
}
ERRORS = {
    400: {"model": ErrorBody, "description": "Empty or malformed body."},
    401: {"model": ErrorBody, "description": "Missing or wrong API key (when the server has one)."},
    408: {"model": ErrorBody, "description": "The body arrived too slowly."},
    413: {"model": ErrorBody, "description": "Body, image or image count over the server's limits."},
    415: {"model": ErrorBody, "description": "Not a decodable image."},
    422: {
        "model": RejectedBody,
        "description": "Bad query parameter (top_k); or, with --on-alarm reject, an image raised the trigger alarm "
        "(the body lists them in `alarms`).",
    },
    503: {"model": ErrorBody, "description": "Queue full or model failure: retry shortly."},
}


class ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Overloaded(Exception):
    pass


class MicroBatcher:
    """Packs queued images into shared onnxruntime calls on one worker thread."""

    def __init__(self, heads: Heads, limits: ServerLimits, metrics: Metrics | None = None):
        self.heads, self.limits = heads, limits
        self.metrics = metrics or Metrics()
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
        now = time.perf_counter()
        for arr, fut in zip(arrays, futures):
            self.queue.put_nowait((arr, fut, now))
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
                except TimeoutError:
                    break
            start = time.perf_counter()
            for *_, queued in items:
                self.metrics.queue_seconds.observe(start - queued)
            self.metrics.batch_size.observe(len(items))
            batch = np.stack([a for a, *_ in items])
            try:
                out = await asyncio.to_thread(self.heads.run, batch)
            except Exception as e:  # the model failed: fail these requests, keep serving
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.metrics.inference_seconds.observe(time.perf_counter() - start)
            self.calls += 1
            self.images += len(items)
            for i, (_, fut, _) in enumerate(items):
                if not fut.done():
                    fut.set_result({k: v[i : i + 1] for k, v in out.items()})


@dataclass(frozen=True)
class Access:
    """Who may call the server: with an API key, every endpoint but /healthz needs
    `Authorization: Bearer KEY` (docs/serving.md#access)."""

    api_key: str | None = None

    def allows(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        # compared in constant time whatever the scheme: no timing oracle on the key
        return hmac.compare_digest(given.strip().encode(), self.api_key.encode()) and scheme.lower() == "bearer"


OPEN_PATHS = frozenset({"/healthz"})
KNOWN_PATHS = frozenset({"/healthz", "/v1/classify", "/v1/model", "/metrics", "/openapi.json", "/docs"})


def create_app(
    heads: Heads, limits: ServerLimits = ServerLimits(), access: Access = Access(), on_alarm: OnAlarm = OnAlarm.FLAG
):
    on_alarm = OnAlarm(on_alarm)
    from contextlib import asynccontextmanager

    metrics = Metrics(queue_depth=lambda: batcher.queue.qsize() if batcher.queue is not None else 0)
    batcher = MicroBatcher(heads, limits, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="cbpt-guard", version=heads.manifest.get("tool", ""), lifespan=lifespan)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def _guard_and_account(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        if path not in OPEN_PATHS and not access.allows(request.headers.get("authorization")):
            response = error(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        images, alarms = getattr(request.state, "images", 0), getattr(request.state, "alarms", 0)
        metrics.requests.labels(path=path if path in KNOWN_PATHS else "other", status=str(response.status_code)).inc()
        client = request.client.host if request.client else "-"
        log_access(request.method, path, response.status_code, time.perf_counter() - start, images, alarms, client)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc):  # 404, 405, ...: the same error body as every other refusal
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc):
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return error(422, f"invalid request: {where}")

    @app.exception_handler(Exception)
    async def _any(request, exc):  # the contract: never a 500, and never a silent failure
        log.error("unhandled error serving %s %s", request.method, request.url.path, exc_info=exc)
        return error(503, f"temporarily unable to classify: {type(exc).__name__}")

    @app.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model():
        m = heads.manifest
        return {
            "classes": heads.classes,
            "input_size": list(heads.spec.size),
            "embed_dim": m.get("embed_dim"),
            "architecture": m.get("architecture"),
            "source_checkpoint_sha256": m.get("source_checkpoint_sha256"),
            "embeddings_sha256": m.get("embeddings_sha256"),
            "files": m.get("files"),
            "trigger_alarm_threshold": heads.alarm_threshold,
            "route": m.get("route"),  # where the purified embeddings answer (None: for every image)
            "providers": heads.providers,
            "graph": heads.graph,
            "batching": {"max_batch": limits.max_batch, "max_wait_ms": limits.max_wait_ms},
        }

    async def _bodies(request: Request) -> list[tuple[str, bytes]]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ClientError(413, f"body of {declared} bytes exceeds the limit of {limits.max_body_bytes}")
        body = bytearray()
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limits.max_body_bytes:
                        raise ClientError(413, f"body exceeds the limit of {limits.max_body_bytes} bytes")
        except TimeoutError:
            raise ClientError(408, f"the body took longer than {limits.body_timeout_s:g} s to arrive") from None
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
            form = await MultiPartParser(
                Headers({"content-type": ctype}),
                stream(),
                max_files=limits.max_images + 1,
                max_fields=limits.max_images + 1,
            ).parse()
        except (MultiPartException, ValueError, KeyError) as e:
            if "Too many files" in str(e):  # starlette stops counting at its limit: the same refusal as ours
                raise ClientError(413, f"more images than the limit of {limits.max_images} per request") from None
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
        except TruncatedImage as e:
            raise ClientError(415, f"{name}: {e}") from None
        except TooManyPixels as e:
            raise ClientError(413, f"{name}: {e}") from None
        except Exception:  # Pillow raises many types on hostile data
            raise ClientError(415, f"{name}: not a decodable image") from None
        try:
            return preprocess(img, heads.spec)
        except Exception:
            raise ClientError(415, f"{name}: image could not be converted to RGB") from None

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        openapi_extra={"requestBody": CLASSIFY_BODY},
        summary="Classify one image or several",
    )
    async def classify(
        request: Request,
        top_k: int | None = Query(
            default=None, ge=1, description=("Return the K most likely classes instead of every class's probability.")
        ),
    ):
        try:
            files = await _bodies(request)
            arrays = [await asyncio.to_thread(_prepare, n, d) for n, d in files]
            outs = await batcher.submit(arrays)
        except ClientError as e:
            return error(e.status, str(e))
        except Overloaded:
            return error(503, "server overloaded: the queue is full; retry shortly", {"Retry-After": "1"})
        except ClientDisconnect:  # the client left mid-body: one line, not a traceback
            log.warning("client %s disconnected before its request was read", request.client)
            return error(400, "client disconnected")
        k = min(top_k, len(heads.classes)) if top_k else None
        results = [make_record(heads, name, out, 0, k, on_alarm) for (name, _), out in zip(files, outs)]
        for rec in results:
            metrics.classified(rec.get("label"), rec.get("trigger_alarm"))
        request.state.images = len(results)
        request.state.alarms = sum(bool(r.get("trigger_alarm")) for r in results)
        rejected = [r for r in results if r.get("trigger_alarm") and "error" in r]
        if rejected:  # --on-alarm reject: the whole request, naming each image that raised it
            body = {
                "error": f"{len(rejected)} image(s) raised the trigger alarm; rejected ({rejected[0]['error']})",
                "alarms": [{"image": r["path"], "trigger_score": r["trigger_score"]} for r in rejected],
            }
            return JSONResponse(body, status_code=422)
        for rec in results:
            rec.pop("path")
        return {"results": results}

    app.state.batcher = batcher
    app.state.metrics = metrics
    return app


def _protocol(idle_timeout_s: float):
    """uvicorn's h11 protocol with one deadline per request: its headers must be in within
    `idle_timeout_s` of the connection opening (or of the last response). uvicorn starts its
    idle timer only after a response and cancels it on every byte, so a client that connects
    and sends nothing, or trickles its headers, would hold a socket (a file descriptor) for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        def _arm(self, delay: float) -> None:
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(delay, self.timeout_keep_alive_handler)

        def _awaiting_request(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.time() + idle_timeout_s
            self._arm(idle_timeout_s)

        def data_received(self, data: bytes) -> None:
            waiting = self._awaiting_request()
            super().data_received(data)  # cancels the timer
            if waiting and self._awaiting_request() and not self.transport.is_closing():
                self._arm(max(0.0, self._deadline - self.loop.time()))  # still no whole request: same deadline

        def on_response_complete(self) -> None:
            self._deadline = self.loop.time() + idle_timeout_s
            super().on_response_complete()

    return DeadlineProtocol


def serve(
    heads: Heads,
    host: str,
    port: int,
    limits: ServerLimits,
    access: Access = Access(),
    root_path: str = "",
    on_alarm: OnAlarm = OnAlarm.FLAG,
) -> None:
    import uvicorn

    handler = logging.StreamHandler()  # the access log: one JSON line per request, on stderr
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name, level in (("cbpt_guard.access", logging.INFO), ("cbpt_guard.server", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    uvicorn.run(
        create_app(heads, limits, access, on_alarm),
        root_path=root_path,
        host=host,
        port=port,
        log_level="warning",
        http=_protocol(limits.idle_timeout_s),
        timeout_keep_alive=max(1, round(limits.idle_timeout_s)),
        limit_concurrency=limits.max_connections,
    )
