"""What the dashboard shows, as pure functions: DataFrames and dicts in, Plotly figures,
tables and sentences out. No Streamlit here, so every chart is unit-tested on its own.

Inputs are the run-directory contract read through `store`:
- metrics: the rows of metrics.jsonl (split, epoch, step, loss, acc, acc5, lr, time_s,
  images_per_s, phase); for several runs, one long frame with a `run` column (the label).
- summaries: summary.json dicts; configs: config.json dicts.
- plan frames: `strategies.Plan.to_frame()` (phase, group, params, trainable_params,
  trainable, lr).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from finetune_core import stats, store, strategies
from finetune_core.util.durations import fmt_duration, seconds_left

# Calm, colour-blind-safe palette (Okabe-Ito); one colour per run, stable by position.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
)
TRAINS = "#009E73"
PARTLY = "#56B4E9"
FROZEN = "#BBBBBB"

# Config fields that never count as a difference between runs of one comparison.
_NOT_A_DIFFERENCE = ("name", "group", "env")


# ---------------------------------------------------------------- formatting


def fmt_count(n: float | int | None) -> str:
    """Returns a parameter or image count in people's units: 512, 11.2k, 11.7M."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float | None) -> str:
    """Returns 812 B, 4.2 MB, 1.3 GB (decimal units, as disks are sold)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_pct(fraction: float | None, digits: int = 1) -> str:
    """Returns a fraction 0..1 as a percentage string, or – when unknown."""
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return "–"
    return f"{100 * fraction:.{digits}f} %"


# ---------------------------------------------------------------- labels


def run_labels(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Returns {run_id: label}: the run's name, else its strategy; unique (id suffix added)."""
    raw = {rid: (cfg.get("name") or strategies.label(cfg)) for rid, cfg in configs.items()}
    counts: dict[str, int] = {}
    for label in raw.values():
        counts[label] = counts.get(label, 0) + 1
    return {
        rid: (label if counts[label] == 1 else f"{label} · {rid[-6:]}")
        for rid, label in raw.items()
    }


# ---------------------------------------------------------------- one run, live


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        annotations=[dict(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)],
        xaxis=dict(visible=False),
        yaxis=dict(visible=False),
    )
    return _style(fig)


def _style(fig: go.Figure, height: int = 300, **layout) -> go.Figure:
    """Returns fig with the dashboard's layout (over `layout`), set in one update: each
    update of a Plotly figure is validated, which is most of what a chart costs to build."""
    # No template: the dashboard draws every chart in Streamlit's theme, and applying a
    # Plotly template costs two thirds of building a figure (copied and validated each time)
    style = dict(
        height=height,
        margin=dict(l=50, r=20, t=50, b=40),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        hovermode="x unified",
    )
    fig.update_layout(**{**layout, **style})
    return fig


def _split(metrics: pd.DataFrame, split: str) -> pd.DataFrame:
    if metrics is None or metrics.empty or "split" not in metrics:
        return pd.DataFrame(columns=["split", "epoch", "step", "loss", "acc", "lr", "time_s"])
    return metrics[metrics["split"] == split].sort_values("step")


def _has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].notna().any()


def loss_chart(metrics: pd.DataFrame) -> go.Figure:
    """Returns train loss (line) and val loss (markers) against the global step."""
    train, val = _split(metrics, "train"), _split(metrics, "val")
    if train.empty and val.empty:
        return _empty("Loss", "No loss recorded yet")
    fig = go.Figure()
    if _has(train, "loss"):
        fig.add_scatter(
            x=train["step"],
            y=train["loss"],
            name="train loss",
            mode="lines",
            line=dict(color=PALETTE[0]),
        )
    if _has(val, "loss"):
        fig.add_scatter(
            x=val["step"],
            y=val["loss"],
            name="val loss",
            mode="lines+markers",
            line=dict(color=PALETTE[1]),
        )
    return _style(fig, title="Loss", xaxis_title="step", yaxis_title="loss")


