"""Inputs that once got a traceback, made a run folder and then failed, or were accepted
although meaningless: each exits 2 naming the flag (or the --config file and its key) and
leaves the runs folder empty. Ranges are the fields' metadata, which the form reads too.
Weights holding NaN or infinity are refused before a run exists. `train` ends by saying which
data files it skipped as unreadable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune_core import cli, config
from finetune_core import device as finetune_device
from finetune_core.config import OPTIONS, ConfigError, RunConfig

REPO = Path(__file__).resolve().parent.parent
TINY = ["--data", "builtin:shapes", "--weights", "none", "--image-size", "32", "--epochs", "1"]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _train(*args, timeout=300):
    """Runs `train` in a real process; returns (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(OMP_NUM_THREADS="1"),
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(autouse=True)
def _no_training_in_this_process(monkeypatch):
    """An input that gets through makes its run folder, then ends here with code 99 instead of
    training in the test process (--epochs 1000000000 would train for ever)."""
    monkeypatch.setattr(cli, "_run_in_foreground", lambda run_dir: 99)


def _refused(runs: Path, code: int, err: str, flag: str, *hints: str) -> None:
    assert code == 2, err
    assert f"error: {flag}:" in err, err
    for hint in hints:
        assert hint in err, err
    assert "Traceback" not in err
    assert not runs.exists() or not any(runs.iterdir()), "a run folder was made"


# ---------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    ("args", "flag", "hints"),
    [
        (["--val-fraction", "nan"], "--val-fraction", ("0.9", "nan")),
        (["--test-fraction", "nan"], "--test-fraction", ("0.9", "nan")),
        (["--seed", str(2**32)], "--seed", ("4294967295",)),
        (["--seed", "99999999999999999999"], "--seed", ("4294967295",)),
        (["--epochs", "1000000000"], "--epochs", ("at most 10000",)),
        (["--batch-size", "100000"], "--batch-size", ("at most 4096",)),
        (["--lr", "1e-300"], "--lr", ("1e-07",)),
        (["--lr", "11"], "--lr", ("10",)),
        (["--weight-decay", "nan"], "--weight-decay", ("nan",)),
        (["--label-smoothing", "1"], "--label-smoothing", ("0.99",)),
        (["--image-size", "100000"], "--image-size", ("1024",)),
        (["--clip-grad", "inf"], "--clip-grad", ("inf",)),
        (["--warmup-epochs", "1e9"], "--warmup-epochs", ("at most 10000 epochs",)),
        (["--name", "two\nlines"], "--name", ("control characters",)),
    ],
)
def test_a_meaningless_flag_exits_2_naming_it_and_makes_no_run(tmp_path, capsys, args, flag, hints):
    runs = tmp_path / "runs"
    code = cli.main(["train", *TINY, *args, "--runs-dir", str(runs)])
    _refused(runs, code, capsys.readouterr().err, flag, *hints)


def test_an_absent_device_exits_2_saying_which_devices_there_are(tmp_path, capsys):
    here = finetune_device.available()
    absent = [d for d in ("cuda", "mps") if d not in here]
    assert absent  # no machine has both
    for device in absent:
        runs = tmp_path / device / "runs"
        code = cli.main(["train", *TINY, "--device", device, "--runs-dir", str(runs)])
        _refused(
            runs,
            code,
            capsys.readouterr().err,
            "--device",
            "devices here: " + ", ".join(["auto", *here]),
        )


def test_nan_fractions_and_a_folder_as_config_exit_2_in_a_real_process(tmp_path):
    runs = tmp_path / "runs"
    code, out, err = _train(*TINY, "--val-fraction", "nan", "--runs-dir", str(runs))
    _refused(runs, code, err, "--val-fraction")
    code, out, err = _train("--config", str(tmp_path), "--runs-dir", str(runs))
    _refused(runs, code, err, "--config", "is a folder")


# ---------------------------------------------------------------------------------------------
# --config files


@pytest.mark.parametrize(
    ("content", "hints"),
    [
        (b'\xff\xfe{"lr": 0.1}', ("not UTF-8",)),
        (b"{not json", ("not valid JSON",)),
        (b"[1, 2]", ("JSON object", "a list")),
        (b"3", ("JSON object", "a number")),
        (b'{"name": [1, 2]}', ("'name'", "must be text", "a list")),
        (b'{"name": 5}', ("'name'", "must be text")),
        (b'{"epochs": [3]}', ("'epochs'", "whole number")),
        (b'{"lr": {"head": 0.1}}', ("'lr'", "must be a number")),
        (b'{"compile": "maybe"}', ("'compile'", "true or false")),
        (b'{"seed": 1e400}', ("'seed'",)),
        (b'{"seed": ' + b"9" * 5000 + b"}", ("not usable JSON",)),
        (b"[" * 100_000, ("JSON",)),
    ],
)
def test_a_bad_config_file_exits_2_naming_the_file_and_key(tmp_path, capsys, content, hints):
    path = tmp_path / "cfg.json"
    path.write_bytes(content)
    runs = tmp_path / "runs"
    code = cli.main(["train", "--config", str(path), "--runs-dir", str(runs)])
    _refused(runs, code, capsys.readouterr().err, "--config", str(path), *hints)


