"""Pretrained weights from a file (torch or safetensors), a Hugging Face cache folder, or an http(s) URL
(downloaded once into torch hub's cache); loaded with strict key and shape checks except the head. Each model
source (train.archs) brings its own "imagenet" weights and uses the helpers here."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from pipeline.errors import UserError, one_line
from pipeline.remote import io_timeout
from train.integrity import nonfinite_problem

log = logging.getLogger(__name__)

URL_SCHEMES = ("http://", "https://")


def hub_cache_file(url: str) -> str:
    """Where torch hub caches (and looks for) the file downloaded from `url`: $TORCH_HOME/hub/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


@contextlib.contextmanager
def stall_timeout() -> Iterator[None]:
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
        with stall_timeout():
            obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                     weights_only=True)
        return _unwrap_state_dict(obj, url)
    except Exception as exc:  # HTTPError, URLError, a bad hash, anything torch.load raises, or no state dict
        reason = str(exc) if isinstance(exc, UserError) else f"{url}: {one_line(exc, typed=True, sentence=True)}"
        if was_cached:
            raise UserError(f"pretrained weights {reason}; it is the cached file {cache_file}: delete it to "
                            f"download it again") from exc
        if not os.path.exists(cache_file):
            raise UserError(f"cannot download pretrained weights {reason}; put that file at {cache_file}, "
                            f"or pass --pretrained PATH") from exc
        os.remove(cache_file)  # downloaded just now, but unusable: the next run downloads it again
        raise UserError(f"pretrained weights {reason}; the download was not kept") from exc


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")  # in a Hugging Face model folder


def weights_in_folder(folder: str) -> str:
    """The weights file of a Hugging Face model folder: the folder itself, a snapshot of a hub cache folder
    (`models--ORG--NAME`: the one `refs/main` names, else the only one), one line otherwise."""
    candidates = [folder]
    snapshots = os.path.join(folder, "snapshots")
    if os.path.isdir(snapshots):
        ref = os.path.join(folder, "refs", "main")
        main = Path(ref).read_text().strip() if os.path.isfile(ref) else ""
        found = [main] if main else sorted(os.listdir(snapshots))
        candidates += [os.path.join(snapshots, name) for name in found]
    for place in candidates:
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(place, name)):
                return os.path.join(place, name)
    raise UserError(f"pretrained weights folder {folder} holds none of {', '.join(WEIGHT_FILES)} (itself or in "
                    "a hub cache snapshot)")


def _file_state_dict(path: str) -> Mapping[str, object]:
    if os.path.isdir(path):
        path = weights_in_folder(path)
    if not os.path.isfile(path):
        raise UserError(
            f"pretrained weights file {path!r} does not exist (use 'none', 'imagenet' or a path "
            f"to a state dict file: .pth, .bin or .safetensors)"
        )
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes make the unpickler raise almost any type (IndexError, ...)
        raise UserError(f"cannot read pretrained weights file {path}: {one_line(exc, typed=True, sentence=True)}") from exc
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


def state_dict_from(pretrained: str) -> tuple[Mapping[str, object], str]:
    """The state dict `pretrained` names (an http(s) URL, a file or a folder) and how to name its source."""
    if pretrained.startswith(URL_SCHEMES):
        return _url_state_dict(pretrained), pretrained
    return _file_state_dict(pretrained), pretrained


def load_pretrained(model: nn.Module, state_dict: Mapping[str, object], arch: str, source: str,
                    head_keys: tuple[str, ...]) -> None:
    """Load the backbone with strict key and shape checks, and the head (`head_keys`) only if its shape fits."""
    own = model.state_dict()
    _check_keys(own, state_dict, arch, source, head_keys)
    _check_shapes(own, state_dict, arch, source, head_keys)
    merged = {key: state_dict.get(key, own[key]) for key in own if key not in head_keys}
    if all(key in state_dict and state_dict[key].shape == own[key].shape for key in head_keys):
        merged.update({key: state_dict[key] for key in head_keys})
    else:
        log.info("%s: the head does not fit this number of classes; it keeps a fresh init", source)
        merged.update({key: own[key] for key in head_keys})
    require_finite(merged, source)
    model.load_state_dict(merged, strict=True)


def require_finite(state_dict: Mapping[str, Tensor], source: str) -> None:
    """Weights holding NaN or inf make every loss NaN: named here, not later as a training divergence."""
    problem = nonfinite_problem(state_dict)
    if problem:
        raise UserError(f"--pretrained: {source} {problem}: nothing can be trained from them")


def _is_optional(key: str, head_keys: tuple[str, ...]) -> bool:
    """Keys a weights file may lack: the head (replaced anyway) and BN's batch counter (absent from
    state dicts saved before PyTorch 0.4.1, such as some of torchvision's ImageNet files)."""
    return key in head_keys or key.endswith("num_batches_tracked")


def _check_keys(own: Mapping[str, Tensor], given: Mapping[str, object], arch: str, source: str,
                head_keys: tuple[str, ...]) -> None:
    missing = [key for key in own if key not in given and not _is_optional(key, head_keys)]
    unexpected = [key for key in given if key not in own]
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit {arch}: {len(missing)} missing keys{_preview(missing)}, "
            f"{len(unexpected)} unexpected keys{_preview(unexpected)}"
        )


def _check_shapes(own: Mapping[str, Tensor], given: Mapping[str, object], arch: str, source: str,
                  head_keys: tuple[str, ...]) -> None:
    wrong = [
        f"{key} {tuple(given[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in given and key not in head_keys and given[key].shape != own[key].shape
    ]
    if wrong:
        raise UserError(f"{source} does not fit {arch}: {len(wrong)} tensors of wrong shape{_preview(wrong)}")


def _preview(items: list[str], limit: int = 5) -> str:
    """ " [a, b, ... 3 more]": the first few items of a list that may be long, for a one-line message."""
    if not items:
        return ""
    shown = ", ".join(items[:limit])
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return f" [{shown}{more}]"
