"""torchvision's classification registry, model building, head swap and ordered layer groups.

Every model is the torchvision model itself (so torchvision's own weight files load
key by key), with the final classification layer (the **head**) replaced for K classes
and the rest split into ordered backbone **groups** (stem -> top) that follow the
architecture's stages. Groups are data: each family has a small function that lists the
module paths (or parameter names) of each group; `create_model` checks that the groups
and the head cover every parameter exactly once.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache

import torch
import torch.fx
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from finetune_core.util.names import nearest

# Keys of auxiliary heads in torchvision's weight files; aux heads are dropped, so ignored.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class Group:
    """A named backbone group: the module/parameter paths (prefixes of parameter names) in it."""

    name: str
    prefixes: tuple[str, ...]


class _HeadInput(Exception):  # noqa: N818 - carries the head's input out of a forward pass
    def __init__(self, features: torch.Tensor):
        self.features = features


@dataclass
class ModelParts:
    """A built model for K classes with its head and backbone groups (stem -> top)."""

    name: str
    model: nn.Module
    head: str  # module path of the head, e.g. "fc", "classifier.1", "heads.head"
    groups: list[Group] = field(default_factory=list)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the head's input for x: the model runs up to its head and stops there."""

        def stop(_module, inputs):
            raise _HeadInput(inputs[0])

        handle = self.model.get_submodule(self.head).register_forward_pre_hook(stop)
        try:
            self.model(x)
        except _HeadInput as reached:
            return reached.features
        finally:
            handle.remove()
        raise RuntimeError(f"{self.name}: the forward pass never reached the head {self.head}")

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Returns logits from the head's input (what forward_features returns)."""
        out = self.model.get_submodule(self.head)(features)
        # SqueezeNet's head is a conv followed by ReLU and pooling in the same Sequential;
        # for Linear heads nothing follows them.
        parent_path, _, child = self.head.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for later in names[names.index(child) + 1 :]:
                out = parent._modules[later](out)
        return torch.flatten(out, 1) if out.ndim > 2 else out

    def is_head(self, key: str) -> bool:
        """Returns True for a parameter or buffer name of the head."""
        return _under(key, self.head)

    def group_of(self) -> dict[str, str]:
        """Returns {parameter name: group name or "head"} for every parameter."""
        owners = [(p, g.name) for g in self.groups for p in g.prefixes] + [(self.head, "head")]
        result = {}
        for pname, _ in self.model.named_parameters():
            found = [g for p, g in owners if _under(pname, p)]
            if len(found) != 1:
                raise RuntimeError(
                    f"{self.name}: parameter {pname} is in {len(found)} groups {found}, expected 1"
                )
            result[pname] = found[0]
        return result

    def group_modules(self, group_name: str) -> list[nn.Module]:
        """Returns the modules of a backbone group (not its bare parameters, like ViT's
        class_token, which have no mode to set)."""
        group = next(g for g in self.groups if g.name == group_name)
        mods = []
        for prefix in group.prefixes:
            try:
                mods.append(self.model.get_submodule(prefix))
            except AttributeError:
                pass  # a parameter, not a module
        return mods

    def batchnorm_modules(self) -> list[nn.Module]:
        """Returns every BatchNorm layer of the model."""
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def bias_and_norm_params(self) -> set[str]:
        """Returns the names of biases and normalisation affine parameters (BitFit's set)."""
        names = set()
        for mod_name, module in self.model.named_modules():
            for p_name, _ in module.named_parameters(recurse=False):
                if p_name.endswith("bias") or isinstance(module, _NORM_TYPES):
                    names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
        return names


@dataclass(frozen=True)
class InputSpec:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic" | "nearest"
    min_size: int  # smallest side the architecture takes
    pretrained_size: int | None  # exact size the pretrained weights need (ViT), else None
    default_size: int  # the size the weights were evaluated at (224, 299, ...)
    resize_size: int | None = None  # torchvision's eval resize before the centre crop


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# ---------------------------------------------------------------------------------------
# Registry and building


@lru_cache(maxsize=1)
def _registry() -> tuple[str, ...]:
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def classification_models() -> list[str]:
    """Returns the sorted names of torchvision's classification models."""
    return list(_registry())


def _check_name(name: str) -> None:
    if name not in _registry():
        raise ValueError(
            f"Unknown model {name!r}: not a torchvision classification model."
            f"{nearest(name, _registry())} "
            f"The {len(_registry())} names are listed by classification_models()."
        )


