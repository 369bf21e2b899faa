"""The benchmark runs end to end with smoke settings and reports what it promises (no timing
assertions: only that every row is measured and labelled, and the settings are stated)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SYNTHETIC_ROWS = [
    "plain full",
    "engine full",
    "engine full + metrics writer",
    "engine linear_probe (flip: backbone every step)",
    "engine linear_probe (cached features, 1 epoch incl. cache)",
    "engine last_n 1",
    "reference: frozen backbone in train mode",
    "reference: eval + no_grad (inference)",
]


def load_run_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_bench_measures_every_strategy_against_the_plain_loop_and_states_settings(
    tmp_path,
):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--device", "cpu", "--quiet"]
        + ["--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert re.search(r"device: cpu .*\| torch \S+ \| torchvision \S+ .*\d+ CPUs", text)
    assert "Plain loop: fp32, NCHW, SGD momentum 0.9" in text
    assert "Engine: float32, channels_last" in text and "feature cache for linear_probe" in text
    assert re.search(r"targets: \d+ of \d+ met", text)

    results = json.loads(out.read_text())
    (m,) = results["models"]
    assert m["model"] == "resnet18"
    assert [r["row"] for r in m["rows"]] == SYNTHETIC_ROWS
    for row in m["rows"]:
        assert row["img_s"] > 0, row
        assert row["row"] in text
    assert m["rows"][0]["x_plain"] == 1.0
    assert m["engine_steps_run"] == [3]  # every engine fit ran exactly --steps steps
    targets = {r["row"]: r.get("target") for r in m["rows"]}
    assert targets["engine full"] == 0.95
    assert targets["engine linear_probe (flip: backbone every step)"] == 2.5
    # the linear probe only caches features when nothing is augmented
    assert m["engine_settings"]["linear_probe/none"]["feature_cache"] is True
    assert m["engine_settings"]["linear_probe/flip"]["feature_cache"] is False
    assert m["engine_settings"]["full"] == {
        "dtype": "float32",
        "channels_last": True,  # on CPUs too: faster in oneDNN
        "feature_cache": False,
    }
    assert m["writer"]["inside_share"] > 0  # the metrics writer really was attached
    assert m["lp10"]["epochs"] == 3 and m["lp10"]["forward_s"] > 0 and m["lp10"]["ratio"] > 0
    assert set(m["pipeline"]) == {"flip", "crop"}
    assert all(rate > 0 for rate in m["pipeline"].values())
    e2e = results["end_to_end"]
    assert [r["row"] for r in e2e["rows"]] == [
        "plain full (ImageFolder + transforms)",
        "engine full (decoded once)",
    ]
    assert e2e["images"] == 1500 and e2e["steps"] == 3

    markdown = load_run_module().render(results, markdown=True)
    assert "| run | img/s | x plain full | target |  |" in markdown
    assert "| plain full | " in markdown
