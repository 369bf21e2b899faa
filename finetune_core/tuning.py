"""Tuning a run's learning rate before it trains: a short search on the validation split.

Why a search and not the finder's suggestion alone: measured on handwritten digits (32 px,
`builtin` weights, 3 epochs), the range test's curve for a linear probe barely falls before
it diverges, so its suggestion is a guess, while trainings at a few rates rank the probe's
rates clearly (val accuracy 31 % at the default 0.01, 55 % at 0.036). The finder does what
it is good at: it finds, in about 30 steps, the rate at which the loss blows up for this
model, strategy, optimizer and data. The search then tries CANDIDATES rates half a decade
apart around one decade below that rate and, when the best of them is the highest or the
lowest, up to MAX_EXTENSIONS more past it (never above the rate that blew up).

Each trial trains the run's own schedule (every phase, the warm-up, the decay) on
TRIAL_FRACTION of the training images and is scored by its best val accuracy (then the
lower val loss). Shorter trials are cheaper but biased towards high rates: on the same
digits, trials on half the images picked 0.18 for last_n 1, whose full training is best
at 0.01-0.03 (val 91 %) and drops to 88 % at 0.1. So a trial is the run itself, at each
rate: tuning costs CANDIDATES trainings per strategy (`--same-lr` turns it off). The test
split is never seen; the model is reset to its starting weights between trials and after
the search. The run then trains at the chosen rate: config.json's `lr` holds it and
`lr_tuning.json` the trials. A trial is not a run: nothing of it is written but that file.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from finetune_core import data as data_mod
from finetune_core import engine, lr_find
from finetune_core.callbacks import Callback

METHOD = "val-search"
FINDER_STEPS = 30  # steps of the range test that bounds the search
FINDER_START_LR = 1e-5
BLOWUP = 2.0  # the loss blows up where a step's loss exceeds this many times the first one
CANDIDATES = 3
TRIAL_FRACTION = 1.0  # of the training images each trial trains on, the whole schedule
SPACING = math.sqrt(10)  # half a decade between two candidates
MAX_EXTENSIONS = 2  # trials added past an edge of the candidates when the edge wins


@dataclass
class LrTuning:
    """The search's result, as lr_tuning.json holds it."""

    method: str
    chosen_lr: float
    candidates: list[float]
    trials: list[dict[str, Any]]  # {"lr", "val_acc", "val_loss"} or {"lr", "error"}
    blowup_lr: float  # where the range test's loss blew up (the top of the search)
    finder_steps: int
    trial_images: int  # training images each trial trained on
    seconds: float
    original_lr: float = 0.0  # the lr the config asked for before tuning
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TuningStopped(Exception):
    """A stop was requested during the search."""


def blowup_lr(curve: lr_find.LrCurve, factor: float = BLOWUP) -> float:
    """Returns the first lr at which the range test's loss exceeded `factor` times its first
    loss, or the last lr it reached (its divergence, or the end of the range)."""
    first = curve.losses[0]
    for lr, loss in zip(curve.lrs, curve.losses, strict=True):
        if not math.isfinite(loss) or loss > factor * first:
            return lr
    return curve.lrs[-1]


def candidates_around(top: float, n: int = CANDIDATES, spacing: float = SPACING) -> list[float]:
    """Returns n learning rates `spacing` apart centred on top/10 (one decade below the rate
    at which the loss blew up), rounded to 3 significant digits, within RunConfig's lr
    range, ascending."""
    centre = top / 10
    out = {
        min(max(float(f"{centre * spacing ** (j - (n - 1) / 2):.3g}"), 1e-7), 10.0)
        for j in range(n)
    }
    return sorted(out)


def trial_split(train: data_mod.TensorSplit, fraction: float, seed: int, batch_size: int):
    """Returns the fixed share of the training images a trial trains on (two batches at
    least), every class kept in proportion (a seeded shuffle per class)."""
    n = len(train)
    keep = min(n, max(math.ceil(n * fraction), 2 * batch_size))
    if keep >= n:
        return train
    g = torch.Generator().manual_seed(seed)
    chosen = []
    labels = train.labels
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        chosen.append(idx[: max(1, round(len(idx) * keep / n))])
    idx = torch.cat(chosen).sort().values
    return data_mod.TensorSplit(train.images[idx].contiguous(), train.labels[idx].contiguous())


