"""RunConfig: every setting of one fine-tuning run, what each one means, its checks and its
JSON form.

Each field carries an Option (help, form label, choices, range; see options.py) that the
CLI's --help, the New run form and `validate_fields` read. `validate_fields(cfg)` returns
{field: message} (empty when valid) for what can be checked without the model or the data;
`preflight.validate` adds the checks that need them. The CLI turns messages into exit code
2, the dashboard shows each next to its field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from finetune_core import strategies
from finetune_core.options import options_of, setting
from finetune_core.util.names import nearest


def _strategy_help() -> str:
    return "what trains: " + "; ".join(
        f"{s} = {strategies.get(s).summary}" for s in strategies.names()
    )


@dataclass
class RunConfig:
    """One run. Every field is a CLI flag (`--image-size` for image_size) and a JSON key."""

    data: str = setting(
        "builtin:shapes", "folder, .zip, builtin:shapes, or torchvision:NAME", label="Data"
    )
    model: str = setting(
        "resnet18", "any classification model in torchvision's registry", label="Model"
    )
    weights: str = setting(
        "builtin", "default | none | builtin | PATH | run:RUN_ID", label="Weights"
    )
    strategy: str = setting("full", _strategy_help(), label="Strategy", choices=strategies.names)
    unfreeze_last: int = strategies.option("unfreeze_last")
    unfreeze_every: int = strategies.option("unfreeze_every")
    probe_epochs: int = strategies.option("probe_epochs")
    epochs: int = setting(3, "passes over the training images", label="Epochs", min=1, step=1)
    batch_size: int = setting(
        64,
        "images per optimizer step; lower it when memory runs out",
        label="Batch size",
        min=1,
        step=8,
    )
    lr: float = setting(
        0.01,
        "the head's learning rate; backbone groups may get less (layer_decay)",
        label="Learning rate (head)",
        step=0.001,
        format="%g",  # 1e-06 stays readable (a fixed number of decimals shows 0.00000)
    )
    optimizer: str = setting(
        "sgd",
        "sgd uses momentum 0.9; adamw decouples weight decay",
        label="Optimizer",
        choices=("sgd", "adam", "adamw"),
    )
    weight_decay: float = setting(
        1e-4,
        "L2 penalty the optimizer applies to the weights that train",
        label="Weight decay",
        min=0.0,
        max=1.0,
        step=1e-4,
        format="%g",
    )
    scheduler: str = setting(
        "cosine",
        "the learning-rate schedule, stepped per batch",
        label="Scheduler",
        choices=("constant", "step", "cosine", "onecycle"),
    )
    warmup_epochs: float = setting(
        0.0,
        "linear warm-up from lr/100, in epochs",
        label="Warm-up epochs",
        min=0.0,
        step=0.5,
        format="%.2f",
    )
    label_smoothing: float = setting(
        0.0,
        "0 = plain cross-entropy",
        label="Label smoothing",
        min=0.0,
        max=0.99,
        step=0.05,
        format="%.2f",
    )
    clip_grad: float = setting(
        0.0,
        "max gradient norm; 0 = no clipping",
        label="Clip gradient norm",
        min=0.0,
        step=0.5,
        format="%.2f",
    )
    early_stop: int = setting(
        0,
        "stop after N epochs without a lower val loss; 0 = off",
        label="Early stop (epochs)",
        min=0,
        message="must be 0 (off) or a number of epochs, got {value}",
        step=1,
    )
    image_size: int = setting(
        64,
        "square side in pixels the images are resized to",
        label="Image size (px)",
        min=16,
        max=1024,
        unit=" pixels",
        step=16,
    )
    augment: str = setting(
        "flip",
        "random changes to the training images: crop = random-resized crop + flip",
        label="Augmentation",
        choices=("none", "flip", "crop"),
    )
    balance: str = setting(
        "none",
        "for imbalanced classes: loss = class-weighted loss, sampler = balanced sampling",
        label="Class balance",
        choices=("none", "loss", "sampler"),
    )
    val_fraction: float = setting(
        0.2,
        "used when the data has no val/ folder",
        label="Validation fraction",
        min=0.0,
        max=0.9,
        step=0.05,
        format="%.2f",
    )
    test_fraction: float = setting(
        0.0,
        "used when the data has no test/ folder",
        label="Test fraction",
        min=0.0,
        max=0.9,
        step=0.05,
        format="%.2f",
    )
    seed: int = setting(
        0,
        "fixes the split, the head's initialisation and the augmentation; same seed, same run",
        label="Seed",
        step=1,
    )
    device: str = setting(
        "auto",
        "auto picks cuda, then mps, then cpu",
        label="Device",
        choices=("auto", "cpu", "cuda", "mps"),
    )
    layer_decay: float = strategies.option("layer_decay")
    l2sp: float = strategies.option("l2sp")
    freeze_bn: bool = strategies.option("freeze_bn")
    compile: bool = setting(
        False,
        "compiles the model before training: a slower start, then faster steps on a GPU",
        label="torch.compile",
    )
    name: str = setting(
        "",
        "a label for people, shown instead of the strategy in tables and charts; "
        "the run id stays the identity",
        label="Name",
        max_length=100,
    )
    group: str | None = setting(None, "id shared by runs launched together", flag=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OPTIONS = options_of(RunConfig)  # {field: Option}, in field order
FIELD_NAMES = tuple(OPTIONS)
_FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}
NOT_SETTINGS = ("env", "schema")  # keys config.json holds beside the settings (see store)


class ConfigError(ValueError):
    """Invalid input: `errors` maps each field (or file) to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("\n".join(f"{k.replace('_', '-')}: {v}" for k, v in self.errors.items()))


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELD_TYPES[name]
    if value is None:
        if "None" in str(kind):
            return None
        raise ConfigError({name: "must not be null"})
    try:
        if kind in ("bool", bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind in ("int", int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind in ("float", float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError({name: f"{value!r} is not a valid {kind}"}) from None


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Returns a RunConfig from a JSON-like dict; raises ConfigError on unknown keys or types.

    Keys use underscores (image_size); dashes are accepted too. `env` and `schema` (written
    into config.json by the store) are ignored.
    """
    if not isinstance(data, dict):
        raise ConfigError({"config": "must be a JSON object of settings"})
    values = dataclasses.asdict(base or RunConfig())
    errors = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in NOT_SETTINGS:
            continue
        if name not in FIELD_NAMES:
            errors[key] = "unknown setting." + nearest(name, FIELD_NAMES)
            continue
        try:
            values[name] = _coerce(name, value)
        except ConfigError as e:
            errors.update(e.errors)
    if errors:
        raise ConfigError(errors)
    return RunConfig(**values)


def load_json(path: str | Path) -> dict[str, Any]:
    """Returns the settings dict in a config file; raises ConfigError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError({"config": f"file {path} does not exist"}) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            {"config": f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"}
        ) from None
    if not isinstance(data, dict):
        raise ConfigError({"config": f"{path} must hold a JSON object of settings"})
    from_dict(data)  # unknown keys and bad types are reported against the file
    return data


def _lr_problem(lr: float) -> str | None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        return f"learning rate must be a positive finite number, got {lr}"
    if lr > 10:
        return f"learning rate {lr} is far too large; try 0.001 to 0.1"
    return None


def validate_fields(cfg: RunConfig) -> dict[str, str]:
    """Returns {field: message} for checks that need neither the model nor the data."""
    e: dict[str, str] = {}
    for name, option in OPTIONS.items():
        message = _lr_problem(cfg.lr) if name == "lr" else option.problem(getattr(cfg, name))
        if message:
            e[name] = message
    if cfg.warmup_epochs >= cfg.epochs >= 1 and cfg.warmup_epochs > 0:
        e["warmup_epochs"] = (
            f"warm-up ({cfg.warmup_epochs}) must be shorter than the run ({cfg.epochs} epochs)"
        )
    if cfg.val_fraction + cfg.test_fraction >= 0.95:
        e["val_fraction"] = "val and test fractions together leave no training images"
    if "strategy" not in e:
        for name, message in strategies.get(cfg.strategy).validate(cfg).items():
            e.setdefault(name, message)
    return e
