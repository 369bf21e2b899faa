"""Weight sources, against real torch.hub and torchvision code: no mocks, no network.

Each test gets its own TORCH_HOME; "default" weights are seeded random state dicts written
at the exact file name torchvision downloads to, so loading them walks torchvision's own
cache path (get_state_dict(check_hash=True, weights_only=True)).
"""

import datetime
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from finetune_core import models, weights
from finetune_core.weights import WeightsError

RESNET18_CACHE_NAME = "resnet18-f37072fd.pth"  # basename of torchvision's resnet18 url


def seeded_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Returns module's state dict with every float tensor replaced by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in module.state_dict().items()
    }


def finetuned_state(model: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Returns a seeded state dict laid out like a model this tool fine-tuned for K classes."""
    return seeded_state(models.create_model(model, num_classes).model, seed)


def assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# ---------------------------------------------------------------------------- default


def test_default_weights_load_from_torchvisions_cache_file(torch_home):
    target = torch_home / "hub" / "checkpoints" / RESNET18_CACHE_NAME
    assert weights.cache_file("default", "resnet18") == target
    assert weights.availability("default", "resnet18")[0] == "download"
    expected = seeded_state(torchvision.models.resnet18(), seed=1)  # 1000-class, torchvision keys
    target.parent.mkdir(parents=True)
    torch.save(expected, target)

    state, sentence = weights.availability("default", "resnet18")
    assert state == "cached" and str(target) in sentence
    assert_same(weights.load_backbone_state("default", "resnet18", num_classes=6), expected)
    assert weights.check_weights("default", "resnet18", 6) is None


def test_default_weights_without_batchnorm_counters_still_build_the_model(torch_home):
    """Older torchvision files lack BatchNorm's num_batches_tracked; they must still load."""
    full = seeded_state(torchvision.models.resnet18(), seed=11)
    older = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    target = weights.cache_file("default", "resnet18")
    target.parent.mkdir(parents=True)
    torch.save(older, target)
    got = weights.load_backbone_state("default", "resnet18", num_classes=6)
    parts = models.create_model("resnet18", 6, backbone_state=got)
    built = parts.model.state_dict()
    for k, v in older.items():
        if not k.startswith("fc."):
            assert torch.equal(built[k], v), k


def test_default_weights_missing_offline_name_the_exact_cache_file(torch_home):
    target = torch_home / "hub" / "checkpoints" / RESNET18_CACHE_NAME
    with pytest.raises(WeightsError) as e:
        weights.load_backbone_state("default", "resnet18", num_classes=6)
    msg = str(e.value)
    assert "could not download" in msg
    assert str(target) in msg and str(target.parent) in msg
    for choice in ("builtin", "run:RUN_ID", "none", ".safetensors"):
        assert choice in msg
    assert not target.exists() and not list(target.parent.glob("*.partial"))


def test_unreadable_cached_default_weights_say_to_delete_the_file(torch_home):
    target = weights.cache_file("default", "resnet18")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="delete that file") as e:
        weights.load_backbone_state("default", "resnet18")
    assert str(target) in str(e.value)


# ---------------------------------------------------------------------------- local files


def test_safetensors_file_of_the_same_class_count_keeps_its_head(tmp_path):
    expected = finetuned_state("resnet18", 6, seed=2)
    path = tmp_path / "mine.safetensors"
    save_file(expected, str(path))
    assert weights.check_weights(str(path), "resnet18", 6) is None
    assert weights.availability(str(path), "resnet18")[0] == "ready"
    assert_same(weights.load_backbone_state(str(path), "resnet18", num_classes=6), expected)


def test_pth_file_of_another_class_count_loads_its_backbone_only(tmp_path):
    full = seeded_state(torchvision.models.resnet18(), seed=3)
    path = tmp_path / "imagenet.pth"
    # a training-script checkpoint: {"model": state dict saved from DataParallel}, plus extras
    torch.save({"model": {f"module.{k}": v for k, v in full.items()}, "epoch": 90}, path)
    assert weights.check_weights(str(path), "resnet18", 6) is None
    got = weights.load_backbone_state(str(path), "resnet18", num_classes=6)
    assert_same(got, {k: v for k, v in full.items() if not k.startswith("fc.")})
    parts = models.create_model("resnet18", 6, backbone_state=got)
    assert torch.equal(parts.model.state_dict()["conv1.weight"], full["conv1.weight"])


