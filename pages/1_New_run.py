"""New run: model, weights, data, strategy (with its trainable map), settings, estimate,
launch; one run or a group comparing strategies. Entries survive a refresh.

?clone=<run id> loads that run's settings into the form (a run of this runs folder, by its
id: never a path). Uploads are kept by their content (finetune_core.uploads) and an uploaded
zip is unpacked by a background job, not in this server's process. Each numbered section is
one function below; the page calls them in order.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from dashboard import form
from dashboard.common import PAGES, setup_page, viewer
from finetune_core import config as config_mod
from finetune_core import data as data_mod
from finetune_core import (
    estimate,
    jobs,
    models,
    plots,
    preflight,
    recipe,
    runner,
    store,
    strategies,
    tuning,
    uploads,
    weights,
)
from finetune_core.config import OPTIONS, ConfigError
from finetune_core.util.durations import plural

F = form.PREFIX
root = setup_page("New run")
st.title("New run")
me = viewer()  # signed in on a shared server, or nobody (the local mode)
home = me.home(root)  # where this user's form is saved and uploads kept (the runs folder)
if me.demo:  # a read-only demo launches nothing: no form, no uploads, no measuring jobs
    st.info(
        "This is a read-only demo: new runs cannot be launched here. Browse the runs on "
        "Home and Training, and compare them on Compare.",
        icon=":material/visibility:",
    )
    st.page_link(PAGES["compare"], label="Compare", icon=":material/compare_arrows:")
    st.stop()
roots = form.data_roots()
state = st.session_state


# ---------------------------------------------------------------- cached look-ups


@st.cache_data(ttl=600, show_spinner=False)
def network_problem(host: str = "download.pytorch.org") -> str | None:
    """Returns why torchvision's weights host cannot be reached, or None."""
    try:
        socket.create_connection((host, 443), timeout=2).close()
        return None
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e})"


@st.cache_data(show_spinner=False)
def model_names() -> list[str]:
    return models.classification_models()


@st.cache_data(show_spinner=False)
def model_info(name: str) -> dict:
    try:
        return models.model_info(name)
    except Exception:  # noqa: BLE001 - the picker still works without the meta
        return {}


def model_line(name: str) -> str:
    info = model_info(name)
    bits = [name]
    if info.get("params"):
        bits.append(f"{plots.fmt_count(info['params'])} params")
    if info.get("acc1"):
        bits.append(f"{info['acc1']:.1f} % ImageNet top-1")
    return " · ".join(bits)


def availability(spec: str, model: str) -> tuple[str, str]:
    """Returns whether the weights are cached, to download or to train, and a sentence."""
    # the weights' cache is part of the key: a page in a process whose TORCH_HOME changed
    # (tests, or a server restarted with another) never reads another cache's answer
    return _availability(spec, model, os.environ.get("TORCH_HOME", ""))


@st.cache_data(ttl=30, show_spinner=False)
def _availability(spec: str, model: str, torch_home: str) -> tuple[str, str]:
    return preflight.availability(spec, model)


@st.cache_data(ttl=60, show_spinner=False)
def inspect(spec: str):
    return data_mod.inspect_data(spec)


@st.cache_data(ttl=600, show_spinner=False)
def unreadable(spec: str) -> list[str]:
    return data_mod.unreadable_files(spec)


@st.cache_data(ttl=60, show_spinner=False)
def previews(spec: str, per_class: int = 4, classes: int = 12) -> tuple[list[str], list[str]]:
    """Returns (image paths, their classes) to preview: readable files only."""
    info = inspect(spec)
    images, captions = [], []
    for cls in info.classes[:classes]:
        readable = [p for p in info.samples.get(cls, []) if data_mod.can_read(Path(p))]
        images += readable[:per_class]
        captions += [cls] * len(readable[:per_class])
    return images, captions


@st.cache_data(ttl=30, show_spinner=False)
def validate(cfg_json: str, runs_dir: str) -> dict[str, str]:
    cfg = config_mod.from_dict(json.loads(cfg_json))
    return preflight.validate(cfg, runs_dir=runs_dir)


@st.cache_data(show_spinner=False)
def plan_frame(cfg_json: str, num_classes: int):
    cfg = config_mod.from_dict(json.loads(cfg_json))
    return preflight.plan_for(cfg, num_classes).to_frame()


def save_upload(up) -> Path:
    """Returns where an uploaded file is kept: under the id of its content, so that no
    other upload replaces it (finetune_core.uploads); saved once per upload, not per rerun."""
    saved = state.setdefault("_uploads_saved", {})
    if up.file_id not in saved:
        saved[up.file_id] = str(uploads.save(root, up.name, up.getbuffer(), user=me.user))
    return Path(saved[up.file_id])


def upload(label: str, types: list[str], key: str, field: str, **kwargs) -> None:
    """A file uploader whose file is kept by its content; the form's `field` keeps its path
    (so a refresh keeps the file, and a launched run's config pins it), named under it."""
    up = st.file_uploader(label, type=types, key=key, **kwargs)
    try:
        saved = str(save_upload(up)) if up is not None else None
    except store.RunError as e:  # over this user's disk limit: nothing was kept
        st.error(f"**{label}**: {e}", icon=":material/block:")
        saved = None
    if saved is not None:
        if state.get(F + field) != saved:
            state[F + field] = saved
            st.rerun()
    path = state.get(F + field)
    if path:
        kept = uploads.upload_folder(path, root, me.user)
        if kept is not None:
            uploads.touch(kept)  # in use: the cleanup keeps it
            st.caption(f"Using `{Path(path).name}` (upload {kept.name[:8]}, kept unchanged)")
        else:
            st.caption(f"Using `{path}`")


