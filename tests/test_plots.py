"""finetune_core.plots: figures, tables and sentences built from run data, without Streamlit."""

from __future__ import annotations

import pandas as pd
import pytest

from finetune_core import plots


def _metrics(run: str | None = None, accs=(0.5, 0.7, 0.8), steps_per_epoch=10, t_epoch=2.0):
    rows = []
    for e, acc in enumerate(accs, start=1):
        for k in (5, 10):
            step = (e - 1) * steps_per_epoch + k
            rows.append(
                dict(
                    split="train",
                    epoch=e,
                    step=step,
                    loss=2.0 / step,
                    acc=acc - 0.1,
                    acc5=None,
                    lr=0.01 / e,
                    time_s=t_epoch * step / steps_per_epoch,
                    images_per_s=100.0 + e,
                    phase=None,
                )
            )
        rows.append(
            dict(
                split="val",
                epoch=e,
                step=e * steps_per_epoch,
                loss=1.0 / e,
                acc=acc,
                acc5=None,
                lr=0.01 / e,
                time_s=t_epoch * e,
                images_per_s=None,
                phase="main",
            )
        )
    frame = pd.DataFrame(rows)
    if run is not None:
        frame["run"] = run
    return frame


def _table(**runs):
    """runs: label=(strategy, best_val_acc, train_time_s, trainable_params)."""
    return pd.DataFrame(
        [
            dict(
                run=k,
                run_id=k,
                strategy=s,
                state="completed",
                best_val_acc=a,
                final_val_acc=a,
                test_acc=None,
                trainable_params=p,
                trainable_pct=None,
                total_params=11_000_000,
                train_time_s=t,
                images_per_s=100.0,
            )
            for k, (s, a, t, p) in runs.items()
        ]
    )


def test_formatting_uses_peoples_units():
    assert plots.fmt_count(11_689_512) == "11.7M"
    assert plots.fmt_count(3_078) == "3.08k"
    assert plots.fmt_count(512) == "512"
    assert plots.fmt_duration(42) == "42 s"
    assert plots.fmt_duration(185) == "3 min 05 s"
    assert plots.fmt_duration(3720) == "1 h 02 min"
    assert plots.fmt_bytes(4_200_000) == "4.2 MB"
    assert plots.fmt_pct(0.8421) == "84.2 %"
    assert plots.fmt_pct(None) == "–"


def test_run_labels_name_strategy_and_option_and_stay_unique():
    labels = plots.run_labels(
        {
            "20250101-000000-aaaaaa": {"strategy": "full"},
            "20250101-000000-bbbbbb": {"strategy": "last_n", "unfreeze_last": 2},
            "20250101-000000-cccccc": {"strategy": "lp_ft", "probe_epochs": 1, "name": "mine"},
            "20250101-000000-dddddd": {"strategy": "full"},
        }
    )
    assert labels["20250101-000000-bbbbbb"] == "last_n 2"
    assert labels["20250101-000000-cccccc"] == "mine"
    assert labels["20250101-000000-aaaaaa"] == "full · aaaaaa"
    assert labels["20250101-000000-dddddd"] == "full · dddddd"


def test_training_charts_plot_train_and_val_series_against_step():
    m = _metrics()
    charts = plots.training_charts(m)
    assert set(charts) == {"loss", "accuracy", "lr", "throughput"}
    loss = {t.name: t for t in charts["loss"].data}
    assert list(loss["train loss"].x) == [5, 10, 15, 20, 25, 30]
    assert list(loss["val loss"].y) == [1.0, 0.5, pytest.approx(1 / 3)]
    acc = {t.name: t for t in charts["accuracy"].data}
    assert list(acc["val acc"].y) == pytest.approx([50, 70, 80])
    assert list(charts["lr"].data[0].y) == pytest.approx(
        [0.01, 0.01, 0.005, 0.005, 0.01 / 3, 0.01 / 3]
    )
    assert list(charts["throughput"].data[0].y) == [101, 101, 102, 102, 103, 103]


def test_training_charts_with_no_metrics_say_so_instead_of_failing():
    empty = pd.DataFrame()
    for fig in plots.training_charts(empty).values():
        assert len(fig.data) == 0
        assert fig.layout.annotations[0].text


def test_run_progress_gives_fraction_and_eta_from_time_per_step():
    status = {"state": "running", "epoch": 2, "epochs": 3, "step": 15, "total_steps": 30}
    fraction, text = plots.run_progress(status, _metrics(accs=(0.5,)).query("step <= 10"))
    assert fraction == pytest.approx(0.5)
    # 10 steps took 2 s -> 15 steps left take 3 s
    assert text == "epoch 2 of 3 · step 15 of 30 · about 3 s left"
    # the worker's own ETA wins
    _, text = plots.run_progress({**status, "eta_s": 75.0}, _metrics())
    assert text.endswith("about 1 min 15 s left")
    fraction, text = plots.run_progress({"state": "completed", "step": 30, "total_steps": 30})
    assert fraction == 1.0 and "left" not in text


