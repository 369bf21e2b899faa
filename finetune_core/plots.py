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

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def loss_chart(
    metrics: pd.DataFrame, *, x: str = "step", smoothing: float = 0.0, log_y: bool = False
) -> go.Figure:
    """Returns train loss (line) and val loss (markers) against `x` (X_AXES: the global
    step, epochs or wall time); smoothing > 0 draws the train loss as its EMA (ema) over
    the raw one, fainter; log_y puts the loss on a log axis."""
    train, val = _split(metrics, "train"), _split(metrics, "val")
    if train.empty and val.empty:
        return _empty("Loss", "No loss recorded yet")
    per_epoch = steps_per_epoch(metrics)
    fig = go.Figure()
    if _has(train, "loss"):
        _add_train_line(
            fig, curve_x(train, x, per_epoch), train["loss"], "train loss", PALETTE[0], smoothing
        )
    if _has(val, "loss"):
        fig.add_scatter(
            x=curve_x(val, x, per_epoch),
            y=val["loss"],
            name="val loss",
            mode="lines+markers",
            line=dict(color=PALETTE[1]),
        )
    return _style(
        fig,
        title="Loss" + _smoothed_words(smoothing),
        xaxis_title=X_AXES.get(x, x),
        yaxis=dict(title="loss", type="log" if log_y else "linear"),
    )


def accuracy_chart(metrics: pd.DataFrame, *, x: str = "step", smoothing: float = 0.0) -> go.Figure:
    """Returns val accuracy (and train accuracy, fainter, smoothed as loss_chart does) in %
    against `x` (X_AXES)."""
    train, val = _split(metrics, "train"), _split(metrics, "val")
    if not _has(val, "acc") and not _has(train, "acc"):
        return _empty("Accuracy", "Accuracy appears after the first steps")
    per_epoch = steps_per_epoch(metrics)
    fig = go.Figure()
    if _has(train, "acc"):
        _add_train_line(
            fig,
            curve_x(train, x, per_epoch),
            100 * train["acc"],
            "train acc",
            PALETTE[4],
            smoothing,
            width=1,
        )
    if _has(val, "acc"):
        fig.add_scatter(
            x=curve_x(val, x, per_epoch),
            y=100 * val["acc"],
            name="val acc",
            mode="lines+markers",
            line=dict(color=PALETTE[2], width=3),
        )
    return _style(
        fig,
        title="Accuracy" + _smoothed_words(smoothing),
        xaxis_title=X_AXES.get(x, x),
        yaxis_title="accuracy (%)",
    )


def _train_series(
    metrics: pd.DataFrame,
    column: str,
    *,
    title: str,
    empty: str,
    name: str,
    ylabel: str,
    colour,
    x: str = "step",
    log_y: bool = False,
) -> go.Figure:
    train = _split(metrics, "train")
    if not _has(train, column):
        return _empty(title, empty)
    fig = go.Figure()
    fig.add_scatter(
        x=curve_x(train, x, steps_per_epoch(metrics)),
        y=train[column],
        name=name,
        mode="lines",
        line=dict(color=colour),
    )
    return _style(
        fig,
        title=title,
        xaxis_title=X_AXES.get(x, x),
        yaxis=dict(title=ylabel, type="log" if log_y else "linear"),
    )


def lr_chart(metrics: pd.DataFrame, *, x: str = "step", log_y: bool = False) -> go.Figure:
    """Returns the head group's learning rate against `x` (X_AXES), on a log axis with log_y."""
    return _train_series(
        metrics,
        "lr",
        title="Learning rate",
        empty="No learning rate recorded yet",
        name="lr (head)",
        ylabel="lr",
        colour=PALETTE[3],
        x=x,
        log_y=log_y,
    )


def throughput_chart(metrics: pd.DataFrame, *, x: str = "step") -> go.Figure:
    """Returns training throughput (images/s) against `x` (X_AXES)."""
    return _train_series(
        metrics,
        "images_per_s",
        title="Throughput",
        empty="No throughput recorded yet",
        name="images/s",
        ylabel="images / s",
        colour=PALETTE[5],
        x=x,
    )


