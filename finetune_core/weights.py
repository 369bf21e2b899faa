"""Weight sources: torchvision download/cache, builtin (offline stand-in), local file, a run's best.

Every source returns a state dict in torchvision's own layout for the model (the layout
`models.create_model(backbone_state=...)` takes): torchvision's ImageNet file as it is,
a local file or a run's checkpoint checked key by key against the model, with the head
dropped when its class count differs, and `builtin` (a backbone pretrained on the
built-in source task, trained once through the engine and cached next to torchvision's
downloads). Nothing falls back silently: when weights cannot be had, WeightsError says
what failed, where the file would have to be, and which other sources exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import socket
import threading
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

SOURCES_HELP = (
    "builtin (offline stand-in: a backbone pretrained on the built-in source task), "
    "a local file (PATH.safetensors, .pt or .pth), run:RUN_ID (an earlier run's best weights) "
    "or none (random initialisation)"
)
FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")  # GoogLeNet's and Inception v3's aux heads
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel and torch.compile wrappers
NETWORK_TIMEOUT_S = 10.0

# builtin: the recipe of the offline stand-in for ImageNet weights. Bump RECIPE_VERSION
# whenever the training code changes what the weights would be; the cache file name
# carries a hash of the recipe so caches of different recipes never mix.
RECIPE_VERSION = 1
BUILTIN_SOURCE = "builtin:shapes-source"
BUILTIN_IMAGE_SIZE = 64
# Measured on 2 shared CPU cores (ResNet-18, 64 px, source task v2, 2,700 training images):
# 2 epochs take about 2 min and reach ~32 % source val accuracy (12 classes); a linear probe
# on builtin:shapes then scores 70 % against 57 % from random init (3 epochs at lr 0.02:
# 73 %, but 50 % longer).
BUILTIN_EPOCHS = 2
BUILTIN_RECIPE = {
    "optimizer": "sgd",
    "lr": 0.03,
    "weight_decay": 5e-4,
    "batch_size": 64,
    "scheduler": "cosine",
    "warmup_epochs": 0.0,
    "augment": "flip",
    "label_smoothing": 0.0,
    "val_fraction": 0.1,
    "seed": 0,
}
BUILTIN_EPOCHS_ENV = "FINETUNE_BUILTIN_EPOCHS"
BUILTIN_STEPS_ENV = "FINETUNE_BUILTIN_MAX_STEPS"  # a cheapness knob for tests: stop after N steps


class WeightsError(RuntimeError):
    """Weights cannot be had; the message says what failed and what to do."""


# ---------------------------------------------------------------------------- spec parsing


def _kind(spec: str) -> str:
    """Returns "default", "none", "builtin", "run" or "file" for a weights spec."""
    if spec in ("default", "none", "builtin"):
        return spec
    if spec.startswith("run:"):
        return "run"
    return "file"


def _spec_problem(spec) -> str | None:
    if not isinstance(spec, str) or not spec.strip():
        return f"weights must be default, {SOURCES_HELP}"
    if spec.startswith("run:") and not spec[4:].strip():
        return "run: needs a run id, e.g. run:20250101-120000-a1b2c3 (see `python -m finetune_core list`)"
    return None


# ---------------------------------------------------------------------------- model layout


@lru_cache(maxsize=32)
def _layout(model: str, image_size: int | None) -> tuple[dict[str, tuple[int, ...]], str]:
    """Returns ({key: shape} of the model's state dict, head module path), built on meta."""
    from finetune_core import models

    kwargs = {} if image_size is None else {"image_size": image_size}
    parts = models.create_model(model, 2, device="meta", **kwargs)
    shapes = {k: tuple(v.shape) for k, v in parts.model.state_dict().items()}
    return shapes, parts.head


def _is_head(key: str, head: str) -> bool:
    return key.startswith(head + ".")


def _is_aux(key: str) -> bool:
    return key.startswith(AUX_PREFIXES)


def _head_classes(state: dict, head: str) -> int | None:
    """Returns the class count of the head in `state` (rows of its weight), or None."""
    w = state.get(f"{head}.weight")
    return int(w.shape[0]) if w is not None and len(w.shape) >= 1 else None


def _mismatches(state: dict, model: str, image_size: int | None = None) -> list[str]:
    """Returns what keeps `state` from loading into `model`'s backbone (empty when it fits).

    Head keys may have any shape (the head is replaced for K classes); aux-head keys and
    missing BatchNorm `num_batches_tracked` counters are ignored like create_model does.
    """
    expected, head = _layout(model, image_size)
    missing = [
        k
        for k in expected
        if k not in state and not _is_head(k, head) and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in expected and not _is_aux(k)]
    shapes = [
        f"{k} is {list(tuple(state[k].shape))} in the file but {list(expected[k])} in {model}"
        for k in state
        if k in expected and not _is_head(k, head) and tuple(state[k].shape) != expected[k]
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("other shapes", shapes),
    ):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    return problems


def _fit_classes(state: dict, model: str, num_classes: int | None, image_size=None) -> dict:
    """Returns `state` with the head dropped unless it already has num_classes rows, and
    BatchNorm counters that older files lack filled in (create_model wants every key)."""
    expected, head = _layout(model, image_size)
    if num_classes is None or _head_classes(state, head) != num_classes:
        state = {k: v for k, v in state.items() if not _is_head(k, head)}
    return _with_bn_counters(state, expected, head)


def _with_bn_counters(state: dict, expected: dict, head: str) -> dict:
    missing = [
        k
        for k in expected
        if k.endswith("num_batches_tracked") and k not in state and not _is_head(k, head)
    ]
    if not missing:
        return state
    return {**state, **{k: torch.tensor(0, dtype=torch.long) for k in missing}}


# ---------------------------------------------------------------------------- reading files


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    """Returns a flat {name: tensor} state dict from a loaded object, unwrapping common forms."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(
            f"{source} does not hold a state dict (got {type(obj).__name__}); save one with "
            "torch.save(model.state_dict(), PATH) or safetensors.torch.save_file."
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{source} is not a plain state dict: the entries {', '.join(map(str, bad[:3]))} "
            "are not tensors; save one with torch.save(model.state_dict(), PATH)."
        )
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _read_file(path: Path, *, lazy: bool = False) -> dict:
    """Returns the state dict in a weights file; lazy=True reads safetensors headers only and
    memory-maps pickles (for cheap checks). Raises WeightsError naming the file."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise WeightsError(
            f"{path} is not a weights file this tool reads: use .safetensors, .pt or .pth "
            f"(or choose default, {SOURCES_HELP})."
        )
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            if lazy:  # shapes only, as meta tensors
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    return {
                        k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()
                    }
            from safetensors.torch import load_file

            return _unwrap(load_file(str(path), device="cpu"), str(path))
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(
                f"{path} is not a readable safetensors file ({_first_line(e)}); "
                f"check the file, or choose default, {SOURCES_HELP}."
            ) from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy or None)
        except RuntimeError as e:
            if not lazy or "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "global" in reason.lower():
            raise WeightsError(
                f"{path} was refused: it holds Python objects other than tensors ({reason}), and "
                ".pt/.pth files are only loaded with torch.load(weights_only=True), which never "
                "runs code from the file. Save only the state dict "
                "(torch.save(model.state_dict(), PATH)) or convert it to .safetensors."
            ) from None
        raise WeightsError(
            f"{path} is not a PyTorch weights file ({reason}); check the file, "
            f"or choose default, {SOURCES_HELP}."
        ) from None
    except Exception as e:
        raise WeightsError(
            f"{path} could not be read as a PyTorch weights file ({_first_line(e)}); "
            f"check the file, or choose default, {SOURCES_HELP}."
        ) from None
    return _unwrap(obj, str(path))


