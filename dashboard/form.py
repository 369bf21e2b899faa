"""The New run form's state: defaults, help texts, persistence across refreshes, and turning
the widgets' values into RunConfigs.

Every widget of the form has the key `f_<name>`; the values live in st.session_state and
are saved to <runs folder>/.form_state.json after every change, so a refresh, a closed tab
or a server restart gives the form back as the user left it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import streamlit as st

from finetune_core import strategies, weights
from finetune_core.config import (
    MAX_SEEDS,
    OPTIONS,
    ConfigError,
    RunConfig,
    comparison_fields,
    from_dict,
)
from finetune_core.util.files import read_json, write_json_atomic

FORM_FILE = ".form_state.json"
PREFIX = "f_"

# Strategies a comparison group can hold; the defaults answer "full vs partial".
PRESETS = tuple(strategies.presets())
DEFAULT_PRESETS = list(strategies.DEFAULT_COMPARISON)

WEIGHT_CHOICES = {
    "default": "ImageNet (torchvision)",
    "builtin": "builtin (offline stand-in)",
    "file": "A weights file",
    "run": "An earlier run",
    "none": "None (random init)",
}
DATA_CHOICES = {
    "builtin": "Built-in shapes",
    "zip": "Upload a .zip",
    "folder": "A folder on this server",
    "torchvision": "A torchvision dataset",
}


def field_help(name: str) -> str:
    """Returns the help text of a RunConfig field: what it is, and its default."""
    option = OPTIONS[name]
    default = option.default
    shown = ("on" if default else "off") if isinstance(default, bool) else repr(default)
    return f"{option.help}. Default: {shown}."


def field_label(name: str) -> str:
    """Returns the form's label of a RunConfig field."""
    return OPTIONS[name].label or name.replace("_", " ")


_FLAG = re.compile(r"--([a-z0-9]+(?:-[a-z0-9]+)*)(?: ([A-Za-z0-9_.:]+))?")
_WEIGHT_SPECS = ("default", "none", "builtin")
# CLI words -> the form's words, for messages the engine writes for both
_PHRASES = {
    f"default, {weights.SOURCES_HELP}": "ImageNet, builtin (an offline stand-in), a weights file, "
    "an earlier run or None (random init)",
    weights.SOURCES_HELP: "builtin (an offline stand-in), a weights file, an earlier run or None "
    "(random init)",
    "run:RUN_ID": "an earlier run",
    "`python -m finetune_core list`": "the runs on Home",
    "`python -m finetune_core models`": "the Model list",
}


def in_form_words(message: str) -> str:
    """Returns a message written for the command line in the form's words: a flag becomes the
    field's label (with its value: "--weights none" -> "**Weights** = none"), and the CLI's
    own phrases the form's choices."""
    for cli, words in _PHRASES.items():
        message = message.replace(cli, words)

    def label(m: re.Match) -> str:
        name, value = m.group(1).replace("-", "_"), m.group(2)
        if name not in OPTIONS:
            return m.group(0)
        text = f"**{field_label(name)}**"
        option = OPTIONS[name]
        allowed = option.allowed() or (_WEIGHT_SPECS if name == "weights" else ())
        if value and (value in allowed or re.fullmatch(r"[0-9.]+", value)):
            return f"{text} = {value.rstrip('.')}" + ("." if value.endswith(".") else "")
        return text + (f" {value}" if value else "")

    return _FLAG.sub(label, message)


def show_errors(errors: dict[str, str], field: str) -> bool:
    """Shows the validation message of one field (in the form's words) where it is called;
    returns True when there was one."""
    if field not in errors:
        return False
    st.error(
        f"**{field.replace('_', ' ')}**: {in_form_words(errors[field])}", icon=":material/error:"
    )
    return True


def defaults(weights_choice: str) -> dict[str, Any]:
    """Returns the form's first values: RunConfig's defaults plus the UI's own choices."""
    values = {PREFIX + name: o.default for name, o in OPTIONS.items() if o.flag}
    values.update(
        {
            PREFIX + "weights_choice": weights_choice,
            PREFIX + "weights_file": "",
            PREFIX + "weights_run": "",
            PREFIX + "data_choice": "builtin",
            PREFIX + "data_zip": "",
            PREFIX + "data_root": "",
            PREFIX + "data_sub": "",
            PREFIX + "data_tv": "CIFAR10",
            PREFIX + "compare": True,
            PREFIX + "compare_set": list(DEFAULT_PRESETS),
            PREFIX + "compare_tune": True,  # each strategy's lr tuned; off: same settings
            PREFIX + "compare_seeds": 1,
        }
    )
    return values


