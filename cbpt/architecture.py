"""Identify a checkpoint's open_clip architecture from its tensors, and build that model.

An architecture is either a name from open_clip's registry (`ViT-B-32`, `RN50`, ...) or a
config carried by an `arch.json` sidecar beside the checkpoint (the testbed's own models).
Detection is exact: each plausible registry config is built on the `meta` device (no memory,
~30 ms) and its parameter names and shapes are compared with the checkpoint's. Names that no
shape can tell apart (`ViT-B-32` vs `ViT-B-32-quickgelu`) are resolved by the file's origin:
OpenAI archives were trained with QuickGELU.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cbpt_guard.errors import UsageError, UserError

SIDECAR = "arch.json"


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to build the model: a registry name, or a full open_clip config."""

    name: str
    model_cfg: dict | None = None  # set for sidecar configs; registry names use open_clip's
    preprocess_cfg: dict = field(default_factory=dict)
    source: str = "registry"  # registry | sidecar | --arch
    templates: tuple[str, ...] | None = None  # prompt templates the model was trained with, if known

    def config(self) -> dict:
        if self.model_cfg is not None:
            return copy.deepcopy(self.model_cfg)
        import open_clip

        cfg = open_clip.get_model_config(self.name)
        if cfg is None:
            raise UsageError(f"unknown architecture '{self.name}'", "see `open_clip.list_models()` for valid names")
        return cfg


@dataclass(frozen=True)
class Detection:
    spec: ArchSpec
    candidates: tuple[str, ...]  # every registry name whose shapes match exactly


def read_sidecar(checkpoint: Path) -> ArchSpec | None:
    path = checkpoint.parent / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return ArchSpec(
            name=str(data["name"]),
            model_cfg=dict(data["model_cfg"]),
            preprocess_cfg=dict(data.get("preprocess_cfg", {})),
            source="sidecar",
            templates=tuple(data["templates"]) if data.get("templates") else None,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"unreadable {path}: {e}", "fix or delete the sidecar, or pass --arch") from None