def test_run_progress_while_preparing_shows_the_stage():
    status = {
        "state": "running",
        "step": 0,
        "stage_fraction": 0.25,
        "message": "training builtin weights: epoch 2 of 6",
    }
    assert plots.run_progress(status) == (0.25, "training builtin weights: epoch 2 of 6")


def _plan_frame():
    rows = [
        ("probe", "stem", 9_536, 0, False, None),
        ("probe", "layer4", 8_393_728, 0, False, None),
        ("probe", "head", 3_078, 3_078, True, 0.01),
        ("finetune", "stem", 9_536, 9_536, True, 0.001),
        ("finetune", "layer4", 8_393_728, 1_024, True, 0.005),
        ("finetune", "head", 3_078, 3_078, True, 0.01),
    ]
    return pd.DataFrame(
        rows, columns=["phase", "group", "params", "trainable_params", "trainable", "lr"]
    )


def test_trainable_map_draws_one_panel_per_phase_coloured_by_what_trains():
    fig = plots.trainable_map(_plan_frame())
    by = {(t.xaxis, t.name): t for t in fig.data}
    assert list(by[("x", "frozen")].y) == ["stem", "layer4"]
    assert list(by[("x", "trains")].y) == ["head"]
    assert list(by[("x2", "trains")].y) == ["stem", "head"]
    assert list(by[("x2", "partly trains")].y) == ["layer4"]
    assert list(by[("x2", "partly trains")].x) == [8_393_728]
    assert "lr 0.005" in by[("x2", "partly trains")].text[0]
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("probe: 3.08k of 8.41M train")
    assert fig.layout.xaxis.type == "log"
    # the legend lists each kind once
    assert sum(1 for t in fig.data if t.showlegend is not False) == 3


def test_trainable_map_single_phase_has_no_panel_titles():
    frame = _plan_frame().query("phase == 'probe'")
    fig = plots.trainable_map(frame)
    assert fig.layout.title.text.startswith("Trainable map · probe: 3.08k")
    assert {t.name for t in fig.data} == {"frozen", "trains"}


def test_summary_table_reads_summaries_and_falls_back_to_metrics_for_live_runs():
    configs = {"r1": {"strategy": "full"}, "r2": {"strategy": "linear_probe"}}
    summaries = {
        "r1": {
            "state": "completed",
            "best_val_acc": 0.9,
            "final_val_acc": 0.85,
            "test_acc": 0.8,
            "trainable_params": 1000,
            "total_params": 1000,
            "train_time_s": 60.0,
        },
        "r2": None,
    }
    metrics = {"r1": _metrics(), "r2": _metrics(accs=(0.4, 0.6))}
    table = plots.summary_table(configs, summaries, metrics, {"r2": {"state": "running"}})
    r1, r2 = table.iloc[0], table.iloc[1]
    assert (r1["run"], r1["best_val_acc"], r1["trainable_pct"]) == ("full", 0.9, 100.0)
    assert r1["images_per_s"] == 102.0
    assert (r2["state"], r2["best_val_acc"], r2["final_val_acc"]) == ("running", 0.6, 0.6)
    assert r2["train_time_s"] == 4.0


def test_headline_names_best_strategy_its_gap_to_full_and_cost_ratios():
    table = _table(
        full=("full", 0.80, 100.0, 11_000_000),
        **{"last_n 1": ("last_n", 0.83, 40.0, 2_200_000)},
        linear_probe=("linear_probe", 0.70, 10.0, 3_000),
    )
    text = plots.headline(table)
    assert text == (
        "last_n 1 is best with 83.0 % val accuracy, 3.0 points above full fine-tuning "
        "(80.0 %), using 0.4× the training time and 20 % of the trainable parameters."
    )


def test_headline_when_full_wins_reports_the_best_partial_strategy():
    table = _table(
        full=("full", 0.90, 100.0, 11_000_000),
        linear_probe=("linear_probe", 0.75, 10.0, 3_000),
    )
    text = plots.headline(table)
    assert text.startswith("full is best with 90.0 % val accuracy; the best partial strategy, ")
    assert "linear_probe, is 15.0 points from it" in text
    assert "0.1× the training time and 0.027 % of the trainable parameters" in text


def _hits(right: int, images: int, first: int = 0) -> list[bool]:
    """right of images correct, starting at image `first` (wrapping around)."""
    return [((i - first) % images) < right for i in range(images)]


