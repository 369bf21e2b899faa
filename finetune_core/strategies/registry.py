"""The strategy registry: each fine-tuning strategy is one registered object, looked up by
name the way torchvision looks up models. Nothing else compares strategy names.

A strategy says, before anything runs, which backbone groups train in which epochs (its
phases), which parameters of a trained group train (all, or a subset such as BitFit's
biases and norms), what it changes in the model before training (`prepare`: a later
strategy may insert or wrap modules), its options (RunConfig fields, with their help and
range) and their cross-checks, its label ("last_n 1") and its presets for a comparison.
No torch here: the run store labels runs with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from finetune_core.options import Option
from finetune_core.util.names import nearest

HEAD = "head"  # the name of the head in plans: the final classification layer
BASELINE = "full"  # the strategy every comparison measures the others against


@dataclass(frozen=True)
class PhaseSpec:
    """A span of epochs and which backbone groups train in it: `top_groups` of them, next to
    each other, counted from the top, below the `frozen_above` top groups that stay frozen
    (0 for every strategy but surgical: the top k groups)."""

    name: str  # e.g. "linear probe", "fine-tune", "unfreeze layer4"
    start_epoch: int  # from 1
    end_epoch: int  # inclusive
    top_groups: int  # backbone groups trained, counted from the top (0: only the head)
    frozen_above: int = 0  # top groups kept frozen above the trained ones (surgical: k - 1)

    def trained_groups(self, group_names: list[str]) -> list[str]:
        """Returns the backbone groups that train in this phase, stem side first."""
        n, top, skip = len(group_names), self.top_groups, self.frozen_above
        if top < 0 or skip < 0 or top + skip > n:
            raise ValueError(
                f"phase {self.name!r} trains {top} groups below {skip} frozen ones, but the "
                f"model has {n} backbone groups"
            )
        return list(group_names[n - skip - top : n - skip])


class Strategy:
    """Base class: a strategy that trains whole groups and changes nothing in the model."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # what trains, in a few words (help texts, the README's table)
    options: ClassVar[tuple[Option, ...]] = ()  # the RunConfig fields only it reads
    label_format: ClassVar[str] = "{name}"  # filled with name and the options' values
    presets: ClassVar[tuple[dict[str, Any], ...]] = ({},)  # option values of each preset

    def values(self, cfg: Any) -> dict[str, Any]:
        """Returns {option: value} from a RunConfig or a config dict (defaults where absent)."""
        return {o.name: value_of(cfg, o.name, o.default) for o in self.options}

    def label(self, cfg: Any) -> str:
        """Returns the strategy with the option that defines it: "last_n 1", "full"."""
        return self.label_format.format(name=self.name, **self.values(cfg))

    def validate(self, cfg: Any) -> dict[str, str]:
        """Returns {field: message} for options that do not fit the rest of cfg."""
        return {}

    def check_groups(self, cfg: Any, model: str, group_names: list[str]) -> dict[str, str]:
        """Returns {field: message} for options that do not fit the model's backbone groups."""
        return {}

    def phases(self, cfg: Any, group_names: list[str]) -> list[PhaseSpec]:
        """Returns the phases: which top groups train in which epochs."""
        raise NotImplementedError

    def trainable_subset(self, parts) -> set[str] | None:
        """Returns the backbone parameters that may train in a trained group (None: all)."""
        return None

    def prepare(self, parts, cfg: Any) -> None:
        """Changes the built model before training (insert or wrap modules); default: none."""

    # --- strategies that add trainable pieces to a frozen network (peft_methods, vpt) -------
    # True: only the pieces prepare() adds (and the head) train; the backbone's own weights
    # and its BatchNorm statistics stay exactly as they were loaded.
    adds_pieces: ClassVar[bool] = False
    # where the method's own file of what trained (pieces and head) goes in the run folder
    pieces_folder: ClassVar[str] = ""

    def check_model(self, cfg: Any, parts) -> dict[str, str]:
        """Returns {field: message} for options that do not fit the built model's layers
        (parts is built on the meta device, not prepared)."""
        return {}

    def merged(self, parts):
        """Returns a copy of the prepared model as the plain torchvision model, the added
        pieces merged into its layers; None when there is nothing to merge or the method's
        pieces cannot be merged (then the model keeps them)."""
        return None

    def pieces_files(self, parts) -> dict[str, dict]:
        """Returns the method's own files of what trained, {file name: content}: a
        .safetensors file's tensors or a .json file's data (empty: none)."""
        return {}


