"""The route: where the purified class embeddings answer and where the original ones do.

One set of class embeddings is one linear head, and on the backdoored models we measured no
linear head, not even one fitted to the real trigger, both sends the triggered images back and
keeps every clean decision: the clean images lost are those nearest the backdoor's region,
many of them the target class's own (docs/results.md#routing). So the purified embeddings answer only for
images in the neighbourhood of a trigger CBPT tuned against (cosine to its mean triggered
feature above a threshold), and the original embeddings everywhere else. The thresholds are
calibrated on the clean shots: `share` of them are routed (docs/method.md#routing).

A found backdoor's target gates the route too: an image the original embeddings assign to it
is routed whatever its cosines. A trigger wins only where the original embeddings answer its
target, and the real trigger's images are not all near the inverted triggers' (docs/method.md#target-gate).

Numpy only: cbpt computes the route, export bakes it into the ONNX head, testbed scores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

# the tensors of embeddings.safetensors that hold a route
CENTROIDS, THRESHOLDS, SHARE, TARGETS = "route_centroids", "route_thresholds", "route_share", "route_targets"


@dataclass(frozen=True)
class Route:
    """Images whose unit feature has cosine > `thresholds[k]` to `centroids[k]` for some k, or
    that `original` assigns to one of `targets`, are routed to the purified embeddings; the
    others are scored by `original`."""

    centroids: np.ndarray  # [K, D] unit: each tuned trigger's mean triggered feature
    thresholds: np.ndarray  # [K]
    share: float  # of the clean calibration shots routed by their cosines
    original: np.ndarray  # [C, D] the embeddings that answer outside the route
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [T] a found backdoor's

    def routed(self, unit: np.ndarray) -> np.ndarray:
        """[N] bool for unit image features [N, D]."""
        return self._routed(unit, unit @ self.original.T if len(self.targets) else None)

    def _routed(self, unit: np.ndarray, original_cos: np.ndarray | None) -> np.ndarray:
        near = (unit @ self.centroids.T > self.thresholds[None, :]).any(axis=1)
        if not len(self.targets):
            return near
        return near | np.isin(original_cos.argmax(axis=1), self.targets)

    def cosines(self, unit: np.ndarray, purified: np.ndarray) -> np.ndarray:
        """[N, C] cosines to the class embeddings that answer for each image."""
        original_cos = unit @ self.original.T  # the gate's answer and the unrouted images' cosines
        return np.where(self._routed(unit, original_cos)[:, None], unit @ purified.T, original_cos)

    def ungated(self) -> Route:
        """The same route without the target gate: the cosines alone decide."""
        return replace(self, targets=np.zeros(0, dtype=np.int64))

    def reordered(self, rows: list[int]) -> Route:
        """The same route with the original embeddings' rows (and the targets) in another class
        order: row i of the result is row `rows[i]` of this one."""
        where = {old: new for new, old in enumerate(rows)}
        targets = np.array([where[int(t)] for t in self.targets], dtype=np.int64)
        return Route(self.centroids, self.thresholds, self.share, self.original[rows], targets)

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            CENTROIDS: self.centroids.astype(np.float32),
            THRESHOLDS: self.thresholds.astype(np.float32),
            SHARE: np.array([self.share], dtype=np.float32),
            TARGETS: self.targets.astype(np.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], original: np.ndarray) -> Route | None:
        """The route stored beside `original` (None: the purified embeddings answer everywhere)."""
        if CENTROIDS not in tensors:
            return None
        return cls(
            np.asarray(tensors[CENTROIDS], dtype=np.float32),
            np.asarray(tensors[THRESHOLDS], dtype=np.float32).ravel(),
            round(float(np.asarray(tensors[SHARE]).ravel()[0]), 6),  # stored as float32
            np.asarray(original, dtype=np.float32),
            # heads written before the target gate have none
            np.asarray(tensors.get(TARGETS, np.zeros(0)), dtype=np.int64).ravel(),
        )

    def describe(self) -> dict:
        return {
            "share": self.share,
            "triggers": int(self.centroids.shape[0]),
            "thresholds": self.thresholds.tolist(),
            "targets": self.targets.tolist(),
        }


def calibrate_route(
    clean: np.ndarray, centroids: np.ndarray, share: float, original: np.ndarray, targets: Sequence[int] = ()
) -> Route:
    """The route that sends `share` of the clean unit features `clean` [N, D] to the purified
    embeddings by their cosines: each centroid's threshold is the same upper quantile of its
    clean cosines, the level found by bisection so that their union routes `share` of `clean`.
    Images `original` assigns to one of `targets` are routed besides."""
    if not 0 < share < 1:
        raise ValueError(f"the routed share of clean shots must be in (0, 1), got {share}")
    scores = clean @ centroids.T  # [N, K]

    def at(level: float) -> tuple[np.ndarray, float]:
        t = np.quantile(scores, 1 - level, axis=0)
        return t, float((scores > t[None, :]).any(axis=1).mean())

    lo, hi = 0.0, share  # each centroid's own share; the union's is at least that, at most K times
    for _ in range(40):
        mid = (lo + hi) / 2
        if at(mid)[1] <= share:
            lo = mid
        else:
            hi = mid
    thresholds, _ = at(lo)
    return Route(
        centroids.astype(np.float32),
        thresholds.astype(np.float32),
        share,
        original.astype(np.float32),
        np.array(sorted(set(targets)), dtype=np.int64),
    )
