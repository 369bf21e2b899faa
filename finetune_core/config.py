"""RunConfig: every setting of one fine-tuning run, its validation and its JSON form.

`validate(cfg)` returns {field: message} (empty when valid) and never changes anything;
the CLI turns it into exit code 2, the dashboard shows each message next to its field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

STRATEGIES = ("full", "linear_probe", "last_n", "gradual", "lp_ft", "bitfit")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("constant", "step", "cosine", "onecycle")
AUGMENTS = ("none", "flip", "crop")
BALANCES = ("none", "loss", "sampler")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class RunConfig:
    """One run. Every field is a CLI flag (`--image-size` for image_size) and a JSON key."""

    data: str = "builtin:shapes"  # folder, .zip, builtin:shapes, or torchvision:NAME
    model: str = "resnet18"  # any classification model in torchvision's registry
    weights: str = "builtin"  # default | none | builtin | PATH | run:RUN_ID
    strategy: str = "full"  # one of STRATEGIES
    unfreeze_last: int = 1  # last_n: backbone groups trained above the head
    unfreeze_every: int = 1  # gradual: epochs between two unfreezings
    probe_epochs: int = 1  # lp_ft: epochs of linear probe before full fine-tuning
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.01  # the head's learning rate; backbone groups may get less (layer_decay)
    optimizer: str = "sgd"  # sgd (momentum 0.9) | adam | adamw
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # constant | step | cosine | onecycle, stepped per batch
    warmup_epochs: float = 0.0  # linear warm-up from lr/100, in epochs
    label_smoothing: float = 0.0  # 0 = plain cross-entropy
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping
    early_stop: int = 0  # stop after N epochs without a lower val loss; 0 = off
    image_size: int = 64  # square side in pixels the images are resized to
    augment: str = "flip"  # none | flip | crop (random-resized-crop + flip)
    balance: str = "none"  # none | loss (class-weighted loss) | sampler (balanced sampling)
    val_fraction: float = 0.2  # used when the data has no val/ folder
    test_fraction: float = 0.0  # used when the data has no test/ folder
    seed: int = 0
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    layer_decay: float = 1.0  # head lr, top group lr*D, next lr*D^2, ...; 1 = off
    l2sp: float = 0.0  # lambda of the L2-SP penalty towards the pretrained weights; 0 = off
    freeze_bn: bool = False  # keep BatchNorm statistics fixed in trained groups too
    compile: bool = False  # torch.compile the model
    name: str = ""  # a label for people; the run id stays the identity
    group: str | None = field(default=None)  # id shared by runs launched together

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(RunConfig))
_FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}


class ConfigError(ValueError):
    """Invalid input: `errors` maps each field (or file) to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("\n".join(f"{k.replace('_', '-')}: {v}" for k, v in self.errors.items()))


def nearest(word: str, choices, n: int = 3) -> str:
    """Returns ' Did you mean a, b?' for the closest choices, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else ""


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

    Keys use underscores (image_size); dashes are accepted too. `env` (written into
    config.json by the store) is ignored.
    """
    if not isinstance(data, dict):
        raise ConfigError({"config": "must be a JSON object of settings"})
    values = dataclasses.asdict(base or RunConfig())
    errors = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "env":
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


