"""peft's adapters on torchvision models: which layers get them, putting them in (in place,
with peft's own `inject_adapter_in_model`), merging them back out, and peft's own files.

Imports torch; peft only inside the functions that use it (its import takes seconds).
The model keeps its module names: an adapted layer `layer4.0.conv1` becomes peft's layer
with `base_layer` (the frozen original) and `lora_A`/`lora_B` (or loha's, lokr's, ia3's
pieces) inside, so backbone groups and the head are found as before.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import re
from typing import Any

import torch
import torchvision
from torch import nn

from finetune_core.strategies.peft_methods import CNN_TOP_GROUPS

_CONV_LINEAR = (nn.Conv2d, nn.Linear)
# the layer types each method adapts (peft 0.21: DoRA, LoHa, LoKr and IA3 refuse nn.MultiheadAttention)
KINDS: dict[str, tuple[type, ...]] = {
    "lora": (*_CONV_LINEAR, nn.MultiheadAttention),
    "dora": _CONV_LINEAR,
    "loha": _CONV_LINEAR,
    "lokr": _CONV_LINEAR,
    "ia3": _CONV_LINEAR,
}
RANKED = {"lora", "dora", "loha", "lokr"}  # the methods with a rank
# a ViT's layers that `auto` adapts, after encoder.layers.<block>.: LoRA adapts the fused
# attention (its q, k, v and output projections) and the MLP; the others only the MLP, since
# peft adapts a fused attention with LoRA alone, and an adapter on its out_proj would never
# run (the attention reads that layer's weight, it does not call it)
_VIT_AUTO = {
    "lora": ("self_attention", "mlp.0", "mlp.3"),
    "ia3": ("mlp.3",),  # IA3: the MLP's hidden activations (mlp.3's input), as in Liu et al.
}
_VIT_AUTO_DEFAULT = ("mlp.0", "mlp.3")
_VIT_FEEDFORWARD = re.compile(r"encoder\.layers\.[^.]+\.mlp\.3$")  # IA3 scales its input


class TargetError(ValueError):
    """The adapter options do not fit the model: `field` is the option to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def is_vit(model: nn.Module) -> bool:
    """Returns True for torchvision's VisionTransformer (vit_b_16, ..., vit_h_14)."""
    return isinstance(model, torchvision.models.VisionTransformer)


def _kind_names(method: str) -> str:
    return ", ".join(k.__name__ for k in KINDS[method])


def _called(method: str) -> str:
    return "lora with DoRA" if method == "dora" else method


