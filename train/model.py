"""ResNet 18/34/50/101/152 with torchvision's exact parameter names, and loading of pretrained weights.

The module tree mirrors torchvision's (v1.5 Bottleneck: stride on the 3x3 conv) so that torchvision state
dicts load with strict key checking. `build_model` puts a fresh `num_classes` head on a pretrained
backbone (torchvision's ImageNet weights, a state dict file, or one downloaded from a URL); `param_group_of`
names the block a parameter belongs to, for discriminative learning rates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.remote import io_timeout

log = logging.getLogger(__name__)

PARAM_GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
HEAD_KEYS = ("fc.weight", "fc.bias")
URL_SCHEMES = ("http://", "https://")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the identity (or a 1x1 projection when shape changes)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's "v1.5"), 1x1 expand by 4, plus the identity."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]

ARCHS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's init. Zeroing each block's last BN makes every block start as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if not zero_init_residual:
            return
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features, shape (N, num_features)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def param_group_of(name: str) -> str:
    """The group ("stem", "layer1".."layer4", "fc") of a parameter or buffer name.

    Prefixes added by DDP ("module.") or torch.compile ("_orig_mod.") are ignored.
    """
    bare = name
    while bare.startswith(("module.", "_orig_mod.")):
        bare = bare.split(".", 1)[1]
    top = bare.split(".", 1)[0]
    if top in ("conv1", "bn1"):
        return "stem"
    if top in PARAM_GROUPS:
        return top
    raise ValueError(f"parameter {name!r} belongs to no ResNet group {PARAM_GROUPS}")


def build_model(arch: str, num_classes: int, pretrained: str = "none") -> ResNet:
    """A ResNet with a `num_classes` head; `pretrained` is "none", "imagenet", the http(s) URL of a state
    dict file, or a state dict file path.

    Pretrained weights must fit the backbone exactly; their fc layer is used only when it already has
    `num_classes` outputs, otherwise the head keeps its fresh init.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    block, layers = ARCHS[arch]
    model = ResNet(block, layers, num_classes=num_classes)
    if pretrained == "none":
        return model
    if pretrained == "imagenet":
        state_dict = _imagenet_state_dict(arch)
        source = f"ImageNet weights for {arch}"
    elif pretrained.startswith(URL_SCHEMES):
        state_dict = _url_state_dict(pretrained)
        source = pretrained
    else:
        state_dict = _file_state_dict(pretrained)
        source = pretrained
    _load_pretrained(model, state_dict, arch, source)
    return model


def hub_cache_file(url: str) -> str:
    """Where torch hub caches (and looks for) the file downloaded from `url`: $TORCH_HOME/hub/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _imagenet_state_dict(arch: str) -> Mapping[str, object]:
    """torchvision's default ImageNet weights, from torch hub's cache or downloaded into it."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cache_file = hub_cache_file(weights.url)
    was_cached = os.path.exists(cache_file)
    try:
        with _stall_timeout():
            return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as exc:  # no network (URLError), bad hash, unreadable file: see _file_state_dict
        if was_cached:
            raise UserError(
                f"cached ImageNet weights {cache_file} are unreadable ({_one_line(exc)}); "
                f"delete that file to download it again, or pass --pretrained PATH"
            ) from exc
        raise UserError(
            f"cannot download ImageNet weights for {arch} from {weights.url} ({_one_line(exc)}); "
            f"put that file at {cache_file}, or pass --pretrained PATH"
        ) from exc