def clean_uploads() -> None:
    """Deletes uploads nothing uses (no run, no job, not the form), at most once an hour."""
    keep = [str(v) for v in form.load(home).values()]
    keep += [str(v) for k, v in state.items() if str(k).startswith(F)]
    try:
        uploads.clean_now_and_then(root, keep=keep, user=me.user)
    except OSError as e:  # the page works without it; the next hour tries again
        st.toast(f"Could not clean old uploads: {e}")


def choose(label: str, options: list, field: str, *, default=None, where=st, **kwargs) -> None:
    """A selectbox for the form's `field`; a saved value that is no longer among the options
    (a deleted run, a changed setting) falls back to `default` or the first option."""
    if state.get(F + field) not in options:
        state[F + field] = options[0] if default is None else default
    where.selectbox(label, options, key=F + field, **kwargs)


def field_input(name: str) -> None:
    """Draws the input of a RunConfig field by its kind: a selectbox for choices, a checkbox
    for a switch, a text input for text, else a number input."""
    option = OPTIONS[name]
    if option.choices is not None:
        choose(
            option.label,
            list(option.allowed()),
            name,
            default=option.default,
            help=form.field_help(name),
        )
    elif isinstance(option.default, bool):
        st.checkbox(option.label, key=F + name, help=form.field_help(name))
    elif isinstance(option.default, str):
        st.text_input(
            option.label, key=F + name, max_chars=option.max_length, help=form.field_help(name)
        )
    else:
        number_input(name)


def number_input(name: str, label: str | None = None) -> None:
    """Draws the number input of a RunConfig field, with its label, step and help."""
    option = OPTIONS[name]
    st.number_input(
        label or form.field_label(name),
        key=F + name,
        step=option.step,
        format=option.format,
        help=form.field_help(name),
    )


@dataclass
class Page:
    """What the sections find out and later sections need."""

    offline: str | None
    weights_spec: str = ""
    weights_problem: str | None = None
    data_spec: str = ""
    data_problem: str | None = None
    data_pending: bool = False  # an uploaded zip is being unpacked (its progress is shown)
    data_info: data_mod.DataInfo | None = None
    errors: dict[str, str] = field(default_factory=dict)
    displayed: set[str] = field(default_factory=set)  # fields whose message is on the page
    slots: dict = field(default_factory=dict)  # field -> where its message goes, drawn later
    cfgs: list = field(default_factory=list)

    def show(self, name: str) -> None:
        """Shows the message of a field here (if it has one) and remembers it is shown."""
        if form.show_errors(self.errors, name):
            self.displayed.add(name)

    def fill_slot(self, name: str) -> None:
        """Shows a field's message in the slot its section kept for it."""
        with self.slots[name].container():
            self.show(name)

    @property
    def num_classes(self) -> int | None:
        return len(self.data_info.classes) if self.data_info else None


# ---------------------------------------------------------------- form state


def restore_form(offline: str | None, names: list[str]) -> None:
    """Gives the form its saved values (or a cloned run's), and fixes values it cannot use."""
    default_model = OPTIONS["model"].default
    first_choice = "builtin"
    if not offline or availability("default", default_model)[0] == "cached":
        first_choice = "default"
    form.restore(home, form.defaults(first_choice))
    clone = st.query_params.get("clone")
    if clone:
        try:
            source = store.resolve_run_id(clone, root)
            form.apply_config(store.read_config(source), roots)
            st.toast(f"Loaded the settings of run {source.name}")
        except store.RunError as e:
            st.error(f"Could not clone: {e}")
        del st.query_params["clone"]
    if state.get(F + "model") not in names:
        state[F + "model"] = default_model if default_model in names else names[0]
    chosen_root, sub = state.get(F + "data_root", ""), state.get(F + "data_sub", "")
    if state.get(F + "data_choice") == "folder" and (
        not roots or (chosen_root not in roots and (chosen_root or sub))  # a cloned or saved folder
    ):
        folder = sub or "a folder"
        st.warning(
            f"The data was `{folder}`, a folder this server may not read: only folders below "
            f"the data roots ({', '.join(roots) or 'none set'}) can be used. Add its parent to "
            "FINETUNE_DATA_ROOTS and restart the app, or choose other data below; the data is "
            "set to the built-in shapes for now.",
            icon=":material/folder_off:",
        )
        state[F + "data_choice"] = "builtin"


# ---------------------------------------------------------------- 1. model and weights


def weights_choice(page: Page, model: str) -> None:
    """The weights radio, its file or run picker, and where the weights will come from."""
    if page.offline:
        st.info(
            f"**Offline:** {page.offline}, so ImageNet weights that are not cached cannot be had "
            "here. The default is therefore **builtin**: a backbone pretrained on the "
            "built-in source task, trained once on this machine and cached.",
            icon=":material/wifi_off:",
        )
    st.radio(
        "Weights",
        list(form.WEIGHT_CHOICES),
        key=F + "weights_choice",
        format_func=form.WEIGHT_CHOICES.get,
        horizontal=True,
        help="Where the backbone's starting weights come from; the head is always new.",
    )
    choice = state[F + "weights_choice"]
    if choice == "file":
        upload(
            "Weights file",
            ["safetensors", "pt", "pth"],
            "up_weights",
            "weights_file",
            help=".pt/.pth are read with weights_only=True (no pickle code).",
        )
    elif choice == "run":
        done = me.visible_runs(store.list_runs(root)).query("state == 'completed'")
        done = done.set_index("run_id")
        options = list(done.index)
        if not options:
            st.warning("No completed run yet to take weights from; choose another source.")
        else:
            choose(
                "Run",
                options,
                "weights_run",
                format_func=lambda r: f"{r} · {done.loc[r, 'model']} · {done.loc[r, 'strategy']}",
                help="Its best checkpoint is the starting point; a head for the same classes "
                "is kept.",
            )