def _unpickling_reason(e: BaseException) -> str:
    """Returns the useful part of torch.load(weights_only=True)'s long refusal message."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n|$)", str(e))
    return m.group(1).strip() if m else _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# ---------------------------------------------------------------------------- runs


def _runs_root(runs_dir) -> Path:
    if runs_dir is not None:
        return Path(runs_dir)
    return Path(os.environ.get("FINETUNE_RUNS_DIR") or "runs")


def _resolve_run(ref: str, runs_dir) -> Path:
    """Returns the run directory for an id, a unique id prefix or a path."""
    root = _runs_root(runs_dir)
    try:
        from finetune_core import store

        resolve = store.resolve_run
    except (ImportError, AttributeError):
        resolve = None
    if resolve is not None:
        try:
            return Path(resolve(ref, root))
        except Exception as e:
            raise WeightsError(f"run:{ref}: {_first_line(e)}") from None
    path = Path(ref)
    if (path / "config.json").is_file():
        return path
    if (root / ref).is_dir():
        return root / ref
    found = sorted(p for p in root.glob(f"{ref}*") if p.is_dir()) if root.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:5])
        raise WeightsError(
            f"run:{ref} is ambiguous in {root.resolve()}: {names}; give more of the id."
        )
    raise WeightsError(
        f"run:{ref}: no such run in {root.resolve()} (see `python -m finetune_core list`; "
        "--runs-dir or FINETUNE_RUNS_DIR choose another runs folder)."
    )


def _run_source(ref: str, model: str, runs_dir) -> tuple[Path, int | None]:
    """Returns (best checkpoint path, the run's image size) after checking the run's model."""
    run_dir = _resolve_run(ref, runs_dir)
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(
            f"run:{ref}: cannot read {run_dir / 'config.json'} ({_first_line(e)})"
        ) from None
    if cfg.get("model") != model:
        raise WeightsError(
            f"run:{ref} trained {cfg.get('model')!r}, not {model!r}: its weights do not fit. "
            f"Choose --model {cfg.get('model')} or other weights: default, {SOURCES_HELP}."
        )
    best = run_dir / "checkpoints" / "best.safetensors"
    if not best.is_file():
        raise WeightsError(
            f"run:{ref} has no best checkpoint yet ({best} is missing): it has not finished an "
            "epoch. Wait for it, or choose other weights."
        )
    size = cfg.get("image_size")
    return best, size if isinstance(size, int) else None


# ---------------------------------------------------------------------------- default (torchvision)


def _tv_weights(model: str):
    """Returns torchvision's DEFAULT weights enum entry for model; raises WeightsError."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(model).DEFAULT
    except Exception:
        raise WeightsError(
            f"torchvision has no pretrained weights for {model!r}; choose {SOURCES_HELP}."
        ) from None


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _file_mib(w) -> float | None:
    size = w.meta.get("_file_size")
    return float(size) if size else None


def _network_problem(url: str) -> str | None:
    """Returns why url's host cannot be reached (bounded wait), or None when it may be.

    torch.hub's download has no timeout; without this a machine whose firewall drops
    packets would hang for minutes before saying it is offline.
    """
    if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return None  # the proxy decides; let urllib try
    parts = urlparse(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    result: dict[str, BaseException] = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S).close()
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(NETWORK_TIMEOUT_S + 1)
    if thread.is_alive():
        return f"no answer from {host} within {NETWORK_TIMEOUT_S:.0f} s"
    if "error" in result:
        return f"cannot reach {host}: {_first_line(result['error'])}"
    return None


def _offline_message(model: str, w, target: Path, reason: str) -> str:
    return (
        f"could not download the ImageNet weights for {model} ({reason}; no network?). "
        f"To use them offline, download {w.url} on another machine and put it at {target} "
        f"(folder {target.parent}, file name {target.name}; TORCH_HOME moves the folder). "
        f"Or choose other weights: {SOURCES_HELP}."
    )


@contextlib.contextmanager
def _watch_download(target: Path, total_bytes: float | None, progress):
    """Reports the growing `<target>.*.partial` file torch.hub downloads into as progress."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def watch():
        while not stop.wait(0.5):
            partial = list(target.parent.glob(target.name + ".*.partial"))
            if not partial:
                continue
            with contextlib.suppress(OSError):
                done = max(p.stat().st_size for p in partial)
                frac = min(done / total_bytes, 1.0) if total_bytes else None
                progress("weights", frac, f"downloading {target.name}: {done / 2**20:.1f} MB")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)


def _load_default(model: str, progress) -> dict[str, torch.Tensor]:
    w = _tv_weights(model)
    target = _hub_checkpoints() / os.path.basename(urlparse(w.url).path)
    if not target.exists():
        reason = _network_problem(w.url)
        if reason:
            raise WeightsError(_offline_message(model, w, target, reason))
        mib = _file_mib(w)
        if progress:
            size = f"{mib:.1f} MB " if mib else ""
            progress("weights", 0.0, f"downloading {size}ImageNet weights for {model} to {target}")
        try:
            with _watch_download(target, mib * 2**20 if mib else None, progress):
                state = w.get_state_dict(
                    progress=progress is None, check_hash=True, weights_only=True
                )
        except Exception as e:
            if target.exists():  # downloaded, then unreadable
                raise WeightsError(_unreadable_cache(model, target, e)) from None
            if isinstance(e, RuntimeError) and "hash" in str(e):
                raise WeightsError(
                    f"the downloaded ImageNet weights for {model} were corrupt ({_first_line(e)}); "
                    f"try again, or put {w.url} at {target} yourself, or choose {SOURCES_HELP}."
                ) from None
            raise WeightsError(_offline_message(model, w, target, _first_line(e))) from None
        if progress:
            progress("weights", 1.0, f"ImageNet weights for {model} downloaded to {target}")
        return _unwrap(state, str(target))
    try:
        state = w.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:
        raise WeightsError(_unreadable_cache(model, target, e)) from None
    return _unwrap(state, str(target))


def _with_layout(state: dict, model: str) -> dict:
    expected, head = _layout(model, None)
    return _with_bn_counters(state, expected, head)


def _unreadable_cache(model: str, target: Path, e: BaseException) -> str:
    reason = _unpickling_reason(e) if isinstance(e, pickle.UnpicklingError) else _first_line(e)
    return (
        f"the cached ImageNet weights for {model} at {target} cannot be read ({reason}); "
        f"delete that file to download it again, or choose other weights: {SOURCES_HELP}."
    )


# ---------------------------------------------------------------------------- builtin


def _builtin_image_size(model: str) -> int:
    """Returns the pretraining size: 64 px, or what the architecture needs with weights."""
    try:
        from finetune_core import models

        spec = models.input_spec(model)
        return spec.pretrained_size or max(BUILTIN_IMAGE_SIZE, spec.min_size)
    except Exception:
        return BUILTIN_IMAGE_SIZE


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise WeightsError(f"{name} must be a whole number, got {value!r}") from None
    if n < 1:
        raise WeightsError(f"{name} must be at least 1, got {n}")
    return n


def builtin_recipe(model: str) -> dict:
    """Returns the settings the builtin weights of `model` are trained with (hashed into the
    cache file name)."""
    recipe = dict(BUILTIN_RECIPE)
    recipe.update(
        version=RECIPE_VERSION,
        data=BUILTIN_SOURCE,
        model=model,
        image_size=_builtin_image_size(model),
        epochs=_env_int(BUILTIN_EPOCHS_ENV, BUILTIN_EPOCHS),
    )
    try:  # a new drawing of the source task means new weights
        from finetune_core import shapes

        recipe["source_version"] = shapes.VERSION
    except (ImportError, AttributeError):
        pass
    max_steps = _env_int(BUILTIN_STEPS_ENV, None)
    if max_steps:
        recipe["max_steps"] = max_steps
    return recipe


def _recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def _builtin_file(model: str) -> Path:
    recipe = builtin_recipe(model)
    return _hub_checkpoints() / f"finetune_builtin_{model}_{_recipe_hash(recipe)}.safetensors"


_CPU_GFLOPS: float | None = None
# Fraction of the matmul rate a conv net's training step reaches on a CPU (fitted on ResNet-18
# at 64 px); and the source task's training images when the data module cannot say.
_CONV_EFFICIENCY = 0.15
_SOURCE_IMAGES_GUESS = 2000


def _cpu_gflops() -> float:
    """Returns this CPU's fp32 matmul rate in GFLOP/s: the best of short bursts with pauses
    between them (so that load from other processes does not count), measured once (~0.25 s)."""
    global _CPU_GFLOPS
    if _CPU_GFLOPS is None:
        a = torch.randn(256, 256)
        a @ a
        best = 0.0
        for _ in range(15):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.01:
                a @ a
                n += 1
            best = max(best, 2 * 256**3 * n / (time.perf_counter() - t0) / 1e9)
            time.sleep(0.005)
        _CPU_GFLOPS = best
    return _CPU_GFLOPS


def _source_train_images(recipe: dict) -> int:
    """Returns how many training images the source task has (from its definition: cheap)."""
    try:
        from finetune_core import shapes

        classes, per_class, _ = shapes.DATASETS[recipe["data"].partition(":")[2]]
        return max(1, int(len(classes) * per_class * (1 - recipe["val_fraction"])))
    except Exception:
        return _SOURCE_IMAGES_GUESS


def estimate_builtin_seconds(model: str) -> float:
    """Returns a rough estimate of the seconds pretraining builtin weights takes on the CPU."""
    recipe = builtin_recipe(model)
    w = _tv_weights(model)
    gflops_224 = float(w.meta.get("_ops") or w.meta.get("num_params", 1e7) * 2e-9 * 50)
    eval_size = (w.transforms().crop_size or [224])[0]
    per_image = gflops_224 * (recipe["image_size"] / eval_size) ** 2 * 3  # forward + backward
    images = _source_train_images(recipe) * recipe["epochs"]
    if recipe.get("max_steps"):
        images = min(images, recipe["max_steps"] * recipe["batch_size"])
    return per_image * images / (_cpu_gflops() * _CONV_EFFICIENCY) + 5  # + data and setup


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(5, round(seconds / 5) * 5):.0f} s"
    if seconds < 5400:
        return f"{round(seconds / 60):.0f} min"
    return f"{seconds / 3600:.1f} h"


def _file_lock(path: Path, on_wait=None):
    """Returns a context manager holding an exclusive lock on `path` (waits for it)."""

    @contextlib.contextmanager
    def lock():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl
            except ImportError:  # Windows
                import msvcrt

                def try_lock():
                    try:
                        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                        return True
                    except OSError:
                        return False
            else:

                def try_lock():
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        return True
                    except BlockingIOError:
                        return False

            waited = False
            while not try_lock():
                if on_wait and not waited:
                    on_wait()
                waited = True
                time.sleep(0.5)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    return lock()


@contextlib.contextmanager
def _rng_kept():
    """Restores every global RNG afterwards, so that training builtin weights in the middle of
    another run's setup leaves that run exactly as it would be with the weights cached."""
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:
        np, np_state = None, None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


def _train_builtin(model: str, target: Path, progress) -> None:
    """Pretrains `model` on the built-in source task through the engine and caches its backbone."""
    from safetensors.torch import save_file

    from finetune_core import engine
    from finetune_core.config import RunConfig

    recipe = builtin_recipe(model)
    say = progress or (lambda stage, fraction, message: None)
    if engine.pick_device("auto").type == "cpu":
        how_long = f"about {_duration(estimate_builtin_seconds(model))} on this CPU"
    else:  # the CPU heuristic says nothing about a GPU; the first steps will tell
        how_long = "timed after the first steps on the GPU"
    intro = (
        f"builtin weights for {model} are not cached yet: pretraining them on the built-in "
        f"source task ({recipe['epochs']} epochs at {recipe['image_size']} px), {how_long}; "
        f"they are cached at {target} for next time"
    )
    say("pretrain", 0.0, intro)
    fields = {k: recipe[k] for k in BUILTIN_RECIPE}
    cfg = RunConfig(
        data=recipe["data"],
        model=model,
        weights="none",
        strategy="full",
        image_size=recipe["image_size"],
        epochs=recipe["epochs"],
        device="auto",
        name=f"builtin weights for {model}",
        **fields,
    )

    class PretrainProgress(engine.Callback):
        def __init__(self):
            self.last = 0.0
            self.t0 = time.monotonic()
            self.val = ""

        def on_fit_start(self, trainer):
            self.t0 = time.monotonic()

        def on_epoch_end(self, trainer, record):
            if record.get("split") == "val":
                self.val = f" (val accuracy {record['acc']:.0%} after epoch {record['epoch']})"

        def on_batch_end(self, trainer):
            total = trainer.total_steps
            if recipe.get("max_steps"):
                total = min(total, recipe["max_steps"])
            now = time.monotonic()
            if trainer.step >= total:
                if trainer.step < trainer.total_steps:
                    raise engine.StopTraining(f"{BUILTIN_STEPS_ENV}={recipe['max_steps']}")
                return
            if now - self.last < 0.5:
                return
            self.last = now
            elapsed = now - self.t0
            left = elapsed / trainer.step * (total - trainer.step)
            say(
                "pretrain",
                trainer.step / total,
                f"pretraining builtin weights for {model} on the built-in source task: "
                f"epoch {trainer.epoch}/{recipe['epochs']}, about {_duration(left)} left{self.val}",
            )

    t0 = time.monotonic()
    with _rng_kept():
        exp = engine.prepare(cfg, progress=progress)
        summary = engine.fit(exp, callbacks=[PretrainProgress()])
    parts = exp.parts
    state = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in parts.model.state_dict().items()
        if not _is_head(k, parts.head)
    }
    acc = summary.get("best_val_acc")
    metadata = {
        "recipe": json.dumps(recipe, sort_keys=True),
        "source_val_acc": json.dumps(acc),
        "train_time_s": f"{time.monotonic() - t0:.1f}",
    }
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    acc_text = f", source-task val accuracy {acc:.0%}" if isinstance(acc, (int, float)) else ""
    say(
        "pretrain",
        1.0,
        f"builtin weights for {model} trained in {time.monotonic() - t0:.0f} s{acc_text}; "
        f"cached at {target}",
    )


