"""The baseline: the fine-tuning loop most tutorials write, kept deliberately textbook.

fp32, NCHW, SGD with momentum 0.9 over every parameter, a plain `torch.utils.data.DataLoader`
(over a TensorDataset of float tensors for synthetic input, over an `ImageFolder` with
torchvision transforms for real images), `.to(device)` per batch and `loss.item()` per step,
as in PyTorch's "Transfer learning for computer vision" tutorial. The bench compares the
engine against this; it is not used anywhere else.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def tensor_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Returns a shuffling DataLoader over a TensorDataset of float images (already normalised)."""
    return DataLoader(
        TensorDataset(images, labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
    )


def image_folder_loader(
    root, image_size: int, batch_size: int, mean, std, *, num_workers: int | None = None
) -> DataLoader:
    """Returns the tutorial's ImageFolder DataLoader: decode, resize, flip, ToTensor, Normalize
    for every image of every epoch, in `num_workers` worker processes (default min(4, CPUs))."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    return DataLoader(
        datasets.ImageFolder(str(root), tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
    )


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    steps: int,
    device: torch.device,
    *,
    lr: float = 0.001,
    step_times: list[float] | None = None,
) -> dict:
    """Trains every parameter for `steps` batches (cycling the loader); returns loss and accuracy.

    step_times, when given, receives time.perf_counter() after each step (the per-step
    `loss.item()` already waits for the device, as in the tutorial).
    """
    model.to(device)
    model.train()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    running_loss, running_corrects, seen, step = 0.0, 0, 0, 0
    while step < steps:
        for inputs, labels in loader:
            inputs = inputs.to(device)
            labels = labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            _, preds = torch.max(outputs, 1)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * inputs.size(0)
            running_corrects += int(torch.sum(preds == labels.data))
            seen += inputs.size(0)
            step += 1
            if step_times is not None:
                step_times.append(time.perf_counter())
            if step >= steps:
                break
    return {"loss": running_loss / max(seen, 1), "acc": running_corrects / max(seen, 1)}
