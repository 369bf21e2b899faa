"""The plan (what trains, when, at what lr) and the L2-SP penalty."""

import pytest
import torch
from test_engine import synthetic_data

from finetune_core import cli, config, engine, models, preflight, strategies
from finetune_core.config import RunConfig
from finetune_core.strategies.l2sp import L2SP

K = 7


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return models.create_model("resnet18", K, image_size=32)


def cfg(**kw) -> RunConfig:
    return RunConfig(model="resnet18", weights="none", image_size=32, **kw)


def test_linear_probe_trains_exactly_the_head(resnet18):
    plan = strategies.make_plan(cfg(strategy="linear_probe"), resnet18)
    assert len(plan.phases) == 1
    assert plan.phases[0].trainable_params == 512 * K + K
    assert plan.head_params == 512 * K + K
    assert plan.total_params == sum(p.numel() for p in resnet18.model.parameters())


def test_last_n_trains_the_top_groups_and_the_head(resnet18):
    plan = strategies.make_plan(cfg(strategy="last_n", unfreeze_last=1), resnet18)
    layer4 = sum(p.numel() for p in resnet18.model.layer4.parameters())
    assert plan.phases[0].trainable_params == layer4 + 512 * K + K
    trained = [g.name for g in plan.phases[0].groups if g.trainable]
    assert trained == ["layer4", "head"]
    zero = strategies.make_plan(cfg(strategy="last_n", unfreeze_last=0), resnet18)
    assert zero.phases[0].trainable_params == 512 * K + K


def test_last_n_beyond_the_groups_is_an_error(resnet18):
    with pytest.raises(ValueError, match="exceeds"):
        strategies.make_plan(cfg(strategy="last_n", unfreeze_last=6), resnet18)


def test_surgical_trains_exactly_the_chosen_group_and_the_head(resnet18):
    plan = strategies.make_plan(cfg(strategy="surgical", surgical_group=2), resnet18)
    (phase,) = plan.phases
    layer3 = sum(p.numel() for p in resnet18.model.layer3.parameters())
    assert [g.name for g in phase.groups if g.trainable] == ["layer3", "head"]
    assert {g.name: g.trainable_params for g in phase.groups} == {
        "stem": 0,
        "layer1": 0,
        "layer2": 0,
        "layer3": layer3,
        "layer4": 0,
        "head": 512 * K + K,
    }
    assert phase.trainable_params == layer3 + 512 * K + K
    assert {n.split(".")[0] for n in phase.param_names} == {"layer3", "fc"}
    assert not plan.frozen_backbone  # part of the backbone trains: no feature cache
    # 1 counts as last_n does: the group just below the head; the last one is the stem
    top = strategies.make_plan(cfg(strategy="surgical", surgical_group=1), resnet18)
    last_1 = strategies.make_plan(cfg(strategy="last_n", unfreeze_last=1), resnet18)
    assert top.phases[0].param_names == last_1.phases[0].param_names
    stem = strategies.make_plan(cfg(strategy="surgical", surgical_group=5), resnet18)
    assert [g.name for g in stem.phases[0].groups if g.trainable] == ["stem", "head"]


def test_surgical_outside_the_groups_names_the_range(resnet18):
    names = models.group_names("resnet18")
    surgical = strategies.get("surgical")
    for k in (0, 6):
        found = surgical.check_groups(cfg(strategy="surgical", surgical_group=k), "resnet18", names)
        assert set(found) == {"surgical_group"}
        assert "resnet18 has 5 backbone groups" in found["surgical_group"]
        assert "--surgical-group must be 1 to 5 (1 = layer4" in found["surgical_group"]
        with pytest.raises(ValueError, match="1 to 5"):
            strategies.make_plan(cfg(strategy="surgical", surgical_group=k), resnet18)
    assert (
        surgical.check_groups(cfg(strategy="surgical", surgical_group=5), "resnet18", names) == {}
    )
    errors = preflight.validate(cfg(strategy="surgical", surgical_group=6))
    assert "--surgical-group must be 1 to 5" in errors["surgical_group"]
    assert "surgical_group" in config.validate_fields(cfg(strategy="surgical", surgical_group=0))