def _read_builtin(model: str, target: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(target), device="cpu")
    except Exception as e:
        raise WeightsError(
            f"the cached builtin weights for {model} at {target} cannot be read "
            f"({_first_line(e)}); delete that file to train them again."
        ) from None


def _load_builtin(model: str, progress) -> dict[str, torch.Tensor]:
    target = _builtin_file(model)
    if target.exists():
        return _read_builtin(model, target)

    def waiting():
        if progress:
            progress(
                "pretrain",
                None,
                f"waiting for another process that is pretraining builtin weights for {model}",
            )

    with _file_lock(target.with_suffix(".lock"), on_wait=waiting):
        if not target.exists():  # another process may have trained them while we waited
            try:
                _train_builtin(model, target, progress)
            except WeightsError:
                raise
            except Exception as e:
                raise WeightsError(
                    f"pretraining builtin weights for {model} failed: {_first_line(e)}. "
                    f"Choose other weights: default, a local file, run:RUN_ID or none."
                ) from e
    return _read_builtin(model, target)


# ---------------------------------------------------------------------------- public API


def cache_file(spec: str, model: str) -> Path | None:
    """Returns where "default" or "builtin" weights for `model` live in the torch hub cache."""
    if spec == "default":
        return _hub_checkpoints() / os.path.basename(urlparse(_tv_weights(model).url).path)
    if spec == "builtin":
        return _builtin_file(model)
    return None


