"""Every code block of README.md is true: python blocks run in order in one namespace (as a reader
pastes them into one session), pycon blocks run as doctests in that namespace, and the commands at
the top name files that exist."""

from __future__ import annotations

import doctest
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^ *```(\w+)\n(.*?)^ *```$", re.S | re.M)
BLOCKS = [
    (m.group(1), m.group(2), README[: m.start()].count("\n") + 2) for m in BLOCK.finditer(README)
]
CODE = [(lang, text, line) for lang, text, line in BLOCKS if lang in ("python", "pycon")]


@pytest.fixture(scope="module")
def namespace() -> dict:
    return {"__name__": "readme"}


def test_readme_has_code_blocks():
    langs = [lang for lang, _, _ in BLOCKS]
    assert langs.count("python") >= 5 and "pycon" in langs


@pytest.mark.parametrize(("lang", "text", "line"), CODE, ids=[f"line{c[2]}" for c in CODE])
def test_block_runs(lang, text, line, namespace):
    if lang == "python":
        exec(compile(text, f"README.md:{line}", "exec"), namespace)
        return
    test = doctest.DocTestParser().get_doctest(
        text, namespace, f"README.md:{line}", "README.md", line
    )
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append, clear_globs=False)
    assert runner.failures == 0, "".join(out)


def test_first_commands():
    commands = [text.strip() for lang, text, _ in BLOCKS[:2]]
    assert [lang for lang, _, _ in BLOCKS[:2]] == ["bash", "bash"]
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
    for target in re.findall(r"\]\(((?:examples|benchmarks|tests)/[^)#]+)\)", README):
        if target != "benchmarks/RESULTS.md":  # written by benchmarks/bench.py
            assert (ROOT / target).is_file(), target
