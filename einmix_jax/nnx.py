"""Flax NNX layer: ``EinMix`` with torch-style ``**axes``, over the functional core.

The module builds the functional :class:`einmix_jax.EinMix` once, in ``__init__``, keeps it as a
static attribute, stores the core's params as ``nnx.Param`` attributes ``weight`` and ``bias``, and
calls the core. :meth:`EinMix.get_params` / :meth:`EinMix.set_params` convert between the module's
state and the functional params dict.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from . import _core
from ._init import Initializer

__all__ = ["EinMix"]


class EinMix(nnx.Module):
    """EinMix as a Flax NNX module: ``weight`` and ``bias`` are its only ``nnx.Param``s.

    Args:
        pattern: input and output axes, e.g. ``'b t (h c) -> b t (h d)'``.
        weight_shape: the weight's axes, e.g. ``'h c d'``; ``None`` infers them (see
            :func:`einmix_jax.init`).
        bias_shape: the bias's axes, e.g. ``'h d'``; ``None``: no bias (``self.bias`` is ``None``).
        param_dtype: dtype of the stored params.
        dtype: computation dtype; ``None`` promotes the input's and the params' dtypes.
        precision: passed to the contraction.
        preferred_element_type: accumulation dtype passed to ``dot_general``.
        weight_init, bias_init: ``(key, shape, dtype) -> Array``; ``None``: the core's default
            (symmetric uniform, variance ``1/fan_in`` for the weight).
        dot_general: the contraction, ``lax.dot_general`` by default (a hook for quantisation).
        rngs: ``nnx.Rngs``; the params are drawn from its ``params`` stream.
        **axes: axis lengths; every weight and bias axis needs one.

    Example:
        >>> from flax import nnx
        >>> layer = em.nnx.EinMix('b t c -> b t d', weight_shape='c d', bias_shape='d',
        ...                       c=4, d=3, rngs=nnx.Rngs(0))
        >>> layer
        EinMix('b t c -> b t d', weight_shape='c d', bias_shape='d', c=4, d=3)
        >>> layer.weight.shape, layer.bias.shape
        ((4, 3), (3,))
        >>> layer(jnp.ones((2, 5, 4))).shape
        (2, 5, 3)
    """

    def __init__(
        self,
        pattern: str,
        /,
        *,
        weight_shape: str | None = None,
        bias_shape: str | None = None,
        param_dtype: DTypeLike = jnp.float32,
        dtype: DTypeLike | None = None,
        precision: Any = None,
        preferred_element_type: DTypeLike | None = None,
        weight_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        dot_general: _core.DotGeneral = lax.dot_general,
        rngs: nnx.Rngs,
        **axes: int,
    ) -> None:
        #: The functional layer (static: part of the graph definition, not of the state).
        self.functional = _core.layer(
            pattern,
            weight_shape=weight_shape,
            bias_shape=bias_shape,
            param_dtype=param_dtype,
            dtype=dtype,
            precision=precision,
            preferred_element_type=preferred_element_type,
            weight_init=weight_init,
            bias_init=bias_init,
            dot_general=dot_general,
            **axes,
        )
        self.weight = nnx.Param(self.functional.init_weight(rngs.params()))
        self.bias: nnx.Param[jax.Array] | None
        if self.functional.plan.bias_sizes is not None:
            self.bias = nnx.Param(self.functional.init_bias(rngs.params()))
        else:
            self.bias = None

    def __repr__(self) -> str:
        core = self.functional
        plan = core.plan
        args = [repr(plan.pattern), f"weight_shape={plan.weight_shape!r}"]
        if plan.bias_shape is not None:
            args.append(f"bias_shape={plan.bias_shape!r}")
        args += [f"{name}={length}" for name, length in plan.axes]
        if core.dtype is not None:
            args.append(f"dtype={core.dtype.name}")
        if core.param_dtype != jnp.float32:
            args.append(f"param_dtype={core.param_dtype.name}")
        if core.precision is not None:
            args.append(f"precision={core.precision!r}")
        if core.preferred_element_type is not None:
            args.append(f"preferred_element_type={core.preferred_element_type.name}")
        return f"EinMix({', '.join(args)})"

    def get_params(self) -> _core.Params:
        """The functional params dict, as :func:`einmix_jax.init` returns it.

        ``layer(x) == layer.functional(layer.get_params(), x)``.

        Example:
            >>> from flax import nnx
            >>> layer = em.nnx.EinMix('b c -> b d', c=4, d=3, rngs=nnx.Rngs(0))
            >>> jax.tree.map(jnp.shape, layer.get_params())
            {'weight': (4, 3)}
        """
        params = {"weight": self.weight[...]}
        if self.bias is not None:
            params["bias"] = self.bias[...]
        return params

    def set_params(self, params: _core.Params) -> None:
        """Load a functional params dict (from :func:`einmix_jax.init`, linen or einops' converter).

        Example:
            >>> from flax import nnx
            >>> params, _ = em.init('b c -> b d', jax.random.key(1), bias_shape='d', c=4, d=3)
            >>> layer = em.nnx.EinMix('b c -> b d', bias_shape='d', c=4, d=3, rngs=nnx.Rngs(0))
            >>> layer.set_params(params)
            >>> bool((layer.bias[...] == params['bias']).all())
            True
        """
        weight, bias = _core._check_params(self.functional, params)
        _assign(self.weight, weight)
        if self.bias is not None:
            _assign(self.bias, bias)

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Apply the layer: the core's ``apply`` with this module's params."""
        return self.functional(self.get_params(), x)


def _assign(variable: nnx.Param, value: ArrayLike) -> None:
    """Replace a Param's value (``set_value`` from Flax 0.12; ``.value`` before, deprecated since)."""
    if hasattr(variable, "set_value"):
        variable.set_value(jnp.asarray(value))
    else:  # pragma: no cover (Flax < 0.12)
        variable.value = jnp.asarray(value)
