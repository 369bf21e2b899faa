"""New run: model, weights, data, strategy (with its trainable map), settings, estimate,
launch; one run or a group comparing strategies. Entries survive a refresh.

?clone=<run id> loads that run's settings into the form.
"""

from __future__ import annotations

import json
import math
import re
import socket
from pathlib import Path

import streamlit as st

from dashboard import estimate, form
from dashboard.common import PAGES, setup_page, show_errors
from finetune_core import config as config_mod
from finetune_core import data as data_mod
from finetune_core import models, plots, runner, store, strategies, weights
from finetune_core.config import ConfigError

F = form.PREFIX
root = setup_page("New run")
st.title("New run")
roots = form.data_roots()


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


@st.cache_data(ttl=30, show_spinner=False)
def availability(spec: str, model: str) -> tuple[str, str]:
    return weights.availability(spec, model)


@st.cache_data(ttl=60, show_spinner=False)
def inspect(spec: str):
    return data_mod.inspect_data(spec)


@st.cache_data(ttl=30, show_spinner=False)
def validate(cfg_json: str, runs_dir: str) -> dict[str, str]:
    cfg = config_mod.from_dict(json.loads(cfg_json))
    return config_mod.validate(cfg, runs_dir=runs_dir)


@st.cache_data(show_spinner=False)
def plan_frame(cfg_json: str, num_classes: int):
    cfg = config_mod.from_dict(json.loads(cfg_json))
    return strategies.plan_for(cfg, num_classes).to_frame()


@st.cache_data(show_spinner=False, max_entries=64)
def measured(key: str, cfg_json: str, num_classes: int) -> dict:
    return estimate.run_measurement(json.loads(cfg_json), num_classes)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)[:120] or "upload"


