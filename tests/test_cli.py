"""The command line: bad input exits 2 before any run folder exists; `train` writes the whole
run directory contract; two processes with one seed write the same metrics; SIGTERM stops
with a checkpoint and `resume` finishes the run."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_runs import tiny_flags

from finetune_core import cli, config, runner, store

REPO = Path(__file__).resolve().parent.parent
TINY = tiny_flags(seed=3)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _cli(*args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "finetune_core", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env or _env(),
        **kwargs,
    )


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("args", "flag", "hint"),
    [
        (["--lr", "nan"], "--lr", "positive finite"),
        (["--lr", "-1"], "--lr", "positive"),
        (["--lr", "0"], "--lr", "positive"),
        (["--lr", "abc"], "--lr", "abc"),
        (["--epochs", "0"], "--epochs", "at least 1"),
        (["--batch-size", "-4"], "--batch-size", "at least 1"),
        (["--model", "resnet19"], "--model", "resnet18"),
        (["--strategy", "ful"], "--strategy", "full"),
        (["--strategy", "last_n", "--unfreeze-last", "99"], "--unfreeze-last", "groups"),
        (["--model", "alexnet", "--image-size", "32"], "--image-size", "alexnet"),
        (["--data", "/no/such/folder"], "--data", "/no/such/folder"),
    ],
)
def test_train_rejects_bad_input_naming_the_flag_and_creates_no_run(
    tmp_path, capsys, args, flag, hint
):
    runs = tmp_path / "runs"
    code = cli.main(["train", *TINY, *args, "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {flag}:" in err
    assert hint in err
    assert "Traceback" not in err
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize(
    ("text", "hint"),
    [("{not json", "not valid JSON"), ('{"lr": 0.1, "learning_rate": 1}', "learning_rate")],
)
def test_train_rejects_a_bad_config_file_naming_the_file(tmp_path, capsys, text, hint):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    runs = tmp_path / "runs"
    code = cli.main(["train", "--config", str(path), "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: --config:" in err and str(path) in err and hint in err
    assert not runs.exists()


def test_train_warns_when_the_weight_ema_would_stay_at_the_start_and_trains_anyway(
    tmp_path, capsys
):
    runs = tmp_path / "runs"
    flags = ["--strategy", "linear_probe", "--model-ema", "--runs-dir", str(runs)]
    code = cli.main(["train", *TINY, *flags])  # torchvision's EMA defaults, 1 epoch
    err = capsys.readouterr().err
    found = re.search(
        r"warning: --model-ema: \d+ updates of 0\.\d+ in this run leave (\d+)% of the EMA "
        r"weights it scores and saves as best where training started; try "
        r"--model-ema-steps 1 --model-ema-decay (0\.\d+), or more --epochs",
        err,
    )
    assert code == 0 and found and int(found[1]) > 90, err
    decay = ["--model-ema-steps", "1", "--model-ema-decay", found[2]]
    code = cli.main(["train", *TINY, *flags, *decay])  # what it proposed: no warning
    assert code == 0 and "warning: --model-ema" not in capsys.readouterr().err


def test_bad_input_in_a_real_process_exits_2_without_traceback(tmp_path):
    runs = tmp_path / "runs"
    code, out, err = _finish(_cli("train", *TINY, "--lr", "inf", "--runs-dir", str(runs)))
    assert code == 2, err
    assert "--lr" in err and "Traceback" not in err
    assert not runs.exists()


def test_config_file_gives_defaults_and_flags_override(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"lr": 0.5, "epochs": 7, "image-size": 48, "freeze_bn": True}))
    args = cli.build_parser().parse_args(
        ["train", "--config", str(path), "--epochs", "2", "--no-freeze-bn"]
    )
    cfg = cli.config_from_args(args)
    assert (cfg.lr, cfg.epochs, cfg.image_size, cfg.freeze_bn) == (0.5, 2, 48, False)


def test_every_config_field_is_a_train_flag():
    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    from finetune_core.config import FIELD_NAMES

    for name in FIELD_NAMES:
        if name != "group":
            assert cli.flag(name) in text


# ---------------------------------------------------------------------------------------------
# Real runs (a few, each about 10-20 s on 2 cores)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two separate processes train the same config and seed, side by side on one core each."""
    runs = tmp_path_factory.mktemp("cli") / "runs"
    env = _env(OMP_NUM_THREADS="1")
    procs = [_cli("train", *TINY, "--runs-dir", str(runs), env=env) for _ in range(2)]
    return runs, [_finish(p) for p in procs]


