"""One run on several devices: the process group's helpers (torchrun + DistributedDataParallel).

The worker of a run with devices > 1 starts `launch_command()` (torchrun --standalone, one
process per device); each of those processes calls `init()` and trains its fixed shard of
the training images (`shard`) with the model in DDP (`Replicated`). What every rank must
decide together goes through small collectives on a CPU (gloo) group, so that no rank waits
on a GPU sync for them: `any_rank` (stop after this step?), `rank0_says` (write a train
record now?). Without a process group (devices 1) every helper is the identity, and the
engine runs as it always has.

Only rank 0 writes the run folder; `is_writer()` says which process that is.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# How long a collective may wait for the others. Rank 0 prepares the data alone first (the
# others then read its decoded cache), so a first decode of a large folder has this long.
# A rank that dies is noticed much sooner: its sockets close and torchrun ends the rest.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)
OUTCOME_ENV = "FINETUNE_RANK_OUTCOME"  # where rank 0 writes the run's outcome for the worker
_control: Any = None  # the CPU group of the small collectives (the default group on gloo)


def active() -> bool:
    """Returns True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Returns True in the process that writes the run folder: rank 0 (or the only one)."""
    return rank() == 0


def under_torchrun() -> bool:
    """Returns True in a process torchrun started (its environment names the group)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def backend_for(device: torch.device) -> str:
    """Returns the collective backend of a device type: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> torch.device:
    """Joins torchrun's process group (NCCL on CUDA, gloo on the CPU); returns the device of
    this rank (cuda:LOCAL_RANK on CUDA). Call once, in a process torchrun started."""
    global _control
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(backend_for(device), timeout=COLLECTIVE_TIMEOUT)
    # on NCCL the flags would cost a GPU sync per step: they go over gloo on the CPU instead
    _control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return device


def shutdown() -> None:
    global _control
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _control = None


def barrier() -> None:
    if active():
        dist.barrier(group=_control)


def any_rank(flag: bool) -> bool:
    """Returns True on every rank when flag is True on one of them (a collective)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def rank0_says(flag: bool) -> bool:
    """Returns rank 0's flag on every rank (a collective): a decision that depends on
    rank 0's clock, taken the same way everywhere."""
    if not active():
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0, group=_control)
    return bool(t.item())


def sum_all(t: torch.Tensor) -> torch.Tensor:
    """Returns the elementwise sum of t over the ranks (t itself when alone)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def gather(obj: Any) -> list[Any]:
    """Returns every rank's obj in rank order (picklable objects; [obj] when alone)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control)
    return out


def average_grads(params) -> None:
    """Averages the gradients of params over the ranks in place (gradients a rank holds but
    has not yet synchronised: accumulation stopped between two optimizer steps)."""
    if not active():
        return
    n = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def shard_indices(n: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """Returns the indices of rank's fixed shard of n training images: a seeded shuffle cut
    into `world` equal parts (every rank takes as many steps per epoch; the n % world
    images left over are not trained on). The same for every epoch, so what a rank computes
    once from its images (the frozen-prefix cache) holds for the whole run."""
    g = torch.Generator().manual_seed(seed * 7_919 + 104_729)
    order = torch.randperm(n, generator=g)
    per = n // world
    return order[rank * per : (rank + 1) * per].sort().values


def span(n: int) -> tuple[int, int]:
    """Returns [start, end) of this rank's contiguous part of an n-image evaluation split
    (the whole split when alone); the parts cover the split in rank order."""
    r, w = rank(), world_size()
    return n * r // w, n * (r + 1) // w


class _Forward(nn.Module):
    """Holds the model so that DDP sees its parameters, and runs whatever forward the step
    takes (the whole model, the head on frozen features, the trained rest on cached
    prefix outputs) inside DDP's forward, which prepares the gradient all-reduce."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return fn(*args)


class Replicated:
    """The model in DistributedDataParallel for one phase's trainable set.

    DDP registers the parameters that require grad when it is built, so a phase that
    changes the set (gradual unfreezing, lp_ft's fine-tuning) gets a new one (`for_phase`).

    find_unused_parameters stays False: with it DDP walks the autograd graph after every
    forward. Measured on every strategy (tests/test_distributed.py,
    test_every_trainable_parameter_gets_a_gradient): full, linear_probe, last_n, surgical,
    gradual and lp_ft in each phase, bitfit, lora/loha/lokr/ia3 through peft and vpt give
    every parameter that requires grad a gradient at every step; frozen parameters
    (requires_grad False) are not DDP's at all, so they need nothing. A strategy that left a
    trainable parameter unused would fail loudly at its second step (DDP's "Expected to have
    finished reduction"), not train wrongly.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self._trained: tuple[int, ...] = ()

    def for_phase(self) -> None:
        """Builds DDP again when the set of parameters that train has changed (a collective:
        every rank calls it at the same point)."""
        trained = tuple(id(p) for p in self.model.parameters() if p.requires_grad)
        if self.ddp is not None and trained == self._trained:
            return
        self.ddp = None
        self.ddp = nn.parallel.DistributedDataParallel(
            _Forward(self.model), device_ids=None, find_unused_parameters=False
        )
        self._trained = trained

    def __call__(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return self.ddp(fn, *args)

    def no_sync(self):
        """Returns the context in which backward keeps gradients local (accumulation)."""
        return self.ddp.no_sync()


def launch_command(run_dir: str | os.PathLike, devices: int) -> list[str]:
    """Returns the command that trains a run on `devices` processes of this machine:
    torchrun (python -m torch.distributed.run) --standalone, each process `python -m
    finetune_core rank RUN_DIR`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={devices}",
        "--max_restarts=0",
        "-m",
        "finetune_core",
        "rank",
        str(run_dir),
    ]


def launch_env(devices: int, outcome_file: str, device_type: str) -> dict[str, str]:
    """Returns the environment of the launched group: where rank 0 writes the outcome and,
    on a CPU, the threads per process (the cores shared out; torchrun would set 1)."""
    env = dict(os.environ)
    env[OUTCOME_ENV] = outcome_file
    if device_type != "cuda" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
    return env


def death_signal_setter() -> Callable[[], None] | None:
    """Returns a function for subprocess's preexec_fn that makes the child get SIGKILL when
    this process dies (Linux; None elsewhere). libc is loaded here, beforehand, so that the
    child between fork and exec only makes the one prctl call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    kill = int(signal.SIGKILL)

    def set_death_signal() -> None:
        prctl(1, kill)  # PR_SET_PDEATHSIG

    return set_death_signal


def die_with_parent() -> None:
    """Makes this process get SIGKILL when its parent dies (Linux): a worker killed after
    its grace period must not leave its torchrun group training and writing the run
    folder. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os.kill(os.getpid(), signal.SIGKILL)


# what gloo and NCCL say when a peer of a collective has gone
_PEER_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "socket timeout",
    "nccl communicator was aborted",
    "nccl error",
)


def peer_lost(error: BaseException) -> bool:
    """Returns True when an error says another process of the group has gone (killed or
    crashed), as opposed to a failure of this process's own."""
    if isinstance(error, getattr(dist, "DistNetworkError", ())):
        return True
    if isinstance(error, getattr(dist, "DistBackendError", ())):
        return True
    text = str(error).lower()
    return active() and any(s in text for s in _PEER_LOST)
