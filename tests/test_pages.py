"""Every dashboard page under Streamlit's AppTest: with no runs, with finished runs and with a
live run, asserting what the user sees (texts, buttons, and the Plotly figures' data).

Runs are hand-written folders (tests/dashboard_fixtures.py). The test holds the runs
folder's supervisor lock, so the pages' ensure_supervisor finds "one is running" and no
queued fixture ever starts training (one test checks that a page does start one).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from dashboard_fixtures import (
    figure_titled,
    make_live,
    plotly_figures,
    write_group,
    write_run,
)
from streamlit.testing.v1 import AppTest

from finetune_core import plots, runner, store, weights

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """An empty runs folder the pages use, with the supervisor lock held by this test."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(root))
    monkeypatch.delenv("FINETUNE_DATA_ROOTS", raising=False)
    fd = os.open(root / runner.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield root
    os.close(fd)


@pytest.fixture
def worker():
    """A stand-in worker process (alive until stopped): what a live run's pid points to."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def page(name: str, **query) -> AppTest:
    """Runs one page of the multipage app (entry app.py, as `streamlit run app.py` does)."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    if name != "app.py":
        at.switch_page(name)
    at.query_params.update(query)
    return at.run()


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def unpacked(at: AppTest, timeout: float = TIMEOUT) -> AppTest:
    """Reruns New run until its zip is unpacked (a background job does it) and the Data
    section says what the zip holds or why it cannot be used."""
    deadline = time.time() + timeout
    while not at.exception and at.get("progress") and time.time() < deadline:
        if not any(p.proto.text.startswith("Unpacking") for p in at.get("progress")):
            break
        time.sleep(0.3)
        at.run()
    return at


def all_text(at) -> str:
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "subheader"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def picker(at):
    """Home's "Manage a run" picker (its widget key carries a digest of its labels)."""
    return next(s for s in at.selectbox if s.label == "Run")


def traces(fig: dict) -> dict[str, dict]:
    return {t.get("name"): t for t in fig["data"]}


# ---------------------------------------------------------------- Home


def test_home_with_no_runs_explains_itself_and_offers_start_here(runs):
    at = page("app.py")
    assert not at.exception
    assert "Fine-tune a pretrained torchvision model" in at.markdown[0].value
    assert "Device:" in at.caption[0].value and (
        "CPU" in at.caption[0].value or "GPU" in at.caption[0].value
    )
    assert "No runs yet" in texts(at.info)[0]
    assert at.button(key="start_here").label.startswith("Start here")
    assert not at.dataframe


def test_home_sets_how_many_runs_train_at_once_for_the_queue(runs, monkeypatch):
    from finetune_core import runner

    monkeypatch.delenv("FINETUNE_MAX_PARALLEL", raising=False)
    at = page("app.py")
    assert at.number_input(key="max_parallel").value == 1
    at.number_input(key="max_parallel").set_value(2).run()
    assert not at.exception
    assert runner.parallel_limit(runs) == 2  # the supervisor reads it at every poll
    monkeypatch.setenv("FINETUNE_MAX_PARALLEL", "3")
    at = page("app.py")
    assert at.number_input(key="max_parallel").value == 3
    assert at.number_input(key="max_parallel").disabled


def test_home_lists_every_run_with_a_link_to_its_training_view(runs, worker):
    ids = write_group(runs)
    live = write_run(runs, "20250102-000000-aaaaaa", strategy="bitfit", accs=(0.3,))
    make_live(live, worker.pid)
    at = page("app.py")
    assert not at.exception
    assert "Runs (4) · 1 live" in texts(at.subheader)
    table = at.dataframe[0].value
    assert list(table["open"]) == [f"Training?run={r}" for r in [live.name, *ids[::-1]]]
    assert list(table["state"]) == ["running", "completed", "completed", "completed"]
    assert list(table["best_val_acc"])[1:] == pytest.approx([50.0, 83.0, 80.0])
    assert list(table["compare"])[1] == "Compare?group=20250101-120000-abcdef"


def test_home_renames_and_deletes_only_after_confirmation(runs):
    ids = write_group(runs)
    at = page("app.py")
    picker(at).set_value(ids[0]).run()
    at.text_input(key=f"rename_{ids[0]}").set_value("baseline")
    at.button(key="rename").click().run()
    assert store.read_config(runs / ids[0])["name"] == "baseline"
    assert not at.exception

    at.button(key="delete").click().run()
    assert (runs / ids[0]).exists(), "one click must not delete"
    assert "cannot be undone" in texts(at.warning)[0]
    at.button(key="delete_yes").click().run()
    assert not (runs / ids[0]).exists()
    assert set(store.list_runs(runs)["run_id"]) == set(ids[1:])


def test_home_clone_opens_new_run_with_that_runs_settings(runs):
    write_run(runs, "20250101-000000-eeeeee", strategy="gradual", unfreeze_every=2, lr=0.05)
    at = page("app.py")
    at.button(key="clone").click().run()
    assert not at.exception
    assert at.toggle(key="f_compare").value is False
    assert at.selectbox(key="f_strategy").value == "gradual"
    assert at.number_input(key="f_unfreeze_every").value == 2
    assert at.number_input(key="f_lr").value == 0.05


def test_home_works_with_a_hundred_runs(runs):
    for i in range(100):
        write_run(runs, f"20250103-{i // 60:02d}{i % 60:02d}00-{i:06x}", accs=(0.5,))
    at = page("app.py")
    assert not at.exception
    assert len(at.dataframe[0].value) == 100
    assert len(picker(at).options) == 100


def test_a_page_starts_the_queue_for_waiting_runs_when_no_supervisor_runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(root))
    page("app.py")
    assert not runner.supervisor_running(root), "nothing queued: no process to start"
    # a queued run whose data does not exist: the worker fails fast, saying why
    queued = write_run(
        root,
        "20250101-000000-ffffff",
        accs=(),
        state="queued",
        total_epochs=1,
        data=str(tmp_path / "missing"),
    )
    at = page("app.py")
    assert not at.exception
    try:
        deadline = time.time() + 120
        while store.read_status(queued)["state"] in store.LIVE_STATES and time.time() < deadline:
            time.sleep(0.3)
        status = store.read_status(queued)
        assert status["state"] == "failed"
        assert "missing" in status["message"]
    finally:
        lock = root / runner.SUPERVISOR_LOCK
        if runner.supervisor_running(root) and lock.read_text().strip():
            os.kill(int(lock.read_text().strip()), signal.SIGTERM)


