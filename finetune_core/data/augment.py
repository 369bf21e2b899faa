"""Augmentation on whole uint8 batches on the device (flip, random-resized crop, fastai's
aug_transforms, torchvision's policies), random erasing of normalised batches, and
normalisation.

Flip and crop are batched tensor operations. The fastai-style transforms and the policies
(TrivialAugmentWide, RandAugment, AugMix) are torchvision's transforms.v2, called per image
(v2 draws one set of parameters per call, so a whole batch at once would change every image
the same way); their draws come from the batch's generator, so a batch's augmentation is the
same at every run and after a resume.
"""

from __future__ import annotations

import contextlib
import math
from functools import cache

import torch


def _rand(generator: torch.Generator | None, shape, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def flip_mask(generator: torch.Generator | None, n: int, device) -> torch.Tensor:
    """Returns which of n images `flip` mirrors (bool [n] on device): the generator's draws
    that augment_batch makes, so a cache of both views can pick the same ones."""
    return _rand(generator, (n,), device) < 0.5


# what each per-image mode applies after the mirror (transforms.v2; see _per_image)
PER_IMAGE = ("fastai", "trivialaugment", "randaugment", "augmix")
MODES = ("none", "flip", "crop", *PER_IMAGE)


def augment_batch(
    images: torch.Tensor, mode: str, generator: torch.Generator, *, flip: bool = True
) -> torch.Tensor:
    """Returns uint8 images with `mode` applied per image, on the same device.

    flip mirrors half the images left-right. crop is a random-resized crop (area 35-100 %,
    aspect 3/4-4/3, as torchvision samples it) back to the same size plus the mirror, done
    for the whole batch at once with two batched matrix products (bilinear, borders
    clamped). fastai, trivialaugment, randaugment and augmix are the mirror, then per image
    transforms.v2's policy (see _policy). flip=False leaves the mirror out of every mode.
    """
    if mode == "none" or len(images) == 0:
        return images
    b = images.shape[0]
    if mode == "flip" or mode in PER_IMAGE:
        if flip:
            mirrored = flip_mask(generator, b, images.device)
            images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
        if mode == "flip":
            return images
        return _per_image(images, _policy(mode), generator)
    if mode != "crop":
        raise ValueError(f"unknown augment {mode!r}; choose one of {', '.join(MODES)}")
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
        ax = -cw / w if flip and r[40] < 0.5 else cw / w
        params.append((ax, (2 * left + cw) / w - 1, ch / h, (2 * top + ch) / h - 1))
    p = torch.tensor(params, dtype=torch.float32).to(images.device)
    # Axis-aligned crop + bilinear resize is separable: out = Ry @ image @ Rx^T per image,
    # two small batched matmuls (much cheaper than grid_sample on CPU).
    rx = _interp_matrix(p[:, 0], p[:, 1], w, w)  # [B, S, W]
    ry = _interp_matrix(p[:, 2], p[:, 3], h, h)  # [B, S, H]
    b, c = images.shape[:2]
    cols = (images.float().view(b, c * h, w) @ rx.transpose(1, 2)).view(b, c, h, w)
    return (ry[:, None] @ cols).round_().to(torch.uint8)


@cache
def _policy(mode: str):
    """Returns the transforms.v2 transform a per-image mode applies to one uint8 image.

    fastai approximates fastai's aug_transforms (flip aside): rotation up to 10 degrees,
    zoom 1-1.1, a perspective warp of 0.2, brightness and contrast 0.2, each with p 0.75;
    fastai pads rotations by reflection, transforms.v2 with black."""
    from torchvision.transforms import v2

    if mode == "fastai":
        p = 0.75
        return v2.Compose(
            [
                v2.RandomApply([v2.RandomRotation(10)], p=p),
                v2.RandomApply([v2.RandomAffine(degrees=0, scale=(1.0, 1.1))], p=p),
                v2.RandomPerspective(distortion_scale=0.2, p=p),
                v2.RandomApply([v2.ColorJitter(brightness=0.2)], p=p),
                v2.RandomApply([v2.ColorJitter(contrast=0.2)], p=p),
            ]
        )
    if mode == "trivialaugment":
        return v2.TrivialAugmentWide()
    if mode == "randaugment":
        return v2.RandAugment()
    if mode == "augmix":
        return v2.AugMix()
    raise ValueError(f"unknown augment {mode!r}; choose one of {', '.join(MODES)}")


@contextlib.contextmanager
def drawing_from(generator: torch.Generator | None, device):
    """Makes torch's global random numbers (which transforms.v2 draws from) a function of
    the generator's next draw while inside, and gives every global generator back its own
    state afterwards, so that the model's dropout draws the same as without it."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)  # AugMix samples its weights on the batch's device
        yield


def _per_image(images: torch.Tensor, transform, generator: torch.Generator) -> torch.Tensor:
    """Returns each image of a uint8 batch through transform, with the generator's draws."""
    with drawing_from(generator, images.device):
        return torch.stack([transform(image) for image in images])


def random_erase(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Returns a normalised batch with a random rectangle of each image erased to 0 (the
    mean colour) with probability p: torchvision's RandomErasing per image (scale 2-33 %,
    aspect 0.3-3.3)."""
    if p <= 0 or len(x) == 0:
        return x
    return _per_image(x, _eraser(p), generator)


@cache
def _eraser(p: float):
    from torchvision.transforms import v2

    return v2.RandomErasing(p=p, value=0)


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
