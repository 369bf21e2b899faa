"""Errors you can see, as page parts: the curve controls (Training and Compare), the
confusion drill-down (a clicked cell's images) and where two strategies differ (Compare)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import streamlit as st

from finetune_core import plots, store, strategies

SHOWN_IMAGES = 48  # images of a cell drawn at most (the engine keeps 32 per cell and seed)
THUMB_WIDTH = 96  # px on the page


def curve_controls(prefix: str) -> dict[str, Any]:
    """Draws the curves' controls (x axis, smoothing of the train curves, log loss, log lr),
    keys prefixed by `prefix`; returns them as keyword arguments of plots.training_charts
    (x, smoothing, log_loss, log_lr)."""
    c = st.columns([3, 3, 1, 1], vertical_alignment="bottom")
    x = c[0].radio(
        "Curves against",
        list(plots.X_AXES),
        index=list(plots.X_AXES).index("epoch" if prefix == "compare" else "step"),
        horizontal=True,
        key=f"{prefix}_x",
        format_func=lambda k: plots.X_AXES[k].split(" (")[0],
    )
    smoothing = c[1].slider(
        "Smoothing of train curves",
        0.0,
        plots.SMOOTHING_MAX,
        0.6,
        step=0.01,
        key=f"{prefix}_smoothing",
        help="An exponential moving average, as TensorBoard smooths: 0 draws the records as "
        "they are; the raw curve stays, fainter.",
    )
    log_loss = c[2].toggle("Log loss", key=f"{prefix}_log_loss", help="Loss on a log axis")
    log_lr = c[3].toggle("Log lr", key=f"{prefix}_log_lr", help="Learning rate on a log axis")
    return {"x": x, "smoothing": smoothing, "log_loss": log_loss, "log_lr": log_lr}


def _with_matrix(by_label: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {k: s for k, s in by_label.items() if s and s.get("confusion_matrix")}


def _keep_option(key: str, options: Sequence[str]) -> None:
    """Forgets a select box's value that is not among its options (another run's classes)."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]


def confusion_drill_down(
    root: Path,
    by_label: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, Sequence[str]],
    configs: Mapping[str, Mapping[str, Any]],
    hidden: Collection[str] = (),
) -> None:
    """The confusion matrices, a click on a cell (or the select boxes beside, for a keyboard)
    showing that cell's val images with their classes and confidence; the images of the
    `hidden` runs (another user's, on a shared server) are not shown."""
    event = st.plotly_chart(
        plots.confusion_chart(by_label, selectable=True),
        key="confusion",
        on_select="rerun",
        selection_mode="points",
        width="stretch",
    )
    have = _with_matrix(by_label)
    if not have:
        return
    clicked = plots.confusion_cell(event.selection if event else None)
    if clicked and clicked != st.session_state.get("_cell_clicked") and clicked["run"] in have:
        st.session_state["_cell_clicked"] = clicked  # a new click moves the select boxes
        st.session_state["cell_run"] = clicked["run"]
        st.session_state["cell_true"] = clicked["true"]
        st.session_state["cell_pred"] = clicked["pred"]
    _keep_option("cell_run", list(have))
    c = st.columns(3)
    label = c[0].selectbox("Strategy", list(have), key="cell_run")
    summary = have[label]
    classes = [str(k) for k in summary.get("classes") or range(len(summary["confusion_matrix"]))]
    _keep_option("cell_true", classes)
    _keep_option("cell_pred", classes)
    worst = plots.most_confused(summary) or (classes[0], classes[0])  # before any click
    st.session_state.setdefault("cell_true", worst[0])
    st.session_state.setdefault("cell_pred", worst[1])
    true = c[1].selectbox("True class", classes, key="cell_true")
    pred = c[2].selectbox("Predicted as", classes, key="cell_pred")
    cell_images(
        root,
        label,
        summary,
        groups[label],
        configs,
        classes.index(true),
        classes.index(pred),
        hidden,
    )


