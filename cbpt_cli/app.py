"""`cbpt-guard`: a thin command-line layer over cbpt (purification), export and guard (runtime).

Torch is imported only inside the commands that need it, so `serve` and `classify` start
without it. Every user-facing failure is a `UserError`, printed as one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cbpt_guard import __version__
from cbpt_guard.artifacts import CLASSIFIER, EMBEDDINGS, TRIGGER_PNG, int8_name, is_fp16, is_int8
from cbpt_guard.errors import UsageError, UserError
from cbpt_guard.routing import TargetGate
from guard.batch import Engine
from guard.classify import OnAlarm
from guard.results import ROWS_PER_PART
from testbed.datasets import DATASETS, TEN_CLASS
from testbed.triggers import ATTACKS

app = typer.Typer(
    name="cbpt-guard",
    help="Purify backdoored CLIP models by class-wise backdoor prompt tuning, and serve the purified heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
testbed_app = typer.Typer(help="Small CLIPs trained and backdoored here, to measure defenses on.", no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
TorchThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        help="torch CPU threads (default: half the cores; more collapse on a shared machine, "
        "docs/security.md#threads).",
    ),
]
Int8ExportOpt = Annotated[
    bool,
    typer.Option(
        "--int8",
        help="Also write classifier_int8.onnx: static int8 quantisation calibrated on the shots "
        "and their triggered copies; refused under 99% top-1 agreement with fp32.",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace an existing output folder whole, even one cbpt-guard did not write."),
]


TorchDeviceOpt = Annotated[
    str, typer.Option("--device", help="Where torch runs: auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N.")
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="The frozen encoders' arithmetic: fp32, or bf16 / fp16 under autocast (meant for GPUs; "
        "prompts and losses stay fp32; docs/scale.md#precision)."
    ),
]
EncodeBatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        help="Most images through the image encoder at once: memory follows it, not the number of classes.",
    ),
]


def _runtime(threads: int | None, device: str, precision: str = "fp32", batch_size: int = 128):
    """torch's threads, then where and how this command runs (cbpt.runtime.Runtime)."""
    from cbpt.runtime import Runtime, set_torch_threads

    set_torch_threads(threads)

    runtime = Runtime.of(device, precision, batch_size)
    runtime.start()
    return runtime


