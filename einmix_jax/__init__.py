"""einmix_jax: EinMix -- einsum-shaped linear layers with named axes -- for JAX.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import einmix_jax as em
    >>> params, apply = em.init('b t c -> b t d', jax.random.key(0), bias_shape='d', c=8, d=16)
    >>> apply(params, jnp.ones((2, 3, 8))).shape
    (2, 3, 16)

The Flax layers live in ``einmix_jax.linen`` and ``einmix_jax.nnx``, the Equinox layer in
``einmix_jax.eqx``; Flax and Equinox are imported only when one of them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import planning
from ._describe import Description, describe
from ._errors import EinMixError
from ._init import Initializer
from ._layer import EinMix, init, layer
from ._measure import measured_planning
from ._shard import param_axes, param_shardings, param_specs, with_out_sharding

__version__ = "0.1.0"
__all__ = [
    "Description",
    "EinMix",
    "EinMixError",
    "Initializer",
    "__version__",
    "describe",
    "init",
    "layer",
    "measured_planning",
    "param_axes",
    "param_shardings",
    "param_specs",
    "planning",
    "with_out_sharding",
]

_SUBMODULES = ("eqx", "linen", "nnx")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
