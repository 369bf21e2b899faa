"""The training engine: `prepare()` loads data, weights and model; `fit()` trains and evaluates.

Read in order: prepare, make_optimizer, lr_factor, Trainer (train_step, train_one_epoch,
evaluate, the feature cache, checkpoints, fit). Everything that is not the loop itself
(writing metrics, status, stopping, gradual unfreezing) is a Callback (callbacks.py).
The `builtin` weights must be cached before `prepare` (pretrain.ensure_builtin; every run
started by the CLI or the dashboard does that first).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune_core import (
    checkpoints,
    distributed,
    heads,
    memory,
    metrics,
    models,
    recipe,
    stats,
    strategies,
    weights,
)
from finetune_core import data as data_mod
from finetune_core.callbacks import Callback, StopTraining, make_record
from finetune_core.config import RunConfig
from finetune_core.data.augment import flip_mask, random_erase
from finetune_core.data.thumbnails import SCORED_IMAGES_FILE, write_scored_images
from finetune_core.device import pick_device, speed_settings
from finetune_core.strategies.l2sp import L2SP
from finetune_core.util.files import atomic_write

__all__ = ["Callback", "Experiment", "StopTraining", "Trainer", "TrainingFailed", "fit", "prepare"]

TRAIN_RECORD_EVERY = 10  # steps between train records (and at least RECORD_SECONDS)
RECORD_SECONDS = 0.5
FEATURE_CACHE_ENV = "FINETUNE_FEATURE_CACHE_BYTES"  # the feature cache's budget in bytes
FEATURE_CACHE_SHARE = 0.25  # without it: this share of the memory free where the cache lives
CACHE_VIEWS = {"none": 1, "flip": 2}  # views of each training image a cache holds, by augment


class TrainingFailed(RuntimeError):
    """The run cannot go on (a non-finite loss, ...); the message says what to do."""


@dataclass
class Experiment:
    """Everything fit() needs: the config, the built model, the decoded data, the device."""

    cfg: RunConfig
    parts: models.ModelParts
    data: data_mod.ImageData
    device: torch.device
    spec: models.InputSpec
    weights_note: str = ""  # where the initial weights came from, for the log

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)


def build_model(
    cfg: RunConfig, num_classes: int, *, backbone_state=None, keep_head=False, device=None
) -> models.ModelParts:
    """Returns the model for cfg: torchvision's architecture with the backbone state loaded,
    a new head for num_classes (keep_head: the state's own head, when it has one for these
    classes), as the strategy prepares it for training."""
    parts = models.create_model(
        cfg.model,
        num_classes,
        image_size=cfg.image_size,
        backbone_state=backbone_state,
        device=device,
    )
    if cfg.head == "fastai":
        heads.use_fastai_head(parts, num_classes, cfg.image_size)
    if backbone_state is not None and keep_head:
        # load_backbone_state has already dropped a head trained for another class count
        head = {k: v for k, v in backbone_state.items() if k.startswith(parts.head + ".")}
        if head:
            parts.model.load_state_dict(head, strict=False)
    strategies.get(cfg.strategy).prepare(parts, cfg)
    return parts


def prepare(cfg: RunConfig, *, runs_dir=None, progress=None) -> Experiment:
    """Returns an Experiment: data decoded once, weights loaded, model built for K classes."""
    spec = models.input_spec(cfg.model)
    device = pick_device(cfg.device)
    data = data_mod.load_data(
        cfg.data,
        image_size=cfg.image_size,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed if cfg.split_seed is None else cfg.split_seed,
        interpolation=spec.interpolation,
        progress=progress,
    )
    state = weights.load_backbone_state(
        cfg.weights, cfg.model, num_classes=len(data.classes), runs_dir=runs_dir, progress=progress
    )
    torch.manual_seed(cfg.seed)  # the new head's initialisation is part of the run's seed
    keep = state is not None and weights.keeps_trained_head(cfg.weights)
    parts = build_model(cfg, len(data.classes), backbone_state=state, keep_head=keep)
    return Experiment(cfg, parts, data, device, spec)


def make_optimizer(cfg: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """Returns SGD (momentum 0.9; Nesterov's with sgd_nesterov), Adam or AdamW over the given
    parameter groups."""
    if cfg.optimizer in ("sgd", "sgd_nesterov"):
        nesterov = cfg.optimizer == "sgd_nesterov"
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: RunConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Returns the multiplier of every group's base lr after `step` optimizer steps."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    t = (step - warmup) / max(1, total_steps - warmup)  # 0 -> 1 over the rest of the run
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "step":  # x0.1 at half and at three quarters of the run
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))
    if cfg.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    # onecycle: 30 % up from lr/25, then cosine down to lr/1e4 (Smith; torch's OneCycleLR)
    if t < 0.3:
        return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * t / 0.3))
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - 0.3) / 0.7)))


@dataclass
class FeatureCache:
    """A phase's frozen prefix computed once (Trainer.refresh_feature_cache): its outputs for
    every view of every training image (row v * N + i is view v of image i; with flip, view
    1 is the mirrored image) and for every val image, as the model computes them."""

    boundary: int  # the first group the phase trains; len(groups): only the head trains
    rest: Callable[[torch.Tensor], torch.Tensor]  # groups[boundary:] and the head -> logits
    views: int  # 1 (augment none) or 2 (flip)
    train: torch.Tensor  # [views * N, ...]
    labels: torch.Tensor  # [N], on the device
    val: torch.Tensor  # [N_val, ...]
    memory_format: torch.memory_format  # the prefix's own, kept for every batch

    def index_split(self) -> data_mod.TensorSplit:
        """Returns a split whose images are the training rows' indices: a TensorLoader serves
        them in the order it serves the images (that depends on the seed, the epoch and the
        labels only)."""
        return data_mod.TensorSplit(
            torch.arange(len(self.labels), device=self.labels.device), self.labels
        )

    def batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Returns the cached rows of a batch of training images; with flip, each image's
        view is the one augment_batch's draws from `generator` would give it."""
        rows = index
        if self.views == 2:
            mirrored = flip_mask(generator, len(index), index.device)
            rows = index + mirrored.long() * len(self.labels)
        return self.train.index_select(0, rows).contiguous(memory_format=self.memory_format)

    def tensors(self) -> list[torch.Tensor]:
        return [self.train, self.labels, self.val]


def feature_cache_budget(device: torch.device) -> int:
    """Returns the bytes a feature cache may take: $FINETUNE_FEATURE_CACHE_BYTES when set (0:
    never cache), else FEATURE_CACHE_SHARE of the memory free now where the cache is kept
    (CUDA: the GPU's free memory; CPU and MPS: the RAM available).

    A share of what is free rather than a fixed size: the cache sits beside the decoded
    images, the model, its optimizer state and the trained part's activations, and other
    runs may share the machine (the supervisor starts several at once); a fixed 4 GiB would
    be too much for a laptop and a waste of a GPU server."""
    value = os.environ.get(FEATURE_CACHE_ENV, "").strip()
    if value:
        try:
            budget = float(value)
        except ValueError:
            budget = float("nan")
        if not budget >= 0:
            raise TrainingFailed(
                f"{FEATURE_CACHE_ENV}={value!r} is not a number of bytes: set it to e.g. 4e9 "
                "(4 GB), or 0 to never cache the frozen part's outputs"
            )
        return int(budget)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * FEATURE_CACHE_SHARE)
    return int(_available_ram() * FEATURE_CACHE_SHARE)


