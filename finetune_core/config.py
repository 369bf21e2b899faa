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
from finetune_core.options import options_of, setting, short
from finetune_core.util.names import nearest

# the choices of augment; data/augment.py applies them (none and flip keep the feature cache)
AUGMENTS = ("none", "flip", "crop", "fastai", "trivialaugment", "randaugment", "augmix")


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
    surgical_group: int = strategies.option("surgical_group")
    unfreeze_every: int = strategies.option("unfreeze_every")
    probe_epochs: int = strategies.option("probe_epochs")
    adapter_rank: int = strategies.option("adapter_rank")
    adapter_alpha: int = strategies.option("adapter_alpha")
    lora_dropout: float = strategies.option("lora_dropout")
    lora_dora: bool = strategies.option("lora_dora")
    adapter_targets: str = strategies.option("adapter_targets")
    adapter_groups: int = strategies.option("adapter_groups")
    vpt_mode: str = strategies.option("vpt_mode")
    vpt_tokens: int = strategies.option("vpt_tokens")
    epochs: int = setting(
        3,
        "passes over the training images",
        label="Epochs",
        min=1,
        max=10_000,
        unit=" epoch",
        step=1,
    )
    batch_size: int = setting(
        64,
        "images per optimizer step on each device (with devices > 1 every device takes this "
        "many); lower it when memory runs out",
        label="Batch size",
        min=1,
        max=4096,
        step=8,
    )
    devices: int = setting(
        1,
        "processes that train this one run together, one per GPU (torchrun and "
        "DistributedDataParallel; on a CPU, gloo processes): batch size is per device, so the "
        "effective batch is batch size x devices x accumulation; the learning rate is not "
        "scaled with it",
        label="Devices (GPUs) for this run",
        min=1,
        max=64,
        unit=" device",
        step=1,
    )
    accumulate_steps: int = setting(
        1,
        "batches whose gradients add up before each optimizer step: the effective batch is "
        "batch size x this (fastai's GradientAccumulation); 1 = a step after every batch",
        label="Accumulate gradients (batches)",
        min=1,
        max=1024,
        step=1,
    )
    lr: float = setting(
        0.01,
        "the head's learning rate; backbone groups may get less (layer_decay)",
        label="Learning rate (head)",
        min=1e-7,
        max=10.0,
        message="learning rate must be a positive finite number from {min} to {max} "
        "(try 0.001 to 0.1), got {value}",
        step=0.001,
        format="%g",  # 1e-06 stays readable (a fixed number of decimals shows 0.00000)
    )
    tune_lr: bool = setting(
        False,
        "before training, pick the learning rate by a short search on the validation split "
        "(a comparison tunes each strategy this way unless asked for the same settings)",
        label="Tune the learning rate",
    )
    optimizer: str = setting(
        "sgd",
        "sgd uses momentum 0.9, sgd_nesterov the same with Nesterov's momentum (the "
        "reference's --opt sgd_nesterov); adamw decouples weight decay",
        label="Optimizer",
        choices=("sgd", "sgd_nesterov", "adam", "adamw"),
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
    decay_norm_bias: bool = setting(
        False,
        "apply weight decay to normalisation parameters and biases too; off leaves them "
        "undecayed, as torchvision's references (--norm-weight-decay 0) and fastai "
        "(wd_bn_bias=False) do",
        label="Weight decay on norms and biases",
    )
    scheduler: str = setting(
        "cosine",
        "the learning-rate schedule, stepped per batch",
        label="Scheduler",
        choices=("constant", "step", "cosine", "onecycle"),
    )
    cycle_momentum: bool = setting(
        True,
        "with scheduler onecycle, momentum (Adam's beta1) goes 0.95 -> 0.85 -> 0.95 against "
        "the lr, as fastai's fit_one_cycle and torch's OneCycleLR; off keeps it fixed",
        label="One-cycle momentum",
    )
    warmup_epochs: float = setting(
        0.0,
        "linear warm-up from lr/100, in epochs",
        label="Warm-up epochs",
        min=0.0,
        max=10_000.0,
        unit=" epoch",
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
        max=1000.0,
        step=0.5,
        format="%.2f",
    )
    early_stop: int = setting(
        0,
        "stop after N epochs without a lower val loss; 0 = off",
        label="Early stop (epochs)",
        min=0,
        max=10_000,
        message="must be 0 (off) or a number of epochs up to {max}, got {value}",
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
        "random changes to the training images: flip = mirror left-right; crop = "
        "random-resized crop + mirror; fastai = mirror, rotation up to 10 degrees, zoom up to "
        "1.1, warp and lighting, each with p 0.75 (fastai's aug_transforms); trivialaugment, "
        "randaugment, augmix = torchvision's policy per image + mirror; hflip off: no mirror",
        label="Augmentation",
        choices=AUGMENTS,
    )
    hflip: bool = setting(
        True,
        "whether the augmentation mirrors half the training images left-right; off for "
        "digits, text or anything a mirror changes",
        label="Mirror left-right",
    )
    random_erase: float = setting(
        0.0,
        "probability of erasing a random rectangle of each training image to the mean colour "
        "(torchvision's RandomErasing, the reference's --random-erase); 0 = off",
        label="Random erasing (probability)",
        min=0.0,
        max=1.0,
        step=0.05,
        format="%.2f",
    )
    mixup_alpha: float = setting(
        0.0,
        "MixUp: each batch blended with itself shifted by one image, weight ~ Beta(alpha, "
        "alpha), the targets likewise (the reference's recipes use 0.2); 0 = off; with "
        "CutMix on too, each batch gets one of the two",
        label="MixUp alpha",
        min=0.0,
        max=10.0,
        step=0.1,
        format="%g",
    )
    cutmix_alpha: float = setting(
        0.0,
        "CutMix: a rectangle of each image pasted from the next one, its area ~ Beta(alpha, "
        "alpha), the targets by area (the reference's recipes use 1.0); 0 = off",
        label="CutMix alpha",
        min=0.0,
        max=10.0,
        step=0.1,
        format="%g",
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
        min=0,
        max=2**32 - 1,  # what numpy and every generator the run seeds take
        step=1,
    )
    split_seed: int | None = setting(
        None,
        "the seed of the train/val/test split; empty = seed (a comparison's seeds share one split)",
        label="Split seed",
        min=0,
        max=2**32 - 1,
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
    head: str = setting(
        "linear",
        "linear = torchvision's own last layer, new for the classes; fastai = concatenated "
        "average and max pooling, BatchNorm, dropout 0.25, a 512-unit hidden layer with ReLU, "
        "BatchNorm, dropout 0.5 and the class layer (fastai's create_head)",
        label="Head",
        choices=("linear", "fastai"),
    )
    model_ema: bool = setting(
        False,
        "keep an exponential moving average of the weights (the reference's --model-ema): "
        "the average is what is evaluated, saved as best and reported; the raw weights' val "
        "accuracy is recorded beside it",
        label="Weight EMA",
    )
    model_ema_steps: int = setting(
        32,
        "optimizer steps between updates of the weight EMA (the reference's --model-ema-steps)",
        label="EMA every (steps)",
        min=1,
        max=100_000,
        step=1,
    )
    model_ema_decay: float = setting(
        0.99998,
        "the weight EMA's decay, adjusted as the reference does: each update keeps "
        "1 - (1 - decay) x batch size x EMA steps / epochs of the average",
        label="EMA decay",
        min=0.0,
        max=1.0,
        step=1e-5,
        format="%.6f",
    )
    tta: str = setting(
        "none",
        "scores the best weights also on augmented views, reported beside the plain scores: "
        "flip = mean of the softmax of each image and its mirror; augment = 0.25 x the "
        "image's + 0.75 x the mean of 4 views with the run's augmentation (fastai's tta)",
        label="Test-time augmentation",
        choices=("none", "flip", "augment"),
    )
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
NOT_SETTINGS = ("env", "schema", "owner")  # what config.json holds beside the settings (store)


class ConfigError(ValueError):
    """Invalid input: `errors` maps each field (or file) to what is wrong with it."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("\n".join(f"{k.replace('_', '-')}: {v}" for k, v in self.errors.items()))


def _described(value: Any) -> str:
    """Returns what a value is in JSON's words, with the value: "a list [1, 2]"."""
    kinds = {bool: "true/false", str: "text", list: "a list", dict: "an object"}
    kind = next((k for t, k in kinds.items() if isinstance(value, t)), None)
    if kind is None:
        kind = "a number" if isinstance(value, (int, float)) else type(value).__name__
    return f"{kind} {short(value)}"


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = float(value)  # "1e3"; a ValueError again for text
    if isinstance(value, float) and not value.is_integer():  # 2.5, NaN, infinity
        raise ValueError
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range: the range check names it
        return math.copysign(math.inf, value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError


def _to_str(value: Any) -> str:
    if not isinstance(value, str):  # a list or a number where text belongs is a mistake
        raise TypeError
    return value


# each field's type (from its annotation) -> (convert, what a value must be)
_CONVERT = {
    "int": (_to_int, "a whole number"),
    "float": (_to_float, "a number"),
    "bool": (_to_bool, "true or false"),
    "str": (_to_str, "text"),
}


def _coerce(name: str, value: Any) -> Any:
    kind = str(_FIELD_TYPES[name])
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError({name: "must not be null"})
    convert, wanted = _CONVERT[kind.split("|")[0].strip()]
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ConfigError({name: f"must be {wanted}, got {_described(value)}"}) from None


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


CONFIG_FILE_LIMIT = 1 << 20  # bytes; a settings file is a few hundred


def load_json(path: str | Path) -> dict[str, Any]:
    """Returns the settings dict in a config file; raises ConfigError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError({"config": f"file {path} does not exist"})
    if path.is_dir():
        raise ConfigError({"config": f"{path} is a folder; give the path of a JSON settings file"})
    if not path.is_file():  # a device or a pipe (/dev/zero) would be read for ever
        raise ConfigError({"config": f"{path} is not a regular file; give a JSON settings file"})
    try:
        with path.open("rb") as f:
            raw = f.read(CONFIG_FILE_LIMIT + 1)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError({"config": f"{path} cannot be read ({reason})"}) from None
    if len(raw) > CONFIG_FILE_LIMIT:
        raise ConfigError(
            {
                "config": f"{path} is over {CONFIG_FILE_LIMIT >> 20} MiB; a settings file is a "
                "small JSON object"
            }
        )
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark from an editor is harmless
    except UnicodeDecodeError as e:
        raise ConfigError(
            {"config": f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON"}
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            {"config": f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"}
        ) from None
    except ValueError:  # Python refuses integers of over 4300 digits
        raise ConfigError({"config": f"{path} is not usable JSON: a number is too long"}) from None
    except RecursionError:
        raise ConfigError(
            {"config": f"{path} is not usable JSON: it is nested too deeply"}
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            {"config": f"{path} must hold a JSON object of settings, not {_described(data)}"}
        )
    from_dict(data)  # unknown keys and bad types are reported against the file
    return data


def _text_problem(name: str, value: str) -> str | None:
    if "\x00" in value:  # no path, model or label holds one; the OS refuses it in paths
        return "must not contain a NUL character (\\x00)"
    if name == "name" and any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "must be one line of text without control characters"
    return None


def type_errors(cfg: RunConfig) -> dict[str, str]:
    """Returns {field: message} for fields whose value has the wrong type (a RunConfig built
    in code may hold anything; from_dict's are sound)."""
    e: dict[str, str] = {}
    for name in OPTIONS:
        try:
            _coerce(name, getattr(cfg, name))
        except ConfigError as error:
            e.update(error.errors)
    return e


def validate_fields(cfg: RunConfig) -> dict[str, str]:
    """Returns {field: message} for checks that need neither the model nor the data."""
    e = type_errors(cfg)
    mistyped = set(e)
    for name, option in OPTIONS.items():
        value = getattr(cfg, name)
        if name in mistyped:
            continue
        message = (_text_problem(name, value) if isinstance(value, str) else None) or (
            option.problem(value)
        )
        if message:
            e[name] = message
    if not {"warmup_epochs", "epochs"} & set(e):
        if cfg.warmup_epochs >= cfg.epochs >= 1 and cfg.warmup_epochs > 0:
            e["warmup_epochs"] = (
                f"warm-up ({cfg.warmup_epochs}) must be shorter than the run ({cfg.epochs} epochs)"
            )
    if not {"val_fraction", "test_fraction"} & set(e):
        if cfg.val_fraction + cfg.test_fraction >= 0.95:
            e["val_fraction"] = "val and test fractions together leave no training images"
    if not mistyped:
        for name, message in _recipe_problems(cfg).items():
            e.setdefault(name, message)
    if "strategy" not in e and not mistyped:  # its checks compare fields of the right types
        for name, message in strategies.get(cfg.strategy).validate(cfg).items():
            e.setdefault(name, message)
    return e


def _recipe_problems(cfg: RunConfig) -> dict[str, str]:
    """Returns {field: message} for recipe settings that contradict each other."""
    e = {}
    if cfg.augment == "flip" and not cfg.hflip:
        e["hflip"] = (
            "--augment flip only mirrors images, which --hflip off forbids: choose --augment "
            "none, or another augmentation (crop, fastai, trivialaugment, ...) without the mirror"
        )
    if cfg.devices > 1 and cfg.tune_lr:
        e["devices"] = (
            f"--tune-lr searches in one process, so it cannot run on --devices {cfg.devices}: "
            "tune with --devices 1 (or lr-find), then train at that --lr on several devices"
        )
    if cfg.devices > 1 and cfg.device == "mps":
        e["devices"] = (
            f"--devices {cfg.devices} needs CUDA GPUs (NCCL) or the CPU (gloo); Apple's mps "
            "trains on one device: choose --device cuda or cpu, or --devices 1"
        )
    if cfg.tta == "flip" and not cfg.hflip:
        e["tta"] = (
            "--tta flip scores mirrored images, which --hflip off says are wrong for this data: "
            "choose --tta augment or none"
        )
    if cfg.tta == "augment" and cfg.augment == "none" and cfg.random_erase == 0:
        e["tta"] = (
            "--tta augment scores views with the run's augmentation, and --augment none has "
            "none: choose an --augment, or --tta flip"
        )
    return e


# Settings whose default changed after runs were stored without them: what those runs
# trained with, so that a resume (or a reading of the run) keeps their recipe.
STORED_BEFORE = {"decay_norm_bias": True, "cycle_momentum": False}


def stored_config(data: dict[str, Any]) -> RunConfig:
    """Returns the RunConfig of a stored run's config.json: a setting it lacks (a run stored
    before the setting existed) takes what the run trained with, not today's default."""
    return from_dict(data, base=RunConfig(**STORED_BEFORE))


MAX_SEEDS = 5  # seeds per strategy a comparison may repeat
TUNED_TEST_FRACTION = 0.2  # a tuned comparison holds out this share as test (no test/ folder)


def comparison_fields(base: RunConfig, *, tune: bool) -> dict[str, Any]:
    """Returns the fields every member of a comparison shares beyond the base settings: one
    split for all its seeds (split_seed), the lr search per strategy (tune_lr) and, with it,
    a held-out test split, so that the reported figure comes from images the search never
    saw (used only when the data has no test/ folder)."""
    fields: dict[str, Any] = {
        "tune_lr": tune,
        "split_seed": base.seed if base.split_seed is None else base.split_seed,
    }
    if tune and base.test_fraction == 0:
        fields["test_fraction"] = TUNED_TEST_FRACTION
    return fields
