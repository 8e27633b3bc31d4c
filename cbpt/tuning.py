"""Step 2 of CBPT: class-wise prompt tuning on cached image features.

Only the context vectors learn; the losses are `losses.clean_loss`, `losses.trigger_loss`
(triggered shots back to their true class) and a keep-close term. Three named rules decide
what is kept (docs/method.md#acceptance, #judging, #escalation):
- an `Acceptance` policy says which tuned checkpoints may replace the original prompts;
- `Judging` says how held-out triggered shots rank them (`RungSearch` keeps a rung's best);
- a `Ladder` says how hard the trigger loss may push, rung by rung, on held-out evidence
  (`Climb` weighs the rungs).
A `ClassSchedule` bounds what one step costs when there are many classes
(docs/scale.md#class-bounded-tuning).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Protocol

import torch
import torch.nn.functional as F

from cbpt.features import FeatureCache, PartialCopies, PartialTriggers
from cbpt.losses import away_loss, class_logits, clean_loss, decision_kl, keep_kl_loss, keep_loss, trigger_loss
from cbpt.prompts import ClassPrompts

EVAL_ROWS = 8192  # image features per matrix product while evaluating a head


class KeepLoss(StrEnum):
    """L_keep: stay near the original prompts' embeddings, their decisions, or both."""

    COSINE = "cosine"
    KL = "kl"
    BOTH = "both"


class RungVerdict(StrEnum):
    STOP = "stop"  # it spent more held-out clean accuracy than allowed; stronger rungs would spend more
    TAKE = "take"  # it sends fewer held-out triggered shots to their target
    KEEP = "keep"  # the best so far stays


def clean_kept(before: float, after: float, tolerance: float, count: int) -> bool:
    """Whether a clean accuracy read on `count` images (0: not known) stayed within `tolerance`
    of `before`, in whole images: n images cannot show a loss finer than 1/n, so one image may
    always go (at K = 16, 40 held-out images, a 1.5-point tolerance refused every checkpoint
    that lost one; docs/method.md#acceptance)."""
    allowed = max(tolerance, 1 / count) if count else tolerance
    return after >= before - allowed - 1e-9


@dataclass(frozen=True)
class HeldOut:
    """A head's figures on the held-out shots (on the tuning shots when none are held out)."""

    clean_acc: float
    trig_acc: float  # triggered shots (as found) classified as their true class
    objective: float  # L_clean + alpha * L_trig (as found)
    clean_kl: float  # how far the clean decisions moved from the original head's
    # triggered shots sent to their trigger's target, the worst over the strengths judged
    # (`Judging`): the stand-in for ASR
    to_target: float | None = None
    clean_count: int = 0  # clean images the accuracy was read on (0: not known)
    found_to_target: float | None = None  # the same of the copies as found (None: `to_target`)

    @property
    def reach(self) -> float:
        return self.to_target or 0.0

    @property
    def found_reach(self) -> float:
        """The share of the copies as found that reach the target: evidence from triggers the
        inversion found, not from copies taken further."""
        return self.reach if self.found_to_target is None else self.found_to_target

    def kept_by(self, h: HeldOut, tolerance: float) -> bool:
        """Whether `h` kept this head's clean accuracy within `tolerance` (`clean_kept`)."""
        return clean_kept(self.clean_acc, h.clean_acc, tolerance, self.clean_count)


@dataclass(frozen=True)
class Copies:
    """A head's decisions on the held-out triggered copies taken one distance along their
    trigger's feature shift (`features.extrapolate`; 1: as the inverted trigger took them)."""

    strength: float
    count: int
    home: int  # sent to their true class
    reached: int  # sent to their trigger's target
    loss_sum: float  # trigger loss (no margin) summed over the copies


@dataclass(frozen=True)
class CleanFigures:
    """A head's clean figures on the held-out shots, read one way (`ServedReading`)."""

    acc: float
    loss: float  # mean cross-entropy
    kl: float  # mean KL of the original head's decisions to this one's