def accuracy_chart(metrics: pd.DataFrame) -> go.Figure:
    """Returns val accuracy (and train accuracy, fainter) in % against the global step."""
    train, val = _split(metrics, "train"), _split(metrics, "val")
    if not _has(val, "acc") and not _has(train, "acc"):
        return _empty("Accuracy", "Accuracy appears after the first steps")
    fig = go.Figure()
    if _has(train, "acc"):
        fig.add_scatter(
            x=train["step"],
            y=100 * train["acc"],
            name="train acc",
            mode="lines",
            line=dict(color=PALETTE[4], width=1),
        )
    if _has(val, "acc"):
        fig.add_scatter(
            x=val["step"],
            y=100 * val["acc"],
            name="val acc",
            mode="lines+markers",
            line=dict(color=PALETTE[2], width=3),
        )
    return _style(fig, title="Accuracy", xaxis_title="step", yaxis_title="accuracy (%)")


def _train_series(
    metrics: pd.DataFrame, column: str, *, title: str, empty: str, name: str, ylabel: str, colour
) -> go.Figure:
    train = _split(metrics, "train")
    if not _has(train, column):
        return _empty(title, empty)
    fig = go.Figure()
    fig.add_scatter(
        x=train["step"], y=train[column], name=name, mode="lines", line=dict(color=colour)
    )
    return _style(fig, title=title, xaxis_title="step", yaxis_title=ylabel)


def lr_chart(metrics: pd.DataFrame) -> go.Figure:
    """Returns the head group's learning rate against the global step."""
    return _train_series(
        metrics,
        "lr",
        title="Learning rate",
        empty="No learning rate recorded yet",
        name="lr (head)",
        ylabel="lr",
        colour=PALETTE[3],
    )


def throughput_chart(metrics: pd.DataFrame) -> go.Figure:
    """Returns training throughput (images/s) against the global step."""
    return _train_series(
        metrics,
        "images_per_s",
        title="Throughput",
        empty="No throughput recorded yet",
        name="images/s",
        ylabel="images / s",
        colour=PALETTE[5],
    )


def training_charts(metrics: pd.DataFrame) -> dict[str, go.Figure]:
    """Returns the Training page's charts by key: loss, accuracy, lr, throughput."""
    return {
        "loss": loss_chart(metrics),
        "accuracy": accuracy_chart(metrics),
        "lr": lr_chart(metrics),
        "throughput": throughput_chart(metrics),
    }


def run_progress(
    status: Mapping[str, Any], metrics: pd.DataFrame | None = None
) -> tuple[float, str]:
    """Returns (fraction 0..1, 'epoch 2 of 5 · step 40 of 100 · about 1 min 10 s left').

    The ETA is the worker's own (status eta_s), else the time per step so far in the
    metrics; blank until the first step is done. While the worker prepares (data,
    weights) the fraction and text are those of the preparation stage.
    """
    state = status.get("state", "?")
    step = int(status.get("step") or 0)
    total = int(status.get("total_steps") or 0)
    if state == "running" and step == 0 and status.get("stage_fraction") is not None:
        return float(status["stage_fraction"]), str(status.get("message") or "preparing")
    fraction = 1.0 if state == "completed" else (min(1.0, step / total) if total > 0 else 0.0)
    parts = []
    if status.get("epoch"):
        epochs = status.get("epochs")
        parts.append(f"epoch {status['epoch']}" + (f" of {epochs}" if epochs else ""))
    if total:
        parts.append(f"step {step} of {total}")
    left = status.get("eta_s")
    if left is None and metrics is not None:
        train = _split(metrics, "train")
        if _has(train, "time_s") and total:
            last = train.dropna(subset=["time_s"]).iloc[-1]
            left = seconds_left(float(last["time_s"]), int(last["step"]), total - step)
    if state == "running" and left is not None and total:
        parts.append(f"about {fmt_duration(left)} left")
    return fraction, " · ".join(parts) if parts else str(state)