def check_weights(spec: str, model: str, num_classes: int | None, *, runs_dir=None) -> str | None:
    """Returns a message when `spec` is malformed, a missing file/run, or a file of another
    architecture; None otherwise. Never downloads nor trains.

    A head with another class count is not a problem: it is dropped and a new head for the
    data's classes is trained (backbone only), for files and runs alike.
    """
    problem = _spec_problem(spec)
    if problem:
        return problem
    kind = _kind(spec)
    try:
        if kind == "default":
            _tv_weights(model)
        elif kind == "builtin":
            builtin_recipe(model)  # a bad FINETUNE_BUILTIN_* value
        elif kind == "run":
            best, size = _run_source(spec[4:], model, runs_dir)
            problems = _mismatches(_read_file(best, lazy=True), model, size)
            if problems:
                return f"run:{spec[4:]}'s checkpoint {best} does not fit {model}: " + "; ".join(
                    problems
                )
        elif kind == "file":
            return _check_file(Path(spec).expanduser(), spec, model)
    except WeightsError as e:
        return str(e)
    return None


def _check_file(path: Path, spec: str, model: str) -> str | None:
    if not path.exists():
        from finetune_core.config import nearest

        hint = nearest(spec, ("default", "none", "builtin"))
        return f"weights file {path} does not exist.{hint} Weights are default, {SOURCES_HELP}."
    if path.is_dir():
        return f"{path} is a folder; weights must be a file (.safetensors, .pt or .pth)."
    problems = _mismatches(_read_file(path, lazy=True), model)
    if problems:
        return f"{path} does not fit {model} (another architecture?): " + "; ".join(problems) + "."
    return None


