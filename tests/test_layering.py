"""finetune_core's rooms and what each may import: no cycles, no private names across modules,
nothing that reads runs loads torch, nothing loads streamlit.

The rules are checked twice: on the source (every import statement, those inside functions
too) and by importing each room alone in a fresh interpreter (what it really pulls in).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "finetune_core"

# room -> the rooms it may import directly (a room is a top-level module or package)
ALLOWED = {
    "util": set(),
    "callbacks": set(),
    "options": {"util"},
    "strategies": {"options", "util"},
    "config": {"strategies", "options", "util"},
    "device": set(),
    "models": {"util"},
    "metrics": set(),
    "stats": set(),  # bootstrap intervals (numpy): plots and the engine use them
    "memory": set(),  # a training step's measured memory, a run's stored size (torch)
    # one run on several devices: torchrun's process group, DDP, the collectives (torch)
    "distributed": set(),
    # weight drift per group and epoch (torch); its record's split is the store's contract
    "drift": {"callbacks", "store", "strategies"},
    "data": {"util"},
    # the run store; `create_run` records the device (torch) only when it makes a run
    "store": {"callbacks", "config", "strategies", "util", "device"},
    "checkpoints": {"models", "util"},
    "weights": {"checkpoints", "models", "data", "store", "util"},
    # fastai's head for any model, in place of its last layer (torch)
    "heads": set(),
    # the recipe: weight EMA, MixUp/CutMix, momentum, accumulation, TTA (torch)
    "recipe": {"data", "metrics"},
    "engine": {
        "checkpoints",
        "callbacks",
        "config",
        "data",
        "device",
        "distributed",
        "heads",
        "memory",
        "metrics",
        "models",
        "recipe",
        "stats",
        "strategies",
        "util",
        "weights",
    },
    "pretrain": {"callbacks", "config", "device", "engine", "util", "weights"},
    "preflight": {
        "config",
        "data",
        "device",  # is the device asked for on this machine
        "engine",
        "models",
        "pretrain",
        "recipe",  # how far a weight EMA gets in a run, warned about before it starts
        "strategies",
        "util",
        "weights",
    },
    "runner": {"config", "store", "util", "ray_jobs"},
    # the queue on a Ray cluster (FINETUNE_RUNNER=ray): Ray only when a job is submitted
    "ray_jobs": {"store"},
    "jobs": {"runner", "util"},
    # uploads kept by content; the extraction job loads data (torch) in the job's process
    "uploads": {"data", "store", "util"},
    "worker": {
        "callbacks",
        "checkpoints",
        "config",
        "data",
        "device",
        "distributed",
        "drift",
        "engine",
        "estimate",
        "jobs",
        "lr_find",
        "pretrain",
        "runner",
        "store",
        "tuning",
        "uploads",
        "util",
        "weights",
    },
    # the lr search before a tuned run trains: the range test, then trainings on val
    "tuning": {"callbacks", "data", "engine", "lr_find"},
    "estimate": {"config", "data", "device", "engine", "models"},
    # the range test builds the experiment as training does, on a model of its own
    "lr_find": {"config", "engine", "pretrain", "strategies", "weights"},
    # the commands that train import the engine's rooms when they run
    "cli": {
        "callbacks",
        "config",
        "data",
        "export",
        "lr_find",
        "models",
        "predict",
        "preflight",
        "report",
        "runner",
        "store",
        "strategies",
        "util",
        "worker",
    },
    "plots": {"stats", "store", "strategies", "util"},
    # a comparison as one HTML file: the figures of plots, the runs of store
    "report": {"plots", "store", "strategies", "util"},
    # a finished run's model to use (load_model, predict): built as evaluation built it
    "predict": {
        "checkpoints",
        "config",
        "data",
        "engine",
        "heads",
        "models",
        "recipe",
        "store",
        "strategies",
        "weights",
    },
    # the model as safetensors, TorchScript or ONNX; torch only when exporting
    "export": {"models", "predict", "store", "util"},
    "__main__": {"cli"},
}

# Rooms that must not load torch on import: reading runs, the queue and the CLI stay fast,
# and the supervisor stays small.
# what the rooms that may load torch are imported beside (never peft or streamlit, which
# the tests below look for)
PRELOAD = ("torch", "torchvision", "numpy", "pandas", "PIL.Image")
TORCH_FREE = {
    "util",
    "callbacks",
    "options",
    "strategies",
    "config",
    "store",
    "runner",
    "ray_jobs",
    "cli",
    "plots",
    "report",
    "jobs",
    "uploads",
    "stats",
    "export",
}


def _rooms(package: Path) -> dict[str, list[Path]]:
    rooms: dict[str, list[Path]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        room = rel.parts[0].removesuffix(".py")
        if room != "__init__":
            rooms.setdefault(room, []).append(path)
    return rooms


def _module_name(package: Path, path: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(package: Path, dotted: str) -> bool:
    path = package.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(tree: ast.AST, name: str):
    """Yields (module, imported name or None, the name it is bound to) for our imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(name + "."):
                    yield a.name, None, a.asname
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == name or node.module.startswith(name + "."):
                for a in node.names:
                    yield node.module, a.name, a.asname or a.name


