"""Page setup, the runs folder, the device line and small widgets every page uses; who is
viewing (sign-in on a shared server, the read-only demo)."""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from finetune_core import runner, store
from finetune_core.store import access
from finetune_core.util import hardware

PAGES = {
    "home": "app.py",
    "new": "pages/1_New_run.py",
    "training": "pages/2_Training.py",
    "compare": "pages/3_Compare.py",
    "predict": "pages/4_Predict.py",
}

NAV = [
    ("home", "Home", ":material/home:"),
    ("new", "New run", ":material/add_circle:"),
    ("training", "Training", ":material/monitoring:"),
    ("compare", "Compare", ":material/compare_arrows:"),
    ("predict", "Predict", ":material/image_search:"),
]

STATE_ICONS = {
    "queued": ":material/hourglass_empty:",
    "running": ":material/play_circle:",
    "completed": ":material/check_circle:",
    "stopped": ":material/stop_circle:",
    "failed": ":material/error:",
    "crashed": ":material/heart_broken:",
    "stalled": ":material/hourglass_disabled:",  # live process, no heartbeat (store.read_status)
    "unknown": ":material/report:",  # status.json unreadable
}

ICON = Path(__file__).resolve().parent / "icon.png"

# The app hides Streamlit's toolbar, and with it the "running" indicator: a thin bar slides
# along the top while a script run takes longer than 0.4 s (the live parts' quick refreshes
# never show it).
BUSY_CSS = """
<style>
.stApp[data-test-script-state="running"]::before {
  content: ""; position: fixed; top: 0; left: 0; right: 0; height: 4px; z-index: 1000002;
  background: linear-gradient(90deg, transparent, #0072B2, transparent) no-repeat;
  background-size: 40% 100%; opacity: 0;
  animation: busy-show 0s linear 0.4s forwards, busy-slide 1.2s linear infinite;
}
@keyframes busy-show { to { opacity: 1; } }
@keyframes busy-slide { from { background-position: -60% 0; } to { background-position: 160% 0; } }
</style>
"""

# Seconds between refreshes of the live parts of a page (a run's progress; Home's table and
# Compare refresh at twice this). Each refresh costs the browser, which on a laptop shares the
# CPU with the run, its restyling and layout: bench/dashboard_speed.py watch measures it.
LIVE_REFRESH_S = float(os.environ.get("FINETUNE_REFRESH_S") or 3)


def setup_page(title: str) -> Path:
    """Configures the page, makes sure the queue is served, and returns the runs folder."""
    # a bundled icon: a :material/...: page icon is fetched from Google's font CDN
    st.set_page_config(page_title=f"{title} · Fine-tuning", page_icon=str(ICON), layout="wide")
    st.html(BUSY_CSS)
    sign_in_gate()  # with [auth] in secrets.toml: nothing below for a visitor not signed in
    with st.sidebar:  # our own navigation: the entry script would otherwise be called "app"
        for key, label, icon in NAV:
            st.page_link(PAGES[key], label=label, icon=icon)
        who_is_viewing()
    root = store.runs_dir()
    _ensure_supervisor(str(root))
    return root


def _ensure_supervisor(root: str) -> None:
    """Starts the queue's supervisor when runs wait and none serves this runs folder.

    Runs on every full page run: a supervisor that died (a reboot, a killed process) is
    replaced on the next page view, so queued runs always start. With nothing queued no
    process is started (launching and resuming start one themselves).
    """
    try:
        if store.any_queued(root):
            runner.ensure_supervisor(root)
    except Exception as e:  # the page still shows what exists; say why the queue may stall
        st.warning(
            f"Could not start the run queue's supervisor for {root}: {e}. Queued runs will "
            "wait; start it by hand with `python -m finetune_core queue`."
        )


# What New run imports beyond the other pages: torch and torchvision (about 3.5 s on a 2-core
# CPU). Home, Training and Compare never need them.
NEW_RUN_IMPORTS = ("dashboard.form", "finetune_core.estimate", "finetune_core.preflight")
WARM_UP_THREAD = "finetune-warm-up"
_warm_up_started = threading.Event()


