"""Params checking: a params mapping read into the weight and bias a layer computes with.

Any mapping (dict, ``FrozenDict``, ``nnx.State``) of arrays, Flax boxes (``nn.LogicallyPartitioned``,
``nnx.Param``) or nested lists of numbers is taken; a quantized container (anything else with a
``shape`` and a ``dtype``) is passed on as it is, for the tool that made it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import EinMixError

if TYPE_CHECKING:
    from ._layer import EinMix


def is_array(value: Any) -> bool:
    """A JAX or NumPy array (not a quantized container)."""
    return isinstance(value, (jax.Array, np.ndarray))


def _param_value(value: Any, name: str, ctx: str) -> Any:
    """One param as the core computes with it: Flax's boxes unwrapped, a nested list of numbers
    read as an array; an array, or a quantized container (anything else with a ``shape`` and a
    ``dtype``, a tool's to handle), as it is."""
    if hasattr(value, "unbox"):  # linen's partitioning boxes
        value = value.unbox()
    if type(value).__module__.startswith("flax.") and hasattr(value, "get_value"):
        value = value.get_value()  # an nnx.Variable, e.g. from nnx.state(layer)
    if is_array(value):
        if jnp.issubdtype(value.dtype, jnp.number):
            return value
    elif hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    else:
        try:
            array = jnp.asarray(value)
        except (TypeError, ValueError):
            array = None
        if array is not None and jnp.issubdtype(array.dtype, jnp.number):
            return array
    raise EinMixError(
        f"params[{name!r}] must be an array of numbers (or nested lists of numbers), got "
        f"{short(value)} ({ctx})"
    )


def check_params(layer: EinMix, params: Any) -> tuple[Any, jax.Array | None]:
    """The weight and bias of ``params``: any mapping (dict, ``FrozenDict``, ``nnx.State``) of
    arrays, Flax boxes (``nn.LogicallyPartitioned``, ``nnx.Param``) or lists of numbers.

    Example:
        >>> layer = einmix_jax.layer('b c -> b d', c=2, d=3)
        >>> check_params(layer, {'weight': [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]})[0].shape
        (2, 3)
        >>> check_params(layer, {'weight': jnp.ones((3, 2))})
        Traceback (most recent call last):
        ...
        einmix_jax._errors.EinMixError: params['weight'] has shape (3, 2), expected (2, 3) for 'c d' (pattern 'b c -> b d', weight_shape 'c d')
    """
    ctx = layer.plan.context()
    if not isinstance(params, Mapping) or "weight" not in params:
        raise EinMixError(
            "params must be a mapping (a dict, FrozenDict or nnx.State) with a 'weight' entry, "
            f"got {type(params).__name__} ({ctx})"
        )
    expected = set(layer.param_shapes)
    if set(params) != expected:
        raise EinMixError(
            f"params has entries {sorted(params)}, expected {sorted(expected)} ({ctx})"
        )
    values: dict[str, Any] = {}
    for name, shape in layer.param_shapes.items():
        value = _param_value(params[name], name, ctx)
        got = tuple(value.shape)
        if got != shape:
            axes = layer.plan.weight_shape if name == "weight" else layer.plan.bias_shape
            raise EinMixError(
                f"params[{name!r}] has shape {got}, expected {shape} for {axes!r} ({ctx})"
            )
        values[name] = value
    return values["weight"], values.get("bias")


def entries(layer: EinMix, params: Any) -> Any:
    """``params`` as a dict whose lists of numbers are arrays, ready to pass through ``jit``
    (the entries of an ``nnx.State`` or ``FrozenDict`` are pytrees already)."""
    if not isinstance(params, Mapping):
        return params  # check_params names the problem
    out = dict(params)
    for name, value in out.items():
        if isinstance(value, (list, tuple)):
            try:
                out[name] = jnp.asarray(value)
            except (TypeError, ValueError):
                raise EinMixError(
                    f"params[{name!r}] must be an array of numbers (or nested lists of numbers), "
                    f"got {short(value)} ({layer.plan.context()})"
                ) from None
    return out


def short(value: Any) -> str:
    """``value``'s repr if short, else its type, for a message."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"