def weights_status(page: Page, model: str) -> None:
    """Where the weights come from, or why they cannot: one box, its error when it has one."""
    if "weights" in page.errors:
        page.show("weights")
        return
    if not page.weights_spec:
        return
    kind, sentence = availability(page.weights_spec, model)
    sentence = sentence[0].upper() + sentence[1:]
    if kind == "train":
        st.info(sentence, icon=":material/model_training:")
    else:
        st.success(sentence)


def offline_problem(page: Page, model: str) -> str | None:
    """Returns why ImageNet weights cannot be had now (offline, not cached), or None."""
    if page.weights_spec != "default" or not page.offline:
        return None
    if availability("default", model)[0] != "download":
        return None
    target = weights.cache_file("default", model)
    url = model_info(model).get("url", "torchvision's weights URL")
    return (
        f"the ImageNet weights for {model} are not on this machine and {page.offline}. "
        f"Download {url} on a machine with internet and put it at {target}, or choose "
        "builtin (an offline stand-in)."
    )


def model_section(page: Page, names: list[str]) -> str:
    """Section 1; returns the model chosen (its messages and the weights' status are drawn
    into slots once the configs are validated)."""
    with st.container(border=True):
        st.subheader("1 · Model and weights")
        c1, c2 = st.columns([2, 3])
        model = c1.selectbox(
            "Model",
            names,
            key=F + "model",
            format_func=model_line,
            help="Every classification model in torchvision's registry; type to search.",
        )
        model_slot = c1.empty()  # filled with the model's validation message further down
        info = model_info(model)
        if info:
            acc1, file_mb = info.get("acc1"), info.get("file_mb")
            c1.caption(
                f"{plots.fmt_count(info.get('params'))} parameters · ImageNet top-1 "
                + (f"{acc1:.1f} %" if acc1 else "–")
                + (f" · weights file {file_mb:.1f} MB" if file_mb else "")
            )
        with c2:
            weights_choice(page, model)
            page.slots["weights"] = st.empty()  # the weights' status, once errors are known
    page.slots["model"] = model_slot
    return model


# ---------------------------------------------------------------- 2. data


def data_choice() -> None:
    """The data radio and the upload, folder or dataset picker it asks for."""
    choices = [c for c in form.DATA_CHOICES if c != "folder" or roots]
    st.radio(
        "Images",
        choices,
        key=F + "data_choice",
        format_func=form.DATA_CHOICES.get,
        horizontal=True,
        help="builtin:shapes is generated on this machine: no download.",
    )
    if not roots:
        st.caption(
            "Folders on the server are off. To allow them, start the app with "
            "`FINETUNE_DATA_ROOTS=/path/one:/path/two`; folders below those roots can then "
            "be chosen here."
        )
    choice = state[F + "data_choice"]
    if choice == "zip":
        upload(
            "A .zip with one folder per class (or train/ and val/ folders)",
            ["zip"],
            "up_zip",
            "data_zip",
        )
    elif choice == "folder":
        c1, c2 = st.columns([1, 2])
        choose(
            "Data root",
            roots,
            "data_root",
            where=c1,
            help="Set by FINETUNE_DATA_ROOTS when the app was started.",
        )
        c2.text_input(
            "Folder below it",
            key=F + "data_sub",
            help="A path relative to the root, holding one folder per class.",
        )
    elif choice == "torchvision":
        choose(
            "Dataset",
            list(data_mod.TORCHVISION),
            "data_tv",
            help=f"Downloaded into {data_mod.data_dir() / 'torchvision'} on first use.",
        )


def data_summary(spec: str, info: data_mod.DataInfo) -> None:
    """Classes, image counts per class and split, files that will be skipped, and samples."""
    num_classes = len(info.classes)
    total = sum(sum(c.values()) for c in info.counts.values())
    st.markdown(
        f"**{num_classes} classes**, {total:,} images"
        + (" (with its own train/val split)" if info.has_splits else "")
        + ": "
        + ", ".join(info.classes[:30])
        + (" …" if num_classes > 30 else "")
    )
    if info.needs_download:
        st.info(
            "Not downloaded yet: the run downloads it into "
            f"{data_mod.data_dir() / 'torchvision'} first (needs the network)."
        )
    bad = unreadable(spec)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        files = "1 file cannot" if len(bad) == 1 else f"{len(bad)} files cannot"
        st.warning(f"{files} be read and will be skipped: {shown}.", icon=":material/broken_image:")
    for warning in info.warnings:  # usable, but worth a look (a split lacking a class)
        st.warning(warning)
    c1, c2 = st.columns([2, 3])
    c1.plotly_chart(plots.class_counts_chart(info.counts), key="class_counts", width="stretch")
    with c2:
        images, captions = previews(spec)
        if images:
            st.caption("Samples")
            st.image(images, caption=captions, width=72)