def test_headline_calls_no_winner_inside_the_noise_and_names_the_cheaper():
    table = _table(
        full=("full", 0.80, 100.0, 11_000_000),
        **{"last_n 1": ("last_n", 0.83, 40.0, 2_200_000)},
        linear_probe=("linear_probe", 0.70, 10.0, 3_000),
    )
    # 100 val images: 83 against 80 right, mostly the same ones
    hits = {"full": _hits(80, 100), "last_n 1": _hits(83, 100, first=97), "linear_probe": []}
    text = plots.headline(table, hits)
    assert text.startswith("last_n 1 and full are within noise of each other: 83.0 % and 80.0 %")
    assert "holds 0, so neither wins; last_n 1 is the cheaper, using 0.4× the training time" in text
    assert "on these 100 images" in text and "is best" not in text
    # the same accuracies on 5,000 images where full's right images are a subset: a real gap
    many = {"full": _hits(4000, 5000), "last_n 1": _hits(4150, 5000)}
    assert plots.headline(table, many).startswith("last_n 1 is best with 83.0 % val accuracy")
    # runs scored on other images cannot be paired: the plain sentence
    other = {"full": _hits(80, 100), "last_n 1": _hits(83, 90)}
    assert plots.headline(table, other).startswith("last_n 1 is best")


def test_headline_without_results_or_without_full_still_says_something_true():
    assert "nothing to compare" in plots.headline(_table())
    table = _table(a=("linear_probe", 0.6, 1.0, 10), b=("bitfit", 0.65, 2.0, 20))
    assert plots.headline(table).startswith("b is best with 65.0 % val accuracy, 5.0 points ahead")


def test_compare_curves_draw_one_val_trace_per_run():
    m = pd.concat([_metrics("full", accs=(0.5, 0.8)), _metrics("probe", accs=(0.3, 0.4))])
    fig = plots.compare_curves(m, y="acc", x="epoch")
    assert [t.name for t in fig.data] == ["full", "probe"]
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[0].y) == pytest.approx([50, 80])
    assert list(fig.data[1].y) == pytest.approx([30, 40])
    by_time = plots.compare_curves(m, y="loss", x="time_s")
    assert list(by_time.data[0].x) == [2.0, 4.0] and list(by_time.data[0].y) == [1.0, 0.5]


def test_accuracy_vs_cost_puts_one_marker_per_run():
    table = _table(full=("full", 0.8, 100.0, 11_000_000), lp=("linear_probe", 0.7, 10.0, 3_000))
    fig = plots.accuracy_vs_cost(table, "trainable_params")
    assert [(t.name, t.x[0], t.y[0]) for t in fig.data] == [
        ("full", 11_000_000, pytest.approx(80.0)),
        ("lp", 3_000, pytest.approx(70.0)),
    ]
    assert fig.layout.xaxis.type == "log"
    lo, hi = fig.layout.xaxis.range  # log10 units, with room for the labels
    assert lo < 3.48 and hi > 7.04
    assert fig.layout.yaxis.range[0] < 70 and fig.layout.yaxis.range[1] > 80
    fig = plots.accuracy_vs_cost(table, "train_time_s")
    assert [t.x[0] for t in fig.data] == [100.0, 10.0]


def test_per_class_and_confusion_charts_show_each_run_side_by_side():
    s1 = {
        "classes": ["a", "b"],
        "per_class_acc": {"a": 1.0, "b": 0.5},
        "confusion_matrix": [[4, 0], [2, 2]],
    }
    s2 = {
        "classes": ["a", "b"],
        "per_class_acc": {"a": 0.75, "b": 0.25},
        "confusion_matrix": [[3, 1], [3, 1]],
    }
    bars = plots.per_class_chart({"full": s1, "probe": s2})
    assert [(t.name, list(t.y)) for t in bars.data] == [("full", [100, 50]), ("probe", [75, 25])]
    cm = plots.confusion_chart({"full": s1, "probe": s2})
    assert [t.type for t in cm.data] == ["heatmap", "heatmap"]
    assert [list(r) for r in cm.data[0].z] == [[1.0, 0.0], [0.5, 0.5]]
    assert [a.text for a in cm.layout.annotations] == ["full", "probe"]


def test_config_diff_keeps_only_fields_that_differ():
    diff = plots.config_diff(
        {
            "r1": {"model": "resnet18", "strategy": "full", "lr": 0.01, "name": "a", "group": "g"},
            "r2": {
                "model": "resnet18",
                "strategy": "last_n",
                "lr": 0.01,
                "name": "b",
                "group": "g",
            },
        }
    )
    assert list(diff.index) == ["strategy"]
    assert list(diff.columns) == ["a", "b"]
    assert list(diff.loc["strategy"]) == ["full", "last_n"]