def test_train_completes_and_writes_the_whole_run_contract(two_runs):
    runs, results = two_runs
    code, out, err = results[0]
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    assert run_dir.is_absolute() and run_dir.parent == runs.resolve()
    assert store.RUN_ID_RE.match(run_dir.name)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "resnet18" and config["image_size"] == 32
    assert "env" in config and "group" in config
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed"
    assert status["step"] == status["total_steps"] > 0
    for key in ("pid", "pid_started_at", "started_at", "updated_at", "epoch", "message"):
        assert key in status
    metrics = store.read_metrics(run_dir)
    assert {"train", "val"} <= set(metrics["split"])
    val = metrics[metrics["split"] == "val"].iloc[-1]
    assert val["epoch"] == 1 and 0 <= val["acc"] <= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in store.SUMMARY_KEYS:
        assert key in summary
    assert summary["state"] == "completed"
    assert set(summary["per_class_acc"]) == set(summary["classes"])
    assert len(summary["confusion_matrix"]) == len(summary["classes"])
    # every val image's prediction by the best weights, and the interval they give
    preds = pd.read_csv(run_dir / "predictions.csv")
    assert list(preds.columns) == ["split", "index", "true", "pred", "confidence"]
    val_preds = preds[preds["split"] == "val"]
    assert (val_preds["true"] == val_preds["pred"]).mean() == pytest.approx(summary["best_val_acc"])
    assert val_preds["confidence"].between(0, 1).all()
    lo, hi = summary["best_val_acc_ci"]
    assert 0 <= lo <= summary["best_val_acc"] <= hi <= 1 and hi - lo > 0
    # what using the run needs; nothing resumes a completed run, so no resume point is kept
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["best.safetensors"]
    assert "completed" in (run_dir / "worker.log").read_text()
    assert "epoch 1/1" in err  # the progress bar


def test_two_processes_with_one_seed_write_identical_metrics(two_runs):
    _, results = two_runs
    frames = []
    for code, out, err in results:
        assert code == 0, err
        run_dir = Path(out.strip().splitlines()[-1])
        frames.append(store.read_metrics(run_dir).drop(columns=["time_s", "images_per_s"]))
    a, b = frames
    evals = [f[f["split"] != "train"].reset_index(drop=True) for f in frames]
    assert len(evals[0]) == 1 and evals[0].equals(evals[1]), f"\n{evals[0]}\n{evals[1]}"
    # Train records are batched every 10 steps *and* at least 0.5 s, so on a very fast
    # machine their steps may differ; records over the same steps must be identical.
    windows = []
    for frame in frames:
        train = frame[frame["split"] == "train"].copy()
        train["since"] = train["step"].shift(fill_value=0)
        windows.append(train.set_index(["since", "step"]))
    common = windows[0].index.intersection(windows[1].index)
    assert windows[0].loc[common].equals(windows[1].loc[common])
    if len(common) == len(windows[0]) == len(windows[1]):
        assert a.equals(b), f"\n{a}\n{b}"


