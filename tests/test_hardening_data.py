"""Untrusted data (issue 9): zips refused before writing, old extractions deleted by policy,
images bounded in pixels and formats, folder walks that follow no links and end, layouts
that are refused or warned about instead of misread."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune_core import data
from finetune_core.data import DataError, zips

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    """A private FINETUNE_DATA_DIR, so caches and extractions start empty."""
    home = tmp_path / "data-home"
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(home))
    return home


def _png(path: Path, colour=(200, 30, 30), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _folder(root: Path, counts: dict[str, int], sub: str = "") -> Path:
    for k, (cls, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            _png(root / sub / cls / f"{i:03d}.png", colour=(40 * k, 20 * i % 255, 90))
    return root


def _flat_png(path: Path, width: int, height: int) -> Path:
    """Writes a one-colour greyscale PNG row by row: 144 MP cost ~170 KB and no memory."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    comp = zlib.compressobj(9)
    row = b"\0" + b"\x80" * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
    return path


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _extracted(data_home: Path) -> list[Path]:
    """Returns the extraction folders (and leftovers of any) in the data folder."""
    z = data_home / "zips"
    return sorted(p for p in z.iterdir() if p.is_dir()) if z.exists() else []


def _limit_memory() -> None:
    # A walk that follows links through /proc/self/root fills memory with paths, not only
    # time: the child gets 4 GiB, so such a failure cannot take the machine down.
    resource.setrlimit(resource.RLIMIT_DATA, (4 * 2**30, 4 * 2**30))


def _run(code: str, *args: str, env: dict | None = None, timeout: float = 60):
    """Runs python -c code in a fresh process on this checkout; fails the test if it hangs."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: {args}")


_INSPECT = """
import sys
from finetune_core import data
for spec in sys.argv[1:]:
    try:
        info = data.inspect_data(spec)
        print("OK", spec, info.classes, getattr(info, "warnings", None))
    except data.DataError as e:
        print("DataError", spec, e)
"""


# ---------------------------------------------------------------------------------------------
# zips: refused before writing


def _zeros_zip(path: Path, entries: dict[str, int]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, n in entries.items():
            zf.writestr(name, bytes(n))
    return path


def test_zip_entry_compressed_beyond_the_ratio_limit_is_refused_before_writing(tmp_path, data_home):
    zpath = _zeros_zip(tmp_path / "bomb.zip", {"ds/a/1.png": 20 * 2**20, "ds/b/1.png": 100})
    assert zpath.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"zip bomb.*'ds/a/1.png'.*100:1") as e:
        data.inspect_data(str(zpath))
    assert "FINETUNE_ZIP_MAX_RATIO" in str(e.value) and "bomb.zip" in str(e.value)
    assert _tree_bytes(data_home / "zips") < 100_000 and not _extracted(data_home)


def test_zip_compressed_beyond_the_ratio_limit_overall_is_refused(tmp_path, data_home):
    # Each entry is below the size held to the ratio; together they are a bomb.
    entries = {f"ds/{'ab'[i % 2]}/{i}.png": 2**20 for i in range(12)}
    zpath = _zeros_zip(tmp_path / "many-small.zip", entries)
    with pytest.raises(DataError, match=r"zip bomb: it unpacks to 12 MiB"):
        data.inspect_data(str(zpath))
    assert not _extracted(data_home)


def test_zip_over_the_servers_size_limit_is_refused(tmp_path, data_home, monkeypatch):
    rng = np.random.default_rng(0)
    zpath = tmp_path / "big.zip"
    with zipfile.ZipFile(zpath, "w") as zf:  # random bytes: no ratio to speak of
        zf.writestr("ds/a/1.png", rng.bytes(700_000))
        zf.writestr("ds/b/1.png", rng.bytes(700_000))
    monkeypatch.setenv("FINETUNE_ZIP_MAX_BYTES", "1000000")
    with pytest.raises(DataError, match=r"more than the 0.000931323 GiB.*FINETUNE_ZIP_MAX_BYTES"):
        data.inspect_data(str(zpath))
    assert not _extracted(data_home)
    monkeypatch.setenv("FINETUNE_ZIP_MAX_BYTES", "lots")
    with pytest.raises(DataError, match="FINETUNE_ZIP_MAX_BYTES='lots' is not a positive"):
        data.inspect_data(str(zpath))


def test_zip_that_needs_more_than_the_free_space_and_margin_is_refused(
    tmp_path, data_home, monkeypatch
):
    zpath = _folder_zip(tmp_path, "pets.zip", {"cat": 2, "dog": 2})
    (data_home / "zips").mkdir(parents=True)
    free = shutil.disk_usage(data_home / "zips").free
    monkeypatch.setenv("FINETUNE_ZIP_FREE_MARGIN_BYTES", str(free))  # the disk's real free space
    with pytest.raises(DataError, match=r"MiB free.*FINETUNE_ZIP_FREE_MARGIN_BYTES") as e:
        data.inspect_data(str(zpath))
    assert str(data_home / "zips") in str(e.value)
    assert not _extracted(data_home)
    monkeypatch.delenv("FINETUNE_ZIP_FREE_MARGIN_BYTES")
    assert data.inspect_data(str(zpath)).classes == ["cat", "dog"]


_SMALL_DISK = """
set -e
mount -t tmpfs -o size=20m tmpfs "$1"
FINETUNE_DATA_DIR="$1/data" "$2" -c '
import sys
from finetune_core import data
try:
    data.inspect_data(sys.argv[1])
    print("accepted")
