"""What trains: the plan (per phase, per group), freezing, optimizer groups, the L2-SP penalty.

A strategy is data: `make_plan()` says, before anything runs, which backbone groups train in
which epochs and at what learning rate; `apply_phase()` makes the model match one phase.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn

from finetune_core.config import RunConfig

HEAD = "head"
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass
class GroupPlan:
    name: str  # a backbone group's name, or "head"
    params: int  # parameters in the group
    trainable_params: int  # of those, how many train in this phase
    trainable: bool  # the group trains (fully, or its biases and norms for bitfit)
    lr: float  # base learning rate of the group (before the schedule)


@dataclass
class Phase:
    name: str  # e.g. "linear probe", "fine-tune", "unfreeze layer4"
    start_epoch: int  # first epoch of the phase, from 1
    end_epoch: int  # last epoch of the phase, inclusive
    groups: list[GroupPlan] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return sum(g.trainable_params for g in self.groups)

    @property
    def head_only(self) -> bool:
        return all(not g.trainable for g in self.groups if g.name != HEAD)


@dataclass
class Plan:
    strategy: str
    phases: list[Phase]
    total_params: int
    head_params: int

    @property
    def max_trainable_params(self) -> int:
        return max(p.trainable_params for p in self.phases)

    def phase_at(self, epoch: int) -> Phase:
        """Returns the phase that epoch (from 1) belongs to."""
        for phase in self.phases:
            if phase.start_epoch <= epoch <= phase.end_epoch:
                return phase
        return self.phases[-1]

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "total_params": self.total_params,
            "head_params": self.head_params,
            "phases": [{**asdict(p), "trainable_params": p.trainable_params} for p in self.phases],
        }

    def to_frame(self) -> pd.DataFrame:
        """Returns one row per (phase, group), stem first and the head last."""
        rows = [
            {
                "phase": p.name,
                "start_epoch": p.start_epoch,
                "end_epoch": p.end_epoch,
                "group": g.name,
                "params": g.params,
                "trainable_params": g.trainable_params,
                "trainable": g.trainable,
                "lr": g.lr if g.trainable else 0.0,
            }
            for p in self.phases
            for g in p.groups
        ]
        return pd.DataFrame(rows)


def _is_bitfit_param(name: str, module: nn.Module) -> bool:
    return name.endswith("bias") or isinstance(module, _NORM_TYPES)


def bitfit_params(model: nn.Module) -> set[str]:
    """Returns the names of biases and normalisation affine parameters."""
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if _is_bitfit_param(p_name, module):
                names.add(full)
    return names


def _trained_groups_per_phase(
    cfg: RunConfig, group_names: list[str]
) -> list[tuple[str, int, int, int]]:
    """Returns [(phase name, start, end, number of top groups trained)] for the strategy."""
    n, e = len(group_names), cfg.epochs
    s = cfg.strategy
    if s in ("full", "bitfit"):
        return [(s.replace("_", " "), 1, e, n)]
    if s == "linear_probe":
        return [("linear probe", 1, e, 0)]
    if s == "last_n":
        if cfg.unfreeze_last > n:
            raise ValueError(f"--unfreeze-last {cfg.unfreeze_last} exceeds the {n} backbone groups")
        return [(f"last {cfg.unfreeze_last}", 1, e, cfg.unfreeze_last)]
    if s == "lp_ft":
        p = min(cfg.probe_epochs, e)
        phases = [("linear probe", 1, p, 0)]
        if p < e:
            phases.append(("fine-tune", p + 1, e, n))
        return phases
    if s == "gradual":
        phases, k, start = [], 0, 1
        while start <= e:
            end = e if k >= n else min(e, start + cfg.unfreeze_every - 1)
            label = "linear probe" if k == 0 else f"unfreeze {group_names[n - k]}"
            phases.append((label, start, end, k))
            start, k = end + 1, k + 1
        return phases
    raise ValueError(f"unknown strategy {s!r}")


def make_plan(cfg: RunConfig, parts) -> Plan:
    """Returns the plan: per phase, per group, parameter counts, trainable or not, and lr."""
    model = parts.model
    owner = parts.group_of()
    names = [g.name for g in parts.groups]
    counts = dict.fromkeys([*names, HEAD], 0)
    bitfit_counts = dict.fromkeys([*names, HEAD], 0)
    bitfit = bitfit_params(model) if cfg.strategy == "bitfit" else set()
    for p_name, p in model.named_parameters():
        counts[owner[p_name]] += p.numel()
        if p_name in bitfit:
            bitfit_counts[owner[p_name]] += p.numel()
    lrs = group_lrs(cfg, names)
    phases = []
    for label, start, end, k in _trained_groups_per_phase(cfg, names):
        trained = set(names[len(names) - k :]) if k else set()
        groups = []
        for g in names:
            on = g in trained
            if cfg.strategy == "bitfit":
                n_train = bitfit_counts[g]
                on = n_train > 0
            else:
                n_train = counts[g] if on else 0
            groups.append(GroupPlan(g, counts[g], n_train, on, lrs[g]))
        groups.append(GroupPlan(HEAD, counts[HEAD], counts[HEAD], True, lrs[HEAD]))
        phases.append(Phase(label, start, end, groups))
    return Plan(cfg.strategy, phases, sum(counts.values()), counts[HEAD])


def group_lrs(cfg: RunConfig, group_names: list[str]) -> dict[str, float]:
    """Returns {group: lr}: the head gets lr, the top group lr*D, the next lr*D^2, ..."""
    lrs = {HEAD: cfg.lr}
    for depth, g in enumerate(reversed(group_names), start=1):
        lrs[g] = cfg.lr * cfg.layer_decay**depth
    return lrs


@functools.lru_cache(maxsize=64)
def _meta_parts(model: str, num_classes: int, image_size: int):
    from finetune_core import models

    return models.create_model(model, num_classes, image_size=image_size, device="meta")


def plan_for(cfg: RunConfig, num_classes: int) -> Plan:
    """Returns the plan for cfg without weights or data (the model is built on the meta device)."""
    return make_plan(cfg, _meta_parts(cfg.model, num_classes, cfg.image_size))


def _module_prefixes(parts, group_name: str) -> list[nn.Module]:
    group = next(g for g in parts.groups if g.name == group_name)
    mods = []
    for prefix in group.prefixes:
        try:
            mods.append(parts.model.get_submodule(prefix))
        except AttributeError:
            pass  # a parameter such as ViT's class_token: no mode to set
    return mods


def apply_phase(parts, phase: Phase, *, bitfit: bool = False) -> None:
    """Sets requires_grad on every parameter to match the phase."""
    owner = parts.group_of()
    trained = {g.name for g in phase.groups if g.trainable}
    only = bitfit_params(parts.model) if bitfit else None
    for name, p in parts.model.named_parameters():
        group = owner[name]
        on = group in trained
        if only is not None and group != HEAD:
            on = on and name in only
        p.requires_grad_(on)


def set_train_mode(parts, phase: Phase, *, freeze_bn: bool = False) -> None:
    """Puts the model in train mode with frozen groups (and, with freeze_bn, every BatchNorm) in
    eval mode, so that frozen BatchNorm statistics never move."""
    parts.model.train()
    for g in phase.groups:
        if g.name != HEAD and not g.trainable:
            for module in _module_prefixes(parts, g.name):
                module.eval()
    if freeze_bn:
        for module in parts.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def optimizer_groups(cfg: RunConfig, parts, plan: Plan) -> list[dict]:
    """Returns torch optimizer param groups: one per layer group with its lr; every parameter
    that trains in any phase is included (frozen ones have no grad and are skipped).

    With L2-SP the backbone gets no weight decay (the penalty pulls it to the pretrained
    weights instead) and the head keeps plain weight decay."""
    owner = parts.group_of()
    ever = {g.name for p in plan.phases for g in p.groups if g.trainable}
    only = bitfit_params(parts.model) if cfg.strategy == "bitfit" else None
    lrs = {g.name: g.lr for g in plan.phases[0].groups}
    by_group: dict[str, list[nn.Parameter]] = {}
    for name, p in parts.model.named_parameters():
        group = owner[name]
        if group not in ever or (only is not None and group != HEAD and name not in only):
            continue
        by_group.setdefault(group, []).append(p)
    groups = []
    for group, params in by_group.items():
        decay = cfg.weight_decay if (group == HEAD or cfg.l2sp == 0) else 0.0
        groups.append({"params": params, "lr": lrs[group], "weight_decay": decay, "name": group})
    return groups


class L2SP:
    """The L2-SP penalty lambda * sum ||theta - theta0||^2 over pretrained backbone parameters
    that train (Li et al. 2018); theta0 is a snapshot taken when it is built."""

    def __init__(self, parts, plan: Plan, lam: float):
        owner = parts.group_of()
        ever = {g.name for p in plan.phases for g in p.groups if g.trainable and g.name != HEAD}
        self.lam = lam
        self.pairs = [
            (p, p.detach().clone())
            for name, p in parts.model.named_parameters()
            if owner[name] in ever
        ]

    def penalty(self) -> torch.Tensor:
        """Returns lambda * sum ||theta - theta0||^2 over parameters that currently train."""
        terms = [((p - p0) ** 2).sum() for p, p0 in self.pairs if p.requires_grad]
        if not terms:
            return torch.zeros((), device=self.pairs[0][0].device if self.pairs else None)
        return self.lam * torch.stack([t.float() for t in terms]).sum()
