import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import UserError
from train.optim import (
    GROUPS,
    build_optimizer,
    build_scheduler,
    group_lrs,
    lr_multipliers,
    param_groups,
)

BASE_LR = 1e-3
WD = 0.01


@pytest.fixture(scope="module")
def pristine_model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture
def model(pristine_model) -> nn.Module:
    return copy.deepcopy(pristine_model)  # tests freeze and step; building a ResNet each time is slow


def notebook_groups(model: nn.Module) -> list[dict]:
    return param_groups(model, BASE_LR, WD, lr_multipliers("notebook"))


def test_notebook_multipliers_give_exact_lrs(model):
    expected = {
        "stem": 1e-4,
        "layer1": 1.25e-4,
        "layer2": 1e-3 / 6,
        "layer3": 2.5e-4,
        "layer4": 5e-4,
        "fc": 1e-3,
    }
    lrs = {g["name"]: g["lr"] for g in notebook_groups(model)}
    assert set(lrs) == set(expected) | {f"{name}/no_decay" for name in expected}
    for name, lr in lrs.items():
        assert lr == pytest.approx(expected[name.split("/")[0]], rel=1e-12)


def test_every_trainable_param_in_exactly_one_group(model):
    groups = notebook_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(g["params"] for g in groups)


def test_frozen_params_are_excluded(model):
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    groups = notebook_groups(model)
    names = {g["name"] for g in groups}
    assert not names & {"layer1", "layer1/no_decay"}
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}


def test_weight_decay_only_on_conv_and_linear_weights(model):
    decay_of = {id(p): g["weight_decay"] for g in notebook_groups(model) for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("bn1.weight", "bn1.bias", "layer3.0.bn2.weight", "layer3.0.downsample.1.bias", "fc.bias"):
        assert decay_of[id(named[name])] == 0.0, name
    for name in ("conv1.weight", "layer2.1.conv1.weight", "layer4.0.downsample.0.weight", "fc.weight"):
        assert decay_of[id(named[name])] == WD, name


def test_conv_biases_get_no_decay():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3, bias=True))
    model.add_module("fc", nn.Linear(4, 2))
    groups = param_groups(model, BASE_LR, WD, lr_multipliers("flat"))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"stem", "stem/no_decay", "fc", "fc/no_decay"}
    assert by_name["stem/no_decay"]["params"] == [model.conv1.bias]
    assert by_name["stem/no_decay"]["weight_decay"] == 0.0


def test_lr_multiplier_schemes():
    geometric = lr_multipliers("geometric", decay=0.5)
    assert geometric == pytest.approx(
        {"fc": 1.0, "layer4": 0.5, "layer3": 0.25, "layer2": 0.125, "layer1": 0.0625, "stem": 0.03125}
    )
    assert lr_multipliers("geometric", decay=0.8)["stem"] == pytest.approx(0.8**5)
    assert lr_multipliers("flat") == dict.fromkeys(GROUPS, 1.0)
    with pytest.raises(UserError):
        lr_multipliers("cosine")


def test_foreign_parameter_names_are_refused():
    with pytest.raises(ValueError, match="belongs to no ResNet group"):
        param_groups(nn.Sequential(nn.Linear(2, 2)), BASE_LR, WD, lr_multipliers())


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_each_optimizer_builds_and_steps(model, name):
    optimizer = build_optimizer(name, notebook_groups(model), lr=BASE_LR)
    before = model.fc.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.fc.weight)
    assert {g["name"] for g in optimizer.param_groups} >= set(GROUPS)


def test_sgd_is_nesterov_with_momentum(model):
    optimizer = build_optimizer("sgd", notebook_groups(model), lr=BASE_LR, momentum=0.8)
    assert all(g["nesterov"] and g["momentum"] == 0.8 for g in optimizer.param_groups)


def test_unknown_optimizer_is_user_error(model):
    with pytest.raises(UserError, match="adam.*adamw.*sgd"):
        build_optimizer("lion", notebook_groups(model), lr=BASE_LR)


def run_schedule(optimizer, scheduler, steps: int) -> list[dict[str, float]]:
    history = [group_lrs(optimizer)]
    for _ in range(steps - 1):
        optimizer.step()
        scheduler.step()
        history.append(group_lrs(optimizer))
    return history


def test_one_cycle_per_group(model):
    total, div, final_div = 100, 25.0, 1e4
    optimizer = build_optimizer("adam", notebook_groups(model), lr=BASE_LR)
    max_lrs = group_lrs(optimizer)
    scheduler = build_scheduler(optimizer, total, pct_start=0.3, div_factor=div, final_div_factor=final_div)
    history = run_schedule(optimizer, scheduler, total)
    assert len(history) == total
    for name, max_lr in max_lrs.items():
        lrs = [step[name] for step in history]
        assert lrs[0] == pytest.approx(max_lr / div)
        assert max(lrs) == pytest.approx(max_lr)
        assert lrs.index(max(lrs)) == 29  # pct_start * total - 1
        assert lrs[-1] == pytest.approx(max_lr / (div * final_div))
    optimizer.step()  # the last optimizer step; the scheduler step after it is still allowed
    scheduler.step()
    optimizer.step()
    with pytest.raises(ValueError, match="total steps is 100"):  # one optimizer step too many
        scheduler.step()


def test_rebuilding_scheduler_keeps_peaks(model):
    optimizer = build_optimizer("sgd", notebook_groups(model), lr=BASE_LR)
    build_scheduler(optimizer, 10)
    scheduler = build_scheduler(optimizer, 10, pct_start=0.5)
    history = run_schedule(optimizer, scheduler, 10)
    assert max(step["fc"] for step in history) == pytest.approx(1e-3)
    assert max(step["stem"] for step in history) == pytest.approx(1e-4)


@pytest.mark.parametrize("total", [0, -3])
def test_scheduler_needs_at_least_one_step(model, total):
    optimizer = build_optimizer("adam", notebook_groups(model), lr=BASE_LR)
    with pytest.raises(UserError):
        build_scheduler(optimizer, total)


def test_group_lrs_has_six_names(model):
    optimizer = build_optimizer("adamw", notebook_groups(model), lr=BASE_LR)
    lrs = group_lrs(optimizer)
    assert list(lrs) == list(GROUPS)
    assert lrs["layer4"] == pytest.approx(5e-4)
    assert all(math.isfinite(v) for v in lrs.values())