@contextlib.contextmanager
def _stall_timeout() -> Iterator[None]:
    """torch hub opens its downloads without a timeout: a server that stops sending would hang the run. The
    default socket timeout bounds every read by the I/O timeout of shard reads (--io-timeout)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(io_timeout())
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _url_state_dict(url: str) -> Mapping[str, object]:
    """A torchvision-format state dict from an http(s) URL, cached the way torchvision caches its own weights:
    torch hub downloads it once into $TORCH_HOME/hub/checkpoints/ (to a temporary name, renamed when complete),
    checks its sha256 when the file name carries a hash prefix as torchvision's do (`name-<hex>.pth`), and
    it is loaded with weights_only=True. A download that is no usable state dict is not kept."""
    cache_file = hub_cache_file(url)
    if not os.path.basename(cache_file):
        raise UserError(f"--pretrained {url}: the URL must end in the weights file's name")
    was_cached = os.path.exists(cache_file)
    try:
        with _stall_timeout():
            obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                     weights_only=True)
        return _unwrap_state_dict(obj, url)
    except Exception as exc:  # HTTPError, URLError, a bad hash, anything torch.load raises, or no state dict
        reason = str(exc) if isinstance(exc, UserError) else f"{url}: {_one_line(exc, sentences=True)}"
        if was_cached:
            raise UserError(f"pretrained weights {reason}; it is the cached file {cache_file}: delete it to "
                            f"download it again") from exc
        if not os.path.exists(cache_file):
            raise UserError(f"cannot download pretrained weights {reason}; put that file at {cache_file}, "
                            f"or pass --pretrained PATH") from exc
        os.remove(cache_file)  # downloaded just now, but unusable: the next run downloads it again
        raise UserError(f"pretrained weights {reason}; the download was not kept") from exc


def _file_state_dict(path: str) -> Mapping[str, object]:
    if not os.path.isfile(path):
        raise UserError(
            f"pretrained weights file {path!r} does not exist (use 'none', 'imagenet' or a path "
            f"to a torchvision-format state dict)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes make the unpickler raise almost any type (IndexError, ...)
        raise UserError(f"cannot read pretrained weights file {path}: {_one_line(exc, sentences=True)}") from exc
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, source: str) -> Mapping[str, object]:
    """The state dict itself, also out of a checkpoint dict that keeps it under "state_dict" or "model"."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{source} does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def _load_pretrained(model: ResNet, state_dict: Mapping[str, object], arch: str, source: str) -> None:
    """Load the backbone with strict key and shape checks, and the head only if its shape fits."""
    own = model.state_dict()
    _check_keys(own, state_dict, arch, source)
    _check_shapes(own, state_dict, arch, source)
    merged = {key: state_dict.get(key, own[key]) for key in own if key not in HEAD_KEYS}
    if _head_fits(own, state_dict):
        merged.update({key: state_dict[key] for key in HEAD_KEYS})
    else:
        log.info("%s: fc head does not fit %d classes; it keeps a fresh init", source, model.fc.out_features)
        merged.update({key: own[key] for key in HEAD_KEYS})
    model.load_state_dict(merged, strict=True)


def _is_optional(key: str) -> bool:
    """Keys a weights file may lack: the head (replaced anyway) and BN's batch counter (absent from
    state dicts saved before PyTorch 0.4.1, such as some of torchvision's ImageNet files)."""
    return key in HEAD_KEYS or key.endswith("num_batches_tracked")


def _check_keys(own: Mapping[str, Tensor], given: Mapping[str, object], arch: str, source: str) -> None:
    missing = [key for key in own if key not in given and not _is_optional(key)]
    unexpected = [key for key in given if key not in own]
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit {arch}: {len(missing)} missing keys{_preview(missing)}, "
            f"{len(unexpected)} unexpected keys{_preview(unexpected)}"
        )


def _check_shapes(own: Mapping[str, Tensor], given: Mapping[str, object], arch: str, source: str) -> None:
    wrong = [
        f"{key} {tuple(given[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in given and key not in HEAD_KEYS and given[key].shape != own[key].shape
    ]
    if wrong:
        raise UserError(f"{source} does not fit {arch}: {len(wrong)} tensors of wrong shape{_preview(wrong)}")


def _head_fits(own: Mapping[str, Tensor], given: Mapping[str, object]) -> bool:
    return all(key in given and given[key].shape == own[key].shape for key in HEAD_KEYS)


def _preview(items: list[str], limit: int = 5) -> str:
    """ " [a, b, ... 3 more]": the first few items of a list that may be long, for a one-line message."""
    if not items:
        return ""
    shown = ", ".join(items[:limit])
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return f" [{shown}{more}]"


def _one_line(exc: BaseException, sentences: bool = False) -> str:
    """The type and first line of an exception; with `sentences`, only its first sentence (torch.load's
    errors go on with advice that does not apply here, such as retrying with weights_only=False)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = lines[0].split(". ", 1)[0].rstrip(".") if sentences else lines[0]
    return f"{type(exc).__name__}: {first}"