@dataclass(frozen=True)
class ServedReading:
    """How a checkpoint's held-out clean accuracy is read (docs/method.md#served-reading).

    Purify ships a routed head: the tuned embeddings answer only for the images the route sends
    them. Read with the tuned embeddings answering everywhere, a stronger rung is charged for
    held-out shots it will never answer, and the first rung is kept where the backdoor is not
    settled (the 32-px ViT's sig). Read as served alone, it is charged only for the few shots the
    route sends it (about a fifth of the held-out set), too few to see what it costs the test
    images it will answer. So: as served, and the tuned embeddings read everywhere may lose at
    most `slack` more than the tolerance. Found backdoors only: a model read clean is judged on
    every shot (`cbpt.purify.plan_tuning`)."""

    slack: float = 0.05

    def read(self, everywhere: CleanFigures, served: CleanFigures | None) -> CleanFigures:
        """The figures the acceptance and the ladder judge (`served` None: no route, `everywhere`)."""
        if served is None:
            return everywhere
        return replace(served, acc=min(served.acc, everywhere.acc + self.slack))


@dataclass(frozen=True)
class Judging:
    """How the held-out triggered copies judge a checkpoint (docs/method.md#judging).

    `beyond`: the held-out copies are also taken this many times as far along their trigger's
    shift, and the share that reaches the target is the worst over every strength. The inverted
    trigger is the smallest that flips the shots; a head that sends just those home has not
    settled a backdoor whose real trigger reaches further.
    `by_reach`: a rung's checkpoints are ranked by that share first (the stand-in for ASR), then
    by the share sent home; a warped or occluded image often cannot go home, and the checkpoint
    that sends most home need not be the one that sends fewest to the target."""

    beyond: tuple[float, ...] = (1.25,)
    by_reach: bool = True
    rank_beyond: bool = True  # the ranking reads the worst strength's share (False: the copies as found)

    @staticmethod
    def read(
        clean_acc: float, clean_loss: float, clean_kl: float, count: int, copies: list[Copies], alpha: float
    ) -> HeldOut:
        """The figures of one evaluation: home share and objective from the copies as found,
        the share reaching the target from the worst strength."""
        found = next(c for c in copies if c.strength == 1.0)
        return HeldOut(
            clean_acc,
            found.home / found.count,
            clean_loss + alpha * found.loss_sum / found.count,
            clean_kl,
            max(c.reached / c.count for c in copies),
            count,
            found.reached / found.count,
        )

    def key(self, h: HeldOut, eligible: bool) -> tuple:
        """A checkpoint's rank (higher is better); `key[1:]` is its robustness."""
        if self.by_reach:
            return (eligible, -(h.reach if self.rank_beyond else h.found_reach), h.trig_acc, -h.objective)
        return (eligible, h.trig_acc, -h.objective)


@dataclass(frozen=True)
class Ladder:
    """Escalation (docs/method.md#escalation): stronger trigger losses, (alpha, margin in
    logits), tried in turn while more than `target_rate` of the held-out triggered shots still
    reach their target. A stronger rung must keep the first rung's held-out clean accuracy,
    less `allowance` where at least `strong_evidence` of those shots reached the target there;
    the floor applies to each of a stronger rung's checkpoints (`Ladder.holds`), so a rung is
    refused only when none of them keeps it."""

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
        strong = first.found_reach >= self.strong_evidence
        kept = original.kept_by(first, clean_tolerance)
        return first.clean_acc - (self.allowance if strong and kept else 0.0)

    @staticmethod
    def holds(h: HeldOut, floor: float | None) -> bool:
        """Whether a checkpoint keeps a stronger rung's floor (None: the first rung has none)."""
        return floor is None or h.clean_acc >= floor - 1e-9

    def weigh(self, best: HeldOut, run: HeldOut, floor: float) -> RungVerdict:
        if not self.holds(run, floor):
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


def _decisions_kept(h: HeldOut, max_clean_kl: float | None) -> bool:
    """A few dozen held-out images cannot certify a CA change of a point or two; the mean KL
    of the original head's predictions to the tuned head's is a continuous, lower-variance
    reading of how far decisions moved (docs/method.md#acceptance). None: no cap."""
    return max_clean_kl is None or h.clean_kl <= max_clean_kl


