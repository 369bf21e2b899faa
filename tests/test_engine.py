"""The training loop: freezing, phases, the feature cache, failure, stop/resume, early stop."""

import math
import subprocess
import sys

import pytest
import torch

from finetune_core import data, engine, models
from finetune_core.config import RunConfig

CLASSES = ["red", "green", "blue", "grey"]


def synthetic_data(n_train=96, n_val=32, size=32, seed=0, test=False) -> data.ImageData:
    """Returns 4 learnable classes: each image is noise tinted towards its class colour."""
    g = torch.Generator().manual_seed(seed)
    tints = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [120, 120, 120]])

    def split(n):
        labels = torch.arange(n) % 4
        noise = torch.randint(0, 90, (n, 3, size, size), generator=g)
        images = (tints[labels][:, :, None, None] * 0.7 + noise).clamp(0, 255).to(torch.uint8)
        return data.TensorSplit(images, labels)

    return data.ImageData(
        CLASSES, split(n_train), split(n_val), split(n_val) if test else None, ["bad.png"]
    )


def experiment(**kw) -> engine.Experiment:
    test = kw.pop("test", False)
    cfg = RunConfig(model="resnet18", weights="none", image_size=32, batch_size=32, **kw)
    torch.manual_seed(cfg.seed)
    parts = models.create_model("resnet18", 4, image_size=32)
    return engine.Experiment(
        cfg, parts, synthetic_data(test=test), torch.device("cpu"), models.input_spec("resnet18")
    )


class Log(engine.Callback):
    def __init__(self):
        self.train, self.val, self.trainable, self.fit_end = [], [], [], None

    def on_train_record(self, trainer, record):
        self.train.append(record)

    def on_eval_record(self, trainer, record):
        self.val.append(record)
        if record["split"] == "val":
            self.trainable.append(
                sum(p.numel() for p in trainer.parts.model.parameters() if p.requires_grad)
            )

    def on_fit_end(self, trainer, summary):
        self.fit_end = summary


