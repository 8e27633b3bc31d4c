"""The defenses CBPT is measured against: same model, same clean shots, same step budget.

(a) no defense: the original prompts.
(b) fine-tuning the image encoder with cross-entropy on the shots, against the original
    prompts' head (the weight-changing route CBPT argues against).
(c) CleanCLIP-style fine-tuning of both towers: the multimodal contrastive loss on shots and
    template captions, plus unimodal self-supervised losses (two augmented views of each
    image; two templates of each caption).
(d) class-wise prompt tuning without the dummy trigger: CBPT's prompt learner, clean CE and
    keep-close only, which isolates what the inversion buys.
(e) CBPT itself.

Every method returns a model (fine-tuned or the original) and a head in the shots' class
order; the caller scores both on a testbed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from cbpt.data import Shots
from cbpt.encoding import to_x01
from cbpt.features import Augment
from cbpt.model import LoadedClip, encode_pixels
from cbpt.outputs import tuning_report
from cbpt.purify import PurifyConfig, original_head, run_purify, tune_prompts, tuning_data
from cbpt.scan import scan_summary
from cbpt.tuning import FullAcceptance, TuningConfig, clean_kept
from cbpt.zeroshot import zeroshot_weights
from cbpt_guard.routing import Route

METHODS = ("none", "finetune", "cleanclip", "prompt", "cbpt")
LABELS = {
    "none": "(a) no defense",
    "finetune": "(b) image-encoder fine-tune",
    "cleanclip": "(c) CleanCLIP-style",
    "prompt": "(d) prompts, no trigger",
    "cbpt": "(e) CBPT",
}


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 300  # CBPT's prompt-tuning budget
    lr: float = 1e-4  # not CleanCLIP's own 1e-5, which barely moves ASR here (docs/results.md#the-bench)
    weight_decay: float = 0.1
    batch_size: int = 64
    eval_every: int = 25
    temperature: float = 0.07  # CleanCLIP's unimodal losses
    clean_tolerance: float = 0.015  # as CBPT's TuningConfig
    seed: int = 0


@dataclass
class Defended:
    model: torch.nn.Module  # the CLIP the head is applied to (fine-tuned or the original)
    weights: torch.Tensor  # [C, D] normalised, in the shots' class order
    seconds: float
    info: dict
    alarm_centres: torch.Tensor | None = None  # [K, D] CBPT's trigger alarm (its threshold in info["alarm"])
    route: Route | None = None  # CBPT's: where `weights` answer, the original head elsewhere


def no_defense(clip: LoadedClip, shots: Shots) -> Defended:
    t0 = time.perf_counter()
    return Defended(clip.model, original_head(clip, shots.classnames), time.perf_counter() - t0, {})


def finetune_image_encoder(clip: LoadedClip, shots: Shots, cfg: FinetuneConfig = FinetuneConfig()) -> Defended:
    """(b): CE on the shots through the frozen original head; the image tower learns."""
    head = original_head(clip, shots.classnames)
    scale = clip.logit_scale

    def loss_fn(model: torch.nn.Module, x01: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        f = _encode(model, clip, _augment(x01, gen))
        return F.cross_entropy(scale * f @ head.T, y)

    return _finetune(clip, shots, cfg, loss_fn, trainable="visual", head_fn=lambda _m: head)


def cleanclip(clip: LoadedClip, shots: Shots, cfg: FinetuneConfig = FinetuneConfig()) -> Defended:
    """(c): multimodal contrastive + unimodal self-supervised losses, both towers trained;
    the head is then rebuilt from the fine-tuned text tower with the original templates."""
    tokenizer = clip.tokenizer()
    templates = clip.templates
    names = shots.classnames

    def captions(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        picks = torch.randint(0, len(templates), (len(y),), generator=gen).tolist()
        return tokenizer([templates[t].format(names[c]) for t, c in zip(picks, y.tolist())]).to(y.device)

    def loss_fn(model: torch.nn.Module, x01: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        scale = model.logit_scale.exp()
        img1, img2 = _encode(model, clip, _augment(x01, gen)), _encode(model, clip, _augment(x01, gen))
        txt1 = model.encode_text(captions(y, gen), normalize=True)
        txt2 = model.encode_text(captions(y, gen), normalize=True)
        # Few classes, many shots per batch: pairs sharing a class are positives, not negatives.
        same = (y[:, None] == y[None, :]).float()
        multimodal = (_soft_ce(scale * img1 @ txt1.T, same) + _soft_ce(scale * txt1 @ img1.T, same)) / 2
        eye = torch.eye(len(y), device=y.device)
        tau = cfg.temperature
        image_ssl = (_soft_ce(img1 @ img2.T / tau, eye) + _soft_ce(img2 @ img1.T / tau, eye)) / 2
        text_ssl = (_soft_ce(txt1 @ txt2.T / tau, same) + _soft_ce(txt2 @ txt1.T / tau, same)) / 2
        return multimodal + image_ssl + text_ssl

    return _finetune(
        clip, shots, cfg, loss_fn, trainable="all", head_fn=lambda m: zeroshot_weights(m, tokenizer, names, templates)
    )


def prompt_tuning(clip: LoadedClip, shots: Shots, cfg: TuningConfig = TuningConfig()) -> Defended:
    """(d): CBPT's prompt learner and step 2, with no triggered features."""
    t0 = time.perf_counter()
    data = tuning_data(clip, shots, [], cfg, original_head(clip, shots.classnames))
    result = tune_prompts(clip, shots.classnames, data, cfg, FullAcceptance(cfg.clean_tolerance))
    return Defended(clip.model, result.text_features, time.perf_counter() - t0, {"best_step": result.chosen.step})


