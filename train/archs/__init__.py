"""Model sources as plug-ins: each module here adapts one library of models (see base.Source), and `SOURCES`
is the registry. `--arch PREFIX/NAME` picks a source by its prefix; a bare NAME is looked up in the sources
that take bare names, in order (our ResNets first, so a bare resnet50 is ours and tv/resnet50 torchvision's).
Nothing outside this package knows which library a model comes from."""

from __future__ import annotations

import difflib
import fnmatch

from torch import nn

from train.archs import resnets, timm_zoo, torchvision_zoo
from train.archs.base import Listed, Source

SOURCES: tuple[Source, ...] = (resnets.SOURCE, torchvision_zoo.SOURCE, timm_zoo.SOURCE)
BARE = (resnets.SOURCE, torchvision_zoo.SOURCE)  # the sources a name without a prefix is looked up in


def find(arch: str) -> tuple[Source, str] | None:
    """The source of `arch` and the model's name within it; None when no source has it."""
    for source in SOURCES:
        if source.prefix and arch.startswith(source.prefix):
            name = arch[len(source.prefix):]
            return (source, name) if source.knows(name) else None
    return next(((source, arch) for source in BARE if source.knows(arch)), None)


def closest(text: str, n: int = 3) -> list[str]:
    """The --arch names closest to `text` (of one source when `text` starts with its prefix)."""
    sources = [s for s in SOURCES if s.prefix and text.startswith(s.prefix)] or list(SOURCES)
    bare = next((text[len(s.prefix):] for s in sources if s.prefix and text.startswith(s.prefix)), text)
    candidates = {name: _shown(source, name) for source in reversed(sources) for name in source.names()}
    return [candidates[name] for name in difflib.get_close_matches(bare, list(candidates), n=n)]


def unknown(arch: str) -> str:
    """One line for an --arch no source has, with the closest names."""
    close = closest(arch)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"--arch: invalid choice {arch!r} ({hint}`python -m train models [PATTERN]` lists the models of "
            f"each source)")


def _shown(source: Source, name: str) -> str:
    """How --arch spells a model of `source` (a name the bare sources have, bare)."""
    return name if source in BARE else source.prefix + name


def listing(pattern: str) -> list[tuple[Source, list[Listed]]]:
    """Each source's models whose --arch name matches `pattern` (fnmatch, case-insensitive; a pattern without
    wildcards matches as a substring)."""
    pattern = pattern.lower() if any(c in pattern for c in "*?[") else f"*{pattern.lower()}*"
    return [(source, source.listing(lambda name: fnmatch.fnmatchcase(name.lower(), pattern)))
            for source in SOURCES]


def source_of(model: nn.Module) -> Source | None:
    """The source a built model comes from (None: a model none of them built)."""
    return next((source for source in SOURCES if source.owns(model)), None)
