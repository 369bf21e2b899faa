"""The server's configuration: dependency floors that exclude published advisories, and the
hosted configuration (.streamlit/hosted.env) read back from Streamlit itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# package -> (the lowest version without the advisories, the advisories)
ADVISORY_FLOORS = {
    "streamlit": ("1.54.0", "GHSA-7p48-42j8-8846, PYSEC-2026-212"),
    "pillow": ("12.2.0", "GHSA-cfh3-3jmp-rvhc, GHSA-whj4-6x5x-4v2j"),
}


def _requirements() -> dict[str, Requirement]:
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            found[req.name.lower()] = req
    return found


def test_dependency_floors_exclude_the_published_advisories():
    reqs = _requirements()
    for name, (fixed, advisories) in ADVISORY_FLOORS.items():
        spec = reqs[name].specifier
        floors = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
        assert floors and min(floors) >= Version(fixed), f"{name} {spec} admits {advisories}"


def _streamlit_config(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "streamlit", "config", "show"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    # a setting at its default is shown commented out: "# name = value"
    return {key: value for _, key, value in re.findall(r"^(# )?(\w+) = (.+)$", out, flags=re.M)}


def _hosted_env() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".streamlit" / "hosted.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_the_hosted_configuration_hides_error_details_and_local_use_keeps_them():
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    hosted_env = _hosted_env()
    assert all(k.startswith("STREAMLIT_") for k in hosted_env)
    hosted = _streamlit_config({**base, **hosted_env})
    assert hosted["showErrorDetails"] == '"none"'  # no tracebacks with server paths
    assert hosted["enableXsrfProtection"] == "true"
    assert hosted["gatherUsageStats"] == "false"
    assert hosted["address"] == '"127.0.0.1"'  # behind the reverse proxy
    assert int(hosted["maxUploadSize"]) <= 200  # uploads are held in memory
    local = _streamlit_config(base)
    assert local["showErrorDetails"] == '"full"'  # a local user keeps the traceback
    assert local["address"] == '"127.0.0.1"'
    assert local["enableXsrfProtection"] == "true" and local["gatherUsageStats"] == "false"


def test_every_test_security_md_names_exists():
    # SECURITY.md names the test behind each promise; a renamed or deleted test breaks it
    text = (ROOT / "SECURITY.md").read_text()
    named, current = [], None
    for file, test in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)`", text):
        current = file or current
        named.append((current, test))
    assert len(named) >= 40
    for file, test in named:
        source = (ROOT / "tests" / file).read_text()
        assert re.search(rf"^def {test}\(", source, flags=re.M), f"{file}::{test}"