# ---------------------------------------------------------------- Training


def test_training_with_no_runs_points_to_new_run(runs):
    at = page("pages/2_Training.py")
    assert not at.exception
    assert "No runs yet" in texts(at.info)[0]
    assert not plotly_figures(at)


def test_training_shows_a_finished_run_with_its_charts_and_result(runs):
    ids = write_group(runs)
    at = page("pages/2_Training.py", run=ids[1])
    assert not at.exception
    assert at.selectbox(key="training_run").value == ids[1]
    loss = traces(figure_titled(at, "Loss"))
    assert loss["train loss"]["x"] == [5, 10, 15, 20]
    assert loss["val loss"]["y"] == [1.0, 0.5]
    acc = traces(figure_titled(at, "Accuracy"))
    assert acc["val acc"]["y"] == pytest.approx([55.0, 83.0])
    assert traces(figure_titled(at, "Throughput"))["images/s"]["y"] == [128.0] * 4
    assert traces(figure_titled(at, "Learning rate"))["lr (head)"]["y"] == [0.01] * 4
    assert "best val acc 83.0 %" in all_text(at)
    assert at.progress[0].value == 100
    keys = {b.key for b in at.button}
    assert not keys & {"stop", "cancel", "resume"}
    assert "Compare this group" in str([p.proto for p in at.get("page_link")])


def test_training_defaults_to_the_live_run_and_stop_signals_its_worker(runs, worker):
    write_group(runs)
    live = write_run(runs, "20250101-000000-bbbbbb", accs=(0.4, 0.6), total_epochs=4)
    make_live(live, worker.pid)
    at = page("pages/2_Training.py")
    assert not at.exception
    assert at.selectbox(key="training_run").value == live.name  # the live one, not the newest
    assert "running" in at.markdown[0].value
    assert at.progress[0].value == 50  # step 20 of 40
    assert "epoch 2" in at.progress[0].proto.text and "step 20 of 40" in at.progress[0].proto.text
    assert traces(figure_titled(at, "Accuracy"))["val acc"]["y"] == pytest.approx([40.0, 60.0])
    at.button(key="stop").click().run()
    assert worker.wait(timeout=10) == -signal.SIGTERM
    assert store.read_status(live).get("stop_requested_at")


def test_training_shows_the_preparation_stage_before_the_first_step(runs, worker):
    run = write_run(runs, "20250101-000000-abab12", accs=(), state="queued", total_epochs=2)
    make_live(run, worker.pid)
    status = json.loads((run / "status.json").read_text())
    status.update(
        step=0,
        epoch=0,
        stage="weights",
        stage_fraction=0.25,
        message="training builtin weights for resnet18: epoch 2 of 6",
    )
    (run / "status.json").write_text(json.dumps(status))
    at = page("pages/2_Training.py", run=run.name)
    assert not at.exception
    assert at.progress[0].value == 25
    assert "training builtin weights" in at.progress[0].proto.text


def test_training_cancels_a_queued_run_and_resumes_a_stopped_one(runs):
    queued = write_run(runs, "20250101-000000-cccccc", accs=(), state="queued", total_epochs=2)
    at = page("pages/2_Training.py", run=queued.name)
    assert not at.exception
    assert "No loss recorded yet" in str(figure_titled(at, "Loss"))
    at.button(key="cancel").click().run()
    assert store.read_status(queued)["state"] == "stopped"
    at = page("pages/2_Training.py", run=queued.name)
    at.button(key="resume").click().run()
    assert store.read_status(queued)["state"] == "queued"


def test_training_with_an_unknown_run_says_so_and_shows_another(runs):
    ids = write_group(runs)
    at = page("pages/2_Training.py", run="nope")
    assert not at.exception
    assert "no run 'nope'" in texts(at.error)[0]
    assert at.selectbox(key="training_run").value == ids[-1]


