"""Export: a run's model as a file another program loads, into RUN/export/.

    model.safetensors  the merged state dict in torchvision's keys (load it into
                       torchvision.models.get_model(model, **torchvision_kwargs))
    model.pt           TorchScript (torch.jit.load)
    model.onnx         ONNX, one file (no external data), the batch axis dynamic
    model.json         classes, image size, normalisation, model name and strategy

Each export is checked before it counts: the file is loaded back (safetensors into a fresh
torchvision model, TorchScript with torch.jit.load, ONNX with onnxruntime) and must give
the run's logits for a batch of 1 and of 5, to TOLERANCE for ONNX; otherwise the export
fails with that message and leaves no file behind. Files are written atomically.

ONNX needs the optional packages of requirements-onnx.txt (onnx, onnxscript: torch's
exporter; onnxruntime: the check). Torch-free on import: the pages list formats and
exported files without loading torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from finetune_core.util.files import atomic_write, write_json_atomic

EXPORT_DIR = "export"
META_FILE = "model.json"
FORMATS = {  # format -> (file name, what it is, for help texts)
    "safetensors": ("model.safetensors", "the merged state dict for torchvision"),
    "torchscript": ("model.pt", "TorchScript, for torch.jit.load"),
    "onnx": ("model.onnx", "ONNX with a dynamic batch axis, for onnxruntime"),
}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_REQUIREMENTS = "requirements-onnx.txt"
TOLERANCE = 1e-4  # the largest difference of a logit an export may have from PyTorch's
CHECK_BATCHES = (1, 5)  # batch sizes each export is checked at


class ExportError(RuntimeError):
    """The export cannot be made or did not reproduce the model; the message says why."""


def export_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / EXPORT_DIR


def export_path(run_dir: str | os.PathLike, fmt: str) -> Path:
    """Returns where the export of a format goes (RUN/export/model.<ext>)."""
    return export_dir(run_dir) / FORMATS[check_format(fmt)][0]


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def missing_packages(fmt: str) -> list[str]:
    """Returns the optional packages the format needs that are not installed (none: [])."""
    if check_format(fmt) != "onnx":
        return []
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def install_hint(missing: list[str]) -> str:
    """Returns how to install what an ONNX export needs, in a sentence."""
    return (
        f"ONNX export needs {', '.join(ONNX_PACKAGES)} ({', '.join(missing)} not installed "
        f"here): pip install -r {ONNX_REQUIREMENTS} (from the repository), then try again"
    )


def exported(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Returns {format: file} of the exports a run folder already has, newest written last."""
    found = {fmt: export_path(run_dir, fmt) for fmt in FORMATS}
    return {fmt: path for fmt, path in found.items() if path.is_file()}


def is_current(run_dir: str | os.PathLike, fmt: str) -> bool:
    """Returns True when the format's export exists and is newer than the best weights."""
    path = export_path(run_dir, fmt)
    best = Path(run_dir) / "checkpoints" / "best.safetensors"
    try:
        return path.stat().st_mtime >= best.stat().st_mtime
    except OSError:
        return False


def export(
    run_dir: str | os.PathLike, fmt: str, *, progress=None, actor: str | None = None
) -> Path:
    """Writes the run's model in a format into RUN/export/ (with model.json), checks that
    it gives the run's logits, and returns the file's absolute path. Raises ExportError
    (missing packages, a failed check: the file is not written), predict.PredictError
    (the run cannot be used) and store.access.NotAllowed (on a shared server, another user's run
    or the read-only demo: an export writes into the run, which only its owner or an admin
    may change)."""
    check_format(fmt)
    check_allowed(run_dir, actor)
    missing = missing_packages(fmt)
    if missing:
        raise ExportError(install_hint(missing))
    from finetune_core import predict  # torch and the engine: only when exporting

    say = progress or (lambda message: None)
    say("loading the run's model")
    loaded = predict.load_model(Path(run_dir))
    folder = export_dir(loaded.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / FORMATS[fmt][0]).resolve()
    meta = metadata(loaded)
    write, reload, what = _FORMATS[fmt]
    say(f"writing {path.name}")
    started = time.perf_counter()

    def write_checked(tmp: Path) -> float:
        write(loaded, tmp, meta)
        # safetensors writes its file 0600; an export is read as the run's other files are
        tmp.chmod(stat.S_IMODE((loaded.run_dir / "config.json").stat().st_mode))
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith(tmp.name + ".")]
        if leftovers:  # external data beside the file: not the one file promised
            raise ExportError(f"the export wrote {', '.join(leftovers)} beside {path.name}")
        return _compare(loaded, reload(tmp, loaded), what)

    try:
        diff = atomic_write(path, write_checked, fsync=True)
    finally:
        for stray in folder.glob(f".{path.name}.*"):  # what the exporter left beside its file
            stray.unlink(missing_ok=True)
    write_json_atomic(folder / META_FILE, meta)
    say(
        f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB in "
        f"{time.perf_counter() - started:.1f} s; its logits differ from PyTorch's by at most "
        f"{diff:.2g}"
    )
    return path


def metadata(loaded) -> dict[str, Any]:
    """Returns model.json: what using an export needs beside its weights."""
    from finetune_core import models

    meta = loaded.describe()
    meta["torchvision_kwargs"] = models.torchvision_kwargs(
        loaded.model_name, loaded.image_size, len(loaded.classes)
    )
    meta["files"] = {fmt: name for fmt, (name, _) in FORMATS.items()}
    return meta