except data.DataError as e:
    print("DataError", e)
' "$3"
du -sk "$1" | cut -f1
"""


# needs root and `unshare -m` (CI runs as root, like this machine): never skipped
def test_zip_larger_than_a_real_small_disk_is_refused_before_writing(tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    zpath = tmp_path / "stored.zip"
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(zpath, "w") as zf:  # 24 MB stored: fits the limits, not the disk
        for i in range(6):
            zf.writestr(f"ds/{'ab'[i % 2]}/{i}.png", rng.bytes(4 * 10**6))
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", _SMALL_DISK, "sh", str(mnt), sys.executable, str(zpath)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), FINETUNE_ZIP_FREE_MARGIN_BYTES="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("DataError stored.zip would unpack to 23 MiB"), proc.stdout
    assert "MiB free" in out[0]
    assert int(out[-1]) < 1024  # KiB used on the small disk: the hash memo and locks


def test_zip_with_more_entries_than_the_cap_is_refused_before_writing(
    tmp_path, data_home, monkeypatch
):
    zpath = tmp_path / "many.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(150):
            zf.writestr(f"ds/{'ab'[i % 2]}/{i}.png", b"x")
    monkeypatch.setenv("FINETUNE_ZIP_MAX_FILES", "100")
    with pytest.raises(DataError, match=r"has 150 entries, more than the 100.*FINETUNE_ZIP_MAX"):
        data.inspect_data(str(zpath))
    assert not _extracted(data_home)
    assert zips.ZIP_MAX_FILES <= 50_000 and zips.ZIP_MAX_BYTES <= 4 * 2**30  # the defaults


@pytest.mark.parametrize("order", ["file first", "folder first"])
def test_zip_with_a_file_and_a_folder_of_one_name_is_refused_naming_it(tmp_path, data_home, order):
    zpath = tmp_path / "clash.zip"
    members = [("ds/a", b"file"), ("ds/a/b.png", b"x"), ("ds/c/1.png", b"x")]
    with zipfile.ZipFile(zpath, "w") as zf:
        for name, payload in members if order == "file first" else members[::-1]:
            zf.writestr(name, payload)
    with pytest.raises(DataError, match=r"clash.zip is malformed: 'ds/a' is both a file"):
        data.inspect_data(str(zpath))
    assert not _extracted(data_home)


def test_zip_entry_name_too_long_for_a_file_system_is_refused(tmp_path, data_home):
    zpath = tmp_path / "long.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ds/a/" + "n" * 300 + ".png", b"x")
        zf.writestr("ds/b/1.png", b"x")
    with pytest.raises(DataError, match=r"long.zip has an entry whose name is too long.*304 bytes"):
        data.inspect_data(str(zpath))
    assert not _extracted(data_home)


def test_zip_with_two_entries_of_one_name_is_refused(tmp_path, data_home):
    zpath = tmp_path / "twice.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ds/a/1.png", b"one")
        zf.writestr("ds/b/1.png", b"x")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("ds/a/1.png", b"two")
    with pytest.raises(DataError, match=r"two entries named 'ds/a/1.png'"):
        data.inspect_data(str(zpath))


def test_zip_entry_longer_than_its_header_says_writes_no_more_than_the_header(tmp_path, data_home):
    # Pins the outcome; CPython's zipfile already stops at the header's size (then the CRC
    # check fails), and extract_zip counts the bytes itself as well.
    zpath = tmp_path / "liar.zip"
    payload = bytes(range(256)) * 40  # 10240 bytes, stored
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ds/a/1.png", payload)
        zf.writestr("ds/b/1.png", b"x")
    raw = bytearray(zpath.read_bytes())
    size = struct.pack("<I", len(payload))
    for at in (i for i in range(len(raw) - 4) if raw[i : i + 4] == size):
        if raw[at - 4 : at] == size:  # compressed size, then file size: lie about the latter
            raw[at : at + 4] = struct.pack("<I", 1000)
    zpath.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="liar.zip"):
        data.inspect_data(str(zpath))
    assert not _extracted(data_home)
    assert _tree_bytes(data_home / "zips") < 5000


# ---------------------------------------------------------------------------------------------
# zips: extraction from another process, progress, old extractions deleted


def _folder_zip(tmp_path: Path, name: str, counts: dict[str, int], size=(12, 10)) -> Path:
    src = tmp_path / f"src-{name}"
    for k, (cls, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            _png(src / cls / f"{i}.png", colour=(k * 50, i, len(name)), size=size)
    zpath = tmp_path / name
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(src.rglob("*.png")):
            zf.write(p, p.relative_to(src))
    return zpath


_EXTRACT = """
import sys
from pathlib import Path
from finetune_core.data.zips import extract_zip
calls = []
dest = extract_zip(Path(sys.argv[1]), "pets.zip", progress=lambda f, m: calls.append((f, m)))
print(dest)
print(calls[-1][0], calls[-1][1])
"""


def test_extract_zip_runs_in_another_process_reports_progress_and_is_reused(tmp_path, data_home):
    zpath = _folder_zip(tmp_path, "pets.zip", {"cat": 3, "dog": 3})
    procs = [  # two at once: one extracts, the other waits and reuses its folder
        subprocess.Popen(
            [sys.executable, "-c", _EXTRACT, str(zpath)],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    dests = {out.splitlines()[0] for out, _ in outs}
    assert len(dests) == 1
    dest = Path(dests.pop())
    assert dest.parent == data_home / "zips" and (dest / "cat" / "0.png").is_file()
    last = sorted(out.splitlines()[1] for out, _ in outs)  # one extracted, one waited
    assert last == ["1.0 extracted pets.zip: 6 entries", "1.0 using pets.zip as extracted before"]
    assert _extracted(data_home) == [dest]  # no second copy, no leftovers
    info = data.inspect_data(str(zpath))
    assert Path(info.samples["cat"][0]).parents[1] == dest


def test_old_extractions_beyond_the_cache_cap_are_deleted_least_recently_used_first(
    tmp_path, data_home, monkeypatch
):
    big = (200, 150)  # ~90 kB of PNG per image: random noise
    zs = []
    for name in ("a.zip", "b.zip", "c.zip"):
        src = tmp_path / f"src-{name}"
        rng = np.random.default_rng(len(zs))
        for cls in ("x", "y"):
            (src / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (*big, 3), np.uint8)).save(src / cls / "1.png")
        zpath = tmp_path / name
        with zipfile.ZipFile(zpath, "w") as zf:
            for p in sorted(src.rglob("*.png")):
                zf.write(p, p.relative_to(src))
        zs.append(zpath)
    monkeypatch.setenv("FINETUNE_ZIP_CACHE_MAX_BYTES", "500000")  # room for two of them
    root_of = {}
    for z in zs[:2]:
        root_of[z.name] = Path(data.inspect_data(str(z)).samples["x"][0]).parents[1]
    markers = {n: r.with_name(r.name + ".used") for n, r in root_of.items()}
    assert all(m.is_file() for m in markers.values())
    old = time.time() - 3 * 86400
    for m in markers.values():
        os.utime(m, (old, old))  # both unused for three days ...
    data.inspect_data(str(zs[0]))  # ... then a.zip is used again: its mark is fresh
    assert markers["a.zip"].stat().st_mtime > time.time() - 3600
    root_of["c.zip"] = Path(data.inspect_data(str(zs[2])).samples["x"][0]).parents[1]
    assert not root_of["b.zip"].exists() and not markers["b.zip"].exists()  # least recent
    assert root_of["a.zip"].is_dir() and root_of["c.zip"].is_dir()
    # Everything used within the day stays, even beyond the cap; a deleted one comes back.
    monkeypatch.setenv("FINETUNE_ZIP_CACHE_MAX_BYTES", "1")
    again = Path(data.inspect_data(str(zs[1])).samples["x"][0]).parents[1]
    assert again == root_of["b.zip"] and all(r.is_dir() for r in root_of.values())
    assert json.loads(markers["b.zip"].read_text())["bytes"] > 100_000


def test_leftovers_of_an_interrupted_extraction_are_removed(tmp_path, data_home):
    zpath = _folder_zip(tmp_path, "pets.zip", {"cat": 2, "dog": 2})
    other = data_home / "zips" / ".0123456789abcdef0123.tmp-99999-dead"  # another zip's
    (other / "cat").mkdir(parents=True)
    (other / "cat" / "1.png").write_bytes(b"x" * 1000)
    trash = data_home / "zips" / ".fedcba98765432100123.trash-99999-dead"
    (trash / "x").mkdir(parents=True)
    data.inspect_data(str(zpath))
    assert not other.exists() and not trash.exists()
    assert len(_extracted(data_home)) == 1


# ---------------------------------------------------------------------------------------------
# images: pixels and formats


def test_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, data_home, monkeypatch):
    monkeypatch.setenv("FINETUNE_IMAGE_MAX_PIXELS", "1000000")
    big = _flat_png(tmp_path / "ds" / "a" / "big.png", 1500, 1000)
    _folder(tmp_path / "ds", {"a": 2, "b": 2})
    with pytest.raises(DataError, match=r"big.png is 1500x1000 pixels.*FINETUNE_IMAGE_MAX_PIXELS"):
        data.decode_image(big, SIZE)
    assert not data.can_read(big)
    d = data.load_data(str(tmp_path / "ds"), image_size=SIZE, val_fraction=0.5)
    assert d.skipped_files == ["a/big.png"]
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's global setting is left alone


def test_a_144_megapixel_png_is_refused_without_decoding_it(tmp_path):
    huge = _flat_png(tmp_path / "huge.png", 12000, 12000)
    assert huge.stat().st_size < 300_000
    code = """
