"""The HTTP guard: the API (README, docs/serving.md), every bad-input class, overload, micro-batching,
and fuzzing that never produces a 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("fastapi")


def _png(size=(40, 30), seed=0, blank=False) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if blank:  # compresses to almost nothing: a small body that decodes to many pixels
        arr[:] = 0
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def loaded(original_heads):
    from guard.heads import load_heads

    return load_heads(original_heads)


@pytest.fixture()
def client(loaded):
    from fastapi.testclient import TestClient

    from guard.server import ServerLimits, create_app

    limits = ServerLimits(max_body_bytes=200_000, max_pixels=250_000, max_images=4)
    with TestClient(create_app(loaded, limits)) as c:
        yield c


def test_health_model_and_openapi(client, loaded):
    assert client.get("/healthz").status_code == 200
    m = client.get("/v1/model").json()
    assert m["classes"] == loaded.classes and m["input_size"] == [32, 32] and len(m["embeddings_sha256"]) == 64
    assert m["route"] is None  # the original prompts' heads: one set of embeddings answers every image
    assert {"/v1/classify", "/v1/model", "/healthz"} <= set(client.get("/openapi.json").json()["paths"])


def test_raw_body_and_multipart(client, loaded):
    r = client.post("/v1/classify", content=_png())
    assert r.status_code == 200
    res = r.json()["results"]
    assert len(res) == 1 and res[0]["label"] in loaded.classes and abs(sum(res[0]["probs"].values()) - 1) < 1e-4
    r = client.post(
        "/v1/classify?top_k=3", files=[("images", ("a.png", _png(seed=1))), ("images", ("b.png", _png(seed=2)))]
    )
    assert r.status_code == 200
    assert [len(x["top_k"]) for x in r.json()["results"]] == [3, 3]


@pytest.mark.parametrize(
    "make, status, needle",
    [
        (lambda: {"content": b""}, 400, "empty body"),
        (lambda: {"content": b"definitely not an image"}, 415, "not a decodable image"),
        (lambda: {"content": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}, 415, "not a decodable image"),
        (lambda: {"content": b"x" * 300_000}, 413, "exceeds the limit"),
        (lambda: {"content": _png((600, 600), blank=True)}, 413, "more than the limit"),
        (lambda: {"files": [("images", (f"{i}.png", _png(seed=i))) for i in range(5)]}, 413, "exceed the limit of 4"),
        (lambda: {"files": [("other", ("a.png", _png()))]}, 400, "no 'images' field"),
        (lambda: {"files": [("images", ("a.png", b""))]}, 400, "empty image"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message(client, make, status, needle):
    r = client.post("/v1/classify", **make())
    assert r.status_code == status
    assert needle in r.json()["error"]


def test_bad_top_k_is_a_4xx(client):
    r = client.post("/v1/classify?top_k=0", content=_png())
    assert r.status_code == 422 and set(r.json()) == {"error"} and "top_k" in r.json()["error"]


def test_openapi_describes_the_classify_api(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/classify"]["post"]
    body = op["requestBody"]["content"]
    assert body["image/*"]["schema"]["format"] == "binary"
    assert body["multipart/form-data"]["schema"]["properties"]["images"]["type"] == "array"
    assert [p["name"] for p in op["parameters"]] == ["top_k"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    result = spec["components"]["schemas"]["Result"]["properties"]
    assert ok == "ClassifyResponse" and {"label", "index", "probs", "top_k", "trigger_score", "trigger_alarm"} <= set(
        result
    )
    for status in ("400", "413", "415", "503"):
        assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody"), status
    rejected = spec["components"]["schemas"]["RejectedBody"]["properties"]  # 422: a bad top_k, or --on-alarm reject
    assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/RejectedBody")
    assert {"error", "alarms"} <= set(rejected)


def test_a_bug_is_a_logged_503_not_a_silent_one(loaded, caplog):
    from fastapi.testclient import TestClient

    from guard.server import create_app

    class Broken:
        def __getattr__(self, name):
            return getattr(loaded, name)

        def run(self, _x):
            raise RuntimeError("model exploded")

    with (
        TestClient(create_app(Broken()), raise_server_exceptions=False) as c,
        caplog.at_level("ERROR", logger="cbpt_guard.server"),
    ):
        r = c.post("/v1/classify", content=_png())
    assert r.status_code == 503 and r.json() == {"error": "temporarily unable to classify: RuntimeError"}
    assert any(rec.exc_info and "model exploded" in str(rec.exc_info[1]) for rec in caplog.records)


def test_overload_answers_503(loaded):
    from guard.server import MicroBatcher, Overloaded, ServerLimits

    async def flood():
        b = MicroBatcher(loaded, ServerLimits(max_queue=2))
        await b.start()
        x = np.zeros((3, 32, 32), np.float32)
        with pytest.raises(Overloaded):
            await b.submit([x, x, x])
        await b.stop()

    asyncio.run(flood())


def test_concurrent_requests_share_onnxruntime_calls(loaded):
    import httpx

    from guard.server import ServerLimits, create_app

    app = create_app(loaded, ServerLimits(max_batch=32, max_wait_ms=50))

    async def burst():
        await app.state.batcher.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            rs = await asyncio.gather(*[c.post("/v1/classify", content=_png(seed=i)) for i in range(16)])
        await app.state.batcher.stop()
        return rs

    rs = asyncio.run(burst())
    assert all(r.status_code == 200 for r in rs)
    assert app.state.batcher.images == 16 and app.state.batcher.calls < 16


@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    body=st.one_of(
        st.binary(max_size=512),
        st.binary(max_size=64).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        st.binary(max_size=64).map(lambda b: b"\xff\xd8\xff" + b),
        st.binary(max_size=64).map(lambda b: b"GIF89a" + b),
        st.binary(max_size=64).map(lambda b: b'--x\r\nContent-Disposition: form-data; name="images"\r\n\r\n' + b),
    ),
    multipart=st.booleans(),
)
def test_fuzzed_bodies_never_produce_a_5xx(client, body, multipart):
    headers = {"content-type": "multipart/form-data; boundary=x"} if multipart else {}
    r = client.post("/v1/classify", content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.status_code == 200 or "error" in r.json()


def test_health_answers_head_and_refusals_share_one_error_body(client):
    assert client.head("/healthz").status_code == 200
    r = client.get("/v1/classify")
    assert r.status_code == 405 and set(r.json()) == {"error"}
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_a_full_queue_says_when_to_retry(loaded):
    from fastapi.testclient import TestClient

    from guard.server import ServerLimits, create_app

    with TestClient(create_app(loaded, ServerLimits(max_queue=0))) as c:
        r = c.post("/v1/classify", content=_png())
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]


def test_a_truncated_image_is_refused_not_read_as_black(client):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    liar = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 400, 300, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" + bytes(400)))
        + chunk(b"IEND", b"")
    )
    r = client.post("/v1/classify", content=liar)
    assert r.status_code == 415 and "truncated" in r.json()["error"]


def test_idle_connections_are_closed(loaded):
    """A client that connects and sends nothing is dropped after the idle timeout, so idle
    sockets cannot exhaust the server's file descriptors (uvicorn alone keeps them for ever)."""
    import socket
    import time

    with _live_server(loaded, 0.5) as port:
        idle = socket.create_connection(("127.0.0.1", port))
        idle.settimeout(10)
        t0 = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server
        assert time.monotonic() - t0 < 5
        idle.close()


