"""One self-contained HTML file of a comparison: what Compare shows, to keep or send.

The headline, the table of final metrics, the depth view (when the runs sweep depths),
accuracy against each cost with its Pareto front, the curves, per-class accuracy, the
confusion matrices (and where each strategy differs from the baseline) and the settings
that differ, drawn by the same plots functions as the page. The figures stay interactive:
plotly.js is inlined once, with the first figure, so the file opens offline and asks no
other host for anything. The same runs give the same bytes (no time of writing, fixed
figure ids), whether written by `python -m finetune_core report` or Compare's button.
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from finetune_core import plots, store, strategies
from finetune_core.util.files import atomic_write

REPORTS_FOLDER = "reports"  # in the runs folder: where a report goes without --output
# the figures' tool bar, without the Plotly logo (a link to another host)
_FIGURE_CONFIG = {"displaylogo": False, "responsive": True}
_TEMPLATE = "plotly_white"
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
p.headline { font-size: 1.15rem; font-weight: 600; }
p.note { color: #555; } p.warning { color: #8a5300; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f4f4f4; }
.figure { margin: 1rem 0; }
"""


@dataclass
class Section:
    """A part of the report: a heading, sentences (the first section's first one is the
    headline), warnings, a table and figures, in that order."""

    title: str
    sentences: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    figures: list[go.Figure] = field(default_factory=list)
    index: bool = False  # whether the table's index is a column worth showing


def _read(run_dirs: Sequence[Path]) -> dict:
    """Returns what the comparison is drawn from, as Compare reads it."""
    runs = {Path(d).name: Path(d) for d in run_dirs}
    configs = {r: store.read_config(d) for r, d in runs.items()}
    return dict(
        dirs=runs,
        configs=configs,
        statuses={r: store.read_status(d) for r, d in runs.items()},
        summaries={r: store.read_summary(d) for r, d in runs.items()},
        metrics={r: store.read_metrics(d) for r, d in runs.items()},
    )


def sections(run_dirs: Sequence[str | os.PathLike]) -> list[Section]:
    """Returns the report of the runs in `run_dirs` (launch order) as its sections."""
    read = _read([Path(d) for d in run_dirs])
    configs, statuses = read["configs"], read["statuses"]
    summaries, metrics = read["summaries"], read["metrics"]
    table = plots.summary_table(configs, summaries, metrics, statuses)
    basis = plots.accuracy_basis(table)
    groups = plots.seed_groups(configs)
    per_strategy = plots.seed_table(table, groups)
    hits = {r: store.read_hits(d, basis.split) for r, d in read["dirs"].items()}
    pooled = plots.pooled_hits(per_strategy, hits)
    label = plots.member_labels(groups, configs)

    found = []
    warnings = plots.comparison_warnings(configs)
    ended = {
        label[r]: metrics[r] for r in configs if statuses[r].get("state") not in store.LIVE_STATES
    }
    advice = plots.undertrained_note(ended)
    if advice:
        warnings.append(advice)
    live = [r for r in configs if statuses[r].get("state") in store.LIVE_STATES]
    if live:
        warnings.append(
            f"{len(live)} of {len(configs)} runs were still training when this was written; "
            "the sentence above is provisional."
        )
    found.append(
        Section(
            "Which strategy, at what cost",
            sentences=[plots.headline(per_strategy, pooled, basis), f"By {basis.words}."],
            warnings=warnings,
            table=plots.results_table(per_strategy, basis),
        )
    )

    points = plots.depth_points(configs, summaries, basis)
    depth = plots.depth_sentence(points, {r: h for r, h in hits.items() if h})
    if depth:
        found.append(
            Section("How much to unfreeze", sentences=[depth], figures=[plots.depth_curve(points)])
        )

    costs = [c for c in plots.COSTS if c in per_strategy and per_strategy[c].notna().any()] or [
        "trainable_params"
    ]
    found.append(
        Section(
            "Accuracy against cost (◆ the Pareto front)",
            sentences=[plots.pareto_sentence(per_strategy, c, basis) for c in costs],
            figures=[plots.accuracy_vs_cost(per_strategy, c, basis) for c in costs],
        )
    )

    run_of = {r: g for g, rids in groups.items() for r in rids}
    long = [m.assign(run=run_of[r], run_id=r) for r, m in metrics.items() if not m.empty]
    frame = pd.concat(long, ignore_index=True) if long else pd.DataFrame()
    found.append(
        Section(
            "Curves",
            sentences=[
                "Train loss smoothed as TensorBoard does (EMA 0.6), raw values in the data."
            ],
            figures=[
                plots.compare_curves(frame, "acc", "epoch"),
                plots.compare_curves(frame, "loss", "epoch"),
                plots.compare_curves(frame, "loss", "epoch", split="train", smoothing=0.6),
                plots.compare_curves(frame, "lr", "epoch", split="train", log_y=True),
            ],
        )
    )

    by_label = plots.seed_summaries(groups, summaries)
    errors = [plots.per_class_chart(by_label), plots.confusion_chart(by_label)]
    sentences = ["Val split, best checkpoint; with seeds: the mean per class, the summed matrix."]
    baseline = _baseline(by_label, configs, groups)
    if baseline is not None:
        sentences.append(f"Differences are against {baseline}.")
        errors.append(plots.per_class_delta_chart(by_label, baseline))
        for other in by_label:
            if other != baseline and plots.confusion_difference(
                by_label[baseline], by_label[other]
            ):
                errors.append(plots.confusion_diff_chart(by_label, baseline, other))
    found.append(Section("Where each strategy is wrong", sentences=sentences, figures=errors))

    diff = plots.config_diff(configs)
    found.append(
        Section(
            "Settings that differ",
            sentences=[] if not diff.empty else ["The runs use the same settings."],
            table=diff if not diff.empty else None,
            index=True,
        )
    )
    return found


