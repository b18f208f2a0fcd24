"""The core, as the frontends (linen, NNX, Equinox) use it: the one module they import.

The functional EinMix is built from modules that each own one thing: :mod:`._parse` (patterns
and shapes), :mod:`._options` (the options), :mod:`._layer` (the layer value, ``layer``,
``init``), :mod:`._params` (params checking), :mod:`._lower` (planning, with a backend
:mod:`._profile`), :mod:`._execute` (running a lowering) and :mod:`._apply` (which lowering a
call runs, and the compiled-apply cache). This module names what a frontend may use of them.

Example:
    >>> layer = layer('b c -> b d', c=2, d=3)
    >>> apply_traced(layer, layer.init(jax.random.key(0)), jnp.ones((4, 2))).shape
    (4, 3)
"""

from __future__ import annotations

from ._apply import _COMPILED, COMPILED_APPLIES, Params, apply_lowering, apply_traced
from ._errors import EinMixError, describe_call
from ._execute import execute, intercepted, tool_active
from ._init import Initializer
from ._layer import EinMix, check_key, init, layer
from ._options import (
    OPTION_FIELDS,
    DotGeneral,
    Options,
    axes_repr,
    check_hook_class,
    logical_option,
    merge_sizes,
    reject_length,
)
from ._params import check_params
from ._parse import (
    ELLIPSIS,
    check_texts,
    infer_weight_shape,
    normalize_axes,
    param_sizes_from_input,
)
from ._shard import param_axes

__all__ = [
    "COMPILED_APPLIES",
    "ELLIPSIS",
    "OPTION_FIELDS",
    "_COMPILED",
    "DotGeneral",
    "EinMix",
    "EinMixError",
    "Initializer",
    "Options",
    "Params",
    "apply_lowering",
    "apply_traced",
    "axes_repr",
    "check_hook_class",
    "check_key",
    "check_params",
    "check_texts",
    "describe_call",
    "execute",
    "infer_weight_shape",
    "init",
    "intercepted",
    "layer",
    "logical_option",
    "merge_sizes",
    "normalize_axes",
    "param_axes",
    "param_sizes_from_input",
    "reject_length",
    "tool_active",
]
