"""Augmentation on whole uint8 batches (flip, random-resized crop) and normalisation."""

from __future__ import annotations

import math

import torch


def _rand(generator: torch.Generator | None, shape, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def flip_mask(generator: torch.Generator | None, n: int, device) -> torch.Tensor:
    """Returns which of n images `flip` mirrors (bool [n] on device): the generator's draws
    that augment_batch makes, so a cache of both views can pick the same ones."""
    return _rand(generator, (n,), device) < 0.5


def augment_batch(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Returns uint8 images with `mode` (none | flip | crop) applied per image, same device.

    crop is a random-resized crop (area 35-100 %, aspect 3/4-4/3, as torchvision samples it)
    back to the same size, plus a random horizontal flip, done for the whole batch at once
    with two batched matrix products (bilinear, borders clamped).
    """
    if mode == "none" or len(images) == 0:
        return images
    b = images.shape[0]
    if mode == "flip":
        flip = flip_mask(generator, b, images.device)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)
    if mode != "crop":
        raise ValueError(f"unknown augment {mode!r}; choose none, flip or crop")
    h, w = images.shape[-2:]
    draws = _rand(generator, (b, 42), "cpu").double().tolist()  # 10 attempts x 4, flip, spare
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    params = []
    for r in draws:
        cw, ch, top, left = w, h, 0.0, 0.0  # the whole image when no attempt fits
        for k in range(10):  # torchvision's RandomResizedCrop: the first attempt that fits
            area = (0.35 + 0.65 * r[4 * k]) * h * w
            ratio = math.exp(lo + (hi - lo) * r[4 * k + 1])
            tw, th = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < tw <= w and 0 < th <= h:
                cw, ch = tw, th
                top = math.floor(r[4 * k + 2] * (h - th + 1))
                left = math.floor(r[4 * k + 3] * (w - tw + 1))
                break
        # Output pixel x (normalised, align_corners=False) samples the source at a*x + t.
        ax = -cw / w if r[40] < 0.5 else cw / w
        params.append((ax, (2 * left + cw) / w - 1, ch / h, (2 * top + ch) / h - 1))
    p = torch.tensor(params, dtype=torch.float32).to(images.device)
    # Axis-aligned crop + bilinear resize is separable: out = Ry @ image @ Rx^T per image,
    # two small batched matmuls (much cheaper than grid_sample on CPU).
    rx = _interp_matrix(p[:, 0], p[:, 1], w, w)  # [B, S, W]
    ry = _interp_matrix(p[:, 2], p[:, 3], h, h)  # [B, S, H]
    b, c = images.shape[:2]
    cols = (images.float().view(b, c * h, w) @ rx.transpose(1, 2)).view(b, c, h, w)
    return (ry[:, None] @ cols).round_().to(torch.uint8)


def _interp_matrix(a: torch.Tensor, t: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """Returns [B, n_out, n_in] bilinear weights sampling normalised source a*x + t (border)."""
    xo = (torch.arange(n_out, dtype=torch.float32, device=a.device) * 2 + 1) / n_out - 1
    src = ((a[:, None] * xo + t[:, None]) + 1) * n_in / 2 - 0.5  # pixel coordinates
    src = src.clamp(0, n_in - 1)
    i0 = src.floor()
    frac = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=n_in - 1)
    m = torch.zeros((len(a), n_out, n_in), dtype=torch.float32, device=a.device)
    m.scatter_add_(2, i0[..., None], (1 - frac)[..., None])
    m.scatter_add_(2, i1[..., None], frac[..., None])
    return m


def normalize(images: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """Returns (images/255 - mean)/std as dtype."""
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    mean_t = torch.as_tensor(mean, dtype=work, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=work, device=images.device).view(1, -1, 1, 1)
    x = images.to(work).mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)
    return x.to(dtype)