def result_sentence(summary: Mapping[str, Any]) -> str:
    """Returns "best val acc 84.0 %, final 83.5 %, 3.08k of 11.2M parameters trained, 42 s."
    with the parts the summary knows ("" when it knows none: a run that ended before it
    trained)."""
    parts = []
    for key, label in (
        ("best_val_acc", "best val acc"),
        ("final_val_acc", "final"),
        ("test_acc", "test"),
    ):
        if summary.get(key) is not None:
            parts.append(f"{label} {fmt_pct(summary[key])}")
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    if trainable is not None and total:
        parts.append(f"{fmt_count(trainable)} of {fmt_count(total)} parameters trained")
    if summary.get("train_time_s") is not None:
        parts.append(fmt_duration(summary["train_time_s"]))
    return ", ".join(parts) + "." if parts else ""


# ---------------------------------------------------------------- the trainable map


def trainable_map(frame: pd.DataFrame) -> go.Figure:
    """Returns the plan as horizontal bars: one row per group (stem at the bottom, head at the
    top), length = parameters (log scale), colour = trains / partly trains / frozen, label =
    trainable count and learning rate; one panel per phase for gradual and lp_ft."""
    if frame is None or frame.empty:
        return _empty("Trainable map", "Choose a model to see its layer groups")
    phases = list(dict.fromkeys(frame["phase"])) if "phase" in frame else ["all"]
    if "phase" not in frame:
        frame = frame.assign(phase="all")
    fig = make_subplots(
        rows=1,
        cols=len(phases),
        shared_yaxes=True,
        subplot_titles=[_phase_title(frame[frame["phase"] == p], p) for p in phases]
        if len(phases) > 1
        else None,
        horizontal_spacing=0.02,
    )
    order = list(dict.fromkeys(frame["group"]))
    kinds = (("trains", TRAINS), ("partly trains", PARTLY), ("frozen", FROZEN))
    shown: set[str] = set()
    for col, phase in enumerate(phases, start=1):
        rows = frame[frame["phase"] == phase]
        for kind, colour in kinds:
            sel = rows[rows.apply(_kind, axis=1) == kind]
            if sel.empty:
                continue
            fig.add_bar(
                x=sel["params"].clip(lower=1),
                y=sel["group"],
                orientation="h",
                name=kind,
                legendgroup=kind,
                showlegend=kind not in shown,
                marker_color=colour,
                text=[_bar_text(r) for _, r in sel.iterrows()],
                textposition="auto",
                customdata=sel[["trainable_params", "lr"]].to_numpy(),
                hovertemplate="%{y}: %{x:,} parameters, %{customdata[0]:,} train, "
                "lr %{customdata[1]}<extra>" + str(phase) + "</extra>",
                row=1,
                col=col,
            )
            shown.add(kind)
        fig.update_xaxes(type="log", title_text="parameters", row=1, col=col)
    fig.update_yaxes(categoryorder="array", categoryarray=order)
    title = "Trainable map"
    if len(phases) == 1:
        title += " · " + _phase_title(frame, phases[0])
    fig.update_layout(title=title, barmode="overlay", hovermode="closest")
    return _style(fig, height=max(260, 40 + 28 * len(order)))


def _kind(row: pd.Series) -> str:
    if not row["trainable"] or not row["trainable_params"]:
        return "frozen"
    return "trains" if row["trainable_params"] >= row["params"] else "partly trains"


def _bar_text(row: pd.Series) -> str:
    if _kind(row) == "frozen":
        return "frozen"
    lr = row.get("lr")
    lr_text = f" · lr {lr:.3g}" if isinstance(lr, (int, float)) and not math.isnan(lr) else ""
    return f"{fmt_count(row['trainable_params'])} train{lr_text}"


def _phase_title(rows: pd.DataFrame, phase: Any) -> str:
    trainable = int(rows["trainable_params"].sum())
    total = int(rows["params"].sum())
    share = trainable / total if total else 0.0
    return f"{phase}: {fmt_count(trainable)} of {fmt_count(total)} train ({fmt_share(share)})"


# ---------------------------------------------------------------- data


def class_counts_chart(counts: Mapping[str, Mapping[str, int]]) -> go.Figure:
    """Returns images per class as bars, stacked by split ({split or "all": {class: n}}), so
    an imbalanced or tiny class shows before anything trains."""
    if not counts:
        return _empty("Images per class", "No images found")
    fig = go.Figure()
    for i, (split, per_class) in enumerate(counts.items()):
        fig.add_bar(
            x=list(per_class),
            y=list(per_class.values()),
            name=str(split),
            marker_color=PALETTE[i % len(PALETTE)],
        )
    total = sum(sum(c.values()) for c in counts.values())
    fig.update_layout(
        title=f"Images per class ({total:,} in all)",
        barmode="stack",
        yaxis_title="images",
        hovermode="x",
    )
    return _style(fig, height=260)


