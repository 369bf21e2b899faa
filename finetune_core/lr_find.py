"""The learning-rate finder: a range test (Smith 2015, "Cyclical Learning Rates"; fastai's
lr_find) of a config's model, weights, strategy and data.

The experiment is built as training builds it (engine.prepare, engine.Trainer), on a fresh
model of its own: nothing is written, no run folder is made or read beyond `run:` weights.
For the phase of the plan that trains the most (as estimate.py picks it) the head's lr grows
exponentially from start_lr to end_lr, one optimizer step per value, every other group
keeping its ratio to the head (layer-wise decay holds); the loss of each step is recorded
until the smoothed loss diverges. Runs in its own process: the CLI's `lr-find`, or a
background job (`run_job`, kind "lr_find", see jobs.py and worker.JOB_KINDS).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from finetune_core import engine, pretrain, strategies, weights
from finetune_core.config import RunConfig, from_dict

SMOOTHING = 0.98  # beta of the exponential moving average of the loss (fastai's)
MESSAGE_INTERVAL_S = 0.25  # progress messages at most 4 a second
FELL_RATIO = 0.9  # a curve whose smoothed loss never fell 10 % below its start is flat


@dataclass
class LrCurve:
    """The range test's result: one entry per optimizer step taken."""

    lrs: list[float]  # the head's lr of each step
    losses: list[float]  # the training loss of each step's batch
    smoothed: list[float]  # exponential moving average of the loss, bias-corrected
    suggested_lr: float  # the steepest descent of the smoothed loss (see suggest)
    min_loss_lr: float  # the lr at the smoothed loss's minimum
    min_loss_lr_over_10: float  # fastai's "minimum / 10" suggestion, for comparison
    stopped_early: bool  # the loss diverged before end_lr was reached
    loss_fell: bool  # False: the curve is flat before it diverges, its suggestion unreliable

    def to_csv(self, path: str | Path) -> Path:
        """Writes the curve with columns lr, loss, smoothed_loss; returns the path."""
        path = Path(path)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["lr", "loss", "smoothed_loss"])
            for row in zip(self.lrs, self.losses, self.smoothed, strict=True):
                writer.writerow([repr(v) for v in row])
        return path

    def to_dict(self) -> dict:
        """Returns the curve as plain lists and numbers (a job's JSON result)."""
        return asdict(self)


def lr_at(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """Returns the swept lr of optimizer step `step` (0-based) of `steps`: start_lr growing
    exponentially to end_lr at the last step."""
    if steps <= 1:
        return start_lr
    return start_lr * (end_lr / start_lr) ** (step / (steps - 1))


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Returns the bias-corrected exponential moving average of losses (as in Adam)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def _skip(n: int) -> int:
    """Returns how many first points the searches leave out: a tenth (fastai's skip_start),
    keeping three at least."""
    return min(n // 10, max(0, n - 3))


def loss_fell(smoothed: list[float]) -> bool:
    """Returns True when the smoothed loss fell at least 10 % below where it stood after the
    first tenth of the steps. Measured on builtin:shapes, learning curves fell to 0.80-0.86
    of their start, flat ones (random features, where no lr helps) stayed at 0.97-1.0."""
    start = smoothed[_skip(len(smoothed))]
    return min(smoothed[_skip(len(smoothed)) :]) < FELL_RATIO * start


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """Returns (suggested lr, lr of the minimum smoothed loss).

    The suggestion is the lr where the smoothed loss falls fastest against log lr (the most
    negative slope), looked for only below the minimum's lr: there the model learns
    fastest while the loss still falls, which is the rate Smith's test asks for. fastai's
    older "minimum / 10" rule (LrCurve.min_loss_lr_over_10) is one fixed decade below the
    minimum whatever the curve's shape; the steepest slope follows the curve, so it is the
    one returned. The first tenth of the steps is left out of both searches (fastai's
    skip_start): an average of one or two batches is mostly noise. Without a falling
    stretch the suggestion falls back to minimum / 10, no lower than the first lr."""
    skip = _skip(len(smoothed))
    best = min(range(skip, len(smoothed)), key=lambda i: smoothed[i])
    min_lr = lrs[best]
    fallback = max(min_lr / 10, lrs[0])
    logs = [math.log(lr) for lr in lrs]
    slopes = {
        i: (smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1])
        for i in range(max(1, skip), best)  # central differences, strictly below the minimum
    }
    if not slopes:
        return fallback, min_lr
    steepest = min(slopes, key=lambda i: slopes[i])
    if slopes[steepest] >= 0:
        return fallback, min_lr
    return lrs[steepest], min_lr


def _check_range(steps: int, start_lr: float, end_lr: float, diverge_factor: float) -> None:
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"steps must be a whole number of at least 2, not {steps!r}")
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise ValueError(f"need 0 < start_lr < end_lr (finite), not {start_lr!r}, {end_lr!r}")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor must be above 1, not {diverge_factor!r}")