def check_source(package: Path, allowed: dict[str, set[str]]) -> list[str]:
    """Returns every rule the source of `package` breaks: a room importing one it may not, an
    import cycle between rooms, a `_private` name used from another module."""
    name = package.name
    problems = []
    edges: dict[str, set[str]] = {}
    for room, paths in _rooms(package).items():
        for path in paths:
            here = _module_name(package, path)
            tree = ast.parse(path.read_text())
            aliases: dict[str, str] = {}  # local name -> our module bound to it
            for module, imported, bound in _imports(tree, name):
                full = f"{module}.{imported}" if imported else module
                if imported and imported.startswith("_") and module != here:
                    problems.append(f"{here} imports the private {full}")
                if bound and _is_module(package, full):
                    aliases[bound] = full
                target = full.split(".")[1]
                if target != room:
                    edges.setdefault(room, set()).add(target)
                    if target not in allowed.get(room, set()):
                        problems.append(f"{here} imports {full}: {room} may not use {target}")
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and aliases.get(node.value.id, here) != here
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                ):
                    problems.append(f"{here} uses the private {aliases[node.value.id]}.{node.attr}")

    def visit(room: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(room, ())):
            if nxt in path:
                problems.append("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            else:
                visit(nxt, [*path, nxt])

    for room in sorted(edges):
        visit(room, [room])
    return sorted(set(problems))


def test_the_rooms_import_only_what_the_layering_allows_without_cycles_or_private_names():
    assert set(_rooms(PACKAGE)) == set(ALLOWED), "a new room needs its line in ALLOWED"
    assert check_source(PACKAGE, ALLOWED) == []


def test_the_layering_check_finds_a_cycle_a_forbidden_room_and_a_private_name(tmp_path):
    pkg = tmp_path / "demo"
    (pkg / "inner").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from demo import b\n\ndef f():\n    return b._hidden\n")
    (pkg / "b.py").write_text("def g():\n    from demo.a import f\n    return f\n")
    (pkg / "inner" / "__init__.py").write_text("")
    (pkg / "inner" / "c.py").write_text("from demo.b import _secret\n")
    found = check_source(pkg, {"a": {"b"}, "b": {"a"}, "inner": set()})
    assert "import cycle: a -> b -> a" in found
    assert "demo.a uses the private demo.b._hidden" in found
    assert "demo.inner.c imports the private demo.b._secret" in found
    assert any("inner may not use b" in p for p in found)


def _closure(room: str) -> set[str]:
    seen, todo = set(), [room]
    while todo:
        for nxt in ALLOWED[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# Imports each room named in argv[1] in a child forked from this interpreter (which has
# loaded only what argv[2] names, never a room of ours) and prints what each pulled in. A
# fork starts with the parent's modules and nothing else: the rooms that may load torch are
# forked from one that has torch and torchvision loaded, so that each of them does not pay
# their import again (seconds each on 2 cores); the torch-free ones from a bare interpreter.
_PROBE = """
import importlib, json, os, sys
for name in filter(None, sys.argv[2].split(",")):
    importlib.import_module(name)
found = {}
for room in sys.argv[1].split(","):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        importlib.import_module("finetune_core." + room)
        ours = sorted({m.split(".")[1] for m in sys.modules if m.startswith("finetune_core.")})
        seen = {"rooms": ours, "torch": "torch" in sys.modules,
                "streamlit": any(m.split(".")[0] == "streamlit" for m in sys.modules),
                "peft": any(m.split(".")[0] == "peft" for m in sys.modules)}
        with os.fdopen(w, "w") as out:
            json.dump(seen, out)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as got:
        text = got.read()
    _, code = os.waitpid(pid, 0)
    if code:
        sys.exit(f"importing finetune_core.{room} failed (status {code})")
    found[room] = json.loads(text)
print(json.dumps(found))
"""


def _import_alone(rooms: list[str], preload: tuple[str, ...] = ()) -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(rooms), ",".join(preload)],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, dict]:
    rooms = sorted(r for r in ALLOWED if r != "__main__")
    free = [r for r in rooms if r in TORCH_FREE]
    with ThreadPoolExecutor(2) as pool:
        bare = pool.submit(_import_alone, free)
        rest = pool.submit(_import_alone, [r for r in rooms if r not in TORCH_FREE], PRELOAD)
        return {**bare.result(), **rest.result()}


def test_each_room_imported_alone_pulls_in_only_the_rooms_it_may_use(imported_alone):
    for room, found in imported_alone.items():
        extra = set(found["rooms"]) - {room} - _closure(room)
        assert not extra, f"importing finetune_core.{room} pulled in {sorted(extra)}"


def test_reading_runs_the_queue_and_the_cli_never_load_torch_and_nothing_loads_streamlit(
    imported_alone,
):
    assert [r for r in TORCH_FREE if imported_alone[r]["torch"]] == []
    assert [r for r, found in imported_alone.items() if found["streamlit"]] == []


def test_no_room_loads_peft_on_import_so_a_worker_without_lora_pays_nothing_for_it(
    imported_alone,
):
    """peft (and transformers, which it imports) takes seconds to import: only preparing a
    model with lora, loha, lokr or ia3 imports it (strategies.adapters)."""
    assert [r for r, found in imported_alone.items() if found["peft"]] == []