def unpack_zip(page: Page) -> None:
    """Has the chosen zip unpacked by a background job, never in this server's process.

    Found again after a refresh (the job is the zip's). While it unpacks, its progress is
    drawn here, refreshing only itself, and the data counts as not chosen yet (Launch
    waits); when it failed, its message is the data's; once done, page.data_spec stays the
    zip's and the page reads the unpacked folder.
    """
    args = uploads.extract_args(page.data_spec)
    job = jobs.find(root, "extract", args)
    status = jobs.read(job) if job else {}
    if job is None or (status.get("state") == "completed" and not uploads.extracted(status)):
        job = jobs.start(root, "extract", args, message="starting", again=True)
        status = jobs.read(job)
    if status.get("state") == "completed":
        return
    page.data_spec = ""  # nothing reads the zip in this process
    if status.get("state") in jobs.LIVE:
        page.data_pending = True
        page.data_problem = "the .zip is still being unpacked; its classes show here once done"
        st.fragment(unpack_view, run_every=1.0)(job)
        return
    if status.get("state") == "cancelled":
        page.data_problem = "unpacking the .zip was cancelled; unpack it again or choose other data"
    else:
        page.data_problem = status.get("message") or "the .zip could not be unpacked"
    st.button(
        "Unpack again",
        key="unpack_again",
        icon=":material/refresh:",
        on_click=jobs.start,
        args=(root, "extract", args),
    )


def unpack_view(job: Path) -> None:
    """The unpacking job's progress with Cancel; once it ended, the page is drawn again."""
    status = jobs.read(job)
    if status.get("state") not in jobs.LIVE:
        st.rerun()  # unpacked (or failed): the whole page reads it once
    text = f"Unpacking the .zip: {status.get('message') or 'starting'}"
    st.progress(min(1.0, max(0.0, status.get("progress") or 0.0)), text=text)
    st.button("Cancel unpacking", key="unpack_cancel", on_click=jobs.cancel, args=(job,))


def data_section(page: Page) -> None:
    """Section 2: which images, and what the data holds."""
    with st.container(border=True):
        st.subheader("2 · Data")
        data_choice()
        if page.data_spec and state[F + "data_choice"] == "zip":
            unpack_zip(page)
        if page.data_spec:
            try:
                with st.spinner(
                    f"Reading {page.data_spec} (the built-in data is generated on first use)…"
                ):
                    page.data_info = inspect(page.data_spec)
            except data_mod.DataError as e:
                page.data_problem = str(e)
        page.slots["data"] = st.empty()  # the data's message, once the configs are validated
        if page.data_info is not None:
            data_summary(page.data_spec, page.data_info)


# ---------------------------------------------------------------- 3. strategy


def _fixed_by_presets(presets: list[str]) -> dict[str, set[str]]:
    """Returns {strategy: the options every chosen preset of it fixes}."""
    fixed: dict[str, set[str]] = {}
    for preset in presets:
        try:
            fields = strategies.preset_fields(preset)
        except ValueError:
            continue
        keys = set(fields) - {"strategy"}
        name = fields["strategy"]
        fixed[name] = fixed[name] & keys if name in fixed else keys
    return fixed


def strategy_choice(page: Page) -> None:
    """The strategy (or the strategies of a comparison), their options and the modifiers."""
    if state[F + "compare"]:
        if not isinstance(state.get(F + "compare_set"), list):
            state[F + "compare_set"] = list(form.DEFAULT_PRESETS)
        st.multiselect(
            "Strategies",
            list(form.PRESETS),
            key=F + "compare_set",
            help="full trains everything; last_n k trains the top k groups and the head; "
            "linear_probe only the head.",
        )
        fixed = _fixed_by_presets(state[F + "compare_set"])
        comparison_settings()
    else:
        option = OPTIONS["strategy"]
        st.selectbox(option.label, option.allowed(), key=F + "strategy", help=option.help)
        fixed = {state[F + "strategy"]: set()}
    drawn = set()  # strategies of a family share options (lora's and loha's rank): once
    for name, fixed_options in fixed.items():
        for option in strategies.get(name).options:
            if option.name not in fixed_options and option.name not in drawn:
                drawn.add(option.name)
                field_input(option.name)
    with st.expander("Modifiers (layer-wise lr decay, L2-SP, frozen BatchNorm)"):
        for option in strategies.MODIFIERS:
            if isinstance(option.default, bool):
                st.checkbox(option.label, key=F + option.name, help=form.field_help(option.name))
            else:
                number_input(option.name)


def comparison_settings() -> None:
    """How fair the comparison is: each strategy's lr tuned (or the same settings for all),
    and seeds per strategy."""
    st.toggle(
        "Tune each strategy's learning rate",
        key=F + "compare_tune",
        help="A linear probe needs a far higher learning rate than full fine-tuning: with one "
        "rate for all, the comparison measures the rate, not the strategy. Each run first "
        "trains a few times on the validation split at rates below where the loss blows up "
        "(a range test) and keeps the best; without a test/ folder "
        f"{100 * config_mod.TUNED_TEST_FRACTION:g} % of the images are held out as test, "
        "which no choice saw. Costs a few trainings per run. Off: the same settings for all.",
    )
    if not state[F + "compare_tune"]:
        st.caption("Same settings for all: every strategy trains at the one learning rate.")
    st.number_input(
        "Seeds per strategy",
        min_value=1,
        max_value=config_mod.MAX_SEEDS,
        step=1,
        key=F + "compare_seeds",
        help="Repeat each strategy with seeds seed, seed+1, ... (one split for all): Compare "
        "then shows the mean with a band and calls no winner inside the noise.",
    )