def load(root: Path) -> dict[str, Any]:
    """Returns the saved form values ({} when none or unreadable)."""
    data = read_json(Path(root) / FORM_FILE)
    return data if isinstance(data, dict) else {}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Returns value with the default's type (JSON turns 1.0 into 1), or the default."""
    if default is None or value is None:
        return value
    try:
        if isinstance(default, bool):
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            return list(value)
        return type(default)(value)
    except (TypeError, ValueError):
        return default


def restore(root: Path, first: dict[str, Any]) -> None:
    """Puts saved values (else the defaults) into session_state for keys not set yet."""
    saved = load(root)
    for key, default in first.items():
        if key not in st.session_state:
            st.session_state[key] = _coerce(key, saved.get(key, default), default)


def save(root: Path) -> None:
    """Writes the form's current values, merged over the saved ones (hidden widgets keep
    theirs), when they changed."""
    saved = load(root)
    current = {
        k: v
        for k, v in st.session_state.items()
        if k.startswith(PREFIX) and isinstance(v, (str, int, float, bool, list, type(None)))
    }
    merged = {**saved, **current}
    if merged != saved:
        merged["_saved_at"] = time.time()
        Path(root).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(root) / FORM_FILE, merged)


def apply_config(config: dict[str, Any], data_roots: list[str]) -> None:
    """Sets the form to a run's config (clone): every field, weights and data choices."""
    for name, option in OPTIONS.items():
        if name in config and option.flag:
            st.session_state[PREFIX + name] = config[name]
    w = str(config.get("weights", "builtin"))
    if w in ("default", "builtin", "none"):
        st.session_state[PREFIX + "weights_choice"] = w
    elif w.startswith("run:"):
        st.session_state[PREFIX + "weights_choice"] = "run"
        st.session_state[PREFIX + "weights_run"] = w[4:]
    else:
        st.session_state[PREFIX + "weights_choice"] = "file"
        st.session_state[PREFIX + "weights_file"] = w
    d = str(config.get("data", "builtin:shapes"))
    if d.startswith("builtin:"):
        st.session_state[PREFIX + "data_choice"] = "builtin"
    elif d.startswith("torchvision:"):
        st.session_state[PREFIX + "data_choice"] = "torchvision"
        st.session_state[PREFIX + "data_tv"] = d.partition(":")[2]
    elif d.lower().endswith(".zip"):
        st.session_state[PREFIX + "data_choice"] = "zip"
        st.session_state[PREFIX + "data_zip"] = d
    else:
        st.session_state[PREFIX + "data_choice"] = "folder"
        root, sub = _split_under_roots(d, data_roots)  # ("", d) when below no root
        st.session_state[PREFIX + "data_root"] = root
        st.session_state[PREFIX + "data_sub"] = sub
    st.session_state[PREFIX + "compare"] = False


def _split_under_roots(path: str, roots: list[str]) -> tuple[str, str]:
    p = Path(path).resolve()
    for r in roots:
        rp = Path(r).resolve()
        if p == rp or rp in p.parents:
            return r, str(p.relative_to(rp))
    return "", path


