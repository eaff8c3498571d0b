import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import UserError
from train.groups import RESNET_GROUPS as GROUPS
from train.optim import (
    build_optimizer,
    build_scheduler,
    group_lrs,
    lr_multipliers,
    param_groups,
    reschedule,
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
    groups = param_groups(model, BASE_LR, WD, lr_multipliers("flat", groups=["stem", "head"]))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"stem", "stem/no_decay", "head", "head/no_decay"}  # the generic fallback's names
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


def test_groups_without_a_multiplier_are_refused():
    with pytest.raises(UserError, match="missing for groups: head"):  # a generic model has no "fc" group
        param_groups(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Linear(2, 2)), BASE_LR, WD, lr_multipliers())


def test_notebook_scheme_for_any_depth():
    """head 1, then 1/2, 1/4, 1/6 ... below it, whatever the number of groups; geometric decays per group."""
    names = ["stem", "stage1", "stage2", "head"]
    assert lr_multipliers("notebook", groups=names) == pytest.approx(
        {"stem": 1 / 6, "stage1": 1 / 4, "stage2": 1 / 2, "head": 1.0})
    assert lr_multipliers("geometric", 0.3, names) == pytest.approx(
        {"stem": 0.3**3, "stage1": 0.3**2, "stage2": 0.3, "head": 1.0})


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_each_optimizer_builds_and_steps(model, name):
    optimizer = build_optimizer(name, notebook_groups(model), lr=BASE_LR)
    before = model.fc.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.fc.weight)
    assert {g["name"] for g in optimizer.param_groups} >= set(GROUPS)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_steps_equal_per_tensor_steps_and_survive_loading_an_unfused_state(model, name):
    """Each optimizer steps with torch's fused kernels, to within float rounding of the per-tensor loop (the
    same gradients at each step: Adam's update of a near-zero gradient flips with its sign, so steps from
    diverging gradients would not compare); the state of an unfused optimizer (an older checkpoint's) loads
    without turning the kernels off."""
    twin = copy.deepcopy(model)
    fused = build_optimizer(name, notebook_groups(model), lr=BASE_LR)
    plain = build_optimizer(name, notebook_groups(twin), lr=BASE_LR)
    for group in plain.param_groups:
        group.update(fused=None, foreach=False)
    torch.manual_seed(1)
    for _ in range(3):
        for ours, theirs in zip(model.parameters(), twin.parameters(), strict=True):
            ours.grad = torch.randn_like(ours)
            theirs.grad = ours.grad.clone()
        fused.step()
        plain.step()
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert all(g["fused"] for g in fused.param_groups)
    fused.load_state_dict(plain.state_dict())
    assert all(g["fused"] for g in fused.param_groups)


def test_sgd_is_nesterov_with_momentum(model):
    optimizer = build_optimizer("sgd", notebook_groups(model), lr=BASE_LR, momentum=0.8)
    assert all(g["nesterov"] and g["momentum"] == 0.8 for g in optimizer.param_groups)


def test_sgd_with_momentum_0_is_plain_sgd_at_every_step(model):
    """--momentum 0 with sgd: no Nesterov (torch refuses it without momentum), and the one-cycle schedule,
    which cycles momentum otherwise, leaves it at 0."""
    optimizer = build_optimizer("sgd", notebook_groups(model), lr=BASE_LR, momentum=0.0)
    assert all(not g["nesterov"] and g["momentum"] == 0.0 for g in optimizer.param_groups)
    scheduler = build_scheduler(optimizer, 10)
    assert {momentum for _, momentum in _positions(optimizer, scheduler, 0, 10)} == {0.0}


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


def _positions(optimizer, scheduler, start: int, end: int) -> list[tuple[float, float]]:
    """(LR, momentum) of group 0 at schedule positions start..end-1 (the scheduler stands at `start`)."""
    def momentum(group):
        return group["betas"][0] if "betas" in group else group["momentum"]

    values = [(optimizer.param_groups[0]["lr"], momentum(optimizer.param_groups[0]))]
    for _ in range(start + 1, end):
        optimizer.step()
        scheduler.step()
        values.append((optimizer.param_groups[0]["lr"], momentum(optimizer.param_groups[0])))
    return values


