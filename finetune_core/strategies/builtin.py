"""The freezing strategies: full, linear_probe, last_n, surgical, gradual, lp_ft and bitfit."""

from __future__ import annotations

from typing import Any

from finetune_core.options import Option
from finetune_core.strategies.registry import PhaseSpec, Strategy, register


@register
class Full(Strategy):
    name = "full"
    summary = "every parameter"

    def phases(self, cfg, group_names):
        return [PhaseSpec("full", 1, cfg.epochs, len(group_names))]


@register
class LinearProbe(Strategy):
    name = "linear_probe"
    summary = (
        "the head only; without random augmentation the backbone's features are computed "
        "once and cached"
    )

    def phases(self, cfg, group_names):
        return [PhaseSpec("linear probe", 1, cfg.epochs, 0)]


@register
class LastN(Strategy):
    name = "last_n"
    summary = "the top k backbone groups and the head (k = 0 is a linear probe)"
    options = (
        Option(
            "unfreeze_last",
            1,
            "last_n: backbone groups trained above the head",
            label="Unfreeze last (groups)",
            min=0,
            step=1,
        ),
    )
    label_format = "{name} {unfreeze_last}"
    presets = ({"unfreeze_last": 1}, {"unfreeze_last": 2}, {"unfreeze_last": 3})

    def check_groups(self, cfg, model, group_names):
        n = len(group_names)
        if cfg.unfreeze_last > n:
            return {
                "unfreeze_last": f"{model} has {n} backbone groups ({', '.join(group_names)}); "
                f"--unfreeze-last must be 0 to {n}"
            }
        return {}

    def phases(self, cfg, group_names):
        n, k = len(group_names), cfg.unfreeze_last
        if k > n:
            raise ValueError(f"--unfreeze-last {k} exceeds the {n} backbone groups")
        return [PhaseSpec(f"last {k}", 1, cfg.epochs, k)]


@register
class Surgical(Strategy):
    name = "surgical"
    summary = "one chosen backbone group and the head (surgical fine-tuning, Lee et al. 2023)"
    options = (
        Option(
            "surgical_group",
            1,
            "surgical: the one backbone group trained, counted from the top as last_n counts "
            "(1 = the group just below the head); Lee et al. 2023 found the best group depends "
            "on the kind of distribution shift: early groups for input-level shifts such as "
            "image corruptions, middle ones for feature-level shifts, the top for label shifts",
            label="Surgical group (from the top)",
            min=1,
            step=1,
        ),
    )
    label_format = "{name} {surgical_group}"
    presets = ({"surgical_group": 1}, {"surgical_group": 2}, {"surgical_group": 3})

    def check_groups(self, cfg, model, group_names):
        n, k = len(group_names), cfg.surgical_group
        if not 1 <= k <= n:
            return {
                "surgical_group": f"{model} has {n} backbone groups ({', '.join(group_names)}); "
                f"--surgical-group must be 1 to {n} (1 = {group_names[-1]}, just below the "
                f"head; {n} = {group_names[0]})"
            }
        return {}

    def phases(self, cfg, group_names):
        n, k = len(group_names), cfg.surgical_group
        if not 1 <= k <= n:
            raise ValueError(f"--surgical-group {k} is outside the {n} backbone groups (1 to {n})")
        return [PhaseSpec(f"only {group_names[n - k]}", 1, cfg.epochs, 1, frozen_above=k - 1)]


@register
class Gradual(Strategy):
    name = "gradual"
    summary = "starts as a linear probe, unfreezes one more group from the top every m epochs"
    options = (
        Option(
            "unfreeze_every",
            1,
            "gradual: epochs between two unfreezings",
            label="Unfreeze every (epochs)",
            min=1,
            unit=" epoch",
            step=1,
        ),
    )
    label_format = "{name} every {unfreeze_every}"

    def phases(self, cfg, group_names):
        n, e = len(group_names), cfg.epochs
        phases, k, start = [], 0, 1
        while start <= e:
            end = e if k >= n else min(e, start + cfg.unfreeze_every - 1)
            name = "linear probe" if k == 0 else f"unfreeze {group_names[n - k]}"
            phases.append(PhaseSpec(name, start, end, k))
            start, k = end + 1, k + 1
        return phases


@register
class LpFt(Strategy):
    name = "lp_ft"
    summary = "linear probe for p epochs, then full fine-tuning from that head"
    options = (
        Option(
            "probe_epochs",
            1,
            "lp_ft: epochs of linear probe before full fine-tuning",
            label="Probe epochs",
            min=1,
            unit=" epoch",
            step=1,
        ),
    )
    label_format = "{name} {probe_epochs}"

    def validate(self, cfg: Any) -> dict[str, str]:
        if cfg.probe_epochs >= 1 and cfg.epochs >= 1 and cfg.probe_epochs >= cfg.epochs:
            return {
                "probe_epochs": f"lp_ft needs fewer probe epochs ({cfg.probe_epochs}) than "
                f"epochs ({cfg.epochs}) so that a fine-tuning phase remains"
            }
        return {}

    def phases(self, cfg, group_names):
        p, e = min(cfg.probe_epochs, cfg.epochs), cfg.epochs
        phases = [PhaseSpec("linear probe", 1, p, 0)]
        if p < e:
            phases.append(PhaseSpec("fine-tune", p + 1, e, len(group_names)))
        return phases


@register
class BitFit(Strategy):
    name = "bitfit"
    summary = "biases and normalisation parameters plus the head"

    def phases(self, cfg, group_names):
        return [PhaseSpec("bitfit", 1, cfg.epochs, len(group_names))]

    def trainable_subset(self, parts):
        return parts.bias_and_norm_params()
