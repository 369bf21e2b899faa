"""Zips: extracted once into the data folder, keyed by their sha256, refusing what is unsafe
(paths outside the folder, links, passwords, zip bombs)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
import zipfile
from pathlib import Path

from finetune_core.data.base import DataError, data_dir
from finetune_core.util.files import write_text_atomic

ZIP_MAX_BYTES = 16 * 2**30  # uncompressed size above which a zip is refused (zip bomb)
ZIP_MAX_FILES = 2_000_000


def _zip_digest(path: Path) -> str:
    """Returns the zip's sha256, remembered by (path, size, mtime) so re-use costs no hashing."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = data_dir() / "zips" / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = digest
    write_text_atomic(memo_file, json.dumps(memo))
    return digest


def _safe_member(info: zipfile.ZipInfo, label: str) -> str | None:
    """Returns the member's relative path to extract, None to skip it; DataError when unsafe."""
    name = info.filename.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or any(p == ".." for p in parts):
        raise DataError(
            f"{label} is not safe to extract: member {info.filename!r} points outside the "
            f"folder (absolute path or '..'). Re-create the zip from the dataset folder."
        )
    mode = info.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        raise DataError(
            f"{label} contains a symbolic link ({info.filename!r}), which is refused for "
            f"safety. Re-create the zip with the real files."
        )
    if info.flag_bits & 0x1:
        raise DataError(
            f"{label} is password protected ({info.filename!r}); unzip it yourself and "
            f"give the folder instead."
        )
    if not parts or parts[0] == "__MACOSX":
        return None
    return "/".join(parts)


def extract_zip(path: Path, label: str) -> Path:
    """Returns the folder the zip is extracted to (once; cached by the zip's sha256)."""
    digest = _zip_digest(path)
    zips = data_dir() / "zips"
    dest = zips / f"{digest[:20]}"
    if dest.is_dir():
        return dest
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{label} is not a readable zip file ({e}).") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > ZIP_MAX_FILES:
            raise DataError(f"{label} has {len(infos)} entries, more than {ZIP_MAX_FILES}.")
        members = [(info, _safe_member(info, label)) for info in infos]
        total = sum(info.file_size for info in infos)
        if total > ZIP_MAX_BYTES:
            raise DataError(
                f"{label} would unpack to {total / 2**30:.1f} GiB, more than the "
                f"{ZIP_MAX_BYTES / 2**30:.0f} GiB allowed (a zip bomb?). Unzip it yourself "
                f"and give the folder instead."
            )
        zips.mkdir(parents=True, exist_ok=True)
        tmp = zips / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for info, rel in members:
                if rel is None:
                    continue
                target = tmp / rel
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                # zipfile never yields more than the header's file_size, which `total` bounds.
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as e:
            raise DataError(f"{label} could not be extracted ({e}).") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest
