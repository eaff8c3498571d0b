"""train.model: torchvision parity for every depth, pretrained loading (file, hub cache, offline), groups."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from conftest import FIT_ARGS
from support import ONE_THREAD, assert_one_line_error, free_port, run_cli, serve
from torch import nn

from pipeline.errors import UserError
from train.groups import RESNET_GROUPS as PARAM_GROUPS
from train.model import assign, build_model
from train.resnet import RESNETS as ARCHS
from train.resnet import ResNet


def torchvision_model(arch: str, seed: int = 0, num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Random BN affine params and real running statistics, so that a BN in the wrong place shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
                m.momentum = None  # running stats = plain average over the calibration batch
        model.train()
        model(torch.randn(2, 3, 64, 64, generator=generator))
    model.eval()


@pytest.fixture(scope="module")
def resnet18_weights() -> dict[str, torch.Tensor]:
    return torchvision_model("resnet18", seed=1).state_dict()


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def assert_backbone_equals(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    backbone = [key for key in own if not key.startswith("fc.")]
    assert len(backbone) > 50
    for key in backbone:
        assert torch.equal(own[key], state_dict[key]), key


# --- architecture parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_torchvision(arch: str) -> None:
    generator = torch.Generator().manual_seed(0)
    reference = torchvision_model(arch)
    randomize_batchnorm(reference, generator)
    block, layers = ARCHS[arch]
    with torch.device("meta"):  # no init cost: every tensor comes from the reference below
        ours = ResNet(block, layers, num_classes=1000)

    theirs_sd, ours_sd = reference.state_dict(), ours.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}

    ours.load_state_dict(theirs_sd, strict=True, assign=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two tensors of zeros
    assert (got - expected).abs().max().item() < 1e-5


def test_parity_check_notices_v1_stride_placement() -> None:
    """Negative control: the same weights with the stride on the 1x1 conv (ResNet v1) give other logits."""
    reference = torchvision_model("resnet50")
    randomize_batchnorm(reference, torch.Generator().manual_seed(0))
    ours = build_model("resnet50", num_classes=1000)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    first = ours.layer2[0]
    first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize(("arch", "width"), [("resnet18", 512), ("resnet50", 2048)])
def test_forward_features_feed_the_head(arch: str, width: int) -> None:
    model = build_model(arch, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert model.num_features == width
    assert features.shape == (2, width)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(model.fc(features), logits, rtol=0, atol=1e-6)


def test_init_follows_torchvision() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=7)
    conv = model.layer3[0].conv2  # 256 -> 256, 3x3: fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    assert torch.equal(model.layer1[0].bn3.weight, torch.ones(256))
    assert torch.equal(model.layer1[0].bn3.bias, torch.zeros(256))

    block, layers = ARCHS["resnet50"]
    zeroed = ResNet(block, layers, num_classes=7, zero_init_residual=True)
    assert all(not b.bn3.weight.any() for b in zeroed.layer2)
    assert zeroed.layer2[0].bn2.weight.all()
    block, layers = ARCHS["resnet18"]
    zeroed = ResNet(block, layers, num_classes=7, zero_init_residual=True)
    assert all(not b.bn2.weight.any() for b in zeroed.layer4)
    assert zeroed.layer4[0].bn1.weight.all()


# --- pretrained weights from a file ------------------------------------------------------------------


def test_pretrained_path_loads_backbone_and_replaces_head(tmp_path, resnet18_weights) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_weights, path)
    model = build_model("resnet18", num_classes=7, pretrained=str(path))
    assert_backbone_equals(model, resnet18_weights)
    assert model.fc.weight.shape == (7, 512)
    assert model.fc.bias.shape == (7,)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_pretrained_path_keeps_head_when_it_fits(tmp_path, resnet18_weights, wrapper) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_weights if wrapper is None else {wrapper: resnet18_weights, "epoch": 3}, path)
    model = build_model("resnet18", num_classes=1000, pretrained=str(path))
    assert_backbone_equals(model, resnet18_weights)
    assert torch.equal(model.fc.weight, resnet18_weights["fc.weight"])
    assert torch.equal(model.fc.bias, resnet18_weights["fc.bias"])


def test_pretrained_without_bn_batch_counters(tmp_path, resnet18_weights) -> None:
    """State dicts saved before PyTorch 0.4.1 have no num_batches_tracked; torchvision loads them too."""
    old = {k: v for k, v in resnet18_weights.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(old, path)
    model = build_model("resnet18", num_classes=3, pretrained=str(path))
    assert torch.equal(model.layer2[1].bn2.running_var, old["layer2.1.bn2.running_var"])


def test_other_depth_weights_are_refused(tmp_path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision_model("resnet34").state_dict(), path)
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=5, pretrained=str(path))
    message = assert_one_line(exc)
    assert "0 missing keys" in message
    assert "unexpected keys" in message and "layer1.2.conv1.weight" in message

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_model("resnet18").state_dict(), path)
    with pytest.raises(UserError) as exc:
        build_model("resnet34", num_classes=5, pretrained=str(path))
    message = assert_one_line(exc)
    assert "missing keys" in message and "layer1.2.bn1.bias" in message
    assert "0 unexpected keys" in message


def test_garbage_keys_are_refused(tmp_path) -> None:
    path = tmp_path / "garbage.pth"
    torch.save({f"encoder.block{i}.weight": torch.zeros(3) for i in range(8)}, path)
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=5, pretrained=str(path))
    message = assert_one_line(exc)
    assert "missing keys" in message and "conv1.weight" in message
    assert "8 unexpected keys" in message and "encoder.block0.weight" in message
    assert "3 more" in message  # at most 5 names shown of each list


def test_wrong_shapes_are_refused(tmp_path, resnet18_weights) -> None:
    bad = dict(resnet18_weights)
    bad["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    path = tmp_path / "gray.pth"
    torch.save(bad, path)
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=5, pretrained=str(path))
    assert "conv1.weight (64, 1, 7, 7) vs (64, 3, 7, 7)" in assert_one_line(exc)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_files_are_refused(tmp_path, content) -> None:
    path = tmp_path / "weights.pth"
    if content is None:
        torch.save([torch.zeros(2)], path)  # loads fine but is no state dict
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=5, pretrained=str(path))
    assert str(path) in assert_one_line(exc)


def test_missing_path_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        build_model("resnet18", num_classes=5, pretrained=str(tmp_path / "nope.pth"))


def test_unknown_arch_says_where_the_choices_are() -> None:
    with pytest.raises(UserError) as exc:
        build_model("resnet19", num_classes=5)
    message = assert_one_line(exc)
    assert "'resnet19'" in message and "did you mean resnet18" in message
    assert "python -m train models [PATTERN]` lists" in message


# --- "imagenet": torchvision's weights API through torch hub's cache ---------------------------------


def imagenet_cache_file(torch_home) -> str:
    name = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1]
    return str(torch_home / "hub" / "checkpoints" / name)


def test_imagenet_loads_from_hub_cache(tmp_path, monkeypatch, resnet18_weights) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache_file = imagenet_cache_file(tmp_path)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(resnet18_weights, cache_file)
    model = build_model("resnet18", num_classes=5, pretrained="imagenet")
    assert_backbone_equals(model, resnet18_weights)
    assert model.fc.weight.shape == (5, 512)


def test_imagenet_download_failure_is_one_line_naming_the_cache_file(train_shards, tmp_path) -> None:
    """`fit --pretrained imagenet` with nothing cached and the network out of reach: torchvision's real
    download goes through an https proxy on loopback that refuses the tunnel (so it fails at once and nothing
    leaves this machine); the error names the file to put in the cache."""
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    with serve() as proxy:
        result = run_cli("train", "fit", "--shards", str(train_shards), *FIT_ARGS, "--pretrained", "imagenet",
                         "--run-dir", str(tmp_path / "run"), timeout=120,
                         env={"TORCH_HOME": str(tmp_path), "https_proxy": proxy.url, "HTTPS_PROXY": proxy.url,
                              "no_proxy": "", "NO_PROXY": "", **ONE_THREAD})
    assert proxy.log == [(f"{urlparse(url).hostname}:443", None, 502)]  # the real download was attempted
    cache_file = imagenet_cache_file(tmp_path)
    assert_one_line_error(result, "cannot download ImageNet weights for resnet18", url, cache_file,
                          "--pretrained PATH")
    assert list((tmp_path / "hub" / "checkpoints").iterdir()) == []


def test_imagenet_corrupt_cache_file_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache_file = imagenet_cache_file(tmp_path)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    with open(cache_file, "wb") as f:
        f.write(b"truncated download")
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=5, pretrained="imagenet")
    message = assert_one_line(exc)
    assert cache_file in message and "delete" in message


# --- an http(s) URL: downloaded through torch hub into its cache, like torchvision's own weights -----


def weights_bytes(state_dict: object, tmp_path: Path) -> bytes:
    path = tmp_path / "saved.pth"
    torch.save(state_dict, path)
    return path.read_bytes()


def cached(torch_home: Path) -> list[str]:
    folder = torch_home / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_url_is_downloaded_into_the_hub_cache_once(tmp_path, monkeypatch, resnet18_weights) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    body = weights_bytes(resnet18_weights, tmp_path)
    name = f"resnet18-{hashlib.sha256(body).hexdigest()[:8]}.pth"  # torchvision's naming: hash prefix checked
    with serve(files={f"/weights/{name}": body}) as server:
        url = f"{server.url}/weights/{name}"
        model = build_model("resnet18", num_classes=5, pretrained=url)
        assert_backbone_equals(model, resnet18_weights)
        assert (tmp_path / "home" / "hub" / "checkpoints" / name).read_bytes() == body
        again = build_model("resnet18", num_classes=5, pretrained=url)
        assert server.requests == [f"/weights/{name}"]  # the second build read the cache
    assert_backbone_equals(again, resnet18_weights)


def test_url_failures_are_one_line_and_keep_nothing(tmp_path, monkeypatch, resnet18_weights) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    good = weights_bytes(resnet18_weights, tmp_path)
    files = {"/resnet18-0badc0de.pth": good, "/list.pth": weights_bytes([torch.zeros(2)], tmp_path),
             "/page.pth": b"<html>not found</html>", "/cut.pth": good, "/stall.pth": good}
    monkeypatch.setenv("CUBSTREAM_IO_TIMEOUT", "1")
    with serve(files=files) as server:
        server.cut.add("cut.pth")
        server.stall.add("stall.pth")  # headers and 16 bytes, then silence: the I/O timeout ends the wait
        cases = [("/gone.pth", "HTTP Error 404"), ("/resnet18-0badc0de.pth", "invalid hash value"),
                 ("/list.pth", "does not hold a state dict"), ("/page.pth", "not kept"), ("/cut.pth", "not kept"),
                 ("/stall.pth", "timed out")]
        for path, reason in cases:
            url = f"{server.url}{path}"
            with pytest.raises(UserError) as exc:
                build_model("resnet18", num_classes=5, pretrained=url)
            message = assert_one_line(exc)
            assert url in message and reason in message, message
            assert cached(home) == [], path
    url = f"http://127.0.0.1:{free_port()}/resnet18.pth"  # nothing listens there
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=5, pretrained=url)
    message = assert_one_line(exc)
    assert "cannot download" in message and url in message and str(home / "hub" / "checkpoints") in message


def test_unusable_cached_url_file_says_delete_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    cache_file = tmp_path / "hub" / "checkpoints" / "weights.pth"
    cache_file.write_bytes(b"half a download from an older tool")
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=5, pretrained="http://127.0.0.1:9/weights.pth")
    message = assert_one_line(exc)
    assert str(cache_file) in message and "delete it" in message
    assert cache_file.exists()  # the user's file: not ours to delete


# --- parameter groups --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_param_groups_cover_every_parameter(arch: str) -> None:
    block, layers = ARCHS[arch]
    with torch.device("meta"):  # shapes and names only: no memory, no init cost
        model = ResNet(block, layers, num_classes=7)
    groups = assign(model)
    assert set(groups.values()) == set(PARAM_GROUPS)
    assert groups["conv1.weight"] == "stem"
    assert groups["bn1.weight"] == groups["bn1.bias"] == "stem"
    assert groups["fc.weight"] == groups["fc.bias"] == "fc"
    assert groups["layer1.0.conv1.weight"] == "layer1"
    assert groups["layer4.0.downsample.1.weight"] == "layer4"
    modules = {"stem": [model.conv1, model.bn1], "fc": [model.fc]}
    modules.update({f"layer{i}": [getattr(model, f"layer{i}")] for i in range(1, 5)})
    for group, members in modules.items():
        expected = {id(p) for m in members for p in m.parameters()}
        assert {id(p) for name, p in model.named_parameters() if groups[name] == group} == expected, group


def test_groups_see_through_compile_and_refuse_strangers() -> None:
    with torch.device("meta"):
        model = ResNet(*ARCHS["resnet18"], num_classes=3)
    compiled = torch.compile(model)  # not run: only its "_orig_mod." parameter names matter here
    groups = assign(compiled)
    assert groups["_orig_mod.layer3.1.conv2.weight"] == "layer3" and groups["_orig_mod.fc.bias"] == "fc"
    assert groups["_orig_mod.conv1.weight"] == "stem"
    with torch.device("meta"):
        model.layer5 = nn.Conv2d(2, 2, 1)  # a part the ResNet table does not know
    with pytest.raises(ValueError, match="layer5.weight"):
        assign(model)