def value_of(cfg: Any, name: str, default: Any = None) -> Any:
    """Returns cfg's value of a setting, for a RunConfig and a config.json dict alike."""
    if isinstance(cfg, Mapping):
        value = cfg.get(name, default)
        return default if value is None else value
    return getattr(cfg, name, default)


_REGISTRY: dict[str, Strategy] = {}

# Settings that combine with any strategy; a run's label names those not at their default.
MODIFIERS = (
    Option(
        "layer_decay",
        1.0,
        "head lr, top group lr*D, next lr*D^2, ...; 1 = off",
        label="Layer decay",
        min=1e-6,
        max=1.0,
        step=0.05,
        format="%.3f",
        tag="decay {:g}",
    ),
    Option(
        "l2sp",
        0.0,
        "lambda of the L2-SP penalty towards the pretrained weights; 0 = off",
        label="L2-SP λ",
        min=0.0,
        step=0.001,
        format="%g",
        tag="l2sp {:g}",
    ),
    Option(
        "freeze_bn",
        False,
        "keep BatchNorm statistics fixed in trained groups too",
        label="Freeze BatchNorm statistics",
        tag="bn frozen",
    ),
)


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: registers one instance of the strategy under its name."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"strategy name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Removes a registered strategy (tests and plugins that registered one)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Returns the registered strategy names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Strategy:
    """Returns the registered strategy; ValueError naming the choices for an unknown name."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(_REGISTRY)}."
            + nearest(name, _REGISTRY)
        ) from None


def option(name: str) -> Any:
    """Returns the dataclass field of a strategy option or modifier, for RunConfig."""
    for o in all_options():
        if o.name == name:
            return o.field()
    raise KeyError(name)


def all_options() -> list[Option]:
    """Returns every strategy's options, each once (strategies of a family share some, such
    as the adapters' rank), then the modifiers."""
    found = {o.name: o for s in _REGISTRY.values() for o in s.options}
    return list(found.values()) + list(MODIFIERS)


def label(cfg: Any) -> str:
    """Returns a run's strategy label, with its modifiers: "last_n 1 (decay 0.8, l2sp 0.01)"."""
    name = value_of(cfg, "strategy", "?")
    base = _REGISTRY[name].label(cfg) if name in _REGISTRY else str(name)
    extras = [t for o in MODIFIERS if (t := o.tag_for(value_of(cfg, o.name)))]
    return base + (f" ({', '.join(extras)})" if extras else "")


def presets() -> dict[str, dict[str, Any]]:
    """Returns {preset: RunConfig fields} for a comparison: "last_n 2" -> last_n, k = 2."""
    found = {}
    for s in _REGISTRY.values():
        for fixed in s.presets:
            key = " ".join([s.name, *(str(v) for v in fixed.values())])
            found[key] = {"strategy": s.name, **fixed}
    return found


def preset_fields(preset: str) -> dict[str, Any]:
    """Returns the RunConfig fields of one preset; ValueError naming the presets."""
    known = presets()
    if preset not in known:
        raise ValueError(
            f"unknown strategy preset {preset!r}; choose from {', '.join(known)}."
            + nearest(preset, known)
        )
    return dict(known[preset])


def is_baseline(name: Any) -> bool:
    """Returns True for the strategy comparisons measure the others against (full)."""
    return name == BASELINE
