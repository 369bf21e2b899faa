"""What untrusted data costs: a zip bomb, a zip of many entries and a huge one-colour PNG.

    PYTHONPATH=. .venv/bin/python bench/untrusted_data.py                  # this checkout
    PYTHONPATH=. .venv/bin/python bench/untrusted_data.py --code /tmp/old   # another checkout

Builds three files in a temporary folder (cheaply: the PNG and the bomb are written as
compressed streams, never held in memory):

- bomb.zip: ~1 MB, five entries of zeros that unpack to 1.1 GB;
- many.zip: 100,000 entries of one tiny PNG, in two class folders;
- huge/: a class folder holding a 12000x12000 one-colour PNG (144 megapixels, ~170 KB)
  beside two small ones, and a second class.

Each case runs in a fresh Python process on the code under --code, with FINETUNE_DATA_DIR
pointed at a scratch folder of its own: `inspect_data` for the zips, `load_data` at 32 px
for the PNG. It prints the time of that call (imports not counted), the bytes the process
wrote (`wchar` from /proc/self/io: every write() call, files and pipes alike), the disk
space left allocated in the data folder (blocks, so 100,000 tiny files count 4 KB each) and
its number of files, the peak resident memory at the end of the call (`ru_maxrss` of the
process) and how much the call added to the imports' peak, and the outcome (the message of
a refusal).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from finetune_core import data

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def wchar():
        with open("/proc/self/io") as f:
            return int(next(l for l in f if l.startswith("wchar:")).split()[1])

    case, target = sys.argv[1], sys.argv[2]
    base_rss, base_w = rss_mb(), wchar()
    t0 = time.perf_counter()
    try:
        if case == "png":
            d = data.load_data(target, image_size=32, val_fraction=0.5)
            outcome = f"loaded {len(d.train) + len(d.val)} images, skipped {d.skipped_files}"
        else:
            info = data.inspect_data(target)
            outcome = f"accepted: {sum(sum(c.values()) for c in info.counts.values())} files"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "written": wchar() - base_w, "outcome": outcome,
                      "base_rss_mb": base_rss, "peak_rss_mb": rss_mb()}))
    """
)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def write_flat_png(path: Path, width: int, height: int, grey: int = 128) -> Path:
    """Writes a one-colour 8-bit greyscale PNG row by row (the pixels never sit in memory)."""
    comp = zlib.compressobj(9)
    row = b"\0" + bytes([grey]) * width  # filter type 0, then the pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


def write_bomb(path: Path, entries: int = 5, entry_bytes: int = 220 * 10**6) -> Path:
    """Writes a zip of `entries` members of zeros (deflated about 1000:1), streamed."""
    zero = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for i in range(entries):
            with zf.open(f"bomb/{'ab'[i % 2]}/{i}.png", "w", force_zip64=True) as f:
                left = entry_bytes
                while left > 0:
                    f.write(zero[: min(left, len(zero))])
                    left -= len(zero)
    return path


def write_many(path: Path, entries: int = 100_000) -> Path:
    """Writes a zip of `entries` copies of one tiny PNG, half in a/, half in b/."""
    tiny = path.parent / "tiny.png"
    write_flat_png(tiny, 4, 4)
    payload = tiny.read_bytes()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(entries):
            zf.writestr(f"many/{'ab'[i % 2]}/{i:06d}.png", payload)
    return path


def write_huge(folder: Path) -> Path:
    write_flat_png(folder / "a" / "huge.png", 12000, 12000)
    for cls in ("a", "b"):
        for i in range(2):
            write_flat_png(folder / cls / f"small{i}.png", 8, 8, grey=60 * i + 40)
    return folder


def _tree_usage(folder: Path) -> tuple[int, int]:
    """Returns (bytes of disk allocated, number of files) below folder."""
    total = count = 0
    for dirpath, dirs, files in os.walk(folder):
        for f in files + dirs:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
        count += len(files)
    return total, count


def run_case(code: Path, case: str, target: Path, scratch: Path) -> dict:
    """Runs one case in a fresh process on the code at `code`; returns its figures."""
    data_home = scratch / f"data-{case}"
    env = dict(os.environ, FINETUNE_DATA_DIR=str(data_home), PYTHONPATH=str(code))
    env.setdefault("TORCH_HOME", str(scratch / "torch"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, case, str(target)],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        row = {"seconds": None, "written": None, "outcome": proc.stderr[-500:]}
        row.update(base_rss_mb=0.0, peak_rss_mb=0.0)
    row["left_on_disk"], row["files_left"] = _tree_usage(data_home)
    row["case"] = case
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose finetune_core runs")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="untrusted-data-") as tmp:
        scratch = Path(tmp)
        files = {
            "bomb": write_bomb(scratch / "bomb.zip"),
            "many": write_many(scratch / "many.zip"),
            "png": write_huge(scratch / "huge"),
        }
        sizes = {
            "bomb": files["bomb"].stat().st_size,
            "many": files["many"].stat().st_size,
            "png": (files["png"] / "a" / "huge.png").stat().st_size,
        }
        rows = []
        for case in ("png", "bomb", "many"):
            row = run_case(args.code.resolve(), case, files[case], scratch)
            row["input_bytes"] = sizes[case]
            rows.append(row)
            secs = f"{row['seconds']:.2f} s" if row["seconds"] is not None else "?"
            written = row["written"] if row["written"] is not None else -1
            grew = row["peak_rss_mb"] - row["base_rss_mb"]
            print(
                f"{case:5s} input {row['input_bytes'] / 1e6:7.2f} MB | {secs:>8s} | "
                f"written {written / 1e6:7.1f} MB | on disk {row['left_on_disk'] / 1e6:7.1f} MB "
                f"in {row['files_left']} files | peak RSS {row['peak_rss_mb']:5.0f} MB "
                f"(+{grew:.0f} MB)"
            )
            print(f"      outcome: {row['outcome'][:300]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