import resource, sys
from pathlib import Path
from finetune_core import data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    data.decode_image(Path(sys.argv[1]), 32)
    print("decoded")
except Exception as e:
    print(type(e).__name__, e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    proc = _run(code, str(huge), timeout=120)
    assert proc.returncode == 0, proc.stderr
    outcome, grew_mb = proc.stdout.splitlines()[0], int(proc.stdout.splitlines()[-1])
    assert outcome.startswith("DataError") and "12000x12000 pixels (144 MP)" in outcome
    assert grew_mb < 50  # decoding it costs ~800 MB


def test_a_large_jpeg_counts_at_the_scale_it_is_decoded_at(tmp_path, data_home, monkeypatch):
    monkeypatch.setenv("FINETUNE_IMAGE_MAX_PIXELS", "1000000")
    photo = tmp_path / "photo.jpg"  # 4 MP, decoded at 1/8 scale for a small image size
    Image.new("RGB", (2400, 1600), (10, 200, 30)).save(photo, quality=90)
    assert data.can_read(photo)
    assert data.decode_image(photo, SIZE).shape == (SIZE, SIZE, 3)
    with pytest.raises(DataError, match="2400x1600 pixels"):  # at full scale it is too large
        data.decode_image(photo, 2000)


@pytest.mark.parametrize("fmt", ["TGA", "ICO", "PCX", "SGI", "DDS"])
def test_formats_outside_the_allowed_list_are_skipped_not_decoded(tmp_path, data_home, fmt):
    root = _folder(tmp_path / "ds", {"a": 2, "b": 2})
    odd = root / "a" / f"odd.{fmt.lower()}"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(odd, fmt)
    with Image.open(odd) as im:  # PIL itself would read it
        assert im.format == fmt
    assert not data.can_read(odd)
    assert "not a JPEG, PNG, WebP, BMP, GIF, TIFF or PPM image" in data.image_problem(odd)
    d = data.load_data(str(root), image_size=SIZE, val_fraction=0.5)
    assert d.skipped_files == [f"a/odd.{fmt.lower()}"]


def test_every_allowed_format_decodes(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8))
    for fmt in data.IMAGE_FORMATS:
        path = tmp_path / f"x.{fmt.lower()}"
        img.save(path, fmt)
        assert data.can_read(path), fmt
        assert data.decode_image(path, SIZE).shape == (SIZE, SIZE, 3), fmt