def test_class_counts_chart_stacks_splits_per_class():
    fig = plots.class_counts_chart({"train": {"a": 10, "b": 3}, "val": {"a": 2, "b": 1}})
    assert [(t.name, list(t.x), list(t.y)) for t in fig.data] == [
        ("train", ["a", "b"], [10, 3]),
        ("val", ["a", "b"], [2, 1]),
    ]
    assert fig.layout.title.text == "Images per class (16 in all)"


def test_confusion_matrices_of_runs_on_other_classes_label_their_own_rows():
    a = {"classes": ["cat", "dog"], "confusion_matrix": [[5, 1], [2, 4]]}
    b = {"classes": ["one", "two", "three"], "confusion_matrix": [[3, 0, 0], [0, 3, 0], [1, 0, 2]]}
    fig = plots.confusion_chart({"a": a, "b": b})
    assert [list(t.y) for t in fig.data] == [["cat", "dog"], ["one", "two", "three"]]
    assert fig.layout.yaxis.showticklabels is not False
    assert fig.layout.yaxis2.showticklabels is not False  # not the first run's names
    same = plots.confusion_chart({"a": a, "c": a})
    assert same.layout.yaxis2.showticklabels is False  # shared classes: one set of names


def test_comparison_warns_when_runs_differ_in_data_model_or_epochs():
    base = {"data": "builtin:shapes", "model": "resnet18", "epochs": 3, "strategy": "full"}
    assert plots.comparison_warnings({"a": base, "b": {**base, "strategy": "bitfit"}}) == []
    found = plots.comparison_warnings(
        {"a": base, "b": {**base, "data": "/data/digits.zip", "epochs": 5}}
    )
    assert len(found) == 2
    assert "data" in found[0] and "builtin:shapes" in found[0] and "digits.zip" in found[0]
    assert "epochs" in found[1] and "3" in found[1] and "5" in found[1]


def test_a_run_whose_training_loss_barely_fell_is_called_under_trained():
    learning = _metrics("a")  # loss 2/step: falls from 0.4 to 0.07
    assert plots.undertrained(learning) is None
    flat = learning.copy()
    train = flat["split"] == "train"
    flat.loc[train, "loss"] = [1.80, 1.79, 1.78, 1.78, 1.77, 1.76]  # 2 % lower at the end
    advice = plots.undertrained(flat)
    assert advice.startswith("under-trained: its training loss fell only 2 % (from 1.8 to 1.76)")
    assert "higher learning rate" in advice and "lr-find" in advice
    assert plots.undertrained(flat[flat["split"] == "train"]) is None  # no epoch finished
    assert plots.undertrained(flat.iloc[:0]) is None


def _depth_runs(accs: dict, seeds=(0, 1)):
    """accs: {depth or "full": accuracy}; each depth trained with every seed."""
    configs, summaries = {}, {}
    for depth, acc in accs.items():
        for seed in seeds:
            rid = f"{depth}-{seed}"
            full = depth == "full"
            configs[rid] = {"strategy": "full" if full else "last_n", "seed": seed}
            if not full:
                configs[rid]["unfreeze_last"] = depth
            summaries[rid] = {
                "state": "completed",
                "best_val_acc": acc,
                "best_val_acc_ci": [acc - 0.05, acc + 0.05],
                "train_time_s": 10.0 * (5 if full else depth + 1),
                "trainable_params": 1000 * (10**6 if full else 10**depth),
            }
    return configs, summaries


def test_the_depth_curve_draws_each_depth_once_from_the_probe_to_full():
    configs, summaries = _depth_runs({0: 0.60, 1: 0.78, 2: 0.80, "full": 0.81})
    configs["other"] = {"strategy": "bitfit", "seed": 0}  # not a depth: left out
    summaries["other"] = {"state": "completed", "best_val_acc": 0.5}
    points = plots.depth_points(configs, summaries)
    assert len(points) == 8
    fig = plots.depth_curve(points)
    acc = fig.data[0]
    assert list(acc.x) == ["0 (probe)", "1", "2", "full"]
    assert list(acc.y) == pytest.approx([60, 78, 80, 81])
    assert list(fig.data[1].y) == [10.0, 20.0, 30.0, 50.0]  # train time per depth