def training_charts(
    metrics: pd.DataFrame,
    *,
    x: str = "step",
    smoothing: float = 0.0,
    log_loss: bool = False,
    log_lr: bool = False,
) -> dict[str, go.Figure]:
    """Returns the Training page's charts by key: loss, accuracy, lr, throughput, against
    `x` (X_AXES), train curves smoothed by `smoothing` (ema), loss and lr on log axes when
    asked."""
    return {
        "loss": loss_chart(metrics, x=x, smoothing=smoothing, log_y=log_loss),
        "accuracy": accuracy_chart(metrics, x=x, smoothing=smoothing),
        "lr": lr_chart(metrics, x=x, log_y=log_lr),
        "throughput": throughput_chart(metrics, x=x),
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
    "best_val_acc_lo",
    "best_val_acc_hi",
    "test_acc_lo",
    "test_acc_hi",
    "trainable_params",
    "trainable_pct",
    "total_params",
    "train_time_s",
    "images_per_s",
    "peak_memory_bytes",
    "memory_measure",
    "stored_bytes",
    "seed",
    "lr",
    "tune_lr",
    "group",
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


# ---------------------------------------------------------------- which accuracy


@dataclass(frozen=True)
class Accuracy:
    """Which accuracy a comparison reports: its column in the table of runs (0-1), the split
    its per-image predictions come from (store.read_hits) and its name on the page."""

    column: str
    split: str
    words: str

    @property
    def lo(self) -> str:
        """Returns the column of the low end of its 95 % interval."""
        return f"{self.column}_lo"

    @property
    def hi(self) -> str:
        """Returns the column of the high end of its 95 % interval."""
        return f"{self.column}_hi"


TEST = Accuracy("test_acc", "test", "test accuracy")
VAL = Accuracy("best_val_acc", "val", "val accuracy")


def accuracy_basis(table: pd.DataFrame) -> Accuracy:
    """Returns TEST when every run with results has a test accuracy, else VAL.

    Test images are the ones neither training, the choice of the best epoch nor a tuned
    learning rate saw; a run still training, or one without a test split, has none, and
    then every figure of the comparison uses val accuracy (and says so)."""
    if table.empty or "test_acc" not in table or "best_val_acc" not in table:
        return VAL
    scored = table[table["best_val_acc"].notna() | table["test_acc"].notna()]
    if scored.empty or scored["test_acc"].isna().any():
        return VAL
    if "tested" in scored and (scored["tested"] < scored["seeds"]).any():
        return VAL  # a seed_table: a seed without a test accuracy hides in the mean
    return TEST


# ---------------------------------------------------------------- seeds

# What a config holds besides its settings: the seed of the run, the format version and
# the software versions. Runs that differ only in these repeat one strategy.
_NOT_A_SETTING = ("seed", "env", "schema")


def seed_key(cfg: Mapping[str, Any]) -> str:
    """Returns what a run's config says apart from its seed (and its lr, when the lr was
    tuned: a tuned lr may differ from seed to seed); runs that share it repeat one strategy
    (their group and name are part of it)."""
    drop = set(_NOT_A_SETTING) | ({"lr"} if cfg.get("tune_lr") is True else set())
    kept = {k: v for k, v in cfg.items() if k not in drop}
    return json.dumps(kept, sort_keys=True, default=str)


def _seed_order(cfg: Mapping[str, Any]) -> float:
    seed = cfg.get("seed")
    return (
        float(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else math.inf
    )


def seed_groups(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Returns {label: run_ids by seed}, in the order of configs: runs whose configs differ
    only in seed (seed_key) share a label without the seed ("full"); a run alone keeps its
    label of run_labels. Labels are unique (a clash takes its first run's id suffix)."""
    by_key: dict[str, list[str]] = {}
    for rid, cfg in configs.items():
        by_key.setdefault(seed_key(cfg), []).append(rid)
    alone = run_labels(configs)
    named = {}
    for key, rids in by_key.items():
        cfg = configs[rids[0]]
        named[key] = (
            alone[rids[0]] if len(rids) == 1 else (cfg.get("name") or strategies.label(cfg))
        )
    counts: dict[str, int] = {}
    for label in named.values():
        counts[label] = counts.get(label, 0) + 1
    groups = {}
    for key, rids in by_key.items():
        label = named[key] if counts[named[key]] == 1 else f"{named[key]} · {rids[0][-6:]}"
        groups[label] = sorted(rids, key=lambda r: (_seed_order(configs[r]), r))
    return groups


def member_labels(groups: Mapping[str, Sequence[str]], configs) -> dict[str, str]:
    """Returns {run_id: its label}: the group's label, with "seed s" for a group of several."""
    found = {}
    for label, rids in groups.items():
        for rid in rids:
            seed = configs[rid].get("seed")
            found[rid] = label if len(rids) == 1 else f"{label} seed {seed}"
    return found


# Numbers of the table of runs that a strategy run with several seeds reports as a mean
# (with their standard deviation over the seeds in <column>_std).
_MEANS = (
    "best_val_acc",
    "final_val_acc",
    "test_acc",
    "best_val_acc_lo",
    "best_val_acc_hi",
    "test_acc_lo",
    "test_acc_hi",
    "trainable_params",
    "trainable_pct",
    "total_params",
    "train_time_s",
    "images_per_s",
    "peak_memory_bytes",
    "stored_bytes",
    "lr",
)


def seed_table(table: pd.DataFrame, groups: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Returns one row per strategy of seed_groups, in its order: a run alone as its row of
    the table of runs; k seeds as the mean of each number over the seeds that have it, with
    <column>_std (the sample standard deviation over the seeds, NaN with fewer than two) beside
    it and state as "2 completed, 1 running" when the seeds' states differ. Adds run (the
    group's label), seeds (k), run_ids, seed_list and lr_list (by seed), tested (the seeds
    with a test accuracy), tune_lr (any seed's); run_id is the first run's."""
    by_id = {row["run_id"]: row for row in table.to_dict("records")}
    rows = []
    for label, rids in groups.items():
        members = [by_id[r] for r in rids if r in by_id]
        if not members:
            continue
        row = dict(members[0])
        row.update(
            run=label,
            seeds=len(members),
            run_ids=tuple(m["run_id"] for m in members),
            seed_list=tuple(m.get("seed") for m in members),
            lr_list=tuple(m.get("lr") for m in members),
            tested=sum(pd.notna(m.get("test_acc")) for m in members),
            tune_lr=any(_is_true(m.get("tune_lr")) for m in members),
        )
        for column in _MEANS:
            if column not in row:
                continue
            values = pd.to_numeric(pd.Series([m[column] for m in members]), errors="coerce")
            if len(members) > 1:
                row[column] = values.mean()  # NaN when no seed has it
            row[f"{column}_std"] = values.std() if values.count() > 1 else math.nan
        states = list(dict.fromkeys(m.get("state") for m in members))
        if len(states) > 1:
            row["state"] = ", ".join(
                f"{sum(m.get('state') == s for m in members)} {s}" for s in states
            )
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in _MEANS:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def pooled_hits(
    strategies_table: pd.DataFrame, hits: Mapping[str, Sequence[bool] | None]
) -> dict[str, list[bool]]:
    """Returns {run_id of each row of a seed_table: the per-image outcomes of its runs, one
    seed after the other}, for the rows whose every run has them: paired with another row of
    the same seeds, image i of seed s meets image i of seed s."""
    pooled = {}
    for row in strategies_table.to_dict("records"):
        found = [hits.get(r) for r in row.get("run_ids") or (row["run_id"],)]
        if found and all(found):
            pooled[row["run_id"]] = [h for run in found for h in run]
    return pooled


def _seeds(row: Mapping[str, Any]) -> int:
    n = row.get("seeds")
    return int(n) if pd.api.types.is_number(n) and n == n and n >= 1 else 1


def _with_seeds(row: Mapping[str, Any], text: str) -> str:
    n = _seeds(row)
    return f"{text} (mean of {n} seeds)" if n > 1 else text


# ---------------------------------------------------------------- the headline


def headline(
    table: pd.DataFrame,
    hits: Mapping[str, Sequence[bool]] | None = None,
    accuracy: Accuracy | None = None,
) -> str:
    """Returns the one sentence that answers "which strategy, at what cost": the best run (a
    row of summary_table, or a strategy of seed_table: the mean over its seeds) by `accuracy`
    (accuracy_basis: test accuracy when every run has a test split, else val), its difference
    from `full` in points, and its train-time and trainable-parameter ratios to `full`.

    hits ({run_id: per image of the accuracy's split, right or not}; store.read_hits, pooled
    over seeds by pooled_hits) make it say how sure it is: when the paired-bootstrap interval
    of the best run's lead over the next one holds 0, it calls no winner and names the
    cheaper of the two instead."""
    acc = accuracy or accuracy_basis(table)
    col, words = acc.column, acc.words
    done = table.dropna(subset=[col]) if not table.empty and col in table else table.iloc[:0]
    if done.empty:
        return "No run has finished an epoch yet, so there is nothing to compare."
    best = done.loc[done[col].idxmax()]
    full = done[done["strategy"].map(strategies.is_baseline)]
    if len(done) == 1:
        who = "run" if _seeds(best) == 1 else "strategy"
        return (
            f"Only one {who} has results: {best['run']} reached "
            f"{_with_seeds(best, f'{fmt_pct(best[col])} {words}')}."
        )
    second = done.drop(index=best.name)
    runner_up = second.loc[second[col].idxmax()]
    tie = _within_noise(best, runner_up, hits or {}, acc)
    if tie is not None:
        return tie
    best_text = _with_seeds(best, f"{fmt_pct(best[col])} {words}")
    if full.empty:
        return (
            f"{best['run']} is best with {best_text}, "
            f"{_points(best[col] - runner_up[col])} ahead of "
            f"{runner_up['run']}; there is no full fine-tuning run to compare costs against."
        )
    ref = full.loc[full[col].idxmax()]
    if strategies.is_baseline(best["strategy"]):
        partial = done[~done["strategy"].map(strategies.is_baseline)]
        if partial.empty:
            return f"{best['run']} is best with {best_text}."
        alt = partial.loc[partial[col].idxmax()]
        return (
            f"{best['run']} is best with {best_text}; the best partial strategy, {alt['run']}, "
            f"is {_points(alt[col] - ref[col])} from it{_cost(alt, ref)}."
        )
    diff = best[col] - ref[col]
    return (
        f"{best['run']} is best with {best_text}, "
        f"{_points(diff)} {'above' if diff >= 0 else 'below'} full fine-tuning "
        f"({fmt_pct(ref[col])}){_cost(best, ref)}."
    )


def _within_noise(
    best: pd.Series, other: pd.Series, hits: Mapping[str, Sequence[bool]], acc: Accuracy
) -> str | None:
    """Returns the sentence for two runs the data cannot tell apart (the paired-bootstrap
    95 % interval of their difference on the same images, pooled over seeds, holds 0), else
    None."""
    a, b = hits.get(best["run_id"]), hits.get(other["run_id"])
    if not a or not b or len(a) != len(b):
        return None  # not scored on the same images: no paired interval
    if best.get("seed_list") != other.get("seed_list"):
        return None  # other seeds: with a split drawn per seed, other images too
    diff = stats.paired_difference(a, b)
    if not diff.within_noise:
        return None
    cheap, dear = sorted((best, other), key=_cheapness)
    seeds = _seeds(best)
    where = f"on these {diff.images // seeds} images" + (f" × {seeds} seeds" if seeds > 1 else "")
    means = " (means over seeds)" if seeds > 1 or _seeds(other) > 1 else ""
    return (
        f"{best['run']} and {other['run']} are within noise of each other: "
        f"{fmt_pct(best[acc.column])} and {fmt_pct(other[acc.column])} {acc.words}{means}, "
        f"a difference whose 95 % interval ({100 * diff.lo:+.1f} to {100 * diff.hi:+.1f} "
        f"points {where}) holds 0, so neither wins; {cheap['run']} is "
        f"the cheaper{_cost(cheap, dear)}."
    )


def _is_true(value: Any) -> bool:
    return pd.api.types.is_bool(value) and bool(value)


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


def _fill(colour: str, alpha: float = 0.18) -> str:
    """Returns a #RRGGBB colour as rgba with the given opacity (for a band under a line)."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def compare_curves(
    metrics: pd.DataFrame,
    y: str = "acc",
    x: str = "epoch",
    *,
    split: str = "val",
    smoothing: float = 0.0,
    log_y: bool = False,
) -> go.Figure:
    """Returns one trace per run (the `run` column) of `y` (acc, loss or lr) of a split (val:
    each epoch; train: every recorded step) against `x` (X_AXES: epoch, step or time_s).

    Runs that share a label and differ in run_id (a strategy with several seeds) draw one
    line, the mean over their seeds at each epoch (train: each step; x: the mean of their x
    there), in a band from the lowest to the highest seed; the title and the hover say so.
    smoothing > 0 smooths each run's curve (ema) before that; log_y: a log y axis."""
    name = _CURVE_NAMES.get((split, y), f"{split} {y}")
    xname = X_AXES.get(x, x)
    val = _curve_rows(metrics, split, x)
    if val.empty or "run" not in val or not _has(val, y):
        return _empty(name.capitalize(), "No epoch has finished yet")
    if smoothing > 0:
        val[y] = val.groupby("_run", sort=False)[y].transform(lambda v: ema(list(v), smoothing))
    x = "_x"
    per_point = "epoch" if split != "train" else "step"
    fig = go.Figure()
    scale = 100 if y == "acc" else 1
    banded = False
    for i, (run, rows) in enumerate(val.groupby("run", sort=False)):
        colour = PALETTE[i % len(PALETTE)]
        seeds = rows["run_id"].nunique() if "run_id" in rows else 1
        if seeds <= 1:
            fig.add_scatter(
                x=rows[x],
                y=scale * rows[y],
                name=str(run),
                mode="lines+markers" if split != "train" else "lines",
                line=dict(color=colour),
            )
            continue
        banded = True
        per = rows.groupby(per_point)
        band = pd.DataFrame(
            {
                "x": per[x].mean(),
                "mean": scale * per[y].mean(),
                "lo": scale * per[y].min(),
                "hi": scale * per[y].max(),
                "n": per[y].count(),
            }
        ).sort_index()
        xs = list(band["x"])
        fig.add_scatter(
            x=xs + xs[::-1],
            y=list(band["hi"]) + list(band["lo"])[::-1],
            name=f"{run}: min–max over {seeds} seeds",
            fill="toself",
            fillcolor=_fill(colour),
            line=dict(width=0),
            mode="lines",
            hoverinfo="skip",
            legendgroup=str(run),
            showlegend=False,
        )
        fig.add_scatter(
            x=xs,
            y=band["mean"],
            name=str(run),
            mode="lines+markers",
            line=dict(color=colour),
            legendgroup=str(run),
            customdata=band[["lo", "hi", "n"]].to_numpy(),
            hovertemplate="%{y:.3g}: the mean of %{customdata[2]} seeds, from "
            f"%{{customdata[0]:.3g}} to %{{customdata[1]:.3g}}<extra>{run}</extra>",
        )
    title = f"{name.capitalize()} by {xname}" + _smoothed_words(smoothing)
    if banded:
        title += " · seeds: mean, min–max band"
    fig.update_layout(
        title=title,
        xaxis_title=xname,
        yaxis=dict(title=name, type="log" if log_y else "linear"),
    )
    _style(fig, height=340)
    # below the chart: a legend of many runs wraps over the title when above it
    fig.update_layout(
        legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0.0),
        margin=dict(l=50, r=20, t=50, b=80),
    )
    return fig


# ---------------------------------------------------------------- cost and the Pareto front

# cost column -> (name on an axis, how a value reads, divisor for the axis, log axis)
COSTS: dict[str, tuple[str, Any, float, bool]] = {
    "trainable_params": ("trainable parameters", lambda v: fmt_count(v), 1.0, True),
    "train_time_s": ("train time (s)", lambda v: fmt_duration(v), 1.0, False),
    "peak_memory_bytes": ("peak memory (MB)", lambda v: fmt_bytes(v), 1e6, False),
    "stored_bytes": ("stored size (MB)", lambda v: fmt_bytes(v), 1e6, True),
}
_COST_NOUN = {
    "trainable_params": "trainable parameters",
    "train_time_s": "train time",
    "peak_memory_bytes": "a measured peak memory",
    "stored_bytes": "a stored size",
}


def cost_name(cost: str) -> str:
    """Returns how a cost column reads in a picker: "peak memory"."""
    return COSTS[cost][0].split(" (")[0]


def pareto_front(table: pd.DataFrame, cost: str, acc: str = "best_val_acc") -> list[str]:
    """Returns the runs (their `run` labels, cheapest first) on the Pareto front of accuracy
    `acc` (higher is better) against `cost` (lower is better): those no other run beats, that
    is, is at least as accurate at no more cost and better in one of the two. Runs that tie
    on both are all on it; runs missing either value are left out."""
    if table.empty or acc not in table or cost not in table:
        return []
    rows = table.assign(
        _a=pd.to_numeric(table[acc], errors="coerce"),
        _c=pd.to_numeric(table[cost], errors="coerce"),
    ).dropna(subset=["_a", "_c"])
    a, c = rows["_a"].to_numpy(), rows["_c"].to_numpy()
    front = []
    for i in range(len(rows)):
        beaten = (a >= a[i]) & (c <= c[i]) & ((a > a[i]) | (c < c[i]))
        if not beaten.any():
            front.append(i)
    front.sort(key=lambda i: (c[i], -a[i]))
    return [str(rows["run"].iloc[i]) for i in front]


def _missing(table: pd.DataFrame, column: str) -> list[str]:
    """Returns the runs of table that lack column."""
    if table.empty:
        return []
    if column not in table:
        return [str(r) for r in table["run"]]
    return [str(r) for r in table.loc[table[column].isna(), "run"]]


def accuracy_vs_cost(
    table: pd.DataFrame, cost: str = "trainable_params", accuracy: Accuracy | None = None
) -> go.Figure:
    """Returns accuracy (%) against a cost (COSTS: trainable parameters, train time, peak
    memory, stored size), one marker trace per run (or per strategy of a seed_table, with
    ± its standard deviation over seeds), so the cheapest good strategy stands out top left.

    The Pareto front (pareto_front) is marked: its runs as diamonds joined by a dashed step
    line, every other run fainter; runs without the cost are left out and counted below."""
    acc = accuracy or accuracy_basis(table)
    xname, fmt, unit, log = COSTS[cost]
    title = f"Accuracy vs {xname.split(' (')[0]}"
    have = [c for c in (acc.column, cost) if c in table]
    rows = table.dropna(subset=[acc.column, cost]) if len(have) == 2 else table.iloc[:0]
    if rows.empty:
        return _empty(title, f"No run with {_COST_NOUN[cost]} and an accuracy yet")
    front = set(pareto_front(rows, cost, acc.column))
    fig = go.Figure()
    for i, (_, r) in enumerate(rows.iterrows()):
        on = str(r["run"]) in front
        std = r.get(f"{acc.column}_std")
        fig.add_scatter(
            x=[float(r[cost]) / unit],
            y=[100 * float(r[acc.column])],
            name=str(r["run"]),
            mode="markers+text",
            text=[str(r["run"])],
            textposition="top center",
            cliponaxis=False,
            opacity=1.0 if on else 0.55,
            marker=dict(
                size=16 if on else 12,
                symbol="diamond" if on else "circle",
                color=PALETTE[i % len(PALETTE)],
                line=dict(width=1.5 if on else 0, color="#333333"),
            ),
            error_y=dict(type="data", array=[100 * float(std)], visible=True)
            if std is not None and std == std
            else None,
            hovertemplate=f"{r['run']}: %{{y:.1f}} % {acc.words}, {fmt(r[cost])}"
            + (" · on the Pareto front" if on else " · another run is better and cheaper")
            + "<extra></extra>",
        )
    ordered = rows[rows["run"].astype(str).isin(front)].sort_values([cost, acc.column])
    shapes = []
    if len(ordered) > 1:  # the front as steps: each run holds its accuracy up to the next cost
        xs = list(ordered[cost].astype(float) / unit)
        ys = list(100 * ordered[acc.column].astype(float))
        path = f"M {xs[0]},{ys[0]}" + "".join(
            f" H {x1} V {y1}" for x1, y1 in zip(xs[1:], ys[1:], strict=True)
        )
        shapes.append(
            dict(type="path", path=path, line=dict(color="#555555", width=1, dash="dash"))
        )
    lacking = _missing(table.dropna(subset=[acc.column]) if acc.column in table else table, cost)
    annotations = []
    if lacking:
        annotations.append(
            dict(
                text=f"{len(lacking)} run(s) without {_COST_NOUN[cost]} left out",
                showarrow=False,
                xref="paper",
                yref="paper",
                x=0,
                y=-0.28,
                xanchor="left",
                font=dict(size=11),
            )
        )
    fig.update_layout(
        title=f"{title} · ◆ Pareto front",
        xaxis_title=xname,
        yaxis_title=f"{acc.words} (%)",
        showlegend=False,
        hovermode="closest",
        shapes=shapes,
        annotations=annotations,
    )
    # Room around the markers (and their ± std) so that labels are never cut at the edges.
    y = 100 * rows[acc.column].astype(float)
    spread = f"{acc.column}_std"
    std = 100 * rows[spread].astype(float).fillna(0.0) if spread in rows else 0.0 * y
    low, high = float((y - std).min()), float((y + std).max())
    pad = max(2.0, 0.15 * (high - low))
    fig.update_yaxes(range=[low - pad, high + 2 * pad])
    x = rows[cost].astype(float) / unit
    if log:
        tiny = float(x[x > 0].min()) if (x > 0).any() else 1.0
        lo, hi = math.log10(max(tiny, float(x.min()))), math.log10(max(tiny, float(x.max())))
        span = max(0.5, 0.15 * (hi - lo))
        fig.update_xaxes(type="log", range=[lo - span, hi + span])
    else:
        span = max(0.1 * float(x.max()) or 1.0, 0.15 * float(x.max() - x.min()))
        fig.update_xaxes(range=[max(0.0, float(x.min()) - span), float(x.max()) + span])
    return _style(fig)


def pareto_sentence(
    table: pd.DataFrame, cost: str = "trainable_params", accuracy: Accuracy | None = None
) -> str:
    """Returns which runs are on the Pareto front of accuracy against cost, which are beaten
    on both, and which were left out for want of the cost (older runs lack measured memory
    and stored size)."""
    acc = accuracy or accuracy_basis(table)
    noun = cost_name(cost)
    scored = table.dropna(subset=[acc.column]) if acc.column in table else table.iloc[:0]
    front = pareto_front(scored, cost, acc.column)
    lacking = _missing(scored, cost)
    left_out = (
        f" Left out for want of {_COST_NOUN[cost]} (runs from before it was recorded): "
        f"{', '.join(lacking)}."
        if lacking
        else ""
    )
    if not front:
        return f"No run has both {acc.words} and {_COST_NOUN[cost]} yet.{left_out}"
    rest = [str(r) for r in scored["run"] if str(r) not in front and str(r) not in lacking]
    text = (
        f"Best trade-offs of {acc.words} against {noun} (the Pareto front, cheapest first): "
        f"{', '.join(front)}"
    )
    if rest:
        text += f"; a run at least as accurate for no more {noun} beats {', '.join(rest)}"
    return text + "." + left_out


def _pct_cell(mean: Any, std: Any) -> str:
    if mean is None or mean != mean:
        return ""
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None and std == std else "")


def _time_cell(mean: Any, std: Any) -> str:
    if mean is None or mean != mean:
        return ""
    if std is None or std != std:
        return fmt_duration(mean)
    return f"{fmt_duration(mean)} ± {fmt_duration(std) if std >= 1 else f'{std:.2g} s'}"


def _lr_cell(lrs: Sequence[Any], tuned: bool) -> str:
    shown = list(dict.fromkeys(f"{float(v):.3g}" for v in lrs if v is not None and v == v))
    return (", ".join(shown) + (" · tuned" if tuned else "")) if shown else ""


def results_table(
    strategies_table: pd.DataFrame,
    accuracy: Accuracy | None = None,
) -> pd.DataFrame:
    """Returns Compare's table of final metrics as shown, one row per run or strategy of a
    seed_table: run, [seeds], state, best_val_acc, test_acc, final_val_acc (in %: numbers
    when every row is one run, else text "mean ± std over seeds"), [interval] (the 95 %
    interval of `accuracy` of a run alone; left out when no row has one), trainable,
    train_time, peak_memory, stored, lr (each seed's lr, "· tuned" when a tuning chose it)
    and images_per_s."""
    acc = accuracy or accuracy_basis(strategies_table)
    t = strategies_table
    if t.empty:
        return pd.DataFrame(columns=["run", "state", "best_val_acc", "test_acc", "final_val_acc"])
    seeds = [_seeds(r) for r in t.to_dict("records")]
    several = max(seeds) > 1

    def col(name: str) -> pd.Series:
        return t[name] if name in t else pd.Series([math.nan] * len(t), index=t.index)

    shown = pd.DataFrame({"run": t["run"]})
    if several:
        shown["seeds"] = seeds
    shown["state"] = t["state"]
    for name in ("best_val_acc", "test_acc", "final_val_acc"):
        if several:
            shown[name] = [
                _pct_cell(m, s) for m, s in zip(col(name), col(f"{name}_std"), strict=True)
            ]
        else:
            shown[name] = 100 * pd.to_numeric(col(name), errors="coerce")
    shown["interval"] = [
        f"{100 * lo:.1f}–{100 * hi:.1f} %" if n == 1 and lo == lo and hi == hi else ""
        for n, lo, hi in zip(seeds, col(acc.lo), col(acc.hi), strict=True)
    ]
    if not shown["interval"].any():  # strategies with seeds: their spread is the ± std
        shown = shown.drop(columns="interval")
    shown["trainable"] = [
        "" if n is None or n != n else f"{fmt_count(n)} · {fmt_share(pct / 100)}"
        for n, pct in zip(col("trainable_params"), col("trainable_pct"), strict=True)
    ]
    shown["train_time"] = [
        _time_cell(m, s) for m, s in zip(col("train_time_s"), col("train_time_s_std"), strict=True)
    ]
    shown["peak_memory"] = ["" if v != v else fmt_bytes(v) for v in col("peak_memory_bytes")]
    shown["stored"] = ["" if v != v else fmt_bytes(v) for v in col("stored_bytes")]
    shown["lr"] = [
        _lr_cell(r.get("lr_list") or [r.get("lr")], _is_true(r.get("tune_lr")))
        for r in t.to_dict("records")
    ]
    shown["images_per_s"] = ["" if v != v else f"{v:,.0f}" for v in col("images_per_s")]
    return shown.reset_index(drop=True)


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


def confusion_chart(
    summaries: Mapping[str, Mapping[str, Any]], *, selectable: bool = False
) -> go.Figure:
    """Returns the confusion matrices side by side (rows true, columns predicted), one heatmap
    per run, each normalised per true class so runs with different counts compare.

    selectable: a click selects a cell (an invisible marker per cell over each heatmap, as
    Plotly selects no heatmap cell; confusion_cell reads which)."""
    have = {k: s for k, s in summaries.items() if s and s.get("confusion_matrix")}
    if not have:
        return _empty("Confusion matrices", "Appear when runs finish")
    n = len(have)
    fig = make_subplots(
        rows=1, cols=n, subplot_titles=[str(k) for k in have], horizontal_spacing=0.04
    )
    first = None
    for col, (label, s) in enumerate(have.items(), start=1):
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
            hoverinfo="skip" if selectable else None,  # the cell's marker says it
            row=1,
            col=col,
        )
        if selectable:
            _cell_targets(fig, str(label), classes, cm, norm, row=1, col=col)
        fig.update_xaxes(title_text="predicted", row=1, col=col)
        # a panel names its rows unless they are the first panel's classes, named beside it
        own_names = col == 1 or classes != first
        fig.update_yaxes(autorange="reversed", showticklabels=own_names, row=1, col=col)
    fig.update_yaxes(title_text="true", row=1, col=1)
    fig.update_layout(
        title="Confusion matrices" + (" · click a cell to see its images" if selectable else ""),
        coloraxis=dict(colorscale="Blues", cmin=0, cmax=1, colorbar=dict(title="share")),
        hovermode="closest",
    )
    _style(fig, height=360)
    if selectable:  # a click anywhere in a cell picks its marker, the nearest one
        fig.update_layout(hovermode="closest", hoverdistance=-1, clickmode="event+select")
    return fig


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


_TRY_INSTEAD = (
    "Try a higher learning rate (python -m finetune_core lr-find suggests one), more epochs, "
    "or a strategy that trains more of the network."
)


def _loss_fell(metrics: pd.DataFrame) -> tuple[float, float] | None:
    """Returns (first, last): the medians of the first and last tenth of the training loss
    records, when the last is less than UNDERTRAINED_FALL below the first; else None."""
    if metrics.empty or "split" not in metrics:
        return None
    train = metrics.loc[metrics["split"] == "train", "loss"].dropna()
    if len(train) < 4 or not (metrics["split"] == "val").any():
        return None
    tenth = max(1, len(train) // 10)
    first, last = float(train.iloc[:tenth].median()), float(train.iloc[-tenth:].median())
    if first <= 0 or last < (1 - UNDERTRAINED_FALL) * first:
        return None
    return first, last


def undertrained(metrics: pd.DataFrame) -> str | None:
    """Returns what to try when a run's training loss barely fell (its last tenth of train
    records, median, at least UNDERTRAINED_FALL below its first tenth), None otherwise or
    with too few records to tell (fewer than 4, or no finished epoch)."""
    fell = _loss_fell(metrics)
    if fell is None:
        return None
    first, last = fell
    return (
        f"under-trained: its training loss fell only {100 * max(0.0, 1 - last / first):.0f} % "
        f"(from {first:.3g} to {last:.3g}). {_TRY_INSTEAD}"
    )


def undertrained_note(metrics: Mapping[str, pd.DataFrame]) -> str | None:
    """Returns one warning for the under-trained runs among {label: metrics}: the run's own
    sentence for one ("full is under-trained: ..."), the runs with how far each loss fell
    for several (a comparison with seeds would repeat one sentence per seed); None for none."""
    found = {k: f for k, m in metrics.items() if (f := _loss_fell(m)) is not None}
    if not found:
        return None
    if len(found) == 1:
        ((label, m),) = ((k, metrics[k]) for k in found)
        return f"{label} is {undertrained(m)}"
    runs = ", ".join(
        f"{label} ({100 * max(0.0, 1 - last / first):.0f} %)"
        for label, (first, last) in found.items()
    )
    return (
        f"{len(found)} runs are under-trained, their training loss fell less than "
        f"{100 * UNDERTRAINED_FALL:.0f} %: {runs}. {_TRY_INSTEAD}"
    )


def seed_summaries(
    groups: Mapping[str, Sequence[str]], summaries: Mapping[str, Mapping[str, Any] | None]
) -> dict[str, dict[str, Any]]:
    """Returns {label: summary} per strategy of seed_groups, for the per-class and confusion
    charts: a run alone as its summary; several seeds as one, per-class accuracy the mean
    over the seeds and the confusion matrix their sum (when they share the classes)."""
    pooled = {}
    for label, rids in groups.items():
        have = [summaries[r] for r in rids if summaries.get(r)]
        if not have:
            continue
        if len(have) == 1:
            pooled[label] = dict(have[0])
            continue
        classes = list(have[0].get("classes") or [])
        same = all(list(s.get("classes") or []) == classes for s in have)
        merged: dict[str, Any] = {"classes": classes}
        per_class = [s.get("per_class_acc") for s in have if s.get("per_class_acc")]
        if same and per_class:
            merged["per_class_acc"] = {
                c: sum(float(p.get(c, math.nan)) for p in per_class) / len(per_class)
                for c in classes
            }
        matrices = [s.get("confusion_matrix") for s in have]
        if same and all(matrices) and len({len(m) for m in matrices}) == 1:
            merged["confusion_matrix"] = [
                [sum(m[i][j] for m in matrices) for j in range(len(matrices[0][i]))]
                for i in range(len(matrices[0]))
            ]
        pooled[label] = merged
    return pooled


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

# the strategies a depth view draws: how many groups train from the top (last_n, full), or
# which one group alone (surgical)
_DEPTH_OPTION = {"last_n": "unfreeze_last", "surgical": "surgical_group", "full": None}
_SERIES_WORDS = {"top": "top k groups (last_n)", "surgical": "only group k (surgical)"}
_DEPTH_COLUMNS = [
    "run_id",
    "series",
    "full",
    "depth",
    "seed",
    "acc",
    "lo",
    "hi",
    "split",
    "train_time_s",
    "trainable_params",
    "peak_memory_bytes",
]


def depth_points(
    configs: Mapping[str, Mapping[str, Any]],
    summaries: Mapping[str, Mapping[str, Any] | None],
    accuracy: Accuracy | None = None,
) -> pd.DataFrame:
    """Returns one row per completed last_n, full or surgical run: run_id, series ("top":
    last_n's top k groups, and full, marked by full=True, sorting last; "surgical": only
    group k, counted from the top), depth (k), seed, acc (`accuracy`; by default test
    accuracy when every such run has one, else best val), lo and hi (its 95 % interval),
    split ("test" or "val"), train_time_s, trainable_params, peak_memory_bytes (NaN for runs
    from before memory was measured)."""
    done = []
    for rid, cfg in configs.items():
        summary = summaries.get(rid) or {}
        if summary.get("state") != "completed" or summary.get("best_val_acc") is None:
            continue
        if cfg.get("strategy") in _DEPTH_OPTION:
            done.append((rid, cfg, summary))
    if accuracy is None:
        tested = done and all(s.get("test_acc") is not None for _, _, s in done)
        accuracy = TEST if tested else VAL
    rows = []
    for rid, cfg, summary in done:
        if summary.get(accuracy.column) is None:
            continue
        strategy = cfg["strategy"]
        option = _DEPTH_OPTION[strategy]
        ci = summary.get(f"{accuracy.column}_ci") or [None, None]
        memory = summary.get("peak_memory_bytes")
        rows.append(
            {
                "run_id": rid,
                "series": "surgical" if strategy == "surgical" else "top",
                "full": option is None,
                "depth": cfg.get(option) if option else None,
                "seed": cfg.get("seed"),
                "acc": summary[accuracy.column],
                "lo": ci[0],
                "hi": ci[1],
                "split": accuracy.split,
                "train_time_s": summary.get("train_time_s"),
                "trainable_params": summary.get("trainable_params"),
                "peak_memory_bytes": memory if isinstance(memory, (int, float)) else None,
            }
        )
    frame = pd.DataFrame(rows, columns=_DEPTH_COLUMNS)
    for column in ("acc", "lo", "hi", "train_time_s", "trainable_params", "peak_memory_bytes"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def _depth_label(row) -> str:
    if row["full"]:
        return "full"
    return "0 (probe)" if row["depth"] == 0 else str(int(row["depth"]))


def _words_of(points: pd.DataFrame) -> str:
    split = points["split"].iloc[0] if "split" in points and len(points) else "val"
    return TEST.words if split == "test" else VAL.words


def _by_depth(points: pd.DataFrame) -> pd.DataFrame:
    """Returns one row per series and depth, shallow to full: series, label, mean acc, lo/hi
    (the widest of its seeds' intervals), mean train time, trainable parameters and peak
    memory, runs and seeds (by seed)."""
    frame = points.assign(
        label=points.apply(_depth_label, axis=1),
        order=points["depth"].astype("float64").fillna(math.inf).where(~points["full"], math.inf),
        _seed=pd.to_numeric(points["seed"], errors="coerce"),
    ).sort_values("_seed", kind="stable")
    grouped = frame.groupby(["series", "label"], sort=False)
    out = grouped.agg(
        order=("order", "first"),
        acc=("acc", "mean"),
        lo=("lo", "min"),
        hi=("hi", "max"),
        train_time_s=("train_time_s", "mean"),
        trainable_params=("trainable_params", "mean"),
        peak_memory_bytes=("peak_memory_bytes", "mean"),
        runs=("run_id", list),
        seeds=("seed", list),
    )
    return out.reset_index().sort_values(["order", "series"], ascending=[True, False])


def depth_curve(points: pd.DataFrame) -> go.Figure:
    """Returns accuracy (mean over seeds, with its 95 % interval) against the backbone groups
    trained, from the linear probe to full ("top k groups": last_n), with "only group k"
    (surgical) as a second series at its group; train time as bars on a second axis and,
    when the runs measured it, peak memory on a third."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    words = _words_of(points)
    memory = False
    if not points.empty:
        d = _by_depth(points)
        order = list(dict.fromkeys(d.sort_values("order", kind="stable")["label"]))
        memory = bool(d["peak_memory_bytes"].notna().any())
        for i, series in enumerate(("top", "surgical")):
            rows = d[d["series"] == series]
            if rows.empty:
                continue
            colour = PALETTE[i]
            fig.add_trace(
                go.Scatter(
                    x=rows["label"],
                    y=100 * rows["acc"],
                    mode="lines+markers",
                    name=f"{_SERIES_WORDS[series]}: {words}, 95 % interval",
                    line=dict(color=colour, dash="solid" if series == "top" else "dash"),
                    marker=dict(symbol="circle" if series == "top" else "diamond", size=9),
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=(100 * (rows["hi"] - rows["acc"])).fillna(0),
                        arrayminus=(100 * (rows["acc"] - rows["lo"])).fillna(0),
                    ),
                    customdata=[[len(r)] for r in rows["runs"]],
                    hovertemplate="%{y:.1f} % (%{customdata[0]} run(s))",
                ),
                secondary_y=False,
            )
            fig.add_trace(
                go.Bar(
                    x=rows["label"],
                    y=rows["train_time_s"],
                    name=f"train time (s), {_SERIES_WORDS[series].split(' (')[0]}",
                    marker_color=colour,
                    opacity=0.25,
                ),
                secondary_y=True,
            )
        for i, series in enumerate(("top", "surgical")):
            rows = d[(d["series"] == series) & d["peak_memory_bytes"].notna()]
            if rows.empty:
                continue
            fig.add_trace(
                go.Scatter(
                    x=rows["label"],
                    y=rows["peak_memory_bytes"] / 1e6,
                    mode="lines+markers",
                    name=f"peak memory (MB), {_SERIES_WORDS[series].split(' (')[0]}",
                    line=dict(color=(PALETTE[5], PALETTE[3])[i], dash="dot", width=1.5),
                    marker=dict(symbol="x", size=7),
                    yaxis="y3",
                )
            )
        # depths read as numbers ("1", "2") but are places in an order with "full" last
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)
    fig.update_yaxes(title_text=f"{words} (%)", secondary_y=False)
    fig.update_yaxes(title_text="train time (s)", secondary_y=True, showgrid=False, tickmode="auto")
    _style(
        fig,
        height=400,
        title="How much to unfreeze: accuracy by backbone groups trained",
        xaxis_title="backbone groups trained, counted from the top "
        "(top k: the k top groups; only group k: that group alone)",
        barmode="group",
    )
    # many series: the legend goes below the chart, out of the title's way
    fig.update_layout(
        legend=dict(orientation="h", yanchor="top", y=-0.3, xanchor="left", x=0.0),
        margin=dict(l=50, r=70 if memory else 20, t=50, b=110),
        hovermode="x unified",
    )
    if memory:
        fig.update_layout(
            xaxis=dict(domain=[0.0, 0.9]),
            yaxis3=dict(
                title=dict(text="peak memory (MB)"),
                overlaying="y",
                side="right",
                anchor="free",
                position=1.0,
                showgrid=False,
                rangemode="tozero",
                tickmode="auto",
            ),
        )
    return fig


def depth_sentence(points: pd.DataFrame, hits: Mapping[str, Sequence[bool]]) -> str | None:
    """Returns which depth is the cheapest within noise of the best (the paired-bootstrap
    interval of their difference, pooled over seeds, holds 0), or None with fewer than 3
    depths (surgical groups count as depths). Without per-image predictions (of the points'
    split) it compares the mean accuracies only, and says so."""
    if points.empty:
        return None
    d = _by_depth(points)
    if len(d) < 3:
        return None
    words = _words_of(points)
    best = d.loc[d["acc"].idxmax()]

    def pooled(row) -> list[bool] | None:
        found = [hits.get(r) for r in row["runs"]]
        return [h for run in found for h in run] if all(found) else None

    best_hits = pooled(best)
    best_words = _depth_words(best["label"], best["series"])
    if best_hits is None:
        return (
            f"The best depth is {best_words} ({fmt_pct(best['acc'])} {words}); these runs "
            "have no per-image predictions, so how sure that is cannot be said."
        )
    for _, row in d.sort_values(["trainable_params", "train_time_s"]).iterrows():
        if (row["series"], row["label"]) == (best["series"], best["label"]):
            break
        mine = pooled(row)
        if mine is None or len(mine) != len(best_hits) or row["seeds"] != best["seeds"]:
            continue
        # seeds pair up in the same order: image i of seed s against image i of seed s
        diff = stats.paired_difference(mine, best_hits)
        if diff.within_noise:
            return (
                f"{_depth_words(row['label'], row['series']).capitalize()} is the cheapest "
                f"within noise of the best ({best_words}: {fmt_pct(best['acc'])} {words}): "
                f"{fmt_pct(row['acc'])}, a difference whose 95 % interval "
                f"({100 * diff.lo:+.1f} to {100 * diff.hi:+.1f} points) holds 0"
                f"{_cost(row, best)}."
            )
    return (
        f"The best depth is {best_words} ({fmt_pct(best['acc'])} {words}); no cheaper depth "
        "is within noise of it."
    )


def _depth_words(label: str, series: str = "top") -> str:
    if label == "full":
        return "full fine-tuning"
    if label.startswith("0"):
        return "training only the head (a linear probe)"
    if series == "surgical":
        return f"training only backbone group {label} from the top (surgical)"
    return f"training the top {label} backbone group{'' if label == '1' else 's'}"


# ---------------------------------------------------------------- the learning-rate finder


def lr_finder_chart(curve: Mapping[str, Any]) -> go.Figure:
    """Returns the range test's loss against the lr on a log axis (lr_find.LrCurve.to_dict):
    each step's loss as dots, the smoothed loss as a line, the suggestion marked."""
    lrs, losses, smoothed = curve.get("lrs") or [], curve.get("losses") or [], curve.get("smoothed")
    if not lrs:
        return _empty("Learning-rate range test", "The range test took no step.")
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=lrs,
            y=losses,
            mode="markers",
            name="loss per step",
            marker=dict(size=4, opacity=0.35),
            hovertemplate="lr %{x:.3g}: loss %{y:.3f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=lrs,
            y=smoothed,
            mode="lines",
            name="smoothed loss",
            hovertemplate="lr %{x:.3g}: smoothed %{y:.3f}<extra></extra>",
        )
    )
    suggested = curve.get("suggested_lr")
    if suggested:
        fig.add_vline(x=suggested, line_dash="dash", line_color="#2ca02c")
        fig.add_annotation(
            x=math.log10(suggested),
            y=1.0,
            yref="paper",
            text=f"suggested {suggested:.3g}",
            showarrow=False,
            yanchor="bottom",
        )
    top = max(smoothed or losses)
    low = min(smoothed or losses)
    return _style(
        fig,
        height=320,
        title="Learning-rate range test: loss against lr",
        xaxis=dict(type="log", title="learning rate (head)"),
        yaxis=dict(title="training loss", range=[low - 0.05 * (top - low), min(top, 3 * low)]),
        hovermode="closest",
    )


def tuning_sentence(tuning: Mapping[str, Any] | None) -> str | None:
    """Returns what a run's lr search found (store.read_tuning), in one sentence, or None."""
    if not tuning or tuning.get("chosen_lr") is None:
        return None
    trials = []
    for t in tuning.get("trials") or []:
        score = f"{100 * t['val_acc']:.1f} %" if t.get("val_acc") is not None else "failed"
        trials.append(f"{t['lr']:.3g}: {score}")
    text = (
        f"Learning rate tuned before training: {tuning['chosen_lr']:.3g} "
        f"(was {tuning.get('original_lr', 0):.3g}); val accuracy of a training at each rate "
        f"tried: {', '.join(trials)}; the loss blew up at {tuning.get('blowup_lr', 0):.3g}."
    )
    notes = tuning.get("notes") or []
    return text + (" " + " ".join(n[0].upper() + n[1:] + "." for n in notes) if notes else "")


# --- what fine-tuning changed
# Weight drift per group and epoch (store.read_drift's frames) and phase markers on curves.

DRIFT_COLOURS = "Viridis"  # perceptually uniform and colour-blind safe
_UNTRAINED = "#DDDDDD"  # a cell of exactly 0: the group has not trained (yet)
_PHASE_SHORT = {"linear probe": "LP", "fine-tune": "FT"}
_MARKER_GREY = "#777777"
_MARKED_CHARTS = ("loss", "accuracy", "lr")  # the Training charts that show phase markers


def drift_matrix(drift: pd.DataFrame) -> pd.DataFrame:
    """Returns drift (store.read_drift's frame) as a table: one row per group (stem first,
    the head last), one column per epoch, ||θ − θ₀|| / ||θ₀|| in the cells."""
    if drift is None or drift.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(drift["group"]))
    table = drift.pivot_table(index="group", columns="epoch", values="drift", aggfunc="mean")
    table = table.reindex(order)
    table.columns = [int(c) for c in table.columns]
    return table


def _drift_log(value: Any) -> float | None:
    """Returns log10 of a drift for the colour (None where it is 0 or unknown)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value <= 0:
        return None
    return math.log10(value)


def _drift_range(tables: Sequence[pd.DataFrame]) -> tuple[float, float]:
    """Returns (lowest, highest) log10 of the drifts above 0 in tables, for one colour scale."""
    logs = [
        v
        for t in tables
        for v in (_drift_log(x) for x in t.to_numpy().ravel().tolist())
        if v is not None
    ]
    if not logs:
        return -3.0, 0.0
    low, high = min(logs), max(logs)
    return (low - 0.5, high + 0.5) if high - low < 1e-9 else (low, high)


def _drift_colour_axis(low: float, high: float) -> dict:
    """Returns the shared colour axis: log10 drift, its bar labelled in percent."""
    ticks = [
        math.log10(m * 10.0**k)
        for k in range(math.floor(low) - 1, math.ceil(high) + 1)
        for m in (1, 2, 5)
        if low - 1e-9 <= math.log10(m * 10.0**k) <= high + 1e-9
    ]
    if len(ticks) > 7:  # a wide range: the powers of ten only
        ticks = [t for t in ticks if abs(t - round(t)) < 1e-9]
    if len(ticks) < 2:
        ticks = [low, high]
    return dict(
        colorscale=DRIFT_COLOURS,
        cmin=low,
        cmax=high,
        colorbar=dict(
            title=dict(text="‖θ − θ₀‖ / ‖θ₀‖", side="right"),
            tickvals=ticks,
            ticktext=[fmt_share(10.0**t) for t in ticks],
        ),
    )


def _drift_traces(table: pd.DataFrame, phases: Mapping[int, str], label: str) -> list[go.Heatmap]:
    """Returns a drift table's two heatmaps: grey cells of exactly 0, then the others coloured
    by log10 drift on the shared colour axis; the hover says the group, epoch, drift, phase."""
    groups, epochs = [str(g) for g in table.index], list(table.columns)
    values = table.to_numpy().tolist()
    phase = [[phases.get(e, "") for e in epochs] for _ in groups]
    zero = [[1.0 if v == 0 else None for v in row] for row in values]
    coloured = [[_drift_log(v) for v in row] for row in values]
    custom = [
        [[v, p] for v, p in zip(row, prow, strict=True)]
        for row, prow in zip(values, phase, strict=True)
    ]
    text = [
        ["0" if v == 0 else ("" if v is None or v != v else fmt_share(v)) for v in row]
        for row in values
    ]
    small = len(epochs) <= 12
    common = dict(
        x=epochs,
        y=groups,
        customdata=custom,
        xgap=1,
        ygap=1,
        text=text,
        texttemplate="%{text}" if small else None,
    )
    return [
        go.Heatmap(
            z=zero,
            colorscale=[[0, _UNTRAINED], [1, _UNTRAINED]],
            showscale=False,
            name=f"{label}: not trained",
            hovertemplate="%{y}, epoch %{x}: 0, it has not trained<br>phase %{customdata[1]}"
            "<extra></extra>",
            **common,
        ),
        go.Heatmap(
            z=coloured,
            coloraxis="coloraxis",
            name=f"{label}: drift",
            hovertemplate="%{y}, epoch %{x}: moved %{text} of its starting norm "
            "(‖θ − θ₀‖ / ‖θ₀‖ = %{customdata[0]:.3g})<br>phase %{customdata[1]}<extra></extra>",
            **common,
        ),
    ]


def _phases_by_epoch(drift: pd.DataFrame) -> dict[int, str]:
    rows = drift.dropna(subset=["epoch"]).drop_duplicates("epoch")
    return {
        int(e): ("" if pd.isna(p) else str(p))
        for e, p in zip(rows["epoch"], rows["phase"], strict=True)
    }


def drift_heatmap(
    drift: pd.DataFrame, title: str = "Weight drift from the starting weights"
) -> go.Figure:
    """Returns one run's weight drift (store.read_drift's frame) as a heatmap: backbone groups
    stem (bottom) to head (top) against the epoch, coloured by ||θ − θ₀|| / ||θ₀|| on a log
    scale; grey: exactly 0 (a group that has not trained)."""
    table = drift_matrix(drift)
    if table.empty:
        return _empty(title, "Drift appears when the first epoch ends")
    low, high = _drift_range([table])
    fig = go.Figure(_drift_traces(table, _phases_by_epoch(drift), "run"))
    return _style(
        fig,
        height=max(260, 70 + 34 * len(table)),
        title=title,
        xaxis=dict(title="epoch", dtick=1, type="category"),
        yaxis=dict(title="group", type="category"),
        coloraxis=_drift_colour_axis(low, high),
        hovermode="closest",
    )


def seed_drift(drifts: Mapping[str, pd.DataFrame], rids: Sequence[str]) -> pd.DataFrame:
    """Returns the mean drift over the runs rids (one strategy's seeds) per (epoch, group), in
    the first run's order of groups; a read_drift-shaped frame (empty without records)."""
    frames = [
        drifts[r] for r in rids if r in drifts and drifts[r] is not None and not drifts[r].empty
    ]
    if not frames:
        return pd.DataFrame(columns=list(store.DRIFT_COLUMNS))
    both = pd.concat(frames, ignore_index=True)
    order = {g: i for i, g in enumerate(dict.fromkeys(both["group"]))}
    mean = both.groupby(["epoch", "group"], as_index=False, sort=False).agg(
        drift=("drift", "mean"), phase=("phase", "first"), runs=("drift", "count")
    )
    mean["order"] = mean["group"].map(order)
    return mean.sort_values(["epoch", "order"]).drop(columns="order").reset_index(drop=True)


def drift_heatmaps(
    drifts: Mapping[str, pd.DataFrame], groups: Mapping[str, Sequence[str]], columns: int = 3
) -> go.Figure:
    """Returns the weight drift of several strategies side by side: one heatmap per strategy
    (groups: seed_groups' {label: run ids}; seeds averaged per epoch and group) on one
    colour scale, so the same colour is the same drift in every panel."""
    tables, phases = {}, {}
    for label, rids in groups.items():
        mean = seed_drift(drifts, rids)
        if not mean.empty:
            tables[label], phases[label] = drift_matrix(mean), _phases_by_epoch(mean)
    title = "Weight drift from the starting weights"
    if not tables:
        return _empty(title, "Drift appears when the runs' first epochs end")
    seeds = max(len(groups[label]) for label in tables)
    if seeds > 1:
        title += " · seeds: mean"
    cols = min(columns, len(tables))
    rows = math.ceil(len(tables) / cols)
    same_groups = len({tuple(t.index) for t in tables.values()}) == 1
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[str(k) for k in tables],
        shared_yaxes=same_groups,
        horizontal_spacing=0.03 if same_groups else 0.08,
        vertical_spacing=min(0.3, 0.35 / rows) if rows > 1 else 0.1,
    )
    low, high = _drift_range(list(tables.values()))
    for i, (label, table) in enumerate(tables.items()):
        row, col = i // cols + 1, i % cols + 1
        for trace in _drift_traces(table, phases[label], str(label)):
            fig.add_trace(trace, row=row, col=col)
        fig.update_xaxes(title_text="epoch", type="category", row=row, col=col)
        fig.update_yaxes(type="category", row=row, col=col)
    groups_shown = max(len(t) for t in tables.values())
    return _style(
        fig,
        height=max(280, rows * (60 + 34 * groups_shown) + 60),
        title=title,
        coloraxis=_drift_colour_axis(low, high),
        hovermode="closest",
    )


