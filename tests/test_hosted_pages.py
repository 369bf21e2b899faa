"""The pages of the hosted mode under Streamlit's AppTest, with [auth] secrets and a user as
st.login leaves them (AppTest.user): the sign-in screen, the sidebar's user, another user's
images and hidden runs; and no sign-in screen without [auth]. The browser test with a real
provider is tests/test_hosted.py."""

from __future__ import annotations

import fcntl
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from dashboard_fixtures import write_run
from PIL import Image
from streamlit.testing.v1 import AppTest

from finetune_core import runner

REPO = Path(__file__).resolve().parent.parent
ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
AUTH = {
    "redirect_uri": "http://127.0.0.1:8501/oauth2callback",
    "cookie_secret": "a-test-cookie-secret-of-32-bytes-or-more",
    "client_id": "finetune-dashboard",
    "client_secret": "secret",
    "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration",
}
PAGES = (
    "app.py",
    "pages/1_New_run.py",
    "pages/2_Training.py",
    "pages/3_Compare.py",
    "pages/4_Predict.py",
)
HOSTED_SETTINGS = (
    "FINETUNE_DEMO",
    "FINETUNE_ADMINS",
    "FINETUNE_USER_CLAIM",
    "FINETUNE_HIDE_OTHERS_RUNS",
    "FINETUNE_SHARE_IMAGES",
)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """An empty runs folder the pages use, its supervisor lock held by this test."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(root))
    for name in HOSTED_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    fd = os.open(root / runner.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield root
    os.close(fd)


def page(name: str, user: dict | None, auth: bool = True, **query) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    if auth:
        at.secrets["auth"] = AUTH
    if user is not None:
        at.user = user
    if name != "app.py":
        at.switch_page(name)
    at.query_params.update(query)
    return at.run()


def signed_in(email: str) -> dict:
    return {"is_logged_in": True, "email": email, "sub": email.split("@")[0]}


def owned_run(root: Path, run_id: str, owner: str) -> Path:
    """A finished run of `owner` that kept its val images: predictions.csv and
    scored_images.zip as the engine writes them, one row and one PNG per val image."""
    run_dir = write_run(root, run_id, name=f"{owner}'s")
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "owner": owner}))
    cm = json.loads((run_dir / "summary.json").read_text())["confusion_matrix"]
    rows, index = ["split,index,true,pred,confidence"], 0
    for t, row in enumerate(cm):
        for p, count in enumerate(row):
            for _ in range(count):
                rows.append(f"val,{index},{t},{p},0.9")
                index += 1
    (run_dir / "predictions.csv").write_text("\n".join(rows) + "\n")
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png, format="PNG")
    with zipfile.ZipFile(run_dir / "scored_images.zip", "w") as z:
        for i in range(index):
            z.writestr(f"val/{i}.png", png.getvalue())
        z.writestr("kept.json", json.dumps({"per_cell": 32, "side": 8}))
    return run_dir


def test_a_visitor_not_signed_in_sees_only_the_sign_in_button_on_every_page(runs):
    owned_run(runs, "20250101-120000-00000a", ALICE)
    for name in PAGES:
        at = page(name, {"is_logged_in": False})
        assert not at.exception, name
        assert [b.label for b in at.button] == ["Sign in"], name
        assert not at.get("arrow_data_frame") and not at.get("plotly_chart"), name
        assert not at.sidebar.caption, name
    assert not (runs / ".form_state.json").exists()


def test_without_auth_there_is_no_sign_in_screen_and_nobody_is_named(runs):
    owned_run(runs, "20250101-120000-00000a", ALICE)
    at = page("app.py", None, auth=False)
    assert not at.exception
    labels = [b.label for b in at.button]
    assert "Sign in" not in labels and "Sign out" not in labels
    assert "Delete…" in labels  # the local mode acts on every run, as before
    assert not any("Signed in" in c.value for c in at.sidebar.caption)


def test_the_sidebar_names_the_signed_in_user_and_admins_and_offers_sign_out(runs, monkeypatch):
    at = page("app.py", signed_in(BOB))
    assert not at.exception
    assert [c.value for c in at.sidebar.caption] == [f"Signed in as `{BOB}`"]
    assert [b.label for b in at.sidebar.button] == ["Sign out"]
    queue = at.number_input(key="max_parallel")
    assert queue.disabled  # one setting for the server: an admin's
    monkeypatch.setenv("FINETUNE_ADMINS", CAROL)
    at = page("app.py", signed_in(CAROL))
    assert [c.value for c in at.sidebar.caption] == [f"Signed in as `{CAROL}` (admin)"]
    assert not at.number_input(key="max_parallel").disabled
    # a sign-in that names nobody (no e-mail claim) says what to change, and shows no runs
    at = page("app.py", {"is_logged_in": True, "sub": "x"})
    assert any("did not say your email" in e.value for e in at.error)
    assert [b.label for b in at.button] == ["Sign out"]


def test_another_users_images_are_not_shown_on_compare_unless_shared(runs, monkeypatch):
    rid = owned_run(runs, "20250101-120000-00000a", ALICE).name
    mine = page("pages/3_Compare.py", signed_in(ALICE), runs=rid)
    assert not mine.exception
    (shown,) = mine.get("image")
    assert len(shown.proto.imgs) > 0
    theirs = page("pages/3_Compare.py", signed_in(BOB), runs=rid)
    assert not theirs.exception
    assert not theirs.get("image")
    assert any("their images are shown to their owner" in i.value for i in theirs.info)
    assert any("Final metrics" in m.value for m in theirs.markdown)  # metrics: for everyone
    monkeypatch.setenv("FINETUNE_SHARE_IMAGES", "1")
    shared = page("pages/3_Compare.py", signed_in(BOB), runs=rid)
    assert shared.get("image")


def test_hide_others_runs_shows_a_user_only_their_own_and_an_admin_all(runs, monkeypatch):
    alices = owned_run(runs, "20250101-120000-00000a", ALICE).name
    bobs = owned_run(runs, "20250101-130000-00000b", BOB).name
    monkeypatch.setenv("FINETUNE_HIDE_OTHERS_RUNS", "1")
    monkeypatch.setenv("FINETUNE_ADMINS", CAROL)
    home = page("app.py", signed_in(BOB))
    assert not home.exception
    assert any(s.value == "Runs (1)" for s in home.subheader)
    training = page("pages/2_Training.py", signed_in(BOB), run=alices)
    assert any(f"no run '{alices}'" in e.value for e in training.error)
    assert training.selectbox(key="training_run").value == bobs
    admin = page("app.py", signed_in(CAROL))
    assert any(s.value == "Runs (2)" for s in admin.subheader)


def _with_best_weights(run_dir: Path) -> Path:
    """Gives a written run the best weights file that Predict and Export look for (the pages
    draw without opening it)."""
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "best.safetensors").write_bytes(b"not opened by the pages")
    return run_dir


def test_only_the_owner_exports_a_run_and_the_demo_predicts_nothing(runs, monkeypatch):
    """An export writes into the run: another user gets a sentence instead of the Export
    button, its owner the button; the read-only demo offers no uploader on Predict."""
    rid = _with_best_weights(owned_run(runs, "20250101-120000-00000a", ALICE)).name
    theirs = page("pages/2_Training.py", signed_in(BOB), run=rid)
    assert not theirs.exception
    assert not [b for b in theirs.button if b.label.startswith("Export")]
    assert any(f"{ALICE}'s: only its owner or an admin can export it" in c.value
               for c in theirs.caption)  # fmt: skip
    mine = page("pages/2_Training.py", signed_in(ALICE), run=rid)
    assert [b.label for b in mine.button if b.label.startswith("Export")] == [
        "Export as safetensors (torchvision)"
    ]
    predict = page("pages/4_Predict.py", signed_in(BOB), run=rid)
    assert not predict.exception
    assert predict.get("file_uploader")  # another user's model predicts, read-only
    monkeypatch.setenv("FINETUNE_DEMO", "1")
    demo = page("pages/4_Predict.py", signed_in(BOB), run=rid)
    assert not demo.exception
    assert not demo.get("file_uploader")
    assert any("read-only demo" in i.value for i in demo.info)
    demo_training = page("pages/2_Training.py", signed_in(ALICE), run=rid)
    assert not [b for b in demo_training.button if b.label.startswith("Export")]
