"""The Export block of Training and Compare: a run's model as safetensors, TorchScript or
ONNX (finetune_core.export, the CLI's `export`), each file to download with its size.

Drawing it needs no torch: the files already exported are listed from the run folder; an
export (a click) loads the model in this process, which takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.common import viewer
from finetune_core import export, plots, store

FORMAT_LABELS = {
    "safetensors": "safetensors (torchvision)",
    "torchscript": "TorchScript",
    "onnx": "ONNX",
}


def can_export(run_dir: Path) -> bool:
    """Returns True when the run has best weights and has ended (what export needs)."""
    state = store.read_status(run_dir).get("state")
    return state in store.FINAL_STATES and (run_dir / "checkpoints" / "best.safetensors").is_file()


def best_run(run_dirs: list[Path]) -> str:
    """Returns the id of the most accurate run (by test accuracy when all have one, else
    by val accuracy; the first of equals)."""
    table = store.compare_runs(run_dirs)
    basis = "test_acc" if table["test_acc"].notna().all() else "best_val_acc"
    return str(table.sort_values(basis, ascending=False, kind="stable")["run_id"].iloc[0])


def export_one_of(root: Path, run_ids: list[str], labels: dict[str, str], key: str) -> None:
    """Export for one of several runs (Compare's): a picker of those that ended with best
    weights, the most accurate first chosen, then export_block."""
    ended = [r for r in run_ids if can_export(root / r)]
    if not ended:
        return
    best = best_run([root / r for r in ended])
    st.markdown("#### Export a model")
    run_id = st.selectbox(
        "Run to export",
        ended,
        index=ended.index(best),
        format_func=lambda r: labels.get(r, r),
        key=f"{key}_export_run",
        help="The most accurate of the runs compared is chosen first",
    )
    export_block(root / run_id, key, title=False)


def export_block(run_dir: Path, key: str, *, title: bool = True) -> None:
    """Export: a format, a button that writes RUN/export/model.<ext> (checked against the
    run's logits), and a download of each file written, with its size."""
    run_dir = Path(run_dir)
    if title:
        st.markdown("#### Export the model")
    if not can_export(run_dir):
        st.caption("The model can be exported once the run has ended with best weights.")
        return
    me = viewer()
    config = store.read_config(run_dir)
    if not me.may_act(config):  # an export writes into the run (export.check_allowed)
        if me.demo:
            st.caption("This is a read-only demo: models are not exported here.")
        else:
            owner = store.access.owner_of(config) or "nobody (made before sign-in)"
            st.caption(f"This run is {owner}'s: only its owner or an admin can export it.")
        return
    fmt = st.radio(
        "Format",
        list(export.FORMATS),
        format_func=FORMAT_LABELS.get,
        horizontal=True,
        key=f"{key}_format",
        help="; ".join(f"{f}: {what}" for f, (_, what) in export.FORMATS.items()),
    )
    missing = export.missing_packages(fmt)
    if missing:
        st.info(export.install_hint(missing) + ".", icon=":material/extension:")
    path = export.export_path(run_dir, fmt)
    current = export.is_current(run_dir, fmt)
    label = f"Export as {FORMAT_LABELS[fmt]}" if not current else "Export again"
    if st.button(label, key=f"{key}_export_{fmt}", disabled=bool(missing), icon=":material/save:"):
        with st.spinner(f"Exporting {run_dir.name} as {fmt} and checking it"):
            try:
                written = export.export(run_dir, fmt, actor=me.user)
                st.toast(f"Exported {written.name}")
            except Exception as e:  # noqa: BLE001 - ExportError, PredictError: said here
                st.error(f"Export failed: {e}")
        current = export.is_current(run_dir, fmt)
    if not current:
        return
    meta = export.export_dir(run_dir) / export.META_FILE
    left, right = st.columns(2)
    left.download_button(
        f"Download {path.name} ({plots.fmt_bytes(path.stat().st_size)})",
        lambda: path.read_bytes(),
        file_name=f"{run_dir.name}-{path.name}",
        mime="application/octet-stream",
        key=f"{key}_download_{fmt}",
        icon=":material/download:",
    )
    if meta.is_file():
        right.download_button(
            f"Download {meta.name} ({plots.fmt_bytes(meta.stat().st_size)})",
            meta.read_bytes(),
            file_name=f"{run_dir.name}-{meta.name}",
            mime="application/json",
            key=f"{key}_download_meta",
            help="Classes, image size, normalisation, model name and strategy",
        )
    st.caption(
        f"`{run_dir.name}/{export.EXPORT_DIR}/{path.name}`: checked on export, it gives the run's logits to within "
        f"{export.TOLERANCE:g} for a batch of 1 and of 5."
    )
