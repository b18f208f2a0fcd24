"""Every code block of README.md is true: python blocks run in order in one namespace (as a reader
pastes them into one session), pycon blocks run as doctests in that namespace, and the commands at
the top name files that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ._markdown import RUNNABLE, blocks, run

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = blocks(ROOT / "README.md", ROOT)
CODE = [b for b in BLOCKS if b.lang in RUNNABLE]


@pytest.fixture(scope="module")
def namespace() -> dict:
    return {"__name__": "readme"}


def test_readme_has_code_blocks():
    langs = [b.lang for b in BLOCKS]
    assert "python" in langs and "pycon" in langs


@pytest.mark.parametrize("block", CODE, ids=[f"line{b.line}" for b in CODE])
def test_block_runs(block, namespace):
    run(block, namespace)


def test_first_commands():
    commands = [b.text.strip() for b in BLOCKS[:2]]
    assert [b.lang for b in BLOCKS[:2]] == ["bash", "bash"]
    assert commands[0] == (
        'python3 -m venv .venv && . .venv/bin/activate && pip install ".[examples]" '
        "&& python examples/mlp_mixer_digits.py"
    )
    assert commands[1].endswith('pip install -e ".[test]" && pytest')
    for command in commands:
        for word in shlex.split(command):
            if word.endswith(".py"):
                assert (ROOT / word).is_file(), word


def test_linked_files_exist():
    targets = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", README)
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        assert (ROOT / target).exists(), target