def _positive_finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def validate_fields(cfg: RunConfig) -> dict[str, str]:
    """Returns {field: message} for checks that need neither the model nor the data."""
    e: dict[str, str] = {}
    if not _positive_finite(cfg.lr):
        e["lr"] = f"learning rate must be a positive finite number, got {cfg.lr}"
    elif cfg.lr > 10:
        e["lr"] = f"learning rate {cfg.lr} is far too large; try 0.001 to 0.1"
    if cfg.epochs < 1:
        e["epochs"] = f"must be at least 1, got {cfg.epochs}"
    if cfg.batch_size < 1:
        e["batch_size"] = f"must be at least 1, got {cfg.batch_size}"
    if cfg.strategy not in STRATEGIES:
        e["strategy"] = (
            f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}."
            + nearest(cfg.strategy, STRATEGIES)
        )
    for name, choices in (
        ("optimizer", OPTIMIZERS),
        ("scheduler", SCHEDULERS),
        ("augment", AUGMENTS),
        ("balance", BALANCES),
        ("device", DEVICES),
    ):
        value = getattr(cfg, name)
        if value not in choices:
            e[name] = f"unknown {name} {value!r}; choose one of {', '.join(choices)}." + nearest(
                value, choices
            )
    if cfg.unfreeze_last < 0:
        e["unfreeze_last"] = f"must be 0 or more, got {cfg.unfreeze_last}"
    if cfg.unfreeze_every < 1:
        e["unfreeze_every"] = f"must be at least 1 epoch, got {cfg.unfreeze_every}"
    if cfg.probe_epochs < 1:
        e["probe_epochs"] = f"must be at least 1 epoch, got {cfg.probe_epochs}"
    elif cfg.strategy == "lp_ft" and cfg.epochs >= 1 and cfg.probe_epochs >= cfg.epochs:
        e["probe_epochs"] = (
            f"lp_ft needs fewer probe epochs ({cfg.probe_epochs}) than epochs ({cfg.epochs}) "
            "so that a fine-tuning phase remains"
        )
    for name, lo, hi in (
        ("weight_decay", 0.0, 1.0),
        ("label_smoothing", 0.0, 0.99),
        ("layer_decay", 1e-6, 1.0),
        ("val_fraction", 0.0, 0.9),
        ("test_fraction", 0.0, 0.9),
    ):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi):
            e[name] = f"must be between {lo:g} and {hi:g}, got {v}"
    for name in ("warmup_epochs", "clip_grad", "l2sp"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            e[name] = f"must be 0 or a positive number, got {v}"
    if cfg.warmup_epochs >= cfg.epochs >= 1 and cfg.warmup_epochs > 0:
        e["warmup_epochs"] = (
            f"warm-up ({cfg.warmup_epochs}) must be shorter than the run ({cfg.epochs} epochs)"
        )
    if cfg.early_stop < 0:
        e["early_stop"] = f"must be 0 (off) or a number of epochs, got {cfg.early_stop}"
    if cfg.val_fraction + cfg.test_fraction >= 0.95:
        e["val_fraction"] = "val and test fractions together leave no training images"
    if cfg.image_size < 16 or cfg.image_size > 1024:
        e["image_size"] = f"must be between 16 and 1024 pixels, got {cfg.image_size}"
    if len(cfg.name) > 100:
        e["name"] = "must be at most 100 characters"
    return e


def validate(
    cfg: RunConfig, *, runs_dir: str | Path | None = None, deep: bool = True
) -> dict[str, str]:
    """Returns {field: message} for everything wrong with cfg; empty when it may run.

    deep=True also checks the model (registry, image size, --unfreeze-last against its
    groups), the data (exists, two classes or more, enough images per class for the
    split) and a weights file (architecture and shapes). It reads files but writes
    nothing and downloads nothing.
    """
    errors = validate_fields(cfg)
    if not deep:
        return errors
    from finetune_core import data, models, weights

    model_ok = False
    if cfg.model not in models.classification_models():
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
    if model_ok and cfg.strategy == "last_n" and "image_size" not in errors:
        n_groups = len(models.group_names(cfg.model))
        if cfg.unfreeze_last > n_groups:
            errors["unfreeze_last"] = (
                f"{cfg.model} has {n_groups} backbone groups "
                f"({', '.join(models.group_names(cfg.model))}); --unfreeze-last must be 0 to {n_groups}"
            )
    num_classes = None
    try:
        info = data.inspect_data(cfg.data)
        num_classes = len(info.classes)
        msg = data.check_split(info, cfg.val_fraction, cfg.test_fraction)
        if msg:
            errors["data"] = msg
    except data.DataError as e:
        errors["data"] = str(e)
    if model_ok and "image_size" not in errors:
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


def strategy_label(cfg: dict[str, Any]) -> str:
    """Returns the strategy with the option that defines it: `last_n 1`, `lp_ft 2`, `full`."""
    strategy = cfg.get("strategy", "?")
    if strategy == "last_n":
        label = f"last_n {cfg.get('unfreeze_last', 1)}"
    elif strategy == "gradual":
        label = f"gradual every {cfg.get('unfreeze_every', 1)}"
    elif strategy == "lp_ft":
        label = f"lp_ft {cfg.get('probe_epochs', 1)}"
    else:
        label = str(strategy)
    extras = []
    if cfg.get("layer_decay", 1.0) not in (1, 1.0, None):
        extras.append(f"decay {cfg['layer_decay']:g}")
    if cfg.get("l2sp"):
        extras.append(f"l2sp {cfg['l2sp']:g}")
    if cfg.get("freeze_bn"):
        extras.append("bn frozen")
    return label + (f" ({', '.join(extras)})" if extras else "")
