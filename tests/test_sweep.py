"""`sweep`: a comparison from the command line, queued as one group through the real
supervisor, visible in the dashboard like a group launched from New run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_core import cli
from finetune_core.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = ["--data", "builtin:shapes", "--weights", "none", "--image-size", "32", "--epochs", "1"]
TINY += ["--same-lr"]  # the lr search has its own tests (test_tuning.py)


def _sweep(*args, timeout=600):
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", "sweep", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_depths_are_every_last_n_below_all_groups_plus_full():
    specs = cli.sweep_specs(None, True, "resnet18")  # stem, layer1 .. layer4 minus one
    assert specs[0] == {"strategy": "last_n", "unfreeze_last": 0}
    assert specs[-1] == {"strategy": "full"}
    assert [s.get("unfreeze_last") for s in specs[:-1]] == list(range(len(specs) - 1))
    assert cli.sweep_specs("full,last_n:2,linear_probe", False, "resnet18") == [
        {"strategy": "full"},
        {"strategy": "last_n", "unfreeze_last": 2},
        {"strategy": "linear_probe"},
    ]
    for bad in ("nope", "full:3", "last_n:two"):
        with pytest.raises(ConfigError) as e:
            cli.sweep_specs(bad, False, "resnet18")
        assert "--strategies" in e.value.errors


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--strategies", "full,nope"], "--strategies"),
        (["--seeds", "9"], "--seeds"),
        (["--depths", "--strategies", "full"], "--strategies"),
        (["--epochs", "0"], "--epochs"),
    ],
)
def test_a_bad_sweep_exits_2_naming_the_flag_and_queues_nothing(tmp_path, args, flag):
    runs = tmp_path / "runs"
    code, out, err = _sweep(*TINY, *args, "--runs-dir", str(runs))
    assert code == 2, err
    assert f"error: {flag}:" in err and "Traceback" not in err
    assert not runs.exists() or not any(p for p in runs.iterdir() if not p.name.startswith("."))


def test_a_sweep_queues_one_group_waits_for_it_and_prints_its_id_last(tmp_path):
    runs = tmp_path / "runs"
    code, out, err = _sweep(
        *TINY, "--strategies", "full,linear_probe", "--seeds", "2", "--runs-dir", str(runs)
    )
    assert code == 0, err
    group = out.strip().splitlines()[-1]
    members = [p for p in runs.iterdir() if (p / "config.json").is_file()]
    configs = [json.loads((p / "config.json").read_text()) for p in members]
    assert {c["group"] for c in configs} == {group}
    assert sorted((c["strategy"], c["seed"]) for c in configs) == [
        ("full", 0),
        ("full", 1),
        ("linear_probe", 0),
        ("linear_probe", 1),
    ]
    states = {json.loads((p / "status.json").read_text())["state"] for p in members}
    assert states == {"completed"}
    assert "4/4 done" in err and "linear_probe seed 1" in err


def _cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _state(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def test_cancel_group_takes_every_queued_run_of_the_group_off_the_queue(tmp_path):
    from finetune_core import store
    from finetune_core.config import RunConfig

    runs = tmp_path / "runs"
    tiny = dict(data="builtin:shapes", weights="none", image_size=32, epochs=1)
    group = [store.create_run(RunConfig(**tiny), runs, group="g-1") for _ in range(3)]
    other = store.create_run(RunConfig(**tiny), runs, group="g-2")
    code, out, err = _cli("cancel", "--group", "g-1", "--runs-dir", str(runs))
    assert code == 0, err
    assert all(_state(d)["state"] == "stopped" and _state(d)["cancelled"] for d in group)
    assert _state(other)["state"] == "queued"  # another group: untouched
    assert "3 of 3 runs cancelled" in out
    code, _, err = _cli("stop", "--group", "nope", "--runs-dir", str(runs))
    assert code == 2 and "error: --group: no run of group 'nope'" in err


def test_stop_group_stops_the_running_member_and_cancels_the_queued_ones(tmp_path):
    import time

    from finetune_core import runner
    from finetune_core.config import RunConfig

    runs = tmp_path / "runs"
    long = dict(data="builtin:shapes", weights="none", image_size=32, epochs=50)
    members = runner.enqueue([RunConfig(**long) for _ in range(3)], runs, group="g-1")
    deadline = time.time() + 180
    while _state(members[0])["state"] != "running" or not _state(members[0]).get("step"):
        assert time.time() < deadline, _state(members[0])
        time.sleep(0.5)
    code, out, err = _cli("stop", "--group", "g-1", "--runs-dir", str(runs))
    assert code == 0, err
    deadline = time.time() + 180
    while _state(members[0])["state"] == "running":
        assert time.time() < deadline, _state(members[0])
        time.sleep(0.5)
    first = _state(members[0])
    assert first["state"] == "stopped" and not first.get("cancelled")  # with a checkpoint
    assert (members[0] / "checkpoints" / "last_state.pt").exists()
    for d in members[1:]:
        assert _state(d)["state"] == "stopped" and _state(d)["cancelled"]