def _one_cycle(name: str, total: int, steps_done: int):
    weight = nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer(name, [{"params": [weight], "lr": 0.1}], lr=0.1)
    scheduler = build_scheduler(optimizer, total, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    _positions(optimizer, scheduler, 0, steps_done + 1)
    return optimizer, scheduler


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


MIN_LR = 0.1 / 25 / 1e4


@pytest.mark.parametrize("name", ["adam", "sgd"])
@pytest.mark.parametrize("new_total", [150, 70])
def test_reschedule_after_warm_up_anneals_from_the_current_lr(name, new_total):
    optimizer, scheduler = _one_cycle(name, 100, 50)
    reference = _positions(*_one_cycle(name, 100, 50), 50, 100)
    lr_now, momentum_now = optimizer.param_groups[0]["lr"], reference[0][1]
    reschedule(scheduler, new_total)
    values = _positions(optimizer, scheduler, 50, new_total)
    assert values[0] == pytest.approx((lr_now, momentum_now), rel=1e-12)  # continuous at the resumed step
    last = new_total - 1
    for k in (51, 60, (50 + last) // 2, last):
        pct = (k - 50) / (last - 50)
        assert values[k - 50] == pytest.approx((_cos(lr_now, MIN_LR, pct), _cos(momentum_now, 0.95, pct)),
                                               rel=1e-9), k
    assert values[-1][0] == pytest.approx(MIN_LR, rel=1e-9)
    optimizer.step()
    scheduler.step()  # the scheduler step after the run's last optimizer step is allowed; one more is not
    optimizer.step()
    with pytest.raises(ValueError, match=f"total steps is {new_total}"):
        scheduler.step()


def test_reschedule_during_warm_up_keeps_its_end():
    optimizer, scheduler = _one_cycle("adam", 100, 10)
    reschedule(scheduler, 200)
    values = [lr for lr, _ in _positions(optimizer, scheduler, 10, 200)]
    original = [lr for lr, _ in _positions(*_one_cycle("adam", 100, 10), 10, 30)]
    assert values[:20] == pytest.approx(original, rel=1e-12)  # the warm-up is the old one up to position 29
    assert max(values) == pytest.approx(0.1) and values.index(max(values)) == 29 - 10
    assert values[100 - 10] == pytest.approx(_cos(0.1, MIN_LR, (100 - 29) / (199 - 29)), rel=1e-9)
    assert values[-1] == pytest.approx(MIN_LR, rel=1e-9)


def test_reschedule_into_the_warm_up_anneals_from_the_current_lr():
    optimizer, scheduler = _one_cycle("sgd", 100, 10)
    lr_now = optimizer.param_groups[0]["lr"]
    reschedule(scheduler, 20)  # the old warm-up would end at position 29, after the new last step (19)
    values = [lr for lr, _ in _positions(optimizer, scheduler, 10, 20)]
    assert values[0] == lr_now and values[-1] == pytest.approx(MIN_LR, rel=1e-9)
    assert values == sorted(values, reverse=True)


def test_rescheduled_state_survives_a_checkpoint_and_a_second_change():
    optimizer, scheduler = _one_cycle("adam", 100, 50)
    reschedule(scheduler, 150)
    _positions(optimizer, scheduler, 50, 81)  # stands at position 80
    saved_optimizer, saved_scheduler = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())
    expected = _positions(optimizer, scheduler, 80, 150)

    # a later resume: the schedule is built for the configured length, then the checkpoint is loaded over it
    weight = nn.Parameter(torch.zeros(3))
    restored = build_optimizer("adam", [{"params": [weight], "lr": 0.1}], lr=0.1)
    schedule = build_scheduler(restored, 150)
    restored.load_state_dict(saved_optimizer)
    schedule.load_state_dict(saved_scheduler)
    assert _positions(restored, schedule, 80, 150) == expected

    restored.load_state_dict(saved_optimizer)
    schedule.load_state_dict(saved_scheduler)
    lr_now = restored.param_groups[0]["lr"]
    reschedule(schedule, 100)  # changed again: anneals from where it stands
    values = [lr for lr, _ in _positions(restored, schedule, 80, 100)]
    assert values[0] == lr_now and values[-1] == pytest.approx(MIN_LR, rel=1e-9)


def test_reschedule_refuses_a_length_already_passed():
    _, scheduler = _one_cycle("adam", 100, 50)
    with pytest.raises(ValueError, match="already stands at step 50"):
        reschedule(scheduler, 50)