def _budget_source() -> str:
    if os.environ.get(FEATURE_CACHE_ENV, "").strip():
        return f"${FEATURE_CACHE_ENV}"
    return f"{FEATURE_CACHE_SHARE:.0%} of the free memory; set {FEATURE_CACHE_ENV} to change it"


def _available_ram() -> int:
    """Returns the bytes of RAM available now (Linux: MemAvailable), else half of it all."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 0


def _first_trained(phase: strategies.Phase, n_groups: int) -> int:
    """Returns the index of the lowest backbone group the phase trains; n_groups when only the
    head trains."""
    return next((i for i, g in enumerate(phase.groups[:n_groups]) if g.trainable), n_groups)


def _span(groups: list[models.Group]) -> str:
    return groups[0].name if len(groups) == 1 else f"{groups[0].name} to {groups[-1].name}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """Returns channels_last for a 4-D tensor laid out so (not also plainly contiguous)."""
    if (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


class _Recorder:
    """Accumulates train loss/accuracy on the device and emits batched train records."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.reset()

    def reset(self):
        self.losses: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.images = 0
        self.since = time.perf_counter()
        self.first_step = self.trainer.step + 1

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor):
        self.losses.append(loss.detach())
        self.correct.append((logits.detach().argmax(1) == y).sum())
        self.images += len(y)

    def due(self) -> bool:
        """Returns True when a train record is due: every rank asks at the same steps and
        rank 0's clock decides for all (the record is a collective on several devices)."""
        if len(self.losses) < TRAIN_RECORD_EVERY:
            return False
        return distributed.rank0_says(time.perf_counter() - self.since >= RECORD_SECONDS)

    def flush(self) -> dict | None:
        if not self.losses:
            return None
        losses = torch.stack(self.losses).float()
        correct = torch.stack(self.correct).sum().float()
        if distributed.active():  # every rank's figures: the mean loss per step, all images
            counts = torch.stack([correct, torch.tensor(float(self.images), device=correct.device)])
            both = distributed.sum_all(torch.cat([losses, counts]))
            losses = both[: len(losses)] / distributed.world_size()
            correct, self.images = both[-2], int(both[-1].item())
        losses = losses.cpu()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = self.first_step + int(bad[0])
            raise TrainingFailed(
                f"the loss became {losses[int(bad[0])].item()} at step {step} "
                f"(epoch {self.trainer.epoch}); try a lower learning rate than {self.trainer.cfg.lr:g}"
            )
        t = self.trainer
        seconds = max(time.perf_counter() - self.since, 1e-9)
        record = make_record(
            "train",
            epoch=t.epoch,
            step=t.step,
            loss=float(losses.mean()),
            acc=float(correct) / self.images,
            acc5=None,
            lr=t.head_lr(),
            time_s=round(t.elapsed(), 3),
            images_per_s=round(self.images / seconds, 2),
        )
        self.reset()
        return record