@dataclass(frozen=True)
class FullAcceptance:
    """A backdoor was found (or --force): the most robust checkpoint that keeps held-out
    clean accuracy within `clean_tolerance` of the original head's (and, with a cap, its
    held-out decisions within `max_clean_kl`) is taken."""

    clean_tolerance: float = 0.015
    max_clean_kl: float | None = None

    def start(self, original: HeldOut, rung: Rung) -> Checkpoint | None:
        return None

    def eligible(self, h: HeldOut, original: HeldOut) -> bool:
        return original.kept_by(h, self.clean_tolerance) and _decisions_kept(h, self.max_clean_kl)


@dataclass(frozen=True)
class CautiousAcceptance:
    """The scan read clean (docs/method.md#cautious-mode): the original prompts compete and
    are kept unless a checkpoint keeps clean accuracy and resists the inverted triggers better
    than they do by `min_gain` of the held-out triggered shots."""

    clean_tolerance: float = 0.015
    min_gain: float = 0.2
    max_clean_kl: float | None = None

    def start(self, original: HeldOut, rung: Rung) -> Checkpoint | None:
        return Checkpoint(None, -1, original, rung)

    def eligible(self, h: HeldOut, original: HeldOut) -> bool:
        return (
            original.kept_by(h, self.clean_tolerance)
            and h.trig_acc >= original.trig_acc + self.min_gain
            and _decisions_kept(h, self.max_clean_kl)
        )


@dataclass(frozen=True)
class ClassSchedule:
    """Which classes' prompts one tuning step runs through the text tower. With at most
    `max_classes` classes, all of them, every step (the step is then the full one). With
    more: the triggers' targets, the `confusers` classes the last evaluation found taking the
    most images of other classes, and the rest in turn from a shuffled cycle over every
    class; the step's loss reads the shots of those classes, and every other class's text
    feature comes from a cache kept exact (a class's feature is recomputed after its context
    changed). A step's cost then follows `max_classes`, not the label set."""

    max_classes: int = 12
    confusers: int = 4

    def covers(self, num_classes: int) -> bool:
        return num_classes <= self.max_classes


@dataclass(frozen=True)
class FixedSchedule:
    """Tuning with no held-out shots (docs/method.md#shot-budget): nothing stops a rung early
    and its checkpoints are ranked on the shots it fits, so the rung's length follows the shots
    per class: the configured steps from `full_at` tuning shots per class up, proportionally
    fewer below (whole evaluations, at least one, never more than configured)."""

    full_at: int = 8

    def steps(self, steps: int, eval_every: int, shots_per_class: int) -> int:
        if shots_per_class >= self.full_at:
            return steps
        return min(steps, max(eval_every, round(steps * shots_per_class / self.full_at / eval_every) * eval_every))


@dataclass(frozen=True)
class TuningConfig:
    n_ctx: int = 4
    steps: int = 300
    lr: float = 5e-3
    alpha: float = 0.5  # weight of L_trig at the first rung
    # L_trig's two parts, each times the rung's alpha: the copies sent home (cross-entropy to their
    # true class), and pushed off their target (`losses.away_loss`; 0: off)
    home: float = 1.0
    away: float = 0.0
    margin: float = 0.0  # L_trig's margin (logits) at the first rung
    beta: float = 2.0  # weight of L_keep
    keep: KeepLoss = KeepLoss.BOTH
    views: int = 2  # augmented views per shot, besides the shot itself
    shifts: int = 1  # places each inverted trigger is applied at (1 = where it was found)
    # how far each triggered copy's feature shift is taken: as the inverted trigger took it,
    # and optionally further (docs/method.md#trigger-strength: mixed results, off by default)
    strengths: tuple[float, ...] = (1.0,)
    # the copies that set how low the route's trigger side may fall (None: its reach alone)
    partial: PartialTriggers | None = field(default_factory=PartialTriggers)
    judging: Judging = field(default_factory=Judging)
    eval_every: int = 10
    patience: int = 10  # evaluations without held-out improvement before a rung stops
    clean_tolerance: float = 0.015  # held-out clean accuracy a checkpoint may lose
    # as the routed head serves the held-out shots (None: the tuned embeddings answering all)
    served: ServedReading | None = field(default_factory=ServedReading)
    max_clean_kl: float | None = None  # how far held-out decisions may move (None: no cap; docs/method.md#acceptance)
    ladder: Ladder = field(default_factory=Ladder)
    classes: ClassSchedule = field(default_factory=ClassSchedule)
    fixed: FixedSchedule = field(default_factory=FixedSchedule)
    seed: int = 0

    @property
    def held_out_strengths(self) -> tuple[float, ...]:
        """How far the held-out triggered copies are taken: as tuned, and as judged."""
        return tuple(dict.fromkeys(self.strengths + self.judging.beyond))

    def unchecked(self, shots_per_class: int) -> TuningConfig:
        """This config for tuning with no held-out shots (`FixedSchedule`)."""
        return replace(self, steps=self.fixed.steps(self.steps, self.eval_every, shots_per_class))