def test_frozen_groups_stay_bit_identical_including_batchnorm_statistics():
    exp = experiment(strategy="last_n", unfreeze_last=1, epochs=1, lr=0.05)
    before = {k: v.clone() for k, v in exp.parts.model.state_dict().items()}
    summary = engine.fit(exp)
    after = exp.parts.model.state_dict()
    frozen = [k for k in before if not k.startswith(("layer4.", "fc."))]
    assert any("running_mean" in k for k in frozen)
    assert any(k.endswith("num_batches_tracked") for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert summary["state"] == "completed"


def test_freeze_bn_keeps_statistics_of_trained_groups_too():
    exp = experiment(strategy="full", epochs=1, freeze_bn=True)
    before = exp.parts.model.state_dict()["layer4.1.bn2.running_mean"].clone()
    weight = exp.parts.model.layer4[1].conv2.weight.detach().clone()
    engine.fit(exp)
    assert torch.equal(before, exp.parts.model.state_dict()["layer4.1.bn2.running_mean"])
    assert not torch.equal(weight, exp.parts.model.layer4[1].conv2.weight)


def test_gradual_unfreezes_on_schedule():
    log = Log()
    exp = experiment(strategy="gradual", epochs=3, unfreeze_every=1, lr=0.02)
    engine.fit(exp, [log])
    m = exp.parts.model
    head = 512 * 4 + 4
    layer4 = sum(p.numel() for p in m.layer4.parameters())
    layer3 = sum(p.numel() for p in m.layer3.parameters())
    assert log.trainable == [head, head + layer4, head + layer4 + layer3]
    assert [r["phase"] for r in log.val] == ["linear probe", "unfreeze layer4", "unfreeze layer3"]


def test_lp_ft_switches_phase_once():
    log = Log()
    exp = experiment(strategy="lp_ft", epochs=3, probe_epochs=1, lr=0.02)
    summary = engine.fit(exp, [log])
    phases = [r["phase"] for r in log.val]
    assert phases == ["linear probe", "fine-tune", "fine-tune"]
    total = sum(p.numel() for p in exp.parts.model.parameters())
    assert log.trainable == [512 * 4 + 4, total, total]
    assert summary["trainable_params_per_phase"] == {"linear probe": 2052, "fine-tune": total}


def test_linear_probe_without_augmentation_runs_the_backbone_once_per_image():
    exp = experiment(strategy="linear_probe", epochs=10, augment="none", lr=0.05)
    seen = []
    exp.parts.model.conv1.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    log = Log()
    summary = engine.fit(exp, [log])
    n_train, n_val = len(exp.data.train), len(exp.data.val)
    assert sum(seen) == n_train + n_val  # 10 epochs of training and eval, one backbone pass
    assert len(log.val) == 10
    assert summary["best_val_acc"] > 0.5  # the head learns from cached features


def test_linear_probe_with_augmentation_reruns_the_backbone_every_epoch():
    exp = experiment(strategy="linear_probe", epochs=2, augment="flip")
    seen = []
    exp.parts.model.conv1.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    engine.fit(exp)
    assert sum(seen) >= 2 * (len(exp.data.train) - 32)


def test_non_finite_loss_fails_naming_the_step_and_a_lower_lr():
    exp = experiment(strategy="full", epochs=1)
    with torch.no_grad():
        exp.parts.model.fc.weight.fill_(math.inf)
    with pytest.raises(engine.TrainingFailed, match=r"step 1 .*lower learning rate"):
        engine.fit(exp)


def test_records_summary_and_checkpoints(tmp_path):
    log = Log()
    exp = experiment(strategy="full", epochs=2, test=True)
    summary = engine.fit(exp, [log], checkpoint_dir=tmp_path)
    # the resume point: last_state.pt and the weights slot it names (see checkpoints.py)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"best.safetensors", "last_state.pt", "last-b.safetensors"}, names
    steps_per_epoch = 96 // 32
    val = [r for r in log.val if r["split"] == "val"]
    assert [(r["epoch"], r["step"]) for r in val] == [(1, 3), (2, 6)]
    assert log.val[-1]["split"] == "test" and summary["test_acc"] == log.val[-1]["acc"]
    assert log.train and all(r["split"] == "train" for r in log.train)
    assert log.train[-1]["step"] == 2 * steps_per_epoch
    assert summary["classes"] == CLASSES
    assert len(summary["confusion_matrix"]) == 4
    assert sum(map(sum, summary["confusion_matrix"])) == 32
    assert set(summary["per_class_acc"]) == set(CLASSES)
    assert summary["best_val_acc"] == max(r["acc"] for r in val)
    assert summary["total_params"] == sum(p.numel() for p in exp.parts.model.parameters())
    assert val[0]["acc5"] is None  # K <= 5: no top-5


def test_stop_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    class StopAt(engine.Callback):
        def on_batch_end(self, trainer):
            if trainer.step == 4:
                raise engine.StopTraining

    first = Log()
    exp = experiment(strategy="full", epochs=2)
    summary = engine.fit(exp, [StopAt(), first], checkpoint_dir=tmp_path)
    assert summary["state"] == "stopped"
    state = torch.load(tmp_path / "last_state.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["epoch_done"]) == (2, 4, False)

    second = Log()
    resumed = engine.fit(
        experiment(strategy="full", epochs=2), [second], checkpoint_dir=tmp_path, resume=True
    )
    assert resumed["state"] == "completed"
    assert [r["step"] for r in second.val] == [6]
    assert second.train[-1]["step"] == 6


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    class StopAt(engine.Callback):
        def on_batch_end(self, trainer):
            if trainer.step == 3:
                raise engine.StopTraining

    straight = Log()
    engine.fit(experiment(strategy="full", epochs=2, augment="crop"), [straight])
    engine.fit(
        experiment(strategy="full", epochs=2, augment="crop"), [StopAt()], checkpoint_dir=tmp_path
    )
    resumed = Log()
    engine.fit(
        experiment(strategy="full", epochs=2, augment="crop"),
        [resumed],
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert resumed.val[-1]["loss"] == pytest.approx(straight.val[-1]["loss"], rel=1e-4)


def test_early_stop_ends_after_patience_epochs_without_lower_val_loss():
    log = Log()
    # lr 0 on a frozen backbone: the val loss never improves after epoch 1
    exp = experiment(strategy="linear_probe", epochs=6, lr=0.0, early_stop=2, augment="none")
    summary = engine.fit(exp, [log])
    assert summary["epochs_run"] == len(log.val) == 3
    assert summary["state"] == "completed"


@pytest.mark.parametrize("scheduler", ["constant", "step", "cosine", "onecycle"])
def test_schedules_start_warm_and_end_low(scheduler):
    cfg = RunConfig(scheduler=scheduler, epochs=4, warmup_epochs=1)
    f = [engine.lr_factor(cfg, s, 400, 100) for s in range(401)]
    assert f[0] == pytest.approx(0.01)
    assert f[100] == pytest.approx(1.0 if scheduler != "onecycle" else 1 / 25)
    assert max(f) == pytest.approx(1.0)
    if scheduler == "constant":
        assert f[-1] == 1.0
    else:
        assert f[-1] <= 0.011


def test_the_engine_never_imports_streamlit():
    code = (
        "import sys, finetune_core.engine, finetune_core.store, finetune_core.runner, "
        "finetune_core.cli, finetune_core.plots, finetune_core.weights, finetune_core.data; "
        "assert 'streamlit' not in sys.modules, 'streamlit imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_earlier_run_for_the_same_classes_starts_with_its_trained_head(tmp_path):
    import json

    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = models.create_model("resnet18", 6, image_size=32).model.state_dict()
    run = tmp_path / "20250101-120000-abc123"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "resnet18", "image_size": 32}))
    (run / "status.json").write_text(json.dumps({"state": "completed"}))
    save_file(state, str(run / "checkpoints" / "best.safetensors"))
    cfg = RunConfig(model="resnet18", weights="run:20250101-120000", image_size=32)
    exp = engine.prepare(cfg, runs_dir=tmp_path)  # builtin:shapes has 6 classes
    got = exp.parts.model.state_dict()
    assert [k for k, v in state.items() if not torch.equal(got[k], v)] == []  # head included


def test_builtin_shapes_is_neither_trivial_nor_hopeless_for_resnet18_from_scratch():
    # The target task's difficulty, pinned: 35-85 % after one epoch, then +10 points by the
    # fifth, so that full vs partial comparisons have room to differ.
    cfg = RunConfig(model="resnet18", weights="none", image_size=64, lr=0.01, epochs=5)
    log = Log()
    engine.fit(engine.prepare(cfg), [log])
    acc = [r["acc"] for r in log.val if r["split"] == "val"]
    assert len(acc) == 5
    assert 0.35 <= acc[0] <= 0.85, acc
    assert acc[4] >= acc[0] + 0.10, acc


def test_a_cached_and_an_uncached_linear_probe_with_the_same_seed_give_the_same_metrics():
    runs = {}
    for cached in (True, False):
        log = Log()
        exp = experiment(strategy="linear_probe", epochs=3, augment="none", lr=0.05, test=True)
        summary = engine.fit(exp, [log], feature_cache=cached)
        runs[cached] = (log, summary)
    (cached, cached_summary), (plain, plain_summary) = runs[True], runs[False]
    assert [(r["split"], r["step"]) for r in cached.train] == [
        (r["split"], r["step"]) for r in plain.train
    ]
    for a, b in zip(cached.train + cached.val, plain.train + plain.val, strict=True):
        assert a["acc"] == b["acc"], (a, b)  # the same batches in the same order
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert cached_summary["confusion_matrix"] == plain_summary["confusion_matrix"]
    assert cached_summary["test_acc"] == plain_summary["test_acc"]


def test_last_n_0_is_a_linear_probe_and_caches_its_features_too():
    exp = experiment(strategy="last_n", unfreeze_last=0, epochs=3, augment="none", lr=0.05)
    seen = []
    exp.parts.model.conv1.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    summary = engine.fit(exp)
    assert sum(seen) == len(exp.data.train) + len(exp.data.val)
    probe = engine.fit(experiment(strategy="linear_probe", epochs=3, augment="none", lr=0.05))
    assert summary["best_val_acc"] == probe["best_val_acc"]
