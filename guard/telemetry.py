"""What a platform team alerts on: Prometheus metrics and one structured access-log line per
request. The rising trigger-alarm rate is the sign of an attack in progress
(docs/serving.md#metrics)."""

from __future__ import annotations

import json
import logging
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

access_log = logging.getLogger("cbpt_guard.access")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class AlarmWindow:
    """The share of images that raised the trigger alarm over the last `seconds`."""

    def __init__(self, seconds: float = 300.0):
        self.seconds = seconds
        self.events: deque[tuple[float, bool]] = deque()

    def _prune(self, now: float) -> None:
        while self.events and self.events[0][0] < now - self.seconds:
            self.events.popleft()

    def add(self, alarm: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.events.append((now, alarm))
        self._prune(now)  # bounded by the window whether or not /metrics is scraped

    def rate(self, now: float | None = None) -> float:
        self._prune(time.monotonic() if now is None else now)
        return sum(a for _, a in self.events) / len(self.events) if self.events else 0.0


class Metrics:
    """One registry per app (no process-wide state): counters, gauges and histograms of the
    guard. `queue_depth` is read from the batcher at scrape time."""

    def __init__(self, queue_depth=lambda: 0, window_s: float = 300.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cbpt_guard_requests", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.images = Counter("cbpt_guard_images", "Images classified, by label", ["label"], registry=r)
        self.alarms = Counter("cbpt_guard_trigger_alarms", "Images whose trigger score raised the alarm", registry=r)
        self.window = AlarmWindow(window_s)
        Gauge(
            "cbpt_guard_trigger_alarm_rate",
            f"Share of images that raised the alarm over the last {window_s:g} s",
            registry=r,
        ).set_function(self.window.rate)
        Gauge("cbpt_guard_queue_depth", "Images waiting for the model", registry=r).set_function(queue_depth)
        self.queue_seconds = Histogram(
            "cbpt_guard_queue_seconds", "Time an image waited for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "cbpt_guard_inference_seconds", "Time of one onnxruntime call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "cbpt_guard_batch_size", "Images per onnxruntime call", buckets=BATCH_BUCKETS, registry=r
        )

    def classified(self, label: str | None, alarm: bool | None) -> None:
        """One image answered; label None when the alarm withheld it (--on-alarm reject/abstain)."""
        self.images.labels(label=WITHHELD if label is None else label).inc()
        if alarm is not None:
            self.window.add(alarm)
            if alarm:
                self.alarms.inc()


WITHHELD = "(withheld)"  # the images_classified label of an image answered without a class


def log_access(method: str, path: str, status: int, seconds: float, images: int, alarms: int, client: str) -> None:
    """One JSON line per request: what was asked and answered, never the image."""
    access_log.info(
        json.dumps(
            {
                "method": method,
                "path": path,
                "status": status,
                "images": images,
                "alarms": alarms,
                "latency_ms": round(seconds * 1000, 2),
                "client": client,
            }
        )
    )