def test_the_depth_sentence_names_the_cheapest_depth_within_noise_of_the_best():
    configs, summaries = _depth_runs({0: 0.60, 1: 0.79, 2: 0.80, "full": 0.81})
    # 200 val images per seed: full gets 162 right, the top-1 run 158, the probe 120
    hits = {}
    for rid in configs:
        right, first = {"0": (120, 0), "1": (158, 10), "2": (160, 5), "full": (162, 0)}[
            rid.split("-")[0]
        ]
        hits[rid] = _hits(right, 200, first)  # the runs differ on a few images either way
    points = plots.depth_points(configs, summaries)
    text = plots.depth_sentence(points, hits)
    assert text.startswith(
        "Training the top 1 backbone group is the cheapest within noise of the best "
        "(full fine-tuning: 81.0 % val accuracy): 79.0 %"
    )
    assert "holds 0" in text
    # without per-image predictions it says it cannot tell how sure it is
    assert "cannot be said" in plots.depth_sentence(points, {})
    two = plots.depth_points(*_depth_runs({0: 0.6, "full": 0.8}))
    assert plots.depth_sentence(two, {}) is None  # fewer than 3 depths: no depth view


# ---------------------------------------------------------------- seeds, test accuracy, cost


def _seeded(runs: dict, group="g", test=True):
    """runs: {run_id: (strategy, seed, val acc, test acc or None, train time, extra config)}
    -> configs and summaries of one comparison group."""
    configs, summaries = {}, {}
    for rid, (strategy, seed, val, test_acc, t, extra) in runs.items():
        configs[rid] = {
            "strategy": strategy,
            "seed": seed,
            "lr": 0.01,
            "group": group,
            "epochs": 1,
            "env": {"torch": rid},  # never a difference
            **extra,
        }
        summaries[rid] = {
            "state": "completed",
            "best_val_acc": val,
            "final_val_acc": val,
            "test_acc": test_acc if test else None,
            "test_acc_ci": [test_acc - 0.04, test_acc + 0.04] if test and test_acc else None,
            "best_val_acc_ci": [val - 0.05, val + 0.05],
            "trainable_params": 11_000_000 if strategy == "full" else 3_000,
            "total_params": 11_000_000,
            "train_time_s": t,
        }
    return configs, summaries


def test_summary_table_exposes_intervals_measured_costs_seed_and_lr_and_tolerates_older_runs():
    configs = {
        "new": {"strategy": "full", "seed": 3, "lr": 0.05, "tune_lr": True},
        "old": {"strategy": "full", "seed": 0, "lr": 0.01},  # before tune_lr and the costs
    }
    summaries = {
        "new": {
            "state": "completed",
            "best_val_acc": 0.8,
            "best_val_acc_ci": [0.75, 0.85],
            "test_acc": 0.78,
            "test_acc_ci": [0.7, 0.86],
            "peak_memory_bytes": 123_000_000,
            "memory_measure": "cpu: saved tensors + parameters, gradients, optimizer state",
            "stored_bytes": 45_000_000,
        },
        "old": {"state": "completed", "best_val_acc": 0.7, "test_acc_ci": "broken"},
    }
    table = plots.summary_table(configs, summaries).set_index("run_id")
    new, old = table.loc["new"], table.loc["old"]
    assert (new["test_acc_lo"], new["test_acc_hi"]) == (0.7, 0.86)
    assert (new["best_val_acc_lo"], new["best_val_acc_hi"]) == (0.75, 0.85)
    assert (new["peak_memory_bytes"], new["stored_bytes"]) == (123_000_000, 45_000_000)
    assert new["memory_measure"].startswith("cpu")
    assert (new["seed"], new["lr"], new["tune_lr"]) == (3, 0.05, True)
    assert pd.isna(old["test_acc_lo"]) and pd.isna(old["peak_memory_bytes"])
    assert pd.isna(old["stored_bytes"]) and old["tune_lr"] == False  # noqa: E712


