"""Visual Prompt Tuning (Jia et al. 2022) for torchvision's vision transformers: learnable
prompt tokens inserted after the class token, before the first block (shallow) or before
every block (deep), and the head train; the backbone stays frozen. No library offers it
for torchvision's ViT, so it is written here (strategies.prompts); registered on import
without torch.

The prompts cannot be merged into the model's weights: a finished run's best weights are
the ViT with its prompts, loaded onto a model prepared with the same options.
"""

from __future__ import annotations

from finetune_core.options import Option
from finetune_core.strategies.registry import PhaseSpec, Strategy, register


def _not_a_vit(model: str) -> dict[str, str]:
    return {
        "strategy": f"vpt inserts prompt tokens into a vision transformer's sequence of patch "
        f"tokens, and {model} is not one: choose a ViT (--model vit_b_16, vit_b_32, vit_l_16, "
        f"vit_l_32, vit_h_14), or another strategy for {model} such as lora"
    }


@register
class VisualPromptTuning(Strategy):
    name = "vpt"
    summary = (
        "prompt tokens inserted into a ViT's token sequence (VPT, Jia et al. 2022; deep: "
        "before every block, shallow: before the first), and the head"
    )
    options = (
        Option(
            "vpt_mode",
            "deep",
            "vpt: deep inserts new prompt tokens before every transformer block, shallow "
            "only before the first (Jia et al. 2022 found deep the better of the two)",
            label="VPT prompts",
            choices=("deep", "shallow"),
        ),
        Option(
            "vpt_tokens",
            10,
            "vpt: prompt tokens per block (deep) or in all (shallow); Jia et al. chose 1 to "
            "200 per task, 10 is a common start",
            label="Prompt tokens",
            min=1,
            max=1000,
            step=1,
        ),
    )
    label_format = "{name} {vpt_mode} {vpt_tokens}"
    presets = ({"vpt_mode": "deep"}, {"vpt_mode": "shallow"})
    adds_pieces = True
    pieces_folder = "prompts"

    def check_groups(self, cfg, model, group_names):
        return {} if model.startswith("vit_") else _not_a_vit(model)

    def check_model(self, cfg, parts):
        from finetune_core.strategies import prompts

        return {} if prompts.is_vit(parts.model) else _not_a_vit(parts.name)

    def phases(self, cfg, group_names):
        return [PhaseSpec(f"vpt {cfg.vpt_mode}", 1, cfg.epochs, len(group_names))]

    def trainable_subset(self, parts):
        from finetune_core.strategies import prompts

        return {n for n, _ in parts.model.named_parameters() if prompts.is_prompt(n)}

    def prepare(self, parts, cfg):
        from finetune_core.strategies import prompts

        values = self.values(cfg)
        prompts.insert(parts, deep=values["vpt_mode"] == "deep", tokens=values["vpt_tokens"])

    def pieces_files(self, parts):
        from finetune_core.strategies import prompts

        return prompts.files(parts)