def _limit(module: nn.Module) -> tuple[int, int]:
    """Returns (fan in, fan out) of a layer's weight: a rank above the smaller is no use."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw, module.out_channels
    return module.embed_dim, 3 * module.embed_dim  # MultiheadAttention's fused projection


def _rank_problem(path: str, module: nn.Module, method: str, rank: int) -> str | None:
    fan_in, fan_out = _limit(module)
    if rank > min(fan_in, fan_out):
        return (
            f"rank {rank} is more than {path} allows: its weight is {fan_out} x {fan_in}, so "
            f"at most {min(fan_in, fan_out)}; use --adapter-rank {min(fan_in, fan_out)} or "
            "less, or leave that layer out of --adapter-targets"
        )
    groups = getattr(module, "groups", 1)
    if method in ("lora", "dora") and groups > 1 and rank % groups:
        return (
            f"LoRA adapts the grouped convolution {path} ({groups} groups) only at a rank that "
            f"is a multiple of {groups}; use --adapter-rank {groups * max(1, rank // groups)}, "
            "or leave that layer out of --adapter-targets"
        )
    return None


def _chosen_groups(parts, values: dict[str, Any], vit: bool) -> list:
    k = values["adapter_groups"] or (len(parts.groups) if vit else CNN_TOP_GROUPS)
    return parts.groups[max(0, len(parts.groups) - k) :]


def _group_of(path: str, groups) -> str | None:
    for g in groups:
        if any(path == p or path.startswith(p + ".") for p in g.prefixes):
            return g.name
    return None


def select(parts, method: str, values: dict[str, Any]) -> list[str]:
    """Returns the module paths of the layers that get adapters; TargetError naming the
    option when the options select none, or a layer the method cannot adapt at that rank."""
    model, name = parts.model, parts.name
    vit = is_vit(model)
    groups = _chosen_groups(parts, values, vit)
    listed = ", ".join(g.name for g in groups)
    if len(groups) == len(parts.groups):
        where = f"the backbone of {name}"
    elif len(groups) == 1:
        where = f"the top backbone group of {name} ({listed})"
    else:
        where = f"the top {len(groups)} backbone groups of {name} ({listed})"
    rank = values.get("adapter_rank") if method in RANKED else None
    attention_outputs = {
        f"{p}.out_proj" if p else "out_proj"
        for p, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
    layers = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, KINDS[method])
        and not parts.is_head(path)
        and path not in attention_outputs  # never called: see _VIT_AUTO
    ]
    in_groups = [(p, m) for p, m in layers if _group_of(p, groups) is not None]
    spec = str(values["adapter_targets"]).strip()
    if spec == "auto":
        if vit:
            ends = _VIT_AUTO.get(method, _VIT_AUTO_DEFAULT)
            rule = re.compile(r"encoder\.layers\.[^.]+\.(" + "|".join(map(re.escape, ends)) + ")$")
            chosen = [(p, m) for p, m in in_groups if rule.match(p)]
        else:  # what a rank fits: auto leaves out the layers too small for it
            chosen = [
                (p, m)
                for p, m in in_groups
                if not isinstance(m, nn.MultiheadAttention)
                and (rank is None or _rank_problem(p, m, method, rank) is None)
            ]
        if not chosen and in_groups and rank is not None:
            raise TargetError(
                "adapter_rank",
                f"every layer {_called(method)} could adapt in {where} is too small for rank "
                f"{rank}; use a lower --adapter-rank, or more --adapter-groups",
            )
        if not chosen:
            raise TargetError(
                "adapter_groups",
                f"{where} holds no layer {_called(method)} can adapt ({_kind_names(method)}); "
                f"use --adapter-groups with more groups (0 = the default, up to "
                f"{len(parts.groups)})",
            )
    else:
        patterns = [p.strip() for p in spec.split(",") if p.strip()]
        if not patterns:
            raise TargetError(
                "adapter_targets", "name at least one layer, or auto for the method's default"
            )
        every = [p for p, _ in model.named_modules() if p]
        examples = ", ".join(p for p, _ in layers[-3:])
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(p, pattern) for p in every):
                raise TargetError(
                    "adapter_targets",
                    f"{pattern!r} matches no layer of {name}; its layers are named like "
                    f"{examples} (* matches any part of a name)",
                )
        chosen = [(p, m) for p, m in in_groups if any(fnmatch.fnmatchcase(p, x) for x in patterns)]
        if not chosen:
            attention = any(
                (isinstance(m, nn.MultiheadAttention) or p in attention_outputs)
                and fnmatch.fnmatchcase(p, x)
                for p, m in model.named_modules()
                for x in patterns
            )
            hint = (
                "; peft adapts a fused attention (MultiheadAttention) with lora only, and as "
                "a whole (an adapter on its out_proj would never run: the attention reads its "
                "weight without calling it)"
                if attention
                else ""
            )
            raise TargetError(
                "adapter_targets",
                f"{spec!r} matches no layer {_called(method)} can adapt ({_kind_names(method)}) in "
                f"{where}{hint}; such layers are named like {examples}"
                + (
                    f", or use --adapter-groups {len(parts.groups)} for every group"
                    if len(groups) < len(parts.groups)
                    else ""
                ),
            )
    if rank is not None and (vit or spec != "auto"):  # a CNN's auto has left them out
        for p, m in chosen:
            problem = _rank_problem(p, m, method, rank)
            if problem:
                raise TargetError("adapter_rank", problem)
    fused = [p for p, m in chosen if isinstance(m, nn.MultiheadAttention)]
    # peft adapts a fused attention's out_proj with it: never twice
    return [p for p, _ in chosen if not any(p.startswith(f + ".") for f in fused)]


def problems(parts, method: str, values: dict[str, Any]) -> dict[str, str]:
    """Returns {field: message} when the options select no layer or one the method cannot
    adapt (parts: the model as built, not prepared; the meta device will do)."""
    try:
        select(parts, method, values)
    except TargetError as e:
        return {e.field: str(e)}
    return {}


def peft_config(method: str, values: dict[str, Any], targets: list[str], vit: bool):
    """Returns peft's config of the method for these target layers (full module paths)."""
    import peft

    if method in ("lora", "dora"):
        return peft.LoraConfig(
            r=values["adapter_rank"],
            lora_alpha=values["adapter_alpha"],
            lora_dropout=values["lora_dropout"],
            use_dora=method == "dora",
            target_modules=targets,
        )
    if method == "loha":
        return peft.LoHaConfig(
            r=values["adapter_rank"], alpha=values["adapter_alpha"], target_modules=targets
        )
    if method == "lokr":
        return peft.LoKrConfig(
            r=values["adapter_rank"], alpha=values["adapter_alpha"], target_modules=targets
        )
    feedforward = [t for t in targets if vit and _VIT_FEEDFORWARD.search(t)]
    return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)


