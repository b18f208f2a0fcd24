"""Default initializers and the ``Initializer`` protocol.

The defaults follow einops' EinMix rule: variance ``1 / fan_in`` (LeCun's scaling; einops' docstring
calls it "He"), uniform and symmetric around zero. ``fan_in`` is the product of the weight axes that
are absent from the output, i.e. the number of input elements mixed into one output element.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


class Initializer(Protocol):
    """Any ``jax.nn.initializers``-style function: ``(key, shape, dtype) -> Array``."""

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = ..., /) -> jax.Array:
        """Return an array of ``shape`` and ``dtype`` drawn with ``key``."""
        ...


def symmetric_uniform(bound: float) -> Initializer:
    """Uniform on ``[-bound, bound)``; unlike ``jax.nn.initializers.uniform``, centred on zero.

    Example:
        >>> w = symmetric_uniform(0.5)(jax.random.key(0), (1000,), jnp.float32)
        >>> bool(w.min() < 0 < w.max()), bool(abs(w).max() <= 0.5)
        (True, True)
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def lecun_uniform_weight(fan_in: int) -> Initializer:
    """einops' weight rule: ``U(-sqrt(3 / fan_in), +sqrt(3 / fan_in))``, variance ``1 / fan_in``.

    Example:
        >>> w = lecun_uniform_weight(12)(jax.random.key(0), (12, 4000), jnp.float32)
        >>> round(float(w.var() * 12), 1)
        1.0
    """
    return symmetric_uniform(math.sqrt(3.0 / fan_in))


def lecun_uniform_bias(fan_in: int) -> Initializer:
    """einops' bias rule: ``U(-sqrt(1 / fan_in), +sqrt(1 / fan_in))``.

    Example:
        >>> b = lecun_uniform_bias(4)(jax.random.key(0), (1000,), jnp.float32)
        >>> bool(abs(b).max() <= 0.5)
        True
    """
    return symmetric_uniform(math.sqrt(1.0 / fan_in))