def _api_key(path: Path | None) -> str | None:
    """The server's API key: from a file (first line), or CBPT_GUARD_API_KEY; None: no key."""
    if path is None:
        return os.environ.get("CBPT_GUARD_API_KEY") or None
    if not path.is_file():
        raise UsageError(f"API key file not found: {path}", "pass a file holding the key")
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise UsageError(f"the API key in {path} is shorter than 16 characters", "use a long random key")
    return key


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cbpt-guard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def info(
    model: Annotated[
        Path, typer.Argument(help="Checkpoint file: state_dict, .safetensors, training checkpoint or OpenAI archive.")
    ],
    arch: Annotated[
        Optional[str], typer.Option(help="open_clip architecture name; detected from the tensors when omitted.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Identify a checkpoint: format, architecture, parameter count, embed dim, image size."""
    from cbpt.model import inspect

    result = inspect(model, arch=arch)
    if as_json:
        _print_json(result.to_dict())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    rows = [
        ("file", result.path),
        ("format", result.format),
        ("architecture", f"{result.architecture} ({result.arch_source})"),
        ("also matches", ", ".join(c for c in result.candidates if c != result.architecture) or "-"),
        ("parameters", f"{result.num_params:,}"),
        ("embed dim", str(result.embed_dim)),
        ("image size", str(result.image_size)),
        ("context length", str(result.context_length)),
        (
            "preprocess",
            f"{result.preprocess['interpolation']}, {result.preprocess['resize_mode']}, "
            f"mean {tuple(round(m, 4) for m in result.preprocess['mean'])}",
        ),
    ]
    for k, v in rows:
        table.add_row(f"[bold]{k}[/bold]", v)
    Console().print(table)


DataOpt = Annotated[Path, typer.Option(help="Clean labelled images: class folders, or a CSV of path,label.")]
ClassesOpt = Annotated[Optional[Path], typer.Option(help="Class names, one per line, in label order.")]
ArchOpt = Annotated[Optional[str], typer.Option(help="open_clip architecture; detected when omitted.")]
ShotsOpt = Annotated[int, typer.Option(help="Clean labelled images per class: every one the defender uses (K).")]
HeldOutOpt = Annotated[
    Optional[int],
    typer.Option(
        help="Of the --shots per class, how many are held out to decide early stopping, escalation and "
        "the alarm threshold (docs/method.md#shot-budget); `scan` leaves them out too, so it reads the "
        "model as `purify` will. Default: a quarter from 8 shots up, none below."
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed for shot sampling and optimisation.")]
InvStepsOpt = Annotated[int, typer.Option(help="Trigger-inversion steps per restart.")]
RestartsOpt = Annotated[
    int, typer.Option(help="Mask restarts of the trigger inversion (the lowest-loss one gives the scan's figures).")
]
CompactOpt = Annotated[
    Optional[int],
    typer.Option(
        help="Compact masks searched once the masks show a backdoor, tuned against in place of the "
        "scattered per-pixel ones where they flip the shots as well and pull them at least as far "
        "toward the target's text: clears patch triggers the per-pixel masks undershoot "
        "(docs/method.md#compact-probes). Default: 3; 0 turns them off."
    ),
]
BlendOpt = Annotated[
    Optional[int],
    typer.Option(
        help="Blend-shaped triggers (one opacity over the whole image) searched once the scan finds a "
        "backdoor, tuned against beside the others where they pull the shots at least as far toward the "
        "target's text as the per-pixel masks: covers blend, SIG and warp triggers the masks copy with a "
        "patch (docs/method.md#blend-probes). Default: 2; 0 turns them off."
    ),
]
PatchOpt = Annotated[
    bool,
    typer.Option(
        "--patch-probes/--no-patch-probes",
        help="Where no other rule finds a backdoor, search a small square patch (a fifth of the image's side) "
        "at the centre and each corner; one that sends 90% of the shots to one class shows a backdoor a "
        "natural feature could not (docs/method.md#patch-probes). Five more inversion restarts on models "
        "that read clean otherwise.",
    ),
]
TuneStepsOpt = Annotated[
    int,
    typer.Option(
        help="Prompt-tuning steps a rung (early stopping may end sooner; with nothing held out and under 8 shots"
        " a class, proportionally fewer)."
    ),
]
EpsOpt = Annotated[
    float,
    typer.Option(
        help="Invert a bounded additive perturbation with each mask (L-inf, in [0, 1] "
        "pixel units, e.g. 0.03); 0 (off) by default."
    ),
]


def _inversion_config(
    seed: int, steps: int, restarts: int, eps: float, compact: int | None, blend: int | None, patches: bool = True
):
    from dataclasses import replace

    from cbpt.inversion import InversionConfig

    if steps < 1 or restarts < 1:
        raise UsageError(
            "--inversion-steps and --restarts must be at least 1", "pass --inversion-steps 200 --restarts 3"
        )
    if not 0 <= eps < 0.5:
        raise UsageError(f"--eps must be in [0, 0.5), got {eps}", "pass --eps 0.03, for example")
    if compact is not None and compact < 0:
        raise UsageError(f"--compact-restarts must be 0 or more, got {compact}", "pass --compact-restarts 3")
    if blend is not None and blend < 0:
        raise UsageError(f"--blend-restarts must be 0 or more, got {blend}", "pass --blend-restarts 2")
    cfg = InversionConfig(seed=seed, steps=steps, mask_restarts=restarts, eps=eps)
    if not patches:
        cfg = replace(cfg, patch=replace(cfg.patch, places=()))
    if compact is not None:
        cfg = replace(cfg, compact=replace(cfg.compact, restarts=compact))
    return cfg if blend is None else replace(cfg, blend=replace(cfg.blend, restarts=blend))


@app.command()
def scan(
    model: Annotated[Path, typer.Argument(help="Checkpoint file.")],
    data: DataOpt,
    classes: ClassesOpt = None,
    arch: ArchOpt = None,
    shots: ShotsOpt = 16,
    held_out: HeldOutOpt = None,
    seed: SeedOpt = 0,
    inversion_steps: InvStepsOpt = 200,
    restarts: RestartsOpt = 3,
    compact_restarts: CompactOpt = None,
    blend_restarts: BlendOpt = None,
    patch_probes: PatchOpt = True,
    eps: EpsOpt = 0.0,
    out: Annotated[Optional[Path], typer.Option(help="Write trigger.png and scan.json here.")] = None,
    overwrite: OverwriteOpt = False,
    device: TorchDeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: EncodeBatchOpt = 128,
    threads: TorchThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trigger inversion only: is the model backdoored, and toward which class. It inverts on the
    shots `purify` tunes on (the held-out ones left out), so the two read a model alike."""
    runtime = _runtime(threads, device, precision, batch_size)
    from cbpt.data import ShotBudget, load_shots
    from cbpt.inversion import Search
    from cbpt.model import load_clip
    from cbpt.outputs import write_scan
    from cbpt.purify import original_head
    from cbpt.scan import Evidence, run_scan, scan_summary
    from cbpt.trigger import TriggerKind
    from cbpt_cli.progress import stage_progress
    from cbpt_guard.atomic import check_target, staged_dir

    inv_cfg = _inversion_config(seed, inversion_steps, restarts, eps, compact_restarts, blend_restarts, patch_probes)
    if out is not None:
        check_target(out, overwrite)
    clip = load_clip(model, arch=arch, runtime=runtime)
    shot_set = load_shots(clip, data, classes, ShotBudget(shots, held_out), seed)
    with stage_progress() as progress:
        inv = run_scan(clip, shot_set, inv_cfg, original_head(clip, shot_set.classnames), progress)
    summary = scan_summary(inv, shot_set.classnames) | {"budget": shot_set.budget.describe()}
    if out is not None:
        with staged_dir(out, "scan", overwrite) as stage:
            write_scan(stage, inv, shot_set, summary)
        summary["trigger_png"] = str(out / TRIGGER_PNG)
    if as_json:
        _print_json(summary)
        return
    picture = f"; trigger picture: {out / TRIGGER_PNG}" if out else ""
    masks = (
        f"score {summary['score']:.3f} (threshold {summary['threshold']}), the best mask flips "
        f"{summary['flip_rate']:.0%} of shots with {summary['mask_l1']:.1%} of the image"
    )
    shown = {
        Evidence.WARP: "an inverted warp (below)",
        Evidence.ALIGNED_MASK: "an over-aligned mask",
        Evidence.PATCH: "a small patch (below)",
    }.get(summary["evidence"])
    if shown:  # evidence other than the mask score, whose figures follow
        typer.echo(f"BACKDOORED: target '{summary['target']}', shown by {shown}; masks: {masks}{picture}")
    else:
        verdict = "BACKDOORED" if summary["backdoored"] else "clean"
        typer.echo(f"{verdict}: {masks}, suspected target '{summary['target']}'{picture}")
    for c in summary["candidates"]:
        align = "n/a (too few shots of that class)" if c["over_alignment"] is None else f"{c['over_alignment']:+.2f}"
        if c["search"] == Search.COMPACT:  # --compact-restarts (docs/method.md#compact-probes)
            typer.echo(f"  compact mask: sends {c['flip_rate']:.0%} of shots to '{c['target']}'")
        elif c["search"] == Search.PATCH:  # docs/method.md#patch-probes
            typer.echo(
                f"  patch of {c['mask_l1']:.1%} of the image: sends {c['flip_rate']:.0%} of shots to "
                f"'{c['target']}' (backdoor at {summary['patch_threshold']:.0%})"
            )
        elif c["search"] == Search.BLEND:  # --blend-restarts (docs/method.md#blend-probes)
            typer.echo(
                f"  blend at {c['mask_l1']:.0%} opacity: sends {c['flip_rate']:.0%} of shots to '{c['target']}', "
                f"over-alignment {align}"
            )
        elif c["kind"] != TriggerKind.MASK:  # the restarts' masks are summed up above
            typer.echo(
                f"  {c['kind']} {'probe' if c['probe'] else 'inversion'}: "
                f"sends {c['flip_rate']:.0%} of shots to '{c['target']}', "
                f"over-alignment {align} (backdoor at {summary['alignment_threshold']})"
            )


@app.command()
def purify(
    model: Annotated[Path, typer.Argument(help="Checkpoint file.")],
    data: DataOpt,
    classes: ClassesOpt = None,
    arch: ArchOpt = None,
    shots: ShotsOpt = 16,
    held_out: HeldOutOpt = None,
    seed: SeedOpt = 0,
    inversion_steps: InvStepsOpt = 200,
    restarts: RestartsOpt = 3,
    compact_restarts: CompactOpt = None,
    blend_restarts: BlendOpt = None,
    patch_probes: PatchOpt = True,
    tuning_steps: TuneStepsOpt = 300,
    eps: EpsOpt = 0.0,
    alpha: Annotated[
        Optional[float],
        typer.Option(
            help="Fix the weight of the triggered-shots loss (more: lower ASR, more CA at stake). "
            "Default: 0.5, raised to 1 then 2 with a margin while held-out shots still reach the target "
            "(when the scan finds a backdoor)."
        ),
    ] = None,
    beta: Annotated[
        float, typer.Option(help="Weight of the keep-close loss (more: closer to the original prompts).")
    ] = 2.0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Tune as for a found backdoor even when the scan reads clean, against every "
            "inverted trigger (masks and warp) at its own target; on a clean model "
            "this costs clean accuracy.",
        ),
    ] = False,
    classes_per_step: Annotated[
        int,
        typer.Option(
            help="Most classes whose prompts one tuning step runs through the text tower; the rest "
            "come from a cache (docs/scale.md#class-bounded-tuning). Label sets this size or smaller "
            "tune every class at every step."
        ),
    ] = 12,
    routed_share: Annotated[
        float,
        typer.Option(
            help="Share of the clean shots whose neighbourhood the purified embeddings answer for; the "
            "original ones answer elsewhere, in the exported heads too (docs/method.md#routing). "
            "1: the purified embeddings answer for every image, as in the paper.",
        ),
    ] = 0.2,
    target_gate: Annotated[
        TargetGate,
        typer.Option(
            help="Which images the original embeddings give a found target the purified ones answer for: "
            "those on the triggers' side of the target's own clean shots, or every one "
            "(docs/method.md#trigger-side).",
        ),
    ] = TargetGate.TRIGGER_SIDE,
    push_off: Annotated[
        bool,
        typer.Option(
            "--push-off/--no-push-off",
            help="Also push the triggered copies off a found target where they stand far (6.5 spreads) from "
            "its own clean shots, as a collapsed backdoor's do; --no-push-off only sends them home "
            "(docs/method.md#push-off).",
        ),
    ] = True,
    partial_triggers: Annotated[
        bool,
        typer.Option(
            "--partial-triggers/--no-partial-triggers",
            help="Raise the trigger side's bar to where the inverted triggers, partly applied to other classes' "
            "shots, still take them to a found target, sparing the target's own images below it; "
            "--no-partial-triggers sets it by its reach alone (docs/method.md#partial-triggers).",
        ),
    ] = True,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("purified"),
    int8: Int8ExportOpt = False,
    overwrite: OverwriteOpt = False,
    device: TorchDeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: EncodeBatchOpt = 128,
    threads: TorchThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Full CBPT: invert the trigger, tune class-wise prompts, write the purified embeddings."""
    runtime = _runtime(threads, device, precision, batch_size)
    from dataclasses import replace

    from cbpt.data import ShotBudget, load_shots
    from cbpt.features import PartialTriggers
    from cbpt.model import load_clip
    from cbpt.purify import PurifyConfig, PushOff
    from cbpt.tuning import ClassSchedule, Ladder, TuningConfig
    from cbpt_cli.pipeline import purify_to_folder
    from cbpt_cli.progress import stage_progress
    from cbpt_guard.atomic import check_target

    if tuning_steps < 1:
        raise UsageError("--tuning-steps must be at least 1", "pass --tuning-steps 300")
    if (alpha is not None and alpha < 0) or beta < 0:
        raise UsageError("--alpha and --beta must be at least 0", "pass --alpha 0.5 --beta 2, or leave them out")
    if classes_per_step < 1:
        raise UsageError("--classes-per-step must be at least 1", "pass --classes-per-step 12")
    if not 0 < routed_share <= 1:
        raise UsageError(f"--routed-share must be in (0, 1], got {routed_share}", "pass --routed-share 0.2, or 1")
    tuning = TuningConfig(
        steps=tuning_steps,
        beta=beta,
        classes=ClassSchedule(max_classes=classes_per_step),
        partial=PartialTriggers() if partial_triggers else None,
    )
    if alpha is not None:  # a weight the user fixed is not escalated
        tuning = replace(tuning, alpha=alpha, ladder=Ladder.off())
    budget = ShotBudget(shots, held_out)
    budget.check()
    cfg = PurifyConfig(
        budget=budget,
        force=force,
        routed_share=routed_share,
        target_gate=target_gate,
        push_off=PushOff() if push_off else None,
        inversion=_inversion_config(
            seed, inversion_steps, restarts, eps, compact_restarts, blend_restarts, patch_probes
        ),
        tuning=tuning,
    ).seeded(seed)
    check_target(out, overwrite)
    clip = load_clip(model, arch=arch, runtime=runtime)
    shot_set = load_shots(clip, data, classes, budget, seed)
    with stage_progress() as progress:
        run = purify_to_folder(clip, shot_set, cfg, out, progress, overwrite, int8)
    rep = run.report
    if as_json:
        _print_json({"out": str(out), "scan": rep["scan"], "timings": rep["timings"], "export_s": run.export_seconds})
        return
    sc = rep["scan"]
    typer.echo(
        f"wrote {out}/ ({', '.join(run.files)}) in {rep['timings']['total_s'] + run.export_seconds:.1f} s; "
        f"scan: {'BACKDOORED' if sc['backdoored'] else 'clean'}, suspected target '{sc['target']}' "
        + _evidence_phrase(sc)
        + _tuning_outcome(rep["tuning"])
        + (
            f"; the tuned embeddings answer near the inverted triggers ({rep['route']['share']:.0%} of clean "
            "shots), the original ones elsewhere"
            if rep.get("route")
            else ""
        )
        + f"; serve it with `cbpt-guard serve {out}`"
    )


def _evidence_phrase(scan: dict) -> str:
    """What showed the verdict, for purify's one-line summary."""
    from cbpt.scan import Evidence

    if scan["evidence"] == Evidence.WARP:
        return "(shown by an inverted warp's over-alignment)"
    if scan["evidence"] == Evidence.ALIGNED_MASK:
        return f"(shown by an inverted mask's over-alignment; mask score {scan['score']:.3f})"
    if scan["evidence"] == Evidence.PATCH:
        return f"(shown by a small patch that flips the shots; mask score {scan['score']:.3f})"
    return f"(score {scan['score']:.3f})"


def _tuning_outcome(tuning: dict) -> str:
    if tuning["mode"] == "skipped":
        return "; prompts left unchanged: no held-out shots to check a change against (pass --force to tune anyway)"
    if tuning["kept_original"]:
        return "; original prompts kept: no tuned prompt beat them on the held-out shots"
    if tuning["mode"] == "cautious":
        return "; prompts tuned cautiously (held-out clean accuracy kept, inverted trigger resisted better)"
    return ""


@app.command()
def export(
    src: Annotated[Optional[Path], typer.Argument(help="A purify output folder.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for the heads.")] = Path("heads"),
    model: Annotated[
        Optional[Path], typer.Option(help="Export the ORIGINAL prompts' head of this checkpoint instead.")
    ] = None,
    classes: ClassesOpt = None,
    arch: ArchOpt = None,
    fp16: Annotated[
        bool,
        typer.Option(
            "--fp16",
            help="Also write half-precision twins (head_fp16.onnx, classifier_fp16.onnx): "
            "fp16 weights and activations, LayerNorm and softmax in fp32.",
        ),
    ] = False,
    triton: Annotated[
        Optional[Path],
        typer.Option(help="Also write the models into this Triton model repository (others' models are left alone)."),
    ] = None,
    int8: Int8ExportOpt = False,
    overwrite: OverwriteOpt = False,
    device: TorchDeviceOpt = "auto",
    threads: TorchThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bake purified (or original) class embeddings into ONNX zero-shot heads."""
    runtime = _runtime(threads, device)
    import tempfile

    from cbpt.model import load_clip
    from cbpt.outputs import write_original
    from cbpt_guard.artifacts import read_classes
    from cbpt_guard.atomic import check_target, staged_dir, staged_entries
    from export.package import build_heads, read_source, source_int8_inputs, source_model, write_heads, write_triton
    from export.triton import MODEL_NAMES

    if (src is None) == (model is None):
        raise UsageError(
            "pass either a purify output folder SRC, or --model MODEL --classes FILE", "see `cbpt-guard export --help`"
        )
    if model is not None and classes is None:
        raise UsageError("--model needs --classes FILE (one class name per line)", "pass --classes")
    if model is not None and int8:
        raise UsageError(
            "--int8 calibrates on the defender's shots, which --model has not",
            "export --int8 from a purify output folder, or pass --int8 to purify",
        )
    check_target(out, overwrite)
    with tempfile.TemporaryDirectory(prefix="cbpt-export-") as tmp:
        if model is not None:
            clip = load_clip(model, arch=arch, runtime=runtime)
            src = Path(tmp)
            write_original(src, clip, tuple(read_classes(classes)))
            source = read_source(src)
        else:
            source = read_source(src)
            clip = source_model(source, runtime)
        quantise = source_int8_inputs(source, clip) if int8 else None
        exported = build_heads(source, clip, source.alarm_threshold, fp16, quantise)
    with staged_dir(out, "heads", overwrite) as stage:
        files = write_heads(stage, exported)
    if triton is not None:
        with staged_entries(triton, "triton-model", MODEL_NAMES, overwrite) as stage:
            write_triton(stage, exported)
    summary = {
        "out": str(out),
        "files": sorted(files),
        "seconds": round(exported.seconds, 2),
        "parity": exported.parity,
    }
    if as_json:
        _print_json(summary)
        return
    worst = max(v["max_abs_logits"] for k, v in exported.parity.items() if not is_fp16(k) and not is_int8(k))
    half = [v for k, v in exported.parity.items() if is_fp16(k)]
    q = exported.parity.get(int8_name(CLASSIFIER))
    typer.echo(
        f"wrote {out}/ ({', '.join(summary['files'])}) in {exported.seconds:.1f} s; "
        f"parity max |delta logits| {worst:.1e}"
        + (
            f"; fp16: top-1 agreement {min(v['top1_agreement'] for v in half):.1%}, max |delta probs| "
            f"{max(v['max_abs_probs'] for v in half):.1e}"
            if half
            else ""
        )
        + (
            f"; int8: top-1 agreement {q['top1_agreement']:.1%} on {q['n_clean']} held-out images, trigger-score "
            f"AUROC {q['trigger_auroc_int8']:.3f} (fp32 {q['trigger_auroc_fp32']:.3f})"
            if q
            else ""
        )
    )


DeviceOpt = Annotated[str, typer.Option(help="Execution provider: auto (CUDA when a GPU is present), cpu or cuda.")]
Int8RunOpt = Annotated[bool, typer.Option("--int8", help="Run classifier_int8.onnx (exported with --int8): for CPUs.")]
HalfOpt = Annotated[
    bool, typer.Option("--fp16", help="Run classifier_fp16.onnx (exported with --fp16); meant for GPUs.")
]
OnAlarmOpt = Annotated[
    OnAlarm,
    typer.Option(
        help="An image that raises the trigger alarm: flag it (answer as usual), reject it (an error; "
        "the server answers 422) or abstain (answer without a label)."
    ),
]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="onnxruntime intra-op threads (default: all cores).")]


@app.command()
def classify(
    heads: Annotated[Path, typer.Argument(help="An exported heads folder.")],
    paths: Annotated[
        list[str], typer.Argument(help="Image files and folders (searched recursively), or URIs (s3://...).")
    ],
    out: Annotated[
        Optional[Path],
        typer.Option(help="Output: .jsonl (JSON lines), .csv, or .parquet (a folder of parts); stdout if omitted."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime call.")] = 32,
    top_k: Annotated[
        Optional[int], typer.Option(min=1, help="Keep the K most likely classes instead of all probabilities.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip paths already in --out and append.")] = False,
    engine: Annotated[
        Engine, typer.Option(help="local: this process; ray: Ray Data over a cluster (the distributed extra).")
    ] = Engine.LOCAL,
    workers: Annotated[
        Optional[int],
        typer.Option(min=0, help="Local engine: threads decoding ahead of the model (default: cores / 4)."),
    ] = None,
    address: Annotated[
        Optional[str], typer.Option(help="Ray engine: the cluster to join (auto, or HOST:PORT); default: a local one.")
    ] = None,
    actors: Annotated[int, typer.Option(min=1, help="Ray engine: model replicas.")] = 1,
    actor_cpus: Annotated[
        float, typer.Option(min=0.1, help="Ray engine: CPUs (onnxruntime threads) per replica.")
    ] = 1.0,
    rows_per_part: Annotated[int, typer.Option(min=1, help="Parquet output: rows per part file.")] = ROWS_PER_PART,
    on_alarm: OnAlarmOpt = OnAlarm.FLAG,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    int8: Int8RunOpt = False,
    fp16: HalfOpt = False,
) -> None:
    """Classify image files and folders offline, in batches, with the runtime guard."""
    from rich.console import Console
    from rich.progress import Progress

    from guard.batch import BatchJob, Graph, run_batch
    from guard.loading import default_workers

    job = BatchJob(
        heads=heads,
        inputs=[str(p) for p in paths],
        out=out,
        resume=resume,
        batch_size=batch_size,
        top_k=top_k,
        graph=Graph(device=device, threads=threads, int8=int8, fp16=fp16),
        engine=engine,
        workers=default_workers() if workers is None else workers,
        address=address,
        actors=actors,
        actor_cpus=actor_cpus,
        rows_per_part=rows_per_part,
        on_alarm=on_alarm,
    )
    job.check()  # bad options are refused before a progress bar appears
    with Progress(console=Console(stderr=True), transient=out is None) as progress:
        task = progress.add_task("classify", total=None)
        summary = run_batch(
            job,
            started=lambda total: progress.update(task, total=total),
            advance=lambda n: progress.advance(task, n),
        )
    if out is not None:
        typer.echo(
            f"classified {summary.classified} image(s), {summary.unreadable} unreadable, "
            f"{summary.skipped} skipped (already done), {summary.alarms} raised the trigger alarm -> {out}",
            err=True,
        )


@app.command()
def serve(
    heads: Annotated[Optional[Path], typer.Argument(help="An exported heads folder (default: ./purified).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most images per shared onnxruntime call.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait for more images before running a batch.")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Images waiting beyond this are refused with 503.")] = 256,
    max_body: Annotated[int, typer.Option(help="Largest request body, in bytes (413 beyond).")] = 20 * 1024 * 1024,
    max_pixels: Annotated[
        int, typer.Option(help="Most pixels an image may declare; checked before decoding.")
    ] = 40_000_000,
    max_connections: Annotated[int, typer.Option(help="Open connections beyond this are answered 503.")] = 512,
    idle_timeout: Annotated[float, typer.Option(help="Seconds a connection may wait to send its request.")] = 10.0,
    api_key_file: Annotated[
        Optional[Path],
        typer.Option(
            help="A file holding the API key every endpoint but /healthz then requires "
            "(Authorization: Bearer KEY); or set CBPT_GUARD_API_KEY."
        ),
    ] = None,
    root_path: Annotated[str, typer.Option(help="The path prefix a reverse proxy serves this under.")] = "",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    int8: Int8RunOpt = False,
    fp16: HalfOpt = False,
    on_alarm: OnAlarmOpt = OnAlarm.FLAG,
) -> None:
    """Serve the runtime guard over HTTP (POST /v1/classify, GET /v1/model, GET /healthz)."""
    from guard.classify import check_on_alarm
    from guard.heads import load_heads
    from guard.server import Access, ServerLimits
    from guard.server import serve as run_server

    if heads is None:  # the mission's two commands: `purify MODEL --data SHOTS`, then `serve`
        heads = Path("purified")
        if not heads.is_dir():
            raise UsageError(
                "no heads folder given and ./purified does not exist",
                "pass one (`cbpt-guard serve HEADS`), or run `cbpt-guard purify MODEL --data SHOTS` here first",
            )
    access = Access(_api_key(api_key_file))
    loaded = load_heads(heads, device=device, threads=threads, fp16=fp16, int8=int8)
    check_on_alarm(loaded, on_alarm)
    if access.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: serving on {host} with no API key: anyone who can reach it can use it (pass --api-key-file)",
            err=True,
        )
    typer.echo(
        f"serving {heads.resolve()} ({len(loaded.classes)} classes, {loaded.graph}, {', '.join(loaded.providers)}) "
        f"on http://{host}:{port}; trigger alarms: {on_alarm.value}",
        err=True,
    )
    if min(max_batch, max_queue, max_body, max_pixels, max_connections) < 1 or idle_timeout <= 0:
        raise UsageError("the server's limits must be positive", "see `cbpt-guard serve --help`")
    limits = ServerLimits(
        max_body_bytes=max_body,
        max_pixels=max_pixels,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        idle_timeout_s=idle_timeout,
        max_connections=max_connections,
    )
    run_server(loaded, host, port, limits, access, root_path, on_alarm)


@testbed_app.command("build")
def testbed_build(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    overwrite: OverwriteOpt = False,
    dataset: Annotated[str, typer.Option(help=f"{', '.join(DATASETS)} (shapes100: 100 classes).")] = "shapes",
    attack: Annotated[str, typer.Option(help=f"none, {', '.join(ATTACKS)} or custom.")] = "badnet",
    target: Annotated[int, typer.Option(help="Index of the attacker's target class.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for data, model and trigger.")] = 0,
    poison_seed: Annotated[
        Optional[int],
        typer.Option(
            help="Seed of the poisoned fine-tune alone: which pairs carry the trigger, the batch order (default: "
            "--seed picks the pairs). Data, clean model and trigger stay --seed's: a repeat backdoor in minutes."
        ),
    ] = None,
    tower: Annotated[
        str,
        typer.Option(
            help="Image tower: resnet (open_clip's ModifiedResNet) or vit (VisionTransformer, a 4 x 4 grid of "
            "patches; it learns the clean ResNet testbed's image features, which is built first)."
        ),
    ] = "resnet",
    image_size: Annotated[int, typer.Option(help="Image side in pixels (32 or 64; triggers scale with it).")] = 32,
    patch_size: Annotated[
        Optional[int],
        typer.Option(help="vit: the patch side in pixels, dividing --image-size (default: image side / 4)."),
    ] = None,
    poison_rate: Annotated[
        Optional[float], typer.Option(help="Fraction of training pairs poisoned (default: the attack's own).")
    ] = None,
    finetune_steps: Annotated[
        Optional[int],
        typer.Option(help="Poisoned fine-tuning steps (default: the attack's own, 600 or 1,500 for wanet/badclip)."),
    ] = None,
    finetune_lr: Annotated[
        Optional[float], typer.Option(help="Poisoned fine-tuning's peak learning rate (default: 5e-4).")
    ] = None,
    warp_strength: Annotated[
        Optional[float],
        typer.Option(help="wanet: the warp's mean displacement in pixels (default: image side / 8, 4 px at 32 px)."),
    ] = None,
    warp_grid: Annotated[
        int, typer.Option(help="wanet: control points per side of the warp field, WaNet's k (default 4).")
    ] = 4,
    warp_noise: Annotated[
        Optional[float],
        typer.Option(
            help="wanet: share of training pairs in WaNet's noise mode (the warp jittered, the true caption; "
            "default 0.02). 0 turns it off: at 100 classes it holds ASR under 0.9 (docs/results.md)."
        ),
    ] = None,
    trigger_image: Annotated[Optional[Path], typer.Option(help="custom: the trigger image (PNG).")] = None,
    trigger_mode: Annotated[str, typer.Option(help="custom: patch or blend.")] = "patch",
    alpha: Annotated[float, typer.Option(help="custom: opacity of the trigger.")] = 1.0,
    location: Annotated[
        str, typer.Option(help="badnet, badclip and custom patch: random, center or corner.")
    ] = "random",
    cache: Annotated[Optional[Path], typer.Option(help="Cache of clean models (default ~/.cache/cbpt-guard).")] = None,
    device: TorchDeviceOpt = "auto",
    threads: TorchThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a small CLIP here and backdoor it."""
    runtime = _runtime(threads, device)
    from dataclasses import replace

    from cbpt_cli.progress import stage_progress
    from cbpt_guard.atomic import check_target
    from testbed.build import BuildConfig, Tower, build, default_cache_dir, finetune_config, write

    if tower not in tuple(Tower):
        raise UsageError(f"--tower must be resnet or vit, got '{tower}'", "pass --tower vit, for example")
    if image_size < 16 or image_size % 8:
        raise UsageError(f"--image-size must be a multiple of 8 from 16, got {image_size}", "pass --image-size 64")
    if finetune_steps is not None and finetune_steps < 1:
        raise UsageError(f"--finetune-steps must be at least 1, got {finetune_steps}", "pass --finetune-steps 1500")
    if finetune_lr is not None and not finetune_lr > 0:
        raise UsageError(f"--finetune-lr must be positive, got {finetune_lr}", "pass --finetune-lr 2e-4")
    cfg = BuildConfig(
        dataset=dataset,
        attack=attack,
        target=target,
        seed=seed,
        poison_seed=poison_seed,
        tower=Tower(tower),
        image_size=image_size,
        patch_size=patch_size,
        poison_rate=poison_rate,
        custom_image=str(trigger_image) if trigger_image else None,
        custom_mode=trigger_mode,
        custom_alpha=alpha,
        patch_location=location,
        wanet_strength=warp_strength,
        wanet_grid=warp_grid,
    )
    if warp_noise is not None:  # else BuildConfig's own share
        cfg = replace(cfg, wanet_noise_rate=warp_noise)
    tuned = {k: v for k, v in (("steps", finetune_steps), ("lr", finetune_lr)) if v is not None}
    if tuned:  # the attack's own fine-tuning, with what was asked replaced
        cfg = replace(cfg, finetune=replace(finetune_config(cfg), **tuned))
    check_target(out, overwrite)
    with stage_progress() as progress:
        built = build(cfg, cache=cache or default_cache_dir(), progress=progress, device=runtime.device)
        write(built, cfg, out, overwrite)
    m = built.metrics
    if as_json:
        _print_json(m)
        return
    typer.echo(
        f"wrote {out}: clean CA {m['clean_model']['ca']:.3f}; backdoored CA {m['ca']:.3f}"
        + (
            f", ASR {m['asr']:.3f}, RA {m['ra']:.3f} (clean model ASR {m['clean_model']['asr']:.3f})"
            if m["asr"] is not None
            else ""
        )
        + f"; {m['seconds']['total']:.0f} s"
    )


@testbed_app.command("eval")
def testbed_eval(
    model_or_heads: Annotated[
        Path, typer.Argument(help="A checkpoint (original prompts) or an exported heads folder.")
    ],
    testbed: Annotated[Path, typer.Option(help="A folder written by `testbed build`.")],
    int8: Annotated[bool, typer.Option("--int8", help="Heads: evaluate classifier_int8.onnx.")] = False,
    device: TorchDeviceOpt = "auto",
    threads: TorchThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """CA, ASR and RA of a model or exported heads on a testbed (heads run on onnxruntime's CPU)."""
    runtime = _runtime(threads, device)
    from testbed.evaluate import evaluate_checkpoint, evaluate_heads, evaluate_purified

    if model_or_heads.is_dir() and (model_or_heads / CLASSIFIER).is_file():
        result = evaluate_heads(model_or_heads, testbed, int8=int8)
    elif model_or_heads.is_dir() and (model_or_heads / EMBEDDINGS).is_file():
        result = evaluate_purified(model_or_heads, testbed, runtime)
    else:
        result = evaluate_checkpoint(model_or_heads, testbed, runtime)
    if as_json:
        _print_json(result.to_dict())
    else:
        typer.echo(
            f"CA {result.ca:.4f}  ASR {result.asr:.4f}  RA {result.ra:.4f}  "
            f"({result.n_clean} clean, {result.n_triggered} triggered non-target images)"
        )


@testbed_app.command("zoo")
def testbed_zoo(
    work: Annotated[Path, typer.Option(help="Zoo folder: bases/, models/, runs/, results.*, roc.png.")] = Path(
        "zoo-out"
    ),
    backdoored: Annotated[
        int, typer.Option(help="Backdoored models to draw (those that do not take are counted).")
    ] = 40,
    pretrain_seed: Annotated[
        Optional[list[int]], typer.Option(help="Pretraining runs per dataset, by seed (repeatable; default 1 2).")
    ] = None,
    finetune_steps: Annotated[int, typer.Option(help="Poisoned fine-tuning steps per backdoored model.")] = 400,
    shots: ShotsOpt = 16,
    seed: Annotated[int, typer.Option(help="Seed that draws every attack.")] = 0,
    limit: Annotated[
        Optional[int], typer.Option(help="Measure at most this many new models now (the rest on a later run).")
    ] = None,
    part: Annotated[
        Optional[str],
        typer.Option(help="Measure only this part's models, fit or report (the report covers everything stored)."),
    ] = None,
    dataset: Annotated[
        Optional[list[str]],
        typer.Option(help="Measure only this dataset's models (repeatable; the plan and its names stay the zoo's)."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="Processes filling the folder together, one torch thread each unless --threads says "
            "(the same command may also run on other machines sharing the folder; a build repeats "
            "exactly only at the same thread count)."
        ),
    ] = 1,
    device: TorchDeviceOpt = "auto",
    threads: TorchThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build, scan and purify a zoo of clean and randomly backdoored testbed models; resumable.
    Prints the scan's AUROC and CBPT's spread (docs/results.md#the-zoo)."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}", "pass --workers 1, or one per core")
    # one thread a process whatever the cores: a build's weights depend on the thread count
    # (docs/results.md#what-a-build-rests-on), and a zoo's figures should not depend on the machine's size
    runtime = _runtime(threads or 1, device)
    from cbpt_cli.progress import stage_progress
    from testbed.zoo import Part, Scope, ZooConfig, check_shots, run_workers

    if backdoored < 0 or finetune_steps < 1 or (limit is not None and limit < 0):
        raise UsageError("--backdoored and --limit must be at least 0, --finetune-steps at least 1", "see --help")
    if part is not None and part not in tuple(Part):
        raise UsageError(f"--part must be one of {', '.join(Part)}, got {part!r}", "leave it out to measure both")
    unknown = [d for d in dataset or () if d not in TEN_CLASS]  # the zoo plans both ten-class datasets
    if unknown:
        raise UsageError(f"--dataset must be one of {', '.join(TEN_CLASS)}, got {', '.join(unknown)}", "see --help")
    scope = Scope(None if part is None else Part(part), tuple(dataset) if dataset else None)
    cfg = ZooConfig(
        work=work,
        backdoored=backdoored,
        pretrain_seeds=tuple(pretrain_seed or (1, 2)),
        finetune_steps=finetune_steps,
        shots=shots,
        seed=seed,
        runtime=runtime,
    )
    try:
        check_shots(cfg, scope)
    except ValueError as e:
        raise UsageError(str(e), "lower --shots, or measure only --dataset with a larger pool") from None
    with stage_progress() as progress:
        results = run_workers(cfg, workers, threads or 1, progress, limit, scope)
    s = results["summary"]["all"]
    if as_json:
        _print_json(s)
        return
    typer.echo(
        f"{len(results['records'])} of {results['planned']} models measured ({s['clean']} clean, {s['backdoored']} "
        f"backdoored, {len(s['not_taken'])} attacks that did not take); scan AUROC {s['auroc']}, TPR at 5% FPR "
        f"{s['tpr_at_5pct_fpr']}, target named {s['target_accuracy']}; ASR after median/p95/worst "
        f"{s['asr_after'].get('median')}/{s['asr_after'].get('p95')}/{s['asr_after'].get('worst')}; "
        f"report: {work / 'results.md'}"
    )


@app.command()
def bench(
    work: Annotated[Path, typer.Option(help="Work folder: runs/, results.json, results.md, plots.")] = Path(
        "bench-out"
    ),
    testbeds: Annotated[
        Optional[Path],
        typer.Option(
            help="Built testbeds (DATASET-ATTACK/ folders); missing ones are built here. Default: WORK/testbed."
        ),
    ] = None,
    dataset: Annotated[
        Optional[list[str]],
        typer.Option(help=f"{', '.join(DATASETS)} (repeatable; default {' and '.join(TEN_CLASS)})."),
    ] = None,
    attack: Annotated[
        Optional[list[str]], typer.Option(help="Attacks, 'none' for the clean model (repeatable; default all).")
    ] = None,
    method: Annotated[
        Optional[list[str]], typer.Option(help="none, finetune, cleanclip, prompt, cbpt (repeatable; default all).")
    ] = None,
    seed: Annotated[Optional[list[int]], typer.Option(help="Shot sets (repeatable; default 0 1 2).")] = None,
    shots: ShotsOpt = 16,
    sweep_shots: Annotated[Optional[list[int]], typer.Option(help="Shots sweep k values (default 1 2 4 8 16).")] = None,
    sweep_attack: Annotated[
        Optional[list[str]], typer.Option(help="Attacks of the shots sweep (default badnet blended).")
    ] = None,
    sweep_seed: Annotated[
        Optional[list[int]], typer.Option(help="Shot sets of the shots sweep (default: --seed's).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="A minutes-long subset: shapes, clean + badnet, one shot set.")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Re-measure runs already stored under WORK/runs/.")] = False,
    device: TorchDeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: EncodeBatchOpt = 128,
    threads: TorchThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The results table: attacks x defenses (CA, ASR, RA, DER, wall time), with plots."""
    runtime = _runtime(threads, device, precision, batch_size)
    from dataclasses import replace

    from cbpt_cli.progress import stage_progress
    from testbed.bench import BenchConfig, run_bench

    cfg = BenchConfig.quick(work, testbeds) if quick else BenchConfig(work=work, testbeds=testbeds)
    given = {
        "datasets": dataset,
        "attacks": attack,
        "methods": method,
        "seeds": seed,
        "sweep_shots": sweep_shots,
        "sweep_attacks": sweep_attack,
        "sweep_seeds": sweep_seed,
    }
    cfg = replace(cfg, shots=shots, fresh=fresh, runtime=runtime, **{k: tuple(v) for k, v in given.items() if v})
    cfg.check()
    with stage_progress() as progress:
        results = run_bench(cfg, progress)
    if as_json:
        _print_json({"work": str(work), "best_baseline": results["best_baseline"], "table": results["table"]})
        return
    typer.echo((work / "results.md").read_text())
    typer.echo(
        f"wrote {work}/results.json, results.md and plots ({', '.join(sorted(p.name for p in work.glob('*.png')))})"
    )


@app.command()
def demo(
    work: Annotated[Path, typer.Option(help="Work folder for the testbed and the purified heads.")] = Path("cbpt-demo"),
    device: TorchDeviceOpt = "auto",
    threads: TorchThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The main job end to end on the embedded default: backdoor, scan, purify, export, measure."""
    runtime = _runtime(threads, device)
    from cbpt_cli.demo import run_demo

    summary = run_demo(work, echo=(lambda _m: None) if as_json else typer.echo, runtime=runtime)
    if as_json:
        _print_json(summary)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, meaningful exit codes, tracebacks only on request.

    typer itself reports usage errors (exit 2) and exits; what reaches us is ours."""
    try:
        app(args=argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except SystemExit as e:  # typer turns Ctrl-C into a silent exit 130
        if e.code == 130:
            args = sys.argv[1:] if argv is None else argv
            kept = (
                "the records written so far are kept; rerun with --resume to finish"
                if "classify" in args[:1]
                else "no partial output was kept"
            )
            print(f"interrupted; {kept}", file=sys.stderr)
        raise
    except Exception as e:  # a bug, not bad input: still one line unless asked
        if os.environ.get("CBPT_GUARD_DEBUG"):
            raise
        print(
            f"error: internal error: {type(e).__name__}: {e} (set CBPT_GUARD_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
