"""Predict: a finished run's model on new images. Pick a run (by default the best of the
newest group), upload images or a zip of them, and see each with its top classes and the
input the model saw (resized and cropped as the run's preprocessing made it), a table of
every prediction to download as CSV, and a message for each file that cannot be read.

?run=<id> selects the run. The page draws without torch; the model loads on the first
upload (finetune_core.predict, the CLI's `predict`), once per run and server process.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.common import (
    PAGES,
    labelled_picker,
    setup_page,
    share_column,
    viewer,
    warm_up,
)
from dashboard.exports import best_run
from finetune_core import plots, store, uploads

IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "zip"]
SHOWN = 48  # images drawn with their classes; the table lists every one
PER_ROW = 4
PROBLEMS_SHOWN = 20

root = setup_page("Predict")
st.title("Predict")

me = viewer()  # signed in on a shared server, or nobody (the local mode)
runs = me.visible_runs(store.list_runs(root))  # FINETUNE_HIDE_OTHERS_RUNS hides others'


def has_best_weights(path: str) -> bool:
    return (Path(path) / "checkpoints" / "best.safetensors").is_file()


if not runs.empty:  # ended with best weights: what predicting needs
    runs = runs[runs["state"].isin(store.FINAL_STATES) & runs["path"].map(has_best_weights)]
usable = runs
if usable.empty:
    st.info(
        "No finished run to predict with yet. Train one on **New run**; once it has ended "
        "with best weights, its model predicts new images here."
    )
    st.page_link(PAGES["new"], label="New run", icon=":material/rocket_launch:")
    st.stop()


def best_of_newest_group(usable) -> str:
    """Returns the run to show first: the most accurate of the newest group, else the
    newest run."""
    grouped = usable.dropna(subset=["group"])
    if grouped.empty:
        return str(usable["run_id"].iloc[0])
    members = usable[usable["group"] == grouped["group"].iloc[0]]
    return best_run([Path(p) for p in members["path"]])


ids = list(usable["run_id"])
wanted = st.query_params.get("run")
if wanted and st.session_state.get("_predict_query") != wanted:
    st.session_state["_predict_query"] = wanted
    try:
        found = store.resolve_run_id(wanted, root).name
    except store.RunError as e:
        found = None
        st.warning(f"{e}. Pick a run below.")
    if found is not None and found not in ids:
        st.warning(f"Run {found} has not ended with best weights; pick another run below.")
    elif found is not None:
        st.session_state["predict_run"] = found
if st.session_state.get("predict_run") not in ids:
    st.session_state["predict_run"] = best_of_newest_group(usable)
accuracy = {
    r.run_id: "" if r.best_val_acc != r.best_val_acc else f" · val {plots.fmt_pct(r.best_val_acc)}"
    for r in usable.itertuples()
}
labels = {
    r.run_id: f"{r.name or r.strategy} · {r.model}{accuracy[r.run_id]} · {r.run_id}"
    for r in usable.itertuples()
}
run_id = labelled_picker("Run", ids, labels, "predict_run")
run_dir = root / run_id
config = store.read_config(run_dir)
summary = store.read_summary(run_dir) or {}
classes = summary.get("classes") or []
st.caption(
    f"**{labels[run_id].split(' · ')[0]}** · {config.get('model')} · {len(classes)} classes "
    f"({', '.join(map(str, classes[:12]))}{', …' if len(classes) > 12 else ''}) · input "
    f"{config.get('image_size')} px · [Training view](Training?run={run_id})"
)


@st.cache_resource(max_entries=2, show_spinner="Loading the run's model…")
def run_model(path: str, stamp: float):
    """The run's model (finetune_core.load_model): read-only, shared by every session."""
    from finetune_core import predict  # torch: only once images are to be predicted

    return predict.load_model(path)


def model_for(run_dir: Path):
    best = run_dir / "checkpoints" / "best.safetensors"
    return run_model(str(run_dir), best.stat().st_mtime)


def files_of(uploaded) -> tuple[list[tuple[str, object]], list[str]]:
    """Returns ((name, bytes or path) of every image to predict, problems): a zip is kept
    by its content (finetune_core.uploads, as New run keeps one) and extracted safely."""
    from finetune_core import predict
    from finetune_core.data import DataError, extract_zip

    files, problems = [], []
    for up in uploaded:
        if not up.name.lower().endswith(".zip"):
            files.append((up.name, up.getvalue()))
            continue
        try:
            kept = uploads.save(root, up.name, up.getbuffer(), user=me.user)
            folder = extract_zip(kept, up.name)
            inside = predict.image_files([folder])
        except (DataError, predict.PredictError, store.access.NotAllowed, OSError) as e:
            problems.append(f"{up.name}: {e}")
            continue
        if not inside:
            problems.append(f"{up.name} holds no files")
        files += [(f"{up.name}/{Path(p).relative_to(folder)}", p) for _, p in inside]
    return files, problems