class _MetaInit(TorchFunctionMode):
    """Allocates new tensors on the meta device, except the few that builders compute with.

    `with torch.device("meta")` breaks builders that turn tensors into Python numbers
    (RegNet's width rules use arange/tensor then .tolist()); those stay on the CPU and are
    moved afterwards, while everything parameter-sized is never allocated.
    """

    _ALLOCATORS = frozenset(
        {torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full}
        | {torch.rand, torch.randn}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._ALLOCATORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _build_kwargs(name: str, image_size: int) -> dict:
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    if name.startswith("vit_"):
        return {"image_size": image_size}
    if name.startswith("maxvit"):
        return {"input_size": (image_size, image_size)}
    return {}


def torchvision_kwargs(name: str, image_size: int, num_classes: int) -> dict:
    """Returns the keyword arguments with which torchvision.models.get_model(name, **kwargs)
    builds the architecture create_model builds (no aux heads, the head for num_classes), so
    that a state dict of a model made here loads into it as it is."""
    return {**_build_kwargs(name, image_size), "num_classes": int(num_classes)}


def _build(name: str, image_size: int, device: str | torch.device | None) -> nn.Module:
    kwargs = _build_kwargs(name, image_size)
    if device is not None and torch.device(device).type == "meta":
        with _MetaInit():
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        return model.to("meta")
    if device is None:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    with torch.device(device):
        return torchvision.models.get_model(name, weights=None, **kwargs)


def _find_head(model: nn.Module) -> str:
    """Returns the module path of the final classification layer."""
    if isinstance(model, torchvision.models.SqueezeNet):
        return "classifier.1"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise RuntimeError(f"{type(model).__name__} has no Linear layer to use as the head")
    return linears[-1]


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    device = old.weight.device
    if isinstance(old, nn.Conv2d):  # SqueezeNet: 1x1 conv to class maps, init as torchvision
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, device=device)
        if device.type != "meta":
            nn.init.normal_(new.weight, mean=0.0, std=0.01)
            nn.init.zeros_(new.bias)
        return new
    return nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=device)


@dataclass
class Mismatches:
    """What keeps a state dict from loading into a model's backbone (all empty: it fits)."""

    missing: list[str]  # keys the model has and the state dict lacks
    unexpected: list[str]  # keys the state dict has and the model lacks
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, given, expected)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)


def backbone_mismatches(
    expected: Mapping[str, Sequence[int]],
    given: Mapping[str, Sequence[int]],
    head: str,
    *,
    counters_optional: bool = False,
) -> Mismatches:
    """Compares {key: shape} of a state dict with the model's, ignoring the head (it is
    replaced for K classes) and aux-head keys; counters_optional also forgives missing
    BatchNorm num_batches_tracked counters (older torchvision files lack them)."""

    def ignored(k: str) -> bool:
        return _under(k, head) or k.startswith(AUX_PREFIXES)

    missing = [
        k
        for k in expected
        if not ignored(k)
        and k not in given
        and not (counters_optional and k.endswith("num_batches_tracked"))
    ]
    unexpected = [k for k in given if not ignored(k) and k not in expected]
    shapes = [
        (k, tuple(given[k]), tuple(expected[k]))
        for k in given
        if not ignored(k) and k in expected and tuple(given[k]) != tuple(expected[k])
    ]
    return Mismatches(missing, unexpected, shapes)


def backbone_digest(state: Mapping[str, torch.Tensor], head: str) -> str:
    """Returns the sha256 of a state dict's backbone (every tensor but the head's): keys,
    dtypes, shapes and bytes, so that a checkpoint that keeps only a head can tell whether
    the backbone it was trained on is the one it is loaded onto."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if not _under(k, head)):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Returns {key: shape} of a state dict."""
    return {k: tuple(v.shape) for k, v in state.items()}


def _load_backbone(model: nn.Module, head: str, state: dict[str, torch.Tensor], name: str) -> None:
    """Loads `state` (torchvision's key layout) into everything but the head and aux heads."""
    found = backbone_mismatches(shapes_of(model.state_dict()), shapes_of(state), head)
    problems = [f"missing {k}" for k in found.missing]
    problems += [f"unexpected {k}" for k in found.unexpected]
    problems += [f"{k} has shape {g}, the model needs {e}" for k, g, e in found.shapes]
    if problems:
        shown = "; ".join(problems[:4]) + (
            f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        )
        raise ValueError(
            f"These weights do not fit {name} ({len(problems)} mismatched keys: {shown}). "
            f"Use weights saved from {name} itself, or --weights none."
        )
    given = {k: v for k, v in state.items() if not (_under(k, head) or k.startswith(AUX_PREFIXES))}
    model.load_state_dict(given, strict=False)


