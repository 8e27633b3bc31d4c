"""Step 2 of CBPT: class-wise prompt tuning on cached image features.

Only the context vectors learn; the losses are `losses.clean_loss`, `losses.trigger_loss`
(triggered shots back to their true class) and a keep-close term. Two named rules decide
what is kept (docs/method.md#acceptance, docs/method.md#escalation):
- an `Acceptance` policy says which tuned checkpoints may replace the original prompts;
- a `Ladder` says how hard the trigger loss may push, rung by rung, on held-out evidence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Protocol

import torch

from cbpt.features import FeatureCache
from cbpt.losses import clean_loss, keep_kl_loss, keep_loss, trigger_loss
from cbpt.prompts import ClassPrompts


class KeepLoss(StrEnum):
    """L_keep: stay near the original prompts' embeddings, their decisions, or both."""

    COSINE = "cosine"
    KL = "kl"
    BOTH = "both"


class RungVerdict(StrEnum):
    STOP = "stop"  # it spent more held-out clean accuracy than allowed; stronger rungs would spend more
    TAKE = "take"  # it sends fewer held-out triggered shots to their target
    KEEP = "keep"  # the best so far stays


@dataclass(frozen=True)
class HeldOut:
    """A head's figures on the held-out shots (on the tuning shots when none are held out)."""

    clean_acc: float
    trig_acc: float  # triggered shots classified as their true class
    objective: float  # L_clean + alpha * L_trig
    clean_kl: float  # how far the clean decisions moved from the original head's
    to_target: float | None = None  # triggered shots sent to their trigger's target (the stand-in for ASR)

    @property
    def reach(self) -> float:
        return self.to_target or 0.0


@dataclass(frozen=True)
class Ladder:
    """Escalation (docs/method.md#escalation): stronger trigger losses, (alpha, margin in
    logits), tried in turn while more than `target_rate` of the held-out triggered shots still
    reach their target. A stronger rung must keep the first rung's held-out clean accuracy,
    less `allowance` where at least `strong_evidence` of those shots reached the target there."""

    rungs: tuple[tuple[float, float], ...] = ((1.0, 3.0), (2.0, 3.0))
    target_rate: float = 0.01
    strong_evidence: float = 0.05
    allowance: float = 0.03

    @classmethod
    def off(cls) -> Ladder:
        return cls(rungs=())

    def settled(self, h: HeldOut) -> bool:
        return h.reach <= self.target_rate

    def floor(self, first: HeldOut, original: HeldOut, clean_tolerance: float) -> float:
        """The held-out clean accuracy a stronger rung must keep. The allowance is spent only
        where the first rung kept the original head's within `clean_tolerance`."""
        strong = first.reach >= self.strong_evidence
        kept = first.clean_acc >= original.clean_acc - clean_tolerance - 1e-9
        return first.clean_acc - (self.allowance if strong and kept else 0.0)

    def weigh(self, best: HeldOut, run: HeldOut, floor: float) -> RungVerdict:
        if run.clean_acc < floor - 1e-9:
            return RungVerdict.STOP
        return RungVerdict.TAKE if run.reach < best.reach else RungVerdict.KEEP


@dataclass(frozen=True)
class Rung:
    index: int  # 0: the config's own alpha and margin
    alpha: float
    margin: float


@dataclass
class Checkpoint:
    ctx: torch.Tensor | None  # None: the original prompts
    step: int
    held_out: HeldOut
    rung: Rung


class Acceptance(Protocol):
    """Which checkpoints may replace the original prompts (docs/method.md#acceptance)."""

    def start(self, original: HeldOut, rung: Rung) -> Checkpoint | None:
        """What a rung's checkpoints compete against (None: the first one evaluated wins)."""

    def eligible(self, h: HeldOut, original: HeldOut) -> bool: ...


@dataclass(frozen=True)
class FullAcceptance:
    """A backdoor was found (or --force): the most robust checkpoint that keeps held-out
    clean accuracy within `clean_tolerance` of the original head's is taken."""

    clean_tolerance: float = 0.015

    def start(self, original: HeldOut, rung: Rung) -> Checkpoint | None:
        return None

    def eligible(self, h: HeldOut, original: HeldOut) -> bool:
        return h.clean_acc >= original.clean_acc - self.clean_tolerance


