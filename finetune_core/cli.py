"""The command line: python -m finetune_core train | lr-find | sweep | list | show | compare |
report | stop | cancel | resume | worker | rank | queue | models.

`train` validates everything before a run folder exists (exit 2 with a message naming the
flag), then runs the same worker body as the dashboard's queue, in the foreground, with a
progress bar on stderr; the absolute run folder is the last line of stdout. Exit codes:
0 completed, 1 failed, 2 invalid input, 130 stopped. `lr-find` takes train's flags and
validates them the same way, runs the learning-rate range test and prints the suggested lr
as the last line of stdout; it makes no run folder. `sweep` queues several strategies (or
every unfreeze depth, `--depths`) as one group with train's other flags, waits with progress
on stderr and prints the group id last: exit 0 when every run completed, 1 when one failed,
130 when stopped.

Commands that only read runs (list, show, compare, stop) never load torch: the commands
that train import the engine when they run. `report RUN... | --group G [--output FILE]`
writes a comparison as one HTML file that opens offline (by default into the runs folder's
reports/) and prints its absolute path as the last line.

On a shared server, `--as USER` (or $FINETUNE_USER) makes train, sweep, stop, cancel and
resume act as that signed-in user: their runs are recorded as theirs, their limits apply,
and another user's run is refused unless USER is an admin (store/access.py). Without it the
CLI acts as the machine's operator, as in the local mode: nothing is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from finetune_core import config, runner, store
from finetune_core.callbacks import Callback
from finetune_core.config import ConfigError, RunConfig
from finetune_core.util.durations import Eta, fmt_clock


def flag(name: str) -> str:
    """Returns the command-line flag of a RunConfig field: image_size -> --image-size."""
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for name, option in config.OPTIONS.items():
        if not option.flag:
            continue
        text = option.help
        if option.choices is not None:
            text = f"one of {', '.join(option.allowed())}; {text}"
        text = f"{text} (default: {option.default!r})".replace("%", "%%")  # argparse's %
        if isinstance(option.default, bool):
            parser.add_argument(
                flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            # Values stay strings here; config.from_dict converts them and names the flag
            # when one is not a number, like any other invalid value.
            parser.add_argument(flag(name), dest=name, default=None, help=text)


def actor(args: argparse.Namespace) -> str | None:
    """Returns the user the command acts as: --as, else $FINETUNE_USER, else None (the
    operator of this machine, who may act on every run)."""
    return store.access.user_key(getattr(args, "as_user", None) or os.environ.get("FINETUNE_USER"))


def _error_label(key: str) -> str:
    if key in config.FIELD_NAMES or key == "config":
        return flag(key)
    return key


def _report(errors: dict[str, str]) -> None:
    for key, message in errors.items():
        print(f"error: {_error_label(key)}: {message}", file=sys.stderr)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Returns the RunConfig of `train`: the --config file's settings, overridden by flags.

    Raises ConfigError naming the flag or the file.
    """
    base = RunConfig()
    if args.config:
        try:
            base = config.from_dict(config.load_json(args.config))
        except ConfigError as e:
            if set(e.errors) == {"config"}:
                raise
            problems = "; ".join(
                v if k == "config" else f"key {k!r}: {v}" for k, v in e.errors.items()
            )
            raise ConfigError({"config": f"{args.config}: {problems}"}) from None
    given = {
        name: getattr(args, name)
        for name, option in config.OPTIONS.items()
        if option.flag and getattr(args, name, None) is not None
    }
    return config.from_dict(given, base=base)


# ---------------------------------------------------------------------------------------------
# Progress bar


