"""What purify and scan write: the report, the embeddings, the trigger picture. Writers put
plain files into a folder the caller stages (`cbpt_guard.atomic.staged_dir`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from cbpt.data import Shots
from cbpt.inversion import InversionResult
from cbpt.model import LoadedClip
from cbpt.pictures import trigger_png
from cbpt.purify import Purified, PurifyConfig, original_head
from cbpt.scan import scan_summary
from cbpt.tuning import TuningResult
from cbpt_guard import TOOL
from cbpt_guard.artifacts import (
    CLASSES,
    EMBEDDINGS,
    REPORT,
    SCAN,
    TRIGGER_PNG,
    canonical_safetensors,
    classes_text,
    sha256_bytes,
)


def tuning_report(result: Purified, history: bool = True) -> dict:
    """What step 2 did: its mode, triggers, the checkpoint kept and its held-out figures beside
    the original head's (`history`: every evaluation too)."""
    t: TuningResult | None = result.tuning
    base = {
        "mode": result.plan.mode,
        "steps": result.plan.tuning.steps,  # a rung's schedule; fewer with no held-out shots (FixedSchedule)
        "kept_original": t is None or t.kept_original,
        # the copies pushed off their target (0: sent home only); where: the found targets' copies
        # stand `apart` spreads from their own shots (docs/method.md#push-off)
        "away": result.plan.tuning.away,
        "apart": list(result.apart),
        "triggers": [
            {"kind": c.kind, "target": result.classnames[c.target], "probe": c.probe, "search": c.search}
            for c in result.plan.triggers
        ]
        if t is not None
        else [],
    }
    if t is None:
        return {**base, "best_step": None, "rung": None, "alpha": None, "margin": None, "history": []}
    c = t.chosen
    return {
        **base,
        "best_step": None if t.kept_original else c.step,
        "rung": c.rung.index,
        "alpha": c.rung.alpha,
        "margin": c.rung.margin,
        "original_held_out": asdict(t.original_held_out),
        "chosen_held_out": asdict(c.held_out),
        "history": t.history if history else [],
    }


def report(clip: LoadedClip, shots: Shots, cfg: PurifyConfig, result: Purified) -> dict:
    return {
        "tool": TOOL,
        "model": clip.info.to_dict(),
        "checkpoint_sha256": clip.checkpoint_sha256,
        "classes": list(result.classnames),
        "scan": scan_summary(result.inversion, result.classnames),
        "tuning": tuning_report(result),
        "timings": result.timings,
        "alarm": result.alarm,
        # where the purified embeddings answer (None: everywhere); docs/method.md#routing
        "route": None if result.route is None else result.route.describe(),
        "settings": asdict(cfg),
        "runtime": clip.runtime.describe(),
        "budget": (shots.budget or cfg.budget).describe(),
        "shots": list(shots.paths),
        "held_out": list(shots.held_paths),
    }


def _embeddings(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return canonical_safetensors(
        save({k: v.detach().cpu().contiguous().float() for k, v in tensors.items()}, metadata=meta)
    )


def _picture(inv: InversionResult, shots: Shots) -> bytes:
    """The best mask, then every warp, patch, compact mask and blend (docs/method.md#patch-probes,
    docs/method.md#compact-probes, docs/method.md#blend-probes)."""
    others = inv.warps() + inv.patches() + inv.compact() + inv.blends()
    return trigger_png(inv.trigger, shots.pixels, others=[c.trigger for c in others])


def write_purified(folder: Path, result: Purified, shots: Shots, rep: dict) -> dict:
    """embeddings.safetensors, classes.txt, trigger.png and report.json (with the embeddings'
    hash added, which it returns)."""
    blob = _embeddings(
        {
            "purified": result.purified,
            "original": result.original,
            "logit_scale": torch.tensor([result.logit_scale]),
            "trigger_centroids": result.alarm_centres,
            "trigger_mask": result.inversion.trigger.mask,
            "trigger_pattern": result.inversion.trigger.pattern,
            "trigger_delta": result.inversion.trigger.delta,
            **({} if result.route is None else {k: torch.from_numpy(v) for k, v in result.route.tensors().items()}),
        },
        {
            "classes": json.dumps(list(result.classnames)),
            "tool": rep["tool"],
            "checkpoint_sha256": rep["checkpoint_sha256"],
            "architecture": rep["model"]["architecture"],
        },
    )
    rep = {**rep, "embeddings_sha256": sha256_bytes(blob)}
    (folder / EMBEDDINGS).write_bytes(blob)
    (folder / CLASSES).write_text(classes_text(result.classnames), encoding="utf-8")
    (folder / TRIGGER_PNG).write_bytes(_picture(result.inversion, shots))
    (folder / REPORT).write_text(json.dumps(rep, indent=2))
    return rep


def write_original(folder: Path, clip: LoadedClip, classnames: tuple[str, ...]) -> None:
    """An export source for the original prompts' head alone (no purification, no trigger)."""
    original = original_head(clip, classnames)
    blob = _embeddings(
        {"purified": original, "original": original.clone(), "logit_scale": torch.tensor([clip.logit_scale])}
    )
    rep = {
        "tool": TOOL,
        "model": clip.info.to_dict(),
        "checkpoint_sha256": clip.checkpoint_sha256,
        "classes": list(classnames),
        "kind": "original",
        "embeddings_sha256": sha256_bytes(blob),
    }
    (folder / EMBEDDINGS).write_bytes(blob)
    (folder / CLASSES).write_text(classes_text(classnames), encoding="utf-8")
    (folder / REPORT).write_text(json.dumps(rep, indent=2))


def write_scan(folder: Path, inv: InversionResult, shots: Shots, summary: dict) -> None:
    (folder / TRIGGER_PNG).write_bytes(_picture(inv, shots))
    (folder / SCAN).write_text(json.dumps(summary, indent=2))