@dataclass(frozen=True)
class CautiousAcceptance:
    """The scan read clean (docs/method.md#cautious-mode): the original prompts compete and
    are kept unless a checkpoint keeps clean accuracy and resists the inverted triggers better
    than they do by `min_gain` of the held-out triggered shots."""

    clean_tolerance: float = 0.015
    min_gain: float = 0.2

    def start(self, original: HeldOut, rung: Rung) -> Checkpoint | None:
        return Checkpoint(None, -1, original, rung)

    def eligible(self, h: HeldOut, original: HeldOut) -> bool:
        return (
            h.clean_acc >= original.clean_acc - self.clean_tolerance and h.trig_acc >= original.trig_acc + self.min_gain
        )


@dataclass(frozen=True)
class TuningConfig:
    n_ctx: int = 4
    steps: int = 300
    lr: float = 5e-3
    alpha: float = 0.5  # weight of L_trig at the first rung
    margin: float = 0.0  # L_trig's margin (logits) at the first rung
    beta: float = 2.0  # weight of L_keep
    keep: KeepLoss = KeepLoss.BOTH
    views: int = 2  # augmented views per shot, besides the shot itself
    shifts: int = 1  # places each inverted trigger is applied at (1 = where it was found)
    eval_every: int = 10
    patience: int = 10  # evaluations without held-out improvement before a rung stops
    clean_tolerance: float = 0.015  # held-out clean accuracy a checkpoint may lose
    ladder: Ladder = field(default_factory=Ladder)
    seed: int = 0


@dataclass(frozen=True)
class TuningData:
    """What step 2 learns from."""

    cache: FeatureCache  # the tuning shots
    held_out: FeatureCache | None  # early stopping and escalation; None: none were held out
    original: torch.Tensor  # [C, D] the original prompts' head: the keep-close anchor
    scale: float  # the model's logit scale


@dataclass
class TuningResult:
    text_features: torch.Tensor  # [C, D] purified, normalised
    original: torch.Tensor  # [C, D] the keep-close anchor
    chosen: Checkpoint
    original_held_out: HeldOut
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kept_original(self) -> bool:
        return self.chosen.ctx is None


class _Tuner:
    """Trains the context vectors rung by rung under one acceptance policy, logging each evaluation."""

    def __init__(self, prompts: ClassPrompts, data: TuningData, cfg: TuningConfig, acceptance: Acceptance):
        self.prompts, self.data, self.cfg, self.acceptance = prompts, data, cfg, acceptance
        self.check = data.held_out or data.cache
        self.original = self.validate(data.original, cfg.alpha)
        self.log: list[dict] = []

    @torch.no_grad()
    def validate(self, g: torch.Tensor, alpha: float) -> HeldOut:
        d, scale = self.check, self.data.scale
        c = clean_loss(d.clean, g, d.clean_labels, scale)
        acc = float(((d.clean @ g.T).argmax(1) == d.clean_labels).float().mean())
        kl = float(keep_kl_loss(d.clean, g, self.data.original, scale))
        if not len(d.triggered):
            return HeldOut(acc, 0.0, float(c), kl)
        t = trigger_loss(d.triggered, g, d.triggered_labels, scale)
        pred = (d.triggered @ g.T).argmax(1)
        return HeldOut(
            acc,
            float((pred == d.triggered_labels).float().mean()),
            float(c + alpha * t),
            kl,
            float((pred == d.triggered_targets).float().mean()),
        )

    def loss(self, g: torch.Tensor, rung: Rung) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, cfg, scale = self.data.cache, self.cfg, self.data.scale
        l_clean = clean_loss(c.clean, g, c.clean_labels, scale)
        # no triggered features: prompt tuning without the dummy trigger (a baseline)
        l_trig = (
            trigger_loss(c.triggered, g, c.triggered_labels, scale, rung.margin)
            if len(c.triggered)
            else g.new_zeros(())
        )
        l_keep = _keep(cfg.keep, g, self.data.original, c.clean, scale)
        loss = l_clean + rung.alpha * l_trig + cfg.beta * l_keep
        return loss, {"loss": loss, "clean": l_clean, "trig": l_trig, "keep": l_keep}

    def train_rung(self, rung: Rung, tick: Callable[[int], None]) -> Checkpoint:
        """One rung from the current context: its best checkpoint, ranked eligible first, then
        most robust, then lowest objective; early stopping only against held-out shots."""
        cfg, prompts = self.cfg, self.prompts
        opt = torch.optim.Adam([prompts.ctx], lr=cfg.lr)
        best = self.acceptance.start(self.original, rung)
        best_key = None if best is None else (True, best.held_out.trig_acc, -best.held_out.objective)
        stale = 0
        for step in range(1, cfg.steps + 1):
            loss, parts = self.loss(prompts(), rung)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                with torch.no_grad():
                    h = self.validate(prompts(), rung.alpha)
                terms = {k: v.item() for k, v in parts.items()}
                self.log.append({"rung": rung.index, "step": step, **terms, "held_out": asdict(h)})
                key = (self.acceptance.eligible(h, self.original), h.trig_acc, -h.objective)
                if best_key is None or key > best_key:
                    best_key, stale = key, 0
                    best = Checkpoint(prompts.ctx.detach().clone(), step, h, rung)
                else:
                    stale += 1
                    if self.data.held_out is not None and stale >= cfg.patience:
                        break
            tick(step)
        assert best is not None  # the last step is always evaluated
        return best