def test_training_shows_the_worker_log_and_config(runs):
    ids = write_group(runs)
    at = page("pages/2_Training.py", run=ids[0])
    assert f"worker for {ids[0]}" in at.code[0].value
    assert json.loads(at.json[0].value)["strategy"] == "full"


# ---------------------------------------------------------------- Compare


def test_compare_with_no_runs_explains_how_to_get_a_comparison(runs):
    at = page("pages/3_Compare.py")
    assert not at.exception
    assert "Compare strategies" in texts(at.info)[0]


def test_compare_defaults_to_the_newest_group_and_answers_which_strategy_at_what_cost(runs):
    ids = write_group(runs)
    write_run(runs, "20240101-000000-dddddd", accs=(0.9,))  # older, not in the group
    at = page("pages/3_Compare.py")
    assert not at.exception
    assert at.multiselect(key="compare_runs").value == ids
    assert texts(at.subheader)[0] == (
        "last_n 1 is best with 83.0 % val accuracy, 3.0 points above full fine-tuning "
        "(80.0 %), using 0.7× the training time and 76 % of the trainable parameters."
    )
    labels = ["full", "last_n 1", "linear_probe"]
    cost = figure_titled(at, "Accuracy vs trainable parameters")
    assert [(t["name"], t["x"], t["y"]) for t in cost["data"]] == [
        ("full", [11_000_000], [pytest.approx(80.0)]),
        ("last_n 1", [8_400_000], [pytest.approx(83.0)]),
        ("linear_probe", [1_539], [pytest.approx(50.0)]),
    ]
    time_fig = figure_titled(at, "Accuracy vs train time")
    assert [t["x"] for t in time_fig["data"]] == [[100.0], [70.0], [20.0]]
    curves = figure_titled(at, "Val accuracy (%) by epoch")
    assert [t["name"] for t in curves["data"]] == labels
    assert [t["y"] for t in curves["data"]] == [
        pytest.approx([60.0, 80.0]),
        pytest.approx([55.0, 83.0]),
        pytest.approx([40.0, 50.0]),
    ]
    assert [t["name"] for t in figure_titled(at, "Val loss by epoch")["data"]] == labels
    per_class = figure_titled(at, "Per-class accuracy")
    assert [t["name"] for t in per_class["data"]] == labels
    assert per_class["data"][0]["y"] == pytest.approx([80.0, 70.0, 100.0])
    confusion = figure_titled(at, "Confusion matrices")
    # a heatmap per run, each under one clickable marker per cell (the drill-down)
    assert [t["type"] for t in confusion["data"]] == ["heatmap", "scatter"] * 3
    table = at.dataframe[0].value
    assert list(table["run"]) == labels
    assert list(table["best_val_acc"]) == pytest.approx([80.0, 83.0, 50.0])
    diff = at.dataframe[1].value
    assert set(diff.index) == {"strategy"}  # unfreeze_last is 1 everywhere by default
    assert at.get("download_button")


def test_compare_by_query_selects_runs_or_a_group(runs):
    ids = write_group(runs)
    at = page("pages/3_Compare.py", runs=f"{ids[0]},{ids[2]}")
    assert at.multiselect(key="compare_runs").value == [ids[0], ids[2]]
    assert [t["name"] for t in figure_titled(at, "Val loss")["data"]] == ["full", "linear_probe"]
    at = page("pages/3_Compare.py", group="no-such-group")
    assert "no runs of group 'no-such-group'" in texts(at.warning)[0]


def test_compare_with_a_live_run_updates_and_says_the_result_is_provisional(runs, worker):
    ids = write_group(runs)
    make_live(runs / ids[2], worker.pid)
    at = page("pages/3_Compare.py")
    assert not at.exception
    assert "1 of 3 runs are still training" in texts(at.info)[0]
    curves = figure_titled(at, "Val accuracy (%) by epoch")
    assert len(curves["data"]) == 3  # the live run's curve from its metrics so far
    assert [t["name"] for t in figure_titled(at, "Per-class accuracy")["data"]] == [
        "full",
        "last_n 1",
    ]


def test_runs_written_before_format_versions_show_on_every_page(runs):
    import shutil

    for run in (REPO / "tests" / "fixtures" / "runs_v1").iterdir():
        shutil.copytree(run, runs / run.name)
    home = page("app.py")
    assert not home.exception
    assert set(home.dataframe[0].value["strategy"]) == {"full", "last_n 1", "linear_probe"}
    training = page("pages/2_Training.py")
    assert not training.exception
    assert figure_titled(training, "Accuracy")["data"]
    compare = page("pages/3_Compare.py")
    assert not compare.exception
    assert list(compare.dataframe[0].value["run"]) == ["full", "last_n 1", "linear_probe"]
    assert " is best with " in texts(compare.subheader)[0]


# ---------------------------------------------------------------- New run


@pytest.fixture
def new_run(runs):
    """The New run page with the default form (builtin data, compare mode)."""
    return page("pages/1_New_run.py")


