"""The run directory contract: atomic files, tolerant metrics readers, crash detection, listing."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from finetune_core import store
from finetune_core.config import FIELD_NAMES, RunConfig
from finetune_core.util import files
from finetune_core.util.processes import process_alive, process_start_time


def _run(tmp_path, **fields):
    return store.create_run(RunConfig(**fields), tmp_path / "runs")


def _records(*items):
    keys = ("split", "epoch", "step", "loss", "acc")
    return [dict(zip(keys, item, strict=True)) for item in items]


def _write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_run_id_is_timestamp_and_six_hex_digits():
    ids = {store.new_run_id() for _ in range(50)}
    assert all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", i) for i in ids)
    assert len(ids) == 50


def test_create_run_writes_config_with_group_and_env_and_queued_status(tmp_path):
    run_dir = store.create_run(RunConfig(name="a"), tmp_path / "runs", group="g1")
    assert store.RUN_ID_RE.match(run_dir.name)
    config = json.loads((run_dir / "config.json").read_text())
    assert set(config) == set(FIELD_NAMES) | {"env", "schema"}
    assert config["group"] == "g1" and config["name"] == "a"
    assert set(config["env"]) == {"torch", "torchvision", "python", "device"}
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "queued"
    for key in ("pid", "pid_started_at", "started_at", "updated_at", "epoch", "step"):
        assert key in status
    assert status["created_at"] <= time.time()
    assert store.run_config(run_dir) == RunConfig(name="a", group="g1")


def test_create_run_makes_relative_data_paths_absolute(tmp_path, monkeypatch):
    (tmp_path / "mydata").mkdir()
    monkeypatch.chdir(tmp_path)
    run_dir = store.create_run(RunConfig(data="mydata"), tmp_path / "runs")
    assert store.read_config(run_dir)["data"] == str(tmp_path / "mydata")


def test_atomic_json_write_keeps_the_old_file_when_replacing_fails(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    files.write_json_atomic(path, {"state": "queued"})

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        files.write_json_atomic(path, {"state": "running"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"state": "queued"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left


def test_write_status_merges_fields_and_sets_updated_at(tmp_path):
    run_dir = _run(tmp_path)
    before = store.read_status(run_dir)
    time.sleep(0.01)
    after = store.write_status(run_dir, epoch=2, message="hi")
    assert after["epoch"] == 2 and after["message"] == "hi"
    assert after["created_at"] == before["created_at"]
    assert after["updated_at"] > before["updated_at"]
    assert store.read_status(run_dir) == after


def test_json_writes_turn_nan_into_null(tmp_path):
    files.write_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5]}


def test_read_metrics_tolerates_a_torn_last_line(tmp_path):
    _write_lines(
        tmp_path / "metrics.jsonl",
        _records(("train", 1, 10, 2.0, 0.1), ("val", 1, 12, 1.5, 0.3)),
        tail='{"split": "train", "epoch": 2, "st',
    )
    frame = store.read_metrics(tmp_path)
    assert frame["step"].tolist() == [10, 12]
    assert frame["split"].tolist() == ["train", "val"]


def test_read_metrics_keeps_the_last_record_per_split_and_step_after_a_resume(tmp_path):
    first = _records(
        ("train", 1, 10, 2.0, 0.1),
        ("val", 1, 12, 1.9, 0.2),
        ("train", 2, 20, 1.8, 0.3),
        ("train", 2, 24, 1.7, 0.4),
    )
    # The dead attempt's line was torn; the resumed worker continues from step 12.
    resumed = _records(
        ("train", 2, 20, 1.0, 0.5), ("train", 2, 24, 0.9, 0.6), ("val", 2, 24, 0.8, 0.7)
    )
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, first, tail='{"split": "tr')
    with open(path, "a") as f:
        f.write("\n" + "".join(json.dumps(r) + "\n" for r in resumed))
    frame = store.read_metrics(tmp_path)
    assert list(zip(frame["split"], frame["step"], strict=True)) == [
        ("train", 10),
        ("val", 12),
        ("train", 20),
        ("train", 24),
        ("val", 24),
    ]
    assert not frame.duplicated(["split", "step"]).any()
    assert frame.loc[frame["split"] == "train", "loss"].tolist() == [2.0, 1.0, 0.9]


def test_read_metrics_drops_stale_records_the_resumed_run_did_not_repeat(tmp_path):
    records = _records(
        ("train", 1, 10, 2.0, 0.1),
        ("train", 1, 15, 1.9, 0.1),  # after the checkpoint at step 10: the dead attempt
        ("train", 1, 13, 1.5, 0.2),  # resumed from step 10, logs at 13 then 16
        ("train", 1, 16, 1.4, 0.2),
    )
    _write_lines(tmp_path / "metrics.jsonl", records)
    assert store.read_metrics(tmp_path)["step"].tolist() == [10, 13, 16]


def test_read_metrics_types_columns_and_is_empty_without_a_file(tmp_path):
    empty = store.read_metrics(tmp_path)
    assert empty.empty
    assert list(empty.columns)[:10] == list(store.METRIC_COLUMNS)
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps(
            {
                "split": "val",
                "epoch": 1,
                "step": 3,
                "loss": 1,
                "acc": 0.5,
                "acc5": None,
                "phase": "x",
            }
        )
        + "\n"
    )
    frame = store.read_metrics(tmp_path)
    assert frame["step"].dtype == "Int64" and frame["loss"].dtype == "float64"
    assert pd.isna(frame.loc[0, "acc5"]) and frame.loc[0, "phase"] == "x"


def test_metrics_writer_appends_flushed_records_and_trims_the_dead_attempt_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(
        path,
        _records(("train", 1, 10, 2.0, 0.1), ("val", 1, 12, 1.9, 0.2), ("train", 2, 20, 1.8, 0.3)),
        tail='{"split": "tra',
    )
    writer = store.MetricsWriter(tmp_path)
    writer.on_fit_start(SimpleNamespace(step=12))  # resumed from the checkpoint at step 12
    writer.on_train_record(None, {"split": "train", "epoch": 2, "step": 22, "loss": 1.0})
    # flushed: another process reads it while the writer is still open
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 12, 22]
    writer.on_eval_record(None, {"split": "val", "epoch": 2, "step": 24, "loss": 0.9, "acc": 0.6})
    writer.on_fit_end(None, {})
    assert store.read_metrics(tmp_path)["step"].tolist() == [10, 12, 22, 24]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _mark_running(run_dir, pid, started_at):
    store.write_status(run_dir, state="running", pid=pid, pid_started_at=started_at)


def test_read_status_shows_a_run_whose_worker_is_gone_as_crashed_and_record_crash_saves_it(
    tmp_path,
):
    run_dir = _run(tmp_path)
    _mark_running(run_dir, _dead_pid(), 1.0)
    status = store.read_status(run_dir)
    assert status["state"] == "crashed" and status["derived"] is True
    assert status["message"] == store.CRASHED_MESSAGE
    # readers never write: the file keeps what its writer said until someone records it
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    assert store.record_crash(run_dir)["state"] == "crashed"
    recorded = json.loads((run_dir / "status.json").read_text())
    assert recorded["state"] == "crashed" and "derived" not in recorded
    assert store.record_crash(run_dir) is None  # recorded once


def test_read_status_marks_a_reused_pid_as_crashed(tmp_path):
    run_dir = _run(tmp_path)
    me = os.getpid()
    _mark_running(run_dir, me, process_start_time(me))
    assert store.read_status(run_dir)["state"] == "running"  # the live worker itself
    _mark_running(run_dir, me, process_start_time(me) - 1000)  # same pid, other process
    assert store.read_status(run_dir)["state"] == "crashed"


def test_read_status_marks_an_unreaped_killed_worker_as_crashed(tmp_path):
    run_dir = _run(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _mark_running(run_dir, proc.pid, process_start_time(proc.pid))
        assert store.read_status(run_dir)["state"] == "running"
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while process_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert store.read_status(run_dir)["state"] == "crashed"  # a zombie is not alive
    finally:
        proc.kill()
        proc.wait()


def test_read_status_never_overwrites_a_final_state(tmp_path):
    run_dir = _run(tmp_path)
    store.write_status(run_dir, state="completed", pid=_dead_pid(), pid_started_at=1.0)
    assert store.read_status(run_dir)["state"] == "completed"


def test_list_runs_skips_foreign_and_half_written_folders_newest_first(tmp_path):
    root = tmp_path / "runs"
    old = store.create_run(RunConfig(name="old", model="resnet18"), root)
    new = store.create_run(RunConfig(name="new", strategy="last_n", unfreeze_last=2), root)
    store.write_status(old, state="completed")
    store.write_summary(old, {"best_val_acc": 0.5, "trainable_params": 10, "total_params": 40})
    (root / "notes").mkdir()
    (root / "notes" / "x.txt").write_text("not a run")
    (root / "half").mkdir()
    (root / "half" / "config.json").write_text("{}")  # no status yet
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / "broken" / "status.json").write_text("{}")
    (root / "settings.json").write_text("{}")
    runs = store.list_runs(root)
    assert list(runs.columns) == store.LIST_COLUMNS
    assert runs["run_id"].tolist() == [new.name, old.name]
    assert runs["name"].tolist() == ["new", "old"]
    assert runs["strategy"].tolist() == ["last_n 2", "full"]  # with the option that defines it
    assert runs["state"].tolist() == ["queued", "completed"]
    assert runs.loc[1, "best_val_acc"] == 0.5
    assert runs.loc[1, "trainable_pct"] == 25.0
    assert pd.isna(runs.loc[0, "best_val_acc"])
    assert (runs["disk_bytes"] > 0).all()
    assert runs.loc[0, "path"] == str(new)
    assert store.list_runs(tmp_path / "nothing-here").empty


def test_resolve_run_takes_an_id_a_unique_prefix_or_a_path(tmp_path):
    root = tmp_path / "runs"
    a = store.create_run(RunConfig(), root)
    b = store.create_run(RunConfig(), root)
    assert store.resolve_run(a.name, root) == a
    assert store.resolve_run(str(b), root) == b
    common = os.path.commonprefix([a.name, b.name])
    assert store.resolve_run(b.name[: len(common) + 1], root) == b
    with pytest.raises(store.RunError, match="ambiguous") as err:
        store.resolve_run(common[:8], root)
    assert a.name in str(err.value) and b.name in str(err.value)
    with pytest.raises(store.RunError, match="no run 'zzz'"):
        store.resolve_run("zzz", root)
    with pytest.raises(store.RunError, match="not a run folder"):
        store.resolve_run(str(tmp_path), root)


def test_rename_changes_the_label_and_delete_refuses_a_live_run(tmp_path):
    run_dir = _run(tmp_path)
    store.rename_run(run_dir, "baseline")
    assert store.read_config(run_dir)["name"] == "baseline"
    with pytest.raises(store.RunError, match="queued; cancel it"):
        store.delete_run(run_dir)
    me = os.getpid()
    _mark_running(run_dir, me, process_start_time(me))
    with pytest.raises(store.RunError, match="running; stop it"):
        store.delete_run(run_dir)
    store.write_status(run_dir, state="stopped")
    store.delete_run(run_dir)
    assert not run_dir.exists()
    with pytest.raises(store.RunError):
        store.delete_run(tmp_path)  # never deletes a folder that is not a run


def test_read_log_tail_returns_the_last_lines(tmp_path):
    assert store.read_log_tail(tmp_path) == ""
    (tmp_path / "worker.log").write_text("".join(f"line {i}\n" for i in range(5000)))
    assert store.read_log_tail(tmp_path, 3) == "line 4997\nline 4998\nline 4999"


def test_compare_runs_gives_one_row_per_run_with_final_metrics(tmp_path):
    run_dir = _run(tmp_path, strategy="linear_probe")
    store.write_summary(
        run_dir,
        {"best_val_acc": 0.6, "final_val_acc": 0.55, "trainable_params": 5, "total_params": 50},
    )
    _write_lines(
        run_dir / "metrics.jsonl",
        [
            {"split": "train", "epoch": 1, "step": s, "images_per_s": v}
            for s, v in ((1, 10), (2, 30))
        ],
    )
    table = store.compare_runs([run_dir])
    row = table.iloc[0]
    assert row["strategy"] == "linear_probe" and row["final_val_acc"] == 0.55
    assert row["trainable_pct"] == 10.0 and row["images_per_s"] == 20.0
    assert pd.isna(row["test_acc"])


# ---------------------------------------------------------------------------------------------
# Format versions and state changes

RUNS_V1 = Path(__file__).parent / "fixtures" / "runs_v1"  # three runs as the code wrote them
# before format versions (one comparison group: full, last_n 1, linear_probe; 2 epochs)


@pytest.fixture
def v1_runs(tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(RUNS_V1, root)
    return root


def test_runs_written_before_format_versions_still_open(v1_runs):
    runs = store.list_runs(v1_runs)
    assert sorted(runs["strategy"]) == ["full", "last_n 1", "linear_probe"]
    assert set(runs["state"]) == {"completed"} and runs["group"].nunique() == 1
    for row in runs.itertuples():
        run_dir = Path(row.path)
        summary = store.read_summary(run_dir)
        assert "schema" not in json.loads((run_dir / "summary.json").read_text())
        assert row.best_val_acc == summary["best_val_acc"]
        assert store.run_config(run_dir).epochs == 2
        metrics = store.read_metrics(run_dir)
        assert metrics["split"].eq("val").sum() == 2 and metrics["split"].eq("test").sum() == 1
    table = store.compare_runs(list(runs["path"]))
    assert (table["images_per_s"] > 0).all() and table["test_acc"].notna().all()


def test_new_files_carry_the_format_version_and_newer_ones_are_refused_clearly(tmp_path):
    run_dir = _run(tmp_path)
    for name in ("config.json", "status.json"):
        assert json.loads((run_dir / name).read_text())["schema"] == store.SCHEMA_VERSION
    store.write_summary(run_dir, {"state": "stopped"})
    assert store.read_summary(run_dir)["schema"] == store.SCHEMA_VERSION
    writer = store.MetricsWriter(run_dir)
    writer.on_train_record(None, {"split": "train", "epoch": 1, "step": 1, "loss": 1.0})
    writer.close()
    line = json.loads((run_dir / "metrics.jsonl").read_text())
    assert line["schema"] == store.SCHEMA_VERSION
    assert "schema" not in store.read_metrics(run_dir).columns  # a format key, not a metric
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "schema": 99}))
    with pytest.raises(store.RunError, match="format 99, newer than this finetune_core"):
        store.read_config(run_dir)


def test_state_changes_follow_the_transition_table(tmp_path):
    run_dir = _run(tmp_path)  # queued
    assert store.set_state(run_dir, "completed") is None  # a queued run has not run
    me = os.getpid()
    running = store.set_state(run_dir, "running", pid=me, message="go")
    assert running["pid"] == me and running["pid_started_at"] == process_start_time(me)
    assert running["started_at"] and running["finished_at"] is None
    done = store.set_state(run_dir, "completed", message="done", exit_code=0)
    assert done["finished_at"] >= running["started_at"] and done["eta_s"] is None
    assert store.set_state(run_dir, "queued") is None  # a completed run stays completed
    assert store.set_state(run_dir, "running", pid=me) is None
    assert store.read_status(run_dir)["state"] == "completed"
    with pytest.raises(ValueError, match="use set_state"):
        store.write_progress(run_dir, state="running")


def test_read_metrics_parses_only_what_was_appended_and_sees_a_rewritten_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = _records(("train", 1, 10, 2.0, 0.1), ("val", 1, 12, 1.9, 0.2))
    _write_lines(path, first, tail='{"split": "train", "epoch": 2, "st')
    assert store.read_metrics(tmp_path)["step"].tolist() == [10, 12]
    with open(path, "a") as f:  # the torn line is completed, and more arrive
        f.write('ep": 20, "loss": 1.5, "acc": 0.3}\n' + json.dumps(first[0] | {"step": 30}) + "\n")
    assert store.read_metrics(tmp_path)["step"].tolist() == [10, 12, 20, 30]
    frame = store.read_metrics(tmp_path)
    frame.loc[0, "loss"] = 99.0  # a caller's change never reaches the next reader
    assert store.read_metrics(tmp_path).loc[0, "loss"] == 2.0
    files.write_lines_atomic(path, first[:1])  # a resume trims the file: a new file
    assert store.read_metrics(tmp_path)["step"].tolist() == [10]