def cell_images(
    root: Path,
    label: str,
    summary: Mapping[str, Any],
    rids: Sequence[str],
    configs: Mapping[str, Mapping[str, Any]],
    t: int,
    p: int,
    hidden: Collection[str] = (),
) -> None:
    """The val images of one cell (true t, predicted p) of a strategy's runs (its seeds),
    none of the `hidden` runs'."""
    classes = [str(k) for k in summary.get("classes") or range(len(summary["confusion_matrix"]))]
    count = int(summary["confusion_matrix"][t][p])
    what = f"{classes[t]} predicted right" if t == p else f"{classes[t]} predicted as {classes[p]}"
    seeds = len(rids) > 1
    st.markdown(
        f"**{count} val image{'s' if count != 1 else ''} of {what}** ({label}, best checkpoint"
        + (f", {len(rids)} seeds" if seeds else "")
        + ")"
    )
    if count == 0:
        st.caption("This cell is empty.")
        return
    if set(rids) <= set(hidden):
        st.info(
            "These runs are another user's: their images are shown to their owner and the "
            "admins only (FINETUNE_SHARE_IMAGES shares them with everyone).",
            icon=":material/visibility_off:",
        )
        return
    rids = [r for r in rids if r not in hidden]
    predictions = {r: store.read_predictions(root / r) for r in rids}
    rows = plots.cell_images(predictions, t, p, "val")
    if rows.empty:
        st.info(
            "These runs recorded no per-image predictions (they are from before runs did), so "
            "which images this cell holds is not known; a new run of the same settings shows "
            "them."
        )
        return
    kept = {r: (store.scored_images(root / r) or {}).get("splits", {}).get("val") for r in rids}
    old = [r for r in rids if kept[r] is None]
    shown = rows[
        [
            kept[r] is not None and i in kept[r]
            for r, i in zip(rows["run_id"], rows["index"], strict=True)
        ]
    ].head(SHOWN_IMAGES)
    order = "most confident first" if t != p else "least confident first"
    if shown.empty:
        st.info(
            "These runs kept no images (they are from before runs did); the cell's images by "
            "their place in the val split: "
            + ", ".join(f"#{i}" for i in rows["index"].head(SHOWN_IMAGES))
        )
        return
    pictures, captions = [], []
    for rid, part in shown.groupby("run_id", sort=False):
        found = store.read_scored_images(root / rid, "val", part["index"])
        for _, row in part.iterrows():
            if int(row["index"]) in found:
                pictures.append(found[int(row["index"])])
                seed = configs[rid].get("seed") if seeds else None
                captions.append(plots.cell_caption(row, classes, seed))
    st.caption(
        f"Showing {len(pictures)} of {len(rows)}, {order}; each image's caption: its class"
        + ("" if t == p else " → the prediction")
        + ", the model's confidence in its prediction and its place in the val split"
        + (", the seed" if seeds else "")
        + ". Runs keep up to 32 images per cell (a small copy of what the model saw)."
        + (f" {len(old)} run(s) from before images were kept show none." if old else "")
    )
    st.image(pictures, caption=captions, width=THUMB_WIDTH)


def differences(
    by_label: Mapping[str, Mapping[str, Any]],
    configs: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, Sequence[str]],
) -> None:
    """Where two strategies differ: the difference of their confusion matrices, and every
    strategy's per-class accuracy against a chosen baseline."""
    have = list(_with_matrix(by_label))
    if len(have) < 2:
        return
    st.markdown("#### Where two strategies differ")
    full = [k for k in have if strategies.is_baseline(configs[groups[k][0]].get("strategy"))]
    _keep_option("diff_baseline", have)
    st.session_state.setdefault("diff_baseline", full[0] if full else have[0])
    c = st.columns(2)
    baseline = c[0].selectbox(
        "Baseline", have, key="diff_baseline", help="The run the others are measured against"
    )
    others = [k for k in have if k != baseline]
    _keep_option("diff_other", others)
    other = c[1].selectbox("Against", others, key="diff_other")
    left, right = st.columns(2)
    left.plotly_chart(
        plots.confusion_diff_chart(by_label, baseline, other), key="confusion_diff", width="stretch"
    )
    left.caption(
        f"{other} − {baseline}, each row a share of its true class's images: blue is more "
        f"often for {other}, red less (on the diagonal, blue is better; off it, worse)."
    )
    right.plotly_chart(
        plots.per_class_delta_chart(by_label, baseline), key="per_class_delta", width="stretch"
    )