def test_a_config_that_is_a_folder_exits_2(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = cli.main(["train", "--config", str(tmp_path), "--runs-dir", str(runs)])
    _refused(runs, code, capsys.readouterr().err, "--config", "is a folder")


def test_a_config_that_is_a_device_exits_2_without_reading_it(tmp_path):
    def limit_memory():  # reading /dev/zero whole would fill the memory: fail fast instead
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", "--config", "/dev/zero"]
        + ["--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=120,
        preexec_fn=limit_memory,
    )
    _refused(runs, proc.returncode, proc.stderr, "--config", "/dev/zero", "not a regular file")


def test_a_nul_byte_in_any_text_field_is_refused_naming_the_field(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"data": "/tmp/a\0b", "weights": "w\0.pt", "name": "a\0"}))
    runs = tmp_path / "runs"
    code = cli.main(["train", "--config", str(path), "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    for flag in ("--data", "--weights", "--name"):
        _refused(runs, code, err, flag, "NUL")


def test_every_field_refuses_a_json_value_of_another_type():
    for name, option in OPTIONS.items():
        wrong = [[1], {"a": 1}] + ([5] if isinstance(option.default, str) else [])
        for value in wrong:
            with pytest.raises(ConfigError) as e:
                config.from_dict({name: value})
            assert name in e.value.errors, (name, value)


def test_validation_refuses_wrong_types_in_a_config_built_in_code():
    errors = config.validate_fields(RunConfig(name=[1, 2], epochs="3", probe_epochs=None))
    assert {"name", "epochs", "probe_epochs"} <= set(errors)


def test_ranges_are_the_fields_metadata_and_validation_reads_them():
    bounds = {
        "epochs": (1, 10_000),
        "batch_size": (1, 4096),
        "lr": (1e-7, 10),
        "seed": (0, 2**32 - 1),
        "image_size": (16, 1024),
        "weight_decay": (0, 1),
        "label_smoothing": (0, 0.99),
        "val_fraction": (0, 0.9),
        "test_fraction": (0, 0.9),
        "warmup_epochs": (0, 10_000),
        "clip_grad": (0, 1000),
        "early_stop": (0, 10_000),
    }
    for name, (low, high) in bounds.items():
        option = OPTIONS[name]
        assert (option.min, option.max) == (low, high), name
        assert option.problem(low) is None and option.problem(high) is None, name
        assert not config.validate_fields(RunConfig(**{name: low})).get(name), name
        over = high + 1 if isinstance(OPTIONS[name].default, int) else high * 1.01 + 1e-9
        assert name in config.validate_fields(RunConfig(**{name: over})), name
        assert name in config.validate_fields(RunConfig(**{name: float("nan")})), name
    assert config.validate_fields(RunConfig()) == {}


# ---------------------------------------------------------------------------------------------
# Weights holding NaN or infinity


@pytest.mark.parametrize(
    ("suffix", "bad"), [(".safetensors", "all"), (".pt", "layer3.0.bn1.weight")]
)
def test_weights_holding_nan_or_infinity_are_refused_naming_file_and_tensor(
    tmp_path, capsys, suffix, bad
):
    from torchvision.models import resnet18

    state = resnet18(num_classes=3).state_dict()
    if bad == "all":
        state = {
            k: v.float().fill_(float("nan")) if v.is_floating_point() else v
            for k, v in state.items()
        }
        first = "bn1.bias"  # safetensors keeps its keys sorted
    else:
        state[bad][0] = float("inf")
        first = bad
    path = tmp_path / f"nan{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    runs = tmp_path / "runs"
    args = ["train", *TINY[:2], "--weights", str(path), *TINY[4:], "--runs-dir", str(runs)]
    code = cli.main(args)
    _refused(runs, code, capsys.readouterr().err, "--weights", str(path), repr(first), "NaN")


# ---------------------------------------------------------------------------------------------
# Skipped files


def test_train_ends_by_naming_the_files_it_skipped(tmp_path):
    data = tmp_path / "pics"
    for k, cls in enumerate(("red", "blue")):
        (data / cls).mkdir(parents=True)
        for i in range(10):
            colour = (200, 30 + 10 * i, 30) if k == 0 else (30, 30 + 10 * i, 200)
            Image.new("RGB", (16, 16), colour).save(data / cls / f"{i}.png")
        for i in range(6):
            (data / cls / f"broken{i}.png").write_bytes(b"not an image")
    runs = tmp_path / "runs"
    code, out, err = _train(
        "--data", str(data), *TINY[2:], "--batch-size", "8", "--runs-dir", str(runs), "--seed", "1"
    )
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])  # the contract: the run folder comes last
    assert run_dir.parent == runs.resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["skipped_files"]) == 12
    assert "warning: 12 unreadable data files were skipped" in err
    assert "and 2 more" in err and "summary.json" in err
    shown = [name for name in summary["skipped_files"] if name in err]
    assert len(shown) == 10


def test_train_says_when_a_split_lacks_a_class(tmp_path):
    data = tmp_path / "pics"
    for split, classes in (("train", ("red", "blue")), ("val", ("red",))):
        for cls in classes:
            (data / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (16, 16), cls).save(data / split / cls / f"{i}.png")
    runs = tmp_path / "runs"
    code, out, err = _train("--data", str(data), *TINY[2:], "--runs-dir", str(runs))
    assert code == 0, err
    assert "warning: " in err and "val/ has no images of 1 class that train/ has ('blue')" in err
    run_dir = Path(out.strip().splitlines()[-1])
    assert "has no images of 1 class" in (run_dir / "worker.log").read_text()
