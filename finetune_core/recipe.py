"""Recipe pieces torchvision's reference scripts and fastai add to a plain training loop:
weight EMA, MixUp/CutMix, one-cycle momentum, gradient accumulation, test-time
augmentation, and which of them keep a frozen prefix's feature cache from holding.

Each is a RunConfig setting, off (or at the peers' default) unless asked for; the engine
calls these at a few places of its loop (Trainer.train_step, _validate, _score_best, the
checkpoints). Built on what already does it: torch.optim.swa_utils for the EMA,
torchvision's transforms.v2 for MixUp/CutMix (and data/augment.py for the augmentation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from finetune_core import metrics
from finetune_core.data import augment as augment_mod

# --- what keeps the feature cache from holding (no model needed: New run asks too) ----------


def cache_blocker(cfg: Any) -> str | None:
    """Returns why the training images' input changes from epoch to epoch beyond what a
    cache of one or two views holds (augment none or flip), or None when it does not: then
    a frozen prefix's outputs can be computed once."""
    if cfg.augment == "crop":
        return "random-resized crops (augment crop) give new images every epoch"
    if cfg.augment not in ("none", "flip"):
        return f"augment {cfg.augment} changes every image anew each epoch"
    if cfg.random_erase > 0:
        return f"random erasing (random_erase {cfg.random_erase:g}) erases anew every epoch"
    mixes = [n for n, a in (("MixUp", cfg.mixup_alpha), ("CutMix", cfg.cutmix_alpha)) if a > 0]
    if mixes:
        return f"{' and '.join(mixes)} mix the images of each batch anew every step"
    return None


# --- weight EMA ------------------------------------------------------------------------------


def ema_decay(cfg: Any) -> float:
    """Returns the decay of each EMA update, adjusted as torchvision's reference adjusts
    --model-ema-decay: 1 - (1 - decay) x images per optimizer step (all devices) x model_ema_steps /
    epochs (at least 0), so that the average spans a like share of the run whatever the
    batch, the update interval and the epochs."""
    images = cfg.batch_size * cfg.accumulate_steps * max(1, cfg.devices)
    alpha = (1.0 - cfg.model_ema_decay) * images * cfg.model_ema_steps / cfg.epochs
    return 1.0 - min(1.0, alpha)


EMA_STILL_AT_START = 0.25  # the share of the starting weights above which New run warns


@dataclasses.dataclass(frozen=True)
class EMAReach:
    """How far a weight EMA gets in one run: `updates` averaging updates (after warm-up) of
    `decay` each leave `still_at_start` (decay ** updates) of the average at the weights it
    started from; `suggested_decay` is the --model-ema-decay that, updated every step,
    leaves 1 % there (None when the run is too short for any)."""

    updates: int
    decay: float
    still_at_start: float
    suggested_decay: float | None


def ema_reach(cfg: Any, train_images: int) -> EMAReach:
    """Returns how far cfg's weight EMA gets over a run on train_images training images.

    torchvision's defaults (decay 0.99998 every 32 steps, adjusted by ema_decay) are set
    for ImageNet's 1.28 M images: since the adjustment divides by the epochs, what is left of
    the start, about exp(-(1 - decay) x batch x model_ema_steps x updates per epoch), hangs
    on the size of an epoch, not on the number of epochs. On ImageNet nothing is left; on
    digits (1,437 images, batch 64: 22 steps an epoch) 96 % is, for 3 epochs as for 600,
    and the figures the EMA is scored by are an untrained model's (bench/README.md, the
    recipe's digits table)."""
    from finetune_core.data.loader import steps_per_epoch

    devices = max(1, cfg.devices)
    batches = steps_per_epoch(max(1, train_images // devices), max(1, cfg.batch_size))
    per_epoch = math.ceil(batches / max(1, cfg.accumulate_steps))
    total = per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * per_epoch))
    every = max(1, cfg.model_ema_steps)
    updates = sum(1 for step in range(1, total + 1, every) if step > warmup)
    decay = ema_decay(cfg)
    suggested = None
    if total - warmup >= 10:  # updated every step, the average may forget its start
        per_step = 0.01 ** (1 / (total - warmup))
        images = cfg.batch_size * cfg.accumulate_steps * devices
        suggested = 1 - (1 - per_step) * cfg.epochs / images  # ema_decay's adjustment undone
        suggested = suggested if 0 < suggested < 1 else None
    return EMAReach(updates, decay, decay**updates, suggested)