def warm_up() -> None:
    """Imports what New run needs in a background thread, once per server process.

    Called at the end of the pages that do not need torch, once they are drawn: the first
    New run a user opens then answers in about a second instead of waiting for the import.
    An import that fails here fails again, with its message, on New run itself.
    """
    if _warm_up_started.is_set():
        return
    _warm_up_started.set()
    threading.Thread(target=_import_new_run, name=WARM_UP_THREAD, daemon=True).start()


def _import_new_run() -> None:
    for name in NEW_RUN_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (New run imports it again and shows the error)
            return


def device_text() -> str:
    """Returns the device runs use by default: the GPU's name and memory, else the CPU."""
    return hardware.summary()


def state_text(state: str | None) -> str:
    """Returns the state with its icon, for markdown: ':material/play_circle: running'."""
    return f"{STATE_ICONS.get(state or '', ':material/help:')} {state or 'unknown'}"


def training_url(run_id: str) -> str:
    """Returns the Training view's URL for a run (relative, so it works behind a proxy)."""
    return f"Training?run={run_id}"


def labelled_picker(label: str, ids: list[str], labels: dict[str, str], key: str, **kwargs):
    """A selectbox of ids shown by their labels; returns the id chosen (kept in
    st.session_state[key]). The widget's own key carries a digest of the labels: Streamlit
    keeps showing a keyed selectbox's old label when only its format_func output changes
    (streamlit#13788), so a renamed or finished run would read as it was."""
    if st.session_state.get(key) not in ids:
        st.session_state[key] = ids[0]
    digest = hashlib.sha1("\n".join(labels[i] for i in ids).encode()).hexdigest()[:10]
    chosen = st.selectbox(
        label,
        ids,
        index=ids.index(st.session_state[key]),
        format_func=labels.get,
        key=f"{key}_{digest}",
        **kwargs,
    )
    st.session_state[key] = chosen
    return chosen


def share_column(label: str, digits: int = 1, **kwargs):
    """A 0-100 % column drawn as a bar; a missing value is an empty cell (as every missing
    value in the dashboard's tables: Streamlit writes "None" in a number column)."""
    return st.column_config.ProgressColumn(
        label, format=f"%.{digits}f %%", min_value=0, max_value=100, **kwargs
    )


def shown_or_blank(values, fmt) -> list[str]:
    """Returns fmt(value) for each value, "" where it is missing (None or NaN)."""
    return ["" if v is None or v != v else fmt(v) for v in values]


def table_height(rows: int, most: int = 25) -> int:
    """Returns a dataframe height in pixels that shows every row up to `most` (then scrolls)."""
    return 35 * (min(rows, most) + 1) + 3


def run_choice_labels(runs) -> dict[str, str]:
    """Returns {run_id: 'name or strategy (with its option) · model · run_id'} for pickers."""
    return {r.run_id: f"{r.name or r.strategy} · {r.model} · {r.run_id}" for r in runs.itertuples()}


# ---------------------------------------------------------------- hosted mode: who is viewing


@dataclass(frozen=True)
class Viewer:
    """Who looks at the page: a signed-in user, or nobody (the local mode: no sign-in, every
    action open); and whether this server is a read-only demo. The answers are
    store.access's, which the functions the buttons call enforce again."""

    user: str | None = None
    demo: bool = False

    @property
    def hosted(self) -> bool:
        return self.user is not None

    @property
    def admin(self) -> bool:
        return access.is_admin(self.user)

    def may_act(self, config) -> bool:
        """Returns True when this viewer may stop, resume, rename or delete the run."""
        return not self.demo and access.may_act(config, self.user)

    def why_not(self, config) -> str:
        """Returns, in the page's words, why the run's buttons are not there."""
        if self.demo:
            return "This is a read-only demo: runs can be browsed and compared, not changed."
        owner = access.owner_of(config)
        whose = f"**{owner}**'s" if owner else "from before sign-in (nobody's)"
        return f"This run is {whose}: only its owner or an admin can stop, resume or delete it."

    def may_see(self, config) -> bool:
        """Returns False for another user's run when FINETUNE_HIDE_OTHERS_RUNS hides them."""
        return access.may_see_run(config, self.user)

    def may_see_images(self, config) -> bool:
        return access.may_see_images(config, self.user)

    def visible_runs(self, runs):
        """Returns the rows of store.list_runs this viewer may see (all of them unless
        FINETUNE_HIDE_OTHERS_RUNS hides other users' runs)."""
        if runs.empty or not access.hide_others_runs() or self.admin:
            return runs
        return runs[runs["owner"] == self.user].reset_index(drop=True)

    def home(self, root: Path) -> Path:
        """Returns where this viewer's saved form and uploads live (store.access.user_home)."""
        return access.user_home(root, self.user)