if me.demo:  # a read-only demo keeps no uploads: say so instead of a dead uploader
    st.info(
        "This is a read-only demo: runs can be browsed and compared, and images are not "
        "uploaded here. On your own machine, `python -m finetune_core predict RUN IMAGES` "
        "does what this page does.",
        icon=":material/visibility:",
    )
    warm_up()
    st.stop()

n_classes = max(len(classes), 1)
left, right, third = st.columns([3, 1, 1])
uploaded = left.file_uploader(
    "Images, or a zip of them",
    type=IMAGE_TYPES,
    accept_multiple_files=True,
    key="predict_files",
    help="JPEG, PNG, WebP, BMP, GIF, TIFF or PPM images (what training reads), or a .zip "
    "of them; each is resized and cropped as the run's training images were.",
)
top_k = right.number_input(
    "Top classes shown",
    min_value=1,
    max_value=n_classes,
    value=min(3, n_classes),
    step=1,
    key="predict_top_k",
)
tta_choices = ["none"] + ["flip"] * bool(config.get("hflip", True))
tta_choices += ["augment"] * (config.get("augment", "none") != "none")
tta = third.selectbox(
    "Test-time augmentation",
    tta_choices,
    key="predict_tta",
    help="flip: the mean of the softmax of each image and its mirror; augment: 0.25 x the "
    "image's + 0.75 x the mean of 4 views with the run's augmentation (as the run's --tta)",
)
if not uploaded:
    st.info("Upload one or more images (or a zip) to see what the model predicts.")
    warm_up()
    st.stop()

try:
    loaded = model_for(run_dir)
except Exception as e:  # noqa: BLE001 - PredictError, a damaged file: said, nothing else
    st.error(f"The model of run {run_id} cannot be loaded: {e}")
    st.stop()
key = (run_id, tuple(up.file_id for up in uploaded), int(top_k), tta)
kept = st.session_state.get("_predictions")
if not kept or kept["key"] != key:
    with st.spinner(f"Predicting {len(uploaded)} upload(s)"):
        files, problems = files_of(uploaded)
        found, unreadable = loaded.predict_files(files, int(top_k), tta=tta)
    kept = {"key": key, "found": found, "problems": problems + unreadable}
    st.session_state["_predictions"] = kept
found, problems = kept["found"], kept["problems"]

if problems:
    for message in problems[:PROBLEMS_SHOWN]:
        st.warning(message, icon=":material/broken_image:")
    if len(problems) > PROBLEMS_SHOWN:
        st.warning(f"… and {len(problems) - PROBLEMS_SHOWN} more files could not be read.")
if not found:
    st.error("None of the files could be read as an image; nothing to predict.")
    st.stop()

side = loaded.image_size
st.subheader(
    f"{len(found)} image{'s' if len(found) != 1 else ''} predicted"
    + (f" · {len(problems)} skipped" if problems else "")
)
st.caption(
    f"Each picture is the model's input as it saw it: {side} × {side} px, resized and cropped "
    "as the run's training images were (before normalisation)."
)
for start in range(0, min(len(found), SHOWN), PER_ROW):
    for column, p in zip(st.columns(PER_ROW), found[start : start + PER_ROW], strict=False):
        column.image(p.pixels, caption=p.file, width=min(4 * side, 192))
        cls, prob = p.top[0]
        column.markdown(f"**{cls}** {plots.fmt_pct(prob)}")
        if len(p.top) > 1:
            column.caption(" · ".join(f"{c} {plots.fmt_pct(q)}" for c, q in p.top[1:]))
if len(found) > SHOWN:
    st.caption(f"The first {SHOWN} images are drawn; the table lists all {len(found)}.")


def predictions_table(found):
    from finetune_core import predict  # loaded with the model already

    return predict.predictions_table(found)


table = predictions_table(found)
shown = table.copy()
for column in [c for c in table.columns if c.startswith("prob")]:
    shown[column] = 100 * table[column]
st.dataframe(
    shown,
    hide_index=True,
    width="stretch",
    column_config={
        c: share_column(c, width="small") for c in shown.columns if c.startswith("prob")
    },
)
st.download_button(
    "Download the predictions as CSV",
    table.to_csv(index=False).encode(),
    file_name=f"predictions-{run_id}.csv",
    mime="text/csv",
    key="predict_csv",
    icon=":material/download:",
    help="One row per image: file, pred, prob, pred2, prob2, … (probabilities 0-1), as "
    "`python -m finetune_core predict RUN IMAGES --csv FILE` writes it",
)
warm_up()  # drawn: New run's imports load in the background
