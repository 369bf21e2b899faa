"""The frozen-prefix cache: a phase that trains only the groups above a boundary computes the
frozen part once and trains from its outputs, with the same metrics as running it every step
(augment none, and flip through both cached views); crop and a too-small budget fall back
with a log line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_core import data, engine, models
from finetune_core.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue", "grey"]
COMPARED = ("split", "epoch", "step", "phase", "lr")  # besides loss and acc


def tinted(n_train=96, n_val=32, size=32, seed=0, test=False) -> data.ImageData:
    """Returns 4 learnable classes: noise tinted towards each class's colour, with a left
    half brighter than the right, so a mirrored image is another input."""
    g = torch.Generator().manual_seed(seed)
    tints = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [120, 120, 120]])

    def split(n):
        labels = torch.arange(n) % 4
        noise = torch.randint(0, 90, (n, 3, size, size), generator=g)
        images = tints[labels][:, :, None, None] * 0.7 + noise
        images[..., : size // 2] += 30
        return data.TensorSplit(images.clamp(0, 255).to(torch.uint8), labels)

    return data.ImageData(CLASSES, split(n_train), split(n_val), split(n_val) if test else None)


def experiment(test=False, **kw) -> engine.Experiment:
    cfg = RunConfig(model="resnet18", weights="none", image_size=32, batch_size=32, lr=0.05, **kw)
    torch.manual_seed(cfg.seed)
    parts = models.create_model("resnet18", 4, image_size=32)
    spec = models.input_spec("resnet18")
    return engine.Experiment(cfg, parts, tinted(test=test), torch.device("cpu"), spec)


class Log(engine.Callback):
    def __init__(self):
        self.records, self.lines, self.cached = [], [], []

    def on_train_record(self, trainer, record):
        self.records.append(record)

    def on_eval_record(self, trainer, record):
        self.records.append(record)

    def on_log(self, trainer, message):
        self.lines.append(message)

    def on_epoch_end(self, trainer, record):  # what trained from a cache, epoch by epoch
        cache = trainer.feature_cache
        self.cached.append(None if cache is None else (cache.boundary, cache.views))


def fit_both(**kw) -> tuple[Log, dict, Log, dict]:
    """Returns (log, summary) of the cached run and of the uncached one, same seed."""
    runs = []
    for cached in (True, False):
        log = Log()
        summary = engine.fit(experiment(**kw), [log], feature_cache=cached)
        runs += [log, summary]
    return tuple(runs)


def assert_same_metrics(a: Log, b: Log) -> None:
    assert len(a.records) == len(b.records)
    for x, y in zip(a.records, b.records, strict=True):
        assert {k: x.get(k) for k in COMPARED} == {k: y.get(k) for k in COMPARED}
        assert x["acc"] == y["acc"], (x, y)  # the same batches, views and predictions
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)


def test_last_n_1_trains_from_the_cached_frozen_part_with_the_uncached_metrics():
    cached, cached_summary, plain, plain_summary = fit_both(
        strategy="last_n", unfreeze_last=1, augment="none", epochs=2, test=True
    )
    assert cached.cached == [(4, 1), (4, 1)]  # layer4 and the head train from the cache
    assert plain.cached == [None, None]
    (line,) = cached.lines
    assert "feature cache for phase 'last 1'" in line and "(stem to layer3) ran once" in line
    assert "each step runs layer4 and above only" in line
    assert_same_metrics(cached, plain)
    for key in ("best_val_acc", "test_acc", "confusion_matrix"):
        assert cached_summary[key] == plain_summary[key], key


def test_flip_picks_the_cached_view_the_uncached_run_would_flip_to():
    cached, _, plain, _ = fit_both(strategy="last_n", unfreeze_last=1, augment="flip", epochs=2)
    assert cached.cached == [(4, 2), (4, 2)]  # both views of every training image
    assert "both views (as is and mirrored) of 96 train" in cached.lines[0]
    assert_same_metrics(cached, plain)


def test_a_cached_run_stopped_mid_epoch_resumes_to_the_same_metrics(tmp_path):
    class StopAt(engine.Callback):
        def on_batch_end(self, trainer):
            if trainer.step == 4:
                raise engine.StopTraining

    kw = dict(strategy="last_n", unfreeze_last=1, augment="flip", epochs=3)
    straight, resumed = Log(), Log()
    engine.fit(experiment(**kw), [straight])
    engine.fit(experiment(**kw), [StopAt()], checkpoint_dir=tmp_path)
    engine.fit(experiment(**kw), [resumed], checkpoint_dir=tmp_path, resume=True)
    # step 4 is in epoch 2: the cache is built again on resume for epochs 2 and 3
    assert resumed.cached == [(4, 2), (4, 2)]
    val = [r for r in straight.records if r["split"] == "val"]
    again = [r for r in resumed.records if r["split"] == "val"]
    for a, b in zip(again, val[1:], strict=True):
        assert a["acc"] == b["acc"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_one_flipped_epoch_is_not_worth_two_cached_views():
    log = Log()
    exp = experiment(strategy="last_n", unfreeze_last=1, augment="flip", epochs=1)
    engine.fit(exp, [log])
    assert log.cached == [None]
    (line,) = log.lines
    assert "off: caching both views" in line and "its frozen part runs every step" in line


def test_gradual_unfreezing_recomputes_the_cache_where_the_boundary_moves():
    cached, _, plain, _ = fit_both(strategy="gradual", unfreeze_every=1, augment="none", epochs=3)
    # linear probe (the head), then layer4 unfrozen, then layer3: a shorter prefix each time
    assert cached.cached == [(5, 1), (4, 1), (3, 1)]
    assert [line.split(":")[0] for line in cached.lines] == [
        "feature cache for phase 'linear probe'",
        "feature cache for phase 'unfreeze layer4'",
        "feature cache for phase 'unfreeze layer3'",
    ]
    assert_same_metrics(cached, plain)


def test_lp_ft_caches_its_probe_then_fine_tunes_everything_uncached():
    cached, cached_summary, plain, plain_summary = fit_both(
        strategy="lp_ft", probe_epochs=2, augment="flip", epochs=3, test=True
    )
    assert cached.cached == [(5, 2), (5, 2), None]
    assert "released: the phase trains every group" in cached.lines[-1]
    assert_same_metrics(cached, plain)
    assert cached_summary["test_acc"] == plain_summary["test_acc"]


def test_a_cache_over_the_budget_trains_uncached_and_says_so_once(monkeypatch):
    monkeypatch.setenv(engine.FEATURE_CACHE_ENV, "1000")
    cached, _, plain, _ = fit_both(strategy="last_n", unfreeze_last=1, augment="none", epochs=2)
    assert cached.cached == [None, None]
    (line,) = cached.lines
    assert "over the cache budget of 0.0 MiB" in line and engine.FEATURE_CACHE_ENV in line
    assert_same_metrics(cached, plain)


def test_a_budget_that_is_not_a_number_says_what_to_set(monkeypatch):
    monkeypatch.setenv(engine.FEATURE_CACHE_ENV, "lots")
    exp = experiment(strategy="last_n", unfreeze_last=1, augment="none", epochs=1)
    with pytest.raises(engine.TrainingFailed, match=r"FINETUNE_FEATURE_CACHE_BYTES='lots' is not"):
        engine.fit(exp)


def test_random_resized_crops_are_never_cached():
    log = Log()
    exp = experiment(strategy="last_n", unfreeze_last=1, augment="crop", epochs=1)
    trainer = engine.Trainer(exp, [log])
    assert not trainer.use_feature_cache()
    trainer.fit()
    assert log.cached == [None]
    (line,) = log.lines
    assert "off: random-resized crops (augment crop) give new images every epoch" in line


def test_only_a_frozen_prefix_is_cached_not_bitfit_nor_full():
    def cached(**kw) -> bool:
        return engine.Trainer(experiment(augment="none", epochs=3, **kw)).use_feature_cache()

    assert cached(strategy="last_n", unfreeze_last=1)
    assert cached(strategy="surgical", surgical_group=2)  # the groups below layer3
    assert not cached(strategy="bitfit")  # its biases and norms train in every group
    assert not cached(strategy="full")


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "googlenet", "alexnet"]
)
def test_the_forward_cut_at_every_group_boundary_gives_the_models_own_logits(name):
    # residual sums (resnet, mobilenet), a conv head (squeezenet), a forward that reads
    # self.training (googlenet) and a flatten between two groups (alexnet)
    size = max(32, models.input_spec(name).min_size)
    torch.manual_seed(0)
    parts = models.create_model(name, 3, image_size=size)
    model = parts.model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        for boundary in range(1, len(parts.groups) + 1):
            split = models.split_forward(parts, boundary)
            assert torch.equal(split.rest(split.prefix(x)), expected), boundary


def test_the_worker_log_says_when_the_cache_does_not_fit(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"  # 3 classes of 12 PNGs: 0.1 MB of layer3 outputs at 32 px
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        (folder / f"c{k}").mkdir(parents=True)
        for i in range(12):
            pixels = torch.randint(0, 60, (32, 32, 3), generator=g) + 80 * k
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"c{k}" / f"{i}.png")
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO), engine.FEATURE_CACHE_ENV: "1e5"}
    args = ["--data", str(folder), "--model", "resnet18", "--weights", "none"]
    args += ["--image-size", "32", "--epochs", "1", "--strategy", "last_n", "--augment", "none"]
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", *args, "--runs-dir", str(runs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (log,) = runs.glob("*/worker.log")
    lines = [line for line in log.read_text().splitlines() if "feature cache" in line]
    assert len(lines) == 1, lines
    assert "feature cache for phase 'last 1' off" in lines[0]
    assert "over the cache budget of 0.1 MiB ($FINETUNE_FEATURE_CACHE_BYTES)" in lines[0]
