"""One run on several devices (issue 15): torchrun + DDP with real gloo processes on the CPU.

A 2-process run reaches a 1-process run's accuracy with the same global batch, writes one
metrics file (rank 0's) without duplicate records, stops on the worker's SIGTERM and
resumes; a killed rank ends the run as crashed, naming the rank. --devices is checked like
every flag. Every strategy gives each trainable parameter a gradient at every step, which
is why DDP runs without find_unused_parameters (distributed.Replicated).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune_core import cli, data, engine, models, store, strategies
from finetune_core.callbacks import Callback
from finetune_core.config import RunConfig
from finetune_core.data import shapes

REPO = Path(__file__).resolve().parent.parent
# small and quick: resnet18 at 32 px, no pretrained weights to build
TINY = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--seed", "0"]


@pytest.fixture(scope="module")
def shapes_folders(tmp_path_factory) -> dict[int, Path]:
    """The built-in shapes' first 100 and 40 images of each of its 6 classes, as folders."""
    root = tmp_path_factory.mktemp("shapes")
    return {n: shapes.generate("shapes", root / f"shapes{n}", per_class=n) for n in (100, 40)}


def train(runs: Path, *flags: str, timeout: float = 240) -> tuple[int, Path, str]:
    """Runs `train` in a subprocess; returns (exit code, run folder, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", *TINY, *flags, "--runs-dir", str(runs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, Path(lines[-1]) if lines else runs, proc.stderr


def start_train(runs: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_core", "train", *TINY, *flags, "--runs-dir", str(runs)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(runs: Path, step: int, timeout: float = 180) -> Path:
    """Returns the run folder once its status shows `step` steps done."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for run in runs.glob("*/status.json"):
            status = json.loads(run.read_text() or "{}")
            if (status.get("step") or 0) >= step and status.get("state") == "running":
                return run.parent
        time.sleep(0.2)
    raise AssertionError(f"no run reached step {step} in {timeout} s")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def children(pid: int) -> list[int]:
    """Returns the pids whose parent is pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rank_pid(worker_pid: int, rank: int) -> int:
    """Returns the pid of a rank of the torchrun group the worker started."""
    for agent in children(worker_pid):
        for pid in children(agent):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return pid
    raise AssertionError(f"no rank {rank} under worker {worker_pid}")


def assert_one_record_per_split_and_step(run: Path) -> None:
    keys = [(r["split"], r["step"]) for r in records(run)]
    assert len(keys) == len(set(keys)), keys
    assert [p.name for p in run.glob("metrics*")] == ["metrics.jsonl"]


# ---------------------------------------------------------------- the flag


def test_devices_below_one_or_with_the_lr_search_exits_2_naming_the_flag(tmp_path, capsys):
    runs = tmp_path / "runs"
    for flags, said in (
        (["--devices", "0"], "--devices: must be at least 1 device, got 0"),
        (["--devices", "two"], "--devices: must be a whole number, got text 'two'"),
        (["--devices", "2", "--tune-lr"], "--devices: --tune-lr searches in one process"),
        (["--devices", "2", "--device", "mps"], "--devices: --devices 2 needs CUDA GPUs"),
    ):
        assert cli.main(["train", *TINY, *flags, "--runs-dir", str(runs)]) == 2
        assert said in capsys.readouterr().err
    assert not runs.exists() or not any(runs.iterdir())


# ---------------------------------------------------------------- DDP without unused parameters

STRATEGY_CASES = [
    ("resnet18", {"strategy": "full"}),
    ("resnet18", {"strategy": "linear_probe", "augment": "none"}),
    ("resnet18", {"strategy": "linear_probe", "augment": "flip"}),
    ("resnet18", {"strategy": "last_n", "unfreeze_last": 2}),
    ("resnet18", {"strategy": "surgical", "surgical_group": 2}),
    ("resnet18", {"strategy": "gradual", "unfreeze_every": 1, "epochs": 3}),
    ("resnet18", {"strategy": "lp_ft", "probe_epochs": 1, "epochs": 2}),
    ("resnet18", {"strategy": "bitfit"}),
    ("resnet18", {"strategy": "lora"}),
    ("resnet18", {"strategy": "loha"}),
    ("resnet18", {"strategy": "lokr"}),
    ("resnet18", {"strategy": "ia3"}),
    ("resnet18", {"strategy": "full", "head": "fastai"}),
    ("vit_b_16", {"strategy": "vpt"}),
]


class _GradsOfEveryStep(Callback):
    """Notes, after every step, the parameters that require grad and got none."""

    def __init__(self):
        self.missing: list[tuple[int, str]] = []
        self.steps = 0

    def on_batch_end(self, trainer) -> None:
        self.steps += 1
        for name, p in trainer.parts.model.named_parameters():
            if p.requires_grad and p.grad is None:
                self.missing.append((trainer.step, name))


@pytest.mark.parametrize(
    "model,kw",
    STRATEGY_CASES,
    ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in STRATEGY_CASES],
)
def test_every_trainable_parameter_gets_a_gradient(model, kw):
    """What lets DDP run without find_unused_parameters: a trainable parameter without a
    gradient would make DDP fail at its next step."""
    assert {k["strategy"] for _, k in STRATEGY_CASES} == set(strategies.names())
    kw = {"epochs": 1, **kw}
    cfg = RunConfig(model=model, weights="none", image_size=32, batch_size=4, **kw)
    torch.manual_seed(0)
    parts = engine.build_model(cfg, 4)
    g = torch.Generator().manual_seed(0)

    def split(n):
        labels = torch.arange(n) % 4
        return data.TensorSplit(torch.randint(0, 255, (n, 3, 32, 32), generator=g).byte(), labels)

    exp = engine.Experiment(
        cfg,
        parts,
        data.ImageData(list("abcd"), split(8), split(4)),
        torch.device("cpu"),
        models.input_spec(model),
    )
    seen = _GradsOfEveryStep()
    engine.fit(exp, [seen])
    assert seen.steps == 2 * cfg.epochs
    assert seen.missing == []


# ---------------------------------------------------------------- 2 processes against 1


def test_two_processes_reach_one_process_accuracy_with_the_same_global_batch(
    tmp_path, shapes_folders
):
    """A linear probe (convex, so both runs converge to the same place) from the frozen
    prefix's cache, built per rank for its shard: within 3 points, one metrics file."""
    flags = ["--data", str(shapes_folders[100]), "--val-fraction", "0.3"]
    flags += ["--strategy", "linear_probe", "--augment", "none", "--epochs", "8", "--lr", "0.05"]
    code, one, _ = train(tmp_path / "one", *flags, "--batch-size", "64")
    assert code == 0
    code, two, err = train(tmp_path / "two", *flags, "--batch-size", "32", "--devices", "2")
    assert code == 0, err
    s1, s2 = store.read_summary(one), store.read_summary(two)
    assert s2["devices"] == 2 and s2["effective_batch_size"] == 64
    assert abs(s1["final_val_acc"] - s2["final_val_acc"]) <= 0.03, (s1, s2)
    assert_one_record_per_split_and_step(two)
    val = [r for r in records(two) if r["split"] == "val"]
    assert [r["step"] for r in val] == [r["step"] for r in records(one) if r["split"] == "val"]
    train_records = [r for r in records(two) if r["split"] == "train"]
    assert train_records and all(0 <= r["acc"] <= 1 for r in train_records)
    log = (two / "worker.log").read_text()
    assert "feature cache for phase" in log  # rank 0 trained from its cached prefix
    assert len((two / "predictions.csv").read_text().splitlines()) == 1 + len(
        [1 for line in (one / "predictions.csv").read_text().splitlines()[1:]]
    )  # the whole val split, gathered from both ranks


