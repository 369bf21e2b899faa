"""The builtin weights: pretrained once through the engine on the built-in source task,
cached beside torchvision's downloads, shared between processes by a lock."""

import os
import threading
import time

import torch
from safetensors.torch import load_file, save_file
from test_weights import assert_same, finetuned_state

from finetune_core import models, pretrain, weights
from finetune_core.util.locks import FileLock


def builtin_state(model: str, progress=None, **kwargs):
    """What a worker does: trains the builtin weights when they are not cached, loads them."""
    pretrain.ensure_builtin(model, progress)
    return weights.load_backbone_state("builtin", model, progress=progress, **kwargs)


def test_builtin_weights_train_once_then_load_from_the_cache(torch_home, monkeypatch):
    monkeypatch.setenv("FINETUNE_BUILTIN_EPOCHS", "1")
    monkeypatch.setenv("FINETUNE_BUILTIN_MAX_STEPS", "3")  # cheap recipe, its own cache file
    target = weights.cache_file("builtin", "resnet18")
    assert target.parent == torch_home / "hub" / "checkpoints"
    assert target.name.startswith("finetune_builtin_resnet18_") and target.suffix == ".safetensors"
    state, sentence = weights.availability("builtin", "resnet18")
    assert state == "train" and "first use" in sentence
    calls = []
    rng_before = torch.random.get_rng_state()

    got = builtin_state("resnet18", num_classes=6, progress=lambda *a: calls.append(a))
    pretrain = [c for c in calls if c[0] == "pretrain"]
    assert pretrain and "about" in pretrain[0][2] and str(target) in pretrain[0][2]
    assert target.is_file() and not list(target.parent.glob("*.tmp"))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG untouched
    torch.manual_seed(0)  # the engine initialises the source model from the recipe's seed 0
    init = models.create_model("resnet18", 12, image_size=64).model.state_dict()
    assert sorted(got) == sorted(k for k in init if not k.startswith("fc."))  # head dropped
    assert not torch.equal(got["layer4.1.conv2.weight"], init["layer4.1.conv2.weight"])  # trained
    models.create_model("resnet18", 6, backbone_state=got)  # the layout create_model takes

    mtime = target.stat().st_mtime_ns
    calls.clear()
    again = builtin_state("resnet18", num_classes=6, progress=lambda *a: calls.append(a))
    assert not [c for c in calls if c[0] == "pretrain"]
    assert target.stat().st_mtime_ns == mtime
    assert_same(again, got)
    assert weights.availability("builtin", "resnet18")[0] == "cached"


def test_builtin_waits_for_another_trainer_and_reuses_its_file(torch_home, monkeypatch):
    """While another process holds the lock, a second caller waits and then loads its result."""
    monkeypatch.setenv("FINETUNE_BUILTIN_MAX_STEPS", "2")
    target = weights.cache_file("builtin", "resnet18")
    made = {
        k: v for k, v in finetuned_state("resnet18", 10, seed=10).items() if not k.startswith("fc.")
    }
    calls, result = [], {}
    with FileLock(target.with_suffix(".lock")):  # the "other process"
        thread = threading.Thread(
            target=lambda: result.update(
                state=builtin_state("resnet18", progress=lambda *a: calls.append(a))
            )
        )
        thread.start()
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls and "waiting for another process" in calls[0][2]
        save_file(made, str(target))
    thread.join(60)
    assert_same(result["state"], made)
    assert not [c for c in calls if c[0] == "pretrain" and c[1] is not None]
    assert_same(load_file(str(target)), made)
    assert os.path.exists(target)


def test_cached_builtin_weights_say_how_well_they_learned_their_source_task(torch_home):
    target = weights.cache_file("builtin", "resnet18")
    target.parent.mkdir(parents=True)
    made = {k: v for k, v in finetuned_state("resnet18", 12, 1).items() if not k.startswith("fc.")}
    save_file(made, str(target), metadata={"source_val_acc": "0.4233"})
    state, sentence = weights.availability("builtin", "resnet18")
    assert state == "cached"
    assert "val accuracy 42 % on their source task's 12 classes" in sentence
