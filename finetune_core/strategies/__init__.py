"""What trains: the strategy registry, the plan (per phase, per group) and freezing.

`get(name)` returns a registered strategy; `make_plan(cfg, parts)` says, before anything
runs, which groups train in which epochs and at what learning rate; `apply_phase()` makes a
model match one phase. L2-SP, the one modifier that needs torch, is in `strategies.l2sp`;
the torch (and peft) code of the strategies that add pieces is in `strategies.adapters`
and `strategies.prompts`, imported only when a model is prepared with one.
"""

# registering the strategies: the freezing ones, peft's (lora, ...) and vpt
from finetune_core.strategies import builtin, peft_methods, vpt  # noqa: F401
from finetune_core.strategies.plan import (
    GroupPlan,
    Phase,
    Plan,
    apply_phase,
    group_lrs,
    make_plan,
    optimizer_groups,
    set_train_mode,
)
from finetune_core.strategies.registry import (
    BASELINE,
    HEAD,
    MODIFIERS,
    PhaseSpec,
    Strategy,
    all_options,
    get,
    is_baseline,
    label,
    names,
    option,
    preset_fields,
    presets,
    register,
    unregister,
    value_of,
)

# The comparison a new user gets: full against two partial strategies.
DEFAULT_COMPARISON = ("full", "last_n 1", "linear_probe")


def depth_sweep(groups: int, *, depths: bool = True, surgical: bool = False) -> list[dict]:
    """Returns the strategy fields of "how much should I unfreeze?" for a model with `groups`
    backbone groups: last_n for k = 0 (a linear probe) .. groups-1 (depths), surgical for
    each group alone, 1 = the top one (surgical), then full once."""
    specs = [{"strategy": "last_n", "unfreeze_last": k} for k in range(groups)] if depths else []
    if surgical:
        specs += [{"strategy": "surgical", "surgical_group": k} for k in range(1, groups + 1)]
    return [*specs, {"strategy": BASELINE}]


__all__ = [
    "BASELINE",
    "DEFAULT_COMPARISON",
    "HEAD",
    "MODIFIERS",
    "GroupPlan",
    "Phase",
    "PhaseSpec",
    "Plan",
    "Strategy",
    "all_options",
    "apply_phase",
    "depth_sweep",
    "get",
    "group_lrs",
    "is_baseline",
    "label",
    "make_plan",
    "names",
    "option",
    "optimizer_groups",
    "preset_fields",
    "presets",
    "register",
    "set_train_mode",
    "unregister",
    "value_of",
]