# ---------------------------------------------------------------- comparing runs


SUMMARY_COLUMNS = [
    "run_id",
    "strategy",
    "state",
    "best_val_acc",
    "final_val_acc",
    "test_acc",
    "trainable_params",
    "trainable_pct",
    "total_params",
    "train_time_s",
    "images_per_s",
]


def summary_table(
    configs: Mapping[str, Mapping[str, Any]],
    summaries: Mapping[str, Mapping[str, Any] | None],
    metrics: Mapping[str, pd.DataFrame] | None = None,
    statuses: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Returns one row per run (in the order of `configs`): run (its label), then
    SUMMARY_COLUMNS from the run store's one table of runs. Runs without a summary yet take
    what their metrics say."""
    readings = [
        store.RunReading(
            rid,
            dict(cfg),
            dict((statuses or {}).get(rid) or {}),
            summaries.get(rid),
            loaded_metrics=(metrics or {}).get(rid),
        )
        for rid, cfg in configs.items()
    ]
    table = store.runs_table(readings, SUMMARY_COLUMNS)
    labels = run_labels(configs)
    table.insert(0, "run", [labels[rid] for rid in table["run_id"]])
    return table


def headline(table: pd.DataFrame, hits: Mapping[str, Sequence[bool]] | None = None) -> str:
    """Returns the one sentence that answers "which strategy, at what cost": the best run by
    best val accuracy, its difference from `full` in points, and its train-time and
    trainable-parameter ratios to `full`.

    hits ({run_id: per val image, right or not}, store.read_hits) make it say how sure it
    is: when the paired-bootstrap interval of the best run's lead over the next one holds 0,
    it calls no winner and names the cheaper of the two instead."""
    done = table.dropna(subset=["best_val_acc"]) if not table.empty else table
    if done.empty:
        return "No run has finished an epoch yet, so there is nothing to compare."
    best = done.loc[done["best_val_acc"].idxmax()]
    full = done[done["strategy"].map(strategies.is_baseline)]
    if len(done) == 1:
        return (
            f"Only one run has results: {best['run']} reached "
            f"{fmt_pct(best['best_val_acc'])} val accuracy."
        )
    second = done.drop(index=best.name)
    runner_up = second.loc[second["best_val_acc"].idxmax()]
    tie = _within_noise(best, runner_up, hits or {})
    if tie is not None:
        return tie
    if full.empty:
        return (
            f"{best['run']} is best with {fmt_pct(best['best_val_acc'])} val accuracy, "
            f"{_points(best['best_val_acc'] - runner_up['best_val_acc'])} ahead of "
            f"{runner_up['run']}; there is no full fine-tuning run to compare costs against."
        )
    ref = full.loc[full["best_val_acc"].idxmax()]
    if strategies.is_baseline(best["strategy"]):
        partial = done[~done["strategy"].map(strategies.is_baseline)]
        if partial.empty:
            return f"{best['run']} is best with {fmt_pct(best['best_val_acc'])} val accuracy."
        alt = partial.loc[partial["best_val_acc"].idxmax()]
        return (
            f"{best['run']} is best with {fmt_pct(best['best_val_acc'])} val accuracy; the best "
            f"partial strategy, {alt['run']}, is {_points(alt['best_val_acc'] - ref['best_val_acc'])}"
            f" from it{_cost(alt, ref)}."
        )
    diff = best["best_val_acc"] - ref["best_val_acc"]
    return (
        f"{best['run']} is best with {fmt_pct(best['best_val_acc'])} val accuracy, "
        f"{_points(diff)} {'above' if diff >= 0 else 'below'} full fine-tuning "
        f"({fmt_pct(ref['best_val_acc'])}){_cost(best, ref)}."
    )


def _within_noise(
    best: pd.Series, other: pd.Series, hits: Mapping[str, Sequence[bool]]
) -> str | None:
    """Returns the sentence for two runs the data cannot tell apart (the paired-bootstrap
    95 % interval of their difference on the same val images holds 0), else None."""
    a, b = hits.get(best["run_id"]), hits.get(other["run_id"])
    if not a or not b or len(a) != len(b):
        return None  # not scored on the same images: no paired interval
    diff = stats.paired_difference(a, b)
    if not diff.within_noise:
        return None
    cheap, dear = sorted((best, other), key=_cheapness)
    return (
        f"{best['run']} and {other['run']} are within noise of each other: "
        f"{fmt_pct(best['best_val_acc'])} and {fmt_pct(other['best_val_acc'])} val accuracy, "
        f"a difference whose 95 % interval ({100 * diff.lo:+.1f} to {100 * diff.hi:+.1f} "
        f"points on these {diff.images} images) holds 0, so neither wins; {cheap['run']} is "
        f"the cheaper{_cost(cheap, dear)}."
    )


def _cheapness(run: pd.Series) -> tuple[float, float]:
    """Fewest trainable parameters first, then the shortest train time."""

    def number(value) -> float:
        return float(value) if pd.notna(value) else math.inf

    return number(run["trainable_params"]), number(run["train_time_s"])


def _points(diff: float) -> str:
    pts = abs(100 * diff)
    return f"{pts:.1f} point{'' if round(pts, 1) == 1 else 's'}"


def _ratio(a: Any, b: Any) -> float | None:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return None
    if math.isnan(a) or math.isnan(b) or b <= 0:
        return None
    return a / b


def _cost(run: pd.Series, ref: pd.Series) -> str:
    parts = []
    t = _ratio(run["train_time_s"], ref["train_time_s"])
    if t is not None:
        parts.append(f"{t:.2g}× the training time")
    p = _ratio(run["trainable_params"], ref["trainable_params"])
    if p is not None:
        parts.append(f"{fmt_share(p)} of the trainable parameters")
    return ", using " + " and ".join(parts) if parts else ""


def fmt_share(p: float) -> str:
    """Returns a fraction 0..1 as a percentage with the digits it needs: 76 %, 1.4 %, 0.014 %."""
    if p >= 0.1:
        return f"{100 * p:.0f} %"
    if p >= 0.001:
        return f"{100 * p:.1f} %"
    return f"{100 * p:.2g} %"


def compare_curves(metrics: pd.DataFrame, y: str = "acc", x: str = "epoch") -> go.Figure:
    """Returns one val-split trace per run (the `run` column) of `y` (acc or loss) against
    `x` (epoch or time_s)."""
    name = {"acc": "val accuracy (%)", "loss": "val loss"}.get(y, y)
    xname = {"epoch": "epoch", "time_s": "wall time (s)"}.get(x, x)
    val = _split(metrics, "val")
    if val.empty or "run" not in val:
        return _empty(name.capitalize(), "No epoch has finished yet")
    fig = go.Figure()
    for i, (run, rows) in enumerate(val.groupby("run", sort=False)):
        scale = 100 if y == "acc" else 1
        fig.add_scatter(
            x=rows[x],
            y=scale * rows[y],
            name=str(run),
            mode="lines+markers",
            line=dict(color=PALETTE[i % len(PALETTE)]),
        )
    fig.update_layout(title=f"{name.capitalize()} by {xname}", xaxis_title=xname, yaxis_title=name)
    return _style(fig)


def accuracy_vs_cost(table: pd.DataFrame, cost: str = "trainable_params") -> go.Figure:
    """Returns best val accuracy (%) against a cost column (trainable_params or train_time_s),
    one marker trace per run, so the cheapest good strategy stands out top left."""
    xname = {"trainable_params": "trainable parameters", "train_time_s": "train time (s)"}[cost]
    rows = table.dropna(subset=["best_val_acc", cost]) if not table.empty else table
    if rows.empty:
        return _empty(f"Accuracy vs {xname}", "No finished epoch yet")
    fig = go.Figure()
    for i, (_, r) in enumerate(rows.iterrows()):
        fig.add_scatter(
            x=[r[cost]],
            y=[100 * r["best_val_acc"]],
            name=str(r["run"]),
            mode="markers+text",
            text=[str(r["run"])],
            textposition="top center",
            cliponaxis=False,
            marker=dict(size=14, color=PALETTE[i % len(PALETTE)]),
        )
    fig.update_layout(
        title=f"Accuracy vs {xname}",
        xaxis_title=xname,
        yaxis_title="best val accuracy (%)",
        showlegend=False,
        hovermode="closest",
    )
    # Room around the markers so that their labels are never cut at the plot's edges.
    acc = 100 * rows["best_val_acc"].astype(float)
    pad = max(2.0, 0.15 * float(acc.max() - acc.min()))
    fig.update_yaxes(range=[float(acc.min()) - pad, float(acc.max()) + 2 * pad])
    x = rows[cost].astype(float)
    if cost == "trainable_params":
        lo, hi = math.log10(max(1.0, x.min())), math.log10(max(1.0, x.max()))
        span = max(0.5, 0.15 * (hi - lo))
        fig.update_xaxes(type="log", range=[lo - span, hi + span])
    else:
        span = max(1.0, 0.15 * float(x.max() - x.min()))
        fig.update_xaxes(range=[max(0.0, float(x.min()) - span), float(x.max()) + span])
    return _style(fig)


def per_class_chart(summaries: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Returns per-class accuracy (%) as grouped bars, one trace per run ({label: summary})."""
    have = {k: s for k, s in summaries.items() if s and s.get("per_class_acc")}
    if not have:
        return _empty("Per-class accuracy", "Appears when runs finish")
    fig = go.Figure()
    for i, (label, s) in enumerate(have.items()):
        classes = list(s.get("classes") or s["per_class_acc"].keys())
        fig.add_bar(
            x=classes,
            y=[100 * float(s["per_class_acc"].get(c, float("nan"))) for c in classes],
            name=str(label),
            marker_color=PALETTE[i % len(PALETTE)],
        )
    fig.update_layout(
        title="Per-class accuracy", yaxis_title="accuracy (%)", barmode="group", hovermode="x"
    )
    return _style(fig, height=340)


def confusion_chart(summaries: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Returns the confusion matrices side by side (rows true, columns predicted), one heatmap
    per run, each normalised per true class so runs with different counts compare."""
    have = {k: s for k, s in summaries.items() if s and s.get("confusion_matrix")}
    if not have:
        return _empty("Confusion matrices", "Appear when runs finish")
    n = len(have)
    fig = make_subplots(
        rows=1, cols=n, subplot_titles=[str(k) for k in have], horizontal_spacing=0.04
    )
    first = None
    for col, (_label, s) in enumerate(have.items(), start=1):
        cm = [[float(v) for v in row] for row in s["confusion_matrix"]]
        classes = list(s.get("classes") or range(len(cm)))
        first = classes if first is None else first
        norm = [[v / sum(row) if sum(row) else 0.0 for v in row] for row in cm]
        fig.add_heatmap(
            z=norm,
            x=classes,
            y=classes,
            customdata=cm,
            coloraxis="coloraxis",
            hovertemplate="true %{y}, predicted %{x}: %{customdata:.0f} (%{z:.0%})<extra></extra>",
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="predicted", row=1, col=col)
        # a panel names its rows unless they are the first panel's classes, named beside it
        own_names = col == 1 or classes != first
        fig.update_yaxes(autorange="reversed", showticklabels=own_names, row=1, col=col)
    fig.update_yaxes(title_text="true", row=1, col=1)
    fig.update_layout(
        title="Confusion matrices",
        coloraxis=dict(colorscale="Blues", cmin=0, cmax=1, colorbar=dict(title="share")),
        hovermode="closest",
    )
    return _style(fig, height=360)


def data_name(spec: Any) -> str:
    """Returns how to name a run's data for people: builtin:/torchvision: specs as they are,
    a folder or a zip by its own name (not where the server keeps it)."""
    text = str(spec)
    if text.startswith(("builtin:", "torchvision:")):
        return text
    return text.rstrip("/").rsplit("/", 1)[-1] or text


# Settings whose difference makes accuracies of two runs not comparable, in the user's words.
_NOT_COMPARABLE = {"data": "data", "model": "model", "epochs": "epochs"}


def comparison_warnings(configs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Returns a sentence per setting that makes the runs' accuracies not comparable (other
    data, another model, another number of epochs), naming each value and its runs."""
    labels = run_labels(configs)
    found = []
    for key, words in _NOT_COMPARABLE.items():
        by_value: dict[str, list[str]] = {}
        for rid, cfg in configs.items():
            value = cfg.get(key)
            shown = data_name(value) if key == "data" else str(value)
            by_value.setdefault(shown, []).append(labels[rid])
        if len(by_value) > 1:
            parts = "; ".join(f"{value} ({', '.join(runs)})" for value, runs in by_value.items())
            found.append(
                f"These runs differ in {words}: {parts}. Their accuracies do not compare "
                "strategies alone."
            )
    return found


UNDERTRAINED_FALL = 0.10  # a training loss that fell less than this share is under-trained


def undertrained(metrics: pd.DataFrame) -> str | None:
    """Returns what to try when a run's training loss barely fell (its last tenth of train
    records, median, at least UNDERTRAINED_FALL below its first tenth), None otherwise or
    with too few records to tell (fewer than 4, or no finished epoch)."""
    if metrics.empty or "split" not in metrics:
        return None
    train = metrics.loc[metrics["split"] == "train", "loss"].dropna()
    if len(train) < 4 or not (metrics["split"] == "val").any():
        return None
    tenth = max(1, len(train) // 10)
    first, last = float(train.iloc[:tenth].median()), float(train.iloc[-tenth:].median())
    if first <= 0 or last < (1 - UNDERTRAINED_FALL) * first:
        return None
    fell = max(0.0, 1 - last / first)
    return (
        f"under-trained: its training loss fell only {100 * fell:.0f} % (from {first:.3g} to "
        f"{last:.3g}). Try a higher learning rate (python -m finetune_core lr-find suggests "
        "one), more epochs, or a strategy that trains more of the network."
    )


def config_diff(configs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Returns the settings that differ between runs: one row per field, one column per run
    label; empty when the runs agree on everything (names and group ids do not count)."""
    labels = run_labels(configs)
    fields = list(dict.fromkeys(k for c in configs.values() for k in c))
    rows = {}
    for f in fields:
        if f in _NOT_A_DIFFERENCE:
            continue
        values = [c.get(f) for c in configs.values()]
        if len({repr(v) for v in values}) > 1:
            rows[f] = ["–" if v is None else str(v) for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[labels[r] for r in configs])


# ---------------------------------------------------------------- how deep to train


def depth_points(
    configs: Mapping[str, Mapping[str, Any]], summaries: Mapping[str, Mapping[str, Any] | None]
) -> pd.DataFrame:
    """Returns one row per completed last_n or full run: run_id, depth (backbone groups
    trained: last_n's k; full is marked by full=True and sorts last), seed, acc (best val),
    lo and hi (its 95 % interval), train_time_s, trainable_params."""
    rows = []
    for rid, cfg in configs.items():
        summary = summaries.get(rid) or {}
        strategy = cfg.get("strategy")
        if summary.get("state") != "completed" or summary.get("best_val_acc") is None:
            continue
        if strategy not in ("last_n", "full"):
            continue
        ci = summary.get("best_val_acc_ci") or [None, None]
        rows.append(
            {
                "run_id": rid,
                "full": strategy == "full",
                "depth": cfg.get("unfreeze_last") if strategy == "last_n" else None,
                "seed": cfg.get("seed"),
                "acc": summary["best_val_acc"],
                "lo": ci[0],
                "hi": ci[1],
                "train_time_s": summary.get("train_time_s"),
                "trainable_params": summary.get("trainable_params"),
            }
        )
    columns = ["run_id", "full", "depth", "seed", "acc", "lo", "hi"]
    return pd.DataFrame(rows, columns=[*columns, "train_time_s", "trainable_params"])


def _depth_label(row) -> str:
    if row["full"]:
        return "full"
    return "0 (probe)" if row["depth"] == 0 else str(int(row["depth"]))


def _by_depth(points: pd.DataFrame) -> pd.DataFrame:
    """Returns one row per depth, shallow to full: label, mean acc, lo/hi (the widest of its
    seeds' intervals), mean train time and trainable parameters, run_ids, seeds."""
    frame = points.assign(
        label=points.apply(_depth_label, axis=1),
        order=points["depth"].fillna(math.inf).where(~points["full"], math.inf),
    )
    grouped = frame.groupby("label", sort=False)
    out = grouped.agg(
        order=("order", "first"),
        acc=("acc", "mean"),
        lo=("lo", "min"),
        hi=("hi", "max"),
        train_time_s=("train_time_s", "mean"),
        trainable_params=("trainable_params", "mean"),
        runs=("run_id", list),
        seeds=("seed", list),
    )
    return out.sort_values("order").reset_index()


def depth_curve(points: pd.DataFrame) -> go.Figure:
    """Returns accuracy (mean over seeds, with its 95 % interval) against the backbone groups
    trained, from the linear probe to full, and the train time on a second axis."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if not points.empty:
        d = _by_depth(points)
        fig.add_trace(
            go.Scatter(
                x=d["label"],
                y=100 * d["acc"],
                mode="lines+markers",
                name="val accuracy (95 % interval)",
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=(100 * (d["hi"] - d["acc"])).fillna(0),
                    arrayminus=(100 * (d["acc"] - d["lo"])).fillna(0),
                ),
            ),
            secondary_y=False,
        )
        fig.add_trace(
            go.Bar(x=d["label"], y=d["train_time_s"], name="train time (s)", opacity=0.3),
            secondary_y=True,
        )
    fig.update_yaxes(title_text="val accuracy (%)", secondary_y=False)
    fig.update_yaxes(title_text="train time (s)", secondary_y=True, showgrid=False)
    return _style(
        fig,
        height=320,
        title="How much to unfreeze: accuracy by backbone groups trained",
        xaxis_title="backbone groups trained (from the top)",
    )


def depth_sentence(points: pd.DataFrame, hits: Mapping[str, Sequence[bool]]) -> str | None:
    """Returns which depth is the cheapest within noise of the best (the paired-bootstrap
    interval of their difference, pooled over seeds, holds 0), or None with fewer than 3
    depths. Without per-image predictions it compares the mean accuracies only, and says so."""
    if points.empty:
        return None
    d = _by_depth(points)
    if len(d) < 3:
        return None
    best = d.loc[d["acc"].idxmax()]

    def pooled(row) -> list[bool] | None:
        found = [hits.get(r) for r in row["runs"]]
        return [h for run in found for h in run] if all(found) else None

    best_hits = pooled(best)
    if best_hits is None:
        return (
            f"The best depth is {_depth_words(best['label'])} ({fmt_pct(best['acc'])} val "
            "accuracy); these runs have no per-image predictions, so how sure that is "
            "cannot be said."
        )
    for _, row in d.sort_values(["trainable_params", "train_time_s"]).iterrows():
        if row["label"] == best["label"]:
            break
        mine = pooled(row)
        if best_hits is None or mine is None or len(mine) != len(best_hits):
            continue
        # seeds pair up in the same order: image i of seed s against image i of seed s
        diff = stats.paired_difference(mine, best_hits)
        if diff.within_noise:
            return (
                f"{_depth_words(row['label']).capitalize()} is the cheapest within noise of the "
                f"best ({_depth_words(best['label'])}: {fmt_pct(best['acc'])} val accuracy): "
                f"{fmt_pct(row['acc'])}, a difference whose 95 % interval "
                f"({100 * diff.lo:+.1f} to {100 * diff.hi:+.1f} points) holds 0"
                f"{_cost(row, best)}."
            )
    return (
        f"The best depth is {_depth_words(best['label'])} ({fmt_pct(best['acc'])} val "
        "accuracy); no cheaper depth is within noise of it."
    )


def _depth_words(label: str) -> str:
    if label == "full":
        return "full fine-tuning"
    if label.startswith("0"):
        return "training only the head (a linear probe)"
    return f"training the top {label} backbone group{'' if label == '1' else 's'}"