def _best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Returns the trial with the best val accuracy, then the lowest val loss (None: none
    was scored)."""
    scored = [t for t in trials if t.get("val_acc") is not None]
    if not scored:
        return None
    return max(scored, key=lambda t: (t["val_acc"], -(t["val_loss"] or math.inf)))


class _Progress(Callback):
    def __init__(self, report, done_steps: int, total_steps: int, label: str):
        self.report, self.done, self.total, self.label = report, done_steps, total_steps, label

    def on_batch_end(self, trainer) -> None:
        self.report((self.done + trainer.step) / self.total, self.label)


def tune_lr(
    exp: engine.Experiment,
    *,
    progress=None,
    finder_steps: int = FINDER_STEPS,
    n_candidates: int = CANDIDATES,
    trial_fraction: float = TRIAL_FRACTION,
) -> LrTuning:
    """Returns the search's LrTuning for exp's config; exp's model is back at its starting
    weights afterwards. progress(fraction, message) is called often (message may repeat);
    it may raise to stop the search."""
    cfg = exp.cfg
    t0 = time.monotonic()
    initial = copy.deepcopy(exp.parts.model.state_dict())

    def report(fraction, message):
        if progress is not None:
            progress(fraction, message)

    def restore():
        exp.parts.model.load_state_dict(initial)
        for p in exp.parts.model.parameters():
            p.grad = None

    trial_train = trial_split(exp.data.train, trial_fraction, cfg.seed, cfg.batch_size)
    steps_per_trial = cfg.epochs * data_mod.steps_per_epoch(len(trial_train), cfg.batch_size)
    total = finder_steps + n_candidates * steps_per_trial  # until the search is extended

    def finder_progress(fraction, message):
        if fraction is not None:
            report(fraction * finder_steps / total, "tuning the lr: range test")

    try:
        curve = lr_find.find_lr(
            cfg,
            steps=finder_steps,
            start_lr=FINDER_START_LR,
            progress=finder_progress,
            exp=exp,
        )
    finally:
        restore()
    top = blowup_lr(curve)
    queue = candidates_around(top, n_candidates)
    tried: list[float] = []
    trials: list[dict[str, Any]] = []
    trial_data = dataclasses.replace(exp.data, train=trial_train, test=None)

    def run_trial(lr: float) -> dict[str, Any]:
        planned = len(trials) + len(queue) + 1
        done = finder_steps + len(trials) * steps_per_trial
        total = finder_steps + planned * steps_per_trial
        label = f"tuning the lr: trial {len(trials) + 1}/{planned} at lr {lr:g}"
        report(done / total, label)
        trial_cfg = dataclasses.replace(cfg, lr=lr, early_stop=0, compile=False)
        trial_exp = dataclasses.replace(exp, cfg=trial_cfg, data=trial_data)
        trainer = engine.Trainer(trial_exp, [_Progress(report, done, total, label)])
        try:
            summary = trainer.fit()
        except engine.TrainingFailed as e:  # a diverging loss: this lr is too high
            return {"lr": lr, "error": str(e)}
        finally:
            restore()
        if summary.get("state") == "stopped":
            raise TuningStopped
        best = trainer.best_eval or {}
        return {"lr": lr, "val_acc": summary.get("best_val_acc"), "val_loss": best.get("loss")}

    extended = 0
    try:
        while queue:
            lr = queue.pop(0)
            tried.append(lr)
            trials.append(run_trial(lr))
            winner = _best(trials)
            if queue or winner is None or extended >= MAX_EXTENSIONS:
                continue
            # the best rate is at an edge of those tried: one more step past it
            if winner["lr"] == max(tried) and winner["lr"] * SPACING <= top * 1.01:
                queue.append(float(f"{winner['lr'] * SPACING:.3g}"))
            elif winner["lr"] == min(tried) and winner["lr"] / SPACING >= 1e-7:
                queue.append(float(f"{winner['lr'] / SPACING:.3g}"))
            extended += bool(queue)
    finally:
        restore()
    winner = _best(trials)
    notes = []
    if winner is not None:
        chosen = winner["lr"]
        if chosen == max(tried) and len(tried) > 1:
            notes.append("the highest rate tried won: the best lr may lie above it")
        elif chosen == min(tried) and len(tried) > 1:
            notes.append("the lowest rate tried won: the best lr may lie below it")
    else:
        chosen = cfg.lr
        notes.append("every trial failed; the run keeps the lr it was given")
    report(1.0, f"tuned the lr: {chosen:g}")
    return LrTuning(
        method=METHOD,
        chosen_lr=chosen,
        candidates=tried,
        trials=trials,
        blowup_lr=top,
        finder_steps=len(curve.lrs),
        trial_images=len(trial_train),
        seconds=round(time.monotonic() - t0, 2),
        original_lr=cfg.lr,
        notes=notes,
    )
