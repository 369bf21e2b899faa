"""What a run costs in memory: the peak of one training step, measured with real tensors,
and the size of what a user must keep of the trained model.

`measure_step(device, model, optimizer)` wraps one optimizer step (forward, backward,
optimizer step) and gives its peak:

- CUDA: the caching allocator's peak during the step (`torch.cuda.max_memory_allocated`
  after `reset_peak_memory_stats`): every tensor on the device at the worst moment,
  temporaries included, and whatever else lives there (a feature cache, for one).
- CPU and MPS (no allocator peak to read): the bytes of the tensors the step holds,
  counted once per storage: those autograd saves for backward during the forward pass
  (saved-tensor hooks), the parameters and buffers, the gradients that exist after
  backward, the optimizer state after the step, and the tensors the caller says the
  training keeps beside them (`held`: the engine passes a linear probe's feature cache and
  L2-SP's reference weights). Temporaries that live only inside one operation are not
  counted, and the saved tensors are counted as if they lived as long as the gradients
  (they are freed during backward), so on large activations this is an upper bound of the
  tensors alive at once.

`stored_bytes(parts, plan, freeze_bn=...)` is the size of what a user must keep for a run:
the whole model when every parameter trains, else only what training changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

CUDA_METHOD = "cuda allocator peak"
ACCOUNTED = "saved for backward + parameters + gradients + optimizer state"


def method(device: torch.device) -> str:
    """Returns the name of how measure_step measures on this device (memory_measure)."""
    return CUDA_METHOD if device.type == "cuda" else f"{device.type}: {ACCOUNTED}"


@dataclass
class StepMemory:
    """One step's measured memory: total bytes, the method's name, and the bytes per part:
    parameters, buffers, each `held` name, gradients, optimizer_state, saved_for_backward
    (each storage counted once, to the first part that holds it: a weight autograd saves
    is a parameter), and on CUDA allocator_peak, which is then the total."""

    total: int = 0
    method: str = ""
    breakdown: dict[str, int] = field(default_factory=dict)


def _key_and_size(tensor: torch.Tensor) -> tuple[tuple[str, int], int]:
    """Returns (what identifies tensor's storage, the storage's bytes)."""
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, ...)
        return ("id", id(tensor)), tensor.numel() * tensor.element_size()


class _Storages:
    """Counts the bytes of tensors, each underlying storage once."""

    def __init__(self, seen: set | None = None):
        self.seen: set[tuple[str, int]] = set(seen or ())

    def add(self, tensor: torch.Tensor) -> int:
        """Returns the bytes tensor's storage adds (0 when it was counted already)."""
        key, size = _key_and_size(tensor)
        if size == 0 or key in self.seen:
            return 0
        self.seen.add(key)
        return size

    def add_all(self, tensors: Iterable[torch.Tensor]) -> int:
        return sum(self.add(t) for t in tensors)


def _state_tensors(optimizer: torch.optim.Optimizer | None) -> Iterator[torch.Tensor]:
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def account(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    held: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, int]:
    """Returns the bytes per part of what a training step holds now besides what autograd
    saves: parameters, buffers, each `held` group, gradients and optimizer state; each
    storage counted once, to the first of these that holds it."""
    storages = _Storages()
    params = list(model.parameters())
    parts = {
        "parameters": storages.add_all(params),
        "buffers": storages.add_all(model.buffers()),
    }
    for name, tensors in (held or {}).items():
        parts[name] = storages.add_all(tensors)
    parts["gradients"] = storages.add_all(p.grad for p in params if p.grad is not None)
    parts["optimizer_state"] = storages.add_all(_state_tensors(optimizer))
    return parts


@contextlib.contextmanager
def measure_step(
    device: torch.device,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    held: dict[str, Iterable[torch.Tensor]] | None = None,
) -> Iterator[StepMemory]:
    """Measures the step run inside the `with` block; the StepMemory it yields is filled in
    when the block ends (see the module's docstring for what each device's figure holds)."""
    result = StepMemory(method=method(device))
    held = {name: list(tensors) for name, tensors in (held or {}).items()}
    # What autograd saves is counted as it is saved, by size only: keeping a reference would
    # keep it alive past backward and change the very peak measured. A saved weight or a
    # slice of the feature cache is already counted there. Everything saved is alive until
    # backward begins, so one address is one tensor among them (an address freed during
    # backward may come back as a gradient: those are counted apart).
    known = _Storages()
    known.add_all(model.parameters())
    known.add_all(model.buffers())
    for tensors in held.values():
        known.add_all(tensors)
    saved = _Storages(known.seen)
    saved_bytes = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved_bytes
        saved_bytes += saved.add(tensor)
        return tensor

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield result
    breakdown = account(model, optimizer, held)
    breakdown["saved_for_backward"] = saved_bytes
    if cuda:
        breakdown["allocator_peak"] = int(torch.cuda.max_memory_allocated(device))
        result.total = breakdown["allocator_peak"]
    else:
        result.total = sum(breakdown.values())
    result.breakdown = breakdown


def larger(a: StepMemory | None, b: StepMemory | None) -> StepMemory | None:
    """Returns the larger of two measurements (either may be None)."""
    if a is None or (b is not None and b.total > a.total):
        return b
    return a


def stored_bytes(parts, plan, *, freeze_bn: bool = False) -> int:
    """Returns the bytes a user must keep for a run trained by plan on parts' model.

    Every parameter trains in some phase (full fine-tuning): the whole state dict, every
    parameter and buffer. Otherwise only what training changes: the parameters that train
    in some phase (plan.ever_trained; the head's among them), the head's buffers, and the
    BatchNorm running statistics of the backbone groups that train in some phase (those
    run in train mode; with freeze_bn none do, nor with a strategy that trains pieces it
    adds: lora, vpt, ...). The rest is the starting weights, which the user has already."""
    model = parts.model
    storages = _Storages()
    named = dict(model.named_parameters())
    ever = plan.ever_trained
    if set(named) <= ever:
        return storages.add_all(model.state_dict(keep_vars=True).values())
    total = storages.add_all(p for name, p in named.items() if name in ever)
    total += storages.add_all(b for name, b in model.named_buffers() if parts.is_head(name))
    if freeze_bn:
        return total
    backbone = {g.name for g in parts.groups}
    trained = {
        g.name
        for phase in plan.phases
        if not phase.frozen_statistics  # added pieces train, not the base
        for g in phase.groups
        if g.name in backbone and g.trainable
    }
    for group in sorted(trained):
        for module in parts.group_modules(group):
            for sub in module.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    total += storages.add_all(sub.buffers(recurse=False))
    return total