def test_file_of_another_architecture_is_refused_naming_keys(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(finetuned_state("resnet18", 6, seed=4), str(path))
    msg = weights.check_weights(str(path), "resnet34", 6)
    assert msg and "does not fit resnet34" in msg and "missing keys" in msg
    assert "layer1.2." in msg  # resnet34 has three blocks in layer1, resnet18 two
    with pytest.raises(WeightsError, match="missing keys"):
        weights.load_backbone_state(str(path), "resnet34", num_classes=6)


def test_file_with_other_shapes_is_refused_naming_the_tensor(tmp_path):
    state = finetuned_state("resnet18", 6, seed=5)
    state["layer4.1.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    msg = weights.check_weights(str(path), "resnet18", 6)
    assert msg and "layer4.1.conv2.weight is [3, 3, 3, 3] in the file" in msg


def test_pickle_with_python_objects_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "pickled.pth"
    state = finetuned_state("resnet18", 6, seed=6)
    torch.save({"model": state, "saved_at": datetime.datetime(2024, 1, 1)}, path)
    with pytest.raises(WeightsError) as e:
        weights.load_backbone_state(str(path), "resnet18", num_classes=6)
    msg = str(e.value)
    assert "refused" in msg and "weights_only" in msg and "datetime" in msg


def test_missing_file_and_malformed_specs_get_messages():
    assert "does not exist" in weights.check_weights("no/such/file.pth", "resnet18", 6)
    assert "Did you mean default" in weights.check_weights("defualt", "resnet18", 6)
    assert "run id" in weights.check_weights("run:", "resnet18", 6)
    assert "weights must be" in weights.check_weights("", "resnet18", 6)
    assert weights.availability("no/such/file.pth", "resnet18")[0] == "unavailable"
    assert weights.check_weights("none", "resnet18", 6) is None
    assert weights.load_backbone_state("none", "resnet18") is None
    with pytest.raises(WeightsError, match="does not exist"):
        weights.load_backbone_state("no/such/file.pth", "resnet18")


# ---------------------------------------------------------------------------- run:ID


def fake_run(runs: Path, run_id: str, model: str, num_classes: int, seed: int) -> dict:
    """Writes a finished run's config.json and checkpoints/best.safetensors; returns the state."""
    run = runs / run_id
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": model, "image_size": 64}))
    (run / "status.json").write_text(json.dumps({"state": "completed"}))
    state = finetuned_state(model, num_classes, seed)
    save_file(state, str(run / "checkpoints" / "best.safetensors"))
    return state


def test_run_weights_keep_the_head_for_the_same_class_count(tmp_path):
    expected = fake_run(tmp_path, "20250101-120000-abc123", "resnet18", 6, seed=7)
    assert (
        weights.check_weights("run:20250101-120000-abc123", "resnet18", 6, runs_dir=tmp_path)
        is None
    )
    got = weights.load_backbone_state(
        "run:20250101-120000",
        "resnet18",
        num_classes=6,
        runs_dir=tmp_path,  # a unique prefix
    )
    assert_same(got, expected)


def test_run_weights_of_another_class_count_load_the_backbone_only(tmp_path):
    expected = fake_run(tmp_path, "20250101-120000-abc123", "resnet18", 6, seed=8)
    got = weights.load_backbone_state(
        "run:20250101-120000-abc123", "resnet18", num_classes=3, runs_dir=tmp_path
    )
    assert "fc.weight" not in got and "fc.bias" not in got
    assert_same(got, {k: v for k, v in expected.items() if not k.startswith("fc.")})


def test_run_of_another_model_or_missing_run_is_refused(tmp_path):
    fake_run(tmp_path, "20250101-120000-abc123", "resnet18", 6, seed=9)
    msg = weights.check_weights("run:20250101-120000-abc123", "resnet34", 6, runs_dir=tmp_path)
    assert msg and "trained 'resnet18', not 'resnet34'" in msg
    msg = weights.check_weights("run:nosuchrun", "resnet18", 6, runs_dir=tmp_path)
    assert msg and "nosuchrun" in msg
    with pytest.raises(WeightsError, match="resnet34"):
        weights.load_backbone_state(
            "run:20250101-120000-abc123", "resnet34", num_classes=6, runs_dir=tmp_path
        )


# ---------------------------------------------------------------------------- builtin


def test_builtin_recipe_change_uses_another_cache_file(monkeypatch):
    monkeypatch.setenv("FINETUNE_BUILTIN_EPOCHS", "1")
    one = weights.cache_file("builtin", "resnet18")
    monkeypatch.setenv("FINETUNE_BUILTIN_EPOCHS", "2")
    assert weights.cache_file("builtin", "resnet18") != one
    monkeypatch.setenv("FINETUNE_BUILTIN_EPOCHS", "two")
    assert "FINETUNE_BUILTIN_EPOCHS" in weights.check_weights("builtin", "resnet18", 6)