def trainable_maps(page: Page) -> None:
    """The plan of each config as a trainable map (a tab per strategy of a comparison)."""
    if page.num_classes is None:
        st.caption("The data cannot be read yet, so the map assumes 10 classes.")
    shown = list({base_label(label): cfg for label, cfg in page.cfgs}.items())  # seeds: once
    tabs = st.tabs([label for label, _ in shown]) if len(shown) > 1 else [st.container()]
    for tab, (label, cfg) in zip(tabs, shown, strict=True):
        with tab:
            try:
                frame = plan_frame(form.to_json(cfg), page.num_classes or 10)
                st.plotly_chart(plots.trainable_map(frame), key=f"map_{label}", width="stretch")
            except Exception as e:  # noqa: BLE001 - a bad option shows its message, no map
                st.warning(f"No trainable map for {label}: {e}")


def strategy_section(page: Page):
    """Section 3: what trains; returns the column where its messages and maps go."""
    with st.container(border=True):
        st.subheader("3 · Strategy")
        st.toggle(
            "Compare strategies (launch several as one group, same seed, split and epochs)",
            key=F + "compare",
        )
        c1, c2 = st.columns([1, 2])
        with c1:
            strategy_choice(page)
    return c2


STRATEGY_OPTIONS = {o.name for s in strategies.names() for o in strategies.get(s).options}


def collect_errors(page: Page) -> None:
    """Builds the configs of the form and validates each; messages go into page.errors."""
    errors = page.errors
    try:
        page.cfgs = form.build_configs(
            state, page.weights_spec or "none", page.data_spec or "builtin:shapes"
        )
    except ConfigError as e:
        errors.update(e.errors)
    if state[F + "compare"] and not state.get(F + "compare_set"):
        errors["strategy"] = "pick at least one strategy to compare (two or more make a comparison)"
    several = len(page.cfgs) > 1
    for label, cfg in page.cfgs:
        for name, message in validate(form.to_json(cfg), str(root)).items():
            if name in errors and errors[name] != message and several:
                errors[name] += f"; {label}: {message}"
            elif name not in errors:
                # a strategy's option differs between the runs of a group: say whose it is
                of_one = several and name in STRATEGY_OPTIONS
                errors[name] = f"{label}: {message}" if of_one else message
    if page.weights_problem:
        errors["weights"] = page.weights_problem
    offline = offline_problem(page, state[F + "model"])
    if offline:
        errors["weights"] = offline
    if page.data_problem:
        errors["data"] = page.data_problem


# ---------------------------------------------------------------- 4. settings

LAYOUT = [
    ["epochs", "batch_size", "devices", "lr", "optimizer", "weight_decay"],
    ["scheduler", "warmup_epochs", "label_smoothing", "clip_grad", "early_stop"],
    ["image_size", "augment", "hflip", "balance", "val_fraction", "test_fraction"],
    ["seed", "device", "compile", "name"],
]


def settings_section(page: Page) -> None:
    """Section 4: the training settings, each with its message under it."""
    with st.container(border=True):
        st.subheader("4 · Training settings")
        for col, names_in_col in zip(st.columns(len(LAYOUT)), LAYOUT, strict=True):
            with col:
                for name in names_in_col:
                    field_input(name)
                    page.show(name)
                    if name == "augment":
                        cache_note(page)
                    if name == "devices":
                        effective_batch_note(page)
        recipe_part(page)
        lr_finder_part(page)


# ---------------------------------------------------------------- 4b. the recipe (issue 16)

# the recipe settings of torchvision's references and fastai, in the expander's columns
RECIPE_LAYOUT = [
    ["model_ema", "model_ema_steps", "model_ema_decay"],
    ["mixup_alpha", "cutmix_alpha", "random_erase"],
    ["accumulate_steps", "decay_norm_bias", "cycle_momentum"],
    ["tta", "head"],
]


def recipe_part(page: Page) -> None:
    """The recipe settings in an expander (open when one differs from its default), with
    the effective batch under the accumulation."""
    names = [n for col in RECIPE_LAYOUT for n in col]
    changed = any(state.get(F + n, OPTIONS[n].default) != OPTIONS[n].default for n in names)
    title = "Recipe: weight EMA, MixUp/CutMix, random erasing, accumulation, TTA, fastai head"
    with st.expander(title, expanded=changed or any(n in page.errors for n in names)):
        for col, names_in_col in zip(st.columns(len(RECIPE_LAYOUT)), RECIPE_LAYOUT, strict=True):
            with col:
                for name in names_in_col:
                    field_input(name)
                    page.show(name)
                    if name == "model_ema_decay":
                        ema_note(page)


def ema_note(page: Page) -> None:
    """Warns under EMA decay when the weight EMA would stay near where training started in
    this run (torchvision's defaults are set for ImageNet-sized epochs), with a decay that
    would not, updated every step."""
    if not page.cfgs or page.data_info is None or page.errors:
        return
    cfg = page.cfgs[0][1]
    reach = preflight.short_ema(cfg, train_images(page, cfg))
    if reach is None:
        return
    advice = (
        f"set EMA every (steps) to 1 and EMA decay to {reach.suggested_decay:.5f}, or train longer"
        if reach.suggested_decay is not None
        else "this run is too short for an average of its weights: train longer"
    )
    st.warning(
        f"The weight EMA makes {reach.updates} updates in this run, each keeping "
        f"{reach.decay:.4f} of the average, so {reach.still_at_start:.0%} of the EMA weights "
        "it scores and saves as best stay where training started; "
        f"{advice} (the EMA forgets its start then).",
        icon=":material/warning:",
    )


def effective_batch(cfg) -> str:
    """Returns the effective batch in words when it is not the batch size: "Effective batch
    256 = 32 per device × 2 devices × 4 batches per step", "" otherwise."""
    devices, every = max(1, cfg.devices), max(1, cfg.accumulate_steps)
    if devices == 1 and every == 1:
        return ""
    parts = [f"{cfg.batch_size} per device", f"{devices} devices"] if devices > 1 else []
    parts = parts or [str(cfg.batch_size)]
    if every > 1:
        parts.append(f"{every} batches per step")
    return f"Effective batch {cfg.batch_size * devices * every:,} = {' × '.join(parts)}"


