"""Training: one run's state, progress and live charts; Stop, Resume, Cancel; config and log.

?run=<id> selects the run (an id or a unique id prefix, of this runs folder: never a path);
without it the newest live run (else the newest run) is shown.
Opened from Launch, it moves on to the group's next live run when one ends (picking a run by
hand stops that). While the run or another run of its group is queued or running, two
fragments refresh themselves: the progress bars (every FINETUNE_REFRESH_S, 3 s) and the
charts and log (every FINETUNE_CHART_REFRESH_S, 15 s); a change of state redraws the page.
"""

from __future__ import annotations

import os

import streamlit as st

from dashboard.common import (
    LIVE_REFRESH_S,
    PAGES,
    run_choice_labels,
    setup_page,
    state_text,
    stop_group_button,
    viewer,
    warm_up,
)
from dashboard.errors import curve_controls
from dashboard.exports import export_block
from finetune_core import plots, runner, store, strategies
from finetune_core.util.durations import plural

root = setup_page("Training")
me = viewer()  # signed in on a shared server, or nobody (the local mode)
st.title("Training")

runs = me.visible_runs(store.list_runs(root))
if runs.empty:
    st.info("No runs yet. Set one up on **New run**; it will show here while it trains.")
    st.page_link(PAGES["new"], label="New run", icon=":material/rocket_launch:")
    st.stop()


def _default_run() -> str:
    for states in (("running",), ("queued",)):
        live = runs[runs["state"].isin(states)]
        if not live.empty:
            # the oldest queued run starts first; the newest running one is the one to watch
            return str(live["run_id"].iloc[-1 if states == ("queued",) else 0])
    return str(runs["run_id"].iloc[0])


ids = list(runs["run_id"])
wanted = st.query_params.get("run")
if wanted:
    try:
        run_id = store.resolve_run_id(wanted, root).name
        if not me.may_see(store.read_config(root / run_id)):  # another user's, hidden
            raise store.RunError(f"no run {wanted!r} in this dashboard's runs folder")
    except store.RunError as e:
        st.error(f"{e}. Showing the newest run instead.")
        run_id = _default_run()
else:
    run_id = _default_run()
if run_id not in ids:  # created between list_runs and now
    ids.insert(0, run_id)
if st.session_state.get("_training_shown") != run_id:
    st.session_state["training_run"] = run_id
    st.session_state["_training_shown"] = run_id
labels = run_choice_labels(runs)


def _pick() -> None:
    st.query_params["run"] = st.session_state["training_run"]
    st.session_state["training_follow"] = False  # a run picked by hand stays shown
    st.session_state["_training_shown"] = st.session_state["training_run"]


run_id = st.selectbox(
    "Run", ids, key="training_run", format_func=lambda r: labels.get(r, r), on_change=_pick
)
st.query_params["run"] = run_id
run_dir = root / run_id
try:
    config = store.read_config(run_dir)
except store.RunError as e:
    st.error(f"{e}. It may have been deleted; pick another run.")
    st.stop()

st.caption(
    f"**{strategies.label(config)}** · {config.get('model')} · weights `{config.get('weights')}`"
    f" · data `{config.get('data')}` · {plural(config.get('epochs') or 0, 'epoch')} · image {config.get('image_size')}"
    f" px · batch {config.get('batch_size')} · lr {config.get('lr')}"
    + (" (tuned)" if config.get("tune_lr") else "")
    + f" · id `{run_id}`"
)
tuned = plots.tuning_sentence(store.read_tuning(run_dir))
if tuned:
    st.caption(tuned)
elif config.get("tune_lr"):
    st.caption("Before it trains, this run tunes its learning rate on the validation split.")


def _stop() -> None:
    try:
        st.session_state["_training_note"] = f"Stop: {runner.stop_run(run_dir, actor=me.user)}"
    except store.RunError as e:  # another user's run (the buttons are not drawn for it)
        st.session_state["_training_note"] = f"Could not stop: {e}"


def _cancel() -> None:
    try:
        done = runner.cancel_run(run_dir, actor=me.user)
    except store.RunError as e:
        st.session_state["_training_note"] = f"Could not cancel: {e}"
        return
    st.session_state["_training_note"] = (
        "Cancelled: the run will not start" if done else "It had already started; use Stop"
    )


def _resume() -> None:
    try:
        runner.resume_run(run_dir, actor=me.user)
        st.session_state["_training_note"] = "Queued to resume"
    except store.RunError as e:
        st.session_state["_training_note"] = f"Could not resume: {e}"