def test_runs_that_differ_only_in_seed_are_one_strategy_reported_as_mean_and_std():
    configs, summaries = _seeded(
        {
            "20250101-000000-aaaaa0": ("full", 0, 0.80, 0.78, 100.0, {}),
            "20250101-000000-aaaaa1": ("full", 1, 0.82, 0.80, 110.0, {}),
            # tuned: each seed may get its own lr, still one strategy
            "20250101-000000-bbbbb0": ("linear_probe", 0, 0.60, 0.58, 10.0, {"tune_lr": True}),
            "20250101-000000-bbbbb1": ("linear_probe", 1, 0.64, 0.62, 12.0, {"tune_lr": True}),
            # another lr without tuning is another setting: its own row
            "20250101-000000-ccccc0": ("linear_probe", 0, 0.70, 0.69, 10.0, {"lr": 0.1}),
        }
    )
    configs["20250101-000000-bbbbb1"]["lr"] = 0.3
    groups = plots.seed_groups(configs)
    assert list(groups) == ["full", "linear_probe", "linear_probe · ccccc0"]
    assert groups["full"] == ["20250101-000000-aaaaa0", "20250101-000000-aaaaa1"]
    labels = plots.member_labels(groups, configs)
    assert labels["20250101-000000-aaaaa1"] == "full seed 1"
    assert labels["20250101-000000-ccccc0"] == "linear_probe · ccccc0"

    table = plots.summary_table(configs, summaries)
    per = plots.seed_table(table, groups).set_index("run")
    full = per.loc["full"]
    assert full["seeds"] == 2 and full["run_ids"] == tuple(groups["full"])
    assert full["best_val_acc"] == pytest.approx(0.81)
    assert full["best_val_acc_std"] == pytest.approx(0.01414, abs=1e-4)  # sample std
    assert full["test_acc"] == pytest.approx(0.79) and full["train_time_s"] == 105.0
    alone = per.loc["linear_probe · ccccc0"]
    assert alone["seeds"] == 1 and alone["best_val_acc"] == 0.70
    assert pd.isna(alone["best_val_acc_std"])

    shown = plots.results_table(plots.seed_table(table, groups)).set_index("run")
    assert list(shown.columns[:6]) == [
        "seeds",
        "state",
        "best_val_acc",
        "test_acc",
        "final_val_acc",
        "interval",
    ]
    assert shown.loc["full", "best_val_acc"] == "81.0 ± 1.4"
    assert shown.loc["full", "test_acc"] == "79.0 ± 1.4"
    assert shown.loc["full", "train_time"] == "1 min 45 s ± 7 s"
    assert shown.loc["linear_probe", "lr"] == "0.01, 0.3 · tuned"
    assert shown.loc["linear_probe · ccccc0", "lr"] == "0.1"
    assert shown.loc["linear_probe · ccccc0", "interval"] == "65.0–73.0 %"  # its test CI
    assert shown.loc["linear_probe · ccccc0", "peak_memory"] == ""  # not measured
    del summaries["20250101-000000-ccccc0"]["test_acc_ci"]
    del configs["20250101-000000-ccccc0"]  # every row a strategy with seeds: no interval
    table = plots.summary_table(configs, summaries)
    assert "interval" not in plots.results_table(
        plots.seed_table(table, {k: v for k, v in groups.items() if "ccccc0" not in k})
    )


def test_seeds_share_one_under_trained_warning_and_one_per_class_and_confusion_panel():
    flat = _metrics("a")
    flat.loc[flat["split"] == "train", "loss"] = [1.80, 1.79, 1.78, 1.78, 1.77, 1.76]
    note = plots.undertrained_note({"full seed 0": flat, "full seed 1": flat, "ok": _metrics()})
    assert note.startswith(
        "2 runs are under-trained, their training loss fell less than 10 %: full seed 0 (2 %), "
        "full seed 1 (2 %). Try a higher learning rate"
    )
    assert plots.undertrained_note({"full": flat}) == f"full is {plots.undertrained(flat)}"
    assert plots.undertrained_note({"ok": _metrics()}) is None
    summaries = {
        "a": {
            "classes": ["x", "y"],
            "per_class_acc": {"x": 1.0, "y": 0.5},
            "confusion_matrix": [[4, 0], [2, 2]],
        },
        "b": {
            "classes": ["x", "y"],
            "per_class_acc": {"x": 0.5, "y": 0.5},
            "confusion_matrix": [[2, 2], [2, 2]],
        },
        "c": {
            "classes": ["x", "y"],
            "per_class_acc": {"x": 0.0, "y": 1.0},
            "confusion_matrix": [[0, 4], [0, 4]],
        },
    }
    pooled = plots.seed_summaries({"full": ["a", "b"], "probe": ["c"]}, summaries)
    assert pooled["full"]["per_class_acc"] == {"x": 0.75, "y": 0.5}
    assert pooled["full"]["confusion_matrix"] == [[6, 2], [4, 4]]
    assert pooled["probe"] == summaries["c"]


def test_a_comparison_of_single_runs_looks_as_before():
    configs, summaries = _seeded(
        {"a": ("full", 0, 0.8, 0.7, 100.0, {}), "b": ("bitfit", 0, 0.6, 0.5, 50.0, {})}
    )
    table = plots.summary_table(configs, summaries)
    groups = plots.seed_groups(configs)
    per = plots.seed_table(table, groups)
    assert list(per["run"]) == list(table["run"]) == ["full", "bitfit"]
    assert plots.headline(per) == plots.headline(table)
    shown = plots.results_table(per)
    assert "seeds" not in shown and list(shown["best_val_acc"]) == pytest.approx([80.0, 60.0])