class Trainer:
    """Runs one Experiment: the loop state callbacks may read (epoch, step, phase, ...)."""

    def __init__(
        self,
        exp: Experiment,
        callbacks=(),
        checkpoint_dir: str | Path | None = None,
        *,
        feature_cache: bool = True,
    ):
        self.exp = exp
        self.cfg = exp.cfg
        self.parts = exp.parts
        self.device = exp.device
        # on several devices: this process's rank, and only rank 0 writes files
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.writes = distributed.is_writer()
        full_train = exp.data.train
        if self.world > 1:  # this rank trains its fixed shard (its feature cache too)
            exp = self.exp = _sharded(exp, self.rank, self.world)
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.plan = strategies.make_plan(self.cfg, self.parts)
        self.epoch = 1
        self.step = 0
        self.phase = self.plan.phases[0].name
        self.best_val_acc: float | None = None
        self.best_eval: dict | None = None
        self.best_epoch: int | None = None
        self.last_eval: dict | None = None
        self.val_history: list[float] = []  # val losses, for early stopping
        self.elapsed_before = 0.0  # training seconds of earlier sessions (resume)
        self.start_time = time.perf_counter()
        # the frozen prefix's outputs while this phase trains from them (see FeatureCache)
        self.feature_cache: FeatureCache | None = None
        self.cache_allowed = feature_cache  # False: run the frozen part every step regardless
        self.cache_loader: data_mod.TensorLoader | None = None  # serves cached rows' indices
        self._splits: dict[int, models.ForwardSplit | str] = {}  # by boundary; str: why not
        self._noted: set[str] = set()  # the cache's log lines already written
        self._cache_key: tuple | None = None  # (phase, boundary) the cache was last decided for
        self.backbone_ref: dict | None = None  # what a head-only checkpoint names, once saved
        self.trainable_per_phase: dict[str, int] = {}
        self._head_only = False  # this epoch's phase trains no backbone parameter
        # the largest memory of a measured step (the first of each phase), and the phases
        # measured in this session
        self.peak_memory: memory.StepMemory | None = None
        self.memory_measured: set[str] = set()

        dev = self.device
        self.amp_dtype, self.channels_last = speed_settings(dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        model = self.parts.model.to(dev)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if self.cfg.compile else model
        self.mean = torch.tensor(exp.spec.mean, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(exp.spec.std, device=dev).view(1, 3, 1, 1)

        train = exp.data.train
        self.train_loader = self._loader(train)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        weight = None
        if self.cfg.balance == "loss":  # the weights of the whole split, the same on every rank
            counts = data_mod.class_counts(full_train, exp.num_classes).float()
            weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(dev)
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=self.cfg.label_smoothing)
        self.l2sp = L2SP(self.parts, self.plan, self.cfg.l2sp) if self.cfg.l2sp else None
        self.optimizer = make_optimizer(
            self.cfg, strategies.optimizer_groups(self.cfg, self.parts, self.plan)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(self.cfg, s, self.total_steps, self.steps_per_epoch),
        )
        self._recipe_init()
        # the model in DDP while it trains on several devices (built per phase: begin_epoch)
        self.replica = distributed.Replicated(self.parts.model) if self.world > 1 else None
        self.callbacks.append(FollowPlan())  # last, so other callbacks see the epoch's own phase

    def _loader(self, split: data_mod.TensorSplit) -> data_mod.TensorLoader:
        """Returns the training loader over split; images and cached features alike get the
        same batches in the same order (it depends on the seed, the epoch and the labels)."""
        return data_mod.TensorLoader(
            split,
            self.cfg.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            balanced=self.cfg.balance == "sampler",
            drop_last=data_mod.drops_last(len(split), self.cfg.batch_size),
        )

    # --- small helpers -------------------------------------------------------------------
    def head_lr(self) -> float:
        for g in self.optimizer.param_groups:
            if g.get("name") == strategies.HEAD:
                return float(g["lr"])
        return float(self.optimizer.param_groups[-1]["lr"])

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def current_phase(self) -> strategies.Phase:
        return self.plan.phase_at(self.epoch)

    def enter_phase(self, epoch: int) -> None:
        """Makes the model's trainable set and modes match the phase of `epoch`."""
        phase = self.plan.phase_at(epoch)
        strategies.apply_phase(self.parts, phase)
        self.phase = phase.name
        self.trainable_per_phase[phase.name] = sum(
            p.numel() for p in self.parts.model.parameters() if p.requires_grad
        )

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_input(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Returns normalised float input on the device from a uint8 batch, augmented if asked."""
        x = images.to(self.device, non_blocking=True)
        if generator is not None and self.cfg.augment != "none":
            x = data_mod.augment_batch(x, self.cfg.augment, generator, flip=self.cfg.hflip)
        x = (x.float().div_(255) - self.mean) / self.std
        if generator is not None and self.cfg.random_erase > 0:
            x = random_erase(x, self.cfg.random_erase, generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the head's input for a batch (the backbone's features), without grad, as
        the model computes it (bf16 under bf16 autocast: the head casts to that anyway)."""
        with torch.no_grad(), self.autocast():
            return self.parts.forward_features(x)

    def use_feature_cache(self) -> bool:
        """Returns True when some phase of the run trains from cached outputs of its frozen
        prefix (cache_plan; whether the model splits there and the cache fits is found when
        the phase starts, see refresh_feature_cache)."""
        return any(self.cache_plan(p, p.start_epoch)[0] is not None for p in self.plan.phases)

    # --- the loop ------------------------------------------------------------------------
    def _batch_generator(self, batch_index: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        # each rank draws its own augmentation (rank 0's draws are a one-device run's)
        offset = self.rank * 2_147_483_647
        g.manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 10_007 + batch_index + offset)
        return g

    def _set_modes(self, phase: strategies.Phase) -> None:
        strategies.set_train_mode(self.parts, phase, freeze_bn=self.cfg.freeze_bn)
        if phase.head_only:
            self.parts.model.eval()  # the whole backbone is frozen: inference mode everywhere
            self.parts.model.get_submodule(self.parts.head).train()  # fastai's BN and dropout

    def begin_epoch(self) -> data_mod.TensorLoader:
        """Sets the modes of this epoch's phase; returns the loader that serves its batches
        (uint8 images, or with a feature cache the indices of its rows, in the same order)."""
        phase = self.current_phase()
        self._set_modes(phase)
        self._head_only = phase.head_only
        loader = self.train_loader if self.feature_cache is None else self.cache_loader
        loader.set_epoch(self.epoch)
        if self.replica is not None:
            self.replica.for_phase()
        return loader

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor, batch_index: int):
        """Takes one optimizer step on a batch (uint8 images, or the indices of cached rows);
        returns (loss, logits, labels on the device)."""
        y = labels.to(self.device, non_blocking=True)
        every = self.cfg.accumulate_steps  # batches per optimizer step (recipe.accumulation)
        first, last, size = recipe.accumulation(batch_index, every, self.steps_per_epoch)
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        with self._local_grads(not last):
            loss, logits, y = self._forward_backward(inputs, y, batch_index, size)
        self.accumulating = not last
        if last:
            if self.cfg.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.parts.model.parameters() if p.requires_grad],
                    self.cfg.clip_grad,
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                count = recipe.optimizer_steps(self.epoch, batch_index, every, self.steps_per_epoch)
                self.ema.after_optimizer_step(self.parts.model, count)
        with warnings.catch_warnings():  # accumulating: the lr moves on with every batch
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        self.step += 1
        recipe.set_momentum(self.optimizer, self._momentum(self.step))
        return loss, logits, y

    def _forward_backward(
        self, inputs: torch.Tensor, y: torch.Tensor, batch_index: int, size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Computes the loss of a batch and its gradients (scaled by 1 / size, the batches
        accumulated); on several devices the forward runs inside DDP, whose backward
        averages the gradients over the ranks."""
        targets = None  # class probabilities instead of labels (MixUp/CutMix)

        def logits_of(inputs: torch.Tensor) -> torch.Tensor:
            nonlocal targets
            if self.feature_cache is not None:  # only the trained part runs
                cache = self.feature_cache
                return cache.rest(cache.batch(inputs, self._batch_generator(batch_index)))
            generator = self._batch_generator(batch_index)
            x = self.to_input(inputs, generator)
            if self.mixer is not None:
                x, targets = self.mixer(x, y, generator)
            if self._head_only:
                return self.parts.forward_head(self.features(x))
            return self.model(x)

        with self.autocast():
            logits = logits_of(inputs) if self.replica is None else self.replica(logits_of, inputs)
            loss = self.loss_fn(logits.float(), y if targets is None else targets)
            if self.l2sp is not None:
                loss = loss + self.l2sp.penalty()
        self.scaler.scale(loss / size if size > 1 else loss).backward()
        return loss, logits, y

    def _local_grads(self, local: bool):
        """Returns the context of a backward whose gradients stay on this rank (a batch
        before the last of an accumulated step: DDP's no_sync); a no-op on one device."""
        if local and self.replica is not None:
            return self.replica.no_sync()
        return contextlib.nullcontext()

    def measured_step(self, inputs: torch.Tensor, labels: torch.Tensor, batch_index: int):
        """Takes train_step's step and measures its memory (memory.measure_step), keeping the
        largest so far in peak_memory; returns what train_step returns. Once per phase: the
        phase's trainable set, and so its memory, is the same at every step."""
        held = {}
        if self.feature_cache is not None:  # kept on the device while the phase trains
            held["feature_cache"] = self.feature_cache.tensors()
        if self.l2sp is not None:  # the starting weights the penalty pulls towards
            held["l2sp_reference"] = [p0 for _, p0 in self.l2sp.pairs]
        if self.ema is not None:  # the averaged copy of the weights
            held["weight_ema"] = self.ema.tensors()
        with memory.measure_step(self.device, self.parts.model, self.optimizer, held=held) as step:
            out = self.train_step(inputs, labels, batch_index)
        self.peak_memory = memory.larger(self.peak_memory, step)
        self.memory_measured.add(self.phase)
        return out

    def train_one_epoch(self, skip_batches: int = 0) -> None:
        """Trains one epoch, emitting batched train records; skip_batches resumes mid-epoch."""
        self.refresh_feature_cache()
        loader = self.begin_epoch()
        recorder = _Recorder(self)
        for i, (inputs, labels) in enumerate(loader):
            if i < skip_batches:
                continue
            if self.phase in self.memory_measured:
                loss, logits, y = self.train_step(inputs, labels, i)
            else:
                loss, logits, y = self.measured_step(inputs, labels, i)
            recorder.add(loss, logits, y)
            if recorder.due():
                self._emit_train(recorder.flush())
            for cb in self.callbacks:
                cb.on_batch_end(self)
        self._emit_train(recorder.flush())

    def _emit_train(self, record: dict | None) -> None:
        if record is None:
            return
        for cb in self.callbacks:
            cb.on_train_record(self, record)

    def _emit_eval(self, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_eval_record(self, record)

    @torch.no_grad()
    def evaluate(self, split: data_mod.TensorSplit, cached: torch.Tensor | None = None) -> dict:
        """Returns loss, acc, acc5, confusion matrix and per-class accuracy on a split."""
        self.parts.model.eval()
        scores = metrics.SplitScores(self.exp.num_classes, self.exp.data.classes)
        bs = max(self.cfg.batch_size, 128)
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        lo, hi = distributed.span(len(split))  # on several devices: this rank's part
        for start in range(lo, hi, bs):
            end = min(start + bs, hi)
            y = split.labels[start:end].to(self.device)
            with self.autocast():
                if cached is not None:
                    logits = self.feature_cache.rest(cached[start:end])
                else:
                    logits = self.model(self.to_input(split.images[start:end], None))
            logits = logits.float()
            scores.add(logits, y, float(loss_fn(logits, y)))
        if distributed.active():  # the whole split's figures, the parts in rank order
            return scores.result(distributed.gather(scores.part()))
        return scores.result()

    # --- the feature cache: a phase's frozen prefix computed once -----------------------------
    def cache_plan(self, phase: strategies.Phase, epoch: int) -> tuple[int | None, str]:
        """Returns (boundary, "") when `phase`, from `epoch` on, can train from cached outputs
        of its frozen prefix, else (None, why not; "" when there is nothing to say).

        boundary is the first group the phase trains (len(groups): only the head trains).
        The groups below it are frozen and in eval mode, so for the same input they compute
        the same thing every epoch; the input is the same with augment none, and one of two
        views with flip, while a random-resized crop is new every epoch. Caching costs one
        pass of the prefix per view over the training images and running it costs one per
        epoch: a phase is cached when it has at least as many epochs left as views."""
        if not self.cache_allowed:
            return None, ""
        boundary = _first_trained(phase, len(self.parts.groups))
        if boundary == 0:  # the stem trains (full; bitfit trains a subset of every group)
            return None, ""
        blocker = recipe.cache_blocker(self.cfg)
        if blocker:
            return None, blocker
        views = CACHE_VIEWS[self.cfg.augment]
        left = min(phase.end_epoch, self.cfg.epochs) - epoch + 1
        if left < views:
            return None, (
                f"caching both views of each flipped image costs {views} passes over the "
                f"training images, more than its {left} epoch left"
            )
        return boundary, ""

    def refresh_feature_cache(self) -> None:
        """Makes the feature cache match this epoch's phase: kept while the phase starts at
        the cached boundary, else dropped and, where cache_plan allows, computed again from
        the images, when the model splits exactly there (models.split_forward), its prefix
        runs in eval mode in this phase too and the outputs fit feature_cache_budget.

        When gradual unfreezing moves the boundary down, the new prefix ends below the old
        one, whose outputs cannot give the new ones back; storing every boundary's outputs
        in one pass would multiply the memory. So the new, shorter (cheaper) prefix runs
        once over the images. Every frozen prefix left uncached gets one log line saying
        why (Callback.on_log), and so does every cache built."""
        phase = self.current_phase()
        held = self.feature_cache
        if held is not None and held.boundary == _first_trained(phase, len(self.parts.groups)):
            return  # the same frozen prefix: its outputs hold for the rest of the phase
        boundary, why_not = self.cache_plan(phase, self.epoch)
        key = (phase.name, boundary)
        if key == self._cache_key:
            return
        self._cache_key = key
        had_cache, held = held is not None, None  # freed before another one is built
        self.feature_cache = self.cache_loader = None
        where = f"feature cache for phase {phase.name!r}"
        if boundary is None:
            if why_not:
                self._log(f"{where} off: {why_not}; its frozen part runs every step")
            elif had_cache:
                self._log(f"{where} released: the phase trains every group")
            return
        split = self._split(boundary)
        if isinstance(split, str):
            self._log(f"{where} off: {self.cfg.model} cannot be cut there exactly ({split})")
            return
        self._set_modes(phase)
        busy = self._training_modules(split)
        if busy:
            self._log(
                f"{where} off: its frozen part runs {', '.join(busy[:3])} in train mode, so "
                "its output changes from step to step"
            )
            return
        self.feature_cache = self._build_feature_cache(split, phase)
        if self.feature_cache is not None:
            self.cache_loader = self._loader(self.feature_cache.index_split())

    def _split(self, boundary: int) -> models.ForwardSplit | str:
        """Returns the model's forward cut at boundary (its rest compiled with compile), or
        why it cannot be cut there."""
        if boundary not in self._splits:
            try:
                split = models.split_forward(self.parts, boundary)
            except models.CannotSplit as e:
                self._splits[boundary] = str(e)
            else:
                if self.cfg.compile:
                    split = dataclasses.replace(split, rest=torch.compile(split.rest))
                self._splits[boundary] = split
        return self._splits[boundary]

    def _training_modules(self, split: models.ForwardSplit) -> list[str]:
        """Returns the names of the prefix's modules that are in train mode and act on it."""
        names = {id(m): name for name, m in self.parts.model.named_modules()}
        return sorted(
            {
                names.get(id(sub), type(sub).__name__)
                for module in split.prefix_modules
                for sub in module.modules()
                if sub.training and models.mode_dependent(sub)
            }
        )

    def _build_feature_cache(
        self, split: models.ForwardSplit, phase: strategies.Phase
    ) -> FeatureCache | None:
        """Returns the prefix's outputs over every view of the training images and over the
        val images, in eval mode without grad, under the run's autocast, stored in the dtype
        and memory format the prefix gives; None (and a log line) when they would take more
        than the budget, which the first batch's outputs tell before anything is kept."""
        views = CACHE_VIEWS[self.cfg.augment]
        train, val = self.exp.data.train, self.exp.data.val
        bs = max(self.cfg.batch_size, 128)
        self.parts.model.eval()  # what the prefix's modules are in training too (checked)

        def outputs(images: torch.Tensor, mirrored: bool):
            for start in range(0, len(images), bs):
                x = images[start : start + bs].to(self.device, non_blocking=True)
                with torch.no_grad(), self.autocast():
                    # flipped as augment_batch flips: the uint8 image, before normalising
                    yield start, split.prefix(self.to_input(x.flip(-1) if mirrored else x, None))

        batches = outputs(train.images, False)
        start, first = next(batches)
        per_image = first[0].numel() * first.element_size()
        need = per_image * (views * len(train) + len(val))
        budget = feature_cache_budget(self.device)
        n = len(self.parts.groups)
        frozen = (
            "the backbone" if split.boundary == n else _span(self.parts.groups[: split.boundary])
        )
        what = f"{'both views (as is and mirrored) of ' if views == 2 else ''}{len(train)} train"
        if need > budget:
            self._log(
                f"feature cache for phase {phase.name!r} off: the outputs of its frozen part "
                f"({frozen}) for {what} and {len(val)} val images take {_mib(need)}, over "
                f"the cache budget of {_mib(budget)} ({_budget_source()}); its frozen part "
                "runs every step"
            )
            return None
        fmt = _memory_format(first)
        layout = {"memory_format": fmt} if first.dim() == 4 else {}
        shape, dtype = first.shape[1:], first.dtype

        def empty(rows: int) -> torch.Tensor:
            return torch.empty((rows, *shape), dtype=dtype, device=self.device, **layout)

        train_rows, val_rows = empty(views * len(train)), empty(len(val))
        train_rows[start : start + len(first)] = first
        del first
        for start, h in batches:
            train_rows[start : start + len(h)] = h
        if views == 2:
            for start, h in outputs(train.images, True):
                train_rows[len(train) + start : len(train) + start + len(h)] = h
        for start, h in outputs(val.images, False):
            val_rows[start : start + len(h)] = h
        trained = (
            "the head only"
            if split.boundary == n
            else f"{self.parts.groups[split.boundary].name} and above only"
        )
        self._log(
            f"feature cache for phase {phase.name!r}: its frozen part ({frozen}) ran once over "
            f"{what} and {len(val)} val images ({_mib(need)} of the {_mib(budget)} budget); "
            f"each step runs {trained}"
        )
        return FeatureCache(
            split.boundary,
            split.rest,
            views,
            train_rows,
            train.labels.to(self.device),
            val_rows,
            fmt,
        )

    def _cached(self, split: str) -> torch.Tensor | None:
        """Returns the cached prefix outputs of a split for evaluate when they hold for the
        model's weights now: val only (test is scored once: caching it saves nothing), while
        no phase so far trained a group below the boundary (so the best checkpoint, which
        _score_best loads, shares the prefix too)."""
        cache = self.feature_cache
        if cache is None or split != "val":
            return None
        n = len(self.parts.groups)
        so_far = [p for p in self.plan.phases if p.start_epoch <= self.epoch]
        if any(_first_trained(p, n) < cache.boundary for p in so_far):
            return None
        return cache.val

    def _log(self, message: str) -> None:
        """Gives the callbacks a line for the run's log (once per distinct line)."""
        if message in self._noted:
            return
        self._noted.add(message)
        for cb in self.callbacks:
            cb.on_log(self, message)

    # --- the recipe: weight EMA, MixUp/CutMix, momentum, accumulation, TTA (recipe.py) -------
    def _recipe_init(self) -> None:
        cfg = self.cfg
        self.mixer = recipe.mixer_for(cfg, self.exp.num_classes)
        self.accumulating = False  # gradients of a group of batches wait for its last one
        self.raw_val_acc: list[float] = []  # with a weight EMA: the raw weights' val accuracy
        self.tta_scored: dict[str, dict] = {}  # the best weights' TTA scores, once scored
        self.ema = None
        if cfg.model_ema:
            per_epoch = math.ceil(self.steps_per_epoch / cfg.accumulate_steps)
            warmup = int(round(cfg.warmup_epochs * per_epoch))
            self.ema = recipe.WeightEMA(self.parts.model, cfg, warmup)
        recipe.set_momentum(self.optimizer, self._momentum(0))

    def _momentum(self, step: int) -> float | None:
        return recipe.momentum_at(self.cfg, step, self.total_steps, self.steps_per_epoch)

    def _scored_weights(self):
        """Returns a context in which the model holds the weights the run scores and saves
        as best: the weight EMA's when there is one."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.in_place_of(self.parts.model)

    def _recipe_state(self) -> dict:
        """Returns what a resume needs of the recipe: the weight EMA, the raw weights' val
        accuracies and, stopped inside a group of accumulated batches, their gradients."""
        state: dict = {"raw_val_acc": list(self.raw_val_acc)}
        if self.ema is not None:
            state["weight_ema"] = self.ema.state(set(self.plan.ever_trained))
        if self.accumulating:
            state["accumulated_grads"] = {
                n: p.grad.detach().cpu().clone()
                for n, p in self.parts.model.named_parameters()
                if p.grad is not None
            }
        return state

    def _load_recipe_state(self, state: dict) -> None:
        self.raw_val_acc = list(state.get("raw_val_acc", []))
        if self.ema is not None and "weight_ema" in state:
            self.ema.load_state(self.parts.model, state["weight_ema"])
        grads = state.get("accumulated_grads")
        if grads:
            for n, p in self.parts.model.named_parameters():
                if n in grads:
                    p.grad = grads[n].to(p.device)
            self.accumulating = True

    def _recipe_summary(self) -> dict:
        """Returns what the summary says of the recipe: which weights its figures are for
        (scored_weights: "ema" or "raw"), the raw weights' val accuracy beside the EMA's,
        the effective batch, and the TTA figures beside the plain ones."""
        cfg = self.cfg
        out: dict = {"scored_weights": "ema" if self.ema is not None else "raw"}
        if self.ema is not None:
            out["ema_decay_per_update"] = self.ema.decay
            out["raw_best_val_acc"] = max(self.raw_val_acc, default=None)
            out["raw_final_val_acc"] = self.raw_val_acc[-1] if self.raw_val_acc else None
        if cfg.accumulate_steps > 1 or self.world > 1:
            out["effective_batch_size"] = cfg.batch_size * cfg.accumulate_steps * self.world
        if self.world > 1:
            out["devices"] = self.world
        if self.tta_scored:
            out["tta"] = cfg.tta
            out["tta_averages"] = recipe.tta_words(cfg)
            for split, ev in self.tta_scored.items():
                key = "best_val_acc" if split == "val" else "test_acc"
                out[f"tta_{key}"] = ev["acc"]
                out[f"tta_{key}_ci"] = list(stats.accuracy_interval(_hits(ev)))
        return out

    # --- checkpoints -------------------------------------------------------------------------
    def _save_weights(self, path: Path) -> None:
        """Writes a weights file: a run whose backbone never trains keeps only its head, and
        names the backbone it trained on (see checkpoints.py). Only rank 0 writes."""
        if not self.writes:
            return
        if self.plan.frozen_backbone and self.backbone_ref is None:
            self.backbone_ref = checkpoints.backbone_ref(
                self.parts, self.cfg.weights, self.cfg.seed
            )
        ref = self.backbone_ref if self.plan.frozen_backbone else None
        checkpoints.save(path, self.parts, self.cfg.model, ref, step=self.step)

    def _load_weights(self, path: Path) -> None:
        try:
            checkpoints.load_onto(path, self.parts)
        except checkpoints.BackboneChanged as e:
            raise TrainingFailed(str(e)) from None

    def save_checkpoint(self, epoch_done: bool) -> None:
        """Saves the resume point as one unit: the weights and last_state.pt (optimizer,
        scheduler, RNG, counters) of the same step (see checkpoints.save_resume_point).
        On several devices every rank calls it (stopped inside an accumulated step, their
        gradients are averaged first) and rank 0 writes."""
        if self.checkpoint_dir is None:
            return
        if self.accumulating and self.replica is not None:
            trained = [p for p in self.parts.model.parameters() if p.requires_grad]
            distributed.average_grads(trained)
        if not self.writes:
            return
        state = {
            "epoch": self.epoch,
            "epoch_done": epoch_done,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "best_val_acc": self.best_val_acc,
            "best_eval": self.best_eval,
            "best_epoch": self.best_epoch,
            "last_eval": self.last_eval,
            "val_history": self.val_history,
            "elapsed": self.elapsed(),
            "trainable_per_phase": self.trainable_per_phase,
            "peak_memory": _memory_state(self.peak_memory),
            **self._recipe_state(),
        }
        checkpoints.save_resume_point(self.checkpoint_dir, state, self._save_weights)

    def load_checkpoint(self) -> int:
        """Restores the last checkpoint; returns how many batches of `epoch` are already done."""
        d = self.checkpoint_dir
        if d is None or not checkpoints.has_resume_state(d):
            raise TrainingFailed(
                f"nothing to resume: the run has no checkpoints/{checkpoints.RESUME_STATE}"
            )
        try:
            state, weights_file = checkpoints.load_resume_point(d)
        except checkpoints.ResumeStateBroken as e:
            raise TrainingFailed(f"cannot resume: {e}; clone the run and train it again") from None
        self._load_weights(weights_file)
        self.enter_phase(state["epoch"])  # so the optimizer sees the same trainable set
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.best_val_acc = state["best_val_acc"]
        self.best_eval = state["best_eval"]
        self.best_epoch = state["best_epoch"]
        self.last_eval = state["last_eval"]
        self.val_history = list(state["val_history"])
        self.elapsed_before = float(state["elapsed"])
        self.trainable_per_phase = dict(state["trainable_per_phase"])
        self.peak_memory = _memory_from_state(state.get("peak_memory"))  # None before issue 10
        self._load_recipe_state(state)
        self.step = int(state["step"])
        if state["epoch_done"]:
            self.epoch = int(state["epoch"]) + 1
            return 0
        self.epoch = int(state["epoch"])
        return self.step - (self.epoch - 1) * self.steps_per_epoch

    # --- fit ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Trains for cfg.epochs (or until early stop / StopTraining); returns the summary."""
        skip = self.load_checkpoint() if resume else 0
        self.start_time = time.perf_counter()
        state = "completed"
        self.enter_phase(self.epoch)
        self.refresh_feature_cache()  # before on_fit_start: its time counts from start_time
        for cb in self.callbacks:
            cb.on_fit_start(self)
        try:
            while self.epoch <= self.cfg.epochs:
                self.train_one_epoch(skip_batches=skip)
                skip = 0
                record = self._validate()
                self.save_checkpoint(epoch_done=True)
                self._emit_eval(record)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, record)
                if self._should_stop_early():
                    break
                self.epoch += 1
        except StopTraining:
            state = "stopped"
            self.save_checkpoint(epoch_done=False)
        self.epoch = min(self.epoch, self.cfg.epochs)
        summary = self._finish(state)
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        return summary

    def _validate(self) -> dict:
        raw = None if self.ema is None else self.evaluate(self.exp.data.val, self._cached("val"))
        with self._scored_weights():  # with a weight EMA: the average's, else the model's
            ev = self.evaluate(self.exp.data.val, self._cached("val"))
            self.last_eval = ev
            self.val_history.append(ev["loss"])
            if self.best_val_acc is None or ev["acc"] > self.best_val_acc:
                self.best_val_acc = ev["acc"]
                self.best_eval = ev
                self.best_epoch = self.epoch
                if self.checkpoint_dir is not None:
                    self._save_weights(self.checkpoint_dir / "best.safetensors")
        seconds = max(self.elapsed(), 1e-9)
        speed = round(self.step * self.cfg.batch_size * self.world / seconds, 2)
        record = self._eval_record("val", ev, seconds, images_per_s=speed, phase=self.phase)
        if raw is not None:
            self.raw_val_acc.append(raw["acc"])
            record.update(weights="ema", raw_acc=raw["acc"], raw_loss=raw["loss"])
        if self.peak_memory is not None:
            record["peak_memory_bytes"] = self.peak_memory.total  # the peak so far
        return record

    def _eval_record(
        self, split: str, ev: dict, seconds: float, *, images_per_s=None, phase=None
    ) -> dict:
        """Returns the metrics record of an evaluation (evaluate's result) at this step."""
        return make_record(
            split,
            epoch=self.epoch,
            step=self.step,
            loss=ev["loss"],
            acc=ev["acc"],
            acc5=ev["acc5"],
            lr=self.head_lr(),
            time_s=round(seconds, 3),
            images_per_s=images_per_s,
            phase=phase,
        )

    def _should_stop_early(self) -> bool:
        n = self.cfg.early_stop
        if n <= 0 or len(self.val_history) <= n:
            return False
        best_before = min(self.val_history[:-n])
        return min(self.val_history[-n:]) >= best_before

    def _finish(self, state: str) -> dict:
        test_acc = test_ci = val_ci = None
        if state == "completed":
            scored = self._score_best()
            val_ci = stats.accuracy_interval(_hits(scored["val"]))
            if "test" in scored:
                test_acc = scored["test"]["acc"]
                test_ci = stats.accuracy_interval(_hits(scored["test"]))
        best = self.best_eval or {}
        peak = self.peak_memory
        summary = {
            "state": state,
            "best_val_acc": self.best_val_acc,
            "best_val_acc_ci": list(val_ci) if val_ci else None,
            "test_acc_ci": list(test_ci) if test_ci else None,
            "final_val_acc": self.last_eval["acc"] if self.last_eval else None,
            "test_acc": test_acc,
            "trainable_params": max(self.trainable_per_phase.values(), default=0),
            "trainable_params_per_phase": self.trainable_per_phase,
            "total_params": self.plan.total_params,
            "train_time_s": round(self.elapsed(), 3),
            "classes": list(self.exp.data.classes),
            "per_class_acc": best.get("per_class_acc"),
            "confusion_matrix": best.get("confusion_matrix"),
            "epochs_run": len(self.val_history),
            "best_epoch": self.best_epoch,
            # the largest measured step's memory (memory.py says what each method counts)
            "peak_memory_bytes": peak.total if peak else None,
            "memory_measure": peak.method if peak else None,
            "peak_memory_breakdown": peak.breakdown if peak else None,
            "stored_bytes": memory.stored_bytes(
                self.parts, self.plan, freeze_bn=self.cfg.freeze_bn
            ),
        }
        summary.update(self._recipe_summary())
        if state == "completed" and self.checkpoint_dir is not None and self.writes:
            summary.update(self._save_added_pieces())
        return summary

    def _save_added_pieces(self) -> dict:
        """For a strategy that adds pieces (lora, ..., vpt), once the best weights are scored:
        writes the method's own file of what trained (the pieces and the head; peft's adapter
        folder for lora, ...) into the run folder, and makes best.safetensors torchvision's
        plain model with the pieces merged where the method allows (vpt's prompts do not
        merge); returns what the summary records of it."""
        strategy = strategies.get(self.cfg.strategy)
        if not strategy.adds_pieces:
            return {}
        folder = self.checkpoint_dir.parent / strategy.pieces_folder
        size = checkpoints.save_files(folder, strategy.pieces_files(self.parts))
        best = self.checkpoint_dir / "best.safetensors"
        merged = strategy.merged(self.parts) if best.is_file() else None
        if merged is not None:  # what run:ID weights and everything downstream read
            step = checkpoints.saved_step(best)
            checkpoints.save(best, merged, self.cfg.model, step=step, merged=self.cfg.strategy)
        return {
            "adapter_dir": strategy.pieces_folder,
            "adapter_bytes": size,
            "weights_merged": merged is not None,
        }

    def _score_best(self) -> dict[str, dict]:
        """Scores the best checkpoint on val and test (when there is one), emits the test
        record, and writes every image's prediction to the run's predictions.csv; returns
        {split: evaluate()'s result}."""
        best = self.checkpoint_dir / "best.safetensors" if self.checkpoint_dir else None
        distributed.barrier()  # rank 0 has written the best weights the others read now
        if best is not None and best.exists():
            self._load_weights(best)
            # the feature cache holds only for a frozen backbone, which the best weights share
            scored = {"val": self.evaluate(self.exp.data.val, self._cached("val"))}
        else:  # no checkpoints (pretraining): the best epoch's own evaluation
            scored = {"val": self.best_eval or self.last_eval}
            if self.ema is not None:  # test and TTA score the average, as a checkpoint would
                self.ema.copy_to(self.parts.model)
        if self.exp.data.test is not None:
            scored["test"] = self.evaluate(self.exp.data.test, self._cached("test"))
            record = self._eval_record("test", scored["test"], self.elapsed())
            if self.ema is not None:
                record["weights"] = "ema"
            self._emit_eval(record)
        if self.cfg.tta != "none":  # the best weights again, on test-time augmented views
            splits = {"val": self.exp.data.val, "test": self.exp.data.test}
            self.tta_scored = {s: recipe.tta_evaluate(self, splits[s]) for s in scored}
        if self.checkpoint_dir is not None and self.writes:
            write_predictions(
                self.checkpoint_dir.parent / PREDICTIONS_FILE, scored, self.tta_scored
            )
            splits = {"val": self.exp.data.val, "test": self.exp.data.test}
            # the pictures of Compare's drill-down: a full disk costs them, not the results
            with contextlib.suppress(OSError):
                write_scored_images(
                    self.checkpoint_dir.parent / SCORED_IMAGES_FILE,
                    {s: (splits[s].images, ev) for s, ev in scored.items()},
                )
        return scored


def _sharded(exp: Experiment, rank: int, world: int) -> Experiment:
    """Returns exp with rank's fixed shard of the training images in place of them all."""
    train = exp.data.train
    index = distributed.shard_indices(len(train), exp.cfg.seed, rank, world)
    shard = data_mod.TensorSplit(train.images.index_select(0, index), train.labels[index])
    return dataclasses.replace(exp, data=dataclasses.replace(exp.data, train=shard))


PREDICTIONS_FILE = "predictions.csv"
TTA_COLUMNS = ["tta_pred", "tta_confidence"]  # beside the plain prediction, with --tta


def _memory_state(step: memory.StepMemory | None) -> dict | None:
    """Returns a measurement as plain data, for last_state.pt (loaded with weights_only)."""
    if step is None:
        return None
    return {"total": step.total, "method": step.method, "breakdown": dict(step.breakdown)}


def _memory_from_state(state: dict | None) -> memory.StepMemory | None:
    if not state:
        return None
    return memory.StepMemory(int(state["total"]), str(state["method"]), dict(state["breakdown"]))


def _hits(ev: dict) -> list[bool]:
    return [t == p for t, p in zip(ev["true"], ev["pred"], strict=True)]


def write_predictions(
    path: Path, scored: dict[str, dict], tta: dict[str, dict] | None = None
) -> None:
    """Writes one row per image of each scored split: split, index (the image's position in
    the split), true and predicted class index, and the prediction's confidence; with
    test-time augmentation (tta: {split: its scores}) also tta_pred and tta_confidence."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["split", "index", "true", "pred", "confidence"] + TTA_COLUMNS * bool(tta))
            for split, ev in scored.items():
                rows = zip(ev["true"], ev["pred"], ev["confidence"], strict=True)
                for i, (t, p, c) in enumerate(rows):
                    extra = (
                        [tta[split]["pred"][i], f"{tta[split]['confidence'][i]:.6f}"] if tta else []
                    )
                    out.writerow([split, i, t, p, f"{c:.6f}", *extra])

    atomic_write(path, write)


class FollowPlan(Callback):
    """Gradual unfreezing and LP-FT as a callback: after each epoch, enter the next one's phase."""

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        if trainer.epoch < trainer.cfg.epochs:
            trainer.enter_phase(trainer.epoch + 1)


def fit(
    exp: Experiment,
    callbacks=(),
    *,
    checkpoint_dir=None,
    resume: bool = False,
    feature_cache: bool = True,
) -> dict:
    """Trains exp and returns the summary dict (state, best/final val acc, test acc, ...).

    feature_cache=False runs a frozen backbone every step even where its features could be
    computed once (the results are the same; for measuring and checking the cache)."""
    trainer = Trainer(exp, callbacks, checkpoint_dir, feature_cache=feature_cache)
    return trainer.fit(resume=resume)