def _actions(status: dict) -> None:
    """Stop / Cancel / Resume as callbacks, so the state drawn after a click is the new one."""
    state = status.get("state")
    if not me.may_act(config):  # another user's run, or the demo: say so, no dead buttons
        st.caption(me.why_not(config))
        return
    c1, c2, c3, _ = st.columns([1, 1, 1, 3])
    if store.is_active(status):  # running, or stalled: Stop escalates to a kill
        c1.button(
            "Stop",
            icon=":material/stop:",
            key="stop",
            on_click=_stop,
            disabled=bool(status.get("stop_requested_at")),
            help="The worker finishes the current step, saves a checkpoint and ends as "
            "stopped; Resume continues from there. A worker that has not ended a grace "
            "period later (FINETUNE_STOP_GRACE_S) is killed and can resume from its last "
            "checkpoint.",
        )
    if state == "queued":
        c2.button(
            "Cancel",
            icon=":material/close:",
            key="cancel",
            on_click=_cancel,
            help="Takes the run out of the queue.",
        )
    if state == "failed" and not store.can_resume(status):
        c3.button(
            "Clone into New run",
            icon=":material/content_copy:",
            key="clone_failed",
            on_click=lambda: st.session_state.update(_clone=True),
            help="A resume would fail the same way: change what the message names and launch "
            "it again.",
        )
    elif state in store.RESUMABLE_STATES:
        has_ckpt = (run_dir / "checkpoints" / "last_state.pt").exists()
        c3.button(
            "Resume",
            icon=":material/play_arrow:",
            key="resume",
            on_click=_resume,
            help="Continues from the last checkpoint"
            if has_ckpt
            else "No checkpoint yet: the run starts over",
        )
    note = st.session_state.pop("_training_note", None)
    if note:
        st.toast(note)


# The charts of a live run are redrawn this often, less often than the progress above them:
# a redraw costs the browser a Plotly figure per chart (about 0.2 s of CPU for the four on a
# 2-core laptop). TensorBoard reloads every 30 s; here it is 15 s by default.
CHART_REFRESH_S = float(os.environ.get("FINETUNE_CHART_REFRESH_S") or 5 * LIVE_REFRESH_S)


def charts_for(metrics, status: dict | None = None, controls: dict | None = None) -> dict:
    """Returns the run's charts: the ones drawn last while its metrics and the curve
    controls (x axis, smoothing, log scales: plots.training_charts) have not changed."""
    controls = controls or {}
    sig = (store.signature(run_dir), tuple(sorted(controls.items())))
    kept = st.session_state.get("_charts")
    if kept and kept["run"] == run_id and kept["sig"] == sig:
        return kept["charts"]
    charts = plots.training_charts(metrics, **controls)
    x = controls.get("x", "step")
    plots.mark_training_charts(charts, metrics, config, status, x)  # phases, end of warm-up
    st.session_state["_charts"] = {"run": run_id, "sig": sig, "charts": charts}
    return charts


def group_members() -> dict[str, dict]:
    """Returns {run id: status} of the runs launched with this one, in launch order."""
    group = config.get("group")
    if not group:
        return {}
    ids_in_group = list(runs.loc[runs["group"] == group, "run_id"])[::-1]  # oldest first
    return {m: store.read_status(root / m) for m in ids_in_group}


def group_links(members: dict[str, dict]) -> None:
    """The group's runs, each a link to its own view, and a link to compare them."""
    group = config.get("group")
    names = plots.run_labels({m: store.read_config(root / m) for m in members})
    st.markdown(f"**Group** `{group}`: {len(members)} runs launched together")
    cols = st.columns(len(members) + 1)
    for col, m in zip(cols, members, strict=False):
        col.page_link(
            PAGES["training"], label=names[m], query_params={"run": m}, disabled=m == run_id
        )
    cols[-1].page_link(
        PAGES["compare"],
        label="Compare this group",
        icon=":material/compare:",
        query_params={"group": group},
    )
    live = [m for m, s in members.items() if s.get("state") in store.LIVE_STATES]
    live = live if me.may_act(config) else []  # another user's group: no Stop
    if live:
        stop_group_button(root, group, f"Stop the group ({len(live)} live)", "stop_group", me)


def _live_member(members: dict[str, dict]) -> str | None:
    for wanted in ("running", "queued"):
        for m, status in members.items():
            if status.get("state") == wanted:
                return m
    return None


def _shape(status: dict, members: dict[str, dict]) -> tuple:
    """What the rest of the page depends on: when it changes, the page is drawn again."""
    live = (
        status.get("state") in store.LIVE_STATES
        or store.is_active(status)  # a stalled worker: its end is drawn when it comes
        or _live_member(members) is not None
    )
    return status.get("state"), bool(status.get("stop_requested_at")), live