@dataclass(frozen=True)
class PhaseMarker:
    """A moment a curve should mark: a phase change or the end of warm-up."""

    kind: str  # "phase" (a new phase of the plan starts) or "warmup" (its last step is done)
    label: str  # what the chart writes: "unfreeze layer4", "LP → FT", "end of warm-up"
    step: float  # the global step at the moment (a phase: the last step of the epoch before)
    epoch: float  # the same moment in epochs (2.0: the end of epoch 2)
    time_s: float | None  # and in training seconds, when the records tell
    words: str  # the hover: what changed, when


def _phase_label(before: str, after: str) -> str:
    if before in _PHASE_SHORT and after in _PHASE_SHORT:
        return f"{_PHASE_SHORT[before]} → {_PHASE_SHORT[after]}"
    return after


def _steps_per_epoch(val: pd.DataFrame) -> float | None:
    """Returns the steps of one epoch: a val record's step over its epoch (every epoch but a
    resumed one ends on a multiple), else None."""
    rows = val.dropna(subset=["epoch", "step"])
    rows = rows[rows["epoch"] > 0]
    if rows.empty:
        return None
    first = rows.iloc[0]
    return float(first["step"]) / float(first["epoch"])


def _time_at(train: pd.DataFrame, val: pd.DataFrame, step: float) -> float | None:
    """Returns the training seconds at a step, interpolated between the records around it."""
    rows = pd.concat([train, val])[["step", "time_s"]].dropna().sort_values("step")
    if rows.empty:
        return None
    steps, times = rows["step"].astype(float).tolist(), rows["time_s"].astype(float).tolist()
    if step <= steps[0]:
        return times[0] * step / steps[0] if steps[0] else times[0]
    for i in range(1, len(steps)):
        (s0, t0), (s1, t1) = (steps[i - 1], times[i - 1]), (steps[i], times[i])
        if s0 <= step <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    return None  # after the last record: not reached yet