def availability(spec: str, model: str) -> tuple[str, str]:
    """Returns (state, sentence): state is "cached", "download", "train" (builtin, first use),
    "ready" (file/run/none) or "unavailable", for the New run form."""
    problem = _spec_problem(spec)
    if problem:
        return "unavailable", problem
    kind = _kind(spec)
    try:
        if kind == "none":
            return "ready", "random initialisation: nothing to load"
        if kind == "default":
            w = _tv_weights(model)
            target = cache_file(spec, model)
            acc = w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
            about = f" ({acc:.1f} % ImageNet top-1)" if acc else ""
            if target.exists():
                return "cached", f"ImageNet weights{about} are cached at {target}"
            mib = _file_mib(w)
            size = f"{mib:.1f} MB" if mib else "the weights"
            host = urlparse(w.url).hostname
            return (
                "download",
                f"will download {size} from {host} on first use{about}, into {target}",
            )
        if kind == "builtin":
            target = cache_file(spec, model)
            if target.exists():
                return "cached", f"builtin weights are cached at {target}"
            where = "on the GPU" if torch.cuda.is_available() else "on this CPU"
            est = _duration(estimate_builtin_seconds(model))
            if torch.cuda.is_available():
                return "train", f"builtin weights will be trained on first use ({where})"
            return "train", f"builtin weights will be trained on first use (about {est} {where})"
        if kind == "run":
            best, _ = _run_source(spec[4:], model, None)
            return "ready", f"the best weights of run {best.parent.parent.name}"
        path = Path(spec).expanduser()
        if not path.is_file():
            return "unavailable", f"weights file {path} does not exist"
        return "ready", f"weights file {path} ({path.stat().st_size / 2**20:.1f} MB)"
    except WeightsError as e:
        return "unavailable", str(e)