def test_a_client_that_trickles_its_headers_is_cut_off(loaded):
    import socket
    import time

    with _live_server(loaded, 0.6) as port:
        # a polite client is served, and may send a second request on the same connection
        with socket.create_connection(("127.0.0.1", port)) as polite:
            for _ in range(2):
                polite.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while b'"ok"}' not in answer:
                    answer += polite.recv(4096)
                assert answer.startswith(b"HTTP/1.1 200")
        slow = socket.create_connection(("127.0.0.1", port))
        slow.settimeout(10)
        t0 = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        for _ in range(40):  # one header byte every 0.1 s: each resets uvicorn's own timer
            try:
                slow.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed or slow.recv(1) == b""
        assert time.monotonic() - t0 < 3
        slow.close()


def _metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_count_requests_images_alarms_and_batches(purified):
    from fastapi.testclient import TestClient

    from guard.heads import load_heads
    from guard.server import create_app

    heads = load_heads(purified)
    with TestClient(create_app(heads)) as c:
        before = c.get("/metrics").text
        results = c.post("/v1/classify", files=[("images", (f"{i}.png", _png(seed=i))) for i in range(3)]).json()
        assert c.post("/v1/classify", content=b"junk").status_code == 415
        text = c.get("/metrics").text
    assert _metric(before, "cbpt_guard_images_total") == 0
    labels = [r["label"] for r in results["results"]]
    for label in set(labels):
        assert _metric(text, "cbpt_guard_images_total", label=label) == labels.count(label)
    alarms = sum(r["trigger_alarm"] for r in results["results"])
    assert _metric(text, "cbpt_guard_trigger_alarms_total") == alarms
    assert _metric(text, "cbpt_guard_trigger_alarm_rate") == pytest.approx(alarms / 3)
    assert _metric(text, "cbpt_guard_requests_total", path="/v1/classify", status="200") == 1
    assert _metric(text, "cbpt_guard_requests_total", path="/v1/classify", status="415") == 1
    assert _metric(text, "cbpt_guard_batch_size_sum") == 3 and _metric(text, "cbpt_guard_inference_seconds_count") >= 1
    assert _metric(text, "cbpt_guard_queue_seconds_count") == 3 and _metric(text, "cbpt_guard_queue_depth") == 0


