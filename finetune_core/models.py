"""torchvision's classification registry, model building, head swap and ordered layer groups.

STUB: signatures are the contract other modules code against; the models helper fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Group:
    """A named backbone group: the module/parameter paths (prefixes of parameter names) in it."""

    name: str
    prefixes: tuple[str, ...]


@dataclass
class ModelParts:
    """A built model for K classes with its head and backbone groups (stem -> top)."""

    name: str
    model: nn.Module
    head: str  # module path of the head, e.g. "fc", "classifier.1", "heads.head"
    groups: list[Group] = field(default_factory=list)

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """Returns logits from the head's input (what a forward pre-hook on the head sees)."""
        raise NotImplementedError

    def group_of(self) -> dict[str, str]:
        """Returns {parameter name: group name or "head"} for every parameter."""
        raise NotImplementedError


@dataclass(frozen=True)
class InputSpec:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic" | "nearest"
    min_size: int  # smallest side the architecture takes
    pretrained_size: int | None  # exact size the pretrained weights need (ViT, MaxViT), else None
    default_size: int  # the size the weights were evaluated at (224, 299, ...)


def classification_models() -> list[str]:
    """Returns the sorted names of torchvision's classification models."""
    raise NotImplementedError


def create_model(
    name: str,
    num_classes: int,
    *,
    image_size: int = 224,
    backbone_state: dict[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> ModelParts:
    """Returns the model with aux heads dropped, pretrained backbone loaded, head for K classes."""
    raise NotImplementedError


def group_names(name: str) -> list[str]:
    """Returns the backbone group names of a model (cheap: built on the meta device)."""
    raise NotImplementedError


def input_spec(name: str) -> InputSpec:
    raise NotImplementedError


def check_image_size(name: str, size: int, *, pretrained: bool) -> str | None:
    """Returns None when `name` takes `size` px input, else a message with the valid sizes."""
    raise NotImplementedError


def model_info(name: str) -> dict:
    """Returns what torchvision's weights meta knows (params, acc1, acc5, file_mb, weights, url, cache_file)."""
    raise NotImplementedError
