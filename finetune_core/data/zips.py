"""Zips: extracted once into the data folder, keyed by their sha256, refusing what is unsafe
(paths outside the folder, links, passwords, malformed names) and, before a byte is
written, what would exhaust the server (too many entries, too large, compressed beyond
any image's ratio, more than the disk has free). Old extractions are deleted by a policy.

`extract_zip` is a plain function of files: any process may run it (a background job, the
worker); processes extracting the same zip at once wait for each other and share the result.

The policy for old extractions: least recently used first, once all of them together pass
FINETUNE_ZIP_CACHE_MAX_BYTES, and never one used in the last day. A size cap, since bytes
are what fill a disk (a count cap would let five 4 GiB extractions sit; an age cap alone
bounds nothing on a busy day); the day, since a run reads its extraction only while it
indexes and decodes its data, which a day covers, then trains from tensors. Deleting one
costs at most a new extraction from the zip. Each use touches `<name>.used` beside the
folder (its time is the last use; it holds the folder's size, so pruning walks nothing).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from finetune_core.data.base import DataError, data_dir, env_limit
from finetune_core.util.files import write_text_atomic
from finetune_core.util.locks import FileLock

# Limits, each settable for a server by the environment variable in its comment.
ZIP_MAX_BYTES = 4 * 2**30  # FINETUNE_ZIP_MAX_BYTES: what one zip may unpack to
ZIP_MAX_FILES = 50_000  # FINETUNE_ZIP_MAX_FILES: entries one zip may hold
ZIP_MAX_RATIO = 100  # FINETUNE_ZIP_MAX_RATIO: unpacked / packed size (images: ~1-10)
ZIP_RATIO_FROM_BYTES = 8 * 2**20  # entries (and zips) unpacking to less are not held to it
ZIP_FREE_MARGIN_BYTES = 2**30  # FINETUNE_ZIP_FREE_MARGIN_BYTES: disk kept free for runs
ZIP_CACHE_MAX_BYTES = 8 * 2**30  # FINETUNE_ZIP_CACHE_MAX_BYTES: all extractions together
ZIP_CACHE_KEEP_S = 24 * 3600  # an extraction used this recently is never deleted
NAME_MAX_BYTES = 255  # one path component, as ext4, XFS, APFS and NTFS allow
_HASH_MEMO_KEYS = 500  # zips whose sha256 is remembered by (path, size, mtime)

Progress = Callable[[float, str], None]


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
    memo = dict(list(memo.items())[-_HASH_MEMO_KEYS:])  # the most recently hashed
    with contextlib.suppress(OSError):  # a memo not written only costs a hash next time
        write_text_atomic(memo_file, json.dumps(memo))
    return digest


def _declared_entries(path: Path) -> int | None:
    """Returns the number of entries the zip's end record declares (zip64 included), read
    from its last bytes: a cap on entries is then checked before the directory is parsed."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = min(size, 22 + 0xFFFF + 20)  # end record, longest comment, zip64 locator
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or len(tail) - i < 22:
            return None
        count = int.from_bytes(tail[i + 10 : i + 12], "little")
        if count == 0xFFFF and i >= 20 and tail[i - 20 : i - 16] == b"PK\x06\x07":
            f.seek(int.from_bytes(tail[i - 12 : i - 4], "little"))
            record = f.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                count = int.from_bytes(record[32:40], "little")
        return count


def _too_many(label: str, n: int, limit: int) -> DataError:
    return DataError(
        f"{label} has {n:,} entries, more than the {limit:,} a zip may hold here "
        f"(FINETUNE_ZIP_MAX_FILES); unzip it yourself and give the folder instead, or zip "
        f"fewer, larger images."
    )


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
    for p in parts:
        n = len(p.encode("utf-8", "surrogateescape"))
        if n > NAME_MAX_BYTES:
            raise DataError(
                f"{label} has an entry whose name is too long for a file system: "
                f"{p[:40]!r}... is {n} bytes, the most is {NAME_MAX_BYTES} "
                f"({info.filename[:80]!r}...). Rename it and zip again."
            )
    return "/".join(parts)


