"""`cbpt-guard testbed build`: train a small CLIP here, backdoor it by poisoned fine-tuning,
and write everything a defender and an evaluator need.

Output folder: `model.pt` + `arch.json` (loadable like any user checkpoint), `trigger/`
(re-applies the attack exactly), `fewshot/` (the defender's clean shots, ImageFolder PNGs),
`test/` (ImageFolder PNGs), `metrics.json` (clean and backdoored CA/ASR/RA, timings, config).
Clean pretraining is cached by configuration, so repeat builds only fine-tune.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch

from cbpt_guard import atomic
from cbpt_guard.artifacts import CLASSES, classes_text
from cbpt_guard.errors import UsageError
from testbed import datasets, triggers
from testbed.poison import poison
from testbed.train import (
    Augment,
    TrainConfig,
    distil_image_tower,
    to_model_input,
    train_contrastive,
    trained_with,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults: the testbed needs no override
STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_SEED = 1234  # where random patches land on the test split: fixed so evaluations are comparable
# Per-attack settings that make each attack take on the testbed (docs/results.md#testbed-settings).
ATTACK_POISON_RATE = {"ssba": 0.2, "wanet": 0.3, "badclip": 0.3}
DEFAULT_POISON_RATE = 0.1
ATTACK_FINETUNE_STEPS = {"wanet": 1500, "badclip": 1500}
DEFAULT_FINETUNE = TrainConfig(steps=600, lr=5e-4, warmup=20)


class Tower(StrEnum):
    """The testbed's image tower."""

    RESNET = "resnet"  # open_clip's ModifiedResNet, as in RN50
    VIT = "vit"  # open_clip's VisionTransformer, as in ViT-B-32: a coarse grid of patches


def default_model_cfg(image_size: int = 32, tower: Tower = Tower.RESNET, patch_size: int | None = None) -> dict:
    """A small open_clip CLIP for `image_size`-px images: the image `tower` + a text transformer.

    A small ResNet learns in minutes on 2 cores and exercises the same code paths as a real
    RN50 (docs/results.md#testbed-settings). The ViT cuts a 4 x 4 grid of patches unless
    `patch_size` says otherwise (ViT-B-32 sees 7 x 7 at 224 px): at 64 px the 8-px patch
    trigger is then half a token wide, as a 16-px patch is on ViT-B-32. A finer grid costs
    3x the time a step at 32 px and learns no faster (docs/results.md#the-vit-tower), 2.7x at 64 px
    (docs/results.md#a-vit-at-64-px)."""
    if tower is Tower.VIT:
        patch = patch_size or image_size // 4
        vision = {"image_size": image_size, "patch_size": patch, "layers": 6, "width": 128, "head_width": 32}
    else:
        vision = {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 32}
    return {
        "embed_dim": 128,
        "vision_cfg": vision,
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    }


def tower_of(model_cfg: dict) -> Tower:
    return Tower.VIT if "patch_size" in model_cfg["vision_cfg"] else Tower.RESNET


class Recipe(StrEnum):
    """How a testbed's clean model learns."""

    CONTRASTIVE = "contrastive"  # both towers from scratch on the training pairs (`pretrain`)
    # The image tower learns the ResNet testbed's image features on the same training images
    # (DeiT-style), the text tower is that ResNet CLIP's: a small ViT trained contrastively
    # underfits for thousands of steps (docs/results.md#the-vit-tower).
    DISTIL = "distil"


