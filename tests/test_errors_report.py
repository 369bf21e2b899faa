"""Errors you can see and the offline report: the curve controls (TensorBoard's smoothing, x
axis, log scales), which images a confusion cell holds (from a real run's predictions and
the images it kept), the difference of two runs' matrices and per-class deltas, and the
report (every figure's data, plotly.js inlined once, no script from anywhere) and its CLI.

The report opening offline in the real Chromium, and a clicked cell on Compare showing
images, are in tests/test_e2e_browser.py.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest
from dashboard_fixtures import write_group, write_run
from PIL import Image
from plotly.io.json import to_json_plotly
from streamlit.testing.v1 import AppTest

from finetune_core import plots, store

REPO = Path(__file__).resolve().parent.parent


def _metrics(run=None, run_id=None, accs=(0.5, 0.7), steps_per_epoch=10):
    rows = []
    for e, acc in enumerate(accs, start=1):
        for k in (5, 10):
            step = (e - 1) * steps_per_epoch + k
            rows.append(
                dict(split="train", epoch=e, step=step, loss=4.0 / step, acc=acc - 0.1)
                | dict(lr=0.01 / e, time_s=0.3 * step, images_per_s=100.0)
            )
        rows.append(
            dict(split="val", epoch=e, step=e * steps_per_epoch, loss=1.0 / e, acc=acc)
            | dict(lr=0.01 / e, time_s=3.0 * e, images_per_s=None)
        )
    frame = pd.DataFrame(rows)
    if run is not None:
        frame = frame.assign(run=run, run_id=run_id or run)
    return frame


# ---------------------------------------------------------------- curves


def test_smoothing_is_tensorboards_debiased_moving_average():
    # by hand, weight 0.5: averages 0.5, 0.5·0.5 + 0.5·3 = 1.75, 0.5·1.75 + 0.5·5 = 3.375,
    # each over 1 − 0.5^n
    assert plots.ema([1.0, 3.0, 5.0], 0.5) == pytest.approx([1.0, 1.75 / 0.75, 3.375 / 0.875])
    assert plots.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull to 0
    assert plots.ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    smoothed = plots.ema([1.0, math.nan, 3.0], 0.5)  # a NaN stays and does not count
    assert smoothed[0] == 1.0 and math.isnan(smoothed[1])
    assert smoothed[2] == pytest.approx(plots.ema([1.0, 3.0], 0.5)[1])


def test_train_curves_smooth_keep_the_raw_one_and_take_epoch_step_or_time_and_log_axes():
    m = _metrics()
    loss = plots.loss_chart(m, smoothing=0.6, log_y=True)
    by_name = {t.name: t for t in loss.data}
    assert list(by_name["train loss"].y) == [0.8, 0.4, 4 / 15, 0.2]  # raw, fainter
    assert by_name["train loss"].opacity == pytest.approx(0.3)
    assert list(by_name["train loss (smoothed)"].y) == pytest.approx(
        plots.ema([0.8, 0.4, 4 / 15, 0.2], 0.6)
    )
    assert loss.layout.yaxis.type == "log" and loss.layout.title.text == "Loss · smoothed 0.6"
    # epoch: a train record at its fraction of the epochs, a val record at its epoch
    epochs = plots.loss_chart(m, x="epoch")
    assert list(epochs.data[0].x) == [0.5, 1.0, 1.5, 2.0]
    assert list(epochs.data[1].x) == [1.0, 2.0]
    assert epochs.layout.xaxis.title.text == "epoch"
    timed = plots.training_charts(m, x="time_s", log_lr=True)
    assert list(timed["lr"].data[0].x) == pytest.approx([1.5, 3.0, 4.5, 6.0])
    assert timed["lr"].layout.yaxis.type == "log"
    assert timed["throughput"].layout.xaxis.title.text == "wall time (s)"
    assert plots.training_charts(m)["loss"].layout.yaxis.type == "linear"  # as before


def test_compare_draws_train_curves_smoothed_per_run_and_seeds_as_a_band_per_step():
    m = pd.concat(
        [
            _metrics("full", "f0"),
            _metrics("full", "f1").assign(loss=lambda f: f["loss"] * 2),
            _metrics("probe", "p0"),
        ]
    )
    fig = plots.compare_curves(m, "loss", "step", split="train", smoothing=0.5, log_y=True)
    band, mean, probe = fig.data
    assert fig.layout.title.text == "Train loss by step · smoothed 0.5 · seeds: mean, min–max band"
    assert list(mean.x) == [5, 10, 15, 20]
    f0 = plots.ema([0.8, 0.4, 4 / 15, 0.2], 0.5)
    f1 = plots.ema([1.6, 0.8, 8 / 15, 0.4], 0.5)
    assert list(mean.y) == pytest.approx([(a + b) / 2 for a, b in zip(f0, f1, strict=True)])
    assert list(band.y) == pytest.approx(f1 + f0[::-1])  # highest forward, lowest back
    assert list(probe.y) == pytest.approx(f0)
    assert fig.layout.yaxis.type == "log"
    lr = plots.compare_curves(m, "lr", "epoch", split="train")
    assert lr.layout.title.text.startswith("Learning rate (head) by epoch")
    assert list(lr.data[-1].x) == [0.5, 1.0, 1.5, 2.0]


# ---------------------------------------------------------------- two runs' matrices

A = {
    "classes": ["a", "b"],
    "per_class_acc": {"a": 1.0, "b": 0.5},
    "confusion_matrix": [[4, 0], [2, 2]],
}
B = {
    "classes": ["a", "b"],
    "per_class_acc": {"a": 0.75, "b": 0.25},
    "confusion_matrix": [[3, 1], [3, 1]],
}


def test_the_diff_view_is_run_b_minus_run_a_per_true_class_centred_on_zero():
    diff = plots.confusion_difference(A, B)  # shares [[1, 0], [.5, .5]] and [[.75, .25]] * 2
    assert [v for row in diff for v in row] == pytest.approx([-0.25, 0.25, 0.25, -0.25])
    fig = plots.confusion_diff_chart({"full": A, "probe": B}, "full", "probe")
    heat = fig.data[0]
    assert fig.layout.title.text == "Confusion difference: probe − full"
    assert [v for row in heat.z for v in row] == pytest.approx([-25, 25, 25, -25])  # points
    assert heat.zmid == 0 and heat.zmin == -heat.zmax
    assert [list(r) for r in heat.text] == [["-25", "+25"], ["+25", "-25"]]
    other = {"classes": ["x", "y"], "confusion_matrix": [[1, 0], [0, 1]]}
    assert plots.confusion_difference(A, other) is None  # other classes: no difference
    assert "Needs two" in str(plots.confusion_diff_chart({"a": A, "x": other}, "a", "x").layout)


def test_per_class_deltas_are_each_runs_accuracy_minus_the_baselines():
    c = {**B, "per_class_acc": {"a": 0.5, "b": 1.0}}
    deltas = plots.per_class_deltas({"full": A, "probe": B, "c": c}, "full")
    assert deltas[["run", "class"]].values.tolist() == [
        ["probe", "a"],
        ["probe", "b"],
        ["c", "a"],
        ["c", "b"],
    ]
    assert list(deltas["delta"]) == pytest.approx([-0.25, -0.25, -0.5, 0.5])
    fig = plots.per_class_delta_chart({"full": A, "probe": B, "c": c}, "full")
    assert [(t.name, list(t.y)) for t in fig.data] == [
        ("probe", pytest.approx([-25, -25])),
        ("c", pytest.approx([-50, 50])),
    ]
    assert plots.per_class_deltas({"full": A}, "full").empty


# ---------------------------------------------------------------- the drill-down


def test_a_selectable_confusion_chart_has_one_clickable_marker_per_cell_naming_it():
    fig = plots.confusion_chart({"full": A, "probe": B}, selectable=True)
    assert [t.type for t in fig.data] == ["heatmap", "scatter", "heatmap", "scatter"]
    cells = fig.data[3]
    assert list(cells.x) == ["a", "b", "a", "b"] and list(cells.y) == ["a", "a", "b", "b"]
    assert [list(c) for c in cells.customdata][1] == ["probe", "a", "b", 1.0, 0.25]
    assert cells.marker.opacity == 0 and cells.selected.marker.opacity == 1
    assert fig.layout.hoverdistance == -1  # a click anywhere in a cell picks its marker
    # what Streamlit's on_select returns for a click on that marker
    selection = {
        "points": [{"curve_number": 3, "point_index": 1, "customdata": list(cells.customdata[1])}]
    }
    assert plots.confusion_cell(selection) == {"run": "probe", "true": "a", "pred": "b"}
    assert plots.confusion_cell({"points": []}) is None
    assert plots.most_confused(A) == ("b", "a")


def test_a_cell_holds_its_images_mistakes_most_confident_first_right_ones_least():
    preds = pd.DataFrame(
        {
            "split": ["val"] * 6 + ["test"],
            "index": [0, 1, 2, 3, 4, 5, 0],
            "true": [0, 0, 0, 1, 1, 0, 0],
            "pred": [1, 1, 0, 1, 1, 1, 1],
            "confidence": [0.6, 0.9, 0.8, 0.7, 0.55, 0.6, 0.99],
        }
    )
    wrong = plots.cell_images({"r0": preds, "r1": preds.iloc[:2]}, 0, 1, "val")
    assert wrong[["run_id", "index"]].values.tolist() == [
        ["r0", 1],
        ["r1", 1],
        ["r0", 0],
        ["r0", 5],
        ["r1", 0],
    ]  # confidence 0.9, 0.9, 0.6, 0.6, 0.6 (ties: run order, then index)
    right = plots.cell_images({"r0": preds}, 1, 1, "val")
    assert list(right["index"]) == [4, 3]
    assert plots.cell_images({"old": None}, 0, 1).empty


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run (builtin:shapes, random init, 32 px, 1 epoch) trained by the CLI."""
    runs = tmp_path_factory.mktemp("runs")
    out = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", "--data", "builtin:shapes"]
        + ["--weights", "none", "--image-size", "32", "--epochs", "1", "--augment", "none"]
        + ["--test-fraction", "0.2", "--runs-dir", str(runs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1])


