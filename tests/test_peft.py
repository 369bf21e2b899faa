"""Parameter-efficient strategies (issue 12): lora (DoRA as its option), loha, lokr and ia3
through peft, and vpt for ViTs. What trains (only the added pieces and the head, the base
bit-identical), merging into a plain torchvision model, the method's own files, resume,
memory, bad input, and peft imported only when a model uses it."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune_core import (
    checkpoints,
    cli,
    data,
    engine,
    estimate,
    models,
    runner,
    store,
    strategies,
    weights,
)
from finetune_core.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["red", "green", "blue", "grey"]


def tiny_data(n_train: int, n_val: int, size: int = 32) -> data.ImageData:
    """Returns 4 learnable classes: noise tinted towards each class's colour."""
    g = torch.Generator().manual_seed(0)
    tints = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [120, 120, 120]])

    def split(n):
        labels = torch.arange(n) % 4
        noise = torch.randint(0, 90, (n, 3, size, size), generator=g)
        images = (tints[labels][:, :, None, None] * 0.7 + noise).clamp(0, 255).to(torch.uint8)
        return data.TensorSplit(images, labels)

    return data.ImageData(CLASSES, split(n_train), split(n_val))


def config(model: str = "resnet18", **kw) -> RunConfig:
    """Returns a tiny run's config: Adam without weight decay, so that a parameter changes
    exactly when it gets a gradient, however small."""
    base = dict(model=model, weights="none", image_size=32, epochs=1, augment="none")
    base.update(optimizer="adam", lr=1e-3, weight_decay=0.0)
    return RunConfig(**{**base, "batch_size": 4, **kw})


def experiment(cfg: RunConfig, n_train=8, n_val=4, parts=None) -> engine.Experiment:
    """Returns an Experiment on tiny data, the model built (and prepared) as a run builds it."""
    torch.manual_seed(cfg.seed)
    parts = parts if parts is not None else engine.build_model(cfg, len(CLASSES))
    spec = models.input_spec(cfg.model)
    return engine.Experiment(cfg, parts, tiny_data(n_train, n_val), torch.device("cpu"), spec)


