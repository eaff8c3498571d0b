"""The documentation a user reads first: every relative link in README.md and docs/ (and the other READMEs)
leads to a file that exists, and every command of the README's Quick start and Commands blocks parses with
the real command-line parsers (an option renamed in the code but not in the README fails here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from support import ROOT

from pipeline.__main__ import build_parser as pipeline_parser
from train.__main__ import build_parser as train_parser

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "shards" / "README.md",
         ROOT / "bench" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def _links(page: Path) -> list[str]:
    return [target for target, _ in LINK.findall(page.read_text()) if "://" not in target]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = [target for target in _links(page) if not (page.parent / target).exists()]
    assert missing == [], f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_check_sees_links() -> None:
    assert "docs/training.md" in _links(ROOT / "README.md")


def _commands(section: str) -> list[list[str]]:
    """The `python -m pipeline|train ...` lines of the first bash block under `## {section}`, without the
    trailing comment, optional `[...]` groups dropped."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = body.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", re.sub(r"\s*\[[^]]*\]", "", line)).strip()
        words = shlex.split(line)
        if "-m" in words and words[words.index("-m") + 1] in ("pipeline", "train"):
            commands.append(words[words.index("-m") + 1:])
    return commands


@pytest.mark.parametrize("section", ["Quick start", "Commands"])
def test_readme_commands_parse(section: str) -> None:
    commands = _commands(section)
    assert len(commands) >= 6, commands
    for program, *args in commands:
        parser = pipeline_parser() if program == "pipeline" else train_parser()
        try:
            parser.parse_args(args)
        except SystemExit as e:  # argparse's way of refusing
            raise AssertionError(f"README's {section}: python -m {program} {shlex.join(args)} does not parse") from e