def test_new_run_defaults_show_data_trainable_maps_and_allow_launch(new_run):
    at = new_run
    assert not at.exception, at.exception
    assert at.selectbox(key="f_model").value == "resnet18"
    assert at.multiselect(key="f_compare_set").value == ["full", "last_n 1", "linear_probe"]
    assert "6 classes" in all_text(at)
    counts = figure_titled(at, "Images per class")
    assert sum(sum(t["y"]) for t in counts["data"]) == 1500
    grid = at.get("image")[0]
    assert len(grid.value) == 24 and grid.captions[:5] == ["circle"] * 4 + ["cross"]
    full_map = figure_titled(at, "Trainable map · full")
    assert [t["name"] for t in full_map["data"]] == ["trains"]
    assert full_map["data"][0]["y"] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    probe_map = figure_titled(at, "Trainable map · linear probe: 3.08k of 11.2M train (0.028 %)")
    frozen = traces(probe_map)["frozen"]
    assert frozen["y"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert traces(probe_map)["trains"]["y"] == ["head"]
    assert not at.button(key="launch").disabled
    for w in [*at.number_input, *at.selectbox, *at.text_input]:
        assert w.help, f"{w.label} has no help text"
    for w in [*at.number_input, *at.selectbox, *at.text_input, *at.checkbox, *at.radio]:
        said = (w.help or "").lower()  # a help text adds to what the field already shows
        assert not said.startswith(w.label.lower()), f"{w.label}: its help repeats its label"
        assert not re.search(r"\w \| \w", said), f"{w.label}: its help lists its choices again"


def test_new_run_shows_validation_next_to_the_field_and_disables_launch(new_run):
    at = new_run
    at.number_input(key="f_lr").set_value(-1.0).run()
    assert any("learning rate must be a positive" in e for e in texts(at.error))
    assert at.button(key="launch").disabled
    at.number_input(key="f_lr").set_value(0.01).run()
    at.number_input(key="f_image_size").set_value(8).run()
    assert any("image size" in e and "16" in e for e in texts(at.error))
    assert at.button(key="launch").disabled


def test_new_run_trainable_map_follows_the_strategy_choice(new_run):
    at = new_run
    at.toggle(key="f_compare").set_value(False).run()
    at.selectbox(key="f_strategy").set_value("last_n").run()
    at.number_input(key="f_unfreeze_last").set_value(2).run()
    m = traces(figure_titled(at, "Trainable map"))
    assert m["trains"]["y"] == ["layer3", "layer4", "head"]
    at.selectbox(key="f_strategy").set_value("lp_ft").run()
    at.number_input(key="f_epochs").set_value(3).run()
    fig = figure_titled(at, "Trainable map")
    panels = {t["xaxis"] for t in fig["data"]}
    assert panels == {"x", "x2"}, "lp_ft has a probe and a fine-tuning phase"
    at.selectbox(key="f_strategy").set_value("last_n").run()
    at.number_input(key="f_unfreeze_last").set_value(9).run()
    assert any("unfreeze last" in e and "backbone groups" in e for e in texts(at.error))
    assert at.button(key="launch").disabled


def test_new_run_form_survives_a_refresh(new_run, runs):
    at = new_run
    at.number_input(key="f_epochs").set_value(5).run()
    at.multiselect(key="f_compare_set").set_value(["full", "bitfit"]).run()
    at.text_input(key="f_name").set_value("my try").run()
    fresh = page("pages/1_New_run.py")  # a new browser session: nothing in memory
    assert fresh.number_input(key="f_epochs").value == 5
    assert fresh.multiselect(key="f_compare_set").value == ["full", "bitfit"]
    assert fresh.text_input(key="f_name").value == "my try"


def test_new_run_launches_a_group_sharing_seed_split_and_epochs(new_run, runs):
    at = new_run
    at.radio(key="f_weights_choice").set_value("none").run()
    at.number_input(key="f_epochs").set_value(2).run()
    at.number_input(key="f_seed").set_value(7).run()
    at.button(key="launch").click().run()
    assert not at.exception
    made = store.list_runs(runs)
    assert len(made) == 3
    assert made["group"].nunique() == 1 and made["group"].iloc[0]
    configs = [store.read_config(Path(p)) for p in made["path"]]
    assert sorted((c["strategy"], c["unfreeze_last"]) for c in configs) == [
        ("full", 1),
        ("last_n", 1),
        ("linear_probe", 1),
    ]
    assert {
        (c["seed"], c["epochs"], c["augment"], c["val_fraction"], c["weights"]) for c in configs
    } == {(7, 2, "flip", 0.2, "none")}
    assert set(made["state"]) == {"queued"}
    # and the user lands on the Training view of the first run
    assert at.selectbox(key="training_run").value in set(made["run_id"])


def test_new_run_clone_loads_a_runs_settings(runs):
    write_run(runs, "20250101-000000-eeeeee", strategy="last_n", unfreeze_last=2)
    at = page("pages/1_New_run.py", clone="20250101-000000-eeeeee")
    assert not at.exception
    assert at.toggle(key="f_compare").value is False
    assert at.selectbox(key="f_strategy").value == "last_n"
    assert at.number_input(key="f_unfreeze_last").value == 2


def test_new_run_server_folders_only_below_configured_roots(runs, tmp_path, monkeypatch):
    at = page("pages/1_New_run.py")
    assert "folder" not in at.radio(key="f_data_choice").options
    assert "FINETUNE_DATA_ROOTS" in all_text(at)
    from PIL import Image

    data_root = tmp_path / "images"
    for cls in ("cats", "dogs"):
        (data_root / "set" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (16, 16), "red").save(data_root / "set" / cls / f"{i}.png")
    monkeypatch.setenv("FINETUNE_DATA_ROOTS", str(data_root))
    at = page("pages/1_New_run.py")
    at.radio(key="f_data_choice").set_value("folder").run()
    assert at.selectbox(key="f_data_root").value == str(data_root)
    at.text_input(key="f_data_sub").set_value("../../..").run()
    assert any("leads outside" in e for e in texts(at.error))
    assert at.button(key="launch").disabled
    at.text_input(key="f_data_sub").set_value("set").run()
    assert "**2 classes**" in all_text(at)


def test_new_run_clone_of_a_folder_outside_the_roots_says_so_and_uses_builtin(runs, tmp_path):
    outside = tmp_path / "elsewhere"
    for cls in ("a", "b"):
        (outside / cls).mkdir(parents=True)
    write_run(runs, "20250101-000000-eeeeee", data=str(outside))
    at = page("pages/1_New_run.py", clone="20250101-000000-eeeeee")
    assert not at.exception
    assert any(str(outside) in w and "FINETUNE_DATA_ROOTS" in w for w in texts(at.warning))
    assert at.radio(key="f_data_choice").value == "builtin"


def test_new_run_reads_an_uploaded_zip_and_a_torchvision_dataset(runs, tmp_path):
    from PIL import Image

    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for cls, colour in (("cat", "red"), ("dog", "blue")):
            for i in range(6):
                buf = io.BytesIO()
                Image.new("RGB", (20, 20), colour).save(buf, "PNG")
                z.writestr(f"pets/{cls}/{i}.png", buf.getvalue())
    # what the upload widget leaves behind: the saved file's path in the form state
    (runs / ".form_state.json").write_text(
        json.dumps({"f_data_choice": "zip", "f_data_zip": str(archive)})
    )
    at = unpacked(page("pages/1_New_run.py"))
    assert not at.exception
    assert "**2 classes**, 12 images: cat, dog" in all_text(at)
    counts = figure_titled(at, "Images per class")
    assert [list(t["x"]) for t in counts["data"]] == [["cat", "dog"]]
    at.radio(key="f_data_choice").set_value("torchvision").run()
    at.selectbox(key="f_data_tv").set_value("CIFAR10").run()
    assert "**10 classes**" in all_text(at)
    assert any("Not downloaded yet" in i for i in texts(at.info))


def test_new_run_flags_a_weights_file_of_another_architecture_next_to_the_choice(runs, tmp_path):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(bad))
    (runs / ".form_state.json").write_text(
        json.dumps({"f_weights_choice": "file", "f_weights_file": str(bad)})
    )
    at = page("pages/1_New_run.py")
    assert not at.exception
    assert any(str(bad) in e and "weights" in e for e in texts(at.error))
    assert at.button(key="launch").disabled
    assert any("Launch is disabled" in c.value and "weights" in c.value for c in at.caption)
    assert at.button(key="launch_depths").disabled  # "How much should I unfreeze?" too


