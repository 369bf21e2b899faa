"""Issue 9, point 3 and the zip part of 4: uploads are kept under ids of their content (two
uploads of one name never replace each other; a queued run keeps training on what it was
launched with), deleted by a policy that never touches what a run names; page links name
runs of this runs folder only; an uploaded zip is unpacked by a background job, not in the
web server's process. Pages run under Streamlit's AppTest, jobs as real processes.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
from dashboard_fixtures import write_run
from streamlit.testing.v1 import AppTest

from finetune_core import runner, store

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120
DAY = 86400


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """An empty runs folder the pages use, with the supervisor lock held by this test (so
    queued runs stay queued)."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(root))
    monkeypatch.delenv("FINETUNE_DATA_ROOTS", raising=False)
    fd = os.open(root / runner.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield root
    os.close(fd)


def page(name: str, **query) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    if name != "app.py":
        at.switch_page(name)
    at.query_params.update(query)
    return at.run()


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def _png(colour: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, "PNG")
    return buf.getvalue()


def _zip_bytes(classes: dict[str, str], per_class: int = 4, extra: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for cls, colour in classes.items():
            for i in range(per_class):
                z.writestr(f"set/{cls}/{i}.png", _png(colour))
        for name, content in (extra or {}).items():
            z.writestr(name, content)
    return buf.getvalue()


def _read_data(at: AppTest, timeout: float = 120) -> AppTest:
    """Reruns the page until its Data section says what the data holds or why not."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert not at.exception, at.exception
        said = "\n".join(texts(at.markdown) + texts(at.error))
        if "classes**" in said or "**data**" in said:
            return at
        time.sleep(0.3)
        at.run()
    raise AssertionError("the Data section never said what the zip holds")


def _upload_zip(at: AppTest, name: str, content: bytes) -> AppTest:
    at.radio(key="f_data_choice").set_value("zip").run()
    at.file_uploader(key="up_zip").set_value((name, content, "application/zip")).run()
    return at


def _jobs(root: Path, kind: str) -> list[Path]:
    found = []
    for spec in sorted((root / ".jobs").glob("*/job.json")):
        if json.loads(spec.read_text())["kind"] == kind:
            found.append(spec.parent)
    return found


# ---------------------------------------------------------------- uploads kept by content


def test_two_uploads_of_one_name_never_replace_each_other_and_a_queued_run_keeps_its_own(runs):
    a_bytes = _zip_bytes({"cat": "red", "dog": "blue"})
    b_bytes = _zip_bytes({"car": "green", "bus": "yellow", "van": "black"})
    user_a = _read_data(_upload_zip(page("pages/1_New_run.py"), "pets.zip", a_bytes))
    assert "**2 classes**" in "\n".join(texts(user_a.markdown))
    a_path = Path(user_a.session_state["f_data_zip"])
    user_a.radio(key="f_weights_choice").set_value("none").run()
    user_a.button(key="launch").click().run()
    assert not user_a.exception
    queued = store.list_runs(runs)
    assert len(queued) == 3 and set(queued["state"]) == {"queued"}

    user_b = _read_data(_upload_zip(page("pages/1_New_run.py"), "pets.zip", b_bytes))
    assert "**3 classes**" in "\n".join(texts(user_b.markdown))
    b_path = Path(user_b.session_state["f_data_zip"])
    assert a_path != b_path and a_path.name == b_path.name == "pets.zip"
    assert b_path.read_bytes() == b_bytes
    for run_path in queued["path"]:  # what A's queued runs will train on is A's zip
        data = Path(store.read_config(Path(run_path))["data"])
        assert data == a_path and data.read_bytes() == a_bytes
    assert not os.stat(a_path).st_mode & 0o222, "a kept upload is read-only"
    again = _upload_zip(page("pages/1_New_run.py"), "pets.zip", a_bytes)
    assert Path(again.session_state["f_data_zip"]) == a_path  # the same bytes, the same file


def test_save_keeps_the_same_bytes_once_and_other_bytes_apart(tmp_path):
    from finetune_core import uploads

    first = uploads.save(tmp_path, "../../etc/pets.zip", b"one")
    assert first.parent.parent == uploads.uploads_dir(tmp_path) and first.name == "pets.zip"
    assert uploads.save(tmp_path, "pets.zip", b"one") == first
    other = uploads.save(tmp_path, "pets.zip", b"two")
    assert other != first and first.read_bytes() == b"one" and other.read_bytes() == b"two"
    assert uploads.upload_folder(other, tmp_path) == other.parent.resolve()
    assert uploads.upload_folder(tmp_path / "elsewhere.zip", tmp_path) is None
    assert not list(first.parent.glob(".*tmp"))  # written aside, then moved in


# ---------------------------------------------------------------- the cleanup policy


def _old_upload(runs: Path, digit: str, days: float) -> Path:
    """An upload folder as New run keeps one, last used `days` ago."""
    folder = runs / ".uploads" / (digit * 32)
    folder.mkdir(parents=True)
    (folder / "data.zip").write_bytes(_zip_bytes({"a": "red", "b": "blue"}, per_class=1))
    when = time.time() - days * DAY
    os.utime(folder, (when, when))
    return folder / "data.zip"


def test_new_run_deletes_uploads_nothing_names_after_a_week_never_one_a_run_names(runs):
    named_by_run = _old_upload(runs, "a", days=30)
    named_by_form = _old_upload(runs, "b", days=30)
    forgotten = _old_upload(runs, "c", days=30)
    recent = _old_upload(runs, "d", days=1)
    write_run(runs, "20250101-000000-aaaaaa", state="queued", data=str(named_by_run))
    (runs / ".form_state.json").write_text(json.dumps({"f_weights_file": str(named_by_form)}))
    at = page("pages/1_New_run.py")
    assert not at.exception
    assert named_by_run.is_file() and named_by_form.is_file() and recent.is_file()
    assert not forgotten.parent.exists()
    # at most once an hour: an upload forgotten since then waits for the next hour
    later = _old_upload(runs, "e", days=30)
    assert not page("pages/1_New_run.py").exception
    assert later.is_file()


def test_clean_runs_at_most_once_an_hour_and_spares_what_a_job_or_the_form_names(tmp_path):
    from finetune_core import uploads

    runs = tmp_path
    job_zip, kept, gone = (_old_upload(runs, d, days=10) for d in "123")
    (runs / ".jobs" / "j1").mkdir(parents=True)
    (runs / ".jobs" / "j1" / "job.json").write_text(json.dumps({"args": {"path": str(job_zip)}}))
    (runs / "20250101-000000-bbbbbb").mkdir()
    (runs / "20250101-000000-bbbbbb" / "config.json").write_text("{torn " + kept.parent.name)
    (runs / "20250101-000000-bbbbbb" / "status.json").write_text("{}")
    now = time.time()
    assert uploads.clean_now_and_then(runs, now=now) == [gone.parent]
    assert job_zip.is_file() and kept.is_file()  # a torn config still names its upload
    assert uploads.clean_now_and_then(runs, now=now + 600) is None
    assert uploads.clean(runs, keep=[str(job_zip)], now=now + 3 * DAY, keep_days=7) == []


# ---------------------------------------------------------------- page links


def test_page_links_name_runs_of_this_runs_folder_and_never_a_path(runs, tmp_path):
    other = tmp_path / "other" / "runs"
    foreign = write_run(other, "20250202-000000-ffffff", strategy="last_n", unfreeze_last=3)
    write_run(runs, "20250101-000000-eeeeee", strategy="last_n", unfreeze_last=2)

    at = page("pages/1_New_run.py", clone=str(foreign))
    assert not at.exception
    refused = [e for e in texts(at.error) if "Could not clone" in e]
    assert refused and "no run" in refused[0] and "in this dashboard's runs folder" in refused[0]
    assert at.toggle(key="f_compare").value is True  # nothing of the foreign run was loaded
    assert at.session_state["f_unfreeze_last"] != 3

    at = page("pages/1_New_run.py", clone="20250101-000000")  # a unique id prefix
    assert not at.exception and not [e for e in texts(at.error) if "Could not clone" in e]
    assert at.number_input(key="f_unfreeze_last").value == 2

    at = page("pages/2_Training.py", run=str(foreign))
    assert not at.exception
    assert any("in this dashboard's runs folder" in e for e in texts(at.error))
    assert at.selectbox(key="training_run").value == "20250101-000000-eeeeee"


def test_resolve_run_id_takes_ids_and_unique_prefixes_and_the_cli_still_takes_paths(tmp_path):
    root = tmp_path / "runs"
    a = write_run(root, "20250101-000000-aaaaaa")
    write_run(root, "20250101-000000-abbbbb")
    assert store.resolve_run_id("20250101-000000-aaaaaa", root) == a.resolve()
    assert store.resolve_run_id("20250101-000000-aa", root) == a.resolve()
    for ref in (str(a), "../runs/20250101-000000-aaaaaa", "20250101-000000-a", "nope", ""):
        with pytest.raises(store.RunError):
            store.resolve_run_id(ref, root)
    assert store.resolve_run(str(a), tmp_path / "elsewhere") == a.resolve()


# ---------------------------------------------------------------- unpacking outside the server


def test_an_uploaded_zip_is_unpacked_by_a_job_shown_while_it_works_and_found_after_refresh(runs):
    content = _zip_bytes({"cat": "red", "dog": "blue"})
    at = _upload_zip(page("pages/1_New_run.py"), "pets.zip", content)
    assert not at.exception
    progress = [p.proto.text for p in at.get("progress")]
    assert progress and progress[0].startswith("Unpacking the .zip")
    assert at.button(key="launch").disabled
    at.number_input(key="f_epochs").set_value(4).run()  # the page stays usable meanwhile
    assert not at.exception and at.number_input(key="f_epochs").value == 4
    (job,) = _jobs(runs, "extract")
    status = json.loads((job / "status.json").read_text())
    assert status["pid"] != os.getpid()  # another process unpacks it
    at = _read_data(at)
    assert "**2 classes**" in "\n".join(texts(at.markdown)) and not at.button(key="launch").disabled
    fresh = _read_data(page("pages/1_New_run.py"))  # a refresh: the same job, not unpacked again
    assert "**2 classes**" in "\n".join(texts(fresh.markdown))
    assert _jobs(runs, "extract") == [job]
    assert json.loads((job / "status.json").read_text())["pid"] == status["pid"]


def test_a_zip_that_cannot_be_unpacked_says_why_in_the_data_section(runs):
    content = _zip_bytes({"cat": "red", "dog": "blue"}, extra={"../evil.png": b"x"})
    at = _read_data(_upload_zip(page("pages/1_New_run.py"), "bad.zip", content))
    said = [e for e in texts(at.error) if e.startswith("**data**")]
    assert said and "bad.zip is not safe to extract" in said[0] and str(runs) not in said[0]
    assert at.button(key="launch").disabled and at.button(key="unpack_again")
    (job,) = _jobs(runs, "extract")
    assert json.loads((job / "status.json").read_text())["state"] == "failed"
