"""The runtime guard on Ray Data: batch classification over many cores and many machines.

Two stages stream into each other, so decoding overlaps inference across the cluster:
`decode_batch` tasks read and preprocess images (local paths, or any URI pyarrow reads),
then a pool of `GuardPredictor` actors, each holding verified heads and one onnxruntime
session with as many intra-op threads as the actor has CPUs, classify them. The heads travel
to the actors as bytes and are checked against their manifest there, so worker nodes need no
shared file system. Needs the `distributed` extra (ray[data], pyarrow); docs/batch.md has the
multi-node recipe and the measurements.

    import ray
    from guard.distributed import classify_dataset

    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
    results = classify_dataset(ds, "purified/", actors=4, cpus_per_actor=4, top_k=5)
    results.write_parquet("s3://bucket/results/")
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cbpt_guard.artifacts import MANIFEST, PREPROCESS
from cbpt_guard.errors import UsageError
from guard.classify import OnAlarm, make_record
from guard.heads import Heads, load_heads, verify
from guard.loading import load_image
from guard.preprocess import PreprocessSpec
from guard.results import TableShape, records_table, same_path_key

DECODE_RETRIES = 3
ROWS_PER_TASK = 256


def require_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError(
            "--engine ray needs Ray Data, which the base install leaves out", "pip install 'cbpt-guard[distributed]'"
        ) from None
    return ray


@dataclass(frozen=True)
class HeadsBundle:
    """An exported heads folder as bytes: verified on the driver, shipped through Ray's object
    store, and verified again by `load_heads` where it is unpacked."""

    files: dict[str, bytes]

    @classmethod
    def read(cls, folder: str | Path) -> HeadsBundle:
        folder = Path(folder)
        manifest = verify(folder)
        return cls({name: (folder / name).read_bytes() for name in (MANIFEST, *manifest["files"])})

    @property
    def manifest(self) -> dict:
        return json.loads(self.files[MANIFEST])

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(json.loads(self.files[PREPROCESS]))

    def shape(self, top_k: int | None) -> TableShape:
        m = self.manifest
        return TableShape(tuple(m["classes"]), top_k, m.get("embeddings_sha256"))

    def check_on_alarm(self, on_alarm: OnAlarm) -> None:
        m = self.manifest
        if on_alarm is not OnAlarm.FLAG and not (
            m.get("trigger_score") and m.get("trigger_alarm_threshold") is not None
        ):
            raise UsageError(
                f"--on-alarm {on_alarm.value}: these heads have no trigger score or alarm threshold",
                "use heads written by `cbpt-guard purify` on a backdoored model, or --on-alarm flag",
            )

    def load(self, **graph) -> Heads:
        """The heads, verified and loaded on this worker; `graph` is `load_heads`'s keywords. The
        files go to a temporary folder that is removed once the session holds the graph (a folder
        left per actor piled up in /tmp)."""
        with tempfile.TemporaryDirectory(prefix="cbpt-guard-heads-") as tmp:
            for name, data in self.files.items():
                (Path(tmp) / name).write_bytes(data)
            return load_heads(tmp, **graph)


@dataclass(frozen=True)
class RaySizing:
    """How the work is spread: `actors` model replicas of `cpus_per_actor` CPUs each (the
    onnxruntime threads), decoding tasks of `decode_cpus` CPUs, `batch_size` images a call."""

    actors: int = 1
    cpus_per_actor: float = 1.0
    decode_cpus: float = 1.0
    batch_size: int = 32
    gpus_per_actor: float = 0.0

    def fitted(self, cluster_cpus: float) -> RaySizing:
        """This plan on a cluster of `cluster_cpus`: decoding takes what the actors leave, up to
        `decode_cpus`. Actors that leave nothing would wait for decoded images for ever."""
        left = cluster_cpus - self.actors * self.cpus_per_actor
        if left < 0.1:
            raise UsageError(
                f"{self.actors} actor(s) x {self.cpus_per_actor:g} CPU leave no CPU for decoding on this "
                f"cluster of {cluster_cpus:g} CPUs",
                "lower --actors or --actor-cpus",
            )
        return replace(self, decode_cpus=min(self.decode_cpus, left))

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_actor + 0.5))

    @property
    def rows_per_task(self) -> int:
        """Images per Ray task or actor call: several model batches, so Ray's per-task cost
        (milliseconds) stays small beside the work (docs/batch.md)."""
        return max(self.batch_size, ROWS_PER_TASK)


def decode_batch(batch: dict[str, np.ndarray], spec: dict) -> dict[str, np.ndarray]:
    """Ray Data stage one: a batch of paths (and optionally their bytes) -> model-ready pixels,
    with an error string ('' when fine) per image; failed images get zero pixels."""
    parsed = PreprocessSpec.from_dict(spec)
    data = batch.get("bytes")
    items = [load_image(str(p), parsed, None if data is None else bytes(data[i])) for i, p in enumerate(batch["path"])]
    blank = np.zeros((3, *parsed.size), np.float32)
    return {
        "path": np.array([it.path for it in items], dtype=object),
        "error": np.array([it.error or "" for it in items], dtype=object),
        "pixels": np.stack([blank if it.pixels is None else it.pixels for it in items]),
    }


class GuardPredictor:
    """Ray Data stage two, a stateful actor: verified heads loaded once, then batches of
    pixels -> result rows (an Arrow table in the schema of `guard.results`), run through the
    model `batch_size` images a call."""

    def __init__(
        self,
        bundle,
        top_k: int | None,
        threads: int,
        device: str,
        int8: bool,
        fp16: bool,
        batch_size: int,
        on_alarm: str = OnAlarm.FLAG.value,
    ):
        import ray

        bundle = ray.get(bundle) if isinstance(bundle, ray.ObjectRef) else bundle
        self.heads = bundle.load(device=device, threads=threads, fp16=fp16, int8=int8)
        self.top_k, self.batch_size, self.on_alarm = top_k, batch_size, OnAlarm(on_alarm)
        self.shape = bundle.shape(top_k)

    def __call__(self, batch: dict[str, np.ndarray]):
        paths, errors = [str(p) for p in batch["path"]], [str(e) for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if not e]
        records = [{"path": p, "error": e} for p, e in zip(paths, errors)]
        for start in range(0, len(ok), self.batch_size):
            rows = ok[start : start + self.batch_size]
            out = self.heads.run(np.ascontiguousarray(batch["pixels"][rows]))
            for j, i in enumerate(rows):
                records[i] = make_record(self.heads, paths[i], out, j, self.top_k, self.on_alarm)
        return records_table(records, self.shape)


def classify_dataset(
    ds,
    heads: str | Path | HeadsBundle,
    *,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    decode_cpus: float = 1.0,
    batch_size: int = 32,
    top_k: int | None = None,
    device: str = "cpu",
    int8: bool = False,
    fp16: bool = False,
    on_alarm: OnAlarm = OnAlarm.FLAG,
):
    """A Ray Dataset of images -> a Ray Dataset of results, one row per image (path, label,
    index, top_k or probs, trigger_score, trigger_alarm, error). `ds` needs a `path` column
    (local paths or URIs, read by the workers) and may carry the files in a `bytes` column,
    as `ray.data.read_binary_files(..., include_paths=True)` makes it."""
    ray = require_ray()
    sizing = RaySizing(actors, cpus_per_actor, decode_cpus, batch_size, 1.0 if device.startswith("cuda") else 0.0)
    if ray.is_initialized():
        sizing = sizing.fitted(ray.cluster_resources().get("CPU", 0.0))
    bundle = heads if isinstance(heads, HeadsBundle) else HeadsBundle.read(heads)
    bundle.check_on_alarm(OnAlarm(on_alarm))
    return _classify(ds, bundle, sizing, top_k, device, int8, fp16, OnAlarm(on_alarm))


def _classify(
    ds, bundle: HeadsBundle, sizing: RaySizing, top_k, device: str, int8: bool, fp16: bool, on_alarm: OnAlarm
):
    import ray
    from ray.data import ActorPoolStrategy

    spec = json.loads(bundle.files[PREPROCESS])
    # Retries ride out a flaky object store; as remote args that differ from the actors' they
    # also keep Ray from fusing the stages (fused, an actor decodes and infers in turn).
    decoded = ds.map_batches(
        decode_batch,
        fn_kwargs={"spec": spec},
        batch_size=sizing.rows_per_task,
        num_cpus=sizing.decode_cpus,
        max_retries=DECODE_RETRIES,
    )
    return decoded.map_batches(
        GuardPredictor,
        fn_constructor_kwargs={
            "bundle": ray.put(bundle),  # once into the object store, not once per actor
            "top_k": top_k,
            "threads": sizing.threads,
            "device": device,
            "int8": int8,
            "fp16": fp16,
            "batch_size": sizing.batch_size,
            "on_alarm": on_alarm.value,
        },
        batch_size=sizing.rows_per_task,
        compute=ActorPoolStrategy(size=sizing.actors),
        num_cpus=sizing.cpus_per_actor,
        num_gpus=sizing.gpus_per_actor or None,
    )


@dataclass(frozen=True)
class RayRun:
    """What `run_on_ray` did: rows written, unreadable images, alarms, and the seconds Ray took
    to start."""

    written: int
    errors: int
    alarms: int
    startup_s: float


def run_on_ray(
    heads: str | Path | HeadsBundle,
    paths: list[str],
    write: Callable,
    *,
    sizing: RaySizing,
    address: str | None = None,
    top_k: int | None = None,
    device: str = "cpu",
    int8: bool = False,
    fp16: bool = False,
    on_alarm: OnAlarm = OnAlarm.FLAG,
    progress: Callable[[int], None] = lambda n: None,
) -> RayRun:
    """Classify `paths` on a Ray cluster (`address`; a local one started here and stopped after
    when None) and hand the results to `write` on this driver as Arrow tables, each path at
    most once."""
    import time

    bundle = heads if isinstance(heads, HeadsBundle) else HeadsBundle.read(heads)  # bad heads: refused first
    if not paths:
        return RayRun(0, 0, 0, 0.0)
    ray = require_ray()
    t0 = time.perf_counter()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        sizing = sizing.fitted(ray.cluster_resources().get("CPU", 0.0))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_auto_log_stats = False
        ds = ray.data.from_arrow(_path_blocks(paths, sizing.rows_per_task))
        results = _classify(ds, bundle, sizing, top_k, device, int8, fp16, on_alarm)
        startup = time.perf_counter() - t0
        return _drain(results, write, progress, startup)
    finally:
        if started:
            ray.shutdown()


def _path_blocks(paths: list[str], rows: int) -> list:
    import pyarrow as pa

    return [pa.table({"path": paths[i : i + rows]}) for i in range(0, len(paths), rows)]


def _drain(results, write, progress, startup: float) -> RayRun:
    import pyarrow.compute as pc

    seen: set[str] = set()
    errors = alarms = 0
    for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
        fresh = _unseen(table, seen)
        if fresh.num_rows:
            write(fresh)
            alarmed = pc.fill_null(fresh["trigger_alarm"], False)
            errors += pc.sum(pc.and_(pc.is_valid(fresh["error"]), pc.invert(alarmed))).as_py() or 0
            alarms += pc.sum(alarmed).as_py() or 0
            progress(fresh.num_rows)
    return RayRun(len(seen), errors, alarms, startup)


def _unseen(table, seen: set[str]):
    """The rows whose path is not yet written: a retried Ray task must not write a row twice."""
    keep = []
    for i, path in enumerate(table["path"].to_pylist()):
        key = same_path_key(path)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return table if len(keep) == table.num_rows else table.take(keep)