def test_new_run_weights_choice_says_where_imagenet_weights_come_from(new_run):
    at = new_run
    at.radio(key="f_weights_choice").set_value("default").run()
    target = str(weights.cache_file("default", "resnet18"))
    shown = "\n".join(texts(at.error) + texts(at.success) + texts(at.info) + texts(at.warning))
    assert target in shown


def test_new_run_estimates_time_per_epoch_and_memory(new_run):
    at = new_run
    at.toggle(key="f_compare").set_value(False).run()
    at.selectbox(key="f_strategy").set_value("linear_probe").run()
    at.number_input(key="f_image_size").set_value(32).run()
    at.number_input(key="f_batch_size").set_value(16).run()
    at.radio(key="f_weights_choice").set_value("none").run()
    at.button(key="estimate").click().run()
    deadline = time.time() + 180  # a background job: the page answers while it measures
    while "memory about" not in all_text(at) and time.time() < deadline:
        time.sleep(0.5)
        at.run()
    assert not at.exception
    result = all_text(at)
    assert "per epoch" in result and "steps ×" in result and "memory about" in result
    fresh = page("pages/1_New_run.py")  # a closed tab, a new one: the estimate is still there
    assert "memory about" in all_text(fresh)
    assert not fresh.button(key="launch").disabled  # and never held Launch up


def test_headline_on_the_page_is_the_plots_headline(runs):
    """The page shows exactly what plots.headline computes from the same table."""
    ids = write_group(runs)
    configs = {r: store.read_config(runs / r) for r in ids}
    summaries = {r: store.read_summary(runs / r) for r in ids}
    metrics = {r: store.read_metrics(runs / r) for r in ids}
    expected = plots.headline(plots.summary_table(configs, summaries, metrics))
    assert texts(page("pages/3_Compare.py").subheader)[0] == expected


# ---------------------------------------------------------------- what a new user hit (issue 8)