def stop_group_button(root: Path, group: str, label: str, key: str, me: Viewer) -> None:
    """A button that stops a live group as a whole (its queued runs cancelled, the one that
    trains stopped with a checkpoint), with the outcome as a toast or the refusal as an error."""
    if not st.button(
        label,
        icon=":material/stop_circle:",
        key=key,
        help="Cancels its queued runs, then stops the one that trains (it saves a checkpoint)",
    ):
        return
    try:
        outcome = runner.stop_group(root, group, actor=me.user)
    except store.RunError as e:  # one of its runs is another user's
        st.error(f"The group was not stopped: {e}")
    else:
        acted = sum(w != "not running" for w in outcome.values())
        st.toast(f"Group {group}: {acted} run(s) stopped or cancelled")
        st.rerun()


def sign_in_configured() -> bool:
    """Returns True when .streamlit/secrets.toml has an [auth] section (st.login's)."""
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file, or one Streamlit cannot parse
        return False


def viewer() -> Viewer:
    """Returns who is viewing this page: the signed-in user (by FINETUNE_USER_CLAIM, the
    e-mail address by default) with sign-in configured, else nobody (the local mode)."""
    user = None
    if sign_in_configured() and st.user.is_logged_in:
        user = access.user_key(st.user.get(access.user_claim()))
    return Viewer(user=user, demo=access.demo_mode())


def _providers() -> list[str | None]:
    """Returns the [auth] providers to offer: None for one unnamed provider, else the names
    of the [auth.NAME] sections."""
    section = st.secrets["auth"]
    if "server_metadata_url" in section:
        return [None]
    return [k for k, v in section.items() if hasattr(v, "keys")] or [None]


def sign_in_gate() -> None:
    """With sign-in configured, shows a visitor who is not signed in only the sign-in
    button, and a signed-in user whose sign-in names nobody what to change; the page stops
    there. Without it (the local mode) nothing is drawn."""
    if not sign_in_configured():
        return
    claim = access.user_claim()
    if st.user.is_logged_in:
        if claim == "email" and st.user.get("email_verified") is False:
            problem = "your provider says your e-mail address is not verified"
        elif viewer().user is None:
            problem = f"your sign-in did not say your {claim}, which names users here"
        else:
            return
        st.title("Fine-tuning dashboard")
        st.error(
            f"Signed in, but {problem}. Verify it with your provider, or ask the admin to set "
            "FINETUNE_USER_CLAIM (email or sub) to a claim your provider gives."
        )
        st.button("Sign out", key="sign_out", icon=":material/logout:", on_click=st.logout)
        st.stop()
    st.title("Fine-tuning dashboard")
    st.info(
        "This is a team's shared dashboard: sign in to see its runs and launch your own.",
        icon=":material/lock:",
    )
    for provider in _providers():
        st.button(
            f"Sign in with {provider}" if provider else "Sign in",
            type="primary",
            icon=":material/login:",
            key=f"sign_in_{provider or 'default'}",
            on_click=st.login,
            args=(provider,) if provider else (),
        )
    st.stop()


def who_is_viewing() -> None:
    """The sidebar's line on who is signed in (with Sign out), and the demo's notice."""
    me = viewer()
    if me.hosted:
        st.caption(f"Signed in as `{me.user}`" + (" (admin)" if me.admin else ""))
        st.button("Sign out", key="sign_out", icon=":material/logout:", on_click=st.logout)
    if me.demo:
        st.info(
            "Read-only demo: browse and compare the runs here; launching, uploading, "
            "stopping and deleting are off.",
            icon=":material/visibility:",
        )
