"""L2-SP (Li et al. 2018): a penalty that pulls the trained backbone towards its start."""

from __future__ import annotations

import torch

from finetune_core.strategies.registry import HEAD


class L2SP:
    """The L2-SP penalty lambda * sum ||theta - theta0||^2 over the pretrained backbone
    parameters that train in some phase of the plan; theta0 is a snapshot taken when it is
    built."""

    def __init__(self, parts, plan, lam: float):
        owner = parts.group_of()
        ever = plan.ever_trained
        self.lam = lam
        self.pairs = [
            (p, p.detach().clone())
            for name, p in parts.model.named_parameters()
            if name in ever and owner[name] != HEAD
        ]

    def penalty(self) -> torch.Tensor:
        """Returns lambda * sum ||theta - theta0||^2 over parameters that currently train."""
        terms = [((p - p0) ** 2).sum() for p, p0 in self.pairs if p.requires_grad]
        if not terms:
            return torch.zeros((), device=self.pairs[0][0].device if self.pairs else None)
        return self.lam * torch.stack([t.float() for t in terms]).sum()
