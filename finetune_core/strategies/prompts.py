"""VPT's prompt tokens in torchvision's VisionTransformer (imports torch).

Each prompted block gets a parameter `vpt_prompt` (1, tokens, hidden) and a forward
pre-hook: the first block inserts its prompts after the class token (the patch tokens
already carry their position embeddings, the prompts none, as in Jia et al. 2022); each
later block of deep VPT replaces the prompts' outputs of the block before with its own.
The head reads the class token, so it sees the prompts only through attention. The model
keeps torchvision's module names and every weight of its own: a prompt belongs to the
backbone group of its block.
"""

from __future__ import annotations

import functools
import math

import torch
import torchvision
from torch import nn

PROMPT = "vpt_prompt"  # the name of each block's prompt tokens (a parameter of the block)


def is_prompt(name: str) -> bool:
    """Returns True for the name of a block's prompt tokens in a state dict or a model."""
    return name.rsplit(".", 1)[-1] == PROMPT


def is_vit(model: nn.Module) -> bool:
    """Returns True for torchvision's VisionTransformer (vit_b_16, ..., vit_h_14)."""
    return isinstance(model, torchvision.models.VisionTransformer)


def _prompted(block: nn.Module, args: tuple, *, replace: bool) -> tuple:
    (x,) = args  # EncoderBlock.forward(input): (batch, 1 + tokens, hidden)
    prompt = getattr(block, PROMPT)
    prompt = prompt.expand(x.shape[0], -1, -1).to(x.dtype)
    rest = x[:, 1 + prompt.shape[1] :] if replace else x[:, 1:]
    return (torch.cat([x[:, :1], prompt, rest], dim=1),)


def insert(parts, *, deep: bool, tokens: int) -> None:
    """Gives parts' ViT its prompt tokens: before every block (deep) or the first; each
    initialised uniformly in +-sqrt(6 / (3 * patch^2 + hidden)) as Jia et al. do."""
    model = parts.model
    if not is_vit(model):
        raise ValueError(f"strategy: vpt needs a vision transformer, and {parts.name} is not one")
    blocks = list(model.encoder.layers)
    bound = math.sqrt(6.0 / (3 * model.patch_size**2 + model.hidden_dim))
    like = model.class_token
    for i, block in enumerate(blocks if deep else blocks[:1]):
        prompt = nn.Parameter(
            torch.empty(1, tokens, model.hidden_dim, device=like.device, dtype=like.dtype)
        )
        if prompt.device.type != "meta":
            nn.init.uniform_(prompt, -bound, bound)
        block.register_parameter(PROMPT, prompt)
        block.register_forward_pre_hook(functools.partial(_prompted, replace=i > 0))


def files(parts) -> dict[str, dict]:
    """Returns VPT's own files: prompts.safetensors (every block's prompts and the head,
    under the model's names) and prompts.json (what loading them needs)."""
    state = parts.model.state_dict()
    tensors = {k: v for k, v in state.items() if is_prompt(k)}
    blocks = [k.rsplit(".", 1)[0] for k in tensors]
    tensors.update({k: v for k, v in state.items() if parts.is_head(k)})
    first = tensors[f"{blocks[0]}.{PROMPT}"]
    settings = {
        "method": "vpt",
        "model": parts.name,
        "vpt_mode": "deep" if len(blocks) > 1 else "shallow",
        "vpt_tokens": int(first.shape[1]),
        "prompted_blocks": blocks,
        "head": parts.head,
        "merged": False,  # prompts are tokens, not weights: they cannot be merged
    }
    return {"prompts.safetensors": tensors, "prompts.json": settings}