# ---------------------------------------------------------------- stop, resume, crash


def test_a_stopped_two_process_run_resumes_to_completion(tmp_path, shapes_folders):
    runs = tmp_path / "runs"
    data_flags = ["--data", str(shapes_folders[40])]
    proc = start_train(runs, *data_flags, "--epochs", "1", "--batch-size", "8", "--devices", "2")
    run = wait_for_step(runs, 3)
    os.kill(store.read_status(run)["pid"], signal.SIGTERM)  # what Stop sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    status = store.read_status(run)
    assert status["state"] == "stopped" and status["resumable"], status
    stopped_at = status["step"]
    assert (run / "checkpoints" / "last_state.pt").exists()
    out = subprocess.run(
        [sys.executable, "-m", "finetune_core", "resume", str(run), "--runs-dir", str(runs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    status = store.read_status(run)
    assert status["state"] == "completed"
    assert f"from step {stopped_at}" in (run / "worker.log").read_text()
    assert_one_record_per_split_and_step(run)
    assert store.read_summary(run)["devices"] == 2


def test_a_killed_rank_ends_the_run_as_crashed_naming_it(tmp_path, shapes_folders):
    runs = tmp_path / "runs"
    data_flags = ["--data", str(shapes_folders[40])]
    proc = start_train(runs, *data_flags, "--epochs", "3", "--batch-size", "8", "--devices", "2")
    run = wait_for_step(runs, 2)
    worker = store.read_status(run)["pid"]
    victim = rank_pid(worker, 1)
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)  # no hang: torchrun ends the other rank
    status = store.read_status(run)
    assert status["state"] == "crashed", status
    assert f"rank 1 (pid {victim}) was killed by signal 9 (SIGKILL)" in status["message"]
    assert status["resumable"]
    assert group_processes(run) == []  # none left training or writing


def group_processes(run: Path) -> list[int]:
    """Returns the pids of live processes whose command line names the run folder."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found