def _zip_of(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


def _png(colour: str, size: int = 20) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def _use_zip(runs: Path, archive: Path) -> None:
    """What the upload widget leaves behind: the saved file's path in the form state."""
    (runs / ".form_state.json").write_text(
        json.dumps({"f_data_choice": "zip", "f_data_zip": str(archive)})
    )


def test_new_run_with_an_unreadable_file_previews_the_rest_and_says_it_will_be_skipped(
    runs, tmp_path
):
    files = {f"pets/cat/{i}.png": _png("red") for i in range(1, 6)}
    files["pets/cat/0.png"] = b"not an image at all"  # the first file of its class
    files.update({f"pets/dog/{i}.png": _png("blue") for i in range(6)})
    _use_zip(runs, _zip_of(tmp_path / "pets.zip", files))
    at = unpacked(page("pages/1_New_run.py"))
    assert not at.exception, at.exception
    grid = at.get("image")[0]
    assert grid.captions == ["cat"] * 4 + ["dog"] * 4  # previews from readable files only
    assert "1 file cannot be read and will be skipped: cat/0.png" in all_text(at)
    assert at.get("plotly_chart") and not at.button(key="launch").disabled


def test_new_run_says_when_a_split_lacks_a_class_and_still_launches(runs, tmp_path):
    files = {f"pets/train/{c}/{i}.png": _png(c) for c in ("red", "blue") for i in range(3)}
    files["pets/val/red/0.png"] = _png("red")  # no blue in val
    _use_zip(runs, _zip_of(tmp_path / "pets.zip", files))
    at = unpacked(page("pages/1_New_run.py"))
    assert not at.exception, at.exception
    shown = [w for w in texts(at.warning) if "has no images of 1 class" in w]
    assert shown and "'blue'" in shown[0], texts(at.warning)
    assert not at.button(key="launch").disabled


def test_new_run_shows_the_data_split_message_that_disables_launch(new_run):
    at = new_run
    at.number_input(key="f_val_fraction").set_value(0.0).run()
    assert at.button(key="launch").disabled
    shown = [e for e in texts(at.error) if "val/ folder" in e]
    assert shown and "Validation fraction" in shown[0] and "--val-fraction" not in shown[0]


def test_new_run_with_a_one_class_zip_names_that_class_and_no_server_path(runs, tmp_path):
    archive = _zip_of(tmp_path / "digits.zip", {f"digit_3/{i}.png": _png("red") for i in range(4)})
    _use_zip(runs, archive)
    at = unpacked(page("pages/1_New_run.py"))
    assert not at.exception
    messages = [e for e in texts(at.error) if "class" in e]
    assert messages and "only 1 class (digit_3) found; a classifier needs at least 2" in messages[0]
    assert str(tmp_path) not in messages[0] and ".cache" not in messages[0]
    assert "finetune_dashboard" not in "\n".join(texts(at.error))


def test_new_run_refuses_imagenet_weights_it_cannot_download_and_says_where_they_go(
    runs, monkeypatch
):
    monkeypatch.setenv("FINETUNE_OFFLINE", "1")
    at = page("pages/1_New_run.py")
    at.radio(key="f_weights_choice").set_value("default").run()
    assert not at.exception
    assert at.button(key="launch").disabled
    message = next(e for e in texts(at.error) if "ImageNet weights" in e)
    target = str(weights.cache_file("default", "resnet18"))
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert target in message and "builtin" in message
    assert not texts(at.success)  # no green box beside the red one


def test_training_of_a_run_that_failed_before_training_says_it_once_and_offers_no_resume(runs):
    run_dir = write_run(runs, "20250101-000000-ffffff", state="failed", accs=(0.5,))
    (run_dir / "metrics.jsonl").write_text("")
    message = "could not download the ImageNet weights for resnet18 (no network?)"
    status = json.loads((run_dir / "status.json").read_text())
    status.update(message=message, resumable=False, step=0, total_steps=None)
    (run_dir / "status.json").write_text(json.dumps(status))
    (run_dir / "summary.json").write_text(json.dumps({"state": "failed", "message": message}))
    at = page("pages/2_Training.py", run="20250101-000000-ffffff")
    assert not at.exception
    assert sum(message in t for t in [*texts(at.error), *texts(at.caption)]) == 1
    assert not plotly_figures(at)  # no empty charts
    assert "–" not in all_text(at) and "Result" not in all_text(at)
    assert not [b for b in at.button if b.key == "resume"]
    assert at.button(key="clone_failed")


def test_training_follows_a_group_to_its_live_run_and_shows_every_members_progress(runs, worker):
    ids = write_group(runs)
    make_live(runs / ids[1], worker.pid)  # the first has finished, the second trains
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.switch_page("pages/2_Training.py")
    at.query_params["run"] = ids[0]
    at.session_state["training_follow"] = True  # as Launch opens it
    at.run()
    assert not at.exception
    assert at.selectbox(key="training_run").value == ids[1]  # followed the live one
    bars = [p.text for p in at.get("progress")]
    assert len(bars) == 1 + 3  # the run's own bar and one per member of its group
    assert any("full" in t and "completed" in t for t in bars)
    at = page("pages/2_Training.py", run=ids[0])  # picked by hand: it stays
    assert at.selectbox(key="training_run").value == ids[0]
    assert len(at.get("progress")) == 4


def test_training_stops_a_group_as_a_whole(runs, worker):
    ids = write_group(runs)
    make_live(runs / ids[1], worker.pid)
    at = page("pages/2_Training.py", run=ids[0])
    assert not at.exception
    at.button(key="stop_group").click().run()
    assert not at.exception
    assert worker.wait(timeout=30) == -signal.SIGTERM  # the live member was asked to stop
    status = json.loads((runs / ids[1] / "status.json").read_text())
    assert status.get("stop_requested_at")
    at = page("pages/2_Training.py", run=ids[0])  # nothing live any more: no button
    assert not [b for b in at.button if b.key == "stop_group"]


def test_compare_stops_a_live_group_as_a_whole(runs, worker):
    ids = write_group(runs)
    make_live(runs / ids[2], worker.pid)
    at = page("pages/3_Compare.py", group="20250101-120000-abcdef")
    assert not at.exception
    at.button(key="compare_stop_group").click().run()
    assert not at.exception
    assert worker.wait(timeout=30) == -signal.SIGTERM
    assert json.loads((runs / ids[2] / "status.json").read_text()).get("stop_requested_at")


def test_home_delete_confirmation_is_not_styled_as_the_primary_action(runs):
    write_run(runs, "20250101-000000-aaaaaa", name="before")
    at = page("app.py")
    at.button(key="delete").click().run()
    assert not at.exception
    assert at.button(key="delete_yes").proto.type != "primary"


def test_new_run_counts_the_steps_per_epoch_the_run_will_take(new_run):
    from finetune_core import data

    at = new_run
    at.number_input(key="f_epochs").set_value(1).run()
    # the default comparison tunes each lr, so it holds out a test split as well
    loaded = data.load_data("builtin:shapes", image_size=16, val_fraction=0.2, test_fraction=0.2)
    loader = data.TensorLoader(
        loaded.train, 64, shuffle=True, drop_last=data.drops_last(len(loaded.train), 64)
    )
    expected = f"{len(loaded.train):,} training images · batch 64 → {len(loader)} steps per epoch"
    assert expected in all_text(at), all_text(at)
    assert "1 epochs" not in all_text(at)


def test_new_run_shows_the_effective_batch_of_several_devices_and_accumulation(new_run):
    at = new_run
    assert "Effective batch" not in all_text(at)  # 1 device, no accumulation: the batch itself
    at.number_input(key="f_devices").set_value(2).run()
    # the default comparison tunes each strategy's lr, which runs in one process
    assert "searches in one process" in "\n".join(str(e.value) for e in at.error)
    assert at.button(key="launch").disabled
    at.toggle(key="f_compare").set_value(False).run()
    assert not at.error
    said = all_text(at)
    assert "Effective batch 128 = 64 per device × 2 devices; the learning rate stays" in said
    at.number_input(key="f_accumulate_steps").set_value(4).run()
    said = all_text(at)
    assert "Effective batch 512 = 64 per device × 2 devices × 4 batches per step" in said
    assert "(effective batch 512) per epoch" in said
    assert said.count("Effective batch 512") == 1  # one caption, not one per field
    at.number_input(key="f_devices").set_value(0).run()
    assert "must be at least 1 device" in "\n".join(str(e.value) for e in at.error)
    assert at.button(key="launch").disabled


def test_new_run_shows_small_learning_rates_as_they_are(new_run):
    at = new_run
    at.number_input(key="f_lr").set_value(1e-6).run()
    assert not at.exception
    assert at.number_input(key="f_lr").value == 1e-6
    assert at.number_input(key="f_lr").proto.format == "%g"  # 1e-06, not 0.00000


def test_new_run_says_once_that_a_weights_file_does_not_fit(runs, tmp_path):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(bad))
    (runs / ".form_state.json").write_text(
        json.dumps({"f_weights_choice": "file", "f_weights_file": str(bad)})
    )
    at = page("pages/1_New_run.py")
    assert not at.exception
    assert [e for e in texts(at.error) if str(bad) in e]
    assert not [s for s in texts(at.success) if str(bad) in s]  # no green box beside it