def test_curves_of_a_strategy_with_seeds_draw_the_mean_in_a_band_from_lowest_to_highest():
    m = pd.concat(
        [
            _metrics("full", accs=(0.5, 0.8)).assign(run_id="f0"),
            _metrics("full", accs=(0.6, 0.7), t_epoch=4.0).assign(run_id="f1"),
            _metrics("probe", accs=(0.3, 0.4)).assign(run_id="p0"),
        ]
    )
    fig = plots.compare_curves(m, y="acc", x="epoch")
    assert fig.layout.title.text.endswith("· seeds: mean, min–max band")
    band, mean, probe = fig.data
    assert band.fill == "toself" and band.showlegend is False
    assert list(band.x) == [1, 2, 2, 1]
    assert list(band.y) == pytest.approx([60, 80, 70, 50])  # highest forward, lowest back
    assert mean.name == "full" and "mean of %{customdata[2]} seeds" in mean.hovertemplate
    assert list(mean.y) == pytest.approx([55, 75])
    assert probe.name == "probe" and probe.fill is None  # one seed: a plain line
    by_time = plots.compare_curves(m, y="loss", x="time_s")
    assert list(by_time.data[1].x) == [3.0, 6.0]  # the seeds' mean wall time per epoch
    single = plots.compare_curves(_metrics("full").assign(run_id="f0"))
    assert [t.name for t in single.data] == ["full"]
    assert "band" not in single.layout.title.text


def test_the_headline_uses_test_accuracy_when_every_run_has_one_and_pools_seeds():
    runs = {
        "f0": ("full", 0, 0.82, 0.80, 100.0, {}),
        "f1": ("full", 1, 0.84, 0.82, 100.0, {}),
        "l0": ("last_n", 0, 0.80, 0.81, 40.0, {"unfreeze_last": 1}),
        "l1": ("last_n", 1, 0.82, 0.83, 40.0, {"unfreeze_last": 1}),
    }
    configs, summaries = _seeded(runs)
    table = plots.summary_table(configs, summaries)
    assert plots.accuracy_basis(table) is plots.TEST
    per = plots.seed_table(table, plots.seed_groups(configs))
    # no predictions: the plain sentence, by test accuracy (the val ranking is the other way)
    assert plots.headline(per) == (
        "last_n 1 is best with 82.0 % test accuracy (mean of 2 seeds), 1.0 point above full "
        "fine-tuning (81.0 %), using 0.4× the training time and 0.027 % of the trainable "
        "parameters."
    )
    # 100 test images per seed, mostly the same ones right: within noise, pooled over seeds
    hits = {
        "f0": _hits(80, 100),
        "f1": _hits(82, 100),
        "l0": _hits(81, 100, first=98),
        "l1": _hits(83, 100, first=97),
    }
    text = plots.headline(per, plots.pooled_hits(per, hits))
    assert text.startswith(
        "last_n 1 and full are within noise of each other: 82.0 % and 81.0 % test accuracy "
        "(means over seeds)"
    )
    assert "on these 100 images × 2 seeds) holds 0" in text
    # one run without a test split: every figure falls back to val accuracy, and says so
    summaries["l1"]["test_acc"] = None
    table = plots.summary_table(configs, summaries)
    assert plots.accuracy_basis(table) is plots.VAL
    per = plots.seed_table(table, plots.seed_groups(configs))
    assert plots.headline(per).startswith("full is best with 83.0 % val accuracy (mean of 2")


def _costs(**runs):
    """runs: label=(accuracy, trainable params, peak memory bytes or None)."""
    return pd.DataFrame(
        [
            dict(run=k, run_id=k, best_val_acc=a, trainable_params=p, peak_memory_bytes=m)
            for k, (a, p, m) in runs.items()
        ]
    )


def test_the_pareto_front_keeps_the_runs_no_other_beats_on_accuracy_and_cost():
    table = _costs(
        probe=(0.60, 3_000, 50e6),
        top1=(0.80, 2_000_000, 90e6),
        top2=(0.79, 4_000_000, 80e6),  # beaten on parameters by top1
        full=(0.80, 11_000_000, 160e6),  # as accurate as top1, costlier: beaten
        twin=(0.80, 2_000_000, None),  # ties top1 on both: both on the front
        bad=(None, 1_000, 10e6),  # no accuracy: left out
    )
    assert plots.pareto_front(table, "trainable_params") == ["probe", "top1", "twin"]
    # on memory: twin has none (an older run) and top2 is cheaper than top1
    assert plots.pareto_front(table, "peak_memory_bytes") == ["probe", "top2", "top1"]
    same_cost = _costs(a=(0.7, 100, None), b=(0.75, 100, None))
    assert plots.pareto_front(same_cost, "trainable_params") == ["b"]
    assert plots.pareto_front(table.iloc[:0], "trainable_params") == []
    assert plots.pareto_front(table, "stored_bytes") == []  # no such column: no front


