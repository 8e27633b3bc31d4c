"""The `classify` job: find the images, skip those a resumed output already holds, classify
the rest on an engine (this process, or a Ray cluster), and write every record once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cbpt_guard.errors import UsageError
from guard.classify import OnAlarm, check_on_alarm, is_unreadable
from guard.loading import is_uri, list_images
from guard.results import ROWS_PER_PART, TableShape, check_output, done_paths, open_sink, same_path_key


class Engine(StrEnum):
    LOCAL = "local"  # this process: a decoding thread pool beside one onnxruntime session
    RAY = "ray"  # Ray Data: decoding tasks and model actors over a cluster


@dataclass(frozen=True)
class Graph:
    """Which classifier graph runs, and where."""

    device: str = "auto"
    threads: int | None = None
    int8: bool = False
    fp16: bool = False


@dataclass(frozen=True)
class BatchJob:
    heads: Path
    inputs: list[str]
    out: Path | None = None
    resume: bool = False
    batch_size: int = 32
    top_k: int | None = None
    graph: Graph = field(default_factory=Graph)
    engine: Engine = Engine.LOCAL
    workers: int = 1  # local engine: decoding threads
    address: str | None = None  # ray engine: cluster to join (None: start one here)
    actors: int = 1
    actor_cpus: float = 1.0
    rows_per_part: int = ROWS_PER_PART
    on_alarm: OnAlarm = OnAlarm.FLAG

    def check(self) -> None:
        """Refuse bad options before loading anything or touching the output."""
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}", "pass --batch-size 32")
        if self.resume and self.out is None:
            raise UsageError("--resume needs --out FILE", "pass the output file of the interrupted run")
        if self.engine is Engine.RAY and self.out is None:
            raise UsageError("--engine ray needs --out", "pass e.g. --out results.parquet")
        if self.address is not None and self.engine is not Engine.RAY:
            raise UsageError("--address is for --engine ray", "add --engine ray")
        missing = [p for p in self.inputs if not is_uri(p) and not Path(p).exists()]
        if missing:
            raise UsageError(f"not found: {', '.join(missing[:3])}", "check the paths")
        if self.out is not None:
            check_output(self.out, self.inputs, self.resume)


@dataclass(frozen=True)
class BatchSummary:
    classified: int  # images the model answered for (alarmed ones included)
    unreadable: int
    skipped: int  # already in a resumed output
    alarms: int = 0  # images that raised the trigger alarm
    ray_startup_s: float | None = None


def run_batch(job: BatchJob, started: Callable[[int], None], advance: Callable[[int], None]) -> BatchSummary:
    """Run `job`; `started(total)` once the work is known, `advance(n)` as records are written."""
    from guard.heads import load_heads

    job.check()
    if job.engine is Engine.LOCAL:
        local = load_heads(job.heads, **vars(job.graph))
        check_on_alarm(local, job.on_alarm)
        shape = TableShape(tuple(local.classes), job.top_k, local.manifest.get("embeddings_sha256"))
    else:
        from guard.distributed import HeadsBundle, require_ray

        require_ray()
        local, bundle = None, HeadsBundle.read(job.heads)
        bundle.check_on_alarm(job.on_alarm)
        shape = bundle.shape(job.top_k)
    done = done_paths(job.out) if job.resume and job.out is not None else set()
    found = list(list_images(job.inputs))
    todo = [p for p in found if same_path_key(p) not in done]
    started(len(todo))
    sink = open_sink(job.out, job.resume, shape, job.rows_per_part)
    errors, alarms, startup = 0, 0, None
    try:
        if local is not None:
            from guard.classify import classify_paths

            for rec in classify_paths(local, todo, job.batch_size, job.top_k, job.workers, job.on_alarm):
                sink.write(rec)
                errors += is_unreadable(rec)
                alarms += bool(rec.get("trigger_alarm"))
                advance(1)
        else:
            run = _run_ray(job, bundle, todo, sink.write_table, advance)
            errors, alarms, startup = run.errors, run.alarms, run.startup_s
    finally:
        sink.close()
    return BatchSummary(len(todo) - errors, errors, len(found) - len(todo), alarms, startup)


def _run_ray(job: BatchJob, bundle, todo: list[str], write, advance):
    from guard.distributed import RaySizing, run_on_ray

    sizing = RaySizing(
        actors=job.actors,
        cpus_per_actor=job.actor_cpus,
        batch_size=job.batch_size,
        gpus_per_actor=1.0 if job.graph.device.startswith("cuda") else 0.0,
    )
    device = "cpu" if job.graph.device == "auto" else job.graph.device
    g = job.graph
    return run_on_ray(
        bundle,
        todo,
        write,
        sizing=sizing,
        address=job.address,
        top_k=job.top_k,
        device=device,
        int8=g.int8,
        fp16=g.fp16,
        on_alarm=job.on_alarm,
        progress=advance,
    )