_NO_TORCH_PROBE = """
import sys, threading
from streamlit.testing.v1 import AppTest
from dashboard import common

common._warm_up_started.set()  # the pages' own imports first, with no warm-up
for name in ("app.py", "pages/2_Training.py", "pages/3_Compare.py"):
    at = AppTest.from_file(sys.argv[1] + "/app.py", default_timeout=120)
    if name != "app.py":
        at.switch_page(name)
    at.run()
    assert not at.exception, (name, at.exception)
print("torch" in sys.modules)
common._warm_up_started.clear()
common.warm_up()
for t in threading.enumerate():
    if t.name == common.WARM_UP_THREAD:
        t.join(120)
print("torch" in sys.modules and "finetune_core.estimate" in sys.modules)
"""


def test_home_training_and_compare_answer_without_importing_torch(runs):
    """The pages' scripts never import torch; once drawn, they import New run's modules in
    a background thread, so that New run answers quickly when it is opened."""
    write_group(runs)  # what the pages show must not need torch either
    out = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_PROBE, str(REPO)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def test_new_run_says_what_the_first_run_does_once_before_it_trains(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no builtin weights cached
    at = page("pages/1_New_run.py")
    at.radio(key="f_weights_choice").set_value("builtin").run()
    assert not at.exception
    once = [c for c in texts(at.caption) if c.startswith("Before the first run trains, once")]
    assert once and "builtin weights are pretrained (about" in once[0]


# ---------------------------------------------------------------- a fair comparison (issue 10)


def test_new_run_compares_with_tuned_lrs_and_seeds_by_default_or_the_same_settings(new_run, runs):
    at = new_run
    assert at.toggle(key="f_compare_tune").value is True  # fair by default
    at.number_input(key="f_compare_seeds").set_value(2).run()
    assert not at.exception
    # one trainable map per strategy, not per seed
    assert figure_titled(at, "Trainable map · full") is not None
    assert not [f for f in plotly_figures(at) if "seed" in str(f["layout"].get("title"))]
    assert any("tunes its learning rate" in c.value for c in at.caption)  # what it costs
    at.button(key="launch").click().run()
    made = [store.read_config(Path(p)) for p in store.list_runs(runs)["path"]]
    assert len(made) == 6 and len({c["group"] for c in made}) == 1
    assert sorted((c["strategy"], c["seed"]) for c in made) == [
        ("full", 0),
        ("full", 1),
        ("last_n", 0),
        ("last_n", 1),
        ("linear_probe", 0),
        ("linear_probe", 1),
    ]
    # each strategy tunes its lr; a test split no choice sees; one split for every seed
    assert {(c["tune_lr"], c["test_fraction"], c["split_seed"]) for c in made} == {(True, 0.2, 0)}

    again = page("pages/1_New_run.py")
    again.toggle(key="f_compare_tune").set_value(False).run()
    assert any("Same settings for all" in c.value for c in again.caption)
    from dashboard import form

    cfgs = [cfg for _, cfg in form.build_configs(again.session_state, "none", "builtin:shapes")]
    assert {(c.tune_lr, c.test_fraction) for c in cfgs} == {(False, 0.0)}


def test_new_run_asks_how_much_to_unfreeze_in_one_click(new_run, runs):
    at = new_run
    at.radio(key="f_weights_choice").set_value("none").run()
    at.button(key="launch_depths").click().run()
    assert not at.exception
    made = [store.read_config(Path(p)) for p in store.list_runs(runs)["path"]]
    assert len({c["group"] for c in made}) == 1
    # resnet18: stem, layer1..layer4 -> last_n 0 (the probe) .. 4, then full
    assert sorted((c["strategy"], c["unfreeze_last"]) for c in made) == [
        ("full", 1),
        *[("last_n", k) for k in range(5)],
    ]
    assert all(c["tune_lr"] for c in made)
    assert at.selectbox(key="training_run").value  # on to Training, like Launch


def test_new_run_finds_a_learning_rate_and_fills_the_field_on_accept(new_run):
    at = new_run
    at.toggle(key="f_compare").set_value(False).run()
    at.selectbox(key="f_strategy").set_value("linear_probe").run()
    at.number_input(key="f_image_size").set_value(32).run()
    at.radio(key="f_weights_choice").set_value("none").run()
    at.button(key="lr_find").click().run()
    deadline = time.time() + 180  # a background job, like the estimate
    while not any("range test" in str(f["layout"].get("title")) for f in plotly_figures(at)):
        assert time.time() < deadline, all_text(at)
        time.sleep(0.5)
        at.run()
    assert not at.exception
    chart = figure_titled(at, "Learning-rate range test: loss against lr")
    assert chart["layout"]["xaxis"]["type"] == "log"
    lrs = chart["data"][0]["x"]
    assert len(lrs) >= 10 and lrs == sorted(lrs)  # increasing, one per step
    use = next(b for b in at.button if b.key == "lr_find_use")
    suggested = float(use.label.rsplit(" ", 1)[-1])
    use.click().run()
    assert at.number_input(key="f_lr").value == suggested
    assert not store.list_runs(store.runs_dir()).shape[0]  # no run folder made


def test_training_says_what_the_lr_search_chose_and_what_it_tried(runs):
    run_dir = write_run(runs, "20250101-000000-aaaaaa", strategy="linear_probe", lr=0.0356,
                        tune_lr=True)  # fmt: skip
    trials = [
        {"lr": 0.0113, "val_acc": 0.365, "val_loss": 1.9},
        {"lr": 0.0356, "val_acc": 0.546, "val_loss": 1.5},
        {"lr": 0.113, "error": "the loss diverged"},
    ]
    found = {"method": "val-search", "chosen_lr": 0.0356, "original_lr": 0.01, "trials": trials,
             "blowup_lr": 0.356, "notes": []}  # fmt: skip
    (run_dir / "lr_tuning.json").write_text(json.dumps(found))
    at = page("pages/2_Training.py", run="20250101-000000-aaaaaa")
    assert not at.exception
    captions = " ".join(c.value for c in at.caption)
    assert "lr 0.0356 (tuned)" in captions
    assert "tuned before training: 0.0356 (was 0.01)" in captions
    assert "0.0113: 36.5 %" in captions and "0.113: failed" in captions
