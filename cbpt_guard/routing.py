"""The route: where the purified class embeddings answer and where the original ones do.

One set of class embeddings is one linear head, and on the backdoored models we measured no
linear head, not even one fitted to the real trigger, both sends the triggered images back and
keeps every clean decision: the clean images lost are those nearest the backdoor's region,
many of them the target class's own (docs/results.md#routing). So the purified embeddings answer only for
images in the neighbourhood of a trigger CBPT tuned against (cosine to its mean triggered
feature above a threshold), and the original embeddings everywhere else. The thresholds are
calibrated on the clean shots: `share` of them are routed (docs/method.md#routing).

A found backdoor's target gates the route too: an image the original embeddings assign to it
is routed whatever its cosines, where it lies on the triggers' side of the target's own clean
shots (`TriggerSide`). A trigger wins only where the original embeddings answer its target, and
the real trigger's images are not all near the inverted triggers' (docs/method.md#target-gate);
the target's own images are the CA the tuned embeddings spend (docs/method.md#trigger-side).

Numpy only: cbpt computes the route, export bakes it into the ONNX head, testbed scores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np

# the tensors of embeddings.safetensors that hold a route
CENTROIDS, THRESHOLDS, SHARE, TARGETS = "route_centroids", "route_thresholds", "route_share", "route_targets"
SIDE_DIRECTIONS, SIDE_THRESHOLDS = "route_side_directions", "route_side_thresholds"
# how many spreads short of the copies' mean the trigger side's bar may fall (`TriggerSide.calibrate`);
# chosen on the zoo's fit part (docs/results.md#the-trigger-side)
SIDE_REACH = 4.0


class TargetGate(StrEnum):
    """Which of the images the original embeddings assign to a found target are routed."""

    EVERY = "every"  # all of them
    TRIGGER_SIDE = "trigger-side"  # those on the triggers' side of the target's own clean shots (`TriggerSide`)


@dataclass(frozen=True)
class TriggerSide:
    """How far an image lies along each found target's trigger direction: the mean feature of
    the triggered copies aimed at the target less the mean of the target's own clean shots,
    whitened by how clean images of one class already vary (row t for target t of the route).
    A backdoor's triggered images share the region around the target with the target's own
    images, but sit apart from them along the trigger's shift (docs/method.md#trigger-side). An
    image the original embeddings give target t is on the triggers' side unless it lies below row
    t's threshold: within the reach of the target's own shots, and out of the reach of triggered
    images, however partly the trigger is applied (`calibrate`)."""

    directions: np.ndarray  # [T, D] unit
    thresholds: np.ndarray  # [T]

    def margins(self, unit: np.ndarray) -> np.ndarray:
        """[N, T] how far past each target's threshold unit image features [N, D] lie."""
        return unit @ self.directions.T - self.thresholds[None, :]

    @classmethod
    def calibrate(
        cls,
        own: Sequence[np.ndarray],
        copies: Sequence[np.ndarray],
        scatter: np.ndarray | None = None,
        reach: float = SIDE_REACH,
        shrink: float = 1.0,
        partial: Sequence[np.ndarray] | None = None,
    ) -> TriggerSide:
        """Row t from target t's own clean unit features `own[t]` [M, D] and the triggered copies
        aimed at it `copies[t]` [P, D]. The direction is the difference of their means through
        the inverse of `scatter` [D, D] (`within_class_scatter` of the clean shots; None: the
        identity) shrunk toward its mean variance by `shrink`: a shift along which one class's
        clean images already vary tells less (Fisher's discriminant; docs/method.md#trigger-side).
        The threshold is the furthest own shot's projection, or, where lower, the copies' mean
        less `reach` spreads (the larger of the copies' and the own shots' standard deviation
        along the direction): the real trigger's images spread wider than the inverted
        triggers' copies, and where the copies stand less than `reach` spreads from the own
        shots, the gate takes every image given the target, as `TargetGate.EVERY`.

        `partial[t]`, where given, holds the unit features of the partial copies the original
        embeddings give target t (the inverted triggers partly applied to other classes' shots):
        the reach is how low the bar may fall, and it falls no lower than the lowest of them,
        never above the furthest own shot. No triggered image the partial copies show reaching
        the target is let by; below them the target's own images keep the original embeddings
        (docs/method.md#partial-triggers)."""
        partial = [np.zeros((0, 0))] * len(own) if partial is None else partial
        directions, thresholds = [], []
        for (w, po, pc), reached in zip(_projections(own, copies, scatter, shrink), partial, strict=True):
            directions.append(w)
            floor = float((reached @ w).min()) if len(reached) else -np.inf  # none reached: the reach alone
            thresholds.append(min(po.max(), max(pc.mean() - reach * _spread(po, pc), floor)))
        return cls(np.asarray(directions, dtype=np.float32), np.asarray(thresholds, dtype=np.float32))


