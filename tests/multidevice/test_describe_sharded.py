"""describe() of a sharded layer shows the lowering that runs under the mesh rules (8 devices)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import einmix_jax as em

from ..cases import grouped_case, record_executed
from .common import make_mesh


@pytest.fixture
def executed(monkeypatch):
    """The lowerings ``execute`` runs."""
    return record_executed(monkeypatch)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_describe_of_a_sharded_layer_matches_what_runs(executed, axis_type):
    layer, params, x, expected = grouped_case(0)
    layer = em.with_out_sharding(layer, {"b": "data"})
    mesh = make_mesh((8,), ("data",), axis_type)
    with jax.set_mesh(mesh):
        y = layer(params, x)
        described = em.describe(layer, x).lowering
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    assert executed == [described]
    assert described.strategy != "block-diagonal"  # the group axis is not merged on a mesh
