"""Compare: which strategy, at what cost. Headline, the depth view, accuracy against each cost
with its Pareto front, curves (a band over seeds; smoothing, x axis, log scales), table,
per-class, confusion matrices (a clicked cell shows its images), where two strategies
differ, config diff, and the report as one HTML file. Runs that differ only in their seed
are one strategy.

?group=<id> or ?runs=id,id,... selects the runs; otherwise the newest group.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.common import (
    LIVE_REFRESH_S,
    PAGES,
    run_choice_labels,
    setup_page,
    share_column,
    stop_group_button,
    viewer,
    warm_up,
)
from dashboard.errors import confusion_drill_down, curve_controls, differences
from dashboard.exports import export_one_of
from finetune_core import plots, report, store

root = setup_page("Compare")
me = viewer()  # signed in on a shared server, or nobody (the local mode)
st.title("Compare")

runs = me.visible_runs(store.list_runs(root))
if runs.empty:
    st.info(
        "Nothing to compare yet. On **New run**, turn on *Compare strategies* to launch full "
        "and partial fine-tuning as one group; the comparison appears here."
    )
    st.page_link(PAGES["new"], label="New run", icon=":material/rocket_launch:")
    st.stop()

ids = list(runs["run_id"])
problems = []


def _from_query() -> list[str]:
    if st.query_params.get("runs"):
        chosen = []
        for ref in st.query_params["runs"].split(","):
            try:
                chosen.append(store.resolve_run_id(ref.strip(), root).name)
            except store.RunError as e:
                problems.append(str(e))
        return chosen
    group = st.query_params.get("group")
    if group:
        chosen = list(runs.loc[runs["group"] == group, "run_id"])[::-1]
        if not chosen:
            problems.append(f"no runs of group {group!r} in {root}")
        return chosen
    grouped = runs.dropna(subset=["group"])
    if not grouped.empty:  # the newest group, in launch order
        return list(runs.loc[runs["group"] == grouped["group"].iloc[0], "run_id"])[::-1]
    return ids[:3][::-1]


query_key = (st.query_params.get("runs"), st.query_params.get("group"))
if st.session_state.get("_compare_query") != query_key or "compare_runs" not in st.session_state:
    st.session_state["compare_runs"] = [r for r in _from_query() if r in ids]
    st.session_state["_compare_query"] = query_key
st.session_state["compare_runs"] = [r for r in st.session_state["compare_runs"] if r in ids]
for p in problems:
    st.warning(f"{p}. Pick runs below.")

labels = run_choice_labels(runs)


def _pick() -> None:
    st.query_params.clear()
    st.query_params["runs"] = ",".join(st.session_state["compare_runs"])
    st.session_state["_compare_query"] = (st.query_params.get("runs"), None)


chosen = st.multiselect(
    "Runs",
    ids,
    key="compare_runs",
    format_func=lambda r: labels.get(r, r),
    on_change=_pick,
    help="Runs of a group share seed, split and epochs.",
)
if not chosen:
    st.info("Pick two or more runs to compare.")
    st.stop()


def what_changed(groups: dict[str, list[str]]) -> None:
    """What fine-tuning changed: each strategy's weight drift per group and epoch, side by
    side on one colour scale (seeds averaged)."""
    drifts = {r: store.read_drift(root / r) for rids in groups.values() for r in rids}
    if all(d.empty for d in drifts.values()):
        return
    st.plotly_chart(plots.drift_heatmaps(drifts, groups), key="drift", width="stretch")
    st.caption(
        "How far each group's weights moved from where the run started: ‖θ − θ₀‖ / ‖θ₀‖ "
        "after each epoch, one colour scale (log) for every strategy; grey is exactly 0, "
        "a group that has not trained (yet). Dotted lines on the curves mark phase changes "
        "(gradual unfreezing, LP → FT), dashed ones the end of warm-up."
    )


def comparison(was_live: bool) -> None:
    configs = {r: store.read_config(root / r) for r in chosen}
    statuses = {r: store.read_status(root / r) for r in chosen}
    summaries = {r: store.read_summary(root / r) for r in chosen}
    metrics = {r: store.read_metrics(root / r) for r in chosen}
    live = [r for r in chosen if statuses[r].get("state") in store.LIVE_STATES]
    if was_live and not live:
        st.rerun()  # everything finished: draw the final page once, then stop refreshing
    table = plots.summary_table(configs, summaries, metrics, statuses)
    basis = plots.accuracy_basis(table)  # test accuracy when every run has a test split
    groups = plots.seed_groups(configs)  # a strategy repeated with k seeds is one row
    label = plots.member_labels(groups, configs)
    per_strategy = plots.seed_table(table, groups)

    hits = {r: store.read_hits(root / r, basis.split) for r in chosen}  # for the noise
    pooled = plots.pooled_hits(per_strategy, hits)
    st.subheader(plots.headline(per_strategy, pooled, basis))
    tested = int(table["test_acc"].notna().sum())
    if basis is plots.TEST:
        st.caption(
            "Test accuracy: images that neither training, the choice of the best epoch nor a "
            "tuned learning rate saw. Val accuracy is beside it in the table."
        )
    elif tested:
        st.caption(
            f"Val accuracy: {tested} of {len(table)} runs have a test accuracy, so the "
            "comparison uses val accuracy, which every run has."
        )
    if (per_strategy["seeds"] > 1).any():
        st.caption(
            "Runs that differ only in their seed are one strategy: accuracies and times are "
            "the mean ± standard deviation over its seeds, curves the mean with a band from "
            "the lowest to the highest seed, and two strategies are within noise when the "
            "95 % paired-bootstrap interval of their difference, pooled over seeds, holds 0."
        )
    for warning in plots.comparison_warnings(configs):
        st.warning(warning, icon=":material/warning:")
    for note in plots.recipe_notes(configs, summaries):  # EMA weights, TTA beside the plain
        st.caption(note)
    ended = {
        label[r]: metrics[r] for r in chosen if statuses[r].get("state") not in store.LIVE_STATES
    }
    advice = plots.undertrained_note(ended)  # one warning, however many seeds
    if advice:
        st.warning(advice, icon=":material/trending_flat:")
    if live:
        st.info(
            f"{len(live)} of {len(chosen)} runs are still training; this page updates as "
            "they go and the sentence above is provisional."
        )
        live_groups = {configs[r].get("group") for r in live if me.may_act(configs[r])} - {None}
        if len(live_groups) == 1:
            (group,) = live_groups
            stop_group_button(root, group, "Stop the group", "compare_stop_group", me)

    points = plots.depth_points(configs, summaries, basis)
    depth = plots.depth_sentence(points, {r: h for r, h in hits.items() if h})
    if depth:  # three or more depths (sweep --depths, --surgical): the headline view
        st.markdown(f"**How much to unfreeze:** {depth}")
        st.plotly_chart(plots.depth_curve(points), key="depth_curve", width="stretch")

    costs = list(plots.COSTS)
    for column, default, key in zip(
        st.columns(2),
        ("trainable_params", "train_time_s"),
        ("cost_left", "cost_right"),
        strict=True,
    ):
        cost = column.selectbox(
            "Accuracy against",
            costs,
            index=costs.index(default),
            format_func=plots.cost_name,
            key=key,
            help="The Pareto front: the runs no other run beats on both accuracy and this cost",
        )
        column.plotly_chart(
            plots.accuracy_vs_cost(per_strategy, cost, basis), key=f"chart_{key}", width="stretch"
        )
        column.caption(plots.pareto_sentence(per_strategy, cost, basis))

    controls = curve_controls("compare")  # x axis, smoothing, log scales
    x = controls["x"]
    run_of = {r: g for g, rids in groups.items() for r in rids}
    long = [m.assign(run=run_of[r], run_id=r) for r, m in metrics.items() if not m.empty]
    frame = pd.concat(long, ignore_index=True) if long else pd.DataFrame()
    log_loss = controls["log_loss"]
    curves = {
        "acc": {},
        "loss": {"log_y": log_loss},
        "train_loss": {"split": "train", "smoothing": controls["smoothing"], "log_y": log_loss},
        "lr": {"split": "train", "log_y": controls["log_lr"]},
    }
    for row in (("acc", "loss"), ("train_loss", "lr")):
        for column, key in zip(st.columns(2), row, strict=True):
            y = "loss" if key == "train_loss" else key
            fig = plots.compare_curves(frame, y, x, **curves[key])
            fig = plots.mark_compare_curves(fig, frame, configs, x)
            column.plotly_chart(fig, key=f"curve_{key}", width="stretch")
    what_changed(groups)

    st.markdown("#### Final metrics")
    shown = plots.results_table(per_strategy, basis)
    several = "seeds" in shown

    def accuracy_column(title: str):
        if several:  # "mean ± std" text
            return st.column_config.TextColumn(title, help="mean ± standard deviation over seeds")
        return share_column(title, width="small")

    measures = sorted({m for m in table["memory_measure"].dropna()})
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config={
            "seeds": st.column_config.NumberColumn("seeds", help="runs of this strategy"),
            "best_val_acc": accuracy_column("best val acc"),
            "test_acc": accuracy_column("test acc"),
            "final_val_acc": accuracy_column("final val acc"),
            "interval": st.column_config.TextColumn(
                f"{basis.words} 95 % interval",
                help="bootstrap over the split's images (one run; with seeds see ±)",
            ),
            "trainable": st.column_config.TextColumn(
                "trainable", help="parameters that train, and their share of all"
            ),
            "train_time": "train time",
            "peak_memory": st.column_config.TextColumn(
                "peak memory",
                help="peak training memory, measured during training"
                + (f" ({', '.join(measures)})" if measures else "")
                + "; blank for runs from before it was measured",
            ),
            "stored": st.column_config.TextColumn(
                "stored size",
                help="what must be kept for this run: the trained pieces and the head",
            ),
            "lr": st.column_config.TextColumn(
                "lr", help="the learning rate it trained with; tuned: chosen by a short search"
            ),
            "images_per_s": "images/s",
        },
    )
    left, right = st.columns(2)
    left.download_button(
        "Download the table as CSV",
        table.to_csv(index=False).encode(),
        file_name="comparison.csv",
        mime="text/csv",
        key="csv",
    )
    run_dirs = [root / r for r in chosen]
    right.download_button(  # what `python -m finetune_core report` writes, made on a click
        "Download the report (HTML)",
        lambda: report.report_html(run_dirs).encode(),
        file_name=report.default_path(root, run_dirs).name,
        mime="text/html",
        key="report_html",
        icon=":material/description:",
        help="One HTML file of this comparison: its figures (interactive), table and the "
        "settings that differ; it opens offline",
    )

    by_label = plots.seed_summaries(groups, summaries)  # seeds: mean per class, summed matrix
    st.plotly_chart(plots.per_class_chart(by_label), key="per_class", width="stretch")
    hidden = {r for r in chosen if not me.may_see_images(configs[r])}  # others' images
    confusion_drill_down(root, by_label, groups, configs, hidden)  # a clicked cell's images
    differences(by_label, configs, groups)  # B − A, per-class deltas against a baseline

    st.markdown("#### Settings that differ")
    diff = plots.config_diff(configs)
    if diff.empty:
        st.write("The runs use the same settings (apart from names and group).")
    else:
        st.dataframe(diff, width="stretch")


any_live = bool(runs[runs["run_id"].isin(chosen)]["state"].isin(store.LIVE_STATES).any())
st.fragment(comparison, run_every=LIVE_REFRESH_S * 2 if any_live else None)(any_live)
export_one_of(root, chosen, labels, key="compare")  # a compared run's model (issue 13)

warm_up()  # drawn: New run's imports load in the background
