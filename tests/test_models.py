"""Models: the registry, head swap, layer groups in forward order, sizes, weights metadata."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torchvision
from torch import nn

from finetune_core import models
from finetune_core.config import RunConfig
from finetune_core.models import (
    check_image_size,
    classification_models,
    create_model,
    group_names,
    input_spec,
    model_info,
)
from finetune_core.strategies import make_plan

ALL_MODELS = classification_models()
# Models up to about 30M parameters also take one real training step on the CPU.
TRAINED = [n for n in ALL_MODELS if model_info(n)["params"] <= 32_000_000]


def _smallest_size(name: str) -> int:
    """The smallest image size the architecture takes when trained from scratch."""
    size = input_spec(name).min_size
    while check_image_size(name, size, pretrained=False) is not None:
        size += 1
    return size


def _first_use_order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Returns {parameter name: rank of the first forward call of the module owning it}."""
    order: dict[str, int] = {}
    handles = []
    for mod_name, module in model.named_modules():

        def hook(_module, _inputs, mod_name=mod_name):
            order.setdefault(mod_name, len(order))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    ranks = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            # Swin's attention reads its qkv/proj weights functionally: use the nearest
            # enclosing module that ran.
            user = mod_name
            while user not in order:
                assert user, f"{full}: no module around it ran in forward"
                user = user.rpartition(".")[0]
            ranks[full] = order[user]
    return ranks


def test_registry_lists_every_torchvision_classification_model_sorted():
    expected = sorted(torchvision.models.list_models(module=torchvision.models))
    assert ALL_MODELS == expected
    assert {"resnet18", "vit_b_16", "squeezenet1_0", "maxvit_t", "inception_v3"} <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_has_a_head_and_groups_covering_each_parameter_once_in_forward_order(name):
    size = _smallest_size(name)
    parts = create_model(name, 3, image_size=size, device="meta")
    model = parts.model
    head = model.get_submodule(parts.head)
    assert isinstance(head, (nn.Linear, nn.Conv2d))
    assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 3
    assert len(parts.groups) >= 4
    names = [g.name for g in parts.groups]
    assert len(set(names)) == len(names) and "head" not in names
    assert names == group_names(name)

    owner = parts.group_of()  # raises when a parameter is in no group or in two
    params = dict(model.named_parameters())
    assert set(owner) == set(params)
    assert all(owner[p] == "head" for p in params if models._under(p, parts.head))
    for group in parts.groups:  # every group holds parameters; prefixes resolve
        assert any(g == group.name for g in owner.values()), f"group {group.name} is empty"
        for prefix in group.prefixes:
            assert prefix in params or model.get_submodule(prefix) is not None

    # Forward order: sorting parameters by the first call of their module never goes back
    # to an earlier group, and the head comes last.
    rank_of_group = {g.name: i for i, g in enumerate(parts.groups)} | {"head": len(parts.groups)}
    model.train()
    ranks = _first_use_order(model, torch.empty(2, 3, size, size, device="meta"))
    sequence = [rank_of_group[owner[p]] for p in sorted(ranks, key=ranks.get)]
    assert sequence == sorted(sequence), f"{name}: groups out of forward order"
    assert sequence[-1] == len(parts.groups)

    # The plan: gradual walks every group, top first, one per epoch; bitfit trains some
    # biases or norms (every family has them) and the whole head.
    n, total = len(names), sum(p.numel() for p in params.values())
    cfg = RunConfig(model=name, strategy="gradual", epochs=n + 1, image_size=size)
    plan = make_plan(cfg, parts)
    assert plan.total_params == total and len(plan.phases) == n + 1
    assert [g.name for g in plan.phases[0].groups] == [*names, "head"]
    trained = [sum(g.trainable for g in p.groups[:-1]) for p in plan.phases]
    assert trained == list(range(n + 1))
    assert plan.phases[-1].trainable_params == total
    bitfit = make_plan(RunConfig(model=name, strategy="bitfit", image_size=size), parts)
    assert plan.head_params < bitfit.phases[0].trainable_params < total


@pytest.mark.parametrize("name", ALL_MODELS)
def test_min_size_is_the_smallest_size_the_architecture_takes(name):
    spec = input_spec(name)
    size = _smallest_size(name)
    assert size == spec.min_size
    model = create_model(name, 3, image_size=size, device="meta").model.train()
    assert model(torch.empty(2, 3, size, size, device="meta")).shape == (2, 3)
    if size > 1:
        smaller = size - 1
        assert check_image_size(name, smaller, pretrained=False) is not None
        with pytest.raises((RuntimeError, ValueError, AssertionError)):
            m = create_model(name, 3, image_size=smaller, device="meta").model.train()
            m(torch.empty(2, 3, smaller, smaller, device="meta"))


@pytest.mark.parametrize("name", TRAINED)
def test_small_models_take_one_training_step_at_their_smallest_size(name):
    torch.manual_seed(0)
    size = _smallest_size(name)
    parts = create_model(name, 3, image_size=size)
    model = parts.model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([0, 2]))
    loss.backward()
    assert math.isfinite(loss.item())
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"
    opt.step()