def test_a_real_run_keeps_the_images_each_cell_shows_as_the_pixels_it_was_scored_on(trained):
    from finetune_core import engine
    from finetune_core.data import thumbnails

    summary = store.read_summary(trained)
    predictions = store.read_predictions(trained)
    kept = store.scored_images(trained)
    assert kept["per_cell"] == thumbnails.PER_CELL and set(kept["splits"]) == {"val", "test"}
    cm = summary["confusion_matrix"]
    k = len(cm)
    exp = engine.prepare(store.run_config(trained))  # the run's own data, split and size
    for t in range(k):
        for p in range(k):
            cell = plots.cell_images({trained.name: predictions}, t, p, "val")
            assert len(cell) == cm[t][p]  # the cell holds the images the matrix counts
            first = set(cell["index"].head(thumbnails.PER_CELL))
            assert {i for i in kept["splits"]["val"] if i in set(cell["index"])} == first
    some = sorted(kept["splits"]["val"])[:5]
    for i, png in store.read_scored_images(trained, "val", some).items():
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert pixels.shape == (32, 32, 3)
        assert (pixels == exp.data.val.images[i].permute(1, 2, 0).numpy()).all()
    assert store.read_scored_images(trained, "val", [10**6]) == {}


def test_compare_shows_a_cells_images_chosen_by_the_select_boxes_and_says_when_runs_have_none(
    trained, monkeypatch
):
    """The keyboard's way to a cell (the select boxes beside the matrices), on Compare."""
    root = trained.parent
    old = "20250101-000000-aaaaaa"
    if not (root / old).exists():
        write_run(root, old, strategy="linear_probe")  # from before runs kept predictions
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(root))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.switch_page("pages/3_Compare.py")
    at.query_params["runs"] = f"{trained.name},{old}"
    at.run()
    assert not at.exception
    summary = store.read_summary(trained)
    cm, classes = summary["confusion_matrix"], summary["classes"]
    t, p = plots.most_confused(summary)  # what the boxes show before any click
    assert [at.selectbox(key=k).value for k in ("cell_run", "cell_true", "cell_pred")] == [
        "full",
        t,
        p,
    ]
    t = p = max(range(len(cm)), key=lambda i: cm[i][i])  # a right answer's cell, by keyboard
    at.selectbox(key="cell_true").set_value(classes[t])
    at.selectbox(key="cell_pred").set_value(classes[p]).run()
    heading = [m.value for m in at.markdown if "val image" in m.value]
    assert heading == [
        f"**{cm[t][p]} val images of {classes[t]} predicted right** (full, best checkpoint)"
    ]
    (shown,) = at.get("image")
    assert len(shown.proto.imgs) == min(cm[t][p], 32)
    first = plots.cell_images({trained.name: store.read_predictions(trained)}, t, t)
    assert shown.proto.imgs[0].caption == plots.cell_caption(first.iloc[0], classes)
    at.selectbox(key="cell_run").set_value("linear_probe").run()
    assert any("recorded no per-image predictions" in i.value for i in at.info)
    assert not at.get("image")


