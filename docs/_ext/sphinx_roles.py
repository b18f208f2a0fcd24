"""Griffe extension for the docs build: the docstrings' Sphinx roles and examples as Markdown.

The docstrings cross-reference with Sphinx roles (``:func:`init```, ``:class:`~einmix_jax.EinMix```),
which Markdown would print as they are. This turns each role into an mkdocstrings cross-reference
when it names a public object (resolved from the docstring's public module: ``init`` in
``einmix_jax._core`` is ``einmix_jax.init``) and into plain code otherwise, so the build never
meets a reference it cannot resolve.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import griffe

EXAMPLE = re.compile(r"^(\s*)Example:$", re.M)
ROLE = re.compile(r":(?:func|class|meth|attr|mod|obj|exc):`(~?)([\w.]+)`")
PUBLIC_MODULES = ("einmix_jax", "einmix_jax.linen", "einmix_jax.nnx", "einmix_jax.eqx")


def _exists(path: str) -> bool:
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


def _public_module(obj: griffe.Object) -> str:
    """``einmix_jax._core`` -> ``einmix_jax``; ``einmix_jax.nnx`` stays."""
    parts = obj.module.path.split(".")
    while len(parts) > 1 and parts[-1].startswith("_"):
        parts.pop()
    return ".".join(parts)


def convert(text: str, obj: griffe.Object) -> str:
    def replace(match: re.Match) -> str:
        tilde, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        for path in (target, f"{_public_module(obj)}.{target}"):
            if _exists(path):
                return f"[`{shown}`][{path}]"
        return f"`{shown}`"

    # Google style's singular "Example:" is an admonition to griffe, which would print the
    # doctest prompts as Markdown quotes; "Examples:" renders them as Python console code.
    return EXAMPLE.sub(r"\1Examples:", ROLE.sub(replace, text))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring as its object is created (modules included)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value, obj)
