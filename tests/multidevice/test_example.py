"""Smoke test: examples/sharded_training.py trains on the (2, 4) mesh and agrees with 1 device."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sharded_training.py"


def test_sharded_training_example(capsys):
    spec = importlib.util.spec_from_file_location("examples_sharded_training", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    # as a user's script runs: optax's Adam needs standard dtype promotion (``decay ** count``)
    with jax.numpy_dtype_promotion("standard"):
        result = module.main(["--steps", "3"])  # asserts sharded == 1 device itself
    printed = capsys.readouterr().out
    assert "mesh: {'data': 2, 'model': 4}" in printed
    assert "sharded and 1-device runs agree" in printed
    assert "collectives in the compiled train step: {'all-reduce':" in printed
    assert "all-gather" not in printed
    params = result["params"]  # after training: still split as the rules say
    for layer, spec in (("channel_up", P(None, "model")), ("channel_down", P("model", None)),
                        ("token_up", P(None, "model")), ("head", P(None, None))):  # fmt: skip
        weight = params[layer]["weight"]
        expected = NamedSharding(weight.sharding.mesh, spec)
        assert weight.sharding.is_equivalent_to(expected, 2), (layer, weight.sharding)
    assert params["channel_up"]["weight"].addressable_shards[0].data.shape == (16, 8)
    for row in ("channel_up.weight    (16, 32)  P(None, 'model')  (16, 8)",):
        assert row in printed
    losses = np.asarray(result["losses"])
    np.testing.assert_allclose(losses, result["single_losses"], rtol=1e-4)
    assert losses[-1] < losses[0]
