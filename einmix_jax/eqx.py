"""Equinox layer: ``EinMix`` as an ``eqx.Module`` over the functional core.

The module builds the functional :class:`einmix_jax.EinMix` once, in ``__init__``, and keeps it as
a static field; ``weight`` and ``bias`` (``None`` without a bias) are its only array leaves, drawn
by the core's initializers. Like ``eqx.nn.Linear`` it does no jit of its own: wrap the model in
``eqx.filter_jit``. :attr:`EinMix.params` and :meth:`EinMix.with_params` convert to and from the
functional params dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from . import _core
from ._core import Initializer, reject_length

__all__ = ["EinMix"]


class EinMix(eqx.Module):
    """EinMix as an Equinox module; ``weight_shape`` and ``bias_shape`` in einops' torch order.

    Args:
        pattern: input and output axes, e.g. ``'b t (h c) -> b t (h d)'``.
        weight_shape: the weight's axes, e.g. ``'h c d'``; ``None`` infers them (see
            :func:`einmix_jax.init`).
        bias_shape: the bias's axes, e.g. ``'h d'``; ``None``: no bias (``self.bias`` is ``None``).
        key: a ``jax.random.key``; the weight and the bias are drawn from it as
            :func:`einmix_jax.init` draws them (same key, same params).
        param_dtype: dtype of the stored params.
        dtype: computation dtype; ``None`` promotes the input's and the params' dtypes.
        precision: passed to the contraction.
        preferred_element_type: accumulation dtype passed to ``dot_general``.
        weight_init: ``(key, shape, dtype) -> Array`` drawing the weight; ``None``: the core's
            default (symmetric uniform, variance ``1/fan_in``).
        bias_init: the same for the bias; ``None``: the core's default.
        dot_general: the contraction (a hook for quantisation); ``None``: ``jax.lax.dot_general``.
        sizes: axis lengths as a mapping, beside or instead of ``**axes`` (for any axis name,
            ``key`` included).
        **axes: axis lengths; every weight and bias axis needs one.

    Example:
        >>> import equinox as eqx
        >>> layer = em.eqx.EinMix('b t c -> b t d', 'c d', 'd', c=4, d=3, key=jax.random.key(0))
        >>> layer
        eqx.EinMix('b t c -> b t d', 'c d', 'd', c=4, d=3, weight=f32[4,3], bias=f32[3])
        >>> layer.weight.shape, layer.bias.shape
        ((4, 3), (3,))
        >>> eqx.filter_jit(layer)(jnp.ones((2, 5, 4))).shape
        (2, 5, 3)
    """

    weight: jax.Array
    bias: jax.Array | None
    #: The functional layer (static: part of the tree's structure, not a leaf).
    functional: _core.EinMix = eqx.field(static=True)

    def __init__(
        self,
        pattern: str,
        /,
        weight_shape: str | None = None,
        bias_shape: str | None = None,
        *,
        key: jax.Array,
        param_dtype: DTypeLike = jnp.float32,
        dtype: DTypeLike | None = None,
        precision: Any = None,
        preferred_element_type: DTypeLike | None = None,
        weight_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        dot_general: _core.DotGeneral | None = None,
        sizes: Mapping[str, int] | None = None,
        **axes: int,
    ) -> None:
        if (
            isinstance(key, int)
            and isinstance(pattern, str)
            and "key" in re.findall(r"\w+", pattern)
        ):
            reject_length("key", key, f"pattern {pattern!r}")  # meant for the axis named 'key'
        self.functional = _core.layer(
            pattern,
            weight_shape,
            bias_shape,
            sizes=sizes,
            param_dtype=param_dtype,
            dtype=dtype,
            precision=precision,
            preferred_element_type=preferred_element_type,
            weight_init=weight_init,
            bias_init=bias_init,
            dot_general=dot_general,
            **axes,
        )
        _core.check_key(key, self.functional.plan.context())
        params = self.functional.init(key)
        self.weight = params["weight"]
        self.bias = params.get("bias")

    def __repr__(self) -> str:
        """The layer's arguments and its arrays, as Equinox prints them (``weight=f32[4,3]``)."""
        arrays = ", ".join(
            f"{name}={eqx.tree_pformat(value)}"
            for name, value in (("weight", self.weight), ("bias", self.bias))
            if value is not None
        )
        return f"eqx.{repr(self.functional)[:-1]}, {arrays})"

    @property
    def params(self) -> _core.Params:
        """The functional params dict, as :func:`einmix_jax.init` returns it.

        ``layer(x) == layer.functional(layer.params, x)``.

        Example:
            >>> layer = em.eqx.EinMix('b c -> b d', c=4, d=3, key=jax.random.key(0))
            >>> jax.tree.map(jnp.shape, layer.params)
            {'weight': (4, 3)}
        """
        params = {"weight": self.weight}
        if self.bias is not None:
            params["bias"] = self.bias
        return params

    def with_params(self, params: _core.Params) -> EinMix:
        """A copy holding ``params`` (from :func:`einmix_jax.init`, linen or NNX), checked.

        Example:
            >>> params, _ = em.init('b c -> b d', jax.random.key(1), bias_shape='d', c=4, d=3)
            >>> layer = em.eqx.EinMix('b c -> b d', 'c d', 'd', c=4, d=3, key=jax.random.key(0))
            >>> bool((layer.with_params(params).bias == params['bias']).all())
            True
        """
        weight, bias = _core.check_params(self.functional, params)
        return eqx.tree_at(
            lambda m: (m.weight, m.bias),
            self,
            (jnp.asarray(weight), None if bias is None else jnp.asarray(bias)),
            is_leaf=lambda v: v is None,
        )

    def __call__(self, x: ArrayLike, *, key: jax.Array | None = None) -> jax.Array:
        """Apply the layer (``key`` is unused, as in ``eqx.nn.Linear``)."""
        return _core.apply_traced(self.functional, self.params, x, weight_as_stored=False)