def load_backbone_state(
    spec: str, model: str, *, num_classes: int | None = None, runs_dir=None, progress=None
) -> dict[str, torch.Tensor] | None:
    """Returns a state dict to pass to models.create_model(backbone_state=...), or None for
    "none". Raises WeightsError with the cache file path and other choices on failure.

    "default" is torchvision's file as it is (1000-class head included: create_model
    replaces it); files and runs keep their head only when it has num_classes rows.
    """
    problem = _spec_problem(spec)
    if problem:
        raise WeightsError(problem)
    kind = _kind(spec)
    if kind == "none":
        return None
    if kind == "default":
        return _with_layout(_load_default(model, progress), model)
    if kind == "builtin":
        return _load_builtin(model, progress)
    if kind == "run":
        path, size = _run_source(spec[4:], model, runs_dir)
        label = f"run:{spec[4:]}'s checkpoint {path}"
    else:
        path, size = Path(spec).expanduser(), None
        label = str(path)
        msg = _check_file(path, spec, model) if not path.is_file() else None
        if msg:
            raise WeightsError(msg)
    state = _read_file(path)
    problems = _mismatches(state, model, size)
    if problems:
        raise WeightsError(f"{label} does not fit {model}: " + "; ".join(problems) + ".")
    return _fit_classes(state, model, num_classes, size)
