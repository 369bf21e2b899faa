"""Parameter-efficient strategies through Hugging Face's peft: lora (DoRA as its option),
loha, lokr and ia3. Each adds small trainable pieces (adapters) to chosen layers of the
frozen torchvision model, in place, so that the model keeps its module names and groups.

Registered on import without torch or peft: both are imported (strategies.adapters) only
when a model is checked, prepared, merged or saved with one of these strategies, so that a
worker training anything else pays nothing for them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from finetune_core.options import Option
from finetune_core.strategies.registry import PhaseSpec, Strategy, register

CNN_TOP_GROUPS = 2  # adapter_groups 0 on a model other than a ViT: its top groups get them

RANK = Option(
    "adapter_rank",
    8,
    "lora, loha, lokr: the rank of each adapter (its factors' inner size; peft's default 8); "
    "at most the smaller of an adapted layer's input and output sizes",
    label="Adapter rank",
    min=1,
    max=4096,
    step=1,
)
ALPHA = Option(
    "adapter_alpha",
    8,
    "lora, loha, lokr: alpha, the adapter's update is scaled by alpha / rank (peft's default "
    "8; alpha = rank keeps the scale at 1)",
    label="Adapter alpha",
    min=1,
    max=100_000,
    step=1,
)
TARGETS = Option(
    "adapter_targets",
    "auto",
    "lora, loha, lokr, ia3: the layers that get adapters: auto (a ViT: each block's MLP "
    "layers, with lora its attention too, which peft adapts only with lora; another model: "
    "its convolutions and hidden linear layers that the rank fits), or module names, "
    "comma-separated, * a wildcard (layer4.*.conv2, *.mlp.0); only layers in the groups of "
    "adapter_groups count, and the head always trains whole",
    label="Adapter layers",
    max_length=500,
)
GROUPS = Option(
    "adapter_groups",
    0,
    "lora, loha, lokr, ia3: the backbone groups, counted from the top, whose layers get "
    f"adapters; 0 = every group of a ViT, the top {CNN_TOP_GROUPS} of another model",
    label="Adapter groups (from the top, 0 = default)",
    min=0,
    step=1,
)
DROPOUT = Option(
    "lora_dropout",
    0.0,
    "lora: dropout on each adapter's input while training (peft's default 0; the LoRA "
    "paper used 0.05-0.1)",
    label="LoRA dropout",
    min=0.0,
    max=0.9,
    step=0.05,
    format="%.2f",
)
DORA = Option(
    "lora_dora",
    False,
    "lora: DoRA (Liu et al. 2024), which also trains the magnitude of each adapted weight; "
    "peft cannot apply it to a fused attention, so on a ViT it adapts the MLP layers",
    label="DoRA (weight-decomposed LoRA)",
)


class PeftMethod(Strategy):
    """A peft method: the adapters of the chosen layers and the head train; nothing else."""

    adds_pieces = True
    pieces_folder = "adapter"  # peft's own layout: PeftModel.from_pretrained(model, folder)
    prefix: ClassVar[str] = ""  # what peft's names of this method's parameters start with
    label_format = "{name} r{adapter_rank}"

    def method(self, cfg: Any) -> str:
        """Returns the peft method: lora, dora, loha, lokr or ia3."""
        return self.name

    def check_groups(self, cfg, model, group_names):
        n, k = len(group_names), cfg.adapter_groups
        if k > n:
            return {
                "adapter_groups": f"{model} has {n} backbone groups ({', '.join(group_names)}); "
                f"--adapter-groups must be 0 to {n}"
            }
        return {}

    def check_model(self, cfg, parts):
        from finetune_core.strategies import adapters

        return adapters.problems(parts, self.method(cfg), self.values(cfg))

    def phases(self, cfg, group_names):
        return [PhaseSpec(self.name, 1, cfg.epochs, len(group_names))]

    def trainable_subset(self, parts):
        mark = "." + self.prefix
        return {n for n, _ in parts.model.named_parameters() if mark in n}

    def prepare(self, parts, cfg):
        from finetune_core.strategies import adapters

        adapters.insert(parts, self.method(cfg), self.values(cfg))

    def merged(self, parts):
        from finetune_core.strategies import adapters

        return adapters.merged(parts)

    def pieces_files(self, parts):
        from finetune_core.strategies import adapters

        return adapters.peft_files(parts)


@register
class Lora(PeftMethod):
    name = "lora"
    summary = (
        "low-rank adapters (LoRA, Hu et al. 2022; DoRA as an option) in the chosen layers, "
        "and the head; the backbone stays frozen"
    )
    options = (RANK, ALPHA, DROPOUT, DORA, TARGETS, GROUPS)
    prefix = "lora_"

    def method(self, cfg):
        return "dora" if self.values(cfg)["lora_dora"] else "lora"

    def label(self, cfg):
        return super().label(cfg) + (" DoRA" if self.values(cfg)["lora_dora"] else "")


@register
class LoHa(PeftMethod):
    name = "loha"
    summary = "low-rank Hadamard-product adapters (LoHa) in the chosen layers, and the head"
    options = (RANK, ALPHA, TARGETS, GROUPS)
    prefix = "hada_"


@register
class LoKr(PeftMethod):
    name = "lokr"
    summary = "low-rank Kronecker-product adapters (LoKr) in the chosen layers, and the head"
    options = (RANK, ALPHA, TARGETS, GROUPS)
    prefix = "lokr_"


@register
class IA3(PeftMethod):
    name = "ia3"
    summary = (
        "learned rescaling vectors (IA3, Liu et al. 2022) of the chosen layers' outputs (of a "
        "ViT MLP's hidden activations), and the head"
    )
    options = (TARGETS, GROUPS)
    prefix = "ia3_l"
    label_format = "{name}"