def phase_markers(
    metrics: pd.DataFrame,
    config: Mapping[str, Any] | None,
    status: Mapping[str, Any] | None = None,
) -> list[PhaseMarker]:
    """Returns a run's phase markers, in step order: each phase change of its plan (gradual
    unfreezing, LP → FT), read from the phase of its val records (and, while the run trains,
    status.json's phase of the epoch under way), and the end of its warm-up
    (config warmup_epochs), once the records reach it."""
    val, train = _split(metrics, "val"), _split(metrics, "train")
    found: list[PhaseMarker] = []
    if "phase" in val:
        epochs = val.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last")
        seen = [
            (int(e), float(s), t, str(p))
            for e, s, t, p in zip(
                epochs["epoch"], epochs["step"], epochs["time_s"], epochs["phase"], strict=True
            )
            if not pd.isna(p)
        ]
        now = status or {}
        if seen and now.get("phase") and now.get("epoch") == seen[-1][0] + 1:
            seen.append((int(now["epoch"]), math.nan, None, str(now["phase"])))  # under way
        for (e0, s0, t0, p0), (e1, _s1, _t1, p1) in zip(seen[:-1], seen[1:], strict=True):
            if p1 != p0 and e1 == e0 + 1:
                found.append(
                    PhaseMarker(
                        "phase",
                        _phase_label(p0, p1),
                        s0,
                        float(e0),
                        None if t0 is None or pd.isna(t0) else float(t0),
                        f"after epoch {e0}: {p0} → {p1}",
                    )
                )
    warmup = float((config or {}).get("warmup_epochs") or 0)
    per_epoch = _steps_per_epoch(val)
    last = max([float(s) for s in pd.concat([train["step"], val["step"]]).dropna()] or [0.0])
    if warmup > 0 and per_epoch:
        step = float(round(warmup * per_epoch))
        if step <= last:
            found.append(
                PhaseMarker(
                    "warmup",
                    "end of warm-up",
                    step,
                    step / per_epoch,
                    _time_at(train, val, step),
                    f"warm-up ends at step {step:.0f} ({warmup:g} epochs): the lr schedule starts",
                )
            )
    return sorted(found, key=lambda m: m.step)


