"""Home: what this is, the device, and every run with links, rename, delete and clone."""

from __future__ import annotations

import os

import streamlit as st

from dashboard.common import (
    LIVE_REFRESH_S,
    PAGES,
    device_text,
    labelled_picker,
    setup_page,
    share_column,
    shown_or_blank,
    table_height,
    viewer,
    warm_up,
)
from finetune_core import plots, runner, store

root = setup_page("Home")
me = viewer()  # signed in on a shared server, or nobody (the local mode)

st.title("Fine-tuning dashboard")
st.markdown(
    "Fine-tune a pretrained torchvision model on your own images and watch it train, live. "
    "Compare **full** fine-tuning with **partial** strategies (a frozen backbone, only the "
    "last blocks, gradual unfreezing, …) side by side to see which one wins, and at what cost."
)
st.caption(f"**Device:** {device_text()} · **Runs folder:** `{root}`")

if st.button(
    "Start here: set up a run or a comparison",
    type="primary",
    icon=":material/rocket_launch:",
    key="start_here",
):
    st.switch_page(PAGES["new"])


# states with a worker behind them or waiting for one (a stalled worker is still there)
_LIVE = (*store.LIVE_STATES, store.STALLED)


def _runs_table(was_live: bool) -> None:
    runs = me.visible_runs(store.list_runs(root))
    live = int(runs["state"].isin(_LIVE).sum()) if not runs.empty else 0
    if was_live and not live:
        st.rerun()  # the last live run ended: show the final page once, then stop refreshing
    st.subheader(f"Runs ({len(runs)})" + (f" · {live} live" if live else ""))
    if runs.empty:
        st.info(
            "No runs yet. Press **Start here** to launch one, or a comparison of strategies "
            "on the built-in data. How long it takes depends on the model, the image size, "
            "the epochs and this machine (New run measures it before you launch); the first "
            "run also generates the built-in data and pretrains the builtin weights, once."
        )
        return
    table = runs.assign(
        open=[f"Training?run={r}" for r in runs["run_id"]],
        compare=[f"Compare?group={g}" if g else "" for g in runs["group"]],
        state=list(runs["state"]),
        best_val_acc=100 * runs["best_val_acc"],
        time=shown_or_blank(runs["train_time_s"], plots.fmt_duration),
        disk=[plots.fmt_bytes(b) for b in runs["disk_bytes"]],
    )
    columns = [
        "open",
        "name",
        "model",
        "strategy",
        "state",
        "best_val_acc",
        "trainable_pct",
        "time",
        "disk",
        "compare",
        "created_at",
    ]
    if me.hosted:  # a shared server: whose each run is
        columns.insert(columns.index("state"), "owner")
    st.dataframe(
        table[columns],
        hide_index=True,
        width="stretch",
        height=table_height(len(table)),
        column_config={
            "open": st.column_config.LinkColumn(
                "run", display_text=r"Training\?run=(.*)", help="Open the run's Training view"
            ),
            "name": "name",
            "best_val_acc": share_column("best val acc", width="small"),
            "trainable_pct": share_column("trainable", digits=2, width="small"),
            "time": "train time",
            "disk": "disk use",
            "compare": st.column_config.LinkColumn(
                "group", display_text="Compare", help="Compare the runs launched together"
            ),
            "created_at": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
        },
    )


runs = me.visible_runs(store.list_runs(root))
# The table refreshes itself while runs are live, so states and accuracies move on their own.
has_live = bool(runs["state"].isin(_LIVE).any())
st.fragment(_runs_table, run_every=LIVE_REFRESH_S * 2 if has_live else None)(has_live)

if not runs.empty:
    st.subheader("Manage a run")
    ids = list(runs["run_id"])
    label = {
        r.run_id: f"{r.name or r.strategy} · {r.model} · {r.state} · {r.run_id}"
        for r in runs.itertuples()
    }
    run_id = labelled_picker("Run", ids, label, "manage_run")
    run_dir = root / run_id
    row = runs.set_index("run_id").loc[run_id]
    allowed = me.may_act({"owner": row["owner"]})
    c1, c2, c3 = st.columns(3)
    with c1:
        if not allowed:  # another user's run, or the demo: say so, no dead buttons
            st.caption(me.why_not({"owner": row["owner"]}))
        else:
            with st.form("rename_form", border=False):
                new_name = st.text_input(
                    "New name",
                    value=row["name"],
                    max_chars=100,
                    key=f"rename_{run_id}",
                    help="A label for people; the id stays.",
                )
                if st.form_submit_button("Rename", key="rename"):
                    try:
                        store.rename_run(run_dir, new_name, actor=me.user)
                        st.toast(f"Renamed {run_id} to {new_name!r}")
                        st.rerun()
                    except store.RunError as e:
                        st.error(str(e))
    with c2:
        if not me.demo:
            st.write("Start a new run with these settings, to change one thing and run again.")
            if st.button("Clone into New run", key="clone"):
                st.switch_page(PAGES["new"], query_params={"clone": run_id})
        st.page_link(PAGES["training"], label="Open in Training", query_params={"run": run_id})
    with c3:
        if not allowed:
            pass  # why is said beside Rename
        elif st.session_state.get("confirm_delete") == run_id:
            st.warning(
                f"Delete run {run_id} and its checkpoints ({plots.fmt_bytes(row['disk_bytes'])})? "
                "This cannot be undone."
            )
            y, n = st.columns(2)
            if y.button("Yes, delete", key="delete_yes", icon=":material/delete:"):
                try:
                    store.delete_run(run_dir, actor=me.user)
                    st.session_state.pop("confirm_delete", None)
                    st.session_state.pop("manage_run", None)
                    st.toast(f"Deleted run {run_id}")
                    st.rerun()
                except store.RunError as e:
                    st.error(str(e))
            if n.button("Keep it", key="delete_no"):
                st.session_state.pop("confirm_delete", None)
                st.rerun()
        else:
            live = row["state"] in _LIVE
            if st.button(
                "Delete…",
                key="delete",
                disabled=live,
                help="Stop or cancel the run first" if live else "Asks before deleting",
            ):
                st.session_state["confirm_delete"] = run_id
                st.rerun()

with st.expander("Queue settings"):
    from_env = os.environ.get("FINETUNE_MAX_PARALLEL")
    limit = runner.parallel_limit(root)
    not_admin = me.demo or not me.admin  # one setting for the whole server
    parallel = st.number_input(
        "Runs trained at once",
        min_value=1,
        max_value=16,
        value=min(limit, 16),
        step=1,
        key="max_parallel",
        disabled=bool(from_env) or not_admin,
        help="Queued runs start in order, at most this many at a time. One is right for a "
        "CPU or one GPU shared by a team: runs at once split the same cores or GPU.",
    )
    if from_env:
        st.caption(f"Set by $FINETUNE_MAX_PARALLEL={from_env} for this server.")
    elif not_admin:
        st.caption(
            "One setting for the whole server: "
            + ("this read-only demo keeps it." if me.demo else "only an admin changes it.")
            + (" Users take turns: each user's next run starts in turn." if me.hosted else "")
        )
    elif parallel != limit:
        runner.set_max_parallel(root, int(parallel), actor=me.user)
        st.toast(f"At most {int(parallel)} run(s) at once from now on")

warm_up()  # drawn: New run's imports load in the background