def test_runs_from_before_show_no_images_and_say_so(tmp_path):
    old = write_run(tmp_path, "20250101-000000-aaaaaa")
    assert store.read_predictions(old) is None and store.scored_images(old) is None
    assert store.read_scored_images(old, "val", [0]) == {}
    (old / "scored_images.zip").write_bytes(b"not a zip")
    assert store.scored_images(old) is None


# ---------------------------------------------------------------- the report


def _figures(html: str) -> list[tuple[list, dict]]:
    """Returns (data, layout) of every Plotly.newPlot call in a report."""
    found, at = [], 0
    decoder = json.JSONDecoder()
    while (at := html.find("Plotly.newPlot(", at)) >= 0:
        at = html.index(",", at) + 1
        data, end = decoder.raw_decode(html[at:].lstrip())
        at += len(html[at:]) - len(html[at:].lstrip()) + end + 1
        layout, end = decoder.raw_decode(html[at:].lstrip())
        found.append((data, layout))
    return found


def test_the_report_holds_every_compare_figure_with_plotly_inlined_once_and_no_script_src(
    tmp_path,
):
    from finetune_core import report

    ids = write_group(tmp_path)
    dirs = [tmp_path / r for r in ids]
    html = report.report_html(dirs)
    assert not re.search(r"<script[^>]*\ssrc\s*=", html, re.IGNORECASE)  # no script from afar
    assert not re.search(r"<link[^>]*\shref\s*=", html, re.IGNORECASE)  # nor a style sheet
    assert html.count("window.PlotlyConfig") == 1  # the bundle, once, with the first figure
    figures = [f for s in report.sections(dirs) for f in s.figures]
    drawn = _figures(html)
    assert len(drawn) == len(figures) >= 9
    for fig, (data, _layout) in zip(figures, drawn, strict=True):
        assert data == json.loads(to_json_plotly(fig.to_dict()["data"]))
    titles = [layout.get("title", {}).get("text", "") for _d, layout in drawn]
    for wanted in (
        "Accuracy vs trainable parameters",
        "Accuracy vs train time",
        "Val accuracy (%) by epoch",
        "Val loss by epoch",
        "Train loss by epoch",
        "Per-class accuracy",
        "Confusion matrices",
        "Per-class delta against full",
        "Confusion difference: last_n 1 − full",
    ):
        assert any(t.startswith(wanted) for t in titles), (wanted, titles)
    assert "last_n 1 is best with 83.0 % val accuracy" in html  # the headline
    assert "<td>83.0</td>" in html  # the table of final metrics
    settings = html.split("Settings that differ")[1]
    assert "<th>strategy</th>" in settings and "<td>linear_probe</td>" in settings
    assert report.report_html(dirs) == html  # the same runs, the same bytes
    default = pio.templates.default
    pio.templates.default = "ggplot2"  # as Streamlit makes its own the default on import
    try:
        assert report.report_html(dirs) == html  # whoever writes it: the CLI or the page
    finally:
        pio.templates.default = default