def test_surgical_is_labelled_with_its_group_from_flags_and_config_files():
    args = cli.build_parser().parse_args(
        ["train", "--strategy", "surgical", "--surgical-group", "2"]
    )
    run = cli.config_from_args(args)
    assert (run.strategy, run.surgical_group) == ("surgical", 2)
    assert strategies.label(run) == "surgical 2"
    assert strategies.label(config.from_dict({"strategy": "surgical"})) == "surgical 1"
    stored = {"strategy": "surgical", "surgical_group": 3}  # a config.json as the store reads it
    assert strategies.label(stored) == "surgical 3"
    assert strategies.preset_fields("surgical 2") == {"strategy": "surgical", "surgical_group": 2}


def test_surgical_training_changes_only_its_group_and_the_head(tmp_path):
    # builtin:shapes, random init, 32 px: one real epoch of surgical 2 on resnet18
    run = RunConfig(
        model="resnet18",
        weights="none",
        image_size=32,
        epochs=1,
        strategy="surgical",
        surgical_group=2,
        lr=0.05,
    )
    exp = engine.prepare(run)
    before = {k: v.detach().clone() for k, v in exp.parts.model.state_dict().items()}
    trainer = engine.Trainer(exp, [], tmp_path)
    assert not trainer.use_feature_cache()
    assert trainer.fit()["state"] == "completed"
    after = exp.parts.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # every weight and BatchNorm statistic of layer3 and the head moved, nothing else did:
    # the frozen groups above (layer4) and below ran in eval mode
    assert changed == {k for k in before if k.startswith(("layer3.", "fc."))}
    assert any(k.startswith("layer4.") and k.endswith("running_mean") for k in before)


def test_full_trains_everything(resnet18):
    plan = strategies.make_plan(cfg(strategy="full"), resnet18)
    assert plan.phases[0].trainable_params == plan.total_params


def test_gradual_unfreezes_one_group_from_the_top_every_m_epochs(resnet18):
    plan = strategies.make_plan(cfg(strategy="gradual", epochs=6, unfreeze_every=2), resnet18)
    spans = [(p.start_epoch, p.end_epoch) for p in plan.phases]
    assert spans == [(1, 2), (3, 4), (5, 6)]
    trained = [[g.name for g in p.groups if g.trainable] for p in plan.phases]
    assert trained == [["head"], ["layer4", "head"], ["layer3", "layer4", "head"]]
    assert plan.phase_at(4).name == "unfreeze layer4"


def test_gradual_keeps_the_last_phase_once_all_groups_train(resnet18):
    plan = strategies.make_plan(cfg(strategy="gradual", epochs=9, unfreeze_every=1), resnet18)
    assert plan.phases[-1].trainable_params == plan.total_params
    assert plan.phases[-1].end_epoch == 9
    assert len(plan.phases) == 1 + len(resnet18.groups)


def test_lp_ft_probes_then_trains_everything(resnet18):
    plan = strategies.make_plan(cfg(strategy="lp_ft", epochs=3, probe_epochs=1), resnet18)
    assert [p.name for p in plan.phases] == ["linear probe", "fine-tune"]
    assert plan.phases[0].trainable_params == 512 * K + K
    assert plan.phases[1].trainable_params == plan.total_params
    assert (plan.phases[1].start_epoch, plan.phases[1].end_epoch) == (2, 3)


def test_bitfit_trains_biases_and_norms_plus_the_head(resnet18):
    plan = strategies.make_plan(cfg(strategy="bitfit"), resnet18)
    expected = sum(
        p.numel()
        for n, p in resnet18.model.named_parameters()
        if n.startswith("fc.") or "bn" in n or "downsample.1" in n or n.endswith("bias")
    )
    assert plan.phases[0].trainable_params == expected
    strategies.apply_phase(resnet18, plan.phases[0])
    trained = {n for n, p in resnet18.model.named_parameters() if p.requires_grad}
    assert "layer1.0.conv1.weight" not in trained
    assert "layer1.0.bn1.weight" in trained and "fc.weight" in trained


def test_layer_decay_gives_the_head_lr_and_each_lower_group_one_more_factor(resnet18):
    plan = strategies.make_plan(cfg(strategy="full", lr=0.1, layer_decay=0.5), resnet18)
    lrs = {g.name: g.lr for g in plan.phases[0].groups}
    assert lrs["head"] == pytest.approx(0.1)
    assert lrs["layer4"] == pytest.approx(0.05)
    assert lrs["layer3"] == pytest.approx(0.025)
    assert lrs["stem"] == pytest.approx(0.1 * 0.5**5)
    groups = strategies.optimizer_groups(cfg(lr=0.1, layer_decay=0.5), resnet18, plan)
    assert {g["name"]: g["lr"] for g in groups}["layer3"] == pytest.approx(0.025)


