"""Checks before a run exists: everything `config.validate_fields` checks, plus what needs the
model, the data and the weights; the plan as the New run form and `show` draw it; and what
the chosen weights will cost on first use.

Reads files (and may extract a .zip or generate a built-in dataset, caches the run needs
anyway) but writes nothing else and downloads nothing.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from finetune_core import data, device, engine, models, pretrain, recipe, strategies, weights
from finetune_core.config import ConfigError, RunConfig, type_errors, validate_fields
from finetune_core.util.names import nearest


def validate(cfg: RunConfig, *, runs_dir: str | Path | None = None) -> dict[str, str]:
    """Returns {field: message} for everything wrong with cfg; empty when it may run.

    Beyond validate_fields: the model (registry, image size, the strategy's options against
    its groups), the data (exists, two classes or more, enough images per class for the
    split), the weights (a file's or run's architecture and shapes, and finite values) and
    the device (there on this machine).
    """
    errors = validate_fields(cfg)
    if type_errors(cfg):  # the deeper checks need values of the right types
        return errors
    model_ok = False
    if "model" in errors:
        pass
    elif cfg.model not in models.classification_models():
        errors["model"] = (
            f"unknown model {cfg.model!r}; see `python -m finetune_core models`."
            + nearest(cfg.model, models.classification_models())
        )
    else:
        model_ok = True
        pretrained = cfg.weights != "none"
        msg = models.check_image_size(cfg.model, cfg.image_size, pretrained=pretrained)
        if msg and "image_size" not in errors:
            errors["image_size"] = msg
    if model_ok and "image_size" not in errors and "strategy" not in errors:
        strategy = strategies.get(cfg.strategy)
        found = strategy.check_groups(cfg, cfg.model, models.group_names(cfg.model))
        if not found and not {o.name for o in strategy.options} & set(errors):
            found = strategy.check_model(cfg, _meta_model(cfg.model, cfg.image_size))
        for field, message in found.items():
            errors.setdefault(field, message)
    if "device" not in errors:
        msg = device.check(cfg.device)
        if msg:
            errors["device"] = msg
    num_classes = None
    if "data" not in errors:
        try:
            info = data.inspect_data(cfg.data)
            num_classes = len(info.classes)
            if not {"val_fraction", "test_fraction"} & set(errors):  # NaN splits nothing
                msg = data.check_split(info, cfg.val_fraction, cfg.test_fraction)
                if msg:
                    errors["data"] = msg
        except data.DataError as e:
            errors["data"] = str(e)
    if model_ok and "image_size" not in errors and "weights" not in errors:
        msg = weights.check_weights(cfg.weights, cfg.model, num_classes, runs_dir=runs_dir)
        if msg:
            errors["weights"] = msg
    return errors


def check(cfg: RunConfig, **kwargs) -> RunConfig:
    """Returns cfg when valid; raises ConfigError with every message otherwise."""
    errors = validate(cfg, **kwargs)
    if errors:
        raise ConfigError(errors)
    return cfg


@functools.lru_cache(maxsize=16)
def _meta_model(model: str, image_size: int) -> models.ModelParts:
    """Returns the model as built, not prepared, on the meta device: what the strategies'
    checks read (they must not change it)."""
    return models.create_model(model, 2, image_size=image_size, device="meta")


@functools.lru_cache(maxsize=64)
def _meta_parts(cfg_json: str, num_classes: int) -> models.ModelParts:
    return engine.build_model(RunConfig(**json.loads(cfg_json)), num_classes, device="meta")


def plan_for(cfg: RunConfig, num_classes: int) -> strategies.Plan:
    """Returns the plan for cfg without weights or data (the model is built on the meta
    device, as the strategy prepares it)."""
    strategy = strategies.get(cfg.strategy)
    shape = {"model": cfg.model, "image_size": cfg.image_size, "strategy": cfg.strategy}
    shape.update(strategy.values(cfg))  # what the built model depends on
    parts = _meta_parts(json.dumps(shape, sort_keys=True), num_classes)
    return strategies.make_plan(cfg, parts)


def availability(spec: str, model: str, *, runs_dir=None) -> tuple[str, str]:
    """Returns weights.availability with the time pretraining builtin weights takes here."""
    return weights.availability(spec, model, runs_dir=runs_dir, estimate=pretrain.estimate_seconds)


def short_ema(cfg: RunConfig, train_images: int | None = None) -> recipe.EMAReach | None:
    """Returns how far cfg's weight EMA gets over its training split (train_images, else
    read from its data) when that leaves more than recipe.EMA_STILL_AT_START of the average
    at the starting weights (what New run, `train` and `sweep` warn about); None otherwise,
    without an EMA, or when the data cannot be read (validate says so)."""
    if not cfg.model_ema:
        return None
    if train_images is None:
        try:
            info = data.inspect_data(cfg.data)
        except data.DataError:
            return None
        train_images = data.split_sizes(info, cfg.val_fraction, cfg.test_fraction)["train"]
    reach = recipe.ema_reach(cfg, train_images)
    return reach if reach.still_at_start >= recipe.EMA_STILL_AT_START else None
