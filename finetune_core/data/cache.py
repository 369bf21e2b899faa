"""The decoded-tensor cache: decoded images on disk, keyed by what they were decoded from,
so a second run on the same data starts at once. Least recently used entries go first."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from finetune_core.data.base import data_dir
from finetune_core.util.files import atomic_write

DECODED_CACHE_MAX_BYTES = 4 * 2**30  # the decoded-tensor cache keeps at most this much
_CACHE_FORMAT = 1  # bump when the decoding changes, so old cache entries are not used


def path_for(key_parts) -> Path:
    """Returns the cache file for what the images were decoded from (files, size, ...)."""
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, key_parts]).encode()).hexdigest()[:24]
    return data_dir() / "decoded" / f"{key}.pt"


def load(path: Path) -> dict | None:
    """Returns the cached {"images", "bad"} blob, or None when there is none to use."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        os.utime(path)  # most recently used: pruned last
        return blob
    except Exception:  # missing, torn or from another version: decode again
        return None


def store(path: Path, blob: dict) -> None:
    """Caches a blob unless it is too large, then drops the least recently used entries
    beyond the size limit. Never fails: a full disk only costs the next run its head start."""
    nbytes = blob["images"].numel()
    if nbytes > DECODED_CACHE_MAX_BYTES // 2:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
        entries = sorted(path.parent.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for p in entries:
            total += p.stat().st_size
            if total > DECODED_CACHE_MAX_BYTES and p != path:
                p.unlink(missing_ok=True)
    except OSError:  # a full or read-only disk only costs the next run its head start
        pass