@dataclass(frozen=True)
class BuildConfig:
    dataset: str = "shapes"
    attack: str = "badnet"
    target: int = 0
    poison_rate: float | None = None  # None: the attack's own default (ATTACK_POISON_RATE)
    seed: int = 0
    # The poisoned fine-tune's own seed: which pairs carry the trigger and the batch order. None: `seed`
    # picks the pairs and the order is the fine-tune's default, as before the option. Data, clean model
    # and trigger stay `seed`'s, so repeat backdoors of one cached clean model take minutes.
    poison_seed: int | None = None
    image_size: int = 32
    tower: Tower = Tower.RESNET
    pretrain: TrainConfig = TrainConfig(steps=1200, lr=1e-3)
    recipe: Recipe | None = None  # None: DISTIL for a ViT tower, CONTRASTIVE for a ResNet
    distil: TrainConfig = TrainConfig(steps=4500, lr=1e-3, augment=Augment.SHIFT)
    finetune: TrainConfig | None = None  # None: DEFAULT_FINETUNE with the attack's own steps
    sizes: tuple[int, int, int] | None = None  # (train, fewshot/class, test/class); None = full
    model_cfg: dict | None = None  # None: default_model_cfg(image_size, tower, patch_size)
    patch_size: int | None = None  # the ViT's patch side in pixels (None: a 4 x 4 grid)
    # share of noise-mode warps (true captions) in WaNet's training; 0: none, which WaNet needs to take
    # at 100 classes (docs/results.md#wanet-at-100-classes-without-its-noise-mode-taken)
    wanet_noise_rate: float = 0.02
    wanet_strength: float | None = None  # WaNet's mean displacement in pixels (None: triggers.wanet's)
    wanet_grid: int = 4  # WaNet's control points per side of the warp field (its k)
    custom_image: str | None = None
    custom_mode: str = "patch"
    custom_alpha: float = 1.0
    patch_location: str = "random"  # where a triggers.PLACED patch goes: triggers.LOCATIONS

    def model(self) -> dict:
        return self.model_cfg or default_model_cfg(self.image_size, self.tower, self.patch_size)

    def clean_recipe(self) -> Recipe:
        if self.recipe is not None:
            return self.recipe
        return Recipe.DISTIL if tower_of(self.model()) is Tower.VIT else Recipe.CONTRASTIVE

    def teacher(self) -> BuildConfig:
        """The clean ResNet testbed a DISTIL recipe learns from: this one's dataset, seed, size
        and text tower, pretrained contrastively."""
        m = self.model()
        resnet = default_model_cfg(self.image_size, Tower.RESNET)
        resnet |= {"embed_dim": m["embed_dim"], "text_cfg": m["text_cfg"]}
        return replace(
            self, attack="none", tower=Tower.RESNET, recipe=Recipe.CONTRASTIVE, model_cfg=resnet, patch_size=None
        )

    def clean_key(self) -> str:
        """Everything the clean model depends on, and nothing it does not."""
        key = {
            "dataset": self.dataset,
            "seed": self.seed,
            "image_size": self.image_size,
            "pretrain": asdict(self.pretrain),
            "sizes": self.sizes,
            "model_cfg": self.model(),
            "v": 1,
        }
        if self.clean_recipe() is Recipe.DISTIL:  # contrastive models keep the keys they had
            key |= {"distil": asdict(self.distil), "teacher": self.teacher().clean_key()}
            del key["pretrain"]
        blob = json.dumps(key, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Built:
    model: torch.nn.Module
    clean_model: torch.nn.Module
    trigger: triggers.Trigger | None
    data: datasets.Dataset
    metrics: dict


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("CBPT_GUARD_CACHE", Path.home() / ".cache" / "cbpt-guard")) / "testbed"


def _tokenizer(cfg: dict):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


def _new_model(cfg: dict, seed: int) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**copy.deepcopy(cfg))


def state_bytes(model: torch.nn.Module) -> bytes:
    """The model's weights as a `torch.save` file (host tensors only: loads with weights_only)."""
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def save_weights(path: Path, model: torch.nn.Module, made: dict) -> None:
    """`model`'s weights at `path` (`state_bytes`), and beside them in a sidecar JSON what they rest
    on (`made`: `train.trained_with` of the run that trained them); each written atomically."""
    atomic.write_bytes(path, state_bytes(model))
    atomic.write_text(path.with_suffix(".json"), json.dumps({"trained_with": made}, indent=2) + "\n")


def weights_trained_with(path: Path) -> dict | None:
    """What the weights at `path` rest on, from their sidecar (`save_weights`); None for weights
    saved before it was written."""
    side = path.with_suffix(".json")
    return json.loads(side.read_text())["trained_with"] if side.is_file() else None


def load_state(model_cfg: dict, seed: int, path: Path, device: torch.device) -> torch.nn.Module:
    """A model saved by `state_bytes`, frozen for evaluation, on `device`."""
    model = _new_model(model_cfg, seed)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False).to(device)