def create_model(
    name: str,
    num_classes: int,
    *,
    image_size: int = 224,
    backbone_state: dict[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> ModelParts:
    """Returns the model with aux heads dropped, pretrained backbone loaded, head for K classes.

    `device="meta"` builds without allocating anything (cheap planning of large models).
    `backbone_state` is a state dict in torchvision's layout for the ImageNet model; its head
    and aux-head keys are ignored, any other mismatch raises ValueError naming the keys.
    """
    _check_name(name)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    model = _build(name, image_size, device)
    head = _find_head(model)
    if backbone_state is not None:
        _load_backbone(model, head, backbone_state, name)
    parent_path, _, child = head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, _new_head(parent.get_submodule(child), int(num_classes)))
    parts = ModelParts(name=name, model=model, head=head, groups=_layout(model))
    parts.group_of()  # every parameter in exactly one group or the head, else RuntimeError
    return parts


# ---------------------------------------------------------------------------------------
# Backbone groups: per family, a function from the model to [(group name, [paths])].

_Layout = list[tuple[str, Sequence[str]]]


def _children(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    module = model.get_submodule(path) if path else model
    return [(f"{path}.{n}" if path else n, m) for n, m in module.named_children()]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _downsamples(module: nn.Module) -> bool:
    """True when a conv or pooling layer inside `module` has a stride above 1."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride,)
            if max(stride) > 1:
                return True
    return False


def _index(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _span(label: str, paths: Sequence[str]) -> str:
    first, last = _index(paths[0]), _index(paths[-1])
    return f"{label} {first}" if first == last else f"{label} {first}-{last}"


def _split_at_downsampling(
    kids: list[tuple[str, nn.Module]], label: str, first: str = "stem"
) -> _Layout:
    """Groups consecutive children by resolution: a downsampling child starts a new group.

    The first group is named `first`; the others `label a-b` after the indices of their
    children that hold parameters. Children without parameters (ReLU, pooling) stay in
    the group they fall into, so a frozen group also puts its dropout in eval mode.
    """
    runs: list[list[tuple[str, nn.Module]]] = []
    for path, m in kids:
        if not runs or (_downsamples(m) and any(_has_params(x) for _, x in runs[-1])):
            runs.append([])
        runs[-1].append((path, m))
    layout = []
    for i, run in enumerate(runs):
        with_params = [p for p, m in run if _has_params(m)]
        if not with_params:  # a trailing pooling layer: keep it with the group before
            layout[-1][1].extend(p for p, _ in run)
            continue
        layout.append((first if i == 0 else _span(label, with_params), [p for p, _ in run]))
    return layout


def _resnet(m: nn.Module) -> _Layout:
    return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]


def _regnet(m: nn.Module) -> _Layout:
    return [("stem", ["stem"])] + [(_index(p), [p]) for p, _ in _children(m, "trunk_output")]


def _densenet(m: nn.Module) -> _Layout:
    layout: _Layout = [("stem", ["features.conv0", "features.norm0", "features.pool0"])]
    for path, _ in _children(m, "features"):
        n = _index(path)
        if n.startswith("denseblock"):
            layout.append((f"block{n[len('denseblock') :]}", [path]))
        elif n.startswith("transition") or n == "norm5":
            layout[-1][1].append(path)
    return layout


def _mobilenet(m: nn.Module) -> _Layout:
    kids = _children(m, "features")
    layout = _split_at_downsampling(kids[:-1], "blocks")
    layout.append(("last conv", [kids[-1][0]]))
    if isinstance(m, torchvision.models.MobileNetV3):  # Linear + Hardswish + Dropout
        layout.append(("pre-logits", ["classifier.0", "classifier.1", "classifier.2"]))
    return layout


def _efficientnet(m: nn.Module) -> _Layout:
    kids = [p for p, _ in _children(m, "features")]
    stages = [(f"stage{i}", [p]) for i, p in enumerate(kids[1:-1], start=1)]
    return [("stem", [kids[0]]), *stages, ("last conv", [kids[-1]])]


def _mnasnet(m: nn.Module) -> _Layout:
    kids = _children(m, "layers")
    stage_at = [i for i, (_, c) in enumerate(kids) if isinstance(c, nn.Sequential)]
    first, last = stage_at[0], stage_at[-1]
    return [
        ("stem", [p for p, _ in kids[:first]]),
        *[(f"stage{i - first + 1}", [kids[i][0]]) for i in stage_at],
        ("last conv", [p for p, _ in kids[last + 1 :]]),
    ]


def _shufflenet(m: nn.Module) -> _Layout:
    return [
        ("stem", ["conv1", "maxpool"]),
        *[(f"stage{i}", [f"stage{i}"]) for i in (2, 3, 4)],
        ("last conv", ["conv5"]),
    ]


def _squeezenet(m: nn.Module) -> _Layout:
    return _split_at_downsampling(_children(m, "features"), "fire")


def _vgg_like(m: nn.Module, hidden: Iterable[str]) -> _Layout:
    """VGG and AlexNet: conv blocks between poolings, then the hidden FC layers."""
    kids = _children(m, "features")
    if isinstance(m, torchvision.models.AlexNet):  # 5 convs, 3 poolings: one group per conv
        blocks: list[list[str]] = []
        for path, c in kids:
            if isinstance(c, nn.Conv2d) or not blocks:
                blocks.append([])
            blocks[-1].append(path)
    else:
        blocks = [[]]
        for path, c in kids:
            blocks[-1].append(path)
            if isinstance(c, nn.MaxPool2d):
                blocks.append([])
        blocks = [b for b in blocks if b]
    return [(f"conv{i}", b) for i, b in enumerate(blocks, start=1)] + [("fc hidden", list(hidden))]


def _vgg(m: nn.Module) -> _Layout:
    return _vgg_like(m, [f"classifier.{i}" for i in range(6)])  # Linear ReLU Dropout x2


def _alexnet(m: nn.Module) -> _Layout:
    return _vgg_like(m, [f"classifier.{i}" for i in range(6)])  # Dropout Linear ReLU x2


def _googlenet(m: nn.Module) -> _Layout:
    return [
        ("stem", ["conv1", "maxpool1", "conv2", "conv3", "maxpool2"]),
        ("inception3", ["inception3a", "inception3b", "maxpool3"]),
        ("inception4", [f"inception4{c}" for c in "abcde"] + ["maxpool4"]),
        ("inception5", ["inception5a", "inception5b"]),
    ]


def _inception_v3(m: nn.Module) -> _Layout:
    paths = [p for p, _ in _children(m, "")]
    stem_end = paths.index("Mixed_5b")
    return [
        ("stem", paths[:stem_end]),
        *[(f"mixed{s}", [p for p in paths if p.startswith(f"Mixed_{s}")]) for s in ("5", "6", "7")],
    ]


def _vit(m: nn.Module, n_block_groups: int = 4) -> _Layout:
    blocks = [p for p, _ in _children(m, "encoder.layers")]
    size = -(-len(blocks) // n_block_groups)
    chunks = [blocks[i : i + size] for i in range(0, len(blocks), size)]
    return [
        ("patch embed", ["conv_proj", "class_token", "encoder.pos_embedding", "encoder.dropout"]),
        *[(f"blocks {c[0].rsplit('_', 1)[-1]}-{c[-1].rsplit('_', 1)[-1]}", c) for c in chunks],
        ("final norm", ["encoder.ln"]),
    ]


def _stages_after_stem(paths: list[str], first: str) -> _Layout:
    """ConvNeXt and Swin: features = [stem, stage1, down, stage2, down, stage3, down, stage4]."""
    layout: _Layout = [(first, [paths[0]]), ("stage1", [paths[1]])]
    for i in range(2, len(paths), 2):
        layout.append((f"stage{i // 2 + 1}", paths[i : i + 2]))
    return layout


def _convnext(m: nn.Module) -> _Layout:
    paths = [p for p, _ in _children(m, "features")]
    return [*_stages_after_stem(paths, "stem"), ("final norm", ["classifier.0"])]


def _swin(m: nn.Module) -> _Layout:
    paths = [p for p, _ in _children(m, "features")]
    return [*_stages_after_stem(paths, "patch embed"), ("final norm", ["norm"])]


def _maxvit(m: nn.Module) -> _Layout:
    stages = [(f"stage{i + 1}", [p]) for i, (p, _) in enumerate(_children(m, "blocks"))]
    # pool, flatten, LayerNorm, Linear, Tanh: the pre-logits before the final Linear
    return [("stem", ["stem"]), *stages, ("pre-logits", [f"classifier.{i}" for i in range(5)])]


_M = torchvision.models
_LAYOUTS: dict[type, Callable[[nn.Module], _Layout]] = {
    _M.ResNet: _resnet,
    _M.RegNet: _regnet,
    _M.MobileNetV2: _mobilenet,
    _M.MobileNetV3: _mobilenet,
    _M.EfficientNet: _efficientnet,
    _M.ConvNeXt: _convnext,
    _M.VisionTransformer: _vit,
    _M.SwinTransformer: _swin,
    _M.MaxVit: _maxvit,
    _M.DenseNet: _densenet,
    _M.ShuffleNetV2: _shufflenet,
    _M.MNASNet: _mnasnet,
    _M.SqueezeNet: _squeezenet,
    _M.GoogLeNet: _googlenet,
    _M.Inception3: _inception_v3,
    _M.VGG: _vgg,
    _M.AlexNet: _alexnet,
}


def _layout(model: nn.Module) -> list[Group]:
    fn = _LAYOUTS.get(type(model))
    if fn is None:
        raise RuntimeError(f"No layer groups are defined for {type(model).__name__}")
    return [Group(name, tuple(prefixes)) for name, prefixes in fn(model)]


@cache
def _group_names(name: str) -> tuple[str, ...]:
    spec = input_spec(name)
    size = spec.pretrained_size or max(spec.min_size, 224)
    parts = create_model(name, 2, image_size=size, device="meta")
    return tuple(g.name for g in parts.groups)


def group_names(name: str) -> list[str]:
    """Returns the backbone group names of a model (cheap: built on the meta device)."""
    _check_name(name)
    return list(_group_names(name))


# ---------------------------------------------------------------------------------------
# Input sizes and weights metadata

# Smallest square input each architecture takes (a training step with batch 2), found
# empirically; pinned for every model by tests/test_models.py. Families not listed take 1.
_MIN_SIZE = {
    "alexnet": 63,
    "convnext": 32,
    "densenet": 29,
    "googlenet": 15,
    "inception": 75,
    "squeezenet1_0": 21,
    "squeezenet1_1": 17,
    "swin": 4,
    "vgg": 32,
}


def _patch_size(name: str) -> int | None:
    match = re.match(r"vit_\w_(\d+)$", name)
    return int(match.group(1)) if match else None


def _min_size(name: str) -> int:
    if name.startswith("maxvit"):
        return 221  # see _size_problem: ceil(size / 32) must be a multiple of 7
    patch = _patch_size(name)
    if patch:
        return patch
    for prefix in sorted(_MIN_SIZE, key=len, reverse=True):
        if name.startswith(prefix):
            return _MIN_SIZE[prefix]
    return 1


@cache
def input_spec(name: str) -> InputSpec:
    """Returns mean/std/interpolation/sizes from torchvision's default weights and the model."""
    _check_name(name)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    t = weights.transforms()
    return InputSpec(
        mean=tuple(float(x) for x in t.mean),
        std=tuple(float(x) for x in t.std),
        interpolation=t.interpolation.value,
        min_size=_min_size(name),
        # ViT's position embeddings are fixed to the size its weights were trained at.
        pretrained_size=int(t.crop_size[0]) if _patch_size(name) else None,
        default_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
    )


def _size_problem(name: str, size: int) -> str | None:
    """Returns what is wrong with `size` for the architecture itself, or None."""
    patch = _patch_size(name)
    if patch and (size < patch or size % patch):
        lower, upper = size - size % patch, size - size % patch + patch
        choices = f"{lower} or {upper}" if lower >= patch else f"{upper}"
        return (
            f"{name} cuts images into {patch} px patches, so the image size must be a "
            f"multiple of {patch}; {size} is not. Use --image-size {choices}."
        )
    if name.startswith("maxvit") and (size < 221 or -(-size // 32) % 7):
        return (
            f"{name} splits its feature maps into 7x7 windows, which needs an image size "
            f"of 221-224, 445-448, ... (up to 3 px below a multiple of 224); {size} is not. "
            "Use --image-size 224."
        )
    spec = input_spec(name)
    if size < spec.min_size:
        return (
            f"{name} needs images of at least {spec.min_size} px, got {size}. "
            f"Use --image-size {max(spec.min_size, 64)} or larger."
        )
    return None


def check_image_size(name: str, size: int, *, pretrained: bool) -> str | None:
    """Returns None when `name` takes `size` px input, else a message with the valid sizes."""
    if name not in _registry():
        return None  # the model field reports unknown names
    spec = input_spec(name)
    if pretrained and spec.pretrained_size and size != spec.pretrained_size:
        return (
            f"{name} with pretrained weights needs --image-size {spec.pretrained_size} "
            f"exactly (its position embeddings are fixed to that size), got {size}. "
            f"Use --image-size {spec.pretrained_size}, or --weights none to train it from "
            f"scratch at a multiple of {_patch_size(name)} px."
        )
    return _size_problem(name, int(size))


@cache
def _weights_meta(name: str) -> dict:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    return {
        "name": name,
        "params": int(weights.meta["num_params"]),
        "acc1": metrics.get("acc@1"),
        "acc5": metrics.get("acc@5"),
        "file_mb": weights.meta.get("_file_size"),
        "gflops": weights.meta.get("_ops"),
        "weights": f"{type(weights).__name__}.{weights.name}",
        "url": weights.url,
        "categories": len(weights.meta.get("categories") or []),
    }


def model_info(name: str) -> dict:
    """Returns what torchvision's weights meta knows (params, acc1, acc5, file_mb, weights, url, cache_file).

    Also: gflops, categories (class count of the weights), min_size and default_size.
    `cache_file` is where torchvision's download writes the weights under the current
    torch hub directory ($TORCH_HOME), so it is computed on every call.
    """
    _check_name(name)
    info = dict(_weights_meta(name))
    filename = os.path.basename(info["url"])
    info["cache_file"] = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    spec = input_spec(name)
    info["min_size"] = spec.min_size
    info["default_size"] = spec.default_size
    return info


# ---------------------------------------------------------------------------------------
# The forward cut at a group boundary (the frozen-prefix cache; issue 11, part 3)


class CannotSplit(Exception):  # noqa: N818 - a reason, not a failure: the engine runs uncached
    """The model's forward cannot be cut exactly at a group boundary; str() says why."""


@dataclass(frozen=True)
class ForwardSplit:
    """The model's forward cut where group `boundary` starts (0-based, stem first;
    len(groups) = the head): rest(prefix(x)) is the model's logits for x, op for op."""

    boundary: int
    prefix: Callable[[torch.Tensor], torch.Tensor]  # groups[:boundary] (and what runs among them)
    rest: Callable[[torch.Tensor], torch.Tensor]  # groups[boundary:] and the head -> logits
    prefix_modules: tuple[nn.Module, ...]  # the modules prefix calls, for the engine's mode check


@cache
def _reads_training(cls: type) -> bool:
    """True when a module class's own forward reads self.training (StochasticDepth, Swin's
    attention, DenseNet's layers): such a module is kept whole when tracing, so that it runs
    in the mode it has at each call, not in the one it had when traced."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "self.training" in source


def mode_dependent(module: nn.Module) -> bool:
    """Returns True when module's output depends on train/eval mode (dropout, BatchNorm, a
    forward that reads self.training)."""
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)
    return isinstance(module, kinds) or _reads_training(type(module))


class _Tracer(torch.fx.Tracer):
    proxy_buffer_attributes = True  # buffers as get_attr nodes: they follow the model's device

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or _reads_training(type(m))


def _signature(graph: torch.fx.Graph) -> list[tuple[str, str, str]]:
    """Returns the graph's nodes as (op, target, args) with nodes named by position."""
    index: dict[torch.fx.Node, int] = {}
    out = []
    for i, node in enumerate(graph.nodes):
        index[node] = i
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: f"%{index[a]}")
        out.append((node.op, str(node.target), repr(args)))
    return out


def _trace(model: nn.Module) -> torch.fx.Graph:
    """Returns the model's forward as an fx graph; raises CannotSplit when it cannot be traced
    or its Python code takes another path in train mode than in eval mode."""
    modes = {m: m.training for m in model.modules()}
    try:
        graphs = []
        for train in (True, False):
            model.train(train)
            graphs.append(_Tracer().trace(model))
    except Exception as e:  # fx raises many kinds on data-dependent Python code
        raise CannotSplit(f"its forward cannot be traced ({type(e).__name__}: {e})") from None
    finally:
        for m, training in modes.items():
            m.training = training
    if _signature(graphs[0]) != _signature(graphs[1]):
        raise CannotSplit("its forward runs other operations in train mode than in eval mode")
    graph = graphs[0]
    if any(
        n.op == "get_attr" and str(n.target).startswith("_tensor_constant") for n in graph.nodes
    ):
        raise CannotSplit("its forward uses tensors that are neither parameters nor buffers")
    return graph


def _one_tensor(values: list[torch.fx.Node]) -> bool:
    return len(values) == 1 and values[0].op != "placeholder"  # not the input image itself


def split_forward(parts: ModelParts, boundary: int) -> ForwardSplit:
    """Returns the model's forward cut where group `boundary` starts (1 .. len(groups); at
    len(groups) the cut is the head's input: forward_features and forward_head).

    Inside the backbone the cut is found on the model's fx graph, traced with the modules
    that read self.training kept whole (their mode is read at every call): prefix is every
    operation up to the first one of groups[boundary:], rest the operations from there on,
    and the cut must be one tensor (the rest uses neither the input image nor any other
    value of the prefix). The parameterless steps between two groups (a residual sum, a
    concatenation, ReLU or pooling) fall into the prefix, or as few of them as one tensor
    at the cut needs; the engine checks their modes. Raises CannotSplit with the reason where that does not hold. Both halves call the
    model's own modules and parameters (no copies): build the split after the model is on
    its device."""
    n = len(parts.groups)
    if not 1 <= boundary <= n:
        raise ValueError(f"a split boundary is 1 to {n} for {parts.name}, got {boundary}")
    model = parts.model
    if boundary == n:
        above = [m for name, m in model.named_modules() if name and not _under(name, parts.head)]
        return ForwardSplit(n, parts.forward_features, parts.forward_head, tuple(above))
    graph = _trace(model)
    owners = [(p, i) for i, g in enumerate(parts.groups) for p in g.prefixes]
    owners.append((parts.head, n))

    def owned(node: torch.fx.Node) -> set[int]:
        if node.op not in ("call_module", "get_attr"):
            return set()
        t = str(node.target)
        return {i for p, i in owners if _under(t, p) or _under(p, t)}

    nodes = list(graph.nodes)
    own = [owned(node) for node in nodes]
    where = f"{parts.groups[boundary].name} of {parts.name}"
    if any(o and min(o) < boundary <= max(o) for o in own):
        raise CannotSplit(f"a module of {where} is also part of a group below it")
    below = [i for i, o in enumerate(own) if o and max(o) < boundary]
    above = [i for i, o in enumerate(own) if o and min(o) >= boundary and nodes[i].op != "get_attr"]
    if not below or not above or max(below) > min(above):
        raise CannotSplit(f"the groups below {where} do not all run before it")
    position = {node: i for i, node in enumerate(nodes)}

    def crossing(cut: int) -> list[torch.fx.Node]:  # values made below the cut, used above it
        return [
            node
            for node in nodes[:cut]
            if node.op != "get_attr" and any(position[u] >= cut for u in node.users)
        ]

    # the latest cut between the two groups where one tensor crosses: the parameterless
    # steps that finish the lower group (a residual sum, a concatenation) fall below it
    cuts = [c for c in range(min(above), max(below), -1) if _one_tensor(crossing(c))]
    if not cuts:
        raise CannotSplit(f"more than one value passes from the groups below {where} to it")
    cut = cuts[0]
    passed = crossing(cut)[0]

    head_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes[:cut]:
        env[node] = head_graph.node_copy(node, lambda a: env[a])
    head_graph.output(env[passed])

    rest_graph = torch.fx.Graph()
    env = {passed: rest_graph.placeholder("prefix_output")}
    for node in nodes[cut:]:
        for arg in node.all_input_nodes:
            if arg not in env:  # a parameter or buffer fetched below the cut and used above
                env[arg] = rest_graph.node_copy(arg)
        env[node] = rest_graph.node_copy(node, lambda a: env[a])
    prefix = torch.fx.GraphModule(model, head_graph, class_name="Prefix")
    prefix.graph.eliminate_dead_code()  # what only the rest used (its parameters, fetched early)
    prefix.recompile()
    rest = torch.fx.GraphModule(model, rest_graph, class_name="Rest")
    called = tuple(
        model.get_submodule(str(node.target)) for node in nodes[:cut] if node.op == "call_module"
    )
    return ForwardSplit(boundary, prefix, rest, called)