def test_list_show_and_compare_read_the_store(two_runs, capsys):
    runs, results = two_runs
    dirs = [Path(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert cli.main(["list", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert all(d.name in out for d in dirs) and "completed" in out
    assert cli.main(["show", dirs[0].name[:-2], "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert '"state": "completed"' in out and "layer4" in out  # the plan's groups
    assert cli.main(["compare", str(dirs[0]), dirs[1].name, "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "best_val_acc" in out and dirs[1].name in out
    assert cli.main(["stop", dirs[0].name, "--runs-dir", str(runs)]) == 1
    assert cli.main(["show", "nope", "--runs-dir", str(runs)]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_models_lists_the_registry_with_parameter_counts(capsys):
    assert cli.main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resnet18 "))
    assert "11.7M" in line


def test_stop_sends_sigterm_the_run_saves_a_checkpoint_and_resume_finishes(tmp_path):
    runs = tmp_path / "runs"
    args = ["--epochs", "2", "--strategy", "last_n", "--unfreeze-last", "1", "--name", "stop-me"]
    proc = _cli("train", *TINY, *args, "--runs-dir", str(runs))
    deadline = time.time() + 240
    run_dir = None
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in runs.glob("*/status.json")] if runs.exists() else []
        if found:
            run_dir = found[0].parent
            if store.read_metrics(run_dir)["split"].eq("train").any():
                break  # at least one train record, well before the end of epoch 2
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be stopped"
    stop = _cli("stop", run_dir.name, "--runs-dir", str(runs))
    assert _finish(stop)[0] == 0  # `stop` sends SIGTERM to the worker: here, the train process
    code, out, err = _finish(proc)
    assert code == 130, err
    assert out.strip().splitlines()[-1] == str(run_dir.resolve())
    status = store.read_status(run_dir)
    assert status["state"] == "stopped"
    assert f"step {status['step']};" in status["message"]
    import torch

    checkpoint = torch.load(run_dir / "checkpoints" / "last_state.pt", weights_only=True)
    assert checkpoint["step"] == status["step"] > 0  # the status tells where resume starts
    assert (run_dir / "checkpoints" / "last_state.pt").is_file()
    assert store.read_summary(run_dir)["state"] == "stopped"
    before = store.read_metrics(run_dir)
    assert before["split"].eq("train").any()

    code, out, err = _finish(_cli("resume", run_dir.name, "--runs-dir", str(runs)))
    assert code == 0, err
    assert store.read_status(run_dir)["state"] == "completed"
    after = store.read_metrics(run_dir)
    assert not after.duplicated(["split", "step"]).any()
    assert after["step"].is_monotonic_increasing
    assert after["split"].eq("val").sum() == 2
    first = before.iloc[0]
    assert after.iloc[0]["step"] == first["step"] and after.iloc[0]["loss"] == first["loss"]
    raw = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drift = [r["epoch"] for r in raw if r.get("split") == store.DRIFT_SPLIT]
    assert drift == [1, 2]  # one weight-drift record per epoch, none repeated by the resume
    assert len(raw) - len(drift) == len(after)  # the file itself holds no duplicates either


def test_a_run_that_fails_exits_1_with_the_message_in_status_summary_and_log(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for i in range(10):
            if cls == "cat":
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(data / cls / f"{i}.png")
            else:
                (data / cls / f"{i}.png").write_bytes(b"not an image")  # all unreadable
    runs = tmp_path / "runs"
    args = ["train", "--data", str(data), "--weights", "none", "--image-size", "32"]
    code = cli.main([*args, "--runs-dir", str(runs)])
    out, err = capsys.readouterr()
    assert code == 1, err
    run_dir = Path(out.strip().splitlines()[-1])
    status = store.read_status(run_dir)
    assert status["state"] == "failed" and "dog" in status["message"]
    assert f"error: run failed: {status['message']}" in err
    summary = store.read_summary(run_dir)
    assert summary["state"] == "failed" and summary["message"] == status["message"]
    assert "Traceback" in (run_dir / "worker.log").read_text()


def test_list_show_and_compare_open_runs_written_before_format_versions(tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(REPO / "tests" / "fixtures" / "runs_v1", runs)
    ids = sorted(p.name for p in runs.iterdir())
    assert cli.main(["list", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and "last_n 1" in out
    assert cli.main(["show", ids[0], "--runs-dir", str(runs)]) == 0
    assert '"state": "completed"' in capsys.readouterr().out
    assert cli.main(["compare", *ids, "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids)


def test_a_run_that_fails_on_its_input_is_not_offered_a_resume_that_would_fail_again(
    tmp_path, capsys
):
    runs = tmp_path / "runs"
    code = cli.main(["train", *TINY, "--weights", "run:nope", "--runs-dir", str(runs)])
    assert code == 2  # caught before a run folder exists
    missing = tmp_path / "gone.safetensors"
    (run_dir,) = [store.create_run(config.RunConfig(weights=str(missing)), runs)]
    from finetune_core import worker

    assert worker.run_worker(run_dir) == runner.EXIT_FAILED
    status = store.read_status(run_dir)
    assert status["state"] == "failed" and status["resumable"] is False
    capsys.readouterr()
    assert cli.main(["resume", run_dir.name, "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "would fail the same way" in err and "clone" in err


def test_a_linear_probe_keeps_only_its_head_and_names_its_backbone(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from finetune_core import checkpoints, weights

    runs = tmp_path / "runs"
    args = ["train", *TINY, "--strategy", "linear_probe", "--runs-dir", str(runs)]
    assert cli.main(args) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    best = run_dir / "checkpoints" / "best.safetensors"
    assert sorted(load_file(str(best))) == ["fc.bias", "fc.weight"]
    assert best.stat().st_size < 100_000  # not the 45 MB backbone again
    ref = checkpoints.reference(best)
    assert ref["weights"] == "none" and ref["seed"] == 3 and len(ref["sha256"]) == 64
    # as the weights of a new run: the head on the backbone it names, for the same classes
    state = weights.load_backbone_state(
        f"run:{run_dir.name}", "resnet18", num_classes=6, runs_dir=runs
    )
    assert torch.equal(state["fc.weight"], load_file(str(best))["fc.weight"])
    assert len(state) > 100  # the whole model
    # a backbone that is not the one it trained on is refused, never used silently
    save_file(
        load_file(str(best)),
        str(best),
        metadata={"model": "resnet18", "backbone": json.dumps({**ref, "sha256": "0" * 64})},
    )
    with pytest.raises(weights.WeightsError, match="backbone is now another one"):
        weights.load_backbone_state(f"run:{run_dir.name}", "resnet18", num_classes=6, runs_dir=runs)