def test_l2sp_is_zero_at_start_and_its_gradient_is_two_lambda_delta(resnet18):
    plan = strategies.make_plan(cfg(strategy="last_n", unfreeze_last=1), resnet18)
    strategies.apply_phase(resnet18, plan.phases[0])
    reg = L2SP(resnet18, plan, lam=0.3)
    assert float(reg.penalty().detach()) == 0.0
    assert all(not n.startswith("fc.") for n, _ in _named(reg, resnet18))
    w = resnet18.model.layer4[1].conv2.weight
    with torch.no_grad():
        w.add_(0.01 * torch.randn_like(w))
    theta0 = next(p0 for p, p0 in reg.pairs if p is w)
    resnet18.model.zero_grad()
    reg.penalty().backward()
    torch.testing.assert_close(w.grad, 2 * 0.3 * (w.detach() - theta0))
    assert resnet18.model.layer1[0].conv1.weight.grad is None  # frozen: not in the penalty


def _named(reg, parts):
    ids = {id(p) for p, _ in reg.pairs}
    return [(n, p) for n, p in parts.model.named_parameters() if id(p) in ids]


def test_l2sp_takes_weight_decay_off_the_backbone_only(resnet18):
    c = cfg(strategy="full", l2sp=0.01, weight_decay=1e-3)
    groups = strategies.optimizer_groups(c, resnet18, strategies.make_plan(c, resnet18))
    # the head's weight decays; its bias, as every norm and bias by default, does not
    decay = {(g["name"], g.get("no_decay", False)): g["weight_decay"] for g in groups}
    assert decay.pop(("head", False)) == 1e-3
    assert decay.pop(("head", True)) == 0.0
    assert set(decay.values()) == {0.0}


def test_plan_for_builds_on_the_meta_device_and_frames_per_phase():
    plan = preflight.plan_for(
        RunConfig(model="vit_b_16", strategy="lp_ft", epochs=3, image_size=224), 10
    )
    frame = plan.to_frame()
    assert set(frame["phase"]) == {"linear probe", "fine-tune"}
    assert frame.groupby("phase")["params"].sum().nunique() == 1
    assert plan.total_params > 80_000_000


class _Scale(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return x * self.weight


class _ScaledTop(strategies.Strategy):
    """A strategy that changes the model: a learned scale after the top group, and the head."""

    name = "scaled_top"
    summary = "a learned per-channel scale after the top group, and the head"

    def phases(self, cfg, group_names):
        return [strategies.PhaseSpec("scale", 1, cfg.epochs, 1)]

    def trainable_subset(self, parts):
        scales = [n for n, m in parts.model.named_modules() if isinstance(m, _Scale)]
        return {f"{n}.weight" for n in scales}

    def prepare(self, parts, cfg):
        top = parts.groups[-1].prefixes[0]
        module = parts.model.get_submodule(top)
        channels = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        setattr(parts.model, top, torch.nn.Sequential(module, _Scale(channels.num_features)))


@pytest.fixture
def scaled_top():
    strategies.register(_ScaledTop)
    yield strategies.get("scaled_top")
    strategies.unregister("scaled_top")


def test_a_new_strategy_is_one_registered_object_that_may_change_the_model(scaled_top):
    cfg = RunConfig(
        model="resnet18",
        weights="none",
        image_size=32,
        batch_size=32,
        strategy="scaled_top",
        epochs=1,
        lr=0.05,
    )
    assert config.validate_fields(cfg) == {}
    assert strategies.label(cfg) == "scaled_top" and "scaled_top" in strategies.presets()
    torch.manual_seed(0)
    parts = engine.build_model(cfg, 4)
    plan = strategies.make_plan(cfg, parts)
    assert plan.phases[0].trainable_params == 512 + 512 * 4 + 4
    before = {k: v.detach().clone() for k, v in parts.model.named_parameters()}
    exp = engine.Experiment(
        cfg, parts, synthetic_data(), torch.device("cpu"), models.input_spec("resnet18")
    )
    assert engine.fit(exp)["state"] == "completed"
    after = dict(parts.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"layer4.1.weight", "fc.weight", "fc.bias"}
