"""Where the frozen CLIP runs: the device, the precision of its encoders, and what a run cost
in memory. Every tensor the method makes follows the model's device; on the CPU, fp32 is the
only precision and results are those of the code before devices existed (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import dataclass
from enum import StrEnum

import torch

from cbpt_guard.errors import UsageError


class Precision(StrEnum):
    """The frozen encoders' arithmetic under autocast. Prompt vectors, features and losses stay
    fp32; bf16/fp16 are meant for GPUs (docs/scale.md#precision says what they cost)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[self]


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` (CUDA when torch sees a device, else the CPU), `cpu`, `cuda` or `cuda:N`."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise UsageError(f"--device {spec}: the GPU index must be a number", "pass --device cuda:0")
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec}: torch sees no CUDA device here",
                "install a CUDA build of torch on a machine with a GPU, or pass --device cpu",
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise UsageError(f"--device {spec}: this machine has {count} GPU(s)", f"pass --device cuda:0..{count - 1}")
        return torch.device(spec)
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}", "pass --device auto")


def set_torch_threads(threads: int | None = None) -> None:
    """torch's CPU threads: `threads`, or half the cores. torch's own default takes every core, and
    two jobs side by side then run several times slower (docs/security.md#threads)."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}", "pass --threads 1")
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class Runtime:
    """The device and encoder precision of one run, and the most images the image encoder sees
    at once (every pass over the shots is cut into batches of this size: memory is bounded by
    it, not by the number of classes)."""

    device: torch.device = torch.device("cpu")
    precision: Precision = Precision.FP32
    encode_batch: int = 128

    @classmethod
    def of(cls, device: str = "auto", precision: str = "fp32", encode_batch: int = 128) -> Runtime:
        dev = resolve_device(device)
        try:
            prec = Precision(precision)
        except ValueError:
            raise UsageError(
                f"--precision must be fp32, bf16 or fp16, got {precision!r}", "pass --precision fp32"
            ) from None
        if encode_batch < 1:
            raise UsageError(f"--batch-size must be at least 1, got {encode_batch}", "pass --batch-size 128")
        return cls(dev, prec, encode_batch)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The frozen encoders' forward passes; fp32 runs them as they are."""
        if self.precision is Precision.FP32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def start(self) -> None:
        """Start counting peak memory for this run. On CUDA in fp32, TF32 is turned off for
        this process: fp32 there means fp32 (and the export's parity bound holds)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.precision is Precision.FP32:
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False

    def describe(self) -> dict:
        """What report.json records: the device, the precision and the peak memory so far."""
        out: dict = {"device": str(self.device), "precision": str(self.precision), "encode_batch": self.encode_batch}
        if self.device.type == "cuda":
            out["device_name"] = torch.cuda.get_device_name(self.device)
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        out["peak_rss_mb"] = peak_rss_mb()
        out["torch_threads"] = torch.get_num_threads()
        return out


def peak_rss_mb() -> float:
    """This process's peak resident memory (the kernel's high-water mark), in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (2**20 if sys.platform == "darwin" else 2**10), 1)
