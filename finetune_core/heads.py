"""fastai's head for any torchvision model: concatenated average and max pooling, then
BatchNorm, dropout, a hidden layer and the class layer (fastai.vision.learner.create_head),
in place of the model's own last layer (--head fastai; the default stays torchvision's).

The head keeps the module path of the layer it replaces (parts.head), so the groups, the
plan, the checkpoints and forward_features/forward_head work as with the plain head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 512  # fastai's lin_ftrs default
DROPOUT = (0.25, 0.5)  # fastai's ps=0.5: half of it before the hidden layer, all before the last


class ConcatPool2d(nn.Module):
    """fastai's AdaptiveConcatPool2d to 1x1: the max and the average of each channel,
    stacked (max first), so twice the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)


class FastaiHead(nn.Sequential):
    """BatchNorm, dropout 0.25, Linear to 512 (no bias), ReLU, BatchNorm, dropout 0.5, Linear
    to the classes (no bias): fastai's create_head after its pooling; with pool, the
    concatenated pooling and a flatten first (for a head that is given a feature map)."""

    def __init__(self, in_features: int, num_classes: int, *, pool: bool = False):
        layers: list[nn.Module] = [ConcatPool2d(), nn.Flatten()] if pool else []
        width = 2 * in_features if pool else in_features
        layers += [
            nn.BatchNorm1d(width),
            nn.Dropout(DROPOUT[0]),
            nn.Linear(width, HIDDEN, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(HIDDEN),
            nn.Dropout(DROPOUT[1]),
            nn.Linear(HIDDEN, num_classes, bias=False),
        ]
        super().__init__(*layers)


def _in_features(head: nn.Module) -> int:
    if isinstance(head, nn.Linear):
        return head.in_features
    if isinstance(head, nn.Conv2d):  # SqueezeNet's 1x1 convolution to class maps
        return head.in_channels
    raise ValueError(f"the head is a {type(head).__name__}: the fastai head replaces a Linear")


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def _head_input_width(parts, image_size: int) -> int | None:
    """Returns the width of what the head is given for a small batch, None when the model
    cannot run it (a pooling swapped where the next layer needs the old width)."""
    model = parts.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(2, 3, image_size, image_size, device=device)
            features = parts.forward_features(x)
        return int(features.shape[1]) if features.dim() == 2 else None
    except Exception:  # noqa: BLE001 - any failure means the swap does not fit this model
        return None
    finally:
        model.train(was_training)


def _concat_pooling(parts, in_features: int, image_size: int) -> str | None:
    """Swaps the model's global average pooling module (to 1x1) for ConcatPool2d when the
    head is then given exactly twice its features; returns the pooling's path, or None (and
    the model unchanged) where the model pools in its forward or other layers follow it."""
    model = parts.model
    pools = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
    ]
    for name in reversed(pools):  # the last global pooling is the one before the head
        parent, child = _parent(model, name)
        old = getattr(parent, child)
        setattr(parent, child, ConcatPool2d())
        if _head_input_width(parts, image_size) == 2 * in_features:
            return name
        setattr(parent, child, old)
    return None


def use_fastai_head(parts, num_classes: int, image_size: int) -> str:
    """Replaces parts' head by FastaiHead (initialised as fastai does: Kaiming-normal
    linear weights); returns how the features are pooled, for the log."""
    model = parts.model
    parent, child = _parent(model, parts.head)
    old = getattr(parent, child)
    in_features = _in_features(old)
    device = old.weight.device
    if isinstance(old, nn.Conv2d):  # SqueezeNet: the head is given the feature map itself
        head = FastaiHead(in_features, num_classes, pool=True)
        names = list(parent._modules)
        for later in names[names.index(child) + 1 :]:  # its ReLU and pooling of class maps
            setattr(parent, later, nn.Identity())
        how = "the head's own concatenated average and max pooling of the feature map"
    else:
        pooled = _concat_pooling(parts, in_features, image_size)
        width = 2 * in_features if pooled else in_features
        head = FastaiHead(width, num_classes)
        how = (
            f"concatenated average and max pooling ({pooled})"
            if pooled
            else "the model's own pooling (it pools in its forward, or layers follow its pooling)"
        )
    head = head.to(device)
    if device.type != "meta":
        for m in head.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
    setattr(parent, child, head)
    return how