def build_model(spec: ArchSpec, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the (untrained) open_clip model for `spec`; `device='meta'` allocates nothing."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = spec.config()
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        raise UserError(f"architecture '{spec.name}' is a captioning model (CoCa)", "cbpt-guard supports CLIP models")
    if "hf_model_name" in cfg.get("text_cfg", {}) or "timm_model_name" in cfg.get("vision_cfg", {}):
        raise UserError(
            f"architecture '{spec.name}' needs a Hugging Face or timm tower that cannot be built offline",
            "use a CLIP with open_clip's own towers (ViT-*, RN*)",
        )
    cls = CustomTextCLIP if custom else CLIP
    try:
        with torch.device(device):
            model = cls(**cfg)
    except (TypeError, KeyError, ValueError, AssertionError) as e:
        source = f"{SIDECAR}'s model_cfg" if spec.source == "sidecar" else f"architecture '{spec.name}'"
        raise UserError(
            f"{source} does not build an open_clip CLIP ({type(e).__name__}: {e})",
            f"fix or delete {SIDECAR}, or pass --arch",
        ) from None
    pp = dict(open_clip.get_model_preprocess_cfg(model))
    pp.update(spec.preprocess_cfg)
    open_clip.model.set_model_preprocess_cfg(model, _full_preprocess_cfg(pp, model))
    return model


def _full_preprocess_cfg(pp: dict, model: torch.nn.Module) -> dict:
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    out = asdict(PreprocessCfg())
    out.update({k: v for k, v in pp.items() if k in out})
    out["size"] = model.visual.image_size
    out["mean"], out["std"] = tuple(out["mean"]), tuple(out["std"])
    return out


def expected_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    model = build_model(spec, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def mismatches(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Human-readable differences between a checkpoint and a model, most telling first."""
    out = []
    for k, shape in expected.items():
        if k not in state:
            out.append(f"{k} missing from the checkpoint")
        elif not _same_shape(tuple(state[k].shape), shape):
            out.append(f"{k} is {list(state[k].shape)} in the checkpoint but {list(shape)} in the model")
    out += [f"{k} is in the checkpoint but not in the model" for k in state if k not in expected]
    # Shape differences say most about the architecture; list them first.
    return sorted(out, key=lambda m: 0 if " but " in m and "not in" not in m else 1)


def _same_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    # logit_scale is a scalar in some checkpoints and a 1-element vector in others.
    return a == b or (a in ((), (1,)) and b in ((), (1,)))


def resolve(state: dict[str, torch.Tensor], checkpoint: Path, fmt: str, arch: str | None = None) -> Detection:
    """The architecture of `state`: from `--arch`, the sidecar, or detected from shapes."""
    if arch:
        spec = _spec_for_name(arch, checkpoint)
        _require_match(state, spec)
        return Detection(spec=spec, candidates=(spec.name,))
    sidecar = read_sidecar(checkpoint)
    if sidecar is not None:
        _require_match(state, sidecar)
        return Detection(spec=sidecar, candidates=(sidecar.name,))
    return detect(state, prefer_quickgelu=(fmt == "openai_torchscript"))


def _spec_for_name(arch: str, checkpoint: Path) -> ArchSpec:
    import open_clip

    sidecar = read_sidecar(checkpoint)
    if sidecar is not None and sidecar.name == arch:
        return sidecar
    if open_clip.get_model_config(arch) is None:
        close = [n for n in open_clip.list_models() if n.lower().startswith(arch.lower()[:5])][:6]
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        raise UsageError(f"unknown architecture '{arch}' for --arch", hint)
    return ArchSpec(name=arch, source="--arch")


def _require_match(state: dict[str, torch.Tensor], spec: ArchSpec) -> None:
    diff = mismatches(state, expected_shapes(spec))
    if diff:
        more = f" (+{len(diff) - 2} more)" if len(diff) > 2 else ""
        raise UserError(
            f"shape mismatch: the checkpoint does not fit {spec.source} architecture '{spec.name}': "
            + "; ".join(diff[:2])
            + more,
            "pass the right --arch, or omit it to detect the architecture from the tensors",
        )


def _signature(state: dict[str, torch.Tensor]) -> dict | None:
    """Cheap facts read off the tensors, used to shortlist registry configs."""
    proj = state.get("text_projection")
    if proj is None or proj.ndim != 2:
        return None
    return {
        "embed_dim": int(proj.shape[1]),
        "text_width": int(proj.shape[0]),
        "vit": not any(k.startswith("visual.layer1.") for k in state),
    }


def _plausible(cfg: dict, sig: dict) -> bool:
    if cfg.get("embed_dim") != sig["embed_dim"] or cfg.get("text_cfg", {}).get("width", 512) != sig["text_width"]:
        return False
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision or "hf_model_name" in cfg.get("text_cfg", {}) or "multimodal_cfg" in cfg:
        return False
    return isinstance(vision.get("layers"), int) == sig["vit"]


def detect(state: dict[str, torch.Tensor], prefer_quickgelu: bool = False) -> Detection:
    import open_clip

    sig = _signature(state)
    if sig is None:
        raise UserError(
            "unknown architecture: the checkpoint has no `text_projection`, so it is not an open_clip CLIP",
            "pass an open_clip CLIP checkpoint, or --arch NAME if its keys are renamed",
        )
    exact: list[str] = []
    closest: tuple[int, str, list[str]] | None = None
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg is None or not _plausible(cfg, sig):
            continue
        try:
            diff = mismatches(state, expected_shapes(ArchSpec(name=name)))
        except (UserError, TypeError, ValueError, RuntimeError, AssertionError):
            continue
        if not diff:
            exact.append(name)
        elif closest is None or len(diff) < closest[0]:
            closest = (len(diff), name, diff)
    if not exact:
        detail = ""
        if closest is not None:
            _, name, diff = closest
            detail = f"; closest is {name}: " + "; ".join(diff[:2])
        raise UserError(
            f"unknown architecture: no open_clip config matches the checkpoint's tensor shapes{detail}",
            "pass --arch NAME, or put an arch.json sidecar beside the checkpoint",
        )
    return Detection(spec=ArchSpec(name=_pick(exact, prefer_quickgelu)), candidates=tuple(exact))


def _pick(names: list[str], prefer_quickgelu: bool) -> str:
    quick = [n for n in names if "quickgelu" in n.lower()]
    plain = [n for n in names if "quickgelu" not in n.lower()]
    pool = (quick or plain) if prefer_quickgelu else (plain or quick)
    return min(pool, key=lambda n: (len(n), n))