def _marker_x(marker: PhaseMarker, x: str) -> float | None:
    value = {"step": marker.step, "epoch": marker.epoch, "time_s": marker.time_s}.get(x)
    return None if value is None or math.isnan(value) else value


def add_phase_markers(
    fig: go.Figure, markers: Sequence[PhaseMarker], x: str = "step", colour: str = _MARKER_GREY
) -> go.Figure:
    """Returns fig with a dotted vertical line and a label at each marker, placed on the x
    axis's unit (step, epoch or time_s); shapes and labels are named "phase: <label>" or
    "warmup: <label>". A figure without data (a placeholder) is left as it is."""
    if not fig.data:
        return fig
    shapes, notes = [], []
    for m in markers:
        at = _marker_x(m, x)
        if at is None:
            continue
        shape, note = _marker_parts(m, at, colour)
        shapes.append(shape)
        notes.append(note)
    if shapes:
        fig.update_layout(
            shapes=[*fig.layout.shapes, *shapes], annotations=[*fig.layout.annotations, *notes]
        )
    return fig


def _marker_parts(m: PhaseMarker, at: float, colour: str, words: str | None = None):
    name = f"{m.kind}: {m.label}"
    shape = dict(
        type="line",
        name=name,
        xref="x",
        yref="paper",
        x0=at,
        x1=at,
        y0=0,
        y1=1,
        line=dict(color=colour, width=1.5, dash="dot" if m.kind == "phase" else "dash"),
        layer="below",
    )
    note = dict(
        name=name,
        x=at,
        xref="x",
        y=1,
        yref="paper",
        text=m.label,
        hovertext=words or m.words,
        showarrow=False,
        textangle=-90,
        xanchor="right",
        yanchor="top",
        font=dict(size=10, color=colour),
    )
    return shape, note