class WeightEMA:
    """An exponential moving average of a model's weights and buffers (torch's AveragedModel
    with get_ema_multi_avg_fn, use_buffers as the reference's ExponentialMovingAverage),
    updated after optimizer steps 1, 1 + every, 1 + 2 every, ...; during warm-up each update
    copies the weights (the reference's reset of n_averaged)."""

    def __init__(self, model: nn.Module, cfg: Any, warmup_steps: int):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.every = cfg.model_ema_steps
        self.decay = ema_decay(cfg)
        self.warmup_steps = warmup_steps
        self.average = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True
        )
        self.average.requires_grad_(False)

    def after_optimizer_step(self, model: nn.Module, count: int) -> None:
        """Updates the average after the optimizer step number `count` (from 1) when due."""
        if (count - 1) % self.every:
            return
        if count <= self.warmup_steps:
            self.average.n_averaged.fill_(0)  # the next update copies
        self.average.update_parameters(model)

    @contextlib.contextmanager
    def in_place_of(self, model: nn.Module):
        """Puts the average's weights into model while inside (what evaluation and saving
        then see) and the model's own back afterwards."""
        live = model.state_dict()  # shares storage with the parameters and buffers
        averaged = self.average.module.state_dict()
        kept = {k: v.clone() for k, v in live.items()}
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(averaged[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(kept[k])

    def copy_to(self, model: nn.Module) -> None:
        """Puts the average's weights into model for good."""
        averaged = self.average.module.state_dict()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(averaged[k])

    def state(self, keep: set[str]) -> dict[str, Any]:
        """Returns what a resume needs: the average of the parameters in keep (the ones that
        ever train: the others equal the model's), every buffer, and the update count."""
        module = self.average.module
        buffers = {name for name, _ in module.named_buffers()}
        tensors = {
            k: v.detach().cpu().clone()
            for k, v in module.state_dict().items()
            if k in keep or k in buffers
        }
        return {"tensors": tensors, "n_averaged": int(self.average.n_averaged)}

    def load_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restores state() onto the average, starting from model's (the resumed) weights."""
        module = self.average.module
        module.load_state_dict(model.state_dict())
        module.load_state_dict(state["tensors"], strict=False)
        self.average.n_averaged.fill_(int(state["n_averaged"]))

    def tensors(self) -> list[torch.Tensor]:
        """Returns the tensors the average keeps (for the memory measure)."""
        return list(self.average.module.state_dict().values())


# --- MixUp / CutMix ----------------------------------------------------------------------------


class Mixer:
    """MixUp and/or CutMix of a normalised batch (transforms.v2's, each batch one of the two
    when both are on, as the reference's RandomChoice), drawing from the batch's generator."""

    def __init__(self, cfg: Any, num_classes: int):
        from torchvision.transforms import v2

        mixes = []
        if cfg.mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
        if cfg.cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mixed batch, targets): each row of targets is a probability over the
        classes (its image's share of each label, summing to one)."""
        with augment_mod.drawing_from(generator, x.device):
            mixed, targets = self.mix(x, labels)
        return mixed, targets


def mixer_for(cfg: Any, num_classes: int) -> Mixer | None:
    return Mixer(cfg, num_classes) if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 else None


# --- one-cycle momentum --------------------------------------------------------------------------

MOMENTUM_HIGH, MOMENTUM_LOW = 0.95, 0.85  # fastai's moms=(0.95, 0.85, 0.95)


def momentum_at(cfg: Any, step: int, total_steps: int, steps_per_epoch: int) -> float | None:
    """Returns the momentum after `step` batches when one-cycle cycles it, else None: high
    through the warm-up, down to low while the lr rises (the first 30 % of the cycle, as
    engine.lr_factor), back up while it falls, on cosines."""
    if cfg.scheduler != "onecycle" or not cfg.cycle_momentum:
        return None
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return MOMENTUM_HIGH
    t = (step - warmup) / max(1, total_steps - warmup)
    span = MOMENTUM_HIGH - MOMENTUM_LOW
    if t < 0.3:
        return MOMENTUM_HIGH - span * 0.5 * (1 - math.cos(math.pi * t / 0.3))
    return MOMENTUM_LOW + span * 0.5 * (1 - math.cos(math.pi * min(1.0, (t - 0.3) / 0.7)))


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float | None) -> None:
    """Sets SGD's momentum, or Adam's and AdamW's beta1, of every group (None: unchanged)."""
    if momentum is None:
        return
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum


# --- gradient accumulation -----------------------------------------------------------------------


def accumulation(batch_index: int, every: int, batches: int) -> tuple[bool, bool, int]:
    """Returns (first, last, size) of the accumulation group of a batch of the epoch: groups
    of `every` batches from the epoch's first, the last group the batches left over."""
    i = batch_index % max(1, batches)
    start = i - i % every
    size = min(every, batches - start) if batches > 0 else every
    return i == start, i == start + size - 1, max(1, size)


def optimizer_steps(epoch: int, batch_index: int, every: int, batches: int) -> int:
    """Returns how many optimizer steps the run has taken once the group of this batch (of
    `epoch`, from 1) steps."""
    per_epoch = math.ceil(batches / every)
    return (epoch - 1) * per_epoch + (batch_index % max(1, batches)) // every + 1


# --- test-time augmentation ----------------------------------------------------------------------

TTA_VIEWS = 4  # augmented views of each image (fastai's tta n=4)
TTA_BETA = 0.25  # the plain image's share (fastai's beta)


def tta_words(cfg: Any) -> str:
    """Returns what a TTA figure averages, for the summary and the page."""
    if cfg.tta == "flip":
        return "the mean of the softmax of each image and of its mirror"
    return (
        f"{TTA_BETA:g} x the softmax of each image + {1 - TTA_BETA:g} x the mean of "
        f"{TTA_VIEWS} views with the run's augmentation ({cfg.augment})"
    )


@torch.no_grad()
def tta_evaluate(trainer, split) -> dict:
    """Returns the scores of the model's weights now on a split with test-time augmentation
    (cfg.tta; tta_words says what is averaged): loss (the negative log of the averaged
    probability of the true class), acc, acc5, confusion matrix, per-class accuracy and per
    image true, pred and confidence, as engine.Trainer.evaluate gives them."""
    cfg = trainer.cfg
    trainer.parts.model.eval()
    k = trainer.exp.num_classes
    bs = max(cfg.batch_size, 128)
    generators = [
        torch.Generator(device=trainer.device).manual_seed(cfg.seed * 7_919 + view)
        for view in range(TTA_VIEWS if cfg.tta == "augment" else 0)
    ]

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        with trainer.autocast():
            return trainer.model(x).float().softmax(1)

    scores = metrics.SplitScores(k, trainer.exp.data.classes)
    for start in range(0, len(split), bs):
        images = split.images[start : start + bs]
        y = split.labels[start : start + bs].to(trainer.device)
        plain = probabilities(trainer.to_input(images, None))
        if cfg.tta == "flip":  # the mirror of the uint8 image, as augment flip mirrors
            p = (plain + probabilities(trainer.to_input(images.flip(-1), None))) / 2
        else:
            views = [probabilities(trainer.to_input(images, g)) for g in generators]
            p = TTA_BETA * plain + (1 - TTA_BETA) * torch.stack(views).mean(0)
        loss = float(-p.gather(1, y[:, None]).clamp_min(1e-12).log().sum())
        scores.add(p, y, loss, probabilities=p)
    return scores.result()