def test_the_report_cli_writes_into_the_runs_folder_and_names_the_flag_of_each_error(tmp_path):
    from finetune_core import report

    runs = tmp_path / "runs"
    ids = write_group(runs)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "finetune_core", "report", *args, "--runs-dir", str(runs)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = cli("--group", "20250101-120000-abcdef")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_absolute() and path == runs / "reports" / "20250101-120000-abcdef.html"
    assert path.read_text() == report.report_html([runs / r for r in ids])
    mine = tmp_path / "out" / "two.html"
    done = cli(ids[0], ids[2][:15], "--output", str(mine))
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == str(mine)
    assert "Comparison of runs " in mine.read_text()  # two of the group's three
    unknown = cli("20990101-000000-ffffff")
    assert unknown.returncode == 2 and "RUN: no run '20990101-000000-ffffff'" in unknown.stderr
    nothing = cli()
    assert nothing.returncode == 2 and "--group" in nothing.stderr
    empty = cli("--group", "nope")
    assert empty.returncode == 2 and "--group: no runs of group 'nope'" in empty.stderr
    (tmp_path / "afile").write_text("")
    blocked = cli(ids[0], "--output", str(tmp_path / "afile" / "r.html"))
    assert blocked.returncode == 2 and "--output: cannot write" in blocked.stderr