def mark_training_charts(
    charts: Mapping[str, go.Figure],
    metrics: pd.DataFrame,
    config: Mapping[str, Any] | None,
    status: Mapping[str, Any] | None = None,
    x: str = "step",
) -> None:
    """Adds the run's phase markers to its loss, accuracy and lr charts (training_charts')."""
    markers = phase_markers(metrics, config, status)
    for key in _MARKED_CHARTS:
        if key in charts:
            add_phase_markers(charts[key], markers, x)


def mark_compare_curves(
    fig: go.Figure,
    metrics: pd.DataFrame,
    configs: Mapping[str, Mapping[str, Any]] | None,
    x: str = "epoch",
) -> go.Figure:
    """Returns compare_curves' figure with each strategy's phase markers (metrics: its long
    frame with `run` and `run_id`), in the strategy's line colour; a marker several
    strategies share (the same moment and label, such as a common warm-up) is drawn once,
    in grey."""
    if not fig.data or metrics is None or metrics.empty or "run" not in metrics:
        return fig
    colour_of = {t.name: t.line.color for t in fig.data if getattr(t, "line", None) and t.name}
    placed: dict[tuple[float, str], list[tuple[str, PhaseMarker]]] = {}
    for run, rows in metrics.groupby("run", sort=False):
        rid = rows["run_id"].iloc[0] if "run_id" in rows else None
        first = rows[rows["run_id"] == rid] if rid is not None else rows
        for m in phase_markers(first, (configs or {}).get(rid)):
            at = _marker_x(m, x)
            if at is not None:
                placed.setdefault((round(at, 6), m.label), []).append((str(run), m))
    shapes, notes = [], []
    for (at, _label), found in placed.items():
        runs = [r for r, _ in found]
        colour = (colour_of.get(runs[0]) or _MARKER_GREY) if len(runs) == 1 else _MARKER_GREY
        m = found[0][1]
        shape, note = _marker_parts(m, at, colour, f"{', '.join(runs)}: {m.words}")
        shapes.append(shape)
        notes.append(note)
    if shapes:
        fig.update_layout(
            shapes=[*fig.layout.shapes, *shapes], annotations=[*fig.layout.annotations, *notes]
        )
    return fig