def _plan(zf: zipfile.ZipFile, path: Path, label: str) -> tuple[list, int]:
    """Returns ([(info, relative path)] to extract, bytes they unpack to); DataError when
    the zip is unsafe, malformed or exceeds a limit. Reads the directory only."""
    infos = zf.infolist()
    max_files = env_limit("FINETUNE_ZIP_MAX_FILES", ZIP_MAX_FILES)
    if len(infos) > max_files:
        raise _too_many(label, len(infos), max_files)
    ratio = env_limit("FINETUNE_ZIP_MAX_RATIO", ZIP_MAX_RATIO)
    plan, files, dirs = [], set(), set()
    for info in infos:
        rel = _safe_member(info, label)
        if rel is None:
            continue
        plan.append((info, rel))
        parts = rel.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if info.is_dir():
            dirs.add(rel)
            continue
        if rel in files:
            raise DataError(
                f"{label} has two entries named {rel!r}; which one is meant? Re-create the "
                f"zip from the dataset folder."
            )
        files.add(rel)
        if info.file_size > ZIP_RATIO_FROM_BYTES and info.file_size > ratio * info.compress_size:
            raise DataError(
                f"{label} is refused as a zip bomb: entry {info.filename!r} unpacks to "
                f"{info.file_size / 2**20:,.0f} MiB from {info.compress_size / 2**10:,.0f} KiB, "
                f"more than {ratio}:1 (FINETUNE_ZIP_MAX_RATIO); images do not compress so "
                f"well. Unzip it yourself and give the folder instead."
            )
    clash = sorted(files & dirs)
    if clash:
        raise DataError(
            f"{label} is malformed: {clash[0]!r} is both a file and a folder in it. Rename "
            f"one of them and zip again."
        )
    total = sum(info.file_size for info, _ in plan if not info.is_dir())
    max_bytes = env_limit("FINETUNE_ZIP_MAX_BYTES", ZIP_MAX_BYTES)
    if total > max_bytes:
        raise DataError(
            f"{label} would unpack to {total / 2**30:.1f} GiB, more than the "
            f"{max_bytes / 2**30:g} GiB a zip may unpack to here (FINETUNE_ZIP_MAX_BYTES; a "
            f"zip bomb?). Unzip it yourself and give the folder instead."
        )
    packed = max(path.stat().st_size, 1)
    if total > ZIP_RATIO_FROM_BYTES and total > ratio * packed:
        raise DataError(
            f"{label} is refused as a zip bomb: it unpacks to {total / 2**20:,.0f} MiB from "
            f"{packed / 2**20:,.1f} MiB, more than {ratio}:1 (FINETUNE_ZIP_MAX_RATIO); images "
            f"do not compress so well. Unzip it yourself and give the folder instead."
        )
    return plan, total


def _check_free_space(zips: Path, total: int, label: str) -> None:
    margin = env_limit("FINETUNE_ZIP_FREE_MARGIN_BYTES", ZIP_FREE_MARGIN_BYTES)
    free = shutil.disk_usage(zips).free
    if total + margin > free:
        raise DataError(
            f"{label} would unpack to {total / 2**20:,.0f} MiB, but the data folder ({zips}) "
            f"has {free / 2**20:,.0f} MiB free, of which {margin / 2**20:,.0f} MiB are kept "
            f"for runs (FINETUNE_ZIP_FREE_MARGIN_BYTES). Free some space, or point "
            f"FINETUNE_DATA_DIR at a larger disk."
        )


def _write(zf: zipfile.ZipFile, plan: list, tmp: Path, label: str, total: int, progress) -> int:
    """Writes the plan's members under tmp; returns the bytes written. Stops at the first
    entry that yields more bytes than its header says (nothing in the checks saw those)."""
    done, last = 0, 0.0
    for info, rel in plan:
        target = tmp / rel
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        left = info.file_size
        with zf.open(info) as src, open(target, "xb") as dst:
            while chunk := src.read(1 << 20):
                if len(chunk) > left:
                    raise DataError(
                        f"{label} is malformed: entry {info.filename!r} holds more than the "
                        f"{info.file_size:,} bytes its header says. Re-create the zip."
                    )
                left -= len(chunk)
                dst.write(chunk)
                done += len(chunk)
                if progress is not None and time.monotonic() - last > 0.25:
                    last = time.monotonic()
                    progress(done / max(total, 1), f"extracting {label}: {done / 2**20:,.0f} MiB")
    return done


def _marker(zips: Path, name: str) -> Path:
    return zips / f"{name}.used"


def _reuse(zips: Path, dest: Path) -> bool:
    """Returns True when dest is extracted already, marking it used (under the index lock,
    so a pruner deciding at the same moment sees the mark or leaves no folder)."""
    with FileLock(zips / ".index.lock"):
        if not dest.is_dir():
            return False
        marker = _marker(zips, dest.name)
        try:
            os.utime(marker)
        except FileNotFoundError:  # extracted before markers existed: sized when pruned
            with contextlib.suppress(OSError):
                marker.write_text("{}")
        except OSError:
            pass
    return True


