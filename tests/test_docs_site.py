"""The documentation site as CI builds it (`mkdocs build --strict`), read as a reader reads it.

Its API pages carry no raw Sphinx markup, every einmix_jax type their signatures name links to
its definition on the site, and every module doc a docstring sends the reader to is on the site.
(That the docs extra alone installs what the build needs is tests/test_package.py's.)
"""

from __future__ import annotations

import html
import importlib
import inspect
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SIGNATURE = re.compile(r'<div class="doc-signature highlight"><pre>(.*?)</pre>', re.S)
HEADING = re.compile(r'<h\d id="(einmix_jax[\w.]*)" class="doc doc-heading">')


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built site's directory."""
    site = tmp_path_factory.mktemp("site")
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    result = subprocess.run(
        build,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # no banner about a future mkdocs
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return site


@pytest.fixture(scope="module")
def api_pages(site) -> dict[str, str]:
    """The built site's API pages, ``{'einmix_jax': html, 'linen': html, ...}``."""
    pages = {page.parent.name: page.read_text() for page in (site / "api").glob("*/index.html")}
    assert set(pages) == {"einmix_jax", "linen", "nnx", "eqx", "planning"}, sorted(pages)
    return pages


def _resolve(path: str) -> object:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise LookupError(path)


def test_no_raw_sphinx_role(api_pages):
    for name, page in api_pages.items():
        raw = re.findall(r"[\w.]*:(?:py:)?[a-z]+:<code>[^<]*</code>", page)
        assert not raw, f"api/{name}: Sphinx roles printed as they are: {raw}"


def test_every_einmix_jax_type_in_a_signature_links_to_its_definition(api_pages):
    """A name of a private module (``Rules``, ``Params``, ``LayerOrPlan``...) is explained on
    the site: mkdocstrings leaves an unresolved name as a ``<span title="path">``, a resolved one
    as a link. Parameters and fields of a rendered class (``einmix_jax.linen.EinMix.pattern``)
    are not types."""
    unexplained = set()
    for page in api_pages.values():
        for signature in SIGNATURE.findall(page):
            for path in re.findall(r'<span title="(einmix_jax[\w.]*)">', signature):
                parent = path.rsplit(".", 1)[0]
                if isinstance(_resolve(parent), types.ModuleType):
                    unexplained.add(path)
    assert not unexplained, f"named in a signature, defined nowhere on the site: {unexplained}"


def test_every_module_doc_a_docstring_refers_to_is_on_the_site(api_pages):
    """ "(see the module doc)" in an object's docstring sends the reader to its module's."""
    rendered = {path for page in api_pages.values() for path in HEADING.findall(page)}
    missing = set()
    for path in rendered:
        obj = _resolve(path)
        doc = inspect.getdoc(obj) if callable(obj) else None
        if doc and re.search(r"\bmodule doc", doc) and obj.__module__ not in rendered:
            missing.add(f"{path} -> {obj.__module__}")
    assert not missing, f"docstrings refer to a module doc not on the site: {missing}"


def test_signatures_are_wrapped(api_pages):
    """mkdocstrings wraps a long signature over several lines only with a formatter installed
    (ruff or black); without one it is a single line, clipped by the page."""
    texts = [
        html.unescape(re.sub(r"<[^>]+>", "", s)) for s in SIGNATURE.findall(api_pages["einmix_jax"])
    ]
    (signature,) = [
        text for text in texts if text.startswith("init(pattern") or text.startswith("init(\n")
    ]
    lines = signature.strip().splitlines()
    assert len(lines) > 5 and max(map(len, lines)) <= 100, lines


def test_every_page_links_the_repository_and_fetches_nothing(site):
    """The header links pyproject's Source URL; no page loads anything from elsewhere (no web
    fonts, no script, and not the theme's repository widget, whose script asks GitHub's API for
    the star and fork counts)."""
    source = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Source"]
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        text = page.read_text()
        assert f'href="{source}"' in text, f"{page.relative_to(site)} does not link {source}"
        fetched = re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(https?:[^"]*)"', text)
        assert not fetched, f"{page.relative_to(site)} loads {fetched}"
        assert 'data-md-component="source"' not in text, page.relative_to(site)