def test_the_alarm_rate_is_over_a_recent_window():
    from guard.telemetry import AlarmWindow

    w = AlarmWindow(seconds=60)
    for t, alarm in ((0, True), (10, False), (50, True), (60, True)):
        w.add(alarm, now=t)
    assert w.rate(now=65) == pytest.approx(2 / 3)  # the alarm at t=0 has left the window
    assert w.rate(now=75) == pytest.approx(1.0)  # and the quiet image at t=10
    assert w.rate(now=1000) == 0.0


def test_an_api_key_guards_every_endpoint_but_health(loaded, monkeypatch):
    import hmac

    from fastapi.testclient import TestClient

    import guard.server
    from guard.server import Access, create_app

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(guard.server.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    key = "k" * 32
    with TestClient(create_app(loaded, access=Access(key))) as c:
        assert c.get("/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            for path in ("/v1/model", "/metrics", "/openapi.json"):
                r = c.get(path, headers=headers)
                assert r.status_code == 401 and r.json() == {"error": "missing or wrong API key"}, (path, headers)
        assert c.post("/v1/classify", content=_png()).status_code == 401
        ok = {"Authorization": f"Bearer {key}"}
        assert c.get("/v1/model", headers=ok).status_code == 200
        assert c.post("/v1/classify", content=_png(), headers=ok).status_code == 200
    assert compared  # the comparison is hmac's constant-time one


def test_each_request_leaves_one_access_log_line(loaded, caplog):
    import json

    from fastapi.testclient import TestClient

    from guard.server import create_app

    with TestClient(create_app(loaded)) as c, caplog.at_level("INFO", logger="cbpt_guard.access"):
        c.post("/v1/classify", files=[("images", ("a.png", _png(seed=1))), ("images", ("b.png", _png(seed=2)))])
        c.get("/healthz")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "cbpt_guard.access"]
    assert [(x["method"], x["path"], x["status"], x["images"]) for x in lines] == [
        ("POST", "/v1/classify", 200, 2),
        ("GET", "/healthz", 200, 0),
    ]
    assert set(lines[0]) == {"method", "path", "status", "images", "alarms", "latency_ms", "client"}
    assert lines[0]["latency_ms"] > 0 and "png" not in json.dumps(lines)


@contextlib.contextmanager
def _live_server(loaded, idle_timeout_s: float):
    """The guard on a real uvicorn (with our protocol) on a free loopback port; yields the port."""
    import socket
    import threading
    import time

    import uvicorn

    from guard.server import ServerLimits, _protocol, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits = ServerLimits(idle_timeout_s=idle_timeout_s)
    config = uvicorn.Config(
        create_app(loaded, limits),
        host="127.0.0.1",
        port=port,
        log_level="error",
        http=_protocol(limits.idle_timeout_s),
        timeout_keep_alive=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_client_that_leaves_mid_body_is_one_log_line(loaded, caplog):
    import socket
    import time

    with caplog.at_level("WARNING", logger="cbpt_guard.server"), _live_server(loaded, 5.0) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + bytes(10))
            time.sleep(0.3)
        time.sleep(1.0)
    lines = [r for r in caplog.records if r.name == "cbpt_guard.server"]
    assert len(lines) == 1 and "disconnected" in lines[0].getMessage() and lines[0].exc_info is None
