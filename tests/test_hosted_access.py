"""The hosted mode's rules below the pages: the functions the dashboard and the CLI call
refuse another user's action (stop, cancel, resume, rename, delete, the queue limit), a
read-only demo writes nothing, each user's limits refuse a launch or an upload whole, uploads
are per user, and the queue takes turns between users (store/access.py, store/quota.py,
runner.fair_order)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_core import config, runner, store, uploads
from finetune_core.config import RunConfig
from finetune_core.store import access, quota
from finetune_core.util.processes import process_start_time

REPO = Path(__file__).resolve().parent.parent
ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
TINY = dict(data="builtin:shapes", weights="none", image_size=32, epochs=1, augment="none")
ENV = {"torch": "x", "torchvision": "y", "python": "3", "device": "cpu"}  # no torch import
HOSTED_SETTINGS = (
    "FINETUNE_DEMO",
    "FINETUNE_ADMINS",
    "FINETUNE_USER_CLAIM",
    "FINETUNE_HIDE_OTHERS_RUNS",
    "FINETUNE_SHARE_IMAGES",
    "FINETUNE_USER_MAX_QUEUED",
    "FINETUNE_USER_DISK_GB",
)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty runs folder whose supervisor lock this test holds (nothing trains), and none
    of the hosted settings from the environment."""
    for name in (*HOSTED_SETTINGS, "FINETUNE_USER"):
        monkeypatch.delenv(name, raising=False)
    runs = tmp_path / "runs"
    runs.mkdir()
    fd = os.open(runs / runner.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield runs
    os.close(fd)


def _run(root: Path, owner: str | None, **fields) -> Path:
    return store.create_run(RunConfig(**{**TINY, **fields}), root, env=ENV, owner=owner)


def _files(root: Path) -> dict[str, bytes]:
    """Every file below root with its bytes (the lock files aside): what a refusal must
    leave as it was."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_another_users_run_cannot_be_stopped_cancelled_resumed_renamed_or_deleted(root):
    queued = _run(root, ALICE, name="alice's")
    ended = _run(root, ALICE, group="g-alice")
    runner.cancel_run(ended, actor=ALICE)
    assert store.read_config(queued)["owner"] == ALICE
    before = _files(root)
    refusals = {
        "stop": lambda: runner.stop_run(queued, actor=BOB),
        "cancel": lambda: runner.cancel_run(queued, actor=BOB),
        "resume": lambda: runner.resume_run(ended, actor=BOB),
        "rename": lambda: store.rename_run(queued, "bob's now", actor=BOB),
        "delete": lambda: store.delete_run(ended, actor=BOB),
        "stop group": lambda: runner.stop_group(root, "g-alice", actor=BOB),
    }
    for what, act in refusals.items():
        with pytest.raises(access.NotAllowed, match=f"belongs to {ALICE}.*only its owner") as e:
            act()
        assert isinstance(e.value, store.RunError), what  # pages and the CLI catch RunError
    assert _files(root) == before, "a refusal changed a run's files"
    # the owner can: the same calls go through
    store.rename_run(queued, "renamed", actor=ALICE)
    assert runner.stop_run(queued, actor=ALICE) == "cancelled"
    runner.resume_run(ended, actor=ALICE, start=False)
    assert store.read_status(ended)["state"] == "queued"
    assert runner.cancel_run(ended, actor=ALICE)
    store.delete_run(ended, actor=ALICE)
    assert not ended.exists() and store.read_config(queued)["name"] == "renamed"


def test_an_admin_acts_on_every_run_and_only_an_admin_sets_the_queue_limit(root, monkeypatch):
    monkeypatch.setenv("FINETUNE_ADMINS", f" {CAROL.upper()} , dave@example.com")
    run = _run(root, ALICE)
    local = _run(root, None)  # made before sign-in: nobody's, so an admin's to act on
    with pytest.raises(access.NotAllowed, match="before sign-in"):
        runner.cancel_run(local, actor=BOB)
    with pytest.raises(access.NotAllowed, match="only an admin"):
        runner.set_max_parallel(root, 3, actor=ALICE)
    assert runner.parallel_limit(root) == 1
    runner.set_max_parallel(root, 3, actor=CAROL)  # admins are matched without case
    assert runner.parallel_limit(root) == 3
    assert runner.cancel_run(run, actor=CAROL) and runner.cancel_run(local, actor=CAROL)
    store.delete_run(run, actor=CAROL)
    assert not run.exists()


def test_the_local_mode_checks_and_records_nothing_and_owned_configs_still_load(root):
    local = _run(root, None)
    assert "owner" not in store.read_config(local)
    assert list(store.list_runs(root)["owner"]) == [None]
    assert runner.stop_run(local) == "cancelled"  # actor None: the local mode, as before
    store.rename_run(local, "mine")
    owned = _run(root, ALICE)
    # config.json with an owner is still a RunConfig (and a `train --config` file)
    assert store.run_config(owned) == config.from_dict(store.read_config(owned))
    assert config.load_json(owned / "config.json")["owner"] == ALICE


def test_a_read_only_demo_launches_uploads_stops_and_deletes_nothing(root, monkeypatch):
    run = _run(root, ALICE)
    done = _run(root, None)
    runner.cancel_run(done)
    monkeypatch.setenv("FINETUNE_DEMO", "1")
    before = _files(root)
    for act in (
        lambda: runner.enqueue([RunConfig(**TINY)], root),
        lambda: store.create_run(RunConfig(**TINY), root, env=ENV),
        lambda: uploads.save(root, "data.zip", b"PK\x05\x06" + bytes(18)),
        lambda: uploads.save(root, "data.zip", b"zip", user=ALICE),
        lambda: runner.stop_run(run),
        lambda: runner.cancel_run(run, actor=ALICE),
        lambda: runner.resume_run(done),
        lambda: store.rename_run(done, "x"),
        lambda: store.delete_run(done),
        lambda: runner.set_max_parallel(root, 2),
    ):
        with pytest.raises(access.NotAllowed, match="read-only demo"):
            act()
    assert _files(root) == before
    assert not (root / ".uploads").exists() and not (root / access.USERS_DIR).exists()


def test_a_launch_past_the_users_queued_limit_is_refused_whole(root, monkeypatch):
    monkeypatch.setenv("FINETUNE_USER_MAX_QUEUED", "3")
    runner.enqueue([RunConfig(**TINY)] * 2, root, owner=ALICE)
    before = _files(root)
    with pytest.raises(access.NotAllowed, match="2 run.s. queued.*adds 2.*limit of 3"):
        runner.enqueue([RunConfig(**TINY)] * 2, root, owner=ALICE)
    assert _files(root) == before, "a refused launch left runs behind"
    assert quota.queued_runs(root, ALICE) == 2
    runner.enqueue([RunConfig(**TINY)] * 3, root, owner=BOB)  # a limit per user
    first = store.list_runs(root).query("owner == @ALICE")["path"].iloc[0]
    runner.cancel_run(first, actor=ALICE)
    runner.enqueue([RunConfig(**TINY)] * 2, root, owner=ALICE)  # room again
    assert quota.queued_runs(root, ALICE) == 3
    with pytest.raises(access.NotAllowed, match="limit of 3"):  # resuming queues one too
        runner.resume_run(first, actor=ALICE)
    assert store.read_status(first)["state"] == "stopped"


def test_an_upload_or_a_launch_past_the_users_disk_limit_is_refused_before_writing(
    root, monkeypatch
):
    monkeypatch.setenv("FINETUNE_USER_DISK_GB", "0.000001")  # 1000 bytes
    kept = uploads.save(root, "a.zip", b"a" * 600, user=ALICE)
    assert kept.read_bytes() == b"a" * 600
    assert uploads.save(root, "a.zip", b"a" * 600, user=ALICE) == kept  # kept: no more disk
    before = _files(root)
    with pytest.raises(
        access.NotAllowed,
        match=r"b.zip not kept.*600 bytes and this needs 600 bytes.*limit of 1.0 kB",
    ) as e:
        uploads.save(root, "b.zip", b"b" * 600, user=ALICE)
    assert "FINETUNE_USER_DISK_GB" in str(e.value)
    assert _files(root) == before, "a refused upload left bytes behind"
    uploads.save(root, "b.zip", b"b" * 600, user=BOB)  # a limit per user
    monkeypatch.setenv("FINETUNE_USER_DISK_GB", "0.0000005")  # 500 bytes: alice is over it
    with pytest.raises(access.NotAllowed, match="over your limit"):
        runner.enqueue([RunConfig(**TINY)], root, owner=ALICE)
    assert store.list_runs(root).empty
    assert quota.disk_used(root, ALICE) == 600


def test_uploads_are_per_user_and_another_users_upload_cannot_be_launched(root):
    alice = uploads.save(root, "shapes.zip", b"same bytes", user=ALICE)
    bob = uploads.save(root, "shapes.zip", b"same bytes", user=BOB)
    assert alice != bob and access.USERS_DIR in alice.parts and access.USERS_DIR in bob.parts
    assert access.user_home(root, ALICE) in alice.parents
    assert access.user_home(root, ALICE) != access.user_home(root, "alice_example.com")
    assert uploads.upload_folder(alice, root, ALICE) == alice.parent
    assert uploads.upload_folder(alice, root, BOB) is None
    assert "another user" in access.foreign_upload(str(alice), root, BOB)
    assert access.foreign_upload(str(alice), root, ALICE) is None
    assert access.foreign_upload(str(alice), root, None) is None  # the local mode
    with pytest.raises(access.NotAllowed, match="shapes.zip is an upload of another user"):
        runner.enqueue([RunConfig(**{**TINY, "data": str(alice)})], root, owner=BOB)
    with pytest.raises(access.NotAllowed, match="another user"):
        runner.enqueue([RunConfig(**{**TINY, "weights": str(alice)})], root, owner=BOB)
    assert store.list_runs(root).empty
    (run,) = runner.enqueue([RunConfig(**{**TINY, "data": str(alice)})], root, owner=ALICE)
    assert store.read_config(run)["data"] == str(alice)
    # the cleanup of one user's uploads keeps what a run names and leaves others' alone
    unused = uploads.save(root, "other.zip", b"other bytes", user=BOB)
    old = time.time() + 30 * 86400
    assert uploads.clean(root, user=ALICE, now=old) == []
    assert uploads.clean(root, user=BOB, now=old) == [unused.parent]
    assert alice.exists() and bob.exists()  # bob's holds the bytes a run names


def test_fair_order_takes_turns_between_owners_oldest_first_within_one():
    sweep = [(f"a{i}", ALICE, float(i)) for i in range(1, 6)]  # alice's sweep, queued first
    later = [("b1", BOB, 10.0), ("c1", CAROL, 11.0), ("c2", CAROL, 12.0)]
    assert runner.fair_order(sweep + later) == ["a1", "b1", "c1", "a2", "c2", "a3", "a4", "a5"]
    # a user with a run training waits behind the users with none
    assert runner.fair_order(sweep + later, running={ALICE: 1})[:3] == ["b1", "c1", "a1"]
    # who started a run last goes last: alice just did, carol never did, bob long ago
    started = {ALICE: 100.0, BOB: 50.0}
    assert runner.fair_order(sweep + later, last_started=started)[:3] == ["c1", "b1", "a1"]
    # the local mode (no owners) is creation order, ties by id
    assert runner.fair_order([("y", None, 2.0), ("x", None, 2.0), ("z", None, 1.0)]) == [
        "z",
        "x",
        "y",
    ]


def test_the_supervisor_starts_another_users_run_before_the_rest_of_a_sweep(tmp_path):
    """A real supervisor, limit 1: alice's run trains and three more of hers wait, then bob
    queues one. When hers ends, bob's starts next, not the rest of her sweep."""
    root = tmp_path / "runs"
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    broken = dict(data=str(tmp_path / "no-such-folder"))  # a worker that fails at once
    try:
        training = _run(root, ALICE, **broken)
        store.write_status(
            training,
            state="running",
            pid=stand_in.pid,
            pid_started_at=process_start_time(stand_in.pid),
            started_at=time.time(),
            heartbeat_at=time.time(),
        )
        sweep = [_run(root, ALICE, **broken) for _ in range(3)]
        time.sleep(0.05)
        bobs = _run(root, BOB, **broken)
        assert runner.ensure_supervisor(root, max_parallel=1, idle_exit_s=20)
        time.sleep(1.5)  # a few polls: one run trains, nothing else may start
        assert {store.read_status(d)["state"] for d in [*sweep, bobs]} == {"queued"}
        stand_in.kill()  # alice's run ends (recorded crashed): the queue moves on
        deadline = time.time() + 60
        while store.read_status(bobs)["state"] == "queued" and time.time() < deadline:
            time.sleep(0.2)
        started = {d: store.read_status(d).get("started_at") for d in [*sweep, bobs]}
        assert started[bobs] is not None, "bob's run never started"
        assert all(started[d] is None or started[d] > started[bobs] for d in sweep), started
    finally:
        stand_in.kill()
        stand_in.wait()
        for run_dir in store.run_dirs(root):
            runner.cancel_run(run_dir)
        lock = root / runner.SUPERVISOR_LOCK
        if runner.supervisor_running(root) and lock.read_text().strip():
            os.kill(int(lock.read_text().strip()), signal.SIGTERM)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune_core", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_the_cli_acts_as_the_user_given_by_as_or_finetune_user(root):
    run = _run(root, ALICE)
    refused = _cli("cancel", run.name, "--runs-dir", str(root), "--as", BOB)
    assert refused.returncode == 2, refused.stderr
    assert f"belongs to {ALICE}" in refused.stderr and "only its owner" in refused.stderr
    refused = _cli("stop", run.name, "--runs-dir", str(root), env={"FINETUNE_USER": BOB})
    assert refused.returncode == 2 and f"belongs to {ALICE}" in refused.stderr
    assert store.read_status(run)["state"] == "queued"
    listed = _cli("list", "--runs-dir", str(root))
    assert "owner" in listed.stdout and ALICE in listed.stdout
    done = _cli("stop", run.name, "--runs-dir", str(root), "--as", ALICE)
    assert done.returncode == 0, done.stderr
    assert store.read_status(run)["state"] == "stopped"
    # without --as the CLI is the machine's operator, as in the local mode
    queued = _cli("resume", run.name, "--queue", "--runs-dir", str(root))
    assert queued.returncode == 0, queued.stderr
    assert json.loads((run / "config.json").read_text())["owner"] == ALICE


def test_export_of_another_users_run_is_refused_and_writes_nothing(root):
    run = _run(root, ALICE)
    refused = _cli("export", run.name, "--format", "safetensors", "--runs-dir", str(root),
                   "--as", BOB)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"cannot export run {run.name}: it belongs to {ALICE}" in refused.stderr
    assert not (run / "export").exists()


def test_sign_in_dependencies_are_pinned_to_the_versions_tested_together():
    """st.login has broken on new Authlib and httpx releases (streamlit#13335, #15855):
    requirements.txt bounds them above, and what is installed is within the bounds."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    reqs = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            reqs[req.name.lower()] = req
    assert "auth" in reqs["streamlit"].extras
    for name in ("streamlit", "authlib", "httpx"):
        spec = reqs[name].specifier
        assert any(s.operator == "<" for s in spec), f"{name} {spec} has no upper bound"
        assert spec.contains(version(name)), f"{name} {version(name)} is not in {spec}"
    assert not reqs["authlib"].specifier.contains("1.6.6")  # the release that broke st.login