def _baseline(by_label: dict, configs: dict, groups: dict) -> str | None:
    """Returns the strategy the differences are taken against: full fine-tuning when one is
    there (the first), else the first strategy; None with fewer than two to compare."""
    have = [k for k, s in by_label.items() if s and s.get("confusion_matrix")]
    if len(have) < 2:
        return None
    for name in have:
        if strategies.is_baseline(configs[groups[name][0]].get("strategy")):
            return name
    return have[0]


def group_of(run_dirs: Sequence[str | os.PathLike]) -> str | None:
    """Returns the runs' group when they all belong to one, else None."""
    groups = {store.read_config(d).get("group") for d in run_dirs}
    return groups.pop() if len(groups) == 1 and None not in groups else None


def _whole_group(root: str | os.PathLike, run_dirs: Sequence[str | os.PathLike]) -> str | None:
    """Returns the runs' group when they are every run of it in `root`, else None."""
    group = group_of(run_dirs)
    if group is None:
        return None
    runs = store.list_runs(root)
    members = set(runs.loc[runs["group"] == group, "run_id"]) if not runs.empty else set()
    return group if members == {Path(d).name for d in run_dirs} else None


def title_of(run_dirs: Sequence[str | os.PathLike]) -> str:
    """Returns the report's title: the group's id for every run of a group, else the ids."""
    ids = [Path(d).name for d in run_dirs]
    group = group_of(run_dirs)
    if group and _whole_group(Path(run_dirs[0]).parent, run_dirs):
        return f"Comparison of group {group}"
    return "Comparison of runs " + ", ".join(ids) + (f" (of group {group})" if group else "")


def report_html(run_dirs: Sequence[str | os.PathLike], title: str | None = None) -> str:
    """Returns the comparison of the runs as one self-contained HTML page."""
    run_dirs = [Path(d) for d in run_dirs]
    title = title or title_of(run_dirs)
    body = [f"<h1>{html.escape(title)}</h1>"]
    labels = plots.run_labels({d.name: store.read_config(d) for d in run_dirs})
    runs = ", ".join(
        f"{html.escape(labels[d.name])} (<code>{d.name}</code>, "
        f"{html.escape(str(store.read_status(d).get('state')))})"
        for d in run_dirs
    )
    body.append(f'<p class="note">Runs: {runs}.</p>')
    figure = 0
    for n, section in enumerate(sections(run_dirs)):
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        for i, sentence in enumerate(section.sentences):
            kind = "headline" if n == 0 and i == 0 else "note"
            body.append(f'<p class="{kind}">{html.escape(sentence)}</p>')
        for warning in section.warnings:
            body.append(f'<p class="warning">{html.escape(warning)}</p>')
        if section.table is not None and not section.table.empty:
            body.append(
                section.table.to_html(
                    index=section.index,
                    na_rep="",
                    border=0,
                    escape=True,
                    float_format=lambda v: f"{v:.1f}",
                )
            )
        for fig in section.figures:
            # one template whoever writes it (Streamlit makes its own the default on import)
            fig.update_layout(template=_TEMPLATE)
            body.append(
                '<div class="figure">'
                + fig.to_html(
                    full_html=False,
                    include_plotlyjs=figure == 0,  # plotly.js once, inlined
                    include_mathjax=False,
                    div_id=f"figure-{figure}",
                    config=_FIGURE_CONFIG,
                )
                + "</div>"
            )
            figure += 1
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def default_path(root: str | os.PathLike, run_dirs: Sequence[str | os.PathLike]) -> Path:
    """Returns where a report goes without --output: <runs>/reports/<group>.html for every
    run of a group, else a name of the run ids (a few) or the first id and a hash of all."""
    ids = [Path(d).name for d in run_dirs]
    group = _whole_group(root, run_dirs)
    if group:
        name = group
    elif len(ids) <= 4:
        name = "_".join(ids)
    else:
        digest = hashlib.sha256(",".join(ids).encode()).hexdigest()[:8]
        name = f"{ids[0]}_and_{len(ids) - 1}_more-{digest}"
    return Path(root) / REPORTS_FOLDER / f"{name}.html"


def write_report(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Writes the report of the runs to `output` atomically (its folder made when missing);
    returns its absolute path. Raises OSError when it cannot be written."""
    path = Path(output).expanduser().absolute()
    text = report_html(run_dirs)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