# --- errors you can see
# Curve controls (x axis, smoothing, log scales), the confusion drill-down (which images a
# clicked cell holds), the difference of two runs' matrices and per-class deltas against a
# baseline.

# x axis choices of every curve: record column -> its name on the axis
X_AXES = {"step": "step", "epoch": "epoch", "time_s": "wall time (s)"}
_CURVE_NAMES = {
    ("val", "acc"): "val accuracy (%)",
    ("val", "loss"): "val loss",
    ("train", "acc"): "train accuracy (%)",
    ("train", "loss"): "train loss",
    ("train", "lr"): "learning rate (head)",
}
SMOOTHING_MAX = 0.99  # TensorBoard's slider goes as far


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Returns values smoothed as TensorBoard smooths a curve: an exponential moving average
    (each point = weight · the average so far + (1 − weight) · the value) divided by
    1 − weight^n, so the start is not pulled towards 0; weight 0 changes nothing, and a NaN
    stays NaN without entering the average."""
    weight = min(max(float(weight), 0.0), SMOOTHING_MAX)
    out, last, n = [], 0.0, 0
    for v in values:
        v = float(v)
        if weight == 0 or not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight**n))
    return out


def _smoothed_words(smoothing: float) -> str:
    return f" · smoothed {min(smoothing, SMOOTHING_MAX):g}" if smoothing > 0 else ""


def steps_per_epoch(metrics: pd.DataFrame) -> float | None:
    """Returns a run's optimizer steps per epoch, read off its first val record (step at the
    end of that epoch / epoch), or None before an epoch has finished."""
    val = _split(metrics, "val")
    if not _has(val, "epoch"):
        return None
    first = val.dropna(subset=["epoch", "step"])
    first = first[first["epoch"] > 0]
    if first.empty:
        return None
    return float(first["step"].iloc[0]) / float(first["epoch"].iloc[0])


def curve_x(rows: pd.DataFrame, x: str, per_epoch: float | None = None) -> pd.Series:
    """Returns the x of each record for the axis `x` (X_AXES): step, wall time, or epoch, a
    train record at its fraction of the epochs (step / steps per epoch), so train curves do
    not stack at whole epochs; before an epoch has finished, its epoch number."""
    if x != "epoch":
        return rows[x] if x in rows else pd.Series(math.nan, index=rows.index)
    epoch = pd.to_numeric(rows["epoch"], errors="coerce").astype("float64")
    if per_epoch and "split" in rows:
        step = pd.to_numeric(rows["step"], errors="coerce").astype("float64")
        return epoch.where(rows["split"] != "train", step / per_epoch)
    return epoch


def _curve_rows(metrics: pd.DataFrame, split: str, x: str) -> pd.DataFrame:
    """Returns the records of one split of every run, with _run (run_id, else run) and _x
    (curve_x, each run's own steps per epoch)."""
    rows = _split(metrics, split)
    if rows.empty or "run" not in rows:
        return rows.iloc[:0]
    rows = rows.assign(_run=rows["run_id"] if "run_id" in rows else rows["run"])
    parts = []
    for run, mine in rows.groupby("_run", sort=False):
        whole = metrics[(metrics["run_id"] if "run_id" in metrics else metrics["run"]) == run]
        parts.append(mine.assign(_x=curve_x(mine, x, steps_per_epoch(whole))))
    return pd.concat(parts)


def _add_train_line(
    fig: go.Figure, xs, ys, name: str, colour: str, smoothing: float, width: float = 2
) -> None:
    """Adds a train curve: as it is, or, smoothed, its EMA over the raw curve drawn faintly."""
    if smoothing <= 0:
        fig.add_scatter(x=xs, y=ys, name=name, mode="lines", line=dict(color=colour, width=width))
        return
    fig.add_scatter(
        x=xs, y=ys, name=name, mode="lines", line=dict(color=colour, width=1), opacity=0.3
    )
    fig.add_scatter(
        x=xs,
        y=ema(list(ys), smoothing),
        name=f"{name} (smoothed)",
        mode="lines",
        line=dict(color=colour, width=width),
    )


# ---- the confusion drill-down


def _cell_targets(
    fig: go.Figure, label: str, classes: Sequence, cm, norm, row: int, col: int
) -> None:
    """Adds one invisible marker per cell of a confusion heatmap: Plotly selects no heatmap
    cell (Streamlit's on_select returns nothing for one), a marker it does, and the marker's
    customdata names the cell (confusion_cell). The selected cell is outlined."""
    n = len(classes)
    names = [str(c) for c in classes]
    fig.add_scatter(
        x=[names[j] for i in range(n) for j in range(n)],
        y=[names[i] for i in range(n) for j in range(n)],
        mode="markers",
        marker=dict(
            symbol="square-open",
            size=max(10, min(40, 240 // max(n, 1))),
            color="#D55E00",
            line=dict(width=3, color="#D55E00"),
            opacity=0,
        ),
        selected=dict(marker=dict(opacity=1)),
        unselected=dict(marker=dict(opacity=0)),
        customdata=[
            [label, names[i], names[j], cm[i][j], norm[i][j]] for i in range(n) for j in range(n)
        ],
        hovertemplate="true %{customdata[1]}, predicted %{customdata[2]}: "
        "%{customdata[3]:.0f} (%{customdata[4]:.0%}) · click for the images"
        f"<extra>{label}</extra>",
        showlegend=False,
        name=f"{label} cells",
        row=row,
        col=col,
    )


def confusion_cell(selection: Mapping[str, Any] | None) -> dict[str, str] | None:
    """Returns the clicked cell of a selectable confusion_chart from Streamlit's selection
    state ({"points": [...]}) as {"run": label, "true": class, "pred": class}, else None."""
    for point in (selection or {}).get("points") or []:
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) >= 3:
            return {"run": str(data[0]), "true": str(data[1]), "pred": str(data[2])}
    return None


def cell_images(
    predictions: Mapping[str, pd.DataFrame | None], true: int, pred: int, split: str = "val"
) -> pd.DataFrame:
    """Returns the images of one confusion cell (true class, predicted class; indices), of
    every run in `predictions` ({run_id: store.read_predictions}): run_id, index, true,
    pred, confidence; mistakes most confident first, right answers least confident first
    (ties: run order, then index), the order the engine keeps them in
    (data.thumbnails.cell_order)."""
    parts = []
    for order, (rid, frame) in enumerate(predictions.items()):
        if frame is None or frame.empty:
            continue
        mine = frame[(frame["split"] == split) & (frame["true"] == true) & (frame["pred"] == pred)]
        parts.append(mine.assign(run_id=rid, _order=order))
    columns = ["run_id", "index", "true", "pred", "confidence"]
    if not parts:
        return pd.DataFrame(columns=columns)
    rows = pd.concat(parts, ignore_index=True)
    sign = -1.0 if true != pred else 1.0
    rows = rows.assign(_key=sign * rows["confidence"]).sort_values(
        ["_key", "_order", "index"], kind="stable"
    )
    return rows[columns].reset_index(drop=True)


def most_confused(summary: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """Returns (true class, predicted class) of a summary's largest mistake (the biggest
    off-diagonal cell of its confusion matrix; the first of a tie), or None without one."""
    cm = (summary or {}).get("confusion_matrix")
    if not cm:
        return None
    classes = [str(c) for c in summary.get("classes") or range(len(cm))]
    best, where = 0.0, None
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            if i != j and float(v) > best:
                best, where = float(v), (classes[i], classes[j])
    return where


def cell_caption(row: Mapping[str, Any], classes: Sequence, seed: Any = None) -> str:
    """Returns one drill-down image's caption: "circle → square · 87 % · #12 · seed 1"."""
    t, p = classes[int(row["true"])], classes[int(row["pred"])]
    what = str(t) if t == p else f"{t} → {p}"
    text = f"{what} · {100 * float(row['confidence']):.0f} % · #{int(row['index'])}"
    return text + (f" · seed {seed}" if seed is not None else "")


# ---- two runs' matrices and per-class deltas


def _shares(cm) -> list[list[float]]:
    """Returns a confusion matrix normalised per true class (each row sums to 1, or is 0)."""
    rows = [[float(v) for v in row] for row in cm]
    return [[v / sum(row) if sum(row) else 0.0 for v in row] for row in rows]


def confusion_difference(
    baseline: Mapping[str, Any] | None, other: Mapping[str, Any] | None
) -> list[list[float]] | None:
    """Returns other − baseline of two summaries' confusion matrices, each normalised per
    true class (a share of the true class's images, −1 to 1): on the diagonal, above 0 is
    other gets that class right more often; off it, above 0 is other confuses more. None
    when one lacks a matrix or their classes differ."""
    if not baseline or not other:
        return None
    a, b = baseline.get("confusion_matrix"), other.get("confusion_matrix")
    if not a or not b or len(a) != len(b):
        return None
    if list(baseline.get("classes") or []) != list(other.get("classes") or []):
        return None
    sa, sb = _shares(a), _shares(b)
    return [[vb - va for va, vb in zip(ra, rb, strict=True)] for ra, rb in zip(sa, sb, strict=True)]


def confusion_diff_chart(
    summaries: Mapping[str, Mapping[str, Any]], baseline: str, other: str
) -> go.Figure:
    """Returns the difference of two runs' confusion matrices ({label: summary}; other −
    baseline, confusion_difference) in percentage points, on a diverging scale centred on 0,
    each cell labelled with its difference."""
    title = f"Confusion difference: {other} − {baseline}"
    diff = confusion_difference(summaries.get(baseline), summaries.get(other))
    if diff is None:
        return _empty(title, "Needs two finished runs on the same classes")
    classes = [str(c) for c in summaries[baseline].get("classes") or range(len(diff))]
    a = _shares(summaries[baseline]["confusion_matrix"])
    b = _shares(summaries[other]["confusion_matrix"])
    points = [[100 * v for v in row] for row in diff]
    top = max(1.0, max(abs(v) for row in points for v in row))
    fig = go.Figure(
        go.Heatmap(
            z=points,
            x=classes,
            y=classes,
            zmid=0,
            zmin=-top,
            zmax=top,
            colorscale="RdBu",
            colorbar=dict(title="points"),
            text=[[f"{v:+.0f}" for v in row] for row in points],
            texttemplate="%{text}",
            customdata=[
                [[100 * a[i][j], 100 * b[i][j]] for j in range(len(classes))]
                for i in range(len(classes))
            ],
            hovertemplate="true %{y}, predicted %{x}: %{z:+.1f} points ("
            f"{baseline} %{{customdata[0]:.0f}} %, {other} %{{customdata[1]:.0f}} %)"
            "<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", title_text="true")
    fig.update_xaxes(title_text="predicted")
    _style(fig, height=380, title=title)
    fig.update_layout(hovermode="closest")
    return fig


def per_class_deltas(summaries: Mapping[str, Mapping[str, Any]], baseline: str) -> pd.DataFrame:
    """Returns, per other run ({label: summary}) on the baseline's classes and per class, its
    accuracy, the baseline's and the difference (fractions): run, class, acc, baseline_acc,
    delta; a run without per-class accuracy, or on other classes, is left out."""
    columns = ["run", "class", "acc", "baseline_acc", "delta"]
    base = (summaries.get(baseline) or {}).get("per_class_acc")
    if not base:
        return pd.DataFrame(columns=columns)
    classes = list(summaries[baseline].get("classes") or base)
    rows = []
    for label, s in summaries.items():
        mine = (s or {}).get("per_class_acc")
        if label == baseline or not mine or list(s.get("classes") or mine) != classes:
            continue
        for c in classes:
            acc, ref = float(mine.get(c, math.nan)), float(base.get(c, math.nan))
            rows.append([label, c, acc, ref, acc - ref])
    return pd.DataFrame(rows, columns=columns)


def per_class_delta_chart(summaries: Mapping[str, Mapping[str, Any]], baseline: str) -> go.Figure:
    """Returns each other run's per-class accuracy minus the baseline's, in points, as a bar
    per class (one trace per run; per_class_deltas)."""
    title = f"Per-class delta against {baseline}"
    deltas = per_class_deltas(summaries, baseline)
    if deltas.empty:
        return _empty(title, "Needs a second finished run on the same classes")
    fig = go.Figure()
    for label, rows in deltas.groupby("run", sort=False):
        fig.add_bar(
            x=list(rows["class"]),
            y=list(100 * rows["delta"]),
            name=str(label),
            marker_color=PALETTE[(list(summaries).index(label)) % len(PALETTE)],
            customdata=(100 * rows[["acc", "baseline_acc"]]).to_numpy(),
            hovertemplate="%{x}: %{y:+.1f} points (%{customdata[0]:.1f} % against "
            f"%{{customdata[1]:.1f}} %)<extra>{label}</extra>",
        )
    fig.add_hline(y=0, line_color="#555555", line_width=1)
    fig.update_layout(
        title=title,
        yaxis_title=f"accuracy − {baseline} (points)",
        barmode="group",
        hovermode="x",
    )
    return _style(fig, height=340)


# --- the recipe: which weights a figure is for, TTA beside it (issue 16) ----------------------


def recipe_notes(
    configs: Mapping[str, Mapping[str, Any]], summaries: Mapping[str, Mapping[str, Any] | None]
) -> list[str]:
    """Returns a sentence for the runs whose figures are for the weight EMA (the average of
    the weights, saved as best), with the raw weights' val accuracy beside, and one per run
    scored with test-time augmentation, its figures beside the plain ones."""
    labels = run_labels(configs)
    found = []
    ema = []
    for rid in configs:
        s = summaries.get(rid) or {}
        if s.get("scored_weights") == "ema":
            ema.append(f"{labels[rid]} (raw weights {fmt_pct(s.get('raw_best_val_acc'))} val)")
    if ema:
        found.append(
            "Accuracies of " + ", ".join(ema) + " are for their weight EMA, the average of "
            "the weights over training: it is what was scored and saved as best."
        )
    for rid in configs:
        s = summaries.get(rid) or {}
        if not s.get("tta"):
            continue
        pairs = [
            f"{words} {fmt_pct(s.get(f'tta_{key}'))} (plain {fmt_pct(s.get(key))})"
            for key, words in (("best_val_acc", "val"), ("test_acc", "test"))
            if s.get(f"tta_{key}") is not None
        ]
        found.append(
            f"{labels[rid]} with test-time augmentation ({s.get('tta_averages') or s['tta']}): "
            + ", ".join(pairs)
            + "; the table's figures are the plain ones."
        )
    return found