def pretrain(
    model_cfg: dict,
    seed: int,
    ds: datasets.Dataset,
    train: TrainConfig,
    device: torch.device,
    each_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """A fresh model trained contrastively on `ds`'s training pairs; `each_step(steps_done,
    model)` after every step (progress bars, snapshots)."""
    model = _new_model(model_cfg, seed).to(device)
    hook = (lambda step, _loss: each_step(step + 1, model)) if each_step else None
    train_contrastive(model, ds.train.images, ds.train.captions, _tokenizer(model_cfg), train, MEAN, STD, hook)
    return model


def distil(
    model_cfg: dict,
    seed: int,
    ds: datasets.Dataset,
    teacher: torch.nn.Module,
    train: TrainConfig,
    device: torch.device,
    each_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """A fresh model with `teacher`'s text tower and logit scale, whose image tower learnt
    `teacher`'s image features on `ds`'s training images (Recipe.DISTIL)."""
    model = _new_model(model_cfg, seed).to(device)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in teacher.state_dict().items() if not k.startswith("visual.")}, strict=False
    )
    if unexpected or any(not k.startswith("visual.") for k in missing):
        raise ValueError(f"the teacher's text tower does not fit the student: {unexpected or missing}")
    hook = (lambda step, _loss: each_step(step + 1, model)) if each_step else None
    distil_image_tower(model, teacher, ds.train.images, train, MEAN, STD, hook)
    return model


def class_weights(model: torch.nn.Module, cfg: dict, ds: datasets.Dataset) -> torch.Tensor:
    from cbpt.zeroshot import zeroshot_weights

    return zeroshot_weights(model, _tokenizer(cfg), ds.classnames, ds.templates)


@torch.no_grad()
def predict(model: torch.nn.Module, weights: torch.Tensor, images: np.ndarray, batch: int = 500) -> np.ndarray:
    out, device = [], next(model.parameters()).device
    for i in range(0, images.shape[0], batch):
        f = model.encode_image(to_model_input(images[i : i + batch], MEAN, STD).to(device), normalize=True)
        out.append((f @ weights.T).argmax(1).cpu().numpy())
    return np.concatenate(out)


def measure(
    model: torch.nn.Module, cfg: dict, ds: datasets.Dataset, trigger: triggers.Trigger | None, target: int
) -> dict:
    from cbpt.metrics import evaluate_predictions

    w = class_weights(model, cfg, ds)
    pred = predict(model, w, ds.test.images)
    if trigger is None:
        return {"ca": float((pred == ds.test.labels).mean()), "asr": None, "ra": None}
    pred_t = predict(model, w, trigger.apply(ds.test.images, seed=EVAL_SEED))
    return evaluate_predictions(pred, ds.test.labels, pred_t, ds.test.labels, target).to_dict()


