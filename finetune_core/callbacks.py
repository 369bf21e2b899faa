"""The callback protocol between the training loop and what watches it, and the metrics
record that travels through it. No torch here: the run store, the CLI and the queue use it.

The loop calls, in order: on_fit_start; per optimizer step on_batch_end, and every few steps
on_train_record; after each epoch on_eval_record (the val record), then on_epoch_end with
that record once the checkpoint is saved; at the end of a completed run on_eval_record
with the test record (when there is a test split); last on_fit_end with the summary.
A callback raises StopTraining to end the run as "stopped" after the current step.
"""

from __future__ import annotations

from typing import Any

SPLITS = ("train", "val", "test")

# The metrics record (one line of metrics.jsonl): field -> Python type. "phase" is written
# on val records only; acc5 is null with 5 classes or fewer; images_per_s null on test.
RECORD_FIELDS: dict[str, type] = {
    "split": str,  # train (every few steps) | val (each epoch) | test (at the end)
    "epoch": int,  # from 1
    "step": int,  # optimizer steps so far, from 1
    "loss": float,
    "acc": float,  # fraction 0..1
    "acc5": float,
    "lr": float,  # the head group's learning rate
    "time_s": float,  # training seconds since the run started (resumes included)
    "images_per_s": float,
    "phase": str,  # the plan's phase the epoch trained in
}


def make_record(
    split: str,
    *,
    epoch: int,
    step: int,
    loss: float,
    acc: float,
    acc5: float | None,
    lr: float,
    time_s: float,
    images_per_s: float | None,
    phase: str | None = None,
) -> dict[str, Any]:
    """Returns a metrics record with RECORD_FIELDS' keys in order (phase only when given)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    record = {
        "split": split,
        "epoch": epoch,
        "step": step,
        "loss": loss,
        "acc": acc,
        "acc5": acc5,
        "lr": lr,
        "time_s": time_s,
        "images_per_s": images_per_s,
    }
    if phase is not None:
        record["phase"] = phase
    return record


class StopTraining(Exception):
    """Raised by a callback to stop: the engine saves a checkpoint and ends as "stopped"."""


class Callback:
    """Hooks around the training loop; every method is a no-op unless overridden.

    `trainer` is the engine's Trainer: callbacks may read its epoch, step, total_steps,
    phase, cfg and plan.
    """

    def on_fit_start(self, trainer) -> None:
        """Training is about to start (or to continue, on a resume, from trainer.step)."""

    def on_batch_end(self, trainer) -> None:
        """One optimizer step is done (trainer.step counts it)."""

    def on_train_record(self, trainer, record: dict[str, Any]) -> None:
        """A train record: the mean loss and accuracy of the steps since the last one."""

    def on_eval_record(self, trainer, record: dict[str, Any]) -> None:
        """An evaluation record: val after each epoch, test once at the end."""

    def on_epoch_end(self, trainer, record: dict[str, Any]) -> None:
        """An epoch is done and checkpointed; record is its val record."""

    def on_log(self, trainer, message: str) -> None:
        """A line for the run's log: something the engine chose that the metrics do not show
        (a frozen part's outputs cached, or why not)."""

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        """The run ended (completed, stopped or early-stopped); summary is what fit returns."""