def test_accuracy_vs_cost_marks_the_front_and_names_the_runs_left_out():
    table = _costs(
        probe=(0.60, 3_000, 50e6),
        top1=(0.80, 2_000_000, 90e6),
        full=(0.80, 11_000_000, None),
    )
    fig = plots.accuracy_vs_cost(table, "peak_memory_bytes", plots.VAL)
    assert fig.layout.title.text.startswith("Accuracy vs peak memory")
    assert [(t.name, t.x[0], t.marker.symbol) for t in fig.data] == [
        ("probe", 50.0, "diamond"),
        ("top1", 90.0, "diamond"),
    ]  # in MB; full has no memory figure
    assert fig.layout.shapes[0].path == "M 50.0,60.0 H 90.0 V 80.0"
    assert "1 run(s) without a measured peak memory left out" in fig.layout.annotations[0].text
    assert fig.layout.yaxis.title.text == "val accuracy (%)"
    by_params = plots.accuracy_vs_cost(table, "trainable_params", plots.VAL)
    symbols = {t.name: t.marker.symbol for t in by_params.data}
    assert symbols == {"probe": "diamond", "top1": "diamond", "full": "circle"}
    assert plots.pareto_sentence(table, "trainable_params", plots.VAL) == (
        "Best trade-offs of val accuracy against trainable parameters (the Pareto front, "
        "cheapest first): probe, top1; a run at least as accurate for no more trainable "
        "parameters beats full."
    )
    assert plots.pareto_sentence(table, "peak_memory_bytes", plots.VAL).endswith(
        "Left out for want of a measured peak memory (runs from before it was recorded): full."
    )
    empty = plots.accuracy_vs_cost(table, "stored_bytes", plots.VAL)
    assert not empty.data and "stored size" in empty.layout.annotations[0].text


def test_the_depth_view_draws_surgical_runs_as_their_own_series_with_peak_memory():
    configs, summaries = _depth_runs({0: 0.60, 1: 0.78, 2: 0.80, "full": 0.81})
    for group, acc in ((1, 0.77), (2, 0.83)):
        for seed in (0, 1):
            rid = f"s{group}-{seed}"
            configs[rid] = {"strategy": "surgical", "surgical_group": group, "seed": seed}
            summaries[rid] = {
                "state": "completed",
                "best_val_acc": acc,
                "train_time_s": 15.0,
                "trainable_params": 1000 * 10**group,
            }
    for rid, s in summaries.items():  # every run tested, most measured memory
        s["test_acc"] = s["best_val_acc"] - 0.01
        s["test_acc_ci"] = [s["test_acc"] - 0.03, s["test_acc"] + 0.03]
        if rid != "full-0":
            s["peak_memory_bytes"] = 10_000_000 * (1 + len(rid))
    points = plots.depth_points(configs, summaries)
    assert set(points["split"]) == {"test"} and len(points) == 12
    assert list(points.loc[points["series"] == "surgical", "depth"]) == [1, 1, 2, 2]
    fig = plots.depth_curve(points)
    traces = {t.name: t for t in fig.data}
    top = traces["top k groups (last_n): test accuracy, 95 % interval"]
    assert list(top.x) == ["0 (probe)", "1", "2", "full"]
    assert list(top.y) == pytest.approx([59, 77, 79, 80])
    surgical = traces["only group k (surgical): test accuracy, 95 % interval"]
    assert list(surgical.x) == ["1", "2"] and list(surgical.y) == pytest.approx([76, 82])
    memory = traces["peak memory (MB), top k groups"]
    assert memory.yaxis == "y3" and list(memory.x) == ["0 (probe)", "1", "2", "full"]
    assert fig.layout.yaxis3.title.text == "peak memory (MB)"
    assert list(fig.layout.xaxis.categoryarray) == ["0 (probe)", "1", "2", "full"]
    assert fig.layout.xaxis.type == "category"  # "1", "2" are places, not numbers
    assert "train time (s), only group k" in traces
    text = plots.depth_sentence(points, {})
    assert text.startswith(
        "The best depth is training only backbone group 2 from the top (surgical) "
        "(82.0 % test accuracy)"
    )
    # runs before peak memory was measured: no memory axis
    for s in summaries.values():
        s.pop("peak_memory_bytes", None)
    plain = plots.depth_curve(plots.depth_points(configs, summaries))
    assert not [t for t in plain.data if "memory" in t.name]
    assert "yaxis3" not in plain.to_plotly_json()["layout"]