def test_resnet18_head_is_fc_for_k_classes_and_groups_are_stem_and_four_layers():
    parts = create_model("resnet18", 5)
    assert parts.head == "fc"
    head_params = sum(p.numel() for n, p in parts.model.named_parameters() if n.startswith("fc."))
    assert head_params == 512 * 5 + 5
    assert [g.name for g in parts.groups] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert parts.groups[0].prefixes == ("conv1", "bn1")
    assert group_names("resnet18") == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_groups_of_a_few_families_follow_their_stages():
    assert group_names("vgg11") == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc hidden"]
    assert group_names("alexnet") == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc hidden"]
    assert group_names("vit_b_16") == [
        "patch embed",
        "blocks 0-2",
        "blocks 3-5",
        "blocks 6-8",
        "blocks 9-11",
        "final norm",
    ]
    vit = create_model("vit_b_16", 3, device="meta")
    assert set(vit.groups[0].prefixes) >= {"conv_proj", "class_token", "encoder.pos_embedding"}
    assert group_names("convnext_tiny") == [
        "stem",
        *(f"stage{i}" for i in range(1, 5)),
        "final norm",
    ]
    assert group_names("mobilenet_v3_small")[-1] == "pre-logits"
    assert group_names("maxvit_t")[-1] == "pre-logits"
    assert group_names("inception_v3") == ["stem", "mixed5", "mixed6", "mixed7"]


def test_googlenet_and_inception_v3_have_no_aux_heads():
    for name in ("googlenet", "inception_v3"):
        model = create_model(name, 3, device="meta").model
        assert not any(n.startswith(models.AUX_PREFIXES) for n, _ in model.named_parameters())


def test_backbone_state_loads_every_backbone_tensor_and_leaves_the_new_head():
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()  # 1000-class, seeded random
    torch.manual_seed(7)
    parts = create_model("resnet18", 3, backbone_state=state)
    loaded = parts.model.state_dict()
    assert loaded["fc.weight"].shape == (3, 512)
    backbone = [k for k in state if not k.startswith("fc.")]
    assert backbone and all(torch.equal(loaded[k], state[k]) for k in backbone)


def test_backbone_state_ignores_aux_head_keys():
    state = torchvision.models.googlenet(aux_logits=True, init_weights=False).state_dict()
    assert any(k.startswith("aux1.") for k in state)
    parts = create_model("googlenet", 4, backbone_state=state)
    assert torch.equal(parts.model.state_dict()["conv1.conv.weight"], state["conv1.conv.weight"])


def test_backbone_state_of_another_architecture_raises_naming_the_keys():
    state = torchvision.models.resnet34().state_dict()
    with pytest.raises(ValueError, match=r"resnet18.*unexpected layer1\.2\."):
        create_model("resnet18", 3, backbone_state=state)
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"conv1\.weight has shape \(64, 3, 3, 3\)"):
        create_model("resnet18", 3, backbone_state=state)
    del state["conv1.weight"]
    with pytest.raises(ValueError, match=r"missing conv1\.weight"):
        create_model("resnet18", 3, backbone_state=state)


@pytest.mark.parametrize(
    ("name", "size"), [("resnet18", 32), ("squeezenet1_0", 32), ("vit_b_16", 32)]
)
def test_head_forward_of_captured_features_equals_the_model_output(name, size):
    torch.manual_seed(0)
    parts = create_model(name, 4, image_size=size)
    model = parts.model.eval()
    captured = []
    handle = model.get_submodule(parts.head).register_forward_pre_hook(
        lambda _m, inputs: captured.append(inputs[0])
    )
    with torch.no_grad():
        x = torch.randn(2, 3, size, size)
        expected = model(x)
        handle.remove()
        got = parts.forward_head(captured[0])
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, expected)


def test_check_image_size_explains_what_is_wrong_and_what_fits():
    assert check_image_size("resnet18", 32, pretrained=True) is None
    assert check_image_size("vit_b_16", 224, pretrained=True) is None
    msg = check_image_size("vit_b_16", 160, pretrained=True)
    assert "224" in msg and "160" in msg and "--weights none" in msg
    assert check_image_size("vit_b_16", 160, pretrained=False) is None
    msg = check_image_size("vit_b_16", 200, pretrained=False)
    assert "multiple of 16" in msg and "192 or 208" in msg
    msg = check_image_size("alexnet", 32, pretrained=True)
    assert "at least 63" in msg and "32" in msg
    msg = check_image_size("inception_v3", 64, pretrained=False)
    assert "at least 75" in msg
    assert check_image_size("inception_v3", 75, pretrained=True) is None
    assert "224" in check_image_size("maxvit_t", 64, pretrained=False)
    assert check_image_size("vit_h_14", 518, pretrained=True) is None


def test_input_spec_reads_the_default_weights_transforms():
    spec = input_spec("resnet18")
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert spec.std == pytest.approx((0.229, 0.224, 0.225))
    assert (spec.interpolation, spec.default_size, spec.pretrained_size) == ("bilinear", 224, None)
    assert input_spec("inception_v3").default_size == 299
    assert input_spec("efficientnet_b3").interpolation == "bicubic"
    assert input_spec("vit_b_16").pretrained_size == 224
    assert input_spec("vit_h_14").pretrained_size == 518  # its default weights are SWAG 518 px
    assert input_spec("alexnet").min_size == 63


def test_model_info_gives_the_weights_meta_and_the_exact_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    info = model_info("resnet18")
    assert info["params"] == 11_689_512
    assert info["acc1"] == pytest.approx(69.758) and info["acc5"] == pytest.approx(89.078)
    assert info["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert info["categories"] == 1000 and info["min_size"] == 1
    assert info["file_mb"] > 40
    name = os.path.basename(info["url"])
    assert info["cache_file"] == os.path.join(str(tmp_path), "hub", "checkpoints", name)


def test_unknown_model_names_get_the_nearest_names():
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet19", 3)
    with pytest.raises(ValueError, match="Did you mean"):
        group_names("vit_b16")