def effective_batch_note(page: Page) -> None:
    """Says under Devices what one optimizer step takes, with several devices or
    accumulated batches (the Recipe's accumulation), and that the lr is not scaled."""
    if not page.cfgs:
        return
    cfg = page.cfgs[0][1]
    said = effective_batch(cfg)
    if said:
        st.caption(
            f"{said}; the learning rate stays {cfg.lr:g} (not scaled with the batch)."
            + (" One process per GPU (torchrun); on a CPU, processes." if cfg.devices > 1 else "")
        )


def cache_note(page: Page) -> None:
    """Says before launch when the augmentation or mixing keeps a strategy's frozen part
    from being computed once (the feature cache): it then runs every step."""
    blocked = {}
    for label, cfg in page.cfgs:
        why = recipe.cache_blocker(cfg)
        if why and frozen_prefix(cfg, page.num_classes or 10):
            blocked.setdefault(why, []).append(base_label(label))
    for why, labels in blocked.items():
        who = ", ".join(dict.fromkeys(labels))
        st.caption(
            f"No feature cache for {who}: {why}, so its frozen part runs every step instead "
            "of once (with augment none or flip it is computed once and cached)."
        )


def frozen_prefix(cfg, num_classes: int) -> bool:
    """Returns True when some phase of cfg's plan leaves the stem frozen (what a feature
    cache would compute once)."""
    try:
        frame = plan_frame(form.to_json(cfg), num_classes)
    except Exception:  # noqa: BLE001 - the strategy's own message is shown beside it
        return False
    first = frame.groupby("phase", sort=False).head(1)
    return bool((~first["trainable"].astype(bool)).any())


LR_FINDER_STEPS = 100


def lr_finder_args(page: Page) -> dict | None:
    """Returns what the lr finder job tests (the first config of the form), or None when
    the form cannot run yet."""
    if not page.cfgs or page.data_info is None or page.errors:
        return None
    cfg = page.cfgs[0][1]
    config = {**cfg.to_dict(), "name": "", "group": None, "tune_lr": False}
    return {"config": config, "steps": LR_FINDER_STEPS, "runs_dir": str(root)}


def lr_finder_part(page: Page) -> None:
    """A learning-rate range test of the form's settings, in a background job like the
    estimate: progress with Cancel, then loss against lr with the suggestion to accept."""
    args = lr_finder_args(page)
    label = page.cfgs[0][0] if page.cfgs else ""
    with st.expander("Find a learning rate (range test)", expanded=False):
        if args is None:
            st.caption("Fix the problems above first: the range test trains these settings.")
            return
        st.caption(
            f"{LR_FINDER_STEPS} training steps of **{label}** on a copy of the model, the "
            "learning rate growing from 1e-7 until the loss blows up; nothing is saved as a "
            "run. A comparison tunes each strategy's rate by itself (Strategy section)."
        )
        job = jobs.find(root, "lr_find", args)
        if st.button("Run the range test", icon=":material/search:", key="lr_find"):
            job = jobs.start(root, "lr_find", args, message="starting (loading torch)", again=True)
        if job is None:
            return
        live = jobs.read(job).get("state") in jobs.LIVE
        st.fragment(lr_finder_view, run_every=1.0 if live else None)(job, live)


def _use_lr(value: float) -> None:
    state[F + "lr"] = float(value)


def lr_finder_view(job: Path, was_live: bool) -> None:
    """The range test's progress (with Cancel), then its curve and the suggestion."""
    status = jobs.read(job)
    live = status.get("state") in jobs.LIVE
    if live != was_live:
        st.rerun()
    if live:
        st.progress(status.get("progress") or 0.0, text=status.get("message") or "testing")
        st.button("Cancel the range test", key="lr_find_cancel", on_click=jobs.cancel, args=(job,))
        return
    if status.get("state") != "completed":
        st.warning(f"The range test {status.get('state')}: {status.get('message')}.")
        return
    curve = status.get("result") or {}
    st.plotly_chart(plots.lr_finder_chart(curve), key="lr_find_chart", width="stretch")
    suggested = curve.get("suggested_lr")
    if not suggested:
        return
    if not curve.get("loss_fell"):
        st.warning(
            "The loss barely fell before it blew up, so the suggestion is a guess: the "
            "features may not suit this data (try other **Weights** or a larger **Image "
            "size**). A comparison's own tuning trains at several rates instead."
        )
    st.caption(
        f"Suggested: {suggested:.3g}, where the smoothed loss falls fastest (the minimum "
        f"/ 10 rule would give {curve.get('min_loss_lr_over_10', 0):.3g})."
    )
    st.button(
        f"Use learning rate {suggested:.3g}",
        key="lr_find_use",
        on_click=_use_lr,
        args=(float(f"{suggested:.3g}"),),
        type="primary",
    )


# ---------------------------------------------------------------- 5. estimate and launch


def train_images(page: Page, cfg) -> int:
    return data_mod.split_sizes(page.data_info, cfg.val_fraction, cfg.test_fraction)["train"]


def estimate_args(page: Page) -> dict:
    """Returns what the estimate job measures: each config (without the names, which do
    not change its speed) and the number of classes."""
    configs = {
        base_label(label): {**cfg.to_dict(), "name": "", "group": None, "seed": 0}
        for label, cfg in page.cfgs
    }  # a strategy's seeds take the same time: measured once
    return {"configs": configs, "num_classes": page.num_classes}


