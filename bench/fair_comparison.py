"""Measures the fair comparison: a comparison with one shared lr against the same comparison
with each strategy's lr tuned (the default), and the unfreeze-depth curve, through the real
CLI (`sweep`, the queue, one worker per run), then prints each group as a table.

    PYTHONPATH=. .venv/bin/python bench/fair_comparison.py digits --data DIR [--seeds 2]
    PYTHONPATH=. .venv/bin/python bench/fair_comparison.py depths [--seeds 2]

`digits`: the default comparison (full, last_n 1, linear_probe) on an image folder (for
example scikit-learn's handwritten digits saved as PNGs: `bench/fair_comparison.py
export-digits DIR`, which needs `pip install scikit-learn`), 32 px, 3 epochs, `builtin`
weights, with `--same-lr` and without. `depths`: `sweep --depths` on builtin:shapes,
ResNet-18, 64 px, 3 epochs, `builtin` weights, tuned. Work goes to a temporary folder
(or --keep DIR); FINETUNE_DATA_DIR and TORCH_HOME are used as set (the builtin weights are
pretrained once, a few minutes on a CPU, when not cached there).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export_digits(out: Path, size: int = 32) -> int:
    """Writes scikit-learn's 1,797 8x8 handwritten digits as size x size PNGs, a folder per
    class; returns how many."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits  # bench only: pip install scikit-learn

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = (image / 16.0 * 255).astype(np.uint8)
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR)
        big.save(folder / f"{i:04d}.png")
    return len(digits.images)


def sweep(runs: Path, args: list[str]) -> tuple[str, float]:
    """Runs `sweep` with args into runs; returns (group id, wall seconds)."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", "sweep", *args, "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1], time.monotonic() - t0


def rows(runs: Path, group: str) -> list[dict]:
    """Returns one row per strategy of the group: accuracies as mean (min-max) over seeds,
    the lr of each seed, train time and peak memory (means)."""
    from finetune_core import store, strategies

    by_label: dict[str, list[tuple[dict, dict]]] = {}
    for run_dir in store.run_dirs(runs):
        config = store.read_config(run_dir)
        if config.get("group") != group:
            continue
        summary = store.read_summary(run_dir) or {}
        by_label.setdefault(strategies.label(config), []).append((config, summary))
    out = []
    for label, members in by_label.items():

        def values(key, members=members):
            return [s[key] for _, s in members if s.get(key) is not None]

        def spread(key, values=values):
            v = values(key)
            if not v:
                return "–"
            mean = 100 * statistics.mean(v)
            return f"{mean:.1f} ({100 * min(v):.1f}-{100 * max(v):.1f})"

        out.append(
            {
                "strategy": label,
                "seeds": len(members),
                "val acc %": spread("best_val_acc"),
                "test acc %": spread("test_acc"),
                "lr": ", ".join(f"{c['lr']:g}" for c, _ in members),
                "train s": f"{statistics.mean(values('train_time_s') or [0]):.1f}",
                "peak MB": f"{statistics.mean(values('peak_memory_bytes') or [0]) / 1e6:.0f}",
                "trainable": f"{statistics.mean(values('trainable_params') or [0]):,.0f}",
            }
        )
    return out


def headline(runs: Path, group: str) -> str:
    """Returns Compare's first sentence for the group (the page's own functions)."""
    from finetune_core import plots, store

    members = [d for d in store.run_dirs(runs) if store.read_config(d).get("group") == group]
    configs = {d.name: store.read_config(d) for d in members}
    summaries = {d.name: store.read_summary(d) for d in members}
    metrics = {d.name: store.read_metrics(d) for d in members}
    table = plots.summary_table(configs, summaries, metrics)
    basis = plots.accuracy_basis(table)
    per_strategy = plots.seed_table(table, plots.seed_groups(configs))
    hits = {d.name: store.read_hits(d, basis.split) for d in members}
    return plots.headline(per_strategy, plots.pooled_hits(per_strategy, hits), basis)


def markdown(table: list[dict]) -> str:
    head = list(table[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in table]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("digits", "depths", "export-digits"))
    ap.add_argument("--data", help="digits: the image folder; export-digits: where to write")
    ap.add_argument("--seeds", default="2")
    ap.add_argument("--keep", help="work in this folder and keep it")
    args = ap.parse_args()
    if args.what == "export-digits":
        print(export_digits(Path(args.data or "digits")), "images written")
        return 0
    work = Path(args.keep or tempfile.mkdtemp(prefix="finetune-bench-fair-")).resolve()
    runs = work / "runs"
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}; runs in {runs}",
        flush=True,
    )
    if args.what == "digits":
        if not args.data:
            sys.exit("digits needs --data DIR (bench/fair_comparison.py export-digits DIR)")
        base = ["--data", str(Path(args.data).resolve()), "--image-size", "32", "--epochs", "3"]
        base += ["--weights", "builtin", "--seeds", args.seeds]
        for title, extra in (
            ("shared lr (--same-lr, lr 0.01, test fraction 0.2)", ["--same-lr", "--test-fraction", "0.2"]),
            ("tuned lr per strategy (the default)", []),
        ):  # fmt: skip
            group, seconds = sweep(runs, base + extra)
            print(f"\n### {title}: group {group}, {seconds:.0f} s wall\n", flush=True)
            print(markdown(rows(runs, group)), flush=True)
            print(f"\nCompare says: {headline(runs, group)}", flush=True)
    else:
        base = ["--depths", "--data", "builtin:shapes", "--model", "resnet18", "--weights"]
        base += ["builtin", "--image-size", "64", "--epochs", "3", "--seeds", args.seeds]
        group, seconds = sweep(runs, base)
        print(f"\n### depth sweep, tuned: group {group}, {seconds:.0f} s wall\n", flush=True)
        print(markdown(rows(runs, group)), flush=True)
        print(f"\nCompare says: {headline(runs, group)}", flush=True)
        from finetune_core import plots, store

        members = [d for d in store.run_dirs(runs) if store.read_config(d).get("group") == group]
        configs = {d.name: store.read_config(d) for d in members}
        summaries = {d.name: store.read_summary(d) for d in members}
        points = plots.depth_points(configs, summaries, plots.TEST)
        hits = {d.name: store.read_hits(d, "test") for d in members}
        print("\n" + plots.depth_sentence(points, {r: h for r, h in hits.items() if h}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