class ProgressBar(Callback):
    """Draws one plain-text line on stderr: epoch, step/total, loss, acc, ETA (<= 5 a second)."""

    def __init__(self, stream=None, min_interval_s: float = 0.2, width: int = 24):
        self.stream = stream or sys.stderr
        self.min_interval_s = min_interval_s
        self.width = width
        self.loss = None
        self.acc = None
        self._last = 0.0
        self.eta = Eta()
        self._drawn = False

    def _line(self, trainer) -> str:
        step, total = trainer.step, trainer.total_steps
        filled = int(self.width * step / total) if total else 0
        bar = "#" * filled + "." * (self.width - filled)
        parts = [f"epoch {trainer.epoch}/{trainer.cfg.epochs}", f"[{bar}] {step}/{total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.acc is not None:
            parts.append(f"acc {100 * self.acc:5.1f}%")
        parts.append(f"ETA {fmt_clock(self.eta.left(step, total))}")
        return "  ".join(parts)

    def _draw(self, trainer) -> None:
        line = self._line(trainer)
        self.stream.write("\r" + line.ljust(100))
        self.stream.flush()
        self._drawn = True

    def _newline(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def on_fit_start(self, trainer) -> None:
        self.eta.start(trainer.step)

    def on_train_record(self, trainer, record) -> None:
        self.loss = record.get("loss")
        self.acc = record.get("acc")

    def on_batch_end(self, trainer) -> None:
        now = time.monotonic()
        if now - self._last >= self.min_interval_s:
            self._draw(trainer)
            self._last = now

    def on_epoch_end(self, trainer, record) -> None:
        self._draw(trainer)
        self._newline()
        self.stream.write(
            f"epoch {trainer.epoch}/{trainer.cfg.epochs} done: "
            f"val loss {record['loss']:.4f}  val acc {100 * record['acc']:.1f}%\n"
        )
        self.stream.flush()

    def on_fit_end(self, trainer, summary) -> None:
        self._newline()


# ---------------------------------------------------------------------------------------------
# Commands


LR_FIND_MAX_STEPS = 10_000  # lr-find's --steps at most
SKIPPED_SHOWN = 10  # names of skipped files printed; summary.json lists them all


def _report_skipped(run_dir: Path) -> None:
    """Prints on stderr how many data files were skipped as unreadable, and the first names."""
    skipped = (store.read_summary(run_dir) or {}).get("skipped_files") or []
    if not isinstance(skipped, list) or not skipped:
        return
    shown = [str(name) for name in skipped[:SKIPPED_SHOWN]]
    # names come from the data (a stranger's zip): no control characters reach the terminal
    names = ", ".join(name if name.isprintable() else repr(name) for name in shown)
    more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    files = "file was" if len(skipped) == 1 else "files were"
    print(
        f"warning: {len(skipped)} unreadable data {files} skipped (not images, or damaged): "
        f"{names}{more}; {run_dir / 'summary.json'} lists them all under skipped_files",
        file=sys.stderr,
    )


def _run_in_foreground(run_dir: Path) -> int:
    from finetune_core import worker  # the engine and torch: only for commands that train

    code = worker.run_worker(run_dir, callbacks=[ProgressBar()], echo=True)
    _report_skipped(run_dir)
    status = store.read_status(run_dir)
    if code == runner.EXIT_FAILED:
        print(f"error: run {status.get('state')}: {status.get('message')}", file=sys.stderr)
    else:
        print(status.get("message"))
    print(run_dir)
    return code


def cmd_train(args) -> int:
    root = store.runs_dir(args.runs_dir)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        _report(e.errors)
        return runner.EXIT_INVALID
    from finetune_core import preflight  # the models, data and weights checks need torch

    errors = preflight.validate(cfg, runs_dir=root)
    if errors:
        _report(errors)
        return runner.EXIT_INVALID
    _warn_short_ema(cfg)
    owner = actor(args)
    with store.quota.launch_lock(root):
        store.quota.check_launch(root, owner, 1, [cfg.data, cfg.weights])
        run_dir = store.create_run(cfg, root, owner_pid=os.getpid(), owner=owner)
    print(
        f"run {run_dir.name}: {cfg.model}, {cfg.strategy}, weights {cfg.weights}, on {cfg.data}",
        file=sys.stderr,
    )
    return _run_in_foreground(run_dir)


def _warn_short_ema(cfg) -> None:
    """Says on stderr, as New run does under EMA decay, when --model-ema would leave most of
    the average at the starting weights in this run (torchvision's defaults on a small data
    set), with the flags that would not; the run still starts."""
    from finetune_core import preflight

    reach = preflight.short_ema(cfg)
    if reach is None:
        return
    advice = (
        f"--model-ema-steps 1 --model-ema-decay {reach.suggested_decay:.5f}, or more --epochs"
        if reach.suggested_decay is not None
        else "more --epochs"
    )
    print(
        f"warning: --model-ema: {reach.updates} updates of {reach.decay:.4f} in this run leave "
        f"{reach.still_at_start:.0%} of the EMA weights it scores and saves as best where "
        f"training started; try {advice}",
        file=sys.stderr,
    )


def _lr_find_steps(text: str) -> int:
    """Returns --steps as a number; raises ConfigError naming the flag."""
    try:
        steps = int(text)
    except (TypeError, ValueError):
        raise ConfigError({"--steps": f"must be a whole number, not {text!r}"}) from None
    if not 2 <= steps <= LR_FIND_MAX_STEPS:
        raise ConfigError({"--steps": f"must be from 2 to {LR_FIND_MAX_STEPS}, not {steps}"})
    return steps


def _lr_find_csv(text: str | None) -> Path | None:
    """Returns the --csv path, checked before the test runs; raises ConfigError naming it."""
    if text is None:
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        raise ConfigError({"--csv": f"{text} is a folder; give a file name such as lr.csv"})
    if not path.parent.resolve().is_dir():
        raise ConfigError({"--csv": f"the folder {path.parent} does not exist; create it first"})
    return path


class _LrFindProgress:
    """Draws the range test's progress (preparing, then a bar of its steps) on one stderr line."""

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.drawn = False

    def __call__(self, fraction=None, message=None) -> None:
        if message is None:
            return
        if fraction is not None:
            filled = int(self.width * fraction)
            message = f"[{'#' * filled}{'.' * (self.width - filled)}] {message}"
        self.stream.write("\r" + message.ljust(80))
        self.stream.flush()
        self.drawn = True

    def done(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _lr_find_table(curve, rows: int = 10) -> str:
    """Returns about `rows` evenly spaced points of the curve, and the suggestions."""
    n = len(curve.lrs)
    picked = sorted({round(i * (n - 1) / max(1, rows - 1)) for i in range(min(rows, n))})
    lines = [f"{'lr':>10}  {'loss':>10}  {'smoothed':>10}"]
    for i in picked:
        lines.append(f"{curve.lrs[i]:>10.3g}  {curve.losses[i]:>10.4f}  {curve.smoothed[i]:>10.4f}")
    end = (
        f"the loss diverged at lr {curve.lrs[-1]:.3g}"
        if curve.stopped_early
        else f"the loss did not diverge up to lr {curve.lrs[-1]:.3g}"
    )
    lines += [
        f"{n} steps; {end}",
        f"lowest smoothed loss at lr {curve.min_loss_lr:.3g} "
        f"(fastai's minimum/10: {curve.min_loss_lr_over_10:.3g})",
        f"suggested lr (steepest fall of the smoothed loss): {curve.suggested_lr:.3g}",
    ]
    return "\n".join(lines)


def cmd_lr_find(args) -> int:
    root = store.runs_dir(args.runs_dir)
    try:
        cfg = config_from_args(args)
        steps = _lr_find_steps(args.steps)
        csv_path = _lr_find_csv(args.csv)
    except ConfigError as e:
        _report(e.errors)
        return runner.EXIT_INVALID
    from finetune_core import lr_find, preflight  # the engine and torch

    errors = preflight.validate(cfg, runs_dir=root)
    if errors:
        _report(errors)
        return runner.EXIT_INVALID
    print(
        f"lr-find: {cfg.model}, {cfg.strategy}, weights {cfg.weights}, on {cfg.data}, "
        f"{steps} steps at most (no run is made)",
        file=sys.stderr,
    )
    bar = _LrFindProgress()
    try:
        curve = lr_find.find_lr(cfg, steps=steps, progress=bar, runs_dir=root)
    except (KeyboardInterrupt, ConfigError):
        bar.done()
        raise
    except Exception as e:  # noqa: BLE001 - say what failed, as a run's failure would
        bar.done()
        print(f"error: lr-find failed: {e}", file=sys.stderr)
        return runner.EXIT_FAILED
    bar.done()
    print(_lr_find_table(curve), file=sys.stderr)
    if not curve.loss_fell:
        print(
            "warning: the loss barely fell before it diverged, so the suggestion is a guess: "
            "the features may not suit this data (try other --weights or a larger "
            "--image-size) or the test was too short (more --steps)",
            file=sys.stderr,
        )
    if csv_path is not None:
        curve.to_csv(csv_path)
        print(f"wrote the curve to {csv_path}", file=sys.stderr)
    print(f"{curve.suggested_lr:.3g}")
    return 0


DEFAULT_SWEEP = "full,last_n:1,linear_probe"  # New run's default comparison
MAX_SEEDS = config.MAX_SEEDS
SWEEP_POLL_S = 1.0


def sweep_specs(
    strategy_list: str | None, depths: bool, model: str, surgical: bool = False
) -> list[dict[str, Any]]:
    """Returns the strategy fields of each member of a sweep: `--depths` gives last_n for
    k = 0 .. G-1 plus full (G the model's backbone groups), `--surgical` surgical for each
    group alone (1 = the top one), both together both, full once; a strategy list gives one
    per item, "name:value" setting the strategy's main option. Raises ConfigError naming the
    flag."""
    if depths or surgical:
        if strategy_list:
            used = " and ".join(
                f for f, on in (("--depths", depths), ("--surgical", surgical)) if on
            )
            raise ConfigError({"--strategies": f"give --strategies or {used}, not both"})
        from finetune_core import models  # the model's groups: torchvision's registry

        try:
            groups = len(models.group_names(model))
        except (KeyError, ValueError) as e:
            raise ConfigError({"model": str(e)}) from None
        from finetune_core import strategies

        return strategies.depth_sweep(groups, depths=depths, surgical=surgical)
    from finetune_core import strategies

    specs = []
    for item in (strategy_list or DEFAULT_SWEEP).split(","):
        name, _, value = item.strip().partition(":")
        try:
            strategy = strategies.get(name)
        except ValueError as e:
            raise ConfigError({"--strategies": str(e)}) from None
        fields: dict[str, Any] = {"strategy": name}
        if value:
            if not strategy.options:
                raise ConfigError(
                    {"--strategies": f"{name} has no option to set ({item!r}); write {name} alone"}
                )
            main = strategy.options[0]
            try:
                fields[main.name] = type(main.default)(value)
            except ValueError:
                kind = type(main.default).__name__
                raise ConfigError(
                    {"--strategies": f"{item!r}: {main.name} takes a {kind}, got {value!r}"}
                ) from None
        specs.append(fields)
    if not specs or not all(s["strategy"] for s in specs):
        raise ConfigError({"--strategies": "name at least one strategy, e.g. full,linear_probe"})
    return specs


def _sweep_seeds(text: str) -> int:
    try:
        seeds = int(text)
    except ValueError:
        seeds = 0
    if not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError({"--seeds": f"must be a whole number from 1 to {MAX_SEEDS}, got {text}"})
    return seeds


def _sweep_line(members: dict[Path, dict[str, Any]], labels: dict[str, str]) -> str:
    done = sum(s.get("state") in store.FINAL_STATES for s in members.values())
    live = [
        f"{labels[d.name]}: epoch {s.get('epoch') or 0}/{s.get('epochs') or '?'}"
        for d, s in members.items()
        if s.get("state") == "running"
    ]
    return f"{done}/{len(members)} done" + (f" · {', '.join(live)}" if live else "")


def cmd_sweep(args) -> int:
    root = store.runs_dir(args.runs_dir)
    try:
        base = config_from_args(args)
        seeds = _sweep_seeds(args.seeds)
        specs = sweep_specs(args.strategies, args.depths, base.model, args.surgical)
        # `--no-tune-lr` reads as --same-lr; `--tune-lr` is the default anyway
        tune = not args.same_lr and args.tune_lr is not False
        shared = config.comparison_fields(base, tune=tune)
        cfgs = [
            config.from_dict({**spec, **shared, "seed": base.seed + i}, base=base)
            for spec in specs
            for i in range(seeds)
        ]
    except ConfigError as e:
        _report(e.errors)
        return runner.EXIT_INVALID
    from finetune_core import preflight  # the models, data and weights checks need torch

    for cfg in cfgs:
        errors = preflight.validate(cfg, runs_dir=root)
        if errors:
            _report(errors)
            return runner.EXIT_INVALID
    _warn_short_ema(cfgs[0])  # the group shares its data, epochs and batch
    run_dirs = runner.enqueue(cfgs, root, group=True, owner=actor(args))
    group = store.read_config(run_dirs[0]).get("group")
    labels = {d.name: strategies_label(store.read_config(d)) for d in run_dirs}
    print(f"group {group}: {len(run_dirs)} runs queued in {root}", file=sys.stderr)
    if tune:
        held_out = (
            f"; {100 * shared['test_fraction']:g} % of the images held out as test "
            "(used when the data has no test/ folder)"
            if "test_fraction" in shared
            else ""
        )
        print(
            "each run first tunes its learning rate on the validation split (a few "
            f"trainings at rates below where the loss blows up; --same-lr turns this off){held_out}",
            file=sys.stderr,
        )
    stopped = False
    try:
        while True:
            members = {d: store.read_status(d) for d in run_dirs}
            print(f"\r{_sweep_line(members, labels)}\033[K", end="", file=sys.stderr, flush=True)
            if all(s.get("state") in store.FINAL_STATES for s in members.values()):
                break
            time.sleep(SWEEP_POLL_S)
    except KeyboardInterrupt:
        stopped = True
        for d in run_dirs:
            runner.stop_run(d, actor=actor(args))
        print("\nstopping the group: each run saves a checkpoint", file=sys.stderr)
    print(file=sys.stderr)
    states = {d: store.read_status(d).get("state") for d in run_dirs}
    for d in run_dirs:
        print(f"{labels[d.name]:<24} {states[d] or '?':<10} {d.name}", file=sys.stderr)
    print(group)
    if stopped or "stopped" in states.values():
        return runner.EXIT_STOPPED
    return runner.EXIT_COMPLETED if set(states.values()) == {"completed"} else runner.EXIT_FAILED


def strategies_label(cfg: dict[str, Any]) -> str:
    from finetune_core import strategies

    label = strategies.label(cfg)
    return f"{label} seed {cfg.get('seed')}"


def cmd_resume(args) -> int:
    run_dir = store.resolve_run(args.run, store.runs_dir(args.runs_dir))
    if args.queue:
        runner.resume_run(run_dir, actor=actor(args))
        print(f"queued {run_dir.name} to resume")
        print(run_dir)
        return 0
    runner.resume_run(run_dir, owner_pid=os.getpid(), actor=actor(args))
    return _run_in_foreground(run_dir)


def cmd_worker(args) -> int:
    from finetune_core import worker

    return worker.run_worker(store.resolve_run(args.run_dir, store.runs_dir(args.runs_dir)))


def cmd_rank(args) -> int:
    from finetune_core import worker

    return worker.run_rank(args.run_dir)


def cmd_job(args) -> int:
    from finetune_core import worker

    return worker.run_job(args.job_dir)


def cmd_queue(args) -> int:
    limit = int(args.max_parallel) if args.max_parallel is not None else None
    return runner.supervise(store.runs_dir(args.runs_dir), limit, idle_exit_s=args.idle_exit)


def _pct(value) -> str:
    return "" if value is None or value != value else f"{100 * value:.1f}%"


def cmd_list(args) -> int:
    root = store.runs_dir(args.runs_dir)
    runs = store.list_runs(root)
    if runs.empty:
        print(f"no runs in {root}")
        return 0
    table = runs[["run_id", "name", "model", "strategy", "state"]].copy()
    table["best_val_acc"] = runs["best_val_acc"].map(_pct)
    table["trainable"] = runs["trainable_pct"].map(
        lambda v: "" if v != v else f"{v:.2f}%"  # noqa: PLR0124 - NaN check
    )
    table["time"] = runs["train_time_s"].map(lambda v: "" if v != v else f"{v:.0f}s")
    table["disk"] = runs["disk_bytes"].map(lambda b: f"{b / 1e6:.1f}MB")
    table["group"] = runs["group"].fillna("")
    if runs["owner"].notna().any():  # a shared server's runs: whose each one is
        table["owner"] = runs["owner"].fillna("")
    print(table.to_string(index=False))
    # a run that cannot be read or does not respond says why, below the table
    for row in runs[runs["state"].isin([store.UNKNOWN, store.STALLED])].itertuples():
        message = store.read_status(row.path).get("message")
        print(f"note: run {row.run_id} is {row.state}: {message}", file=sys.stderr)
    return 0


def _plan_text(cfg: RunConfig, summary: dict[str, Any] | None) -> str:
    try:
        from finetune_core import data, preflight  # builds the model on the meta device

        classes = (summary or {}).get("classes")
        num_classes = len(classes) if classes else len(data.inspect_data(cfg.data).classes)
        return preflight.plan_for(cfg, num_classes).to_frame().to_string(index=False)
    except Exception as e:  # noqa: BLE001 - the plan is extra information for `show`
        return f"(the plan is not available: {e})"


def cmd_show(args) -> int:
    run_dir = store.resolve_run(args.run, store.runs_dir(args.runs_dir))
    conf = store.read_config(run_dir)
    status = store.read_status(run_dir)
    summary = store.read_summary(run_dir)
    print(f"run {run_dir.name}  ({run_dir})")
    print("\nconfig:")
    print(json.dumps(conf, indent=2))
    print("\nstatus:")
    print(json.dumps(status, indent=2))
    print("\nsummary:")
    print(json.dumps(summary, indent=2) if summary else "(none yet: the run has not ended)")
    print("\nplan:")
    print(_plan_text(store.run_config(run_dir), summary))
    return 0


def cmd_compare(args) -> int:
    root = store.runs_dir(args.runs_dir)
    run_dirs = [store.resolve_run(ref, root) for ref in args.runs]
    table = store.compare_runs(run_dirs)
    shown = table.copy()
    for column in ("best_val_acc", "final_val_acc", "test_acc"):
        shown[column] = table[column].map(_pct)
    shown["trainable_pct"] = table["trainable_pct"].map(lambda v: "" if v != v else f"{v:.2f}%")
    print(shown.drop(columns=["path"]).to_string(index=False))
    return 0


def cmd_report(args) -> int:
    """Writes one self-contained HTML file of a comparison; prints its absolute path last."""
    from finetune_core import report  # plotly: only when a report is written

    root = store.runs_dir(args.runs_dir)
    if args.group and args.runs:
        print("error: --group: give runs or --group, not both", file=sys.stderr)
        return runner.EXIT_INVALID
    if args.group:
        runs = store.list_runs(root)
        members = runs[runs["group"] == args.group] if not runs.empty else runs
        if members.empty:
            print(
                f"error: --group: no runs of group {args.group!r} in {root} "
                "(sweep prints a group's id; see `python -m finetune_core list`)",
                file=sys.stderr,
            )
            return runner.EXIT_INVALID
        run_dirs = [Path(p) for p in members["path"]][::-1]  # launch order
    elif args.runs:
        run_dirs = []
        for ref in args.runs:
            try:
                run_dirs.append(store.resolve_run(ref, root))
            except store.RunError as e:
                print(f"error: RUN: {e}", file=sys.stderr)
                return runner.EXIT_INVALID
    else:
        print("error: give the runs to report (RUN ...) or --group GROUP", file=sys.stderr)
        return runner.EXIT_INVALID
    output = args.output or report.default_path(root, run_dirs)
    try:
        path = report.write_report(run_dirs, output)
    except OSError as e:
        print(
            f"error: --output: cannot write {output} ({e.strerror or e}); "
            "give a file in a folder you can write to with --output FILE.html",
            file=sys.stderr,
        )
        return runner.EXIT_INVALID
    print(path)
    return 0


def _group_stop(args, cancel_only: bool) -> int:
    if args.run:
        print("error: --group: give a run or --group, not both", file=sys.stderr)
        return runner.EXIT_INVALID
    try:
        outcome = runner.stop_group(
            store.runs_dir(args.runs_dir), args.group, cancel_only=cancel_only, actor=actor(args)
        )
    except store.RunError as e:
        print(f"error: --group: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    for run_id, what in outcome.items():
        print(f"{run_id}: {what}")
    acted = [w for w in outcome.values() if w != "not running"]
    print(
        f"group {args.group}: {len(acted)} of {len(outcome)} runs "
        + ("cancelled" if cancel_only else "stopped or cancelled")
    )
    return 0 if acted else 1


def cmd_cancel(args) -> int:
    if args.group:
        return _group_stop(args, cancel_only=True)
    if not args.run:
        print("error: give a queued run, or --group GROUP", file=sys.stderr)
        return runner.EXIT_INVALID
    run_dir = store.resolve_run(args.run, store.runs_dir(args.runs_dir))
    if runner.cancel_run(run_dir, actor=actor(args)):
        print(f"cancelled {run_dir.name} before it started")
        return 0
    state = store.read_status(run_dir).get("state")
    print(
        f"run {run_dir.name} is {state}, not queued; nothing to cancel (stop it instead)",
        file=sys.stderr,
    )
    return 1


def cmd_stop(args) -> int:
    if args.group:
        return _group_stop(args, cancel_only=False)
    if not args.run:
        print("error: give a run, or --group GROUP", file=sys.stderr)
        return runner.EXIT_INVALID
    run_dir = store.resolve_run(args.run, store.runs_dir(args.runs_dir))
    outcome = runner.stop_run(run_dir, actor=actor(args))
    if outcome == "not running":
        state = store.read_status(run_dir).get("state")
        print(f"run {run_dir.name} is {state}; nothing to stop", file=sys.stderr)
        return 1
    if outcome == "cancelled":
        print(f"cancelled {run_dir.name} before it started")
    else:
        print(
            f"stopping {run_dir.name}: the worker saves a checkpoint and ends as stopped; if it "
            f"has not ended {runner.stop_grace_s():g} s after the first stop, the queue's "
            "supervisor kills it and records it stopped (resumable from its last checkpoint)"
        )
    return 0


def cmd_models(args) -> int:
    from finetune_core import models

    rows = []
    for name in models.classification_models():
        try:
            info = models.model_info(name)
        except Exception:  # noqa: BLE001 - list the name even without metadata
            info = {}
        params = info.get("params") or info.get("num_params")
        acc1 = info.get("acc1")
        rows.append(
            f"{name:<28} {'' if params is None else f'{params / 1e6:8.1f}M':>10}"
            f"  {'' if acc1 is None else f'ImageNet top-1 {acc1:.1f}%'}"
        )
    print(f"{'model':<28} {'params':>10}")
    print("\n".join(rows))
    return 0


# ---------------------------------------------------------------------------------------------
# Predict and export (issue 13): use a finished run's model


def _printable(name: str) -> str:
    """Returns a file name fit for the terminal (names come from strangers' folders)."""
    return name if name.isprintable() else repr(name)


def _prediction_lines(table) -> str:
    """Returns the predictions as a table for people: probabilities in per cent."""
    shown = table.copy()
    shown["file"] = shown["file"].map(_printable)
    for column in [c for c in shown.columns if c.startswith("prob")]:
        shown[column] = shown[column].map(lambda v: f"{100 * v:.1f}%")
    return shown.to_string(index=False)


def cmd_predict(args) -> int:
    """Predicts images with a finished run's model: a table on stdout (and --csv FILE),
    unreadable files on stderr. Exit 0 when images were predicted, 2 for bad input."""
    from finetune_core import predict  # torch and the engine: only when predicting

    root = store.runs_dir(args.runs_dir)
    try:
        run_dir = store.resolve_run(args.run, root)
    except store.RunError as e:
        print(f"error: RUN: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    try:
        files = predict.image_files(args.images)
    except predict.PredictError as e:
        print(f"error: IMAGES: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    if not files:
        print(f"error: IMAGES: no files in {', '.join(args.images)}", file=sys.stderr)
        return runner.EXIT_INVALID
    if args.csv and Path(args.csv).is_dir():
        print(f"error: --csv: {args.csv} is a folder; give a file name", file=sys.stderr)
        return runner.EXIT_INVALID
    try:
        loaded = predict.load_model(run_dir)
    except predict.PredictError as e:
        print(f"error: RUN: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    n = len(loaded.classes)
    try:
        top_k = predict.check_top_k(args.top_k or min(predict.DEFAULT_TOP_K, n), n)
    except predict.PredictError as e:
        print(f"error: --top-k: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    try:
        loaded.check_tta(args.tta)
    except predict.PredictError as e:
        print(f"error: --tta: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    found, problems = loaded.predict_files(files, top_k, tta=args.tta)
    for message in problems:
        print(f"warning: skipped: {_printable(message)}", file=sys.stderr)
    if not found:
        print(
            f"error: IMAGES: none of the {len(files)} files could be read as an image",
            file=sys.stderr,
        )
        return runner.EXIT_INVALID
    table = predict.predictions_table(found)
    if args.csv:
        try:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.csv, index=False)
        except OSError as e:
            print(f"error: --csv: cannot write {args.csv} ({e.strerror or e})", file=sys.stderr)
            return runner.EXIT_FAILED
    print(_prediction_lines(table))
    skipped = f"; {len(problems)} unreadable skipped" if problems else ""
    wrote = f"; written to {Path(args.csv).resolve()}" if args.csv else ""
    print(
        f"{len(found)} images predicted by run {run_dir.name} ({loaded.model_name}, "
        f"{loaded.strategy}){skipped}{wrote}",
        file=sys.stderr,
    )
    return 0


def cmd_export(args) -> int:
    """Exports a run's model into RUN/export/ and prints the file's absolute path last."""
    from finetune_core import export

    root = store.runs_dir(args.runs_dir)
    try:
        run_dir = store.resolve_run(args.run, root)
    except store.RunError as e:
        print(f"error: RUN: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    missing = export.missing_packages(args.format)
    if missing:
        print(f"error: --format: {export.install_hint(missing)}", file=sys.stderr)
        return runner.EXIT_INVALID
    from finetune_core import predict  # torch and the engine: only when exporting

    try:
        path = export.export(
            run_dir,
            args.format,
            progress=lambda m: print(m, file=sys.stderr),
            actor=actor(args),
        )
    except store.access.NotAllowed as e:
        print(f"error: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    except predict.PredictError as e:
        print(f"error: RUN: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    except export.ExportError as e:
        print(f"error: export failed: {e}", file=sys.stderr)
        return runner.EXIT_FAILED
    print(
        f"model.json beside it: classes, image size, normalisation ({path.parent})", file=sys.stderr
    )
    print(path)
    return 0


def add_predict_and_export(sub, runs_dir_flag, as_flag) -> None:
    """The predict and export subcommands."""
    from finetune_core.export import FORMATS  # torch-free

    p = sub.add_parser(
        "predict", help="predict images with a finished run's model: a table of top classes"
    )
    p.add_argument("run", metavar="RUN", help="run id, unique id prefix, or folder")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, or a folder of them")
    p.add_argument(
        "--top-k",
        default=None,
        metavar="K",
        help="classes shown per image, best first (default: 3, at most the run's classes)",
    )
    p.add_argument(
        "--csv",
        default=None,
        metavar="FILE",
        help="also write one row per image: file,pred,prob,pred2,prob2,... (probabilities 0-1)",
    )
    p.add_argument(
        "--tta",
        default="none",
        choices=("none", "flip", "augment"),
        help="test-time augmentation: flip = the mean of the softmax of each image and its "
        "mirror; augment = 0.25 x the image's + 0.75 x the mean of 4 views with the run's "
        "augmentation (default: none)",
    )
    runs_dir_flag(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="write a run's model into RUN/export/ as safetensors, TorchScript or ONNX: "
        "prints the file's path last",
    )
    p.add_argument("run", metavar="RUN", help="run id, unique id prefix, or folder")
    p.add_argument(
        "--format",
        required=True,
        choices=list(FORMATS),
        help="; ".join(f"{fmt}: {what}" for fmt, (_, what) in FORMATS.items()),
    )
    runs_dir_flag(p)
    as_flag(p)
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_core",
        description="Fine-tune torchvision models: full vs partial fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def runs_dir_flag(p):
        p.add_argument(
            "--runs-dir",
            default=None,
            help="runs folder (default: $FINETUNE_RUNS_DIR, else ./runs)",
        )

    def as_flag(p):
        p.add_argument(
            "--as",
            dest="as_user",
            default=None,
            metavar="USER",
            help="act as this signed-in user of a shared server (their e-mail address): "
            "runs are theirs, another user's runs are refused (default: $FINETUNE_USER, "
            "else the machine's operator, who may act on every run)",
        )

    def with_train_flags(name: str, help: str) -> argparse.ArgumentParser:
        """A command that takes train's settings: every config flag, --config, --runs-dir."""
        p = sub.add_parser(name, help=help)
        _add_config_flags(p)
        p.add_argument(
            "--config", default=None, metavar="FILE.json", help="settings file; flags override it"
        )
        runs_dir_flag(p)
        return p

    train = with_train_flags("train", "train one run in the foreground")
    as_flag(train)
    train.set_defaults(func=cmd_train)

    p = with_train_flags(
        "lr-find", "learning-rate range test for train's settings: prints the suggested lr last"
    )
    p.add_argument(
        "--steps",
        default="100",
        metavar="N",
        help="optimizer steps at most, lr growing from 1e-7 to 10 (default: 100)",
    )
    p.add_argument(
        "--csv", default=None, metavar="FILE", help="write the curve: lr,loss,smoothed_loss"
    )
    p.set_defaults(func=cmd_lr_find)

    p = with_train_flags(
        "sweep",
        "a comparison without the browser: queue strategies as one group, wait, print its id",
    )
    p.add_argument(
        "--strategies",
        default=None,
        metavar="LIST",
        help=f"comma-separated; name:value sets the strategy's main option (default: {DEFAULT_SWEEP})",
    )
    p.add_argument(
        "--depths",
        action="store_true",
        help="last_n for k = 0 (a linear probe) up to every backbone group but one, plus full",
    )
    p.add_argument(
        "--seeds",
        default="1",
        metavar="K",
        help=f"runs per strategy, seeds SEED .. SEED+K-1 (1 to {MAX_SEEDS}; default 1); "
        "every seed gets the same split",
    )
    p.add_argument(
        "--surgical",
        action="store_true",
        help="surgical for each backbone group alone (1 = the top one), plus full",
    )
    p.add_argument(
        "--same-lr",
        action="store_true",
        help="train every strategy at --lr; by default each run first tunes its lr on the "
        "validation split (and, without a test/ folder, 20 %% of the images are held out as "
        "test)",
    )
    as_flag(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("list", help="list runs, newest first")
    runs_dir_flag(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show a run's config, status, summary and plan")
    p.add_argument("run", help="run id, unique id prefix, or folder")
    runs_dir_flag(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("compare", help="a table of final metrics of several runs")
    p.add_argument("runs", nargs="+", help="run ids, unique id prefixes, or folders")
    runs_dir_flag(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML file of a comparison (opens offline): prints its path last",
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="run ids, unique id prefixes, or folders")
    p.add_argument("--group", default=None, help="every run of this group (sweep prints it)")
    p.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="where to write it (default: <runs folder>/reports/<group or run ids>.html)",
    )
    runs_dir_flag(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "stop", help="stop a running run (it saves a checkpoint) or cancel a queued one"
    )
    p.add_argument("run", nargs="?", help="a run id, a unique prefix, or a path")
    p.add_argument("--group", default=None, help="stop every run of this group (sweep prints it)")
    runs_dir_flag(p)
    as_flag(p)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("cancel", help="take a queued run, or a group's queued runs, off the queue")
    p.add_argument("run", nargs="?", help="a run id, a unique prefix, or a path")
    p.add_argument("--group", default=None, help="cancel every queued run of this group")
    runs_dir_flag(p)
    as_flag(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", help="resume a stopped, crashed or failed run")
    p.add_argument("run")
    p.add_argument(
        "--queue", action="store_true", help="queue it for the supervisor instead of running here"
    )
    runs_dir_flag(p)
    as_flag(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("worker", help="run a queued run (used by the queue and the dashboard)")
    p.add_argument("run_dir")
    runs_dir_flag(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "rank", help="train one process of a run on several devices (started under torchrun)"
    )
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("job", help="do a background job (used by the dashboard)")
    p.add_argument("job_dir")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("queue", help="run the queue supervisor of a runs folder")
    runs_dir_flag(p)
    p.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        help="runs trained at once (default: $FINETUNE_MAX_PARALLEL, settings.json, else 1)",
    )
    p.add_argument(
        "--idle-exit",
        type=float,
        default=runner.IDLE_EXIT_S,
        help="seconds with nothing queued or running before the supervisor exits",
    )
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("models", help="list the classification models of torchvision")
    p.set_defaults(func=cmd_models)
    add_predict_and_export(sub, runs_dir_flag, as_flag)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except store.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return runner.EXIT_INVALID
    except ConfigError as e:
        _report(e.errors)
        return runner.EXIT_INVALID
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return runner.EXIT_STOPPED
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
