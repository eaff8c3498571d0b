"""timm's models (`--arch timm/NAME` or `timm/NAME.TAG`): built by timm.create_model; input spec from the
model's `pretrained_cfg`; head reset with `reset_classifier`; penultimate features from `forward_features` +
`forward_head(pre_logits=True)`; LR groups from the model's own `group_matcher` (stem, stages in depth order,
head), as timm's layer-decay groups are made. timm is imported on first use only."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from pipeline.errors import UserError, one_line
from train import weights
from train.archs.base import InputSpec, Listed, Source
from train.groups import Group


def _cfg(name: str) -> Any:
    """The pretrained_cfg of `name` (its tag's, or the default tag's)."""
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


def _has_weights(cfg: Any) -> bool:
    return bool(cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file))


def _size_kwargs(name: str, image_size: int) -> dict[str, int]:
    """Models made for one input size (ViT, Swin, ...: `fixed_input_size`) are built for --image-size."""
    cfg = _cfg(name)
    return {"img_size": image_size} if cfg is not None and cfg.fixed_input_size else {}


def _hub_repo(cfg: Any) -> str:
    """The Hugging Face repository of the weights (a pinned revision, `repo@rev`, left off)."""
    return cfg.hf_hub_id.split("@", 1)[0]


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _weights_status(cfg: Any) -> str:
    """"cached", "download" or "none" (see base.Listed)."""
    if not _has_weights(cfg):
        return "none"
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        found = (try_to_load_from_cache(_hub_repo(cfg), file) for file in ("model.safetensors", "pytorch_model.bin"))
        return "cached" if any(isinstance(path, str) for path in found) else "download"
    return "cached" if cfg.url and os.path.exists(weights.hub_cache_file(cfg.url)) else "download"


def _where_to_put(name: str, cfg: Any) -> str:
    """Where timm looks for the weights of `name` offline, for a one-line error."""
    if cfg.hf_hub_id:
        repo = _hub_repo(cfg)
        folder = os.path.join(_hf_cache(), "models--" + repo.replace("/", "--"))
        return (f"where a network exists run `hf download {repo}` and copy its cache folder to {folder}, or pass "
                f"--pretrained with that folder or its model.safetensors")
    if cfg.url:
        return f"put {cfg.url} at {weights.hub_cache_file(cfg.url)}, or pass --pretrained PATH"
    return f"pass --pretrained {cfg.file}" if cfg.file else "pass --pretrained PATH"


class Timm(Source):
    name = "timm"
    prefix = "timm/"
    syntax = "timm/NAME or timm/NAME.TAG (timm's models; tags choose the pretrained weights)"

    def names(self) -> list[str]:
        import timm

        return sorted({*timm.list_models(), *timm.list_pretrained()})

    def knows(self, name: str) -> bool:
        import timm

        if not timm.is_model(name.partition(".")[0]):
            return False
        try:
            _cfg(name)
        except RuntimeError:  # an unknown tag
            return False
        return True

    def fresh(self, name: str, num_classes: int, image_size: int) -> nn.Module:
        import timm

        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                     **_size_kwargs(name, image_size))
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise UserError(f"--arch timm/{name} cannot be built for --image-size {image_size}: "
                            f"{one_line(e, typed=True)}") from None

    def build(self, name: str, num_classes: int, pretrained: str, image_size: int) -> nn.Module:
        if pretrained != "imagenet":
            return super().build(name, num_classes, pretrained, image_size)
        return self._published(name, num_classes, image_size)

    def _published(self, name: str, num_classes: int, image_size: int) -> nn.Module:
        """The model with the tag's published weights, through timm's own hub download and cache, loaded
        strictly with their head, which is then reset for `num_classes`."""
        import timm

        cfg = _cfg(name)
        if not _has_weights(cfg):
            raise UserError(f"timm/{name} has no published weights; use --pretrained none or a weights file")
        try:
            with weights.stall_timeout():
                model = timm.create_model(name, pretrained=True, **_size_kwargs(name, image_size))
        except Exception as e:  # offline (huggingface_hub's LocalEntryNotFoundError, URLError), a bad file
            raise UserError(f"cannot load the published weights of timm/{name} ({one_line(e, typed=True)}); "
                            f"{_where_to_put(name, cfg)}") from e
        model.reset_classifier(num_classes)
        return model

    def adapt(self, model: nn.Module, state_dict: Mapping[str, object]) -> Mapping[str, object]:
        """timm's conversion of the model family's other checkpoint formats (and of a ViT's position
        embedding to this image size): the `checkpoint_filter_fn` of the model's module, when it has one."""
        convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if convert is None:
            return state_dict
        try:
            return convert(dict(state_dict), model)
        except Exception as e:  # a state dict timm cannot convert: name the conversion's complaint
            raise UserError(f"the weights do not fit {type(model).__name__}: {one_line(e, typed=True)}") from e

    def spec(self, name: str, pretrained: str, crop_pct: float) -> InputSpec:
        """With weights, the tag's mean, std, eval crop and interpolation; from scratch, ImageNet statistics
        and --crop-pct. A model built for one size takes multiples of its patch size."""
        cfg = _cfg(name)
        native = cfg.input_size[-1] if cfg is not None else 224
        multiple = _patch(name) if cfg is not None and cfg.fixed_input_size else 1
        if pretrained == "none" or cfg is None:
            return InputSpec(crop_pct=crop_pct, input_size=native, multiple=multiple)
        return InputSpec(mean=tuple(cfg.mean), std=tuple(cfg.std), crop_pct=cfg.crop_pct,
                         interpolation=cfg.interpolation or "bilinear", input_size=native, multiple=multiple)

    def owns(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")

    def head(self, model: nn.Module) -> nn.Module:
        head = model.get_classifier()
        return head[0] if isinstance(head, tuple) else head  # a distilled DeiT's (head, head_dist)

    def head_keys(self, model: nn.Module) -> tuple[str, ...]:
        """Every classifier the model's pretrained_cfg names (a distilled DeiT has two)."""
        names = model.pretrained_cfg.get("classifier") or ()
        prefixes = tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))
        keys = tuple(key for key in model.state_dict() if key.startswith(prefixes))
        return keys or super().head_keys(model)

    def features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        maps = model.forward_features(images)
        return model.forward_head(maps, pre_logits=True).flatten(1), model.forward_head(maps)

    def groups(self, model: nn.Module) -> list[Group]:
        """timm's coarse `group_matcher` groups in depth order: the first is the stem, the last (what no rule
        matched: the classifier, its norm) the head."""
        from timm.models import group_parameters

        try:
            found = group_parameters(model, model.group_matcher(coarse=True))
        except (AttributeError, NotImplementedError):  # a model without a matcher: its top-level children
            return super().groups(model)
        ordered = [tuple(found[key]) for key in sorted(found)]
        last = len(ordered) - 1
        return [("stem" if i == 0 and last else "head" if i == last else f"stage{i}", names)
                for i, names in enumerate(ordered)]

    def listing(self, matches: Callable[[str], bool]) -> list[Listed]:
        import timm

        tags: dict[str, list[str]] = {}
        for full in timm.list_pretrained():
            arch, _, tag = full.partition(".")
            tags.setdefault(arch, []).append(tag)
        rows = []
        for arch in timm.list_models():
            names = [arch, *(f"{arch}.{tag}" for tag in tags.get(arch, []))]
            if not any(matches(name) or matches(self.prefix + name) for name in names):
                continue
            cfg = _cfg(arch)
            note = f"tags: {', '.join(tags[arch])}" if arch in tags else ""
            rows.append(Listed(self.prefix + arch, cfg.input_size[-1] if cfg else 224, _weights_status(cfg), note))
        return rows


@functools.cache
def _patch(name: str) -> int:
    """The patch size of a model made of patches (1 otherwise), read from the model built on the meta device."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=1)
    size = getattr(getattr(model, "patch_embed", None), "patch_size", 1)
    return int(size[0] if isinstance(size, tuple | list) else size)


SOURCE = Timm()
