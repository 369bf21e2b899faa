"""Splits: how many images of each class go to train, val and test, stratified and seeded."""

from __future__ import annotations

import torch

from finetune_core.data.base import DataInfo


def _portion(n: int, fraction: float) -> int:
    """Returns how many of n images a split of `fraction` gets: rounded, at least one."""
    if fraction <= 0:
        return 0
    return max(1, int(n * fraction + 0.5))


def carve(counts: dict[str, dict[str, int]]) -> tuple[str, bool, bool]:
    """Returns (pool split, carve val?, carve test?) for the splits the data gives."""
    if "all" in counts:
        return "all", True, True
    return "train", "val" not in counts, "test" not in counts


def split_sizes(info: DataInfo, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Returns {"train", "val", "test": images} as load_data will split the data (per class,
    rounded as it rounds), from the counts alone (files it cannot read still count)."""
    pool, carve_val, carve_test = carve(info.counts)
    vf = val_fraction if carve_val else 0.0
    tf = test_fraction if carve_test else 0.0
    sizes = {"train": 0, "val": 0, "test": 0}
    for n in info.counts[pool].values():
        val, test = _portion(n, vf), _portion(n, tf)
        sizes["train"] += n - val - test
        sizes["val"] += val
        sizes["test"] += test
    for split in ("val", "test"):
        if split in info.counts:  # given by its own folder
            sizes[split] = sum(info.counts[split].values())
    return sizes


def check_split(info: DataInfo, val_fraction: float, test_fraction: float) -> str | None:
    """Returns a message when a class has too few images for the split, else None."""
    pool, carve_val, carve_test = carve(info.counts)
    vf = val_fraction if carve_val else 0.0
    tf = test_fraction if carve_test else 0.0
    if carve_val and val_fraction <= 0:
        return (
            "the data has no val/ folder, so --val-fraction must be above 0 "
            "(0.2 keeps a fifth of each class for validation)."
        )
    if vf + tf >= 1:
        return f"--val-fraction {vf} plus --test-fraction {tf} leaves nothing to train on."
    need = 1 + (vf > 0) + (tf > 0)
    parts = ["1 train"] + (["1 val"] if vf > 0 else []) + (["1 test"] if tf > 0 else [])
    for c in info.classes:
        n = info.counts[pool].get(c, 0)
        if n - _portion(n, vf) - _portion(n, tf) < 1:
            where = "" if pool == "all" else f" in {pool}/"
            return (
                f"class {c!r} has {n} image{'s' if n != 1 else ''}{where}; this split "
                f"(val fraction {vf:g}, test fraction {tf:g}) needs at least {need} per class "
                f"({', '.join(parts)}). Add images to that class, or lower --val-fraction / "
                f"--test-fraction."
            )
    return None


def split_indices(
    labels: torch.Tensor, num_classes: int, vf: float, tf: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns stratified (train, val, test) index tensors into labels, seeded."""
    g = torch.Generator().manual_seed(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test, n_val = _portion(len(idx), tf), _portion(len(idx), vf)
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    return tuple(torch.sort(torch.cat(p)).values for p in parts)  # type: ignore[return-value]