def save_upload(upload, folder: Path) -> Path:
    """Writes an uploaded file under the data folder; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _safe_name(upload.name)
    tmp = target.with_name(f".{target.name}.part")
    with open(tmp, "wb") as f:
        f.write(upload.getbuffer())
    tmp.replace(target)
    return target


# ---------------------------------------------------------------- form state

offline = network_problem()
names = model_names()
default_model = config_mod.RunConfig().model
first_choice = "builtin"
if not offline or availability("default", default_model)[0] == "cached":
    first_choice = "default"
form.restore(root, form.defaults(first_choice))

clone = st.query_params.get("clone")
if clone:
    try:
        source = store.resolve_run(clone, root)
        form.apply_config(store.read_config(source), roots)
        st.toast(f"Loaded the settings of run {source.name}")
    except store.RunError as e:
        st.error(f"Could not clone: {e}")
    del st.query_params["clone"]
if st.session_state.get(F + "model") not in names:
    st.session_state[F + "model"] = default_model if default_model in names else names[0]
_root, _sub = st.session_state.get(F + "data_root", ""), st.session_state.get(F + "data_sub", "")
if st.session_state.get(F + "data_choice") == "folder" and (
    not roots or (_root not in roots and (_root or _sub))  # a cloned or saved folder
):
    folder = st.session_state.get(F + "data_sub") or "a folder"
    st.warning(
        f"The data was `{folder}`, a folder this server may not read: only folders below "
        f"the data roots ({', '.join(roots) or 'none set'}) can be used. Add its parent to "
        "FINETUNE_DATA_ROOTS and restart the app, or choose other data below; the data is "
        "set to the built-in shapes for now.",
        icon=":material/folder_off:",
    )
    st.session_state[F + "data_choice"] = "builtin"

state = st.session_state
weights_spec, weights_problem = form.weights_spec(state)
data_spec, data_problem = form.data_spec(state, roots)

# ---------------------------------------------------------------- 1. model and weights

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
        if offline:
            st.info(
                f"**Offline:** {offline}, so ImageNet weights that are not cached cannot be had "
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
            up = st.file_uploader("Weights file", type=["safetensors", "pt", "pth"],
                                  key="up_weights",
                                  help=".pt/.pth are read with weights_only=True (no pickle code).")  # fmt: skip
            if up is not None:
                saved = save_upload(up, data_mod.data_dir() / "uploads" / "weights")
                if state.get(F + "weights_file") != str(saved):
                    state[F + "weights_file"] = str(saved)
                    st.rerun()
            if state.get(F + "weights_file"):
                st.caption(f"Using `{state[F + 'weights_file']}`")
        elif choice == "run":
            done = store.list_runs(root).query("state == 'completed'")
            options = list(done["run_id"])
            if not options:
                st.warning("No completed run yet to take weights from; choose another source.")
            else:
                if state.get(F + "weights_run") not in options:
                    state[F + "weights_run"] = options[0]
                st.selectbox("Run", options, key=F + "weights_run",
                             format_func=lambda r: f"{r} · " + " · ".join(
                                 str(v) for v in done.set_index("run_id").loc[r, ["model", "strategy"]]))  # fmt: skip
        if weights_spec:
            kind, sentence = availability(weights_spec, model)
            if kind == "download" and offline:
                target = weights.cache_file("default", model)
                st.error(
                    f"{sentence[0].upper()}{sentence[1:]}, but {offline}. Choose **builtin**, or "
                    f"download the file elsewhere and put it at `{target}`.",
                    icon=":material/wifi_off:",
                )
            elif kind == "unavailable":
                st.error(sentence)
            elif kind == "train":
                st.info(sentence[0].upper() + sentence[1:], icon=":material/model_training:")
            else:
                st.success(sentence[0].upper() + sentence[1:])
        elif weights_problem:
            st.warning(weights_problem)
        weights_slot = st.empty()  # filled with the weights' validation message further down

# ---------------------------------------------------------------- 2. data

with st.container(border=True):
    st.subheader("2 · Data")
    choices = [c for c in form.DATA_CHOICES if c != "folder" or roots]
    st.radio("Images", choices, key=F + "data_choice", format_func=form.DATA_CHOICES.get,
             horizontal=True, help="builtin:shapes is generated on this machine: no download.")  # fmt: skip
    if not roots:
        st.caption(
            "Folders on the server are off. To allow them, start the app with "
            "`FINETUNE_DATA_ROOTS=/path/one:/path/two`; folders below those roots can then "
            "be chosen here."
        )
    dchoice = state[F + "data_choice"]
    if dchoice == "zip":
        up = st.file_uploader("A .zip with one folder per class (or train/ and val/ folders)",
                              type=["zip"], key="up_zip")  # fmt: skip
        if up is not None:
            saved = save_upload(up, data_mod.data_dir() / "uploads")
            if state.get(F + "data_zip") != str(saved):
                state[F + "data_zip"] = str(saved)
                st.rerun()
        if state.get(F + "data_zip"):
            st.caption(f"Using `{state[F + 'data_zip']}` (saved in the data folder)")
    elif dchoice == "folder":
        c1, c2 = st.columns([1, 2])
        if state.get(F + "data_root") not in roots:
            state[F + "data_root"] = roots[0]
        c1.selectbox("Data root", roots, key=F + "data_root",
                     help="Set by FINETUNE_DATA_ROOTS when the app was started.")  # fmt: skip
        c2.text_input("Folder below it", key=F + "data_sub",
                      help="A path relative to the root, holding one folder per class.")  # fmt: skip
    elif dchoice == "torchvision":
        tv = list(data_mod.TORCHVISION)
        if state.get(F + "data_tv") not in tv:
            state[F + "data_tv"] = tv[0]
        st.selectbox("Dataset", tv, key=F + "data_tv",
                     help=f"Downloaded into {data_mod.data_dir() / 'torchvision'} on first use.")  # fmt: skip
    num_classes = None
    data_info = None
    if data_spec:
        try:
            with st.spinner(f"Reading {data_spec} (the built-in data is generated on first use)…"):
                data_info = inspect(data_spec)
            num_classes = len(data_info.classes)
        except data_mod.DataError as e:
            data_problem = str(e)
    if data_problem:
        st.error(f"**data**: {data_problem}", icon=":material/error:")
    if data_info is not None:
        total = sum(sum(c.values()) for c in data_info.counts.values())
        st.markdown(
            f"**{num_classes} classes**, {total:,} images"
            + (" (with its own train/val split)" if data_info.has_splits else "")
            + ": "
            + ", ".join(data_info.classes[:30])
            + (" …" if num_classes > 30 else "")
        )
        if data_info.needs_download:
            st.info(f"Not downloaded yet: the run downloads it into "
                    f"{data_mod.data_dir() / 'torchvision'} first (needs the network).")  # fmt: skip
        c1, c2 = st.columns([2, 3])
        c1.plotly_chart(plots.class_counts_chart(data_info.counts), key="class_counts",
                        width="stretch")  # fmt: skip
        with c2:
            images, captions = [], []
            for cls in data_info.classes[:12]:
                for path in data_info.samples.get(cls, [])[:4]:
                    images.append(path)
                    captions.append(cls)
            if images:
                st.caption("Samples")
                st.image(images, caption=captions, width=72)

# ---------------------------------------------------------------- 3. strategy

with st.container(border=True):
    st.subheader("3 · Strategy")
    st.toggle("Compare strategies (launch several as one group, same seed, split and epochs)",
              key=F + "compare")  # fmt: skip
    compare = state[F + "compare"]
    c1, c2 = st.columns([1, 2])
    with c1:
        if compare:
            if not isinstance(state.get(F + "compare_set"), list):
                state[F + "compare_set"] = list(form.DEFAULT_PRESETS)
            st.multiselect("Strategies", list(form.PRESETS), key=F + "compare_set",
                           help="full trains everything; last_n k trains the top k groups and "
                           "the head; linear_probe only the head.")  # fmt: skip
            presets = state[F + "compare_set"]
            shown = {p.partition(" ")[0] for p in presets}
        else:
            st.selectbox("Strategy", config_mod.STRATEGIES, key=F + "strategy",
                         help="What trains: full = every parameter; linear_probe = the head; "
                         "last_n = the top k groups + head; gradual = unfreeze from the top; "
                         "lp_ft = probe then full; bitfit = biases and norms + head.")  # fmt: skip
            shown = {state[F + "strategy"]}
        if "last_n" in shown and not compare:
            st.number_input("Unfreeze last (groups)", key=F + "unfreeze_last", step=1,
                            help=form.field_help("unfreeze_last"))  # fmt: skip
        if "gradual" in shown:
            st.number_input("Unfreeze every (epochs)", key=F + "unfreeze_every", step=1,
                            help=form.field_help("unfreeze_every"))  # fmt: skip
        if "lp_ft" in shown:
            st.number_input("Probe epochs", key=F + "probe_epochs", step=1,
                            help=form.field_help("probe_epochs"))  # fmt: skip
        with st.expander("Modifiers (layer-wise lr decay, L2-SP, frozen BatchNorm)"):
            st.number_input("Layer decay", key=F + "layer_decay", step=0.05, format="%.3f",
                            help=form.field_help("layer_decay"))  # fmt: skip
            st.number_input("L2-SP λ", key=F + "l2sp", step=0.001, format="%.4f",
                            help=form.field_help("l2sp"))  # fmt: skip
            st.checkbox("Freeze BatchNorm statistics", key=F + "freeze_bn",
                        help=form.field_help("freeze_bn"))  # fmt: skip

# The configs, validated: needed by the trainable map, the messages and Launch.
cfgs: list = []
errors: dict[str, str] = {}
try:
    cfgs = form.build_configs(state, weights_spec or "none", data_spec or "builtin:shapes")
except ConfigError as e:
    errors.update(e.errors)
if compare and not state.get(F + "compare_set"):
    errors["strategy"] = "pick at least one strategy to compare (two or more make a comparison)"
for label, cfg in cfgs:
    for field, message in validate(form.to_json(cfg), str(root)).items():
        if field in errors and errors[field] != message and len(cfgs) > 1:
            errors[field] += f"; {label}: {message}"
        elif field not in errors:
            errors[field] = f"{label}: {message}" if len(cfgs) > 1 and field in (
                "unfreeze_last", "probe_epochs") else message  # fmt: skip
if weights_problem:
    errors["weights"] = weights_problem
if data_problem:
    errors["data"] = data_problem

with c2:
    show_errors(errors, "strategy")
    show_errors(errors, "unfreeze_last")
    show_errors(errors, "unfreeze_every")
    show_errors(errors, "probe_epochs")
    show_errors(errors, "layer_decay")
    show_errors(errors, "l2sp")
    k = num_classes or 10
    if num_classes is None:
        st.caption("The data cannot be read yet, so the map assumes 10 classes.")
    tabs = st.tabs([label for label, _ in cfgs]) if len(cfgs) > 1 else [st.container()]
    for tab, (label, cfg) in zip(tabs, cfgs, strict=True):
        with tab:
            try:
                frame = plan_frame(form.to_json(cfg), k)
                st.plotly_chart(plots.trainable_map(frame), key=f"map_{label}", width="stretch")
            except Exception as e:  # noqa: BLE001 - a bad option shows its message, no map
                st.warning(f"No trainable map for {label}: {e}")

# ---------------------------------------------------------------- 4. settings

NUMBER_FIELDS = {
    # field: (label, step, format)
    "epochs": ("Epochs", 1, None),
    "batch_size": ("Batch size", 8, None),
    "lr": ("Learning rate (head)", 0.001, "%.5f"),
    "weight_decay": ("Weight decay", 1e-4, "%.5f"),
    "warmup_epochs": ("Warm-up epochs", 0.5, "%.2f"),
    "label_smoothing": ("Label smoothing", 0.05, "%.2f"),
    "clip_grad": ("Clip gradient norm", 0.5, "%.2f"),
    "early_stop": ("Early stop (epochs)", 1, None),
    "image_size": ("Image size (px)", 16, None),
    "val_fraction": ("Validation fraction", 0.05, "%.2f"),
    "test_fraction": ("Test fraction", 0.05, "%.2f"),
    "seed": ("Seed", 1, None),
}
CHOICE_FIELDS = {
    "optimizer": ("Optimizer", config_mod.OPTIMIZERS),
    "scheduler": ("Scheduler", config_mod.SCHEDULERS),
    "augment": ("Augmentation", config_mod.AUGMENTS),
    "balance": ("Class balance", config_mod.BALANCES),
    "device": ("Device", config_mod.DEVICES),
}
LAYOUT = [
    ["epochs", "batch_size", "lr", "optimizer", "weight_decay"],
    ["scheduler", "warmup_epochs", "label_smoothing", "clip_grad", "early_stop"],
    ["image_size", "augment", "balance", "val_fraction", "test_fraction"],
    ["seed", "device", "compile", "name"],
]

with st.container(border=True):
    st.subheader("4 · Training settings")
    cols = st.columns(len(LAYOUT))
    for col, names_in_col in zip(cols, LAYOUT, strict=True):
        with col:
            for name in names_in_col:
                help_text = form.field_help(name)
                if name in NUMBER_FIELDS:
                    label, step, fmt = NUMBER_FIELDS[name]
                    st.number_input(label, key=F + name, step=step, format=fmt, help=help_text)
                elif name in CHOICE_FIELDS:
                    label, options = CHOICE_FIELDS[name]
                    if state.get(F + name) not in options:
                        state[F + name] = getattr(config_mod.RunConfig(), name)
                    st.selectbox(label, options, key=F + name, help=help_text)
                elif name == "compile":
                    st.checkbox("torch.compile", key=F + name, help=help_text)
                else:
                    st.text_input("Name", key=F + name, max_chars=100, help=help_text)
                show_errors(errors, name)

form.save(root)
with model_slot.container():
    show_errors(errors, "model")
if errors.get("weights") and errors["weights"] != weights_problem:
    with weights_slot.container():
        show_errors(errors, "weights")

# ---------------------------------------------------------------- 5. estimate and launch

with st.container(border=True):
    st.subheader("5 · Estimate and launch")
    known = {"data", "weights", "model", "strategy", "unfreeze_last", "unfreeze_every",
             "probe_epochs", "layer_decay", "l2sp", *NUMBER_FIELDS, *CHOICE_FIELDS, "name",
             "compile", "freeze_bn"}  # fmt: skip
    for field, message in errors.items():
        if field not in known:
            st.error(f"**{field}**: {message}", icon=":material/error:")

    if cfgs and data_info is not None and not errors:
        first = cfgs[0][1]
        if data_info.has_splits:
            train_images = sum(data_info.counts.get("train", {}).values())
        else:
            all_images = sum(sum(c.values()) for c in data_info.counts.values())
            train_images = int(all_images * (1 - first.val_fraction - first.test_fraction))
        st.caption(
            f"{train_images:,} training images · batch {first.batch_size} → "
            f"{math.ceil(train_images / max(1, first.batch_size))} steps per epoch. "
            "A short measured step on this machine gives the time per epoch and the memory."
        )
        if st.button("Estimate time per epoch and memory", icon=":material/timer:", key="estimate"):
            st.session_state["_estimate_for"] = [form.to_json(c) for _, c in cfgs]
        if st.session_state.get("_estimate_for") == [form.to_json(c) for _, c in cfgs]:
            lines = []
            total_s = 0.0
            with st.status("Measuring a few training steps…", expanded=False) as status_box:
                for label, cfg in cfgs:
                    status_box.update(label=f"Measuring {label}…")
                    key = "|".join(str(x) for x in (cfg.model, cfg.image_size, cfg.batch_size,
                                   cfg.strategy, cfg.unfreeze_last, cfg.device, num_classes))  # fmt: skip
                    try:
                        m = measured(key, form.to_json(cfg), num_classes)
                    except Exception as e:  # noqa: BLE001 - say it, the form stays usable
                        lines.append(f"- **{label}**: could not measure ({e})")
                        continue
                    steps, per_epoch = estimate.epoch_estimate(m["step_s"], train_images,
                                                               cfg.batch_size)  # fmt: skip
                    total_s += per_epoch * cfg.epochs
                    mem = m["peak_bytes"] + estimate.data_bytes(
                        sum(sum(c.values()) for c in data_info.counts.values()), cfg.image_size
                    )
                    lines.append(
                        f"- **{label}**: about {plots.fmt_duration(per_epoch)} per epoch "
                        f"({steps} steps × {m['step_s']:.2f} s on {m['device']}), "
                        f"{plots.fmt_duration(per_epoch * cfg.epochs)} for {cfg.epochs} epochs; "
                        f"memory about {plots.fmt_bytes(mem)} (model, optimizer and activations "
                        "measured, plus the decoded images)"
                    )
                status_box.update(label="Measured", state="complete")
            st.markdown("\n".join(lines))
            if len(cfgs) > 1:
                st.caption(
                    f"The group trains one run at a time (set by the queue): about "
                    f"{plots.fmt_duration(total_s)} in all, plus data and weights preparation."
                )
            if any(c.strategy == "linear_probe" and c.augment == "none" for _, c in cfgs):
                st.caption("linear_probe without augmentation caches the backbone's features: "
                           "epochs after the first are much faster than this estimate.")  # fmt: skip

    what = (f"{len(cfgs)} runs as one group ({', '.join(lbl for lbl, _ in cfgs)})"
            if len(cfgs) > 1 else "1 run")  # fmt: skip
    if cfgs:
        c0 = cfgs[0][1]
        st.markdown(
            f"**Launch {what}**: {c0.model}, weights `{c0.weights}`, data `{c0.data}`, "
            f"{c0.epochs} epochs at {c0.image_size} px."
        )
    if errors:
        fields = ", ".join(f.replace("_", " ") for f in errors)
        st.caption(f"Launch is disabled until the problems above are fixed: {fields}.")
    if st.button(
        "Launch",
        type="primary",
        icon=":material/rocket_launch:",
        key="launch",
        disabled=bool(errors) or not cfgs,
    ):
        try:
            with st.status("Queueing…") as status_box:
                dirs = runner.enqueue([c for _, c in cfgs], root, group=len(cfgs) > 1)
                status_box.update(label=f"Queued {len(dirs)} run(s)", state="complete")
        except ConfigError as e:
            st.error("Not launched: " + "; ".join(f"{k}: {v}" for k, v in e.errors.items()))
        else:
            st.switch_page(PAGES["training"], query_params={"run": dirs[0].name})
