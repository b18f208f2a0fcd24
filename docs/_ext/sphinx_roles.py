"""Griffe extension for the docs build: the docstrings' Sphinx markup as Markdown.

The docstrings cross-reference with Sphinx roles (``:func:`init```, ``:class:`~einmix_jax.EinMix```,
``:data:`COMPILED_APPLIES```), which Markdown would print as they are. This turns each role into
an mkdocstrings cross-reference when it names a public object (resolved from the docstring's public
module: ``init`` in ``einmix_jax._layer`` is ``einmix_jax.init``); a private object it names becomes
an optional one, a link where the site renders that object and plain code where it does not, so
the build never meets a reference it cannot resolve. Attributes are documented as Sphinx reads
them, by ``#:`` comments (on the lines above or at the end of the line); griffe reads only a
string after the assignment, so those comments become the attributes' docstrings here.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import griffe

EXAMPLE = re.compile(r"^(\s*)Example:$", re.M)
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|obj|exc|data|const|type):`(~?)([\w.]+)`")
DOC_COMMENT = re.compile(r"#:\s?(.*)$")
PUBLIC_MODULES = (
    "einmix_jax",
    "einmix_jax.planning",
    "einmix_jax.linen",
    "einmix_jax.nnx",
    "einmix_jax.eqx",
)


def _exists(path: str) -> bool:
    """Whether ``path`` names a public object: one in a public module's ``__all__``."""
    for module in sorted(PUBLIC_MODULES, key=len, reverse=True):
        if path == module or path.startswith(module + "."):
            obj: Any = importlib.import_module(module)
            names = path[len(module) + 1 :].split(".") if path != module else []
            if names and names[0] not in getattr(obj, "__all__", ()):
                return False
            for name in names:
                if not hasattr(obj, name):
                    return False
                obj = getattr(obj, name)
            return True
    return False


def _private_exists(path: str) -> bool:
    """Whether ``path`` names an object of einmix_jax, public or not (a module, then attributes)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return parts[0] == "einmix_jax"
    return False


def _public_module(obj: griffe.Object) -> str:
    """``einmix_jax._core`` -> ``einmix_jax``; ``einmix_jax.nnx`` stays."""
    parts = obj.module.path.split(".")
    while len(parts) > 1 and parts[-1].startswith("_"):
        parts.pop()
    return ".".join(parts)


def convert(text: str, obj: griffe.Object) -> str:
    def replace(match: re.Match) -> str:
        tilde, target = match.groups()
        if target.startswith("."):  # relative to the docstring's package: ``._parse``
            target = obj.package.path + target
        shown = target.rsplit(".", 1)[-1] if tilde else target
        for path in (target, f"{_public_module(obj)}.{target}"):
            if _exists(path):
                return f"[`{shown}`][{path}]"
        for path in (target, f"{obj.module.path}.{target}"):
            if _private_exists(path):
                return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'
        return f"`{shown}`"

    # Google style's singular "Example:" is an admonition to griffe, which would print the
    # doctest prompts as Markdown quotes; "Examples:" renders them as Python console code.
    return EXAMPLE.sub(r"\1Examples:", ROLE.sub(replace, text))


def doc_comment(obj: griffe.Object) -> str | None:
    """An attribute's ``#:`` comment: the comment lines right above it, else one at the end of
    its line."""
    if not obj.is_attribute or obj.lineno is None or not isinstance(obj.filepath, Path):
        return None
    if obj.filepath in obj.lines_collection:  # the source griffe visits (always, when loading)
        lines = obj.lines_collection[obj.filepath]
    else:
        lines = obj.filepath.read_text().splitlines()
    above = []
    for line in reversed(lines[: obj.lineno - 1]):
        match = DOC_COMMENT.match(line.strip())
        if match is None:
            break
        above.insert(0, match[1])
    if above:
        return "\n".join(above)
    match = DOC_COMMENT.search(lines[obj.lineno - 1])
    return match[1] if match else None


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring as its object is created (modules included)."""

    def on_instance(self, *, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is None and (comment := doc_comment(obj)) is not None:
            obj.docstring = griffe.Docstring(
                comment,
                lineno=obj.lineno,
                parent=obj,
                parser=agent.docstring_parser,
                parser_options=agent.docstring_options,
            )
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value, obj)