def offline_setting() -> str | None:
    """Returns why the network is not to be used when $FINETUNE_OFFLINE says so, else None."""
    if os.environ.get("FINETUNE_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "FINETUNE_OFFLINE is set, so this server does not download"
    return None


def data_roots() -> list[str]:
    """Returns the folders below which server data folders may be chosen
    ($FINETUNE_DATA_ROOTS, colon-separated; existing folders only)."""
    raw = os.environ.get("FINETUNE_DATA_ROOTS", "")
    return [r for r in raw.split(os.pathsep) if r.strip() and Path(r).expanduser().is_dir()]


def folder_spec(root: str, sub: str, roots: list[str]) -> tuple[str | None, str | None]:
    """Returns (data spec, None) for a folder below an allowed root, or (None, message)."""
    if root not in roots:
        return None, "choose one of the data roots"
    base = Path(root).expanduser().resolve()
    path = (base / sub.strip()).resolve() if sub.strip() else base
    if path != base and base not in path.parents:
        return None, f"{sub!r} leads outside {root}; only folders below the data roots are allowed"
    if not path.is_dir():
        return None, f"{path} is not a folder; give a path below {root}"
    return str(path), None


def weights_spec(state) -> tuple[str, str | None]:
    """Returns (weights spec, message when the choice is incomplete)."""
    choice = state.get(PREFIX + "weights_choice", "builtin")
    if choice in ("default", "builtin", "none"):
        return choice, None
    if choice == "run":
        run = state.get(PREFIX + "weights_run") or ""
        return (
            (f"run:{run}", None) if run else ("", "pick the run whose best weights to start from")
        )
    path = state.get(PREFIX + "weights_file") or ""
    if not path:
        return "", "upload a weights file (.safetensors, .pt or .pth), or choose another source"
    return path, None


def data_spec(state, roots: list[str]) -> tuple[str, str | None]:
    """Returns (data spec, message when the choice is incomplete)."""
    choice = state.get(PREFIX + "data_choice", "builtin")
    if choice == "zip":
        path = state.get(PREFIX + "data_zip") or ""
        return (
            (path, None) if path else ("", "upload a .zip of class folders, or choose other data")
        )
    if choice == "folder":
        spec, problem = folder_spec(
            state.get(PREFIX + "data_root", ""), state.get(PREFIX + "data_sub", ""), roots
        )
        return spec or "", problem
    if choice == "torchvision":
        return f"torchvision:{state.get(PREFIX + 'data_tv', 'CIFAR10')}", None
    return "builtin:shapes", None


def base_values(state) -> dict[str, Any]:
    """Returns the RunConfig fields the form holds (weights and data excluded)."""
    out = {}
    for name, option in OPTIONS.items():
        key = PREFIX + name
        if option.flag and name not in ("weights", "data") and key in state:
            out[name] = state[key]
    return out


def build_configs(state, weights: str, data: str) -> list[tuple[str, RunConfig]]:
    """Returns [(label, RunConfig)]: one run, or one per preset and seed in compare mode
    (sharing the split, augmentation and epochs; each strategy's lr tuned unless the form
    asks for the same settings). Raises ConfigError for values of the wrong type."""
    values = base_values(state)
    values.update(weights=weights, data=data)
    if not state.get(PREFIX + "compare"):
        return [(values.get("strategy", OPTIONS["strategy"].default), from_dict(values))]
    specs = []
    for preset in state.get(PREFIX + "compare_set") or []:
        try:
            specs.append((preset, strategies.preset_fields(preset)))
        except ValueError as e:  # a form saved by another version
            raise ConfigError({"strategy": str(e)}) from None
    return comparison_configs(state, values, specs)


def comparison_configs(
    state, values: dict[str, Any], specs: list[tuple[str, dict[str, Any]]]
) -> list[tuple[str, RunConfig]]:
    """Returns [(label, RunConfig)] of a comparison: each (label, strategy fields) of specs
    with the form's seeds per strategy, one split, and the lr search unless switched off."""
    base = from_dict(values)
    shared = comparison_fields(base, tune=bool(state.get(PREFIX + "compare_tune", True)))
    seeds = seeds_per_strategy(state)
    name = values.get("name") or ""
    out = []
    for label, fields in specs:
        for i in range(seeds):
            seed = base.seed + i
            shown = f"{label} seed {seed}" if seeds > 1 else label
            v = {**values, **fields, **shared, "seed": seed}
            v["name"] = f"{name} · {shown}" if name else ""
            out.append((shown, from_dict(v)))
    return out


def seeds_per_strategy(state) -> int:
    """Returns the form's seeds per strategy of a comparison, 1 to MAX_SEEDS."""
    try:
        seeds = int(state.get(PREFIX + "compare_seeds") or 1)
    except (TypeError, ValueError):
        return 1
    return min(max(seeds, 1), MAX_SEEDS)


def depth_configs(state, weights: str, data: str, groups: int) -> list[tuple[str, RunConfig]]:
    """Returns the comparison of "How much should I unfreeze?": last_n for k = 0 (the
    linear probe) up to every group but one, then full, with the form's settings, seeds and
    lr search (strategies.depth_sweep)."""
    values = base_values(state)
    values.update(weights=weights, data=data)
    specs = [(strategies.label(f), f) for f in strategies.depth_sweep(groups)]
    return comparison_configs(state, values, specs)


def to_json(cfg: RunConfig) -> str:
    """Returns a stable JSON key for caching per config."""
    return json.dumps(cfg.to_dict(), sort_keys=True)