@dataclass(frozen=True)
class TuningData:
    """What step 2 learns from."""

    cache: FeatureCache  # the tuning shots
    held_out: FeatureCache | None  # early stopping and escalation; None: none were held out
    original: torch.Tensor  # [C, D] the original prompts' head: the keep-close anchor
    scale: float  # the model's logit scale
    # [N] bool over `held_out.clean`: the shots the route sends to the tuned embeddings (None: no
    # route, they answer for every image; `cbpt.purify.route_for`)
    served: torch.Tensor | None = None
    partial: PartialCopies | None = None  # the tuning shots' partial copies (`TuningConfig.partial`)


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


class TextCache:
    """Every class's current text feature [C, D], exact at all times: a class's row is
    recomputed (without gradients) only after its context changed, and only when a step or an
    evaluation reads it from here."""

    def __init__(self, prompts: ClassPrompts):
        self.prompts = prompts
        self.feats = prompts.features()
        self.stale = torch.zeros(prompts.num_classes, dtype=torch.bool)

    def _refresh(self, rows: torch.Tensor) -> None:
        if rows.numel():
            with torch.no_grad():
                self.feats[rows.to(self.feats.device)] = torch.cat(
                    [self.prompts(classes=rows[i : i + 256]) for i in range(0, rows.numel(), 256)]
                )
            self.stale[rows] = False

    def step(self, classes: torch.Tensor) -> torch.Tensor:
        """[C, D]: `classes` through the text tower with gradients, the others from the cache."""
        outside = self.stale.clone()
        outside[classes] = False
        self._refresh(outside.nonzero().flatten())
        live = self.prompts(classes=classes)
        if classes.numel() == self.prompts.num_classes:
            return live  # `classes` is every class, in order
        return self.feats.index_put((classes.to(self.feats.device),), live)

    def changed(self, classes: torch.Tensor) -> None:
        self.stale[classes] = True

    def current(self) -> torch.Tensor:
        self._refresh(self.stale.nonzero().flatten())
        return self.feats

    def reset(self) -> None:
        """After the context was set from outside (a new rung, a checkpoint)."""
        self.stale[:] = True


class _ClassPicker:
    """`ClassSchedule` made concrete for one model: the classes of each step, in turn."""

    def __init__(self, schedule: ClassSchedule, num_classes: int, targets: torch.Tensor, seed: int):
        self.schedule, self.num_classes = schedule, num_classes
        self.targets = sorted(set(targets.tolist()))
        self.order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed + 2)).tolist()
        self.at = 0
        self.hard: list[int] = []

    def next(self) -> torch.Tensor:
        if self.schedule.covers(self.num_classes):
            return torch.arange(self.num_classes)
        m = self.schedule.max_classes
        picked = list(dict.fromkeys(self.targets + self.hard))[:m]
        taken = set(picked)
        while len(picked) < m:
            c = self.order[self.at % self.num_classes]
            self.at += 1
            if c not in taken:
                picked.append(c)
                taken.add(c)
        return torch.tensor(sorted(picked))

    def confused(self, wrong_by_class: torch.Tensor) -> None:
        """`wrong_by_class` [C]: images of other classes each class took at the last evaluation."""
        k = min(self.schedule.confusers, self.num_classes)
        top = torch.topk(wrong_by_class.float().cpu(), k)
        self.hard = [int(c) for c, n in zip(top.indices, top.values) if n > 0]


