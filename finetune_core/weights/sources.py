"""Weight sources, one class each: default (torchvision's ImageNet weights), builtin (the
offline stand-in), a local file, run:RUN_ID (an earlier run's best weights) and none.

Every source returns a state dict in torchvision's own layout for the model (the layout
`models.create_model(backbone_state=...)` takes): torchvision's file as it is, a file or a
run's checkpoint checked key by key against the model with the head dropped when its class
count differs, and the cached builtin backbone. Nothing falls back silently: WeightsError
says what failed, where the file would have to be, and which other sources exist.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch

from finetune_core import checkpoints, models, store
from finetune_core.data import shapes
from finetune_core.util.durations import fmt_rough
from finetune_core.util.names import nearest
from finetune_core.weights import builtin, checks, hub
from finetune_core.weights.base import SOURCES_HELP, WeightsError, first_line
from finetune_core.weights.files import read_file

State = dict[str, torch.Tensor]
Estimate = Callable[[str], float]  # model -> seconds to pretrain its builtin weights here


class WeightsSource:
    """Base class: where a run's starting weights come from."""

    keeps_head = False  # True: a head trained for the same classes is kept, not replaced

    def __init__(self, spec: str):
        self.spec = spec

    def check(self, model: str, num_classes: int | None, runs_dir) -> str | None:
        """Returns what keeps this source from giving weights for model, or None. Never
        downloads nor trains."""
        return None

    def availability(self, model: str, runs_dir, estimate: Estimate | None) -> tuple[str, str]:
        """Returns (state, sentence) for the New run form; see `weights.availability`."""
        raise NotImplementedError

    def load(self, model: str, num_classes: int | None, runs_dir, progress) -> State | None:
        """Returns the state dict for models.create_model(backbone_state=...), or None."""
        raise NotImplementedError

    def cache_file(self, model: str) -> Path | None:
        """Returns where the weights are cached on this machine, for sources that cache."""
        return None


class NoWeights(WeightsSource):
    """none: random initialisation."""

    def availability(self, model, runs_dir, estimate):
        return "ready", "random initialisation: nothing to load"

    def load(self, model, num_classes, runs_dir, progress):
        return None


class Default(WeightsSource):
    """default: torchvision's ImageNet weights, downloaded into the torch hub cache."""

    def check(self, model, num_classes, runs_dir):
        hub.tv_weights(model)
        return None

    def cache_file(self, model):
        return hub.cache_path(model)

    def availability(self, model, runs_dir, estimate):
        w = hub.tv_weights(model)
        target = self.cache_file(model)
        acc = w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        about = f" ({acc:.1f} % ImageNet top-1)" if acc else ""
        if target.exists():
            return "cached", f"ImageNet weights{about} are cached at {target}"
        mib = hub.file_mib(w)
        size = f"{mib:.1f} MB" if mib else "the weights"
        host = urlparse(w.url).hostname
        return "download", f"will download {size} from {host} on first use{about}, into {target}"

    def load(self, model, num_classes, runs_dir, progress):
        return checks.with_bn_counters(hub.load_default(model, progress), model)


class Builtin(WeightsSource):
    """builtin: a backbone pretrained here on the built-in source task (see pretrain.py)."""

    def check(self, model, num_classes, runs_dir):
        builtin.recipe(model)  # a bad FINETUNE_BUILTIN_* value
        return None

    def cache_file(self, model):
        return builtin.cache_file(model)

    def availability(self, model, runs_dir, estimate):
        target = self.cache_file(model)
        if target.exists():
            acc = builtin.source_accuracy(target)
            about = (
                ""
                if acc is None
                else (
                    f" (val accuracy {100 * acc:.0f} % on their source task's "
                    f"{len(shapes.DATASETS[builtin.BUILTIN_SOURCE.partition(':')[2]][0])} classes)"
                )
            )
            return "cached", f"builtin weights are cached at {target}{about}"
        if torch.cuda.is_available():
            return "train", "builtin weights will be trained on first use (on the GPU)"
        about = f"about {fmt_rough(estimate(model))} " if estimate else ""
        return "train", f"builtin weights will be trained on first use ({about}on this CPU)"

    def load(self, model, num_classes, runs_dir, progress):
        return builtin.read(model, self.cache_file(model))


class _Checkpoint(WeightsSource):
    """A state dict in a file: checked against the model, head kept for the same classes."""

    keeps_head = True

    def where(self, model: str, runs_dir) -> tuple[Path, int | None, str]:
        """Returns (file, the image size it was trained at or None, how to name it)."""
        raise NotImplementedError

    def state(self, path: Path, model: str, size, runs_dir, progress) -> State:
        """Returns the whole state dict the file holds."""
        return read_file(path)

    def load(self, model, num_classes, runs_dir, progress):
        path, size, label = self.where(model, runs_dir)
        state = self.state(path, model, size, runs_dir, progress)
        problems = checks.mismatches(state, model, size)
        if problems:
            raise WeightsError(f"{label} does not fit {model}: " + "; ".join(problems) + ".")
        bad = checks.first_non_finite(state.items())
        if bad:
            raise WeightsError(checks.non_finite_message(label, bad))
        return checks.fit_classes(state, model, num_classes, size)