def inputs(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- what trains, merging

CASES = [
    ("resnet18", {"strategy": "lora"}),
    ("resnet18", {"strategy": "lora", "lora_dora": True}),
    ("resnet18", {"strategy": "loha"}),
    ("resnet18", {"strategy": "lokr"}),
    ("resnet18", {"strategy": "ia3"}),
    ("vit_b_16", {"strategy": "lora"}),
    ("vit_b_16", {"strategy": "loha"}),
    ("vit_b_16", {"strategy": "lokr"}),
    ("vit_b_16", {"strategy": "ia3"}),
    ("vit_b_16", {"strategy": "vpt"}),
    ("vit_b_16", {"strategy": "vpt", "vpt_mode": "shallow"}),
]


@pytest.fixture(scope="module")
def vit_base() -> models.ModelParts:
    """vit_b_16 at 32 px (4 patches), built once: each case prepares a copy."""
    torch.manual_seed(0)
    return models.create_model("vit_b_16", len(CLASSES), image_size=32)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{strategies.label(c[1])}")
def trained(request, vit_base):
    """Trains one case two steps (so that both factors of a low-rank adapter move): returns
    (cfg, parts, plan, state before, state after, summary)."""
    model, fields = request.param
    if model == "vit_b_16":
        cfg = config(model, batch_size=2, **fields)
        parts = copy.deepcopy(vit_base)
        strategies.get(cfg.strategy).prepare(parts, cfg)
        exp = experiment(cfg, n_train=4, n_val=2, parts=parts)
    else:
        cfg = config(model, **fields)
        exp = experiment(cfg)
    before = {k: v.detach().clone() for k, v in exp.parts.model.state_dict().items()}
    plan = strategies.make_plan(cfg, exp.parts)
    summary = engine.fit(exp, feature_cache=False)
    after = exp.parts.model.state_dict()
    return cfg, exp.parts, plan, before, after, summary


def test_each_method_trains_only_its_added_pieces_and_the_head_the_base_bit_identical(trained):
    cfg, parts, plan, before, after, summary = trained
    strategy = strategies.get(cfg.strategy)
    head = {k for k in after if parts.is_head(k)}
    pieces = plan.ever_trained - head
    assert pieces and pieces == strategy.trainable_subset(parts)
    assert head <= plan.ever_trained
    # the plan counts exactly those: per group the pieces in it, and the head
    sizes = {n: p.numel() for n, p in parts.model.named_parameters()}
    assert plan.phases[0].trainable_params == sum(sizes[n] for n in plan.ever_trained)
    assert summary["trainable_params"] == plan.phases[0].trainable_params
    assert not plan.frozen_backbone  # the pieces train inside backbone groups
    assert set(after) == set(before)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    # every weight and buffer of the base (BatchNorm statistics too) is as it was loaded
    assert changed == plan.ever_trained, (
        sorted(changed - plan.ever_trained)[:3],
        sorted(plan.ever_trained - changed)[:3],
    )
    # what a user keeps: the pieces and the head, nothing of the frozen base
    kept = sum(after[k].numel() * after[k].element_size() for k in plan.ever_trained)
    assert summary["stored_bytes"] == kept


def test_merged_model_is_plain_torchvision_with_the_same_logits_where_the_method_merges(trained):
    cfg, parts, plan, before, after, summary = trained
    strategy = strategies.get(cfg.strategy)
    merged = strategy.merged(parts)
    parts.model.eval()
    if cfg.strategy == "vpt":  # prompts are tokens, not weights: the ViT keeps them
        assert merged is None
        files = strategy.pieces_files(parts)
        assert set(files["prompts.safetensors"]) == plan.ever_trained
        assert files["prompts.json"]["vpt_mode"] == cfg.vpt_mode
        return
    plain = models.create_model(cfg.model, len(CLASSES), image_size=32)
    plain.model.load_state_dict(merged.model.state_dict())  # strict: torchvision's keys only
    plain.model.eval()
    with torch.no_grad():
        x = inputs()
        torch.testing.assert_close(plain.model(x), parts.model(x), atol=1e-5, rtol=1e-5)
    assert any(".base_layer." in k for k in parts.model.state_dict())  # parts: not merged


# ---------------------------------------------------------------- a run's files


def test_a_completed_lora_run_keeps_peft_adapter_files_that_peft_loads_and_a_merged_best(
    tmp_path,
):
    from peft import PeftModel

    cfg = config(strategy="lora", epochs=2, batch_size=4)
    run = tmp_path / "run"
    summary = engine.fit(experiment(cfg), checkpoint_dir=run / "checkpoints")
    folder = run / "adapter"
    assert summary["adapter_dir"] == "adapter" and summary["weights_merged"] is True
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert summary["adapter_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    # the adapters and the head, nothing of the frozen base: a few hundred kB of 45 MB
    assert summary["stored_bytes"] <= summary["adapter_bytes"] < summary["stored_bytes"] + 65536
    best = run / "checkpoints" / "best.safetensors"
    assert summary["adapter_bytes"] * 20 < best.stat().st_size
    assert checkpoints.unmerged_pieces(best) is None
    # best.safetensors: torchvision's plain model, the adapters merged in
    torch.manual_seed(cfg.seed)  # the base the run started from (weights none: its seed's)
    base = models.create_model(cfg.model, len(CLASSES), image_size=32)
    plain = copy.deepcopy(base.model)
    plain.load_state_dict(load_file(str(best)))
    # peft's own loader puts the saved adapters and head onto that base
    with_adapters = PeftModel.from_pretrained(base.model, str(folder)).eval()
    with torch.no_grad():
        x = inputs()
        torch.testing.assert_close(with_adapters(x), plain.eval()(x), atol=1e-5, rtol=1e-5)


def test_run_weights_of_an_unfinished_lora_run_or_a_vpt_run_say_why_they_are_not_plain(tmp_path):
    runs = tmp_path / "runs"
    for strategy, model, pieces in (("lora", "resnet18", "adapters"), ("vpt", "vit_b_16", "")):
        cfg = config(model, strategy=strategy)
        run_dir = store.create_run(cfg, runs)
        parts = engine.build_model(cfg, len(CLASSES), device="meta")
        state = {k: torch.zeros(1) for k in parts.model.state_dict()}  # only the keys count
        (run_dir / "checkpoints").mkdir()
        save_file(state, str(run_dir / "checkpoints" / "best.safetensors"))
        message = weights.check_weights(f"run:{run_dir.name}", model, 4, runs_dir=runs)
        if pieces:
            assert "has not completed" in message and "Resume it to the end" in message
        else:
            assert "VPT prompts" in message and "cannot be merged" in message


# ---------------------------------------------------------------- resume, memory


def test_a_resumed_lora_run_continues_exactly_as_an_uninterrupted_one(tmp_path):
    class StopAt(engine.Callback):
        def on_batch_end(self, trainer):
            if trainer.step == 3:
                raise engine.StopTraining

    cfg = config(strategy="lora", epochs=2, augment="flip", lora_dropout=0.1)
    straight = experiment(cfg, n_train=16)
    engine.fit(straight, feature_cache=False)
    stopped = engine.fit(experiment(cfg, n_train=16), [StopAt()], checkpoint_dir=tmp_path)
    assert stopped["state"] == "stopped"
    resumed = experiment(cfg, n_train=16)
    summary = engine.fit(resumed, checkpoint_dir=tmp_path, resume=True, feature_cache=False)
    assert summary["state"] == "completed"
    expected = straight.parts.model.state_dict()
    got = resumed.parts.model.state_dict()
    lora = [k for k in got if ".lora_" in k]
    assert lora and all(torch.equal(got[k], expected[k]) for k in lora)
    assert all(torch.equal(got[k], expected[k]) for k in got if straight.parts.is_head(k))


def test_the_memory_of_a_lora_step_lies_between_linear_probe_and_full():
    peaks = {
        name: estimate.measure(config(strategy=name, batch_size=8).to_dict(), 4)["peak_bytes"]
        for name in ("linear_probe", "lora", "full")
    }
    assert peaks["linear_probe"] < peaks["lora"] < peaks["full"], peaks


# ---------------------------------------------------------------- bad input


TINY = ["--data", "builtin:shapes", "--weights", "none", "--image-size", "32", "--epochs", "1"]


@pytest.mark.parametrize(
    ("args", "flag", "hint"),
    [
        (["--strategy", "vpt"], "--strategy", "resnet18 is not one: choose a ViT"),
        (["--strategy", "lora", "--adapter-rank", "0"], "--adapter-rank", "at least 1"),
        (["--strategy", "loha", "--adapter-rank", "-2"], "--adapter-rank", "at least 1"),
        (
            ["--strategy", "lora", "--adapter-targets", "layer9.*"],
            "--adapter-targets",
            "'layer9.*' matches no layer of resnet18",
        ),
        (
            ["--strategy", "lokr", "--adapter-targets", "layer4.0.conv1", "--adapter-rank", "600"],
            "--adapter-rank",
            "at most 512",
        ),
        (["--strategy", "ia3", "--adapter-groups", "9"], "--adapter-groups", "0 to 5"),
    ],
)
def test_train_rejects_a_method_that_does_not_fit_naming_the_flag_and_creates_no_run(
    tmp_path, capsys, args, flag, hint
):
    runs = tmp_path / "runs"
    code = cli.main(["train", *TINY, "--model", "resnet18", *args, "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {flag}:" in err and hint in err, err
    assert "Traceback" not in err
    assert not runs.exists() or not any(runs.iterdir())


# ---------------------------------------------------------------- peft only when used

_LAZY = """
import sys
from finetune_core import engine, worker
from finetune_core.config import RunConfig
for name in ("full", "linear_probe", "bitfit", "last_n"):
    engine.build_model(RunConfig(strategy=name, weights="none"), 4, device="meta")
print("peft" in sys.modules)
engine.build_model(RunConfig(strategy="lora", weights="none"), 4, device="meta")
print("peft" in sys.modules)
"""


def test_peft_is_imported_only_when_a_model_is_prepared_with_one_of_its_methods():
    out = subprocess.run(
        [sys.executable, "-c", _LAZY], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.split()
    assert out == ["False", "True"]


# ---------------------------------------------------------------- New run


@pytest.fixture
def runs_folder(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(root))
    fd = os.open(root / runner.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # no supervisor starts
    yield root
    os.close(fd)


def test_new_run_draws_each_strategy_option_by_its_kind_once_per_comparison(runs_folder):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.switch_page("pages/1_New_run.py")
    at.run()
    at.multiselect(key="f_compare_set").set_value(["full", "lora", "loha", "vpt deep"]).run()
    assert not at.exception, at.exception
    assert at.checkbox(key="f_lora_dora").value is False
    assert at.number_input(key="f_adapter_rank").value == 8  # lora's and loha's: drawn once
    assert at.text_input(key="f_adapter_targets").value == "auto"
    assert at.number_input(key="f_vpt_tokens").value == 10
    assert "Trainable map · lora: 230k of 11.4M train" in map_titles(at)
    at.checkbox(key="f_lora_dora").check().run()  # DoRA trains each weight's magnitude too
    assert not at.exception, at.exception
    assert "Trainable map · lora: 234k of 11.4M train" in map_titles(at)


def map_titles(at) -> str:
    return "\n".join(
        json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")
    )