def find_lr(
    cfg: RunConfig,
    *,
    steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    progress=None,
    diverge_factor: float = 4.0,
    runs_dir: str | Path | None = None,
    exp: engine.Experiment | None = None,
) -> LrCurve:
    """Returns the range test's LrCurve for cfg: at most `steps` optimizer steps with the head's
    lr growing exponentially from start_lr to end_lr (cycling the training split when it has
    fewer batches), stopping once the smoothed loss exceeds diverge_factor times its minimum
    or a loss is not finite.

    Deterministic for cfg.seed. The optimizer is the config's own (its weight decay, L2-SP
    and clipping as training has them); only the lr schedule is replaced. progress(fraction,
    message) is called before every step (message None when only a cancel check is due) and
    with message during preparation; it may raise to cancel. runs_dir: where `run:` weights
    are read from. exp: an experiment already prepared for cfg, whose model the test then
    trains (the caller restores its weights); by default one of its own."""
    _check_range(steps, start_lr, end_lr, diverge_factor)

    def report(fraction, message):
        if progress is not None:
            progress(fraction, message)

    def preparing(stage, fraction, message):
        report(None, message)

    if exp is None:
        if weights.is_builtin(cfg.weights):
            pretrain.ensure_builtin(cfg.model, preparing)
        exp = engine.prepare(cfg, runs_dir=runs_dir, progress=preparing)
    trainer = engine.Trainer(exp, feature_cache=False)
    phase = max(trainer.plan.phases, key=lambda p: p.trainable_params)
    trainer.epoch = phase.start_epoch
    trainer.enter_phase(trainer.epoch)
    loader = trainer.begin_epoch()

    optimizer = trainer.optimizer
    head = next(
        (g for g in optimizer.param_groups if g.get("name") == strategies.HEAD),
        optimizer.param_groups[-1],
    )
    head_base = float(head["initial_lr"])  # the base lrs the run's own schedule scales
    # every group's lr = its base x (swept lr / head's base): the groups' ratios hold
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, steps, start_lr, end_lr) / head_base
    )

    lrs, losses, smoothed = [], [], []
    avg, best, diverged, last_message = 0.0, math.inf, False, 0.0
    batches, cycle, index = iter(loader), 0, 0
    while len(lrs) < steps:
        try:
            x, y = next(batches)
        except StopIteration:  # fewer batches than steps: another pass, shuffled anew
            cycle += 1
            loader.set_epoch(phase.start_epoch + cycle)
            batches = iter(loader)
            continue
        step = len(lrs)
        lr = trainer.head_lr()
        now = time.monotonic()
        message = None
        if now - last_message >= MESSAGE_INTERVAL_S or step == 0:
            message = f"lr-find step {step + 1}/{steps}: lr {lr:.3g}"
            last_message = now
        report(step / steps, message)
        loss, _, _ = trainer.train_step(x, y, index)
        index += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        avg = SMOOTHING * avg + (1 - SMOOTHING) * value
        s = avg / (1 - SMOOTHING ** (step + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(s)
        best = min(best, s)
        if s > diverge_factor * best:
            diverged = True
            break
    report(1.0, f"lr-find done: {len(lrs)} steps" + (", the loss diverged" if diverged else ""))
    if not lrs:
        raise ValueError(
            f"the loss was not finite at the first step (lr {start_lr:g}); "
            "check the data and weights, or lower the start lr"
        )
    suggested, min_lr = suggest(lrs, smoothed)
    return LrCurve(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggested_lr=suggested,
        min_loss_lr=min_lr,
        min_loss_lr_over_10=min_lr / 10,
        stopped_early=diverged,
        loss_fell=loss_fell(smoothed),
    )


def run_job(args: dict, progress) -> dict:
    """The lr_find job: args {"config": config dict, "steps": int (default 100)}; returns
    LrCurve.to_dict() (lrs, losses, smoothed, suggested_lr, min_loss_lr, ...)."""
    cfg = from_dict(args["config"])
    curve = find_lr(
        cfg, steps=int(args.get("steps", 100)), progress=progress, runs_dir=args.get("runs_dir")
    )
    return curve.to_dict()