def cbpt(clip: LoadedClip, shots: Shots, cfg: PurifyConfig = PurifyConfig()) -> Defended:
    t0 = time.perf_counter()
    result = run_purify(clip, shots, cfg)
    best_step = None if result.tuning is None or result.tuning.kept_original else result.tuning.chosen.step
    return Defended(
        clip.model,
        result.purified,
        time.perf_counter() - t0,
        {
            "scan": scan_summary(result.inversion, result.classnames),
            "best_step": best_step,
            "tuning": tuning_report(result, history=False),
            "alarm": result.alarm,
            "route": None if result.route is None else result.route.describe(),
        },
        result.alarm_centres,
        result.route,
    )


def defend(
    method: str,
    clip: LoadedClip,
    shots: Shots,
    seed: int,
    purify: PurifyConfig = PurifyConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
) -> Defended:
    """One method, seeded; `purify` carries CBPT's settings, whose tuning part (d) shares."""
    tuning = replace(purify.tuning, seed=seed)
    if method == "none":
        return no_defense(clip, shots)
    if method == "finetune":
        return finetune_image_encoder(clip, shots, replace(finetune, seed=seed))
    if method == "cleanclip":
        return cleanclip(clip, shots, replace(finetune, seed=seed))
    if method == "prompt":
        return prompt_tuning(clip, shots, tuning)
    if method == "cbpt":
        return cbpt(clip, shots, purify.seeded(seed))
    raise ValueError(f"unknown method {method!r}: {', '.join(METHODS)}")


def _encode(model: torch.nn.Module, clip: LoadedClip, pixels: torch.Tensor) -> torch.Tensor:
    """`clip`'s preprocessing on a (possibly fine-tuned) copy of its model."""
    pp = clip.preprocess_cfg
    return encode_pixels(model, to_x01(pixels.to(clip.device)), pp["mean"], pp["std"])


def _augment(x01: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, _ = x01.shape
    return Augment.draw(n, h, gen)(to_x01(x01), torch.arange(n))


def _soft_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the uniform distribution over each row's positives."""
    target = positives / positives.sum(1, keepdim=True)
    return -(target * logits.log_softmax(1)).sum(1).mean()


def _finetune(clip: LoadedClip, shots: Shots, cfg: FinetuneConfig, loss_fn, trainable: str, head_fn) -> Defended:
    """AdamW on a copy of the model for the whole budget. Held-out clean accuracy is the only
    signal a defender has, so, as in CBPT's early stopping, the latest checkpoint whose held-out
    accuracy stays within `clean_tolerance` of the original model's is kept (else the most
    accurate one; `cbpt.tuning.clean_kept`). BatchNorm statistics stay frozen (eval mode): a few shots per class would
    only corrupt them."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(clip.model).eval()
    params = [p for name, p in model.named_parameters() if trainable == "all" or name.startswith("visual.")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # every one of them at once: the baselines run on testbed-sized shot sets
    check_x = (shots.held_pixels if shots.held_pixels is not None else shots.pixels)[:]
    check_y = (shots.held_labels if shots.held_labels is not None else shots.labels).to(clip.device)

    def held_acc() -> float:
        with torch.no_grad():
            return float(((_encode(model, clip, check_x) @ head_fn(model).T).argmax(1) == check_y).float().mean())

    base = held_acc()
    kept = (0, base, copy.deepcopy(model.state_dict()))  # (step, held-out accuracy, weights)
    best = kept
    n = len(shots.labels)
    for step in range(1, cfg.steps + 1):
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        loss = loss_fn(model, shots.pixels[idx], shots.labels[idx].to(clip.device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = held_acc()
            if clean_kept(base, acc, cfg.clean_tolerance, len(check_y)):
                kept = (step, acc, copy.deepcopy(model.state_dict()))
            elif acc > best[1]:
                best = (step, acc, copy.deepcopy(model.state_dict()))
    step, acc, best_state = kept if kept[0] > 0 else best
    model.load_state_dict(best_state)
    model.requires_grad_(False)
    with torch.no_grad():
        head = head_fn(model)
    return Defended(
        model, head, time.perf_counter() - t0, {"best_step": step, "held_out_acc": acc, "held_out_acc_before": base}
    )