def _rows_of(labels: torch.Tensor, classes: torch.Tensor, all_classes: bool) -> torch.Tensor | None:
    """The rows whose label is in `classes` (None: every row)."""
    return None if all_classes else torch.isin(labels, classes.to(labels.device)).nonzero().flatten()


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x[rows]


@dataclass(frozen=True)
class Evaluation:
    """A head's raw figures on a feature cache, before `Judging` reads them."""

    clean_acc: float  # the tuned embeddings answering for every clean image
    clean_loss: float  # mean
    clean_kl: float  # mean KL of the original head's decisions to this one's
    clean_count: int
    copies: list[Copies]  # one per strength of the triggered copies (none: no triggered copies)
    wrong: torch.Tensor  # [C] images of other classes each class took (clean and as-found copies)
    served: CleanFigures | None = None  # the head as served (`evaluate(served=...)`), None: not asked

    @property
    def everywhere(self) -> CleanFigures:
        return CleanFigures(self.clean_acc, self.clean_loss, self.clean_kl)


@torch.no_grad()
def evaluate(
    d: FeatureCache, g: torch.Tensor, original: torch.Tensor, scale: float, served: torch.Tensor | None = None
) -> Evaluation:
    """The head `g` on the cache `d`, `EVAL_ROWS` image features at a time. With `served` ([N]
    bool over `d.clean`: the rows a route sends to `g`), also the clean figures of the head as
    served, `g` on those rows and `original` on the others (`Evaluation.served`); `wrong` counts
    `g`'s own decisions (docs/method.md#served-reading)."""
    wrong = torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
    c, kl, right = 0.0, 0.0, 0
    sc, skl, sright = 0.0, 0.0, 0
    for i in range(0, d.clean.shape[0], EVAL_ROWS):
        f, y = d.clean[i : i + EVAL_ROWS], d.clean_labels[i : i + EVAL_ROWS]
        tuned, kept = class_logits(f, g, scale), class_logits(f, original, scale)
        c += float(F.cross_entropy(tuned, y, reduction="sum"))
        kl += float(decision_kl(tuned, kept, reduction="sum"))
        pred = tuned.argmax(1)
        right += int((pred == y).sum())
        wrong += torch.bincount(pred[pred != y], minlength=g.shape[0])
        if served is not None:
            answer = torch.where(served[i : i + EVAL_ROWS, None], tuned, kept)
            sc += float(F.cross_entropy(answer, y, reduction="sum"))
            skl += float(decision_kl(answer, kept, reduction="sum"))
            sright += int((answer.argmax(1) == y).sum())
    n = d.clean.shape[0]
    copies = []
    for strength, rows in d.strength_groups() if len(d.triggered) else []:
        t, home, reached = 0.0, 0, 0
        for i in range(0, rows.numel(), EVAL_ROWS):
            r = rows[i : i + EVAL_ROWS]
            f, y = d.triggered[r], d.triggered_labels[r]
            t += float(trigger_loss(f, g, y, scale)) * f.shape[0]
            pred = class_logits(f, g, scale).argmax(1)
            home += int((pred == y).sum())
            reached += int((pred == d.triggered_targets[r]).sum())
            if strength == 1.0:  # the copies as found: those further out are not images
                wrong += torch.bincount(pred[pred != y], minlength=g.shape[0])
        copies.append(Copies(strength, rows.numel(), home, reached, t))
    as_served = None if served is None else CleanFigures(sright / n, sc / n, skl / n)
    return Evaluation(right / n, c / n, kl / n, n, copies, wrong, as_served)