def insert(parts, method: str, values: dict[str, Any]) -> None:
    """Puts the method's adapters into parts' model in place (peft.inject_adapter_in_model);
    ValueError naming the option when the options select no layer it can adapt."""
    import peft

    try:
        targets = select(parts, method, values)
    except TargetError as e:
        raise ValueError(f"{e.field}: {e}") from None
    config = peft_config(method, values, targets, is_vit(parts.model))
    peft.inject_adapter_in_model(config, parts.model)
    for path in targets:
        layer = parts.model.get_submodule(path)
        base = layer.get_base_layer()
        if isinstance(base, nn.MultiheadAttention):
            saved: list[nn.Parameter] = []
            layer.register_forward_pre_hook(functools.partial(_save_base_weights, saved=saved))
            layer.register_forward_hook(
                functools.partial(_restore_base_weights, saved=saved), always_call=True
            )
        if method == "dora" and isinstance(base, nn.Conv2d):
            layer.register_forward_pre_hook(_contiguous_down_projection)


# peft 0.21's LoRA on a fused attention adds the adapters' update to the base weights before
# each forward pass and subtracts it after: in floating point that leaves the frozen weights a
# rounding off, step after step. These two hooks put the very weights of before back.


def _base_weights(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    attention = layer.get_base_layer()
    return attention, attention.out_proj.get_base_layer()


def _save_base_weights(layer: nn.Module, args: tuple, *, saved: list) -> None:
    attention, out_proj = _base_weights(layer)
    saved[:] = [attention.in_proj_weight, out_proj.weight]


def _restore_base_weights(layer: nn.Module, args: tuple, output, *, saved: list) -> None:
    if not saved:
        return
    attention, out_proj = _base_weights(layer)
    in_proj_weight, out_weight = saved
    saved.clear()
    del attention.in_proj_weight
    attention.register_parameter("in_proj_weight", in_proj_weight)
    del out_proj.weight
    out_proj.register_parameter("weight", out_weight)


def _contiguous_down_projection(layer: nn.Module, args: tuple) -> None:
    """Keeps DoRA's lora_A weights of a convolution contiguous: peft 0.21 views them as a
    matrix, which fails once the engine has made the model channels_last (CPU and CUDA)."""
    for down in layer.lora_A.values():
        if not down.weight.is_contiguous():
            down.weight.data = down.weight.data.contiguous()


def merged(parts):
    """Returns a copy of parts with every adapter merged into its layer and peft's layers
    replaced by the plain ones: torchvision's model, its state dict in torchvision's keys
    (what peft's merge_and_unload does, for a model that peft did not wrap)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(parts.model)
    adapted = [p for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    outermost = [p for p in adapted if not any(p.startswith(o + ".") for o in adapted)]
    with torch.no_grad():
        for path in outermost:
            layer = model.get_submodule(path)
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if hasattr(layer, "unload_and_optionally_merge_module"):  # MultiheadAttention
                plain = layer.unload_and_optionally_merge_module(
                    merge=True, safe_merge=True, adapter_names=None
                )
            else:
                layer.merge(safe_merge=True)  # safe: refuses weights that became non-finite
                plain = layer.get_base_layer()
            setattr(parent, child, plain)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return dataclasses.replace(parts, model=model)


def peft_files(parts) -> dict[str, dict]:
    """Returns peft's own files of the adapters and the head (what PeftModel.save_pretrained
    writes): adapter_model.safetensors and adapter_config.json, so that
    `PeftModel.from_pretrained(torchvision_model, folder)` loads them onto the base model."""
    from peft import get_peft_model_state_dict

    model = parts.model
    config = copy.copy(model.peft_config["default"])
    config.modules_to_save = [parts.head]  # the head trains whole, saved as it is
    config.inference_mode = True
    tensors = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    tensors.update(
        {f"base_model.model.{k}": v for k, v in model.state_dict().items() if parts.is_head(k)}
    )
    settings = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    return {"adapter_model.safetensors": tensors, "adapter_config.json": settings}
