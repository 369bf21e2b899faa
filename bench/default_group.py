"""Times what a new user waits for: the dashboard's default comparison on the built-in data.

From an empty cache, in a temporary folder (nothing of yours is touched):
1. generating builtin:shapes and builtin:shapes-source,
2. pretraining the `builtin` weights for the model (the one-time cost),
3. the default group of New run (full, last_n 1, linear_probe; RunConfig's defaults) through
   the real queue: `runner.enqueue` starts the detached supervisor, which runs one worker
   process per run, one at a time, as the dashboard does.

    PYTHONPATH=. .venv/bin/python bench/default_group.py [--model resnet18] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="finetune-bench-group-")).resolve()
    # Set before finetune_core is imported: a fresh data folder, hub cache and runs folder.
    os.environ.update(
        FINETUNE_DATA_DIR=str(work / "data"),
        TORCH_HOME=str(work / "torch"),
        FINETUNE_RUNS_DIR=str(work / "runs"),
    )
    for knob in ("FINETUNE_BUILTIN_EPOCHS", "FINETUNE_BUILTIN_MAX_STEPS"):
        os.environ.pop(knob, None)  # the real recipe

    from finetune_core import data, pretrain, runner, store, strategies
    from finetune_core.config import RunConfig
    from finetune_core.device import pick_device
    from finetune_core.weights import builtin

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from run import cpu_model  # bench/run.py, beside this file

    figures: dict[str, float] = {}
    t0 = time.monotonic()
    data.inspect_data("builtin:shapes")
    data.inspect_data(builtin.BUILTIN_SOURCE)
    figures["generate built-in datasets (s)"] = time.monotonic() - t0

    print(
        f"pretraining builtin weights for {args.model} (estimate: "
        f"{pretrain.estimate_seconds(args.model):.0f} s)...",
        flush=True,
    )
    t0 = time.monotonic()
    pretrain.ensure_builtin(args.model)
    figures["builtin weights, first use (s)"] = time.monotonic() - t0

    presets = strategies.DEFAULT_COMPARISON
    cfgs = [RunConfig(model=args.model, **strategies.preset_fields(p)) for p in presets]
    runs_dir = work / "runs"
    t0 = time.monotonic()
    run_dirs = runner.enqueue(cfgs, runs_dir)
    while True:
        states = [store.read_status(d).get("state") for d in run_dirs]
        if all(s in store.FINAL_STATES for s in states):
            break
        time.sleep(1)
    figures["default group, enqueue to last run done (s)"] = time.monotonic() - t0
    rows = []
    for preset, d in zip(presets, run_dirs, strict=True):
        summary = store.read_summary(d) or {}
        rows.append(
            (
                preset,
                store.read_status(d).get("state"),
                summary.get("best_val_acc"),
                summary.get("train_time_s"),
            )
        )

    cfg = cfgs[0]
    cpu = cpu_model() or platform.processor()
    print(
        f"\nmachine: {platform.machine()} {cpu} | {os.cpu_count()} CPUs | "
        f"device {pick_device('auto')} | {args.model}, {cfg.image_size} px, batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs, augment {cfg.augment}\n"
    )
    print("| step | seconds |\n|---|---|")
    for k, v in figures.items():
        print(f"| {k} | {v:.0f} |")
    print("\n| run | state | best val acc | train time (s) |\n|---|---|---|---|")
    for preset, state, acc, secs in rows:
        acc_text = "-" if acc is None else f"{100 * acc:.1f} %"
        print(f"| {preset} | {state} | {acc_text} | {secs or 0:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "runs": rows}, indent=2))
    if not args.keep:
        print(f"\n(the runs are in {work}; delete it when done)")
    return 0 if all(r[1] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
