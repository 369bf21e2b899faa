"""Measures the recipe options of torchvision's references and fastai on real data: full
and linear_probe, from random init and from `builtin` weights, with the default recipe and
with each option alone, through the real CLI (`train`, one process per run); prints one
table of accuracy and images/s.

    PYTHONPATH=. .venv/bin/python bench/fair_comparison.py export-digits --data /tmp/digits
    PYTHONPATH=. .venv/bin/python bench/recipe_digits.py --data /tmp/digits [--rows 'a;b']
        [--strategies full,linear_probe] [--weights none,builtin] [--keep DIR]

The digits split is fixed (val fraction 0.2, seed 0) and every run is ResNet-18, 64 px, 3
epochs (--image-size for another size), batch 64, lr 0.01, on the CPU. Accuracy is the best epoch's val accuracy (the
figure Compare shows); images/s the median of the run's training records (Compare's
images/s column), which leaves a cached linear probe's one pass over the backbone out.
FINETUNE_DATA_DIR and TORCH_HOME are used as set (builtin weights are pretrained once when
not cached there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# row -> the flags it adds to the default recipe (each option alone)
ROWS: dict[str, list[str]] = {
    "default (+ tta flip beside)": ["--tta", "flip"],
    "weight decay on norms and biases (before)": ["--decay-norm-bias"],
    "weight EMA (reference defaults)": ["--model-ema"],
    "weight EMA, every step, decay 0.998": [
        "--model-ema", "--model-ema-steps", "1", "--model-ema-decay", "0.998",
    ],
    "MixUp 0.2": ["--mixup-alpha", "0.2"],
    "CutMix 1.0": ["--cutmix-alpha", "1.0"],
    "trivialaugment": ["--augment", "trivialaugment"],
    "randaugment": ["--augment", "randaugment"],
    "augmix": ["--augment", "augmix"],
    "random erasing 0.25": ["--random-erase", "0.25"],
    "fastai aug": ["--augment", "fastai"],
    "fastai aug, no mirror (+ tta augment beside)": [
        "--augment", "fastai", "--no-hflip", "--tta", "augment",
    ],
    "sgd_nesterov": ["--optimizer", "sgd_nesterov"],
    "onecycle (momentum cycled)": ["--scheduler", "onecycle"],
    "onecycle, momentum fixed": ["--scheduler", "onecycle", "--no-cycle-momentum"],
    "accumulate 4 (effective batch 256)": ["--accumulate-steps", "4"],
    "fastai head": ["--head", "fastai"],
}  # fmt: skip

BASE = ["--model", "resnet18", "--epochs", "3", "--val-fraction", "0.2"]
BASE += ["--seed", "0", "--device", "cpu"]


def train(
    runs: Path, data: str, strategy: str, weights: str, flags: list[str], size: int = 64
) -> Path:
    """Runs one `train` in the foreground; returns its run folder."""
    cmd = [sys.executable, "-m", "finetune_core", "train", "--data", data, *BASE]
    cmd += ["--image-size", str(size)]
    cmd += ["--strategy", strategy, "--weights", weights, *flags, "--runs-dir", str(runs)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def measured(run_dir: Path) -> dict:
    """Returns what the table shows of a run: accuracy, TTA beside it, images/s."""
    from finetune_core import store

    s = store.read_summary(run_dir) or {}
    train = store.read_metrics(run_dir)
    speed = train[train["split"] == "train"]["images_per_s"].dropna()
    return {
        "acc": s.get("best_val_acc"),
        "tta": s.get("tta_best_val_acc"),
        "raw": s.get("raw_best_val_acc"),
        "img_s": float(speed.median()) if len(speed) else None,
        "train_s": s.get("train_time_s"),
    }


def cell(m: dict) -> str:
    text = f"{100 * m['acc']:.1f}"
    if m.get("tta") is not None:
        text += f" (TTA {100 * m['tta']:.1f})"
    if m.get("raw") is not None:
        text += f" (raw {100 * m['raw']:.1f})"
    return f"{text} · {m['img_s']:.0f}/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the digits folder (export-digits)")
    ap.add_argument("--rows", help="row names separated by ';' (names hold commas; default: all)")
    ap.add_argument("--strategies", default="full,linear_probe")
    ap.add_argument("--weights", default="none,builtin")
    ap.add_argument("--image-size", type=int, default=64, help="pixels (default 64)")
    ap.add_argument("--keep", help="work in this folder and keep it")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(";")] if args.rows else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: no row {unknown[0]!r}; the rows: {'; '.join(ROWS)}")
    columns = [(s, w) for w in args.weights.split(",") for s in args.strategies.split(",")]
    work = Path(args.keep or tempfile.mkdtemp(prefix="finetune-bench-recipe-")).resolve()
    runs = work / "runs"
    data = str(Path(args.data).resolve())
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}; runs in {runs}",
        flush=True,
    )
    results: dict[str, dict] = {}
    loads = []
    for row in rows:
        results[row] = {}
        for strategy, weights in columns:
            t0 = time.monotonic()
            run_dir = train(runs, data, strategy, weights, ROWS[row], args.image_size)
            loads.append(os.getloadavg()[0])
            m = measured(run_dir)
            results[row][f"{strategy}/{weights}"] = m
            print(
                f"{row} | {strategy} {weights}: {cell(m)} ({time.monotonic() - t0:.0f} s wall, "
                f"load {loads[-1]:.1f}) {run_dir.name}",
                flush=True,
            )
    head = [f"{s} from {w}" for s, w in columns]
    print("\n| recipe | " + " | ".join(head) + " |\n|---|" + "---|" * len(head))
    for row, by in results.items():
        print(f"| {row} | " + " | ".join(cell(by[f"{s}/{w}"]) for s, w in columns) + " |")
    print(f"\nload average after each run: {min(loads):.1f}-{max(loads):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