# ---------------------------------------------------------------------------------------------
# folders: walks that end, paths that are not folders


def test_symlink_loops_and_a_fifo_inside_a_class_folder_do_not_hang(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 2, "dog": 2})
    os.symlink(".", root / "cat" / "here")  # two links per level: 2^depth paths if followed
    os.symlink("..", root / "cat" / "up")
    os.mkfifo(root / "dog" / "pipe.png")  # opening it would wait for a writer forever
    code = (
        _INSPECT
        + """
d = data.load_data(sys.argv[1], image_size=8, val_fraction=0.5)
print("loaded", len(d.train) + len(d.val), d.skipped_files)
"""
    )
    proc = _run(code, str(root), env={"FINETUNE_DATA_DIR": str(data_home)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, last = proc.stdout.splitlines()[0], proc.stdout.splitlines()[-1]
    assert first.startswith("OK") and "['cat', 'dog']" in first
    assert "links to folders, which are not followed" in first and "not regular files" in first
    assert last == "loaded 4 []"


@pytest.mark.parametrize("spec", ["/", "/proc/self", "/sys", "/dev"])
def test_the_root_and_system_folders_are_refused_at_once(spec, data_home):
    proc = _run(_INSPECT, spec, env={"FINETUNE_DATA_DIR": str(data_home)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith(f"DataError {spec} ")
    assert ("root of the file system" if spec == "/" else "a folder of the system") in out


def test_a_link_to_a_system_folder_as_a_class_is_refused(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 2})
    os.symlink("/proc/self", root / "dog")
    proc = _run(_INSPECT, str(root), env={"FINETUNE_DATA_DIR": str(data_home)}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"DataError {root} {root}/dog (a link) is in /proc"), proc.stdout


def test_a_folder_walk_stops_at_the_file_limit(tmp_path, data_home, monkeypatch):
    root = _folder(tmp_path / "ds", {"cat": 30, "dog": 30})
    monkeypatch.setenv("FINETUNE_FOLDER_MAX_FILES", "50")
    with pytest.raises(
        DataError, match=r"more than 50 files and folders.*FINETUNE_FOLDER_MAX_FILES"
    ):
        data.inspect_data(str(root))
    monkeypatch.setenv("FINETUNE_FOLDER_MAX_FILES", "100")
    assert data.inspect_data(str(root)).counts["all"] == {"cat": 30, "dog": 30}


def test_a_folder_walk_stops_at_the_depth_limit(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 1, "dog": 1})
    deep = root / "cat"
    for i in range(40):
        deep = deep / f"d{i}"
    _png(deep / "1.png")
    with pytest.raises(DataError, match=r"more than 32 folders below .*ds/cat"):
        data.inspect_data(str(root))


def test_not_a_file_nor_a_folder_and_a_nul_byte_give_a_data_error(tmp_path, data_home):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"is not a regular file or folder"):
        data.inspect_data(str(fifo))
    with pytest.raises(DataError, match=r"/dev/zero is in /dev, a folder of the system"):
        data.inspect_data("/dev/zero")
    with pytest.raises(DataError, match=r"holds a NUL character"):
        data.inspect_data(str(tmp_path) + "/a\0b")
    with pytest.raises(DataError, match=r"cannot be used .*name too long"):
        data.inspect_data("/" + "x" * 5000)


# ---------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("stray", ["README_images", "extra"])
def test_split_folders_beside_another_folder_are_refused_naming_it(tmp_path, data_home, stray):
    root = tmp_path / "ds"
    _folder(root, {"a": 3, "b": 3}, "train")
    _folder(root, {"a": 1, "b": 1}, "val")
    _folder(root, {"pic": 2}, stray)
    with pytest.raises(DataError, match=rf"holds train/, val/ and also {stray}/.*Move {stray}/"):
        data.inspect_data(str(root))


def test_split_folders_without_train_are_refused(tmp_path, data_home):
    root = tmp_path / "ds"
    _folder(root, {"a": 3, "b": 3}, "val")
    _folder(root, {"a": 1, "b": 1}, "test")
    with pytest.raises(DataError, match=r"holds test/, val/ but no train/ folder"):
        data.inspect_data(str(root))


def test_macosx_folders_are_ignored_in_folders(tmp_path, data_home):
    root = _folder(tmp_path / "flat", {"cat": 2, "dog": 2})
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\0\5\26\7 resource fork")
    (root / "cat" / "__MACOSX").mkdir()
    (root / "cat" / "__MACOSX" / "junk.png").write_bytes(b"junk")
    info = data.inspect_data(str(root))
    assert info.classes == ["cat", "dog"] and info.counts["all"] == {"cat": 2, "dog": 2}
    split = tmp_path / "split"
    _folder(split, {"cat": 2, "dog": 2}, "train")
    _folder(split, {"cat": 1, "dog": 1}, "val")
    (split / "__MACOSX" / "train").mkdir(parents=True)
    (split / "train" / "__MACOSX").mkdir()
    info = data.inspect_data(str(split))
    assert info.has_splits and info.classes == ["cat", "dog"]


def test_val_lacking_a_class_of_train_is_accepted_with_a_warning(tmp_path, data_home):
    root = tmp_path / "ds"
    _folder(root, {"a": 3, "b": 3, "c": 3}, "train")
    _folder(root, {"a": 1, "b": 1}, "val")
    (root / "val" / "c").mkdir()  # present but empty counts as lacking
    _folder(root, {"a": 1, "b": 1, "c": 1}, "test")
    info = data.inspect_data(str(root))
    assert info.classes == ["a", "b", "c"] and info.counts["val"]["c"] == 0
    assert len(info.warnings) == 1
    assert "ds/val/ has no images of 1 class that train/ has ('c')" in info.warnings[0]
    d = data.load_data(str(root), image_size=SIZE)
    assert d.warnings == info.warnings and len(d.val) == 2
    clean = data.inspect_data(str(_folder(tmp_path / "flat", {"a": 2, "b": 2})))
    assert clean.warnings == []
