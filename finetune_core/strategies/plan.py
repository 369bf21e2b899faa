"""The plan as data: per phase and per backbone group, what trains and at what learning
rate, computed before anything runs; and making a model follow one phase of it.

Works on any built model (`models.ModelParts`), on the meta device too, and imports no
torch: the model's parts come in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from finetune_core.strategies.registry import HEAD, get


@dataclass
class GroupPlan:
    name: str  # a backbone group's name, or "head"
    params: int  # parameters in the group
    trainable_params: int  # of those, how many train in this phase
    trainable: bool  # the group trains (fully, or a subset such as bitfit's biases and norms)
    lr: float  # base learning rate of the group (before the schedule)


@dataclass
class Phase:
    name: str  # e.g. "linear probe", "fine-tune", "unfreeze layer4"
    start_epoch: int  # first epoch of the phase, from 1
    end_epoch: int  # last epoch of the phase, inclusive
    groups: list[GroupPlan] = field(default_factory=list)
    param_names: frozenset[str] = field(default=frozenset(), repr=False)  # the ones that train
    # BatchNorm statistics stay fixed in every group, trained ones too: the strategy trains
    # pieces it added to a frozen backbone (lora, vpt, ...), which must stay as it was
    frozen_statistics: bool = False

    @property
    def trainable_params(self) -> int:
        return sum(g.trainable_params for g in self.groups)

    @property
    def head_only(self) -> bool:
        """True when no backbone parameter trains: the backbone can run in inference mode."""
        return all(not g.trainable for g in self.groups if g.name != HEAD)


@dataclass
class Plan:
    strategy: str
    phases: list[Phase]
    total_params: int
    head_params: int

    def phase_at(self, epoch: int) -> Phase:
        """Returns the phase that epoch (from 1) belongs to."""
        for phase in self.phases:
            if phase.start_epoch <= epoch <= phase.end_epoch:
                return phase
        return self.phases[-1]

    @property
    def ever_trained(self) -> frozenset[str]:
        """Returns the parameters that train in some phase."""
        return frozenset().union(*(p.param_names for p in self.phases))

    @property
    def frozen_backbone(self) -> bool:
        """True when the backbone never trains (a linear probe), so its output never changes."""
        return all(p.head_only for p in self.phases)

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


def group_lrs(cfg: Any, group_names: list[str]) -> dict[str, float]:
    """Returns {group: lr}: the head gets lr, the top group lr*D, the next lr*D^2, ..."""
    lrs = {HEAD: cfg.lr}
    for depth, g in enumerate(reversed(group_names), start=1):
        lrs[g] = cfg.lr * cfg.layer_decay**depth
    return lrs


def make_plan(cfg: Any, parts) -> Plan:
    """Returns the plan: per phase, per group, parameter counts, trainable or not, and lr."""
    strategy = get(cfg.strategy)
    owner = parts.group_of()
    names = [g.name for g in parts.groups]
    subset = strategy.trainable_subset(parts)
    sizes = {p_name: p.numel() for p_name, p in parts.model.named_parameters()}
    counts = dict.fromkeys([*names, HEAD], 0)
    for p_name, n in sizes.items():
        counts[owner[p_name]] += n
    lrs = group_lrs(cfg, names)
    phases = []
    for spec in strategy.phases(cfg, names):
        trained = {*spec.trained_groups(names), HEAD}
        chosen = frozenset(
            p
            for p, g in owner.items()
            if g in trained and (g == HEAD or subset is None or p in subset)
        )
        per_group = dict.fromkeys(counts, 0)
        for p in chosen:
            per_group[owner[p]] += sizes[p]
        groups = [GroupPlan(g, counts[g], per_group[g], per_group[g] > 0, lrs[g]) for g in names]
        groups.append(GroupPlan(HEAD, counts[HEAD], counts[HEAD], True, lrs[HEAD]))
        phases.append(
            Phase(
                spec.name,
                spec.start_epoch,
                spec.end_epoch,
                groups,
                chosen,
                frozen_statistics=strategy.adds_pieces,
            )
        )
    return Plan(cfg.strategy, phases, sum(counts.values()), counts[HEAD])


def apply_phase(parts, phase: Phase) -> None:
    """Sets requires_grad on every parameter to match the phase."""
    for name, p in parts.model.named_parameters():
        p.requires_grad_(name in phase.param_names)


def set_train_mode(parts, phase: Phase, *, freeze_bn: bool = False) -> None:
    """Puts the model in train mode with frozen groups (and, with freeze_bn or a phase that
    keeps its statistics, every BatchNorm) in eval mode, so that frozen BatchNorm statistics
    never move."""
    parts.model.train()
    for g in phase.groups:
        if g.name != HEAD and not g.trainable:
            for module in parts.group_modules(g.name):
                module.eval()
    if freeze_bn or phase.frozen_statistics:
        head = set(parts.model.get_submodule(parts.head).modules())
        for module in parts.batchnorm_modules():
            if module not in head:  # a new head's own (fastai's) has no statistics to keep
                module.eval()


def optimizer_groups(cfg: Any, parts, plan: Plan) -> list[dict]:
    """Returns torch optimizer param groups: one per layer group with its lr; every parameter
    that trains in any phase is included (frozen ones have no grad and are skipped).

    With L2-SP the backbone gets no weight decay (the penalty pulls it to the pretrained
    weights instead) and the head keeps plain weight decay. Normalisation parameters and
    biases get none either unless cfg.decay_norm_bias (as torchvision's references and
    fastai): a decayed layer group then has a second param group of the same name and lr
    for them, with weight_decay 0 and "no_decay" True."""
    owner = parts.group_of()
    ever = plan.ever_trained
    lrs = {g.name: g.lr for g in plan.phases[0].groups}
    undecayed = set() if cfg.decay_norm_bias else parts.bias_and_norm_params()
    by_group: dict[str, list] = {}
    for name, p in parts.model.named_parameters():
        if name in ever:
            by_group.setdefault(owner[name], []).append((name, p))
    groups = []
    for group, named in by_group.items():
        decay = cfg.weight_decay if (group == HEAD or cfg.l2sp == 0) else 0.0
        kept = [p for n, p in named if not (decay and n in undecayed)]
        spared = [p for n, p in named if decay and n in undecayed]
        if kept:
            groups.append({"params": kept, "lr": lrs[group], "weight_decay": decay, "name": group})
        if spared:
            groups.append(
                {
                    "params": spared,
                    "lr": lrs[group],
                    "weight_decay": 0.0,
                    "name": group,
                    "no_decay": True,
                }
            )
    return groups
