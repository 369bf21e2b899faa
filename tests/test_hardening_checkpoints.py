"""Hardening: a checkpoint is one atomic unit (kill -9 between its weights and its state, and
the resumed run ends where an uninterrupted one does); run folders from before still resume; a
pair that does not belong together is refused; a refused pickle says so without torch's advice
to load it anyway, also with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_engine import Log, experiment
from tiny_runs import tiny_flags

from finetune_core import engine, store, weights
from finetune_core.weights import WeightsError

REPO = Path(__file__).resolve().parent.parent
TINY = tiny_flags(
    epochs=2,
    augment="crop",  # random crops: a resume that restores the wrong RNG state shows
    seed=5,
    strategy="last_n",  # layer4 and the head train: half the cost of full, the same checkpoint
    unfreeze_last=1,
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_TEST_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _cli(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_core", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env or _env(),
        start_new_session=True,  # killpg reaches the whole run, as kill -9 on a server would
    )


def _only_run(runs: Path) -> Path | None:
    found = list(runs.glob("*/status.json")) if runs.exists() else []
    return found[0].parent if found else None


def _wait_for(predicate, proc, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            tail = err[-1500:]
            raise AssertionError(
                f"{what}: the process ended first (exit {proc.returncode})\n{tail}"
            )
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def _evals(run_dir: Path):
    frame = store.read_metrics(run_dir)
    frame = frame[frame["split"] != "train"]
    return frame[["split", "epoch", "step", "loss", "acc"]].reset_index(drop=True)


def test_a_kill_between_the_checkpoint_files_resumes_to_the_metrics_of_an_uninterrupted_run(
    tmp_path,
):
    straight_runs, killed_runs = tmp_path / "straight", tmp_path / "killed"
    straight = _cli("train", *TINY, "--runs-dir", str(straight_runs))

    def total_steps():
        run = _only_run(straight_runs)
        return run and store.read_status(run).get("total_steps")

    total = _wait_for(total_steps, straight, 240, "the uninterrupted run's step count")
    # The writer sleeps between the weights and the state of the last checkpoint (epoch 2's
    # end, before its val record): the widest version of a kill between the two files.
    pause = {
        "FINETUNE_TEST_CHECKPOINT_PAUSE_S": "600",
        "FINETUNE_TEST_CHECKPOINT_PAUSE_STEP": str(total),
    }
    killed = _cli("train", *TINY, "--runs-dir", str(killed_runs), env=_env(**pause))

    def paused():
        run = _only_run(killed_runs)
        marker = run / "checkpoints" / "test-pause.json" if run else None
        return marker and marker.exists() and json.loads(marker.read_text())["step"] == total

    try:
        _wait_for(paused, killed, 240, f"the checkpoint writer never paused at step {total}")
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate()
    run_dir = _only_run(killed_runs)
    assert killed.returncode == -signal.SIGKILL
    assert store.read_status(run_dir)["state"] in ("running", "crashed")  # nothing final
    # killed with the epoch-2 weights written and the epoch-1 state still committed
    state = torch.load(run_dir / "checkpoints" / "last_state.pt", weights_only=True)
    assert state["step"] == total // 2

    resume = _cli("resume", run_dir.name, "--runs-dir", str(killed_runs))
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    expected = _only_run(straight_runs)
    assert store.read_status(run_dir)["state"] == "completed"
    assert f"starts run {run_dir.name} (resume)" in (run_dir / "worker.log").read_text()
    got, want = _evals(run_dir), _evals(expected)
    assert got[["split", "epoch", "step", "acc"]].equals(want[["split", "epoch", "step", "acc"]]), (
        f"resumed:\n{got}\nuninterrupted:\n{want}"
    )
    assert got["loss"].tolist() == pytest.approx(want["loss"].tolist(), rel=1e-6)
    for key in ("best_val_acc", "final_val_acc", "best_epoch"):
        assert store.read_summary(run_dir)[key] == store.read_summary(expected)[key], key


class StopAt(engine.Callback):
    def __init__(self, step):
        self.step = step

    def on_batch_end(self, trainer):
        if trainer.step == self.step:
            raise engine.StopTraining


def _stopped_run(ckpt: Path, step: int) -> None:
    cfg = dict(strategy="full", epochs=2, augment="crop")
    summary = engine.fit(experiment(**cfg), [StopAt(step)], checkpoint_dir=ckpt)
    assert summary["state"] == "stopped"


def test_a_run_folder_from_before_the_atomic_checkpoints_still_resumes(tmp_path):
    straight = Log()
    engine.fit(experiment(strategy="full", epochs=2, augment="crop"), [straight])
    ckpt = tmp_path / "checkpoints"
    _stopped_run(ckpt, 4)
    # rewrite the resume point as runs wrote it before: last.safetensors without a step
    # beside a last_state.pt that names no weights file
    state = torch.load(ckpt / "last_state.pt", weights_only=True)
    slot = ckpt / state.pop("weights", "last.safetensors")
    with safe_open(str(slot), framework="pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k != "step"}
    tensors = load_file(str(slot))
    slot.unlink()
    save_file(tensors, str(ckpt / "last.safetensors"), metadata=metadata)
    torch.save(state, ckpt / "last_state.pt")

    resumed = Log()
    summary = engine.fit(
        experiment(strategy="full", epochs=2, augment="crop"),
        [resumed],
        checkpoint_dir=ckpt,
        resume=True,
    )
    assert summary["state"] == "completed"
    assert [r["step"] for r in resumed.val] == [6]
    assert not (ckpt / "last.safetensors").exists()  # the first save replaced the old layout
    assert resumed.val[-1]["loss"] == pytest.approx(straight.val[-1]["loss"], rel=1e-4)


def test_a_resume_point_whose_weights_and_state_are_of_other_steps_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _stopped_run(ckpt, 4)
    state = torch.load(ckpt / "last_state.pt", weights_only=True)
    assert state["step"] == 4
    # the weights file the state names, re-saved as if it came from step 3
    slot = ckpt / state.get("weights", "last.safetensors")
    with safe_open(str(slot), framework="pt") as f:
        metadata = {**(f.metadata() or {}), "step": "3"}
    save_file(load_file(str(slot)), str(slot), metadata=metadata)
    with pytest.raises(engine.TrainingFailed, match=r"step 3 .* step 4: they do not belong"):
        engine.fit(
            experiment(strategy="full", epochs=2, augment="crop"), checkpoint_dir=ckpt, resume=True
        )


# --- refused pickles --------------------------------------------------------------------------
TORCH_ADVICE = ("weights_only=False", "set to `False`", "safe_globals", "trust")


def _evil_pickles(folder: Path, marker: Path) -> dict[str, Path]:
    """Returns .pt files that run code or hold Python objects when unpickled without
    weights_only: a protocol-0 pickle calling os.system, torch.save of an object whose
    __reduce__ calls os.system, and a checkpoint holding a datetime."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["os.system"] = folder / "legacy.pt"
    files["os.system"].write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files["posix.system"] = folder / "reduce.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, files["posix.system"])
    files["datetime"] = folder / "datetime.pth"
    torch.save(
        {"model": {"w": torch.zeros(1)}, "at": datetime.datetime(2024, 1, 1)}, files["datetime"]
    )
    return files


