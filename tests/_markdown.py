"""Code blocks of Markdown files, run as a reader would: shared by test_readme.py and test_docs.py.

Python blocks of one file run in order in one namespace (as a reader pastes them into one
session); pycon blocks run as doctests in that namespace.
"""

from __future__ import annotations

import dataclasses
import doctest
import re
from pathlib import Path

BLOCK = re.compile(r"^ *```(\w+)\n(.*?)^ *```$", re.S | re.M)
RUNNABLE = ("python", "pycon")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: its language, its text and the line of its first text line."""

    lang: str
    text: str
    line: int
    path: str  # as shown in tracebacks, e.g. 'docs/guides/patterns.md'

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def blocks(path: Path, root: Path) -> list[Block]:
    """Every fenced code block of ``path``, in order (``root``: where displayed paths start)."""
    text = path.read_text()
    name = path.relative_to(root).as_posix()
    return [
        Block(m.group(1), m.group(2), text[: m.start()].count("\n") + 2, name)
        for m in BLOCK.finditer(text)
    ]


def run(block: Block, namespace: dict) -> None:
    """Run a python block (exec) or a pycon block (doctest) in ``namespace``; fail on a mismatch."""
    if block.lang == "python":
        exec(compile(block.text, block.id, "exec"), namespace)
        return
    assert block.lang == "pycon", block.lang
    test = doctest.DocTestParser().get_doctest(
        block.text, namespace, block.id, block.path, block.line
    )
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append, clear_globs=False)
    namespace.update(test.globs)  # DocTest ran in a copy: keep what the block defined
    assert runner.failures == 0, "".join(out)