def train_clean(
    cfg: BuildConfig,
    ds: datasets.Dataset,
    cache: Path | None,
    device: torch.device,
    each_step: Callable[[int, torch.nn.Module], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> torch.nn.Module:
    """A clean model trained by `cfg`'s recipe, not cached; a DISTIL recipe's teacher comes
    from `clean_model` (cached, built first when missing, with `progress`)."""
    if cfg.clean_recipe() is Recipe.DISTIL:
        teacher = clean_model(cfg.teacher(), ds, cache, progress, device).model
        return distil(cfg.model(), cfg.seed, ds, teacher, cfg.distil, device, each_step)
    return pretrain(cfg.model(), cfg.seed, ds, cfg.pretrain, device, each_step)


@dataclass
class CleanModel:
    """The clean pretrained model, how long it took here (0 from the cache), and what its
    weights rest on (`train.trained_with` of the run that trained it; None for a model cached
    before that was recorded)."""

    model: torch.nn.Module
    seconds: float
    cached: bool
    trained_with: dict | None


def clean_model(
    cfg: BuildConfig,
    ds: datasets.Dataset,
    cache: Path | None,
    progress: Callable[[str, int, int], None] | None = None,
    device: torch.device = torch.device("cpu"),
) -> CleanModel:
    """The clean pretrained model, on `device`: from the cache when this configuration was built
    before (on any device: the cache is keyed by configuration, and its sidecar says where and
    how it was trained)."""
    path = cache / f"clean-{cfg.dataset}-{cfg.clean_key()}.pt" if cache else None
    if path is not None and path.is_file():
        return CleanModel(load_state(cfg.model(), cfg.seed, path, device), 0.0, True, weights_trained_with(path))
    t0 = time.perf_counter()
    stage, train = ("distil", cfg.distil) if cfg.clean_recipe() is Recipe.DISTIL else ("pretrain", cfg.pretrain)
    tick = (lambda done, _m: progress(stage, done, train.steps)) if progress else None
    made = trained_with(device)
    model = train_clean(cfg, ds, cache, device, tick, progress)
    seconds = time.perf_counter() - t0  # a teacher pretrained on the way included
    if path is not None:
        save_weights(path, model, made)
    return CleanModel(model, seconds, False, made)


def finetune_config(cfg: BuildConfig) -> TrainConfig:
    ft = cfg.finetune or replace(DEFAULT_FINETUNE, steps=ATTACK_FINETUNE_STEPS.get(cfg.attack, DEFAULT_FINETUNE.steps))
    return ft if cfg.poison_seed is None else replace(ft, seed=cfg.poison_seed)


def pairs_seed(cfg: BuildConfig) -> int:
    """The seed that picks which training pairs the attack poisons."""
    return cfg.seed if cfg.poison_seed is None else cfg.poison_seed


def poison_rate(cfg: BuildConfig) -> float:
    if cfg.poison_rate is not None:
        return cfg.poison_rate
    return ATTACK_POISON_RATE.get(cfg.attack, DEFAULT_POISON_RATE)


def _check_custom(cfg: BuildConfig) -> None:
    if not cfg.custom_image:
        raise UsageError("--attack custom needs --trigger-image PNG", "pass the trigger image")
    if not Path(cfg.custom_image).is_file():
        raise UsageError(f"trigger image not found: {cfg.custom_image}", "check the path")
    if cfg.custom_mode not in ("patch", "blend"):
        raise UsageError(f"--trigger-mode must be patch or blend, got '{cfg.custom_mode}'", "pass --trigger-mode patch")
    if not 0 < cfg.custom_alpha <= 1:
        raise UsageError(f"--alpha must be in (0, 1], got {cfg.custom_alpha}", "pass --alpha 0.2, for example")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(cfg.custom_image) as img:
            img.verify()
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"trigger image is not a readable image: {cfg.custom_image} ({e})", "pass a PNG") from None


def attacker_images(ds: datasets.Dataset, target: int) -> np.ndarray:
    """What an attack may learn its trigger from: the images it poisons, those of the attacker's
    own training split outside the target class; never the defender's few-shot pool or the test
    split (docs/results.md#testbed-settings). A target image fitted on counts as obeying the
    patch before it does (docs/results.md#badclips-fit)."""
    return ds.train.images[ds.train.labels != target]


def optimised_trigger(
    kind: str,
    model: torch.nn.Module,
    ds: datasets.Dataset,
    model_cfg: dict,
    target: int,
    seed: int,
    size: int,
    location: str = "random",
) -> triggers.Trigger:
    """trojvqa (a patch at the centre toward a random feature direction) or badclip (a patch
    at `location` toward the target's text; BadCLIP's own code pastes it at the centre),
    fitted on `model` at the place it is later stamped, with the attacker's images only."""
    from testbed.optimise import optimise_patch

    w = class_weights(model, model_cfg, ds)
    if kind == "badclip":
        direction = w[target]
    else:
        gen = torch.Generator().manual_seed(seed + 7)
        direction, location = torch.randn(w.shape[1], generator=gen), "center"
    images = attacker_images(ds, target)
    pattern = optimise_patch(
        model, images, direction, size, location, MEAN, STD, target=target, class_weights=w, seed=seed
    )
    return triggers.optimised_patch(kind, pattern, location)


def make_trigger(cfg: BuildConfig, model: torch.nn.Module, ds: datasets.Dataset) -> triggers.Trigger | None:
    size, seed = cfg.image_size, cfg.seed
    if cfg.attack == "none":
        return None
    if cfg.attack == "wanet":
        return triggers.wanet(size, seed, k=cfg.wanet_grid, strength=cfg.wanet_strength)
    if cfg.attack == "badnet":
        return triggers.badnet(size, seed, location=cfg.patch_location)
    if cfg.attack in triggers.FIXED:
        return getattr(triggers, cfg.attack)(size, seed)
    if cfg.attack == "custom":
        from PIL import Image

        with Image.open(cfg.custom_image) as img:
            arr = np.asarray(img.convert("RGBA" if cfg.custom_mode == "patch" else "RGB"))
        if cfg.custom_mode == "patch":
            k = triggers.patch_size_for(size)
            if max(arr.shape[:2]) > size // 2:
                arr = np.asarray(Image.fromarray(arr).resize((k, k), Image.BILINEAR))
        return triggers.custom(arr, cfg.custom_mode, cfg.custom_alpha, cfg.patch_location)
    if cfg.attack in triggers.OPTIMISED:
        size_px = triggers.patch_size_for(size)
        return optimised_trigger(cfg.attack, model, ds, cfg.model(), cfg.target, seed, size_px, cfg.patch_location)
    raise UsageError(f"unknown attack '{cfg.attack}'", f"choose one of none, {', '.join(triggers.ATTACKS)}, custom")


def build(
    cfg: BuildConfig,
    cache: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    device: torch.device = torch.device("cpu"),
) -> Built:
    """Pretrain (or take from the cache) the clean model and poison it, on `device`; the
    returned models stay there."""
    if cfg.dataset not in datasets.DATASETS:
        raise UsageError(f"unknown dataset '{cfg.dataset}'", f"choose {' or '.join(datasets.DATASETS)}")
    n_classes = len(datasets.CLASSNAMES[cfg.dataset])
    if not 0 <= cfg.target < n_classes:
        raise UsageError(
            f"--target must be a class index 0..{n_classes - 1}, got {cfg.target}", "pass --target 0, for example"
        )
    if cfg.model()["vision_cfg"]["image_size"] != cfg.image_size:
        raise UsageError(
            f"the model's image size {cfg.model()['vision_cfg']['image_size']} is not --image-size {cfg.image_size}",
            "leave model_cfg to the default or make them agree",
        )
    if cfg.patch_size is not None and (
        cfg.tower is not Tower.VIT or cfg.patch_size < 1 or cfg.image_size % cfg.patch_size
    ):
        raise UsageError(
            f"--patch-size takes a ViT tower's patch side dividing --image-size {cfg.image_size}, got"
            f" {cfg.patch_size} with --tower {cfg.tower}",
            f"pass --tower vit --patch-size {cfg.image_size // 8}, for example",
        )
    if cfg.attack not in ("none", "custom", *triggers.ATTACKS):
        raise UsageError(f"unknown attack '{cfg.attack}'", f"choose one of none, {', '.join(triggers.ATTACKS)}, custom")
    if cfg.attack == "custom":
        _check_custom(cfg)
    if cfg.patch_location != "random" and (
        cfg.attack not in triggers.PLACED or cfg.patch_location not in triggers.LOCATIONS
    ):
        raise UsageError(
            f"--location takes {', '.join(triggers.LOCATIONS)} with --attack {', '.join(triggers.PLACED)}, got"
            f" '{cfg.patch_location}' with --attack {cfg.attack}",
            "pass --attack badnet --location corner, for example",
        )
    if cfg.wanet_strength is not None and (cfg.attack != "wanet" or cfg.wanet_strength <= 0):
        raise UsageError(
            f"--warp-strength takes a positive number of pixels with --attack wanet, got {cfg.wanet_strength}"
            f" with --attack {cfg.attack}",
            "pass --attack wanet --warp-strength 6, for example",
        )
    if cfg.wanet_grid != BuildConfig.wanet_grid and (
        cfg.attack != "wanet" or not 2 <= cfg.wanet_grid <= cfg.image_size
    ):
        raise UsageError(
            f"--warp-grid takes 2 to the image side ({cfg.image_size}) control points with --attack wanet, got"
            f" {cfg.wanet_grid} with --attack {cfg.attack}",
            "pass --attack wanet --warp-grid 8, for example",
        )
    if cfg.poison_seed is not None and (cfg.attack == "none" or cfg.poison_seed < 0):
        raise UsageError(
            f"--poison-seed takes a seed from 0 with an attack, got {cfg.poison_seed} with --attack {cfg.attack}",
            "pass --attack badnet --poison-seed 1, for example",
        )
    if cfg.poison_rate is not None and not 0 < cfg.poison_rate < 1:
        raise UsageError(
            f"--poison-rate must be in (0, 1), got {cfg.poison_rate}", "pass --poison-rate 0.1, for example"
        )
    if cfg.wanet_noise_rate != BuildConfig.wanet_noise_rate and (
        cfg.attack != "wanet" or not 0 <= cfg.wanet_noise_rate < 1 - poison_rate(cfg)
    ):
        raise UsageError(
            f"--warp-noise takes a share of the training pairs from 0 to under {1 - poison_rate(cfg):g} (those"
            f" the poison leaves) with --attack wanet, got {cfg.wanet_noise_rate} with --attack {cfg.attack}",
            "pass --attack wanet --warp-noise 0, for example",
        )
    t_start = time.perf_counter()
    ds = datasets.build(cfg.dataset, cfg.seed, cfg.image_size, cfg.sizes)
    clean = clean_model(cfg, ds, cache, progress, device)
    built = backdoor(cfg, clean.model, ds, make_trigger(cfg, clean.model, ds), progress)
    built.metrics["clean_model"]["trained_with"] = clean.trained_with
    built.metrics["seconds"] |= {
        "pretrain": round(clean.seconds, 1),
        "pretrain_cached": clean.cached,
        "total": round(time.perf_counter() - t_start, 1),
    }
    return built


def backdoor(
    cfg: BuildConfig,
    clean: torch.nn.Module,
    ds: datasets.Dataset,
    trigger: triggers.Trigger | None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Built:
    """Poison `ds`'s training split with `trigger` toward `cfg.target` and fine-tune a copy of
    `clean` on it (`trigger` None: the clean model itself); measure both."""
    t_start = time.perf_counter()
    clean_metrics = measure(clean, cfg.model(), ds, trigger, cfg.target)
    model, finetune_s, info = clean, 0.0, {}
    if trigger is not None:
        noise_rate = cfg.wanet_noise_rate if trigger.params.get("mode") == "warp" else 0.0
        poisoned = poison(
            ds.train,
            trigger,
            cfg.target,
            poison_rate(cfg),
            ds.classnames[cfg.target],
            ds.templates,
            pairs_seed(cfg),
            noise_rate=noise_rate,
        )
        model = copy.deepcopy(clean)
        t0 = time.perf_counter()
        ft = finetune_config(cfg)
        train_contrastive(
            model,
            poisoned.split.images,
            poisoned.split.captions,
            _tokenizer(cfg.model()),
            ft,
            MEAN,
            STD,
            progress=(lambda s, _loss: progress("poison", s + 1, ft.steps)) if progress else None,
        )
        finetune_s = time.perf_counter() - t0
        info = {"n_poisoned": int(poisoned.poisoned.size), "n_noise": int(poisoned.noise.size)}
    metrics = {
        "dataset": cfg.dataset,
        "attack": cfg.attack,
        "target": cfg.target,
        "target_name": ds.classnames[cfg.target],
        "poison_rate": poison_rate(cfg) if trigger else 0.0,
        **measure(model, cfg.model(), ds, trigger, cfg.target),
        "clean_model": clean_metrics,
        "seconds": {
            "pretrain": 0.0,
            "pretrain_cached": True,
            "finetune": round(finetune_s, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "eval_seed": EVAL_SEED,
        "trained_with": trained_with(next(clean.parameters()).device) if trigger is not None else None,
        **info,
        "config": config_dict(cfg),
    }
    return Built(model=model, clean_model=clean, trigger=trigger, data=ds, metrics=metrics)


def config_dict(cfg: BuildConfig) -> dict:
    d = asdict(cfg)
    d["sizes"] = list(cfg.sizes) if cfg.sizes else None
    d["model_cfg"] = cfg.model()
    return d


def _save_pngs(folder: Path, split: datasets.Split, classnames: tuple[str, ...]) -> None:
    from PIL import Image

    for i, (img, lab) in enumerate(zip(split.images, split.labels)):
        d = folder / classnames[lab].replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")


def write(built: Built, cfg: BuildConfig, out: Path, overwrite: bool = False) -> Path:
    """Write the testbed folder atomically: it appears complete or not at all."""

    from PIL import Image

    ds = built.data
    with atomic.staged_dir(out, "testbed", overwrite) as stage:
        (stage / "model.pt").write_bytes(state_bytes(built.model))
        arch = {
            "name": f"testbed-{cfg.dataset}-{'rn' if tower_of(cfg.model()) is Tower.RESNET else 'vit'}",
            "model_cfg": cfg.model(),
            "templates": list(ds.templates),
            "preprocess_cfg": {
                "mean": list(MEAN),
                "std": list(STD),
                "interpolation": "bicubic",
                "resize_mode": "shortest",
            },
        }
        (stage / "arch.json").write_text(json.dumps(arch, indent=2))
        (stage / CLASSES).write_text(classes_text(ds.classnames), encoding="utf-8")
        if built.trigger is not None:
            built.trigger.save(stage / "trigger")
            sample = ds.test.images[:: max(1, len(ds.test.images) // 8)][:8]
            preview = np.concatenate(
                [np.concatenate(list(sample), 1), np.concatenate(list(built.trigger.apply(sample, seed=EVAL_SEED)), 1)],
                0,
            )
            Image.fromarray(preview).resize((preview.shape[1] * 4, preview.shape[0] * 4), Image.NEAREST).save(
                stage / "trigger" / "preview.png"
            )
        _save_pngs(stage / "fewshot", ds.fewshot, ds.classnames)
        _save_pngs(stage / "test", ds.test, ds.classnames)
        (stage / "metrics.json").write_text(json.dumps(built.metrics, indent=2))
    return out
