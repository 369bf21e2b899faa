"""The training recipe of torchvision's references and fastai: weight EMA, MixUp/CutMix,
policy augmentation and the mirror switch, no weight decay on norms and biases, SGD with
Nesterov, one-cycle momentum, gradient accumulation, test-time augmentation, fastai's head;
each changes what it claims on a tiny run, and a resume stays exact with each on."""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from finetune_core import config, data, engine, heads, models, recipe
from finetune_core.config import RunConfig

CLASSES = ["red", "green", "blue", "grey"]


def synthetic_data(n_train=96, n_val=32, size=32, seed=0, test=False) -> data.ImageData:
    """Returns 4 classes of noise tinted towards each class's colour, with a bright bar on
    the left half so that a mirror changes the image."""
    g = torch.Generator().manual_seed(seed)
    tints = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [120, 120, 120]])

    def split(n):
        labels = torch.arange(n) % 4
        noise = torch.randint(0, 90, (n, 3, size, size), generator=g)
        images = (tints[labels][:, :, None, None] * 0.7 + noise).clamp(0, 255)
        images[..., : size // 4] = 255
        return data.TensorSplit(images.to(torch.uint8), labels)

    test_split = split(n_val) if test else None
    return data.ImageData(CLASSES, split(n_train), split(n_val), test_split, [])


def experiment(parts=None, test=False, **kw) -> engine.Experiment:
    kw.setdefault("batch_size", 32)
    cfg = RunConfig(model="resnet18", weights="none", image_size=32, **kw)
    torch.manual_seed(cfg.seed)
    if parts is None:
        parts = engine.build_model(cfg, len(CLASSES))
    spec = models.input_spec("resnet18")
    return engine.Experiment(cfg, parts, synthetic_data(test=test), torch.device("cpu"), spec)


class Log(engine.Callback):
    def __init__(self):
        self.val, self.test, self.lines, self.momenta = [], [], [], []

    def on_eval_record(self, trainer, record):
        (self.val if record["split"] == "val" else self.test).append(record)

    def on_log(self, trainer, message):
        self.lines.append(message)

    def on_batch_end(self, trainer):
        group = trainer.optimizer.param_groups[0]
        self.momenta.append(group["betas"][0] if "betas" in group else group["momentum"])


def evaluate_file(weights_file, cfg, images, labels):
    """Returns the softmax of a fresh model holding a weights file's tensors on images."""
    torch.manual_seed(0)
    parts = engine.build_model(cfg, len(CLASSES))
    parts.model.load_state_dict(load_file(str(weights_file)))
    parts.model.eval()
    spec = models.input_spec("resnet18")
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        x = (images.float() / 255 - mean) / std
        return parts.model(x).softmax(1)


# --- weight EMA --------------------------------------------------------------------------------


def test_the_weight_ema_is_the_average_of_the_trajectory_and_what_is_scored_and_saved(tmp_path):
    class Trajectory(engine.Callback):
        def __init__(self):
            self.states = []

        def on_batch_end(self, trainer):
            sd = trainer.parts.model.state_dict()
            self.states.append({k: sd[k].clone() for k in ("fc.weight", "bn1.running_mean")})

    path = Trajectory()
    log = Log()
    kw = dict(strategy="full", epochs=2, model_ema=True, model_ema_steps=2, model_ema_decay=0.99)
    exp = experiment(**kw)
    reach = recipe.ema_reach(exp.cfg, len(exp.data.train))  # what New run says beforehand
    summary = engine.fit(exp, [path, log], checkpoint_dir=tmp_path)

    decay = 1 - (1 - 0.99) * 32 * 2 / 2  # the reference's adjustment: batch x steps / epochs
    assert summary["ema_decay_per_update"] == pytest.approx(decay)
    # updates after optimizer steps 1, 3, 5 of 6: the first copies, then lerp
    expected = {k: path.states[0][k].clone() for k in path.states[0]}
    for step in (3, 5):
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * path.states[step - 1][k]
    state = torch.load(tmp_path / "last_state.pt", weights_only=True)
    ema = state["weight_ema"]["tensors"]
    assert state["weight_ema"]["n_averaged"] == 3 == reach.updates
    assert reach.decay == summary["ema_decay_per_update"] and reach.still_at_start == decay**3
    for k, v in expected.items():
        torch.testing.assert_close(ema[k], v, rtol=1e-5, atol=1e-6)
    raw = path.states[-1]["fc.weight"]
    assert not torch.allclose(ema["fc.weight"], raw, atol=1e-4)  # differs from the raw weights

    # the figures are the EMA's: best.safetensors holds it, its val accuracy is best_val_acc
    assert summary["scored_weights"] == "ema"
    assert [r["weights"] for r in log.val] == ["ema", "ema"]
    best = load_file(str(tmp_path / "best.safetensors"))
    last = load_file(str(tmp_path / state["weights"]))
    assert torch.equal(last["fc.weight"], raw)  # the resume point keeps the raw weights
    best_epoch = summary["best_epoch"]
    assert not torch.allclose(best["fc.weight"], raw, atol=1e-4)
    if best_epoch == 2:
        torch.testing.assert_close(best["fc.weight"], expected["fc.weight"], rtol=1e-5, atol=1e-6)
    val = synthetic_data().val
    p = evaluate_file(tmp_path / "best.safetensors", RunConfig(), val.images, val.labels)
    assert (p.argmax(1) == val.labels).float().mean().item() == summary["best_val_acc"]
    assert summary["raw_best_val_acc"] == max(r["raw_acc"] for r in log.val)
    assert summary["raw_final_val_acc"] == log.val[-1]["raw_acc"]


def test_new_run_can_say_that_the_references_ema_would_stay_at_the_start_of_a_short_run():
    # digits: 1,437 training images, batch 64, 3 epochs (bench/README.md's recipe table,
    # where the reference's EMA scored 10 % with its raw weights at 96 %)
    short = RunConfig(model_ema=True, batch_size=64, epochs=3)
    reach = recipe.ema_reach(short, 1437)
    assert reach.updates == 3 and reach.still_at_start > 0.9  # 66 steps, one update in 32
    suggested = RunConfig(
        model_ema=True, batch_size=64, epochs=3, model_ema_steps=1,
        model_ema_decay=reach.suggested_decay,
    )  # fmt: skip
    assert recipe.ema_reach(suggested, 1437).still_at_start == pytest.approx(0.01)
    # warm-up updates copy the weights: the average starts after them
    warm = RunConfig(model_ema=True, batch_size=64, epochs=3, model_ema_steps=1, warmup_epochs=1)
    assert recipe.ema_reach(warm, 1437).updates == 66 - 22
    # on several devices each step takes devices x the batch: fewer steps, a faster decay
    two = RunConfig(model_ema=True, batch_size=32, epochs=3, model_ema_steps=1, devices=2)
    one = RunConfig(model_ema=True, batch_size=64, epochs=3, model_ema_steps=1)
    assert recipe.ema_reach(two, 1437) == recipe.ema_reach(one, 1437)
    # the reference's adjustment divides by the epochs: more epochs do not help; the size of
    # an epoch does (its defaults are for ImageNet's 1.28 M images)
    longer = RunConfig(model_ema=True, batch_size=64, epochs=600)
    assert recipe.ema_reach(longer, 1437).still_at_start > 0.9
    assert recipe.ema_reach(short, 1_281_167).still_at_start < 1e-6


# --- MixUp / CutMix ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mixup", "cutmix"])
def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_images(which):
    cfg = RunConfig(
        mixup_alpha=0.2 if which == "mixup" else 0.0, cutmix_alpha=1.0 if which == "cutmix" else 0
    )
    mixer = recipe.mixer_for(cfg, 4)
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 2])
    mixed, t = mixer(x, y, torch.Generator().manual_seed(3))
    assert t.shape == (8, 4)
    torch.testing.assert_close(t.sum(1), torch.ones(8))
    onehot = F.one_hot(y, 4).float()
    lam = float(t[0, 0])  # image 0 (class 0) with the shifted image 7 (class 2)
    torch.testing.assert_close(t, lam * onehot + (1 - lam) * onehot.roll(1, 0))
    assert 0 < lam < 1
    if which == "mixup":
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    else:  # a box pasted from the shifted image, its share of the area 1 - lam
        pasted = (mixed != x).any(1)[0]
        assert torch.equal(mixed[:, :, pasted], x.roll(1, 0)[:, :, pasted])
        assert pasted.float().mean().item() == pytest.approx(1 - lam, abs=1 / 16)
    again, t2 = mixer(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(again, mixed) and torch.equal(t2, t)  # the generator's draws


def test_the_mixed_loss_is_the_cross_entropy_of_the_mixed_targets():
    exp = experiment(strategy="full", epochs=1, mixup_alpha=0.4, augment="none")
    trainer = engine.Trainer(exp)
    trainer.begin_epoch()
    images, labels = exp.data.train.images[:32], exp.data.train.labels[:32]
    _, targets = trainer.mixer(trainer.to_input(images, trainer._batch_generator(0)), labels,
                               trainer._batch_generator(0))  # fmt: skip
    loss, logits, _ = trainer.train_step(images, labels, 0)
    log_p = logits.detach().float().log_softmax(1)
    loss = float(loss.detach())
    assert loss == pytest.approx(float(-(targets * log_p).sum(1).mean()), rel=1e-5)
    lam = float(targets[0, labels[0]])
    formula = lam * F.cross_entropy(log_p, labels) + (1 - lam) * F.cross_entropy(
        log_p, labels.roll(1, 0)
    )
    assert loss == pytest.approx(float(formula), rel=1e-5)


# --- augmentation and the caches -----------------------------------------------------------------


@pytest.mark.parametrize("mode", data.augment.MODES[1:])
def test_every_augment_is_a_deterministic_uint8_batch_change_and_the_mirror_can_be_off(mode):
    ramp = torch.arange(32, dtype=torch.float32).mul(8).view(1, 1, 1, 32).expand(16, 3, 32, 32)
    ramp = ramp.to(torch.uint8).contiguous()
    a = data.augment_batch(ramp, mode, torch.Generator().manual_seed(1))
    b = data.augment_batch(ramp, mode, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == ramp.shape and torch.equal(a, b)
    assert not torch.equal(a, ramp)
    if mode in ("flip", "crop", "fastai"):  # a mirror or at most 10 degrees of rotation
        brighter_right = a[..., 16:].float().mean((1, 2, 3)) > a[..., :16].float().mean((1, 2, 3))
        assert not brighter_right.all()  # some were mirrored
        if mode != "flip":
            kept = data.augment_batch(ramp, mode, torch.Generator().manual_seed(1), flip=False)
            right = kept[..., 16:].float().mean((1, 2, 3)) > kept[..., :16].float().mean((1, 2, 3))
            assert right.all()  # none was


def test_random_augmentation_and_mixing_turn_the_feature_cache_off_and_say_why():
    reasons = {
        "trivialaugment": dict(augment="trivialaugment"),
        "fastai": dict(augment="fastai"),
        "random erasing (random_erase 0.25)": dict(augment="none", random_erase=0.25),
        "MixUp and CutMix mix": dict(augment="none", mixup_alpha=0.2, cutmix_alpha=1.0),
    }
    for words, kw in reasons.items():
        trainer = engine.Trainer(experiment(strategy="linear_probe", epochs=2, **kw))
        boundary, why = trainer.cache_plan(trainer.plan.phases[0], 1)
        assert boundary is None and words in why, (kw, why)
        assert not trainer.use_feature_cache()
    trainer = engine.Trainer(experiment(strategy="linear_probe", epochs=2, augment="none"))
    assert trainer.use_feature_cache()
    log = Log()
    engine.fit(experiment(strategy="linear_probe", epochs=1, augment="randaugment"), [log])
    (line,) = log.lines
    assert "off: augment randaugment changes every image anew each epoch" in line


def test_a_mirror_where_hflip_is_off_is_refused_naming_the_setting():
    errors = config.validate_fields(RunConfig(augment="flip", hflip=False, tta="flip"))
    assert "--augment flip only mirrors" in errors["hflip"]
    assert "--tta flip scores mirrored images" in errors["tta"]
    assert (
        "--augment none has none"
        in config.validate_fields(RunConfig(augment="none", tta="augment"))["tta"]
    )
    assert config.validate_fields(RunConfig(augment="crop", hflip=False, tta="augment")) == {}


# --- weight decay, Nesterov, one-cycle momentum ------------------------------------------------


def test_no_weight_decay_reaches_normalisation_parameters_or_biases_by_default():
    for strategy in ("full", "last_n", "linear_probe"):
        exp = experiment(strategy=strategy, epochs=1, weight_decay=0.05, head="fastai")
        trainer = engine.Trainer(exp)
        spared = exp.parts.bias_and_norm_params()
        names = {id(p): n for n, p in exp.parts.model.named_parameters()}
        seen = set()
        for group in trainer.optimizer.param_groups:
            for p in group["params"]:
                seen.add(names[id(p)])
                decayed = group["weight_decay"] > 0
                assert decayed != (names[id(p)] in spared), (strategy, names[id(p)], group["name"])
        assert {"fc.0.weight", "fc.0.bias", "fc.4.weight"} <= seen & spared  # head's BatchNorms
    old = engine.Trainer(experiment(strategy="full", epochs=1, decay_norm_bias=True))
    assert all(g["weight_decay"] == 1e-4 for g in old.optimizer.param_groups)
    # a run stored before the setting existed resumes with the decay it trained with
    stored = RunConfig().to_dict()
    del stored["decay_norm_bias"], stored["cycle_momentum"]
    assert config.stored_config(stored).decay_norm_bias is True
    assert config.stored_config(stored).cycle_momentum is False
    assert config.from_dict({}).decay_norm_bias is False


def test_sgd_nesterov_turns_nesterov_on():
    nesterov = engine.Trainer(experiment(strategy="full", epochs=1, optimizer="sgd_nesterov"))
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in nesterov.optimizer.param_groups)
    plain = engine.Trainer(experiment(strategy="full", epochs=1))
    assert not any(g["nesterov"] for g in plain.optimizer.param_groups)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_cycle_cycles_momentum_from_095_to_085_and_back(optimizer):
    log = Log()
    kw = dict(strategy="linear_probe", augment="none", scheduler="onecycle", epochs=3)
    engine.fit(experiment(optimizer=optimizer, batch_size=8, **kw), [log])
    m = log.momenta  # after each of the 36 steps
    low = min(range(len(m)), key=m.__getitem__)
    assert m[low] == pytest.approx(0.85, abs=2e-3) and low + 1 == round(0.3 * len(m))
    assert m[0] > m[low] < m[-1] and m[-1] == pytest.approx(0.95)
    assert all(a > b for a, b in zip(m[:low], m[1 : low + 1], strict=True))  # down, then up
    assert all(a < b for a, b in zip(m[low:-1], m[low + 1 :], strict=True))
    fixed = Log()
    engine.fit(experiment(optimizer=optimizer, batch_size=8, cycle_momentum=False, **kw), [fixed])
    assert set(fixed.momenta) == {0.9}
    cfg = RunConfig(scheduler="onecycle", epochs=1)
    assert recipe.momentum_at(cfg, 0, 100, 100) == pytest.approx(0.95)
    assert recipe.momentum_at(cfg, 30, 100, 100) == pytest.approx(0.85)
    assert recipe.momentum_at(cfg, 100, 100, 100) == pytest.approx(0.95)


# --- gradient accumulation ------------------------------------------------------------------------


def no_batchnorm_parts() -> models.ModelParts:
    """Returns a small convolutional net without BatchNorm (nor dropout), as ModelParts."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(3, 8, 3, stride=2))
    net.add_module("relu1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(8, 8, 3, stride=2))
    net.add_module("relu2", nn.ReLU())
    net.add_module("conv3", nn.Conv2d(8, 16, 3))
    net.add_module("relu3", nn.ReLU())
    net.add_module("conv4", nn.Conv2d(16, 16, 3))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(16, 4))
    groups = [models.Group(f"conv{i}", (f"conv{i}",)) for i in range(1, 5)]
    return models.ModelParts("tiny", net, "fc", groups)


def test_accumulating_k_batches_takes_the_step_of_one_batch_k_times_larger():
    kw = dict(strategy="full", epochs=2, augment="none", scheduler="constant", lr=0.05)
    one = experiment(parts=no_batchnorm_parts(), batch_size=48, **kw)
    engine.fit(one)
    four = experiment(parts=no_batchnorm_parts(), batch_size=12, accumulate_steps=4, **kw)
    trainer = engine.Trainer(four)
    summary = trainer.fit()
    assert trainer.step == 16  # batches; 4 optimizer steps
    assert summary["effective_batch_size"] == 48
    plain = experiment(parts=no_batchnorm_parts(), batch_size=12, **kw)
    engine.fit(plain)
    for (name, a), b, c in zip(
        one.parts.model.named_parameters(),
        four.parts.model.parameters(),
        plain.parts.model.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        assert not torch.allclose(a, c, atol=1e-4), name  # 16 steps of 12 are another run


# --- test-time augmentation -------------------------------------------------------------------------


def test_tta_flip_reports_the_mean_of_the_softmax_of_each_image_and_its_mirror(tmp_path):
    exp = experiment(strategy="full", epochs=2, tta="flip", test=True)
    summary = engine.fit(exp, checkpoint_dir=tmp_path / "checkpoints")
    assert summary["tta"] == "flip" and "mirror" in summary["tta_averages"]
    rows = list(csv.DictReader(open(tmp_path / engine.PREDICTIONS_FILE)))
    best = tmp_path / "checkpoints" / "best.safetensors"
    for split, key in (("val", "best_val_acc"), ("test", "test_acc")):
        s = getattr(exp.data, split)
        plain = evaluate_file(best, exp.cfg, s.images, s.labels)
        mirrored = evaluate_file(best, exp.cfg, s.images.flip(-1), s.labels)
        mean = (plain + mirrored) / 2
        assert summary[f"tta_{key}"] == (mean.argmax(1) == s.labels).float().mean().item()
        assert summary[key] == (plain.argmax(1) == s.labels).float().mean().item()
        mine = [r for r in rows if r["split"] == split]
        assert [int(r["tta_pred"]) for r in mine] == mean.argmax(1).tolist()
        got = torch.tensor([float(r["tta_confidence"]) for r in mine])
        torch.testing.assert_close(got, mean.max(1).values, atol=1e-5, rtol=0)
        assert [int(r["pred"]) for r in mine] == plain.argmax(1).tolist()


# --- fastai's head ---------------------------------------------------------------------------------


def test_the_fastai_head_pools_by_average_and_max_and_trains_its_batchnorm_in_a_linear_probe():
    exp = experiment(strategy="linear_probe", epochs=1, augment="none", head="fastai")
    head = exp.parts.model.fc
    assert isinstance(head, heads.FastaiHead)
    assert isinstance(exp.parts.model.avgpool, heads.ConcatPool2d)
    assert head[0].num_features == 2 * 512 and head[2].out_features == 512
    before = head[0].running_mean.clone()
    summary = engine.fit(exp)
    assert summary["trainable_params"] == sum(p.numel() for p in head.parameters())
    assert not torch.equal(before, head[0].running_mean)  # in train mode while it trains
    x = torch.randn(2, 512, 2, 2)
    torch.testing.assert_close(
        heads.ConcatPool2d()(x).flatten(1), torch.cat([x.amax((2, 3)), x.mean((2, 3))], 1)
    )


# --- resume ------------------------------------------------------------------------------------------

RESUMED = {
    "ema, accumulation stopped mid-group, nesterov, onecycle": dict(
        model_ema=True,
        model_ema_steps=1,
        model_ema_decay=0.999,
        accumulate_steps=2,
        batch_size=16,
        optimizer="sgd_nesterov",
        scheduler="onecycle",
        augment="crop",
    ),
    "mixup, cutmix, trivialaugment, random erasing, fastai head, tta": dict(
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        augment="trivialaugment",
        random_erase=0.5,
        head="fastai",
        tta="flip",
    ),
    "linear probe: fastai head, ema, augmix without the mirror, adamw": dict(
        strategy="linear_probe",
        head="fastai",
        model_ema=True,
        model_ema_steps=1,
        model_ema_decay=0.999,
        augment="augmix",
        hflip=False,
        optimizer="adamw",
        scheduler="onecycle",
    ),
}


@pytest.mark.parametrize("options", list(RESUMED))
def test_a_run_stopped_mid_epoch_resumes_exactly_with_the_recipe_options_on(options, tmp_path):
    kw = {"strategy": "full", "epochs": 2, **RESUMED[options]}
    # batch 2 of epoch 2 (3 batches of 32), or with accumulation of 2 batches of 16 the
    # first batch of a group (its gradients wait for the second)
    stop_at = 3 if kw.get("accumulate_steps", 1) > 1 else 4

    class StopAt(engine.Callback):
        def on_batch_end(self, trainer):
            if trainer.step == stop_at:
                raise engine.StopTraining

    straight, resumed = Log(), Log()
    first = engine.fit(experiment(test=True, **kw), [straight], checkpoint_dir=tmp_path / "a")
    engine.fit(experiment(test=True, **kw), [StopAt()], checkpoint_dir=tmp_path / "b")
    state = torch.load(tmp_path / "b" / "last_state.pt", weights_only=True)
    if kw.get("accumulate_steps", 1) > 1:
        assert state["accumulated_grads"]  # stopped between two batches of one step
    again = engine.fit(
        experiment(test=True, **kw), [resumed], checkpoint_dir=tmp_path / "b", resume=True
    )
    assert resumed.val
    for a, b in zip(straight.val[-len(resumed.val) :], resumed.val, strict=True):
        assert a["acc"] == b["acc"] and a.get("raw_acc") == b.get("raw_acc")
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for key in ("best_val_acc", "test_acc", "raw_best_val_acc", "tta_test_acc"):
        assert first.get(key) == again.get(key), key
    one = load_file(str(tmp_path / "a" / "best.safetensors"))
    two = load_file(str(tmp_path / "b" / "best.safetensors"))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6, msg=k)
    assert math.isfinite(again["best_val_acc"])


# --- what New run and Compare say -------------------------------------------------------------


def test_compare_says_which_weights_a_figure_is_for_and_puts_tta_beside_the_plain_figure():
    configs = {"a": {"strategy": "full"}, "b": {"strategy": "linear_probe"}}
    summaries = {
        "a": {"scored_weights": "ema", "best_val_acc": 0.9, "raw_best_val_acc": 0.85},
        "b": {
            "scored_weights": "raw",
            "best_val_acc": 0.7,
            "test_acc": 0.6,
            "tta": "flip",
            "tta_averages": recipe.tta_words(RunConfig(tta="flip")),
            "tta_best_val_acc": 0.75,
            "tta_test_acc": 0.65,
        },
    }
    from finetune_core import plots

    ema, tta = plots.recipe_notes(configs, summaries)
    assert ema.startswith("Accuracies of full (raw weights 85.0 % val) are for their weight EMA")
    assert "linear_probe" not in ema
    assert tta.startswith("linear_probe with test-time augmentation (the mean of the softmax")
    assert "val 75.0 % (plain 70.0 %), test 65.0 % (plain 60.0 %)" in tta
    assert plots.recipe_notes({"a": {}}, {"a": None}) == []  # runs from before: nothing


def test_new_run_says_before_launch_which_option_turns_the_feature_cache_off(tmp_path, monkeypatch):
    import fcntl
    import os
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from finetune_core import runner

    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(root))
    monkeypatch.delenv("FINETUNE_DATA_ROOTS", raising=False)
    fd = os.open(root / runner.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # no supervisor starts
    try:
        at = AppTest.from_file(str(Path(__file__).parents[1] / "app.py"), default_timeout=120)
        at.switch_page("pages/1_New_run.py")
        at.run()

        def captions():
            assert not at.exception, at.exception
            return "\n".join(str(c.value) for c in at.caption)

        assert "No feature cache" not in captions()  # flip: two cached views
        at.selectbox(key="f_augment").set_value("trivialaugment").run()
        assert (
            "No feature cache for last_n 1, linear_probe: augment trivialaugment changes every "
            "image anew each epoch, so its frozen part runs every step"
        ) in captions()
        at.selectbox(key="f_augment").set_value("none").run()
        at.number_input(key="f_mixup_alpha").set_value(0.2).run()
        assert "MixUp mix the images of each batch anew every step" in captions()
        at.number_input(key="f_accumulate_steps").set_value(4).run()
        said = captions()
        assert "Effective batch 256 = 64 × 4 batches per step" in said
        assert "optimizer steps of 4 batches (effective batch 256) per epoch" in said
        # the reference's EMA on a small data set: New run says it would stay at the start
        at.checkbox(key="f_model_ema").check().run()
        warned = "\n".join(str(w.value) for w in at.warning)
        found = re.search(
            r"so (\d+)% of the EMA weights it scores and saves as best stay where training "
            r"started; set EMA every \(steps\) to 1 and EMA decay to (0\.\d+)",
            warned,
        )
        assert found and int(found[1]) > 90, warned
        at.number_input(key="f_model_ema_steps").set_value(1).run()
        at.number_input(key="f_model_ema_decay").set_value(float(found[2])).run()
        assert not [w for w in at.warning if "weight EMA" in str(w.value)]  # it forgets now
        at.checkbox(key="f_model_ema").uncheck().run()
        at.selectbox(key="f_augment").set_value("flip").run()
        at.checkbox(key="f_hflip").uncheck().run()
        assert "--augment" not in captions()
        errors = "\n".join(str(e.value) for e in at.error)
        assert (
            "**Augmentation** = flip only mirrors images, which **Mirror left-right** off" in errors
        )
        assert at.button(key="launch").disabled
    finally:
        os.close(fd)
