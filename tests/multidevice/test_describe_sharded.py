"""describe() of a sharded layer shows the lowering that runs under the mesh rules (8 devices)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import einmix_jax as em

from ..cases import record_executed
from ..reference import reference_einmix
from .common import make_mesh

PATTERN, WEIGHT, BIAS = "b t (g c) -> b t (g d)", "g c d", "g d"
SIZES = dict(g=8, c=4, d=3)


@pytest.fixture
def executed(monkeypatch):
    """The lowerings ``execute`` runs."""
    return record_executed(monkeypatch)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_describe_of_a_sharded_layer_matches_what_runs(executed, axis_type):
    rng = np.random.default_rng(0)
    layer = em.with_out_sharding(em.layer(PATTERN, WEIGHT, BIAS, **SIZES), {"b": "data"})
    params = {
        "weight": rng.normal(size=(8, 4, 3)).astype(np.float32),
        "bias": rng.normal(size=(8, 3)).astype(np.float32),
    }
    x = rng.normal(size=(16, 4, 32)).astype(np.float32)
    expected = reference_einmix(
        PATTERN, WEIGHT, BIAS, x, params["weight"], params["bias"], dict(SIZES, b=16, t=4)
    )
    mesh = make_mesh((8,), ("data",), axis_type)
    with jax.set_mesh(mesh):
        y = layer(params, x)
        described = em.describe(layer, x).lowering
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    assert executed == [described]
    assert described.strategy != "block-diagonal"  # the group axis is not merged on a mesh
