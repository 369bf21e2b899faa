"""Training the `builtin` weights: a backbone pretrained with the engine on the built-in
source task (other classes than builtin:shapes), the offline stand-in for ImageNet weights.

Lives above the engine: a worker calls `ensure_builtin` before `engine.prepare`, so that the
weights module only reads the cached file. One process trains while others wait on a lock
file beside the cache, then read what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import random
import time

import numpy as np
import torch
from safetensors.torch import save_file

from finetune_core import device, engine
from finetune_core.callbacks import Callback, StopTraining
from finetune_core.config import RunConfig
from finetune_core.util.durations import fmt_rough, seconds_left
from finetune_core.util.files import atomic_write
from finetune_core.util.locks import FileLock
from finetune_core.weights import builtin, checks, hub
from finetune_core.weights.base import WeightsError, first_line

# Fraction of the matmul rate a conv net's training step reaches on a CPU (fitted on
# ResNet-18 at 64 px).
_CONV_EFFICIENCY = 0.15


def estimate_seconds(model: str) -> float:
    """Returns a rough estimate of the seconds pretraining builtin weights takes on the CPU."""
    recipe = builtin.recipe(model)
    w = hub.tv_weights(model)
    gflops_224 = float(w.meta.get("_ops") or w.meta.get("num_params", 1e7) * 2e-9 * 50)
    eval_size = (w.transforms().crop_size or [224])[0]
    per_image = gflops_224 * (recipe["image_size"] / eval_size) ** 2 * 3  # forward + backward
    images = builtin.source_train_images(recipe) * recipe["epochs"]
    if recipe.get("max_steps"):
        images = min(images, recipe["max_steps"] * recipe["batch_size"])
    return per_image * images / (device.cpu_gflops() * _CONV_EFFICIENCY) + 5  # + data and setup


def lock_file(model: str):
    """Returns the lock file that one process pretraining `model` holds."""
    return builtin.cache_file(model).with_suffix(".lock")


def ensure_builtin(model: str, progress=None) -> None:
    """Makes sure the builtin weights of `model` are cached: trains them when they are not
    (or waits for another process that is training them). Raises WeightsError on failure."""
    target = builtin.cache_file(model)
    if target.exists():
        return

    def waiting():
        if progress:
            progress(
                "pretrain",
                None,
                f"waiting for another process that is pretraining builtin weights for {model}",
            )

    with FileLock(lock_file(model), on_wait=waiting):
        if target.exists():  # another process trained them while we waited
            return
        try:
            _train(model, target, progress)
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(
                f"pretraining builtin weights for {model} failed: {first_line(e)}. "
                f"Choose other weights: default, a local file, run:RUN_ID or none."
            ) from e


@contextlib.contextmanager
def _rng_kept():
    """Restores every global RNG afterwards, so that training builtin weights in the middle of
    another run's setup leaves that run exactly as it would be with the weights cached."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _Progress(Callback):
    """Reports pretraining progress (<= 2 a second) and stops at the recipe's max_steps."""

    def __init__(self, model: str, recipe: dict, say):
        self.model, self.recipe, self.say = model, recipe, say
        self.last = 0.0
        self.t0 = time.monotonic()
        self.val = ""

    def on_fit_start(self, trainer):
        self.t0 = time.monotonic()

    def on_eval_record(self, trainer, record):
        if record["split"] == "val":
            self.val = f" (val accuracy {record['acc']:.0%} after epoch {record['epoch']})"

    def on_batch_end(self, trainer):
        total = trainer.total_steps
        if self.recipe.get("max_steps"):
            total = min(total, self.recipe["max_steps"])
        now = time.monotonic()
        if trainer.step >= total:
            if trainer.step < trainer.total_steps:
                raise StopTraining(f"{builtin.BUILTIN_STEPS_ENV}={self.recipe['max_steps']}")
            return
        if now - self.last < 0.5:
            return
        self.last = now
        left = seconds_left(now - self.t0, trainer.step, total - trainer.step)
        self.say(
            "pretrain",
            trainer.step / total,
            f"pretraining builtin weights for {self.model} on the built-in source task: "
            f"epoch {trainer.epoch}/{self.recipe['epochs']}, about {fmt_rough(left)} left"
            f"{self.val}",
        )


def _train(model: str, target, progress) -> None:
    """Pretrains `model` on the built-in source task through the engine and caches its backbone."""
    recipe = builtin.recipe(model)
    say = progress or (lambda stage, fraction, message: None)
    if device.pick_device("auto").type == "cpu":
        how_long = f"about {fmt_rough(estimate_seconds(model))} on this CPU"
    else:  # the CPU heuristic says nothing about a GPU; the first steps will tell
        how_long = "timed after the first steps on the GPU"
    say(
        "pretrain",
        0.0,
        f"builtin weights for {model} are not cached yet: pretraining them on the built-in "
        f"source task ({recipe['epochs']} epochs at {recipe['image_size']} px), {how_long}; "
        f"they are cached at {target} for next time",
    )
    cfg = RunConfig(
        data=recipe["data"],
        model=model,
        weights="none",
        strategy="full",
        image_size=recipe["image_size"],
        epochs=recipe["epochs"],
        device="auto",
        name=f"builtin weights for {model}",
        # the recipe the cached weights were trained with (its hash names them): weight decay
        # on every parameter, as before norms and biases were spared by default
        decay_norm_bias=True,
        **{k: recipe[k] for k in builtin.BUILTIN_RECIPE},
    )
    t0 = time.monotonic()
    with _rng_kept():
        exp = engine.prepare(cfg, progress=progress)
        summary = engine.fit(exp, callbacks=[_Progress(model, recipe, say)])
    parts = exp.parts
    state = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in checks.without_head(parts.model.state_dict(), parts.head).items()
    }
    acc = summary.get("best_val_acc")
    metadata = {
        "recipe": json.dumps(recipe, sort_keys=True),
        "source_val_acc": json.dumps(acc),
        "train_time_s": f"{time.monotonic() - t0:.1f}",
    }
    atomic_write(target, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    acc_text = f", source-task val accuracy {acc:.0%}" if isinstance(acc, (int, float)) else ""
    say(
        "pretrain",
        1.0,
        f"builtin weights for {model} trained in {time.monotonic() - t0:.0f} s{acc_text}; "
        f"cached at {target}",
    )
