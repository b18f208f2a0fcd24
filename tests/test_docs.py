"""Every code block of the documentation site (docs/) is true.

Each page runs as a reader would run it: its python blocks in order in one namespace, its pycon
blocks as doctests in that namespace (tests/_markdown.py, shared with test_readme.py). The porting
guide from einops' PyTorch layer is also checked against einops' own reading of each layer: the
arrays it converts have the shapes einops' PyTorch layer stores, and the converted params give
the output of einops' PyTorch forward, replayed in numpy.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import einops
import jax
import numpy as np
import pytest
from einops.layers._einmix import _EinmixDebugger
from einops.parsing import ParsedExpression

import einmix_jax as em

from ._markdown import RUNNABLE, blocks, run

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = {page: blocks(page, ROOT) for page in PAGES}
CODE = [b for page in PAGES for b in BLOCKS[page] if b.lang in RUNNABLE]
NAMESPACES: dict[str, dict] = {}  # one per page, filled as its blocks run in order


def test_every_guide_has_code_and_every_block_a_known_language():
    for page, page_blocks in BLOCKS.items():
        for block in page_blocks:
            assert block.lang in (*RUNNABLE, "bash", "text"), block.id
        if page.parent.name in ("guides", "porting") or page.stem == "getting-started":
            assert any(b.lang in RUNNABLE for b in page_blocks), page


def test_api_reference_covers_every_public_name():
    """Each public module (einmix_jax and each lazily imported submodule) has its page in
    docs/api/, listed in mkdocs.yml's nav, rendering every name of its ``__all__``."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for module in ("einmix_jax", *(f"einmix_jax.{name}" for name in em._SUBMODULES)):
        page = DOCS / "api" / f"{module.removeprefix('einmix_jax.')}.md"
        assert page.is_file(), f"{module} has no API page {page.relative_to(ROOT)}"
        assert f": api/{page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"
        rendered = set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
        assert module in rendered, page
        for name in importlib.import_module(module).__all__:
            assert f"{module}.{name}" in rendered, f"{module}.{name} is not in {page.name}"


def test_planning_reference_covers_every_planning_name():
    """``einmix_jax.planning``, public but not a lazily imported submodule, has its own page in
    docs/api/, listed in mkdocs.yml's nav, rendering the module and every name of its
    ``__all__``; the top-level page renders the module too (it is in ``einmix_jax.__all__``)."""
    nav = (ROOT / "mkdocs.yml").read_text()
    page = DOCS / "api" / "planning.md"
    assert page.is_file(), "einmix_jax.planning has no API page docs/api/planning.md"
    assert "einmix_jax.planning: api/planning.md" in nav, "planning.md is not in mkdocs.yml's nav"
    rendered = set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    assert "einmix_jax.planning" in rendered
    missing = [n for n in em.planning.__all__ if f"einmix_jax.planning.{n}" not in rendered]
    assert not missing, f"not in planning.md: {missing}"
    top = set(re.findall(r"^::: ([\w.]+)", (DOCS / "api" / "einmix_jax.md").read_text(), re.M))
    assert "einmix_jax.planning" in top


def test_docs_name_no_removed_or_private_planner_constant():
    """The planner's constants moved into backend profiles (``einmix_jax.planning``): no page
    tells a reader to edit or read ``_lower.SECONDS`` and the like, nor names a private
    planner module's object where the public one exists."""
    stale = re.compile(
        r"\b_lower\.(?:SECONDS|LOOP_MARGIN|_loops_pay_off|candidates|build|choose)\b"
    )
    for page in PAGES:
        found = stale.findall(page.read_text())
        assert not found, f"{page.relative_to(ROOT)} names {found}"


@pytest.fixture(autouse=True)
def _readers_settings():
    """The pages run as a reader runs them: with JAX's default promotion rules, not the strict
    ones the rest of the suite sets in conftest.py (optax's adam, for one, needs the default)."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@pytest.mark.parametrize("block", CODE, ids=[b.id.removeprefix("docs/") for b in CODE])
def test_block_runs(block):
    namespace = NAMESPACES.setdefault(block.path, {"__name__": block.path})
    run(block, namespace)


def _example_input(layer, rng):
    """An input for ``layer``: its lengths where given, 2 for every other axis."""
    sizes = dict(layer.sizes)
    left = ParsedExpression(layer.pattern.split("->")[0])
    shape = [math.prod(sizes.get(a, 2) for a in group) for group in left.composition]
    return rng.normal(size=shape).astype(np.float32)


def _einops_torch_forward(reading, weight, bias, x):
    """einops.layers.torch.EinMix.forward, step by step, in numpy."""
    if reading.pre_reshape_pattern is not None:
        x = einops.rearrange(x, reading.pre_reshape_pattern, **reading.pre_reshape_lengths)
    y = np.einsum(reading.einsum_pattern, x, weight)
    if bias is not None:
        y = y + bias
    if reading.post_reshape_pattern is not None:
        y = einops.rearrange(y, reading.post_reshape_pattern, **reading.post_reshape_lengths)
    return y


def test_torch_porting_guide_matches_einops_torch_layer(monkeypatch):
    conversions = []
    convert = em.linen.from_einops

    def recording(variables, layer):
        converted = convert(variables, layer)
        if "params" in variables:
            conversions.append((variables["params"], layer, converted["params"]))
        else:  # a bare params dict
            conversions.append((variables, layer, converted))
        return converted

    monkeypatch.setattr(em.linen, "from_einops", recording)
    page = DOCS / "porting" / "einops-torch.md"
    namespace = {"__name__": "torch_guide"}
    for block in BLOCKS[page]:
        if block.lang in RUNNABLE:
            run(block, namespace)
    assert len(conversions) >= 2
    rng = np.random.default_rng(0)
    for state_dict, layer, params in conversions:
        reading = _EinmixDebugger(
            layer.pattern, layer.weight_shape, layer.bias_shape, **layer.sizes
        )
        assert list(np.shape(state_dict["weight"])) == reading.saved_weight_shape
        bias = state_dict.get("bias")
        if reading.saved_bias_shape is None:
            assert bias is None
        else:
            assert list(np.shape(bias)) == reading.saved_bias_shape
        x = _example_input(layer, rng)
        expected = _einops_torch_forward(reading, state_dict["weight"], bias, x)
        ours = em.linen.EinMix(layer.pattern, layer.weight_shape, layer.bias_shape, layer.sizes)
        np.testing.assert_allclose(
            ours.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5
        )