def _keep(kind: KeepLoss, g: torch.Tensor, original: torch.Tensor, clean: torch.Tensor, scale: float) -> torch.Tensor:
    if kind is KeepLoss.COSINE:
        return keep_loss(g, original)
    if kind is KeepLoss.KL:
        return keep_kl_loss(clean, g, original, scale)
    return keep_loss(g, original) + keep_kl_loss(clean, g, original, scale)


def tune(
    prompts: ClassPrompts,
    data: TuningData,
    cfg: TuningConfig,
    acceptance: Acceptance,
    progress: Callable[[int, int], None] | None = None,
) -> TuningResult:
    """Learn the context vectors. Each rung of `cfg.ladder` (climbed only with held-out
    triggered shots to judge it by) starts again from the initial context."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tuner = _Tuner(prompts, data, cfg, acceptance)
    init = prompts.ctx.detach().clone()
    climbs = data.held_out is not None and len(data.held_out.triggered) > 0
    rungs = [Rung(0, cfg.alpha, cfg.margin)] + [
        Rung(i + 1, a, m) for i, (a, m) in enumerate(cfg.ladder.rungs) if climbs
    ]
    total = cfg.steps * len(rungs)
    chosen, floor = None, 0.0
    for rung in rungs:
        with torch.no_grad():
            prompts.ctx.copy_(init)
        run = tuner.train_rung(
            rung, (lambda d, off=rung.index * cfg.steps: progress(off + d, total)) if progress else (lambda _d: None)
        )
        if chosen is None:
            chosen, floor = run, cfg.ladder.floor(run.held_out, tuner.original, cfg.clean_tolerance)
        else:
            verdict = cfg.ladder.weigh(chosen.held_out, run.held_out, floor)
            if verdict is RungVerdict.STOP:
                tuner.log.append({"rung": rung.index, "rejected": f"held-out clean accuracy fell below {floor:.4f}"})
                break
            if verdict is RungVerdict.TAKE:
                chosen = run
        if cfg.ladder.settled(chosen.held_out):
            break
    if progress:  # the rungs not needed are skipped: the bar ends full
        progress(total, total)
    with torch.no_grad():
        final = data.original.clone() if chosen.ctx is None else prompts(chosen.ctx).detach()
        prompts.ctx.copy_(init if chosen.ctx is None else chosen.ctx)
    return TuningResult(
        text_features=final,
        original=data.original,
        chosen=chosen,
        original_held_out=tuner.original,
        history=tuner.log,
        seconds=time.perf_counter() - t0,
    )