def base_label(label: str) -> str:
    """Returns a comparison member's label without its seed: "full seed 1" -> "full"."""
    return label.rsplit(" seed ", 1)[0]


def estimate_part(page: Page) -> None:
    """Steps per epoch, and on request a measured time per epoch and memory per config: a
    background job, so the page stays usable (Launch too) while it measures."""
    first = page.cfgs[0][1]
    n_train = train_images(page, first)
    devices = max(1, first.devices)
    # each device trains its own equal share of the images (what is left over is not trained)
    batches = data_mod.steps_per_epoch(n_train // devices, max(1, first.batch_size))
    every = max(1, first.accumulate_steps)
    effective = first.batch_size * every * devices
    per_epoch = (
        f"{batches} steps per epoch"
        if every == 1
        else f"{batches} batches, {-(-batches // every)} optimizer steps of {every} batches "
        f"(effective batch {effective:,}) per epoch"
    )
    if devices > 1 and every == 1:
        per_epoch += f" (effective batch {effective:,})"
    shared = f" · {n_train // devices:,} per device" if devices > 1 else ""
    st.caption(
        f"{n_train:,} training images{shared} · batch {first.batch_size} → {per_epoch}. "
        "A few measured steps on this machine give the time per epoch and the memory."
    )
    args = estimate_args(page)
    job = jobs.find(root, "estimate", args)
    if st.button("Estimate time per epoch and memory", icon=":material/timer:", key="estimate"):
        job = jobs.start(root, "estimate", args, message="starting (loading torch)")
    if job is None:
        return
    live = jobs.read(job).get("state") in jobs.LIVE
    st.fragment(estimate_view, run_every=1.0 if live else None)(page, job, live, n_train)


def estimate_view(page: Page, job: Path, was_live: bool, n_train: int) -> None:
    """The estimate job's progress (with Cancel) while it measures, then what it found."""
    status = jobs.read(job)
    live = status.get("state") in jobs.LIVE
    if live != was_live:
        st.rerun()  # it finished: draw its result once, without refreshing
    if live:
        st.progress(status.get("progress") or 0.0, text=status.get("message") or "measuring")
        st.button("Cancel the estimate", key="estimate_cancel", on_click=jobs.cancel, args=(job,))
        return
    if status.get("state") != "completed":
        st.warning(f"The estimate {status.get('state')}: {status.get('message')}.")
        return
    lines, total, cached = [], [0.0, 0.0, 0.0], False
    all_images = sum(sum(c.values()) for c in page.data_info.counts.values())
    listed = set()
    for label, cfg in page.cfgs:
        m = (status.get("result") or {}).get(base_label(label))
        if m is None:
            continue
        steps, per_epoch = estimate.epoch_estimate(m["step_s"], n_train, cfg.batch_size)
        low, high = steps * m["step_s_min"], steps * m["step_s_max"]
        for k, seconds in enumerate((per_epoch, low, high)):
            total[k] += seconds * cfg.epochs
        cached = cached or m["feature_cache"]
        mem = m["peak_bytes"] + estimate.data_bytes(all_images, cfg.image_size)
        if base_label(label) in listed:
            continue  # another seed of a strategy already listed
        listed.add(base_label(label))
        lines.append(
            f"- **{base_label(label)}**: about {plots.fmt_duration(per_epoch)} per epoch "
            f"({steps} steps × {m['step_s']:.2f} s on {m['device']}; "
            f"{plots.fmt_duration(low)} to {plots.fmt_duration(high)} by the measured steps' "
            "spread), "
            f"{plots.fmt_duration(per_epoch * cfg.epochs)} for {plural(cfg.epochs, 'epoch')}; "
            f"memory about {plots.fmt_bytes(mem)} (model, optimizer and activations measured, "
            "plus the decoded images)"
        )
    st.markdown("\n".join(lines))
    if len(page.cfgs) > 1:
        st.caption(
            "The group trains one run at a time (set by the queue): about "
            f"{plots.fmt_duration(total[0])} in all ({plots.fmt_duration(total[1])} to "
            f"{plots.fmt_duration(total[2])}), plus data and weights preparation."
        )
    if any(cfg.tune_lr for _, cfg in page.cfgs):
        low, high = tuning.CANDIDATES, tuning.CANDIDATES + tuning.MAX_EXTENSIONS
        st.caption(
            f"Tuning the learning rate trains each run {low} to {high} more times first (a "
            f"trial is the run itself at another rate): about {plots.fmt_duration(total[0] * low)}"
            f" to {plots.fmt_duration(total[0] * high)} more. Switch off **Tune each "
            "strategy's learning rate** to compare at one rate."
        )
    if cached:
        st.caption(
            "A frozen backbone without augmentation has its features computed once and "
            "cached: epochs after the first are much faster than this estimate."
        )


def first_steps(page: Page, cfg) -> list[str]:
    """Returns what the first run of this launch does once before it trains (and later
    runs do not): pretraining builtin weights, downloading weights or data."""
    steps = []
    if page.weights_spec:
        kind, sentence = availability(page.weights_spec, cfg.model)
        if kind == "train":
            steps.append(sentence.replace("will be trained on first use", "are pretrained"))
        elif kind == "download":
            steps.append(sentence)
    if page.data_info is not None and page.data_info.needs_download:
        steps.append(f"{plots.data_name(cfg.data)} is downloaded (needs the network)")
    return steps


def launch_section(page: Page) -> None:
    """Section 5: messages no section showed, the estimate, and Launch."""
    with st.container(border=True):
        st.subheader("5 · Estimate and launch")
        for name in page.errors:
            if name not in page.displayed:  # no section shows it: here, then
                page.show(name)
        if page.cfgs and page.data_info is not None and not page.errors:
            estimate_part(page)
        labels = [label for label, _ in page.cfgs]
        what = (
            f"{len(labels)} runs as one group ({', '.join(labels)})" if len(labels) > 1 else "1 run"
        )
        if page.cfgs:
            c0 = page.cfgs[0][1]
            st.markdown(
                f"**Launch {what}**: {c0.model}, weights `{c0.weights}`, data "
                f"`{plots.data_name(c0.data)}`, {plural(c0.epochs, 'epoch')} at "
                f"{c0.image_size} px."
            )
            for step in first_steps(page, c0):
                st.caption(f"Before the first run trains, once: {step}.")
            if any(cfg.tune_lr for _, cfg in page.cfgs):
                st.caption(
                    "Before it trains, each run tunes its learning rate: a range test, then "
                    f"{tuning.CANDIDATES} to {tuning.CANDIDATES + tuning.MAX_EXTENSIONS} "
                    "trainings of itself at other rates, scored on the validation split."
                )
        if page.errors:
            names = ", ".join(f.replace("_", " ") for f in page.errors)
            st.caption(f"Launch is disabled until the problems above are fixed: {names}.")
        launch = st.button(
            "Launch",
            type="primary",
            icon=":material/rocket_launch:",
            key="launch",
            disabled=bool(page.errors) or not page.cfgs,
        )
        if launch:
            try:
                with st.status("Queueing…") as status_box:
                    dirs = runner.enqueue(
                        [c for _, c in page.cfgs], root, group=len(labels) > 1, owner=me.user
                    )
                    status_box.update(label=f"Queued {len(dirs)} run(s)", state="complete")
            except ConfigError as e:
                st.error("Not launched: " + "; ".join(f"{k}: {v}" for k, v in e.errors.items()))
            except store.RunError as e:  # a limit of this user's, or another user's upload
                st.error(f"Not launched: {e}.", icon=":material/block:")
            else:
                state["training_follow"] = True  # Training moves on to each run as it trains
                st.switch_page(PAGES["training"], query_params={"run": dirs[0].name})
        depth_launch(page)


def depth_launch(page: Page) -> None:
    """ "How much should I unfreeze?": one click queues last_n for k = 0 (the linear probe)
    up to every group but one, plus full, as one group with the form's settings."""
    try:
        groups = len(models.group_names(state[F + "model"]))
    except (KeyError, ValueError):  # the Model section says what is wrong
        return
    seeds = form.seeds_per_strategy(state)
    tuned = bool(state.get(F + "compare_tune", True))
    runs = (groups + 1) * seeds
    st.markdown("**Or ask how much to unfreeze**")
    st.caption(
        f"Queues last_n 0 (the linear probe) up to last_n {groups - 1}, then full: "
        f"{plural(runs, 'run')} ({plural(seeds, 'seed')} each"
        + (", each strategy's learning rate tuned" if tuned else ", one learning rate")
        + ") with the settings above. Compare then draws accuracy against the groups "
        "trained, with train time and memory, and names the cheapest depth within noise of "
        "the best."
    )
    blocking = [k for k in page.errors if k not in ("strategy", *STRATEGY_OPTIONS)]
    clicked = st.button(
        "How much should I unfreeze?",
        icon=":material/stacked_line_chart:",
        key="launch_depths",
        disabled=bool(blocking) or page.data_info is None,
    )
    if not clicked:
        return
    try:
        cfgs = form.depth_configs(
            state, page.weights_spec or "none", page.data_spec or "builtin:shapes", groups
        )
        for label, cfg in cfgs:
            errors = validate(form.to_json(cfg), str(root))
            if errors:
                raise ConfigError({f"{label}: {k}": v for k, v in errors.items()})
        with st.status("Queueing…") as status_box:
            dirs = runner.enqueue([c for _, c in cfgs], root, group=True, owner=me.user)
            status_box.update(label=f"Queued {len(dirs)} run(s)", state="complete")
    except (ConfigError, store.RunError) as e:
        detail = (
            "; ".join(f"{k}: {v}" for k, v in e.errors.items())
            if isinstance(e, ConfigError)
            else str(e)
        )
        st.error("Not launched: " + form.in_form_words(detail))
        return
    state["training_follow"] = True
    st.switch_page(PAGES["training"], query_params={"run": dirs[0].name})


# ---------------------------------------------------------------- the page

names = model_names()
page = Page(offline=form.offline_setting() or network_problem())
restore_form(page.offline, names)
clean_uploads()
page.weights_spec, page.weights_problem = form.weights_spec(state)
page.data_spec, page.data_problem = form.data_spec(state, roots)
for what in ("weights", "data"):  # another user's upload (a clone): not read, not shown
    foreign = store.access.foreign_upload(getattr(page, f"{what}_spec"), root, me.user)
    if foreign:
        setattr(page, f"{what}_spec", "")
        setattr(page, f"{what}_problem", foreign)

model = model_section(page, names)
data_section(page)
strategy_column = strategy_section(page)
collect_errors(page)
page.fill_slot("model")
with page.slots["weights"].container():
    weights_status(page, model)
if page.data_pending:
    page.displayed.add("data")  # the Data section shows its progress instead
else:
    page.fill_slot("data")
with strategy_column:
    for name in ("strategy", *(o.name for o in strategies.all_options())):
        page.show(name)
    trainable_maps(page)
settings_section(page)
form.save(home)
launch_section(page)