def copies_apart(
    own: Sequence[np.ndarray], copies: Sequence[np.ndarray], scatter: np.ndarray | None = None, shrink: float = 1.0
) -> np.ndarray:
    """[T] how far the copies aimed at each target stand from its own clean shots along
    `TriggerSide.calibrate`'s direction: the difference of their mean projections, in the spreads
    its reach is counted in. Large where a backdoor sends its triggered images to a region of the
    target's that its own images do not reach (docs/method.md#push-off)."""
    rows = _projections(own, copies, scatter, shrink)
    return np.asarray([(pc.mean() - po.mean()) / max(_spread(po, pc), 1e-12) for _, po, pc in rows], dtype=np.float64)


def _spread(po: np.ndarray, pc: np.ndarray) -> np.floating:
    """The larger of the own shots' and the copies' standard deviation along a side's direction."""
    return max(pc.std(), po.std())


def _projections(
    own: Sequence[np.ndarray], copies: Sequence[np.ndarray], scatter: np.ndarray | None, shrink: float
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per target: the unit whitened direction from its own shots' mean to its copies' mean, and
    the own shots' and the copies' projections on it (`TriggerSide.calibrate`)."""
    d = own[0].shape[1] if len(own) else 0
    s = np.eye(d) if scatter is None else np.asarray(scatter, dtype=np.float64)
    whiten = s + shrink * np.trace(s) / max(d, 1) * np.eye(d)
    rows = []
    for o, c in zip(own, copies, strict=True):
        if not len(o) or not len(c):
            raise ValueError("the trigger side needs each target's own shots and copies aimed at it")
        w = np.linalg.solve(whiten, c.mean(axis=0) - o.mean(axis=0))
        w = (w / np.linalg.norm(w)).astype(np.float32)  # unit: projections within [-1, 1], as fp16 heads need
        rows.append((w, o @ w, c @ w))  # with the stored direction, so the furthest own shot sits on the bar
    return rows


def within_class_scatter(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[D, D] the covariance of `features` [N, D] about their own class's mean (`labels` [N])."""
    x = np.asarray(features, dtype=np.float64)
    _, row_class = np.unique(labels, return_inverse=True)
    means = np.zeros((row_class.max(initial=-1) + 1, x.shape[1]))
    np.add.at(means, row_class, x)
    centred = x - (means / np.maximum(np.bincount(row_class), 1)[:, None])[row_class]
    return centred.T @ centred / max(len(x), 1)


@dataclass(frozen=True)
class Route:
    """Images whose unit feature has cosine > `thresholds[k]` to `centroids[k]` for some k, or
    that `original` assigns to one of `targets` (and, with a `side`, lie on that target's
    triggers' side), are routed to the purified embeddings; the others are scored by `original`.
    With a `side`, an image assigned to a target is routed by that test alone, its cosines aside."""

    centroids: np.ndarray  # [K, D] unit: each tuned trigger's mean triggered feature
    thresholds: np.ndarray  # [K]
    share: float  # of the clean calibration shots routed by their cosines
    original: np.ndarray  # [C, D] the embeddings that answer outside the route
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [T] a found backdoor's
    side: TriggerSide | None = None  # row t for targets[t]; None: every image assigned to a target is routed

    def __post_init__(self):
        if self.side is not None and len(self.side.thresholds) != len(self.targets):
            raise ValueError(f"the trigger side has {len(self.side.thresholds)} rows for {len(self.targets)} targets")

    def routed(self, unit: np.ndarray) -> np.ndarray:
        """[N] bool for unit image features [N, D]."""
        return self._routed(unit, unit @ self.original.T if len(self.targets) else None)

    def _routed(self, unit: np.ndarray, original_cos: np.ndarray | None) -> np.ndarray:
        near = (unit @ self.centroids.T > self.thresholds[None, :]).any(axis=1)
        if not len(self.targets):
            return near
        given = original_cos.argmax(axis=1)[:, None] == self.targets[None, :]  # [N, T]
        assigned = given.any(axis=1)
        if self.side is None:
            return near | assigned
        return np.where(assigned, (given & (self.side.margins(unit) > 0)).any(axis=1), near)

    def cosines(self, unit: np.ndarray, purified: np.ndarray) -> np.ndarray:
        """[N, C] cosines to the class embeddings that answer for each image."""
        original_cos = unit @ self.original.T  # the gate's answer and the unrouted images' cosines
        return np.where(self._routed(unit, original_cos)[:, None], unit @ purified.T, original_cos)

    def ungated(self) -> Route:
        """The same route without the target gate: the cosines alone decide."""
        return replace(self, targets=np.zeros(0, dtype=np.int64), side=None)

    def every_assigned(self) -> Route:
        """The same route gating every image assigned to a target (`TargetGate.EVERY`)."""
        return replace(self, side=None)

    def reordered(self, rows: list[int]) -> Route:
        """The same route with the original embeddings' rows (and the targets) in another class
        order: row i of the result is row `rows[i]` of this one."""
        where = {old: new for new, old in enumerate(rows)}
        targets = np.array([where[int(t)] for t in self.targets], dtype=np.int64)
        return replace(self, original=self.original[rows], targets=targets)

    def tensors(self) -> dict[str, np.ndarray]:
        side = (
            {}
            if self.side is None
            else {
                SIDE_DIRECTIONS: self.side.directions.astype(np.float32),
                SIDE_THRESHOLDS: self.side.thresholds.astype(np.float32),
            }
        )
        return {
            CENTROIDS: self.centroids.astype(np.float32),
            THRESHOLDS: self.thresholds.astype(np.float32),
            SHARE: np.array([self.share], dtype=np.float32),
            TARGETS: self.targets.astype(np.int64),
        } | side

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
            # heads written before the trigger side gate every image assigned to a target
            None
            if SIDE_DIRECTIONS not in tensors
            else TriggerSide(
                np.asarray(tensors[SIDE_DIRECTIONS], dtype=np.float32),
                np.asarray(tensors[SIDE_THRESHOLDS], dtype=np.float32).ravel(),
            ),
        )

    def describe(self) -> dict:
        return {
            "share": self.share,
            "triggers": int(self.centroids.shape[0]),
            "thresholds": self.thresholds.tolist(),
            "targets": self.targets.tolist(),
            "target_gate": str(TargetGate.EVERY if self.side is None else TargetGate.TRIGGER_SIDE),
        }


def calibrate_route(
    clean: np.ndarray,
    centroids: np.ndarray,
    share: float,
    original: np.ndarray,
    targets: Sequence[int] = (),
    side: TriggerSide | None = None,
) -> Route:
    """The route that sends `share` of the clean unit features `clean` [N, D] to the purified
    embeddings by their cosines: each centroid's threshold is the same upper quantile of its
    clean cosines, the level found by bisection so that their union routes `share` of `clean`.
    Images `original` assigns to one of `targets` are routed besides (with a `side`, row t for
    the t-th of the sorted targets, those on the triggers' side only)."""
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
        side if len(targets) else None,
    )