class RunWeights(_Checkpoint):
    """run:RUN_ID: an earlier run's best checkpoint."""

    @property
    def ref(self) -> str:
        return self.spec[len("run:") :]

    def run_dir(self, runs_dir) -> Path:
        try:
            return store.resolve_run(self.ref, store.runs_dir(runs_dir))
        except store.RunError as e:
            raise WeightsError(f"run:{self.ref}: {first_line(e)}") from None

    def where(self, model, runs_dir):
        """Returns (best checkpoint, the run's image size, label) after checking its model."""
        run_dir = self.run_dir(runs_dir)
        try:
            cfg = store.read_config(run_dir)
        except store.RunError as e:
            raise WeightsError(f"run:{self.ref}: {first_line(e)}") from None
        if cfg.get("model") != model:
            raise WeightsError(
                f"run:{self.ref} trained {cfg.get('model')!r}, not {model!r}: its weights do not "
                f"fit. Choose --model {cfg.get('model')} or other weights: default, {SOURCES_HELP}."
            )
        best = run_dir / "checkpoints" / "best.safetensors"
        if not best.is_file():
            raise WeightsError(
                f"run:{self.ref} has no best checkpoint yet ({best} is missing): it has not "
                "finished an epoch. Wait for it, or choose other weights."
            )
        pieces = checkpoints.unmerged_pieces(best)
        if pieces == "adapters":  # merged into a plain model only when the run completes
            raise WeightsError(
                f"run:{self.ref} trained {cfg.get('strategy')} adapters and has not completed: "
                f"its best weights become a plain {model}, the adapters merged in, when it "
                "completes. Resume it to the end, or choose other weights."
            )
        if pieces == "prompts":
            raise WeightsError(
                f"run:{self.ref} trained VPT prompts, which cannot be merged into {model}'s "
                f"weights, so its weights are no plain {model}. Choose other weights, such as "
                f"the ones it started from ({cfg.get('weights')})."
            )
        size = cfg.get("image_size")
        return best, size if isinstance(size, int) else None, f"run:{self.ref}'s checkpoint {best}"

    def state(self, path, model, size, runs_dir, progress):
        """Returns the run's weights: its file, or for a run that kept only its head (see
        checkpoints.py) that head on the backbone it names, once that is checked to be the
        same backbone."""
        ref = checkpoints.reference(path)
        if ref is None:
            return read_file(path)
        head = read_file(path)
        backbone = source(ref["weights"]).load(model, None, runs_dir, progress)
        rows = next(v.shape[0] for k, v in head.items() if k.endswith("weight"))
        torch.manual_seed(ref["seed"])  # a random-init backbone is its seed's
        parts = models.create_model(model, rows, image_size=size or 224, backbone_state=backbone)
        try:
            checkpoints.load_onto(path, parts)
        except checkpoints.BackboneChanged as e:
            raise WeightsError(f"run:{self.ref}: {e}") from None
        return parts.model.state_dict()

    def check(self, model, num_classes, runs_dir):
        best, size, _ = self.where(model, runs_dir)
        ref = checkpoints.reference(best)
        if ref is not None:  # a head on a named backbone: that backbone must be there
            problem = source(ref["weights"]).check(model, None, runs_dir)
            return f"run:{self.ref}'s backbone ({ref['weights']}): {problem}" if problem else None
        problems = checks.mismatches(read_file(best, lazy=True), model, size)
        if problems:
            return f"run:{self.ref}'s checkpoint {best} does not fit {model}: " + "; ".join(
                problems
            )
        bad = checks.non_finite_in_file(best)
        return (
            checks.non_finite_message(f"run:{self.ref}'s checkpoint {best}", bad) if bad else None
        )

    def availability(self, model, runs_dir, estimate):
        best, _, _ = self.where(model, runs_dir)
        return "ready", f"the best weights of run {best.parent.parent.name}"


class FileWeights(_Checkpoint):
    """PATH: a local .safetensors, .pt or .pth file."""

    @property
    def path(self) -> Path:
        return Path(self.spec).expanduser()

    def check(self, model, num_classes, runs_dir):
        path = self.path
        if not path.exists():
            hint = nearest(self.spec, NAMED)
            return f"weights file {path} does not exist.{hint} Weights are default, {SOURCES_HELP}."
        if path.is_dir():
            return f"{path} is a folder; weights must be a file (.safetensors, .pt or .pth)."
        problems = checks.mismatches(read_file(path, lazy=True), model)
        if problems:
            return (
                f"{path} does not fit {model} (another architecture?): " + "; ".join(problems) + "."
            )
        bad = checks.non_finite_in_file(path)
        return checks.non_finite_message(f"weights file {path}", bad) if bad else None

    def where(self, model, runs_dir):
        if not self.path.is_file():
            raise WeightsError(self.check(model, None, runs_dir))
        return self.path, None, str(self.path)

    def availability(self, model, runs_dir, estimate):
        path = self.path
        if not path.is_file():
            return "unavailable", f"weights file {path} does not exist"
        return "ready", f"weights file {path} ({path.stat().st_size / 2**20:.1f} MB)"


NAMED: dict[str, type[WeightsSource]] = {"default": Default, "none": NoWeights, "builtin": Builtin}
PREFIXED: dict[str, type[WeightsSource]] = {"run:": RunWeights}


def source(spec) -> WeightsSource:
    """Returns the source a weights spec names; WeightsError for a malformed spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise WeightsError(f"weights must be default, {SOURCES_HELP}")
    if spec in NAMED:
        return NAMED[spec](spec)
    for prefix, cls in PREFIXED.items():
        if spec.startswith(prefix):
            if not spec[len(prefix) :].strip():
                raise WeightsError(
                    "run: needs a run id, e.g. run:20250101-120000-a1b2c3 "
                    "(see `python -m finetune_core list`)"
                )
            return cls(spec)
    return FileWeights(spec)