def check_allowed(run_dir: str | os.PathLike, actor: str | None) -> None:
    """Raises store.access.NotAllowed when actor may not export the run (store.access's rule)."""
    from finetune_core import store

    run_dir = Path(run_dir)
    config = store.read_config(run_dir) if (run_dir / "config.json").is_file() else {}
    store.access.check_owner(config, run_dir.name, actor, "export")


def check_inputs(image_size: int) -> list:
    """Returns the inputs each export is checked on: a batch of each CHECK_BATCHES size
    (normal noise, seeded: the same every time)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, image_size, image_size, generator=g) for n in CHECK_BATCHES]


def _compare(loaded, run, what: str) -> float:
    """Returns the largest logit difference of run(x) from the model's over the check
    batches; ExportError when it exceeds TOLERANCE or a batch's shape comes back wrong."""
    import numpy as np

    worst = 0.0
    for x in check_inputs(loaded.image_size):
        want = loaded.logits(x).numpy()
        try:
            got = np.asarray(run(x))
        except Exception as e:  # noqa: BLE001 - e.g. a batch size the export does not take
            raise ExportError(
                f"{what} fails on a batch of {len(x)} ({type(e).__name__}: {str(e)[:300]})"
            ) from None
        if got.shape != want.shape:
            raise ExportError(
                f"{what} gave logits of shape {tuple(got.shape)} for a batch of {len(x)}, "
                f"PyTorch {tuple(want.shape)}: the export does not take that batch size"
            )
        diff = float(np.abs(got.astype(np.float64) - want).max())
        worst = max(worst, diff)
        if not diff <= TOLERANCE:
            raise ExportError(
                f"{what} does not reproduce the model: for a batch of {len(x)} its logits "
                f"differ from PyTorch's by up to {diff:.3g}, more than {TOLERANCE:g}"
            )
    return worst


# --- the formats: write(loaded, path, meta), reload(path, loaded) -> run(x) ------------------


def _write_safetensors(loaded, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    info = {"model": loaded.model_name, "model_json": json.dumps(meta, sort_keys=True)}
    save_file(state, str(path), metadata=info)


def _reload_safetensors(path: Path, loaded):
    """torchvision's own model, built as model.json says, with the file's weights."""
    import torch
    import torchvision
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["model_json"])
    fresh = torchvision.models.get_model(meta["model"], weights=None, **meta["torchvision_kwargs"])
    try:
        fresh.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ExportError(
            f"the run's weights are not torchvision's {loaded.model_name} ({str(e)[:300]}); a "
            "vpt run keeps prompt tokens torchvision's model has no place for: export it as "
            "torchscript or onnx instead"
        ) from None
    fresh.eval()

    def run(x):
        with torch.inference_mode():
            return fresh(x).numpy()

    return run


@contextlib.contextmanager
def _torchscript_asked():
    """torch 2.14 deprecates TorchScript (FutureWarning on every call); the user asked for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def _write_torchscript(loaded, path: Path, meta: dict) -> None:
    import torch

    example = check_inputs(loaded.image_size)[-1]
    with torch.no_grad(), _torchscript_asked():
        traced = torch.jit.trace(loaded.model, example, check_trace=False)
        extra = {"model.json": json.dumps(meta, sort_keys=True)}
        torch.jit.save(traced, str(path), _extra_files=extra)


def _reload_torchscript(path: Path, loaded):
    import torch

    with _torchscript_asked():
        reloaded = torch.jit.load(str(path), map_location="cpu")

    def run(x):
        with torch.no_grad():
            return reloaded(x).numpy()

    return run


def _write_onnx(loaded, path: Path, meta: dict) -> None:
    import onnx
    import torch

    example = check_inputs(loaded.image_size)[-1]
    batch = torch.export.Dim("batch", min=1)
    try:
        # the exporter reports its steps on stdout, which is the CLI's result channel
        with contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(
                loaded.model,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                external_data=False,  # one file, the weights inside (a model under 2 GB)
            )
    except Exception as e:  # noqa: BLE001 - the exporter's many failures, said once
        raise ExportError(
            f"torch.onnx could not export {loaded.model_name} ({type(e).__name__}: "
            f"{str(e)[:400]}); export it as torchscript or safetensors instead"
        ) from None
    model = onnx.load(str(path))
    if model.graph.input[0].type.tensor_type.shape.dim[0].dim_value > 0:  # not a named axis
        raise ExportError(
            "the ONNX export fixed the batch size (pytorch/pytorch#157621); export it as "
            "torchscript instead"
        )
    for key, value in (("classes", json.dumps(meta["classes"])), ("model_json", json.dumps(meta))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _reload_onnx(path: Path, loaded):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x):
        return session.run(["logits"], {"input": x.numpy()})[0]

    return run


# format -> (write, reload, what it is called in messages)
_FORMATS = {
    "safetensors": (_write_safetensors, _reload_safetensors, "the safetensors export"),
    "torchscript": (_write_torchscript, _reload_torchscript, "the TorchScript export"),
    "onnx": (_write_onnx, _reload_onnx, "the ONNX export (onnxruntime)"),
}