class Tuner:
    """Trains the context vectors rung by rung under one acceptance policy, logging each evaluation."""

    def __init__(self, prompts: ClassPrompts, data: TuningData, cfg: TuningConfig, acceptance: Acceptance):
        self.prompts, self.data, self.cfg, self.acceptance = prompts, data, cfg, acceptance
        self.check = data.held_out or data.cache
        self.texts = TextCache(prompts)
        self.picker = _ClassPicker(cfg.classes, prompts.num_classes, data.cache.triggered_targets, cfg.seed)
        self.original = self.validate(data.original, cfg.alpha)
        self.log: list[dict] = []

    def validate(self, g: torch.Tensor, alpha: float) -> HeldOut:
        """The head `g` on the held-out shots (`evaluate`); also tells the class picker which
        classes took the most images of others."""
        reading = self.cfg.served
        served = self.data.served if reading is not None and self.check is self.data.held_out else None
        e = evaluate(self.check, g, self.data.original, self.data.scale, served)
        self.picker.confused(e.wrong)
        clean = e.everywhere if reading is None else reading.read(e.everywhere, e.served)
        if not e.copies:
            return HeldOut(clean.acc, 0.0, clean.loss, clean.kl, clean_count=e.clean_count)
        return Judging.read(clean.acc, clean.loss, clean.kl, e.clean_count, e.copies, alpha)

    def loss(self, g: torch.Tensor, rung: Rung, classes: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss on the shots of `classes` (all of them when the schedule covers
        every class), against every class's text feature `g`."""
        c, cfg, scale = self.data.cache, self.cfg, self.data.scale
        every = classes.numel() == g.shape[0]
        rows = _rows_of(c.clean_labels, classes, every)
        clean, clean_labels = _take(c.clean, rows), _take(c.clean_labels, rows)
        l_clean = clean_loss(clean, g, clean_labels, scale)
        trig_rows = _rows_of(c.triggered_labels, classes, every)
        triggered = _take(c.triggered, trig_rows)
        # no triggered features: prompt tuning without the dummy trigger (a baseline)
        l_trig = g.new_zeros(())
        if len(triggered):
            if cfg.home:
                labels = _take(c.triggered_labels, trig_rows)
                l_trig = l_trig + cfg.home * trigger_loss(triggered, g, labels, scale, rung.margin)
            if cfg.away:
                targets = _take(c.triggered_targets, trig_rows).to(g.device)
                l_trig = l_trig + cfg.away * away_loss(triggered, g, targets, scale, rung.margin)
        on = classes.to(g.device)
        g_on = g if every else g[on]
        original_on = self.data.original if every else self.data.original[on]
        l_keep = _keep(cfg.keep, g, g_on, self.data.original, original_on, clean, scale)
        loss = l_clean + rung.alpha * l_trig + cfg.beta * l_keep
        return loss, {"loss": loss, "clean": l_clean, "trig": l_trig, "keep": l_keep}

    def step(self, opt: torch.optim.Optimizer, rung: Rung) -> dict[str, torch.Tensor]:
        """One optimiser step on the schedule's next classes; the loss terms."""
        classes = self.picker.next()
        loss, parts = self.loss(self.texts.step(classes), rung, classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.texts.changed(classes)
        return parts

    def train_rung(self, rung: Rung, tick: Callable[[int], None], floor: float | None = None) -> Checkpoint:
        """One rung from the current context: its best checkpoint (`RungSearch`)."""
        cfg, prompts = self.cfg, self.prompts
        opt = torch.optim.Adam(prompts.parameters(), lr=cfg.lr)
        self.texts.reset()
        search = RungSearch(rung, self.acceptance, self.original, cfg.judging, floor, cfg.patience)
        stops = self.data.held_out is not None  # early stopping only against held-out shots
        for step in range(1, cfg.steps + 1):
            parts = self.step(opt, rung)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                h = self.validate(self.texts.current(), rung.alpha)
                terms = {k: v.item() for k, v in parts.items()}
                self.log.append({"rung": rung.index, "step": step, **terms, "held_out": asdict(h)})
                if search.offer(step, h, prompts.snapshot) and stops:
                    break
            tick(step)
        assert search.best is not None  # the last step is always evaluated
        return search.best


class RungSearch:
    """One rung's best checkpoint, read from its evaluations as they come: eligible (by the
    acceptance and the ladder's `floor`) first, then by `Judging.key`. Early stopping once
    neither the best checkpoint nor the rung's robustness whatever its eligibility improved
    for `patience` evaluations (an early eligible checkpoint must not stop a rung whose clean
    accuracy has yet to recover: docs/method.md#acceptance). Pure bookkeeping, so a rule can be
    replayed on recorded evaluations (benchmarks/selection_replay.py)."""

    def __init__(
        self,
        rung: Rung,
        acceptance: Acceptance,
        original: HeldOut,
        judging: Judging,
        floor: float | None,
        patience: int,
    ):
        self.rung, self.acceptance, self.original = rung, acceptance, original
        self.judging, self.floor, self.patience = judging, floor, patience
        self.best = acceptance.start(original, rung)
        self.best_key = None if self.best is None else judging.key(self.best.held_out, True)
        self.progress: tuple | None = None
        self.stale = 0

    def offer(self, step: int, h: HeldOut, snapshot: Callable[[], torch.Tensor]) -> bool:
        """Weigh one evaluation (`snapshot` gives its context, taken only if it is the best so
        far); whether patience has run out."""
        eligible = self.acceptance.eligible(h, self.original) and Ladder.holds(h, self.floor)
        key = self.judging.key(h, eligible)
        improved = self.progress is None or key[1:] > self.progress
        self.progress = key[1:] if improved else self.progress
        if self.best_key is None or key > self.best_key:
            self.best_key, self.stale = key, 0
            self.best = Checkpoint(snapshot(), step, h, self.rung)
        elif improved:  # still getting more robust: a later checkpoint may become eligible
            self.stale = 0
        else:
            self.stale += 1
        return self.stale >= self.patience


@dataclass
class Climb:
    """The ladder's decisions from rung to rung (docs/method.md#escalation): the first rung's
    best checkpoint sets the floor; each stronger one is weighed against the best so far."""

    ladder: Ladder
    original: HeldOut
    clean_tolerance: float
    chosen: Checkpoint | None = None
    floor: float | None = None
    refused: str | None = None  # why the climb stopped at a rung that failed the floor

    def add(self, run: Checkpoint) -> bool:
        """Weigh a rung's best checkpoint; whether the next rung is worth training."""
        if self.chosen is None:
            self.chosen, self.floor = run, self.ladder.floor(run.held_out, self.original, self.clean_tolerance)
        else:
            assert self.floor is not None
            verdict = self.ladder.weigh(self.chosen.held_out, run.held_out, self.floor)
            if verdict is RungVerdict.STOP:
                self.refused = f"held-out clean accuracy fell below {self.floor:.4f}"
                return False
            if verdict is RungVerdict.TAKE:
                self.chosen = run
        return not self.ladder.settled(self.chosen.held_out)


def _keep(
    kind: KeepLoss,
    g: torch.Tensor,
    g_on: torch.Tensor,
    original: torch.Tensor,
    original_on: torch.Tensor,
    clean: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """L_keep: the cosine term over the step's classes (`*_on`; the others do not move), the
    decision term over the step's clean shots against every class."""
    if kind is KeepLoss.COSINE:
        return keep_loss(g_on, original_on)
    if kind is KeepLoss.KL:
        return keep_kl_loss(clean, g, original, scale)
    return keep_loss(g_on, original_on) + keep_kl_loss(clean, g, original, scale)


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
    tuner = Tuner(prompts, data, cfg, acceptance)
    init = prompts.snapshot()
    climbs = data.held_out is not None and len(data.held_out.triggered) > 0
    rungs = [Rung(0, cfg.alpha, cfg.margin)] + [
        Rung(i + 1, a, m) for i, (a, m) in enumerate(cfg.ladder.rungs) if climbs
    ]
    total = cfg.steps * len(rungs)
    climb = Climb(cfg.ladder, tuner.original, cfg.clean_tolerance)
    for rung in rungs:
        prompts.restore(init)
        tick = (lambda d, off=rung.index * cfg.steps: progress(off + d, total)) if progress else (lambda _d: None)
        go_on = climb.add(tuner.train_rung(rung, tick, climb.floor))
        if climb.refused:
            tuner.log.append({"rung": rung.index, "rejected": climb.refused})
        if not go_on:
            break
    chosen = climb.chosen
    assert chosen is not None  # the first rung always runs
    if progress:  # the rungs not needed are skipped: the bar ends full
        progress(total, total)
    final = data.original.clone() if chosen.ctx is None else prompts.features(chosen.ctx)
    prompts.restore(init if chosen.ctx is None else chosen.ctx)
    return TuningResult(
        text_features=final,
        original=data.original,
        chosen=chosen,
        original_held_out=tuner.original,
        history=tuner.log,
        seconds=time.perf_counter() - t0,
    )
