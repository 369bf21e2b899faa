"""Measures the frozen-prefix cache (engine.FeatureCache) as ratios from interleaved pairs,
each with its spread (median, min-max over the pairs):

    PYTHONPATH=. .venv/bin/python bench/prefix_cache.py epoch            # (a) ~2 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/prefix_cache.py base --base DIR  # (b) ~12 min
    PYTHONPATH=. .venv/bin/python bench/prefix_cache.py phases           # (c) ~10 min
    PYTHONPATH=. .venv/bin/python bench/prefix_cache.py runs             # (c) as whole runs, ~20 min

(a) `epoch`: one cached training epoch of last_n 1 (the engine's train_one_epoch: the
cached rows gathered by index, the flip view picked per image, the recorder, the schedule)
against the trained part alone: the same number of steps of layer4 + head fed with the
precomputed prefix outputs in plain slices by a bare loop (the run's optimizer, nothing
else); and the uncached epoch, for the gain.

(b) `base`: last_n 1 through the CLI (`python -m finetune_core train`, a process per run),
cached, against the same command in a checkout of the code before the cache (DIR: a
worktree of commit 5dff45c), and once more uncached with this code
($FINETUNE_FEATURE_CACHE_BYTES=0: the same code and seed without the cache) to check that
the metrics are equal.

(c) `phases`: every phase of gradual (unfreezing every 2 epochs, --unfreeze-every) and of
lp_ft (probing for half the epochs): a cached training epoch against an uncached one, in
pairs, and the one-time cost of building the phase's cache; the run's gain follows from
them. `runs`: the same two as whole CLI runs, cached against uncached, same code (on a
shared machine the load moves more between two whole runs than the cache does).

Defaults: builtin:shapes (1,200 train, 300 val images), ResNet-18, weights none, 64 px,
augment flip, batch 32, seed 0, 10 epochs, the CPU. Work goes to a temporary folder;
FINETUNE_DATA_DIR and TORCH_HOME are used as set. The figures swing with whatever else runs
on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("split", "epoch", "step", "loss", "acc", "lr")  # what "the same metrics" means


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spread(values: list[float]) -> str:
    """Returns 'median (min-max, n pairs)'."""
    return (
        f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f}, "
        f"{len(values)} pair{'s' if len(values) != 1 else ''})"
    )


# --- (a) a cached epoch against the trained part alone ---------------------------------------
def bench_epoch(args) -> dict:
    import torch

    from finetune_core import engine, strategies
    from finetune_core.config import RunConfig

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = RunConfig(
        data=args.data,
        model="resnet18",
        weights="none",
        image_size=args.image_size,
        augment="flip",
        strategy="last_n",
        unfreeze_last=1,
        epochs=2 * args.repeats + 2,
        batch_size=args.batch_size,
        seed=0,
        device=args.device,
    )
    exp = engine.prepare(cfg)
    cached = engine.Trainer(exp)
    cached.enter_phase(1)
    cached.refresh_feature_cache()
    cache = cached.feature_cache
    assert cache is not None, "the feature cache was not built"
    uncached = engine.Trainer(exp, feature_cache=False)
    uncached.enter_phase(1)
    phase = cached.current_phase()
    bs, steps = cfg.batch_size, cached.steps_per_epoch
    rows, labels = cache.train[: len(cache.labels)], cache.labels  # view 0, plain slices
    # the engine's own optimizer settings over the same parameters (its weight decay too)
    groups = strategies.optimizer_groups(cfg, exp.parts, cached.plan)
    bare_opt = engine.make_optimizer(cfg, groups)
    device = exp.device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def engine_epoch(trainer):
        def go():
            trainer.epoch = min(trainer.epoch + 1, cfg.epochs)
            sync()
            t0 = time.perf_counter()
            trainer.train_one_epoch()
            sync()
            return time.perf_counter() - t0

        return go

    def bare_epoch():
        strategies.set_train_mode(exp.parts, phase)
        sync()
        t0 = time.perf_counter()
        for b in range(steps):
            h = rows[b * bs : (b + 1) * bs]
            y = labels[b * bs : (b + 1) * bs]
            with cached.autocast():
                loss = torch.nn.functional.cross_entropy(cache.rest(h).float(), y)
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()
        sync()
        return time.perf_counter() - t0

    variants = {
        "cached": engine_epoch(cached),
        "trained part alone": bare_epoch,
        "uncached": engine_epoch(uncached),
    }
    for go in variants.values():  # warm-up: first-touch allocations, kernel choice
        go()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(variants[name]())
    pairs = [c / b for c, b in zip(times["cached"], times["trained part alone"], strict=True)]
    gains = [u / c for u, c in zip(times["uncached"], times["cached"], strict=True)]
    return {
        "steps": steps,
        "images": len(exp.data.train),
        "cache_mib": sum(t.numel() * t.element_size() for t in cache.tensors()) / 2**20,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "cached_over_alone": pairs,
        "uncached_over_cached": gains,
    }


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed_epoch(trainer, start: int) -> float:
    """Returns the seconds of one training epoch of trainer at epoch `start` (the phase's
    first epoch, every time: its cache stays)."""
    trainer.epoch = start
    sync(trainer.device)
    t0 = time.perf_counter()
    trainer.train_one_epoch()
    sync(trainer.device)
    return time.perf_counter() - t0


def bench_phases(args, log) -> dict:
    """(c) per phase of gradual and lp_ft: a cached training epoch against an uncached one,
    interleaved, and the one-time cost of building the phase's cache."""
    from finetune_core import engine
    from finetune_core.config import RunConfig

    out = {}
    for name, kw in {
        "gradual": {"strategy": "gradual", "unfreeze_every": args.unfreeze_every},
        "lp_ft": {"strategy": "lp_ft", "probe_epochs": args.epochs // 2},
    }.items():
        if name not in args.strategies.split(","):
            continue
        cfg = RunConfig(
            data=args.data,
            model="resnet18",
            weights="none",
            image_size=args.image_size,
            augment="flip",
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=0,
            device=args.device,
            **kw,
        )
        exp = engine.prepare(cfg)
        cached, plain = engine.Trainer(exp), engine.Trainer(exp, feature_cache=False)
        phases = []
        for i, phase in enumerate(cached.plan.phases):
            for trainer in (cached, plain):
                trainer.epoch = phase.start_epoch
                trainer.enter_phase(phase.start_epoch)
            sync(exp.device)
            t0 = time.perf_counter()
            cached.refresh_feature_cache()
            sync(exp.device)
            build = time.perf_counter() - t0
            variants = {
                "cached": functools.partial(timed_epoch, cached, phase.start_epoch),
                "uncached": functools.partial(timed_epoch, plain, phase.start_epoch),
            }
            if i == 0:  # warm-up: first-touch allocations, kernel choice
                for go in variants.values():
                    go()
            times: dict[str, list[float]] = {"cached": [], "uncached": []}
            for r in range(args.repeats):
                for key in ("cached", "uncached") if r % 2 == 0 else ("uncached", "cached"):
                    times[key].append(variants[key]())
            epochs = phase.end_epoch - phase.start_epoch + 1
            row = {
                "phase": phase.name,
                "epochs": epochs,
                "cached": cached.feature_cache is not None,
                "build_s": build,
                "epoch_s": {k: statistics.median(v) for k, v in times.items()},
                "ratio": [u / c for u, c in zip(times["uncached"], times["cached"], strict=True)],
            }
            phases.append(row)
            log(
                f"  {name} {phase.name!r}: cached {row['epoch_s']['cached']:.2f} s, uncached "
                f"{row['epoch_s']['uncached']:.2f} s an epoch, build {build:.2f} s (load {load()})"
            )
        run_uncached = sum(p["epochs"] * p["epoch_s"]["uncached"] for p in phases)
        run_cached = sum(p["build_s"] + p["epochs"] * p["epoch_s"]["cached"] for p in phases)
        out[name] = {"config": kw, "phases": phases, "run_ratio": run_uncached / run_cached}
    return out


# --- (b), (c): whole runs through the CLI -----------------------------------------------------
def train(code: Path, runs: Path, flags: list[str], env_extra: dict | None = None) -> dict:
    """Runs `python -m finetune_core train` of the code in `code`; returns wall and train
    seconds and the metrics records."""
    env = {**os.environ, "PYTHONPATH": str(code), **(env_extra or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", *flags, "--runs-dir", str(runs)],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"train failed in {code} ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    log = (run_dir / "worker.log").read_text()
    return {
        "wall_s": wall,
        "train_s": float(summary["train_time_s"]),
        "records": records,
        "cache_lines": [line[20:] for line in log.splitlines() if "feature cache" in line],
        "best_val_acc": summary["best_val_acc"],
    }


def _windows(run: dict) -> dict[tuple, dict]:
    """Returns {(split, first step, last step): record}: a train record covers the steps
    since the one before it (the engine batches them by count and by time, so two runs
    at different speeds cut them differently); val and test are one record each."""
    out, after = {}, 0
    for r in run["records"]:
        if r.get("split") == "train":
            out[("train", after + 1, r["step"])] = r
            after = r["step"]
        elif r.get("split") in ("val", "test"):
            out[(r["split"], r["step"], r["step"])] = r
    return out


def same_metrics(a: dict, b: dict) -> str:
    """Returns 'equal (...)' or what differs first: every val and test record, and the train
    records covering the same steps in both runs, compared on epoch, step, loss (to 1e-5),
    acc and lr."""
    wa, wb = _windows(a), _windows(b)
    evals = sorted(k for k in wa if k[0] != "train")
    if evals != sorted(k for k in wb if k[0] != "train"):
        return "the val/test records are at other steps"
    common = sorted(k for k in wa if k[0] == "train" and k in wb)
    for key in evals + common:
        x, y = wa[key], wb[key]
        for k in COMPARED:
            same = (
                abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(y[k]))
                if k == "loss"
                else x.get(k) == y.get(k)
            )
            if not same:
                return f"{k} differs at {x['split']} step {x['step']}: {x.get(k)} vs {y.get(k)}"
    return f"equal ({len(evals)} val/test records, {len(common)} train records over the same steps)"


def common_flags(args) -> list[str]:
    return [
        "--data",
        args.data,
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        str(args.image_size),
        "--augment",
        "flip",
        "--batch-size",
        str(args.batch_size),
        "--seed",
        "0",
        "--device",
        args.device,
    ]


def pairs(variants: dict, repeats: int, log) -> dict[str, list[dict]]:
    """Runs every variant once per repeat, in order, reversed every other repeat."""
    out: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            result = variants[name]()
            out[name].append(result)
            log(
                f"  {name} #{r + 1}: train {result['train_s']:.1f} s, wall {result['wall_s']:.1f} "
                f"s (load {load()})"
            )
    return out


def bench_base(args, work: Path, log) -> dict:
    flags = [*common_flags(args), "--strategy", "last_n", "--unfreeze-last", "1"]
    flags += ["--epochs", str(args.epochs)]
    base = Path(args.base).resolve()
    variants = {
        "cached": lambda: train(REPO, work / "cached", flags),
        "base": lambda: train(base, work / "base", flags),
    }
    res = pairs(variants, args.repeats, log)
    uncached = train(REPO, work / "uncached", flags, {"FINETUNE_FEATURE_CACHE_BYTES": "0"})
    log(f"  uncached: train {uncached['train_s']:.1f} s, wall {uncached['wall_s']:.1f} s")
    return {
        "flags": flags,
        "base_commit": subprocess.run(
            ["git", "-C", str(base), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "train_ratio": [
            b["train_s"] / c["train_s"] for b, c in zip(res["base"], res["cached"], strict=True)
        ],
        "wall_ratio": [
            b["wall_s"] / c["wall_s"] for b, c in zip(res["base"], res["cached"], strict=True)
        ],
        "seconds": {
            "cached": statistics.median(r["train_s"] for r in res["cached"]),
            "base": statistics.median(r["train_s"] for r in res["base"]),
            "uncached": uncached["train_s"],
        },
        "vs_uncached": same_metrics(res["cached"][0], uncached),
        "vs_base": same_metrics(res["cached"][0], res["base"][0]),
        "cache_lines": res["cached"][0]["cache_lines"],
    }


def phase_epochs(run: dict) -> dict[str, list[float]]:
    """Returns {phase: seconds of each of its epochs, validation included} from the val
    records' time_s."""
    val = [r for r in run["records"] if r.get("split") == "val"]
    seconds: dict[str, list[float]] = {}
    before = 0.0
    for r in val:
        seconds.setdefault(r.get("phase") or "?", []).append(r["time_s"] - before)
        before = r["time_s"]
    return seconds


def bench_runs(args, work: Path, log) -> dict:
    out = {}
    for name, extra in {
        "gradual": ["--strategy", "gradual", "--unfreeze-every", str(args.unfreeze_every)],
        "lp_ft": ["--strategy", "lp_ft", "--probe-epochs", str(args.epochs // 2)],
    }.items():
        if name not in args.strategies.split(","):
            continue
        flags = [*common_flags(args), *extra, "--epochs", str(args.epochs)]
        log(f"{name}: {' '.join(extra)} --epochs {args.epochs}")
        variants = {
            "cached": lambda f=flags, n=name: train(REPO, work / f"{n}-cached", f),
            "uncached": lambda f=flags, n=name: train(
                REPO, work / f"{n}-uncached", f, {"FINETUNE_FEATURE_CACHE_BYTES": "0"}
            ),
        }
        res = pairs(variants, args.repeats, log)
        out[name] = {
            "flags": flags,
            "train_ratio": [
                u["train_s"] / c["train_s"]
                for u, c in zip(res["uncached"], res["cached"], strict=True)
            ],
            "seconds": {k: statistics.median(r["train_s"] for r in v) for k, v in res.items()},
            "metrics": same_metrics(res["cached"][0], res["uncached"][0]),
            "cache_lines": res["cached"][0]["cache_lines"],
            "phase_epoch_s": {k: phase_epochs(v[0]) for k, v in res.items()},
        }
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=("epoch", "base", "phases", "runs"))
    p.add_argument("--base", default="/tmp/base", help="checkout of the code before the cache")
    p.add_argument("--data", default="builtin:shapes")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="epochs of each run (base, phases)")
    p.add_argument("--repeats", type=int, default=None, help="pairs (epoch: 5, else 2)")
    p.add_argument("--unfreeze-every", type=int, default=2, help="gradual's epochs per phase")
    p.add_argument("--strategies", default="gradual,lp_ft", help="phases: which to run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (epoch)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # as `python -m finetune_core` runs (its __main__): OpenMP threads that spin while they
    # wait take the cores from each other on a shared machine; set before torch is imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.repeats is None:
        args.repeats = {"epoch": 5, "phases": 3}.get(args.section, 2)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    log(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load()}")
    with tempfile.TemporaryDirectory(prefix="bench-prefix-cache-") as tmp:
        if args.section == "epoch":
            res = bench_epoch(args)
            s = res["seconds"]
            print(
                f"(a) last_n 1, {res['images']} images, {res['steps']} steps/epoch, cache "
                f"{res['cache_mib']:.1f} MiB: cached epoch {s['cached']:.2f} s, trained part "
                f"alone {s['trained part alone']:.2f} s, uncached epoch {s['uncached']:.2f} s"
            )
            print(
                f"    cached / trained part alone: {spread(res['cached_over_alone'])}; target <= 1.15x"
            )
            print(f"    uncached / cached: {spread(res['uncached_over_cached'])}")
        elif args.section == "base":
            res = bench_base(args, Path(tmp), log)
            s = res["seconds"]
            print(f"(b) train {' '.join(res['flags'])}")
            print(f"    {res['cache_lines'][0] if res['cache_lines'] else 'no cache line'}")
            print(
                f"    train_time_s: {res['base_commit']} {s['base']:.1f} s, cached "
                f"{s['cached']:.1f} s, uncached (same code) {s['uncached']:.1f} s"
            )
            print(
                f"    {res['base_commit']} / cached, train time: {spread(res['train_ratio'])}; target >= 1.3x"
            )
            print(f"    {res['base_commit']} / cached, process wall: {spread(res['wall_ratio'])}")
            print(f"    metrics, cached vs uncached (same code, seed): {res['vs_uncached']}")
            print(f"    metrics, cached vs {res['base_commit']}: {res['vs_base']}")
        elif args.section == "phases":
            res = bench_phases(args, log)
            for name, r in res.items():
                print(f"(c) {name} {r['config']}, {args.epochs} epochs:")
                for p in r["phases"]:
                    e = p["epoch_s"]
                    print(
                        f"    {p['phase']!r} ({p['epochs']} epochs, "
                        f"{'cached' if p['cached'] else 'not cached'}): an epoch uncached "
                        f"{e['uncached']:.2f} s, cached {e['cached']:.2f} s, uncached / cached "
                        f"{spread(p['ratio'])}; building the cache {p['build_s']:.2f} s"
                    )
                print(f"    the run (build + epochs, uncached / cached): {r['run_ratio']:.2f}x")
        else:
            res = bench_runs(args, Path(tmp), log)
            for name, r in res.items():
                s = r["seconds"]
                print(f"(c) {name}: train {' '.join(r['flags'])}")
                for line in r["cache_lines"]:
                    print(f"    {line}")
                print(
                    f"    train_time_s: uncached {s['uncached']:.1f} s, cached {s['cached']:.1f} "
                    f"s; uncached / cached: {spread(r['train_ratio'])}; metrics {r['metrics']}"
                )
                per = r["phase_epoch_s"]
                for phase, plain in per["uncached"].items():
                    cached = per["cached"].get(phase)
                    print(
                        f"    epochs of phase {phase!r} (first pair): uncached "
                        f"{', '.join(f'{x:.1f}' for x in plain)} s; cached "
                        f"{', '.join(f'{x:.1f}' for x in cached or [])} s"
                    )
    print(f"took {time.perf_counter() - t0:.0f} s; load average now {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