def _assert_refused(msg: str, path: Path, what: str) -> None:
    assert f"{path} was refused: the file holds Python objects" in msg, msg
    assert what in msg, msg
    for advice in TORCH_ADVICE:
        assert advice not in msg, f"torch's advice {advice!r} repeated: {msg}"


@pytest.mark.parametrize("force_no_weights_only", [False, True])
def test_a_refused_pickle_says_it_holds_python_objects_and_never_advises_loading_it_anyway(
    tmp_path, monkeypatch, force_no_weights_only
):
    if force_no_weights_only:  # torch reads it at every torch.load
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code-ran"
    for what, path in _evil_pickles(tmp_path, marker).items():
        with pytest.raises(WeightsError) as e:
            weights.load_backbone_state(str(path), "resnet18", num_classes=4)
        _assert_refused(str(e.value), path, what)
    assert not marker.exists(), "the file's code ran"


def test_the_cli_refuses_a_code_running_pickle_with_torch_force_no_weights_only_load(tmp_path):
    marker = tmp_path / "code-ran"
    path = _evil_pickles(tmp_path / "files", marker)["os.system"]
    runs = tmp_path / "runs"
    args = [a if a != "none" else str(path) for a in TINY]
    proc = _cli(
        "train", *args, "--runs-dir", str(runs), env=_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    )
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    assert "error: --weights: " in err
    _assert_refused(err, path, "os.system")
    assert not marker.exists(), "the file's code ran"
    assert not runs.exists() or not list(runs.iterdir())  # refused before a run folder