def _tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def prune_extractions(need_bytes: int = 0, keep: str | None = None) -> list[str]:
    """Deletes old extractions by the policy (module docstring) so that they and a new one
    of need_bytes fit in FINETUNE_ZIP_CACHE_MAX_BYTES, and the leftovers of interrupted
    extractions; returns the names of the extractions deleted. Never fails on a busy or
    read-only folder: what it cannot delete stays."""
    zips = data_dir() / "zips"
    if not zips.is_dir():
        return []
    cap = env_limit("FINETUNE_ZIP_CACHE_MAX_BYTES", ZIP_CACHE_MAX_BYTES)
    dropped: list[str] = []
    doomed: list[Path] = []
    try:
        with FileLock(zips / ".index.lock"):
            now = time.time()
            entries = []
            for d in zips.iterdir():
                if d.name.startswith(".") or not d.is_dir():
                    continue
                marker = _marker(zips, d.name)
                try:
                    used = marker.stat().st_mtime
                    size = json.loads(marker.read_text()).get("bytes")
                except (OSError, ValueError, AttributeError):
                    used, size = d.stat().st_mtime, None
                if not isinstance(size, int):
                    size = _tree_bytes(d)
                    with contextlib.suppress(OSError):
                        marker.write_text(json.dumps({"bytes": size}))
                        os.utime(marker, (used, used))
                entries.append((used, size, d))
            total = sum(size for _, size, _ in entries)
            for used, size, d in sorted(entries, key=lambda e: e[0]):  # least recent first
                if total + need_bytes <= cap:
                    break
                if d.name == keep or now - used < ZIP_CACHE_KEEP_S:
                    continue
                trash = d.with_name(f".{d.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(d, trash)
                except OSError:
                    continue
                _marker(zips, d.name).unlink(missing_ok=True)
                doomed.append(trash)
                dropped.append(d.name)
                total -= size
            for m in zips.glob("*.used"):  # markers whose folder is gone
                if not (zips / m.stem).is_dir():
                    m.unlink(missing_ok=True)
        for leftover in zips.glob(".*.tmp-*"):  # an extraction that was interrupted
            name = leftover.name[1:].split(".tmp-")[0]
            lock = FileLock(zips / f".{name}.lock")
            if lock.try_acquire():  # nobody is extracting that zip now
                try:
                    shutil.rmtree(leftover, ignore_errors=True)
                finally:
                    lock.release()
        for lock_file in zips.glob(".*.lock"):  # of zips no longer extracted nor extracting
            name = lock_file.name[1:-5]
            if name == "index" or (zips / name).is_dir() or list(zips.glob(f".{name}.tmp-*")):
                continue
            lock = FileLock(lock_file)
            if lock.try_acquire():
                try:
                    lock_file.unlink(missing_ok=True)
                finally:
                    lock.release()
        doomed += list(zips.glob(".*.trash-*"))  # a deletion that was interrupted
    except OSError:
        pass
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return dropped


def extract_zip(path: Path, label: str, *, progress: Progress | None = None) -> Path:
    """Returns the folder the zip is extracted to (once; cached by the zip's sha256).

    Raises DataError, before writing anything, when the zip is unsafe or malformed, holds
    more than FINETUNE_ZIP_MAX_FILES entries, unpacks to more than FINETUNE_ZIP_MAX_BYTES or
    more than FINETUNE_ZIP_MAX_RATIO times its size, or does not fit the data folder's disk
    with FINETUNE_ZIP_FREE_MARGIN_BYTES to spare; and while writing, when an entry holds more
    than its header says or the disk fails. progress(fraction, message) is told how far it
    is. Safe to call from several processes at once."""
    path = Path(path).expanduser()
    try:
        digest = _zip_digest(path)
        zips = data_dir() / "zips"
        zips.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{label} could not be read ({e.strerror or e}).") from e
    dest = zips / digest[:20]
    reused = f"using {label} as extracted before"
    if _reuse(zips, dest):
        if progress is not None:
            progress(1.0, reused)
        return dest
    with FileLock(zips / f".{dest.name}.lock"):  # one extraction of this zip at a time
        if _reuse(zips, dest):  # another process extracted it while we waited
            if progress is not None:
                progress(1.0, reused)
            return dest
        for leftover in zips.glob(f".{dest.name}.tmp-*"):  # ours, from a killed attempt
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            declared = _declared_entries(path)
            max_files = env_limit("FINETUNE_ZIP_MAX_FILES", ZIP_MAX_FILES)
            if declared is not None and declared > max_files:
                raise _too_many(label, declared, max_files)
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{label} is not a readable zip file ({e}).") from e
        with zf:
            plan, total = _plan(zf, path, label)
            prune_extractions(need_bytes=total, keep=dest.name)
            _check_free_space(zips, total, label)
            if progress is not None:
                progress(0.0, f"extracting {label}: {total / 2**20:,.0f} MiB")
            tmp = zips / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                _write(zf, plan, tmp, label, total, progress)
                with FileLock(zips / ".index.lock"):
                    write_text_atomic(
                        _marker(zips, dest.name),
                        json.dumps({"bytes": total, "files": len(plan), "zip": label}),
                    )
                    try:
                        os.rename(tmp, dest)
                    except OSError:
                        if not dest.is_dir():
                            raise
            except (
                zipfile.BadZipFile,
                zipfile.LargeZipFile,
                EOFError,
                NotImplementedError,
                zlib.error,
            ) as e:
                raise DataError(f"{label} could not be extracted ({e}).") from e
            except OSError as e:
                full = " The disk is full." if e.errno == errno.ENOSPC else ""
                raise DataError(
                    f"{label} could not be extracted into {zips} ({e.strerror or e}).{full}"
                ) from e
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(1.0, f"extracted {label}: {len(plan):,} entries")
    return dest