def live_progress(shape: tuple) -> None:
    """The run's progress and its group's: the part redrawn often while they train.

    Only bars and their text are redrawn here, as every element redrawn costs the browser
    (which shares the machine with the run) its styling and layout. When the run's state
    changes, the whole page is drawn again, so its header and buttons are always current.
    """
    status = store.read_status(run_dir)
    members = group_members()
    state = status.get("state")
    if st.session_state.get("training_follow") and state in store.FINAL_STATES:
        nxt = _live_member(members)
        if nxt is not None and nxt != run_id:
            st.query_params["run"] = nxt  # the group goes on: show the run that trains now
            st.rerun()
    if _shape(status, members) != shape:
        st.rerun()  # it ended, started or was asked to stop: draw the page again
    fraction, text = plots.run_progress(status, store.read_metrics(run_dir))
    st.progress(fraction, text=text)
    if status.get("message") and state != "failed":  # a failure says it below, once
        st.caption(status["message"])
    if members:
        names = plots.run_labels({m: store.read_config(root / m) for m in members})
        for m, member in members.items():
            fraction, text = plots.run_progress(member)
            st.progress(fraction, text=f"{names[m]}: {member.get('state', '?')} · {text}")


def drift_view(drift) -> None:
    """What fine-tuning changed: the run's weight drift per group and epoch (from its first
    epoch on; runs from before drift was recorded have none)."""
    if drift.empty:
        return
    st.plotly_chart(plots.drift_heatmap(drift), key="chart_drift", width="stretch")
    st.caption(
        "How far each group's weights moved from where the run started (the starting "
        "weights with the new head): ‖θ − θ₀‖ / ‖θ₀‖ after each epoch, colour on a log scale; "
        "grey is exactly 0, a group that has not trained (yet)."
    )


def live_charts() -> None:
    """The run's curves and the end of its log (refreshed less often than the progress)."""
    status = store.read_status(run_dir)
    state = status.get("state")
    metrics = store.read_metrics(run_dir)
    if state in store.LIVE_STATES or not metrics.empty:  # no step taken: no curves
        controls = curve_controls("training")  # x axis, smoothing, log scales
        charts = charts_for(metrics, status, controls)
        top, bottom = st.columns(2), st.columns(2)
        keys = ("loss", "accuracy", "lr", "throughput")
        for slot, key in zip((*top, *bottom), keys, strict=True):
            slot.plotly_chart(charts[key], key=f"chart_{key}", width="stretch")
        drift_view(store.read_drift(run_dir))
    with st.expander("worker.log (last 40 lines)", expanded=state == "failed"):
        st.code(store.read_log_tail(run_dir, 40) or "(empty)", language=None)


status = store.read_status(run_dir)
state = status.get("state")
members = group_members()
shape = _shape(status, members)
head = st.columns([1, 3])
head[0].markdown(f"### {state_text(state)}")
with head[1]:
    st.fragment(live_progress, run_every=LIVE_REFRESH_S if shape[2] else None)(shape)
if state == "failed":
    then = "or Resume." if store.can_resume(status) else "and launch it again."
    st.error(
        f"The run failed: {status.get('message')}. The traceback is in worker.log below; "
        f"clone the run into New run, change what the message names, {then}"
    )
elif state == "crashed":
    st.warning(f"{status.get('message')}. Resume continues from the last checkpoint.")
elif state in (store.STALLED, store.UNKNOWN):
    st.warning(f"This run is {state}: {status.get('message')}.")
_actions(status)
if st.session_state.pop("_clone", False):
    st.switch_page(PAGES["new"], query_params={"clone": run_id})
if members:
    group_links(members)
st.fragment(live_charts, run_every=CHART_REFRESH_S if state in store.LIVE_STATES else None)()
summary = store.read_summary(run_dir)
if summary:
    result = plots.result_sentence(summary)
    if result:
        st.markdown(f"**Result:** {result}")
    advice = plots.undertrained(store.read_metrics(run_dir))
    if advice:
        st.warning(f"This run is {advice}", icon=":material/trending_flat:")
    if summary.get("skipped_files"):
        with st.expander(f"{len(summary['skipped_files'])} files were skipped (unreadable)"):
            st.write(summary["skipped_files"])

if summary:  # ended: the model can leave the dashboard (Export, issue 13)
    export_block(run_dir, key="training")

with st.expander("Config"):
    st.json(config, expanded=True)

warm_up()  # drawn: New run's imports load in the background
