"""Validation of the layer options (dtypes, precision, hooks, ``sizes``), once, at creation.

Every form (functional, linen, NNX, ``describe``) checks its options here, so an invalid one is an
:class:`~einmix_jax.EinMixError` naming the argument when the layer is built, never a ``TypeError``
at the first call. An integer given for an option is read as an axis length that collided with the
option's name, and the message says how to pass it (``sizes={'dtype': 4}``).
"""

from __future__ import annotations

import functools
import keyword
import operator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._errors import OPTION_NAMES, EinMixError


def reject_length(name: str, value: object, context: str) -> None:
    """Raise when an option got an integer: an axis length meant for an axis of that name.

    Example:
        >>> reject_length('dtype', 4, "pattern 'b c -> b dtype'")
        Traceback (most recent call last):
        ...
        einmix_jax._errors.EinMixError: dtype=4 is not a valid dtype option: to give the length of an axis named 'dtype', pass sizes={'dtype': 4} (pattern 'b c -> b dtype')
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        raise EinMixError(
            f"{name}={value!r} is not a valid {name} option: to give the length of an axis named "
            f"{name!r}, pass sizes={{{name!r}: {value!r}}} ({context})"
        )


def float_dtype(name: str, value: Any, context: str, *, optional: bool) -> np.dtype | None:
    """A floating dtype option as a NumPy dtype (``None`` stays ``None`` when ``optional``).

    Integer and bool dtypes are refused: the default inits draw floats, and an integer
    computation would truncate them.

    Example:
        >>> float_dtype('dtype', 'bfloat16', '', optional=True)
        dtype(bfloat16)
    """
    if value is None and optional:
        return None
    reject_length(name, value, context)
    try:
        dtype = None if value is None else np.dtype(jnp.dtype(value))
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        why = "" if dtype is None else ": an integer or bool dtype would truncate the float params"
        got = repr(value) if dtype is None else dtype.name
        raise EinMixError(
            f"{name} must be a floating dtype such as jnp.float32 or 'bfloat16', got {got}{why} "
            f"({context})"
        )
    return dtype


def precision_option(value: Any, context: str) -> Any:
    """``precision`` as ``lax.dot_general`` takes it (a list becomes a tuple), checked by JAX.

    Example:
        >>> precision_option(['highest', 'default'], '')
        ('highest', 'default')
    """
    reject_length("precision", value, context)
    if isinstance(value, list):
        value = tuple(value)
    try:
        hash(value)
        valid = _valid_precision(value)
    except TypeError:
        valid = False
    if not valid:
        raise EinMixError(
            f"precision must be None, a lax.Precision or its name ('highest'), a pair of them, or "
            f"a lax.DotAlgorithmPreset, got {value!r} ({context})"
        )
    return value


@functools.lru_cache(maxsize=64)
def _valid_precision(value: Any) -> bool:
    operand = jax.ShapeDtypeStruct((1,), jnp.float32)

    def dot(a: jax.Array) -> jax.Array:
        return lax.dot_general(a, a, (((0,), (0,)), ((), ())), precision=value)

    try:
        jax.eval_shape(dot, operand)
    except (TypeError, ValueError):
        return False
    return True


def hook_option(name: str, value: Any, context: str, *, optional: bool) -> Any:
    """A callable option (an initializer or ``dot_general``); ``None`` when ``optional``."""
    if value is None and optional:
        return None
    reject_length(name, value, context)
    if not callable(value):
        raise EinMixError(f"{name} must be a callable, got {value!r} ({context})")
    return value


def check_hook_class(cls: Any, dot_general: Any, context: str) -> None:
    """``dot_general_cls``: a callable (a class) that makes the contraction, not beside a hook.

    Example:
        >>> check_hook_class(None, None, '')
    """
    if cls is None:
        return
    reject_length("dot_general_cls", cls, context)
    if not callable(cls):
        raise EinMixError(
            f"dot_general_cls must be a class whose instances are the contraction, like "
            f"flax.linen.fp8_ops.Fp8DirectDotGeneralOp, got {cls!r} ({context})"
        )
    if dot_general is not None:
        raise EinMixError(f"give dot_general or dot_general_cls, not both ({context})")


def check_options(
    context: str,
    *,
    param_dtype: Any,
    dtype: Any,
    precision: Any,
    preferred_element_type: Any,
    dot_general: Any,
    weight_init: Any,
    bias_init: Any,
) -> dict[str, Any]:
    """Check every option of a layer; return them normalised (dtypes as NumPy dtypes).

    Example:
        >>> check_options('', param_dtype='float32', dtype=None, precision=None,
        ...               preferred_element_type=None, dot_general=lax.dot_general,
        ...               weight_init=None, bias_init=None)['param_dtype']
        dtype('float32')
    """
    return {
        "param_dtype": float_dtype("param_dtype", param_dtype, context, optional=False),
        "dtype": float_dtype("dtype", dtype, context, optional=True),
        "precision": precision_option(precision, context),
        "preferred_element_type": float_dtype(
            "preferred_element_type", preferred_element_type, context, optional=True
        ),
        "dot_general": hook_option("dot_general", dot_general, context, optional=True),
        "weight_init": hook_option("weight_init", weight_init, context, optional=True),
        "bias_init": hook_option("bias_init", bias_init, context, optional=True),
    }


def merge_sizes(sizes: Any, axes: Mapping[str, Any], context: str) -> dict[str, Any]:
    """``sizes`` followed by the ``**axes`` keywords, in order; an axis given in both is an error.

    Example:
        >>> merge_sizes({'dtype': 4}, {'c': 3}, '')
        {'dtype': 4, 'c': 3}
    """
    if sizes is None:
        sizes = {}
    reject_length("sizes", sizes, context)
    if not isinstance(sizes, Mapping):
        raise EinMixError(
            f"sizes must be a mapping from axis names to lengths, like {{'c': 64}}, got "
            f"{sizes!r} ({context})"
        )
    bad_keys = [k for k in sizes if not isinstance(k, str)]
    if bad_keys:
        raise EinMixError(
            f"sizes must map axis names (strings) to lengths, got the key {bad_keys[0]!r} "
            f"({context})"
        )
    twice = [a for a in axes if a in sizes]
    if twice:
        raise EinMixError(
            f"axis {twice[0]!r} given twice, in sizes and as a keyword; give it once ({context})"
        )
    return {**sizes, **axes}


def axes_repr(axes: tuple[tuple[str, int], ...]) -> list[str]:
    """Axis lengths as call arguments: ``c=3``, or ``sizes={...}`` if a name can't be a keyword.

    Example:
        >>> axes_repr((('c', 3), ('dtype', 4)))
        ["sizes={'c': 3, 'dtype': 4}"]
    """
    if any(a in OPTION_NAMES or keyword.iskeyword(a) for a, _ in axes):
        return [f"sizes={dict(axes)!r}"]
    return [f"{a}={n}" for a, n in axes]


def options_repr(options: Mapping[str, Any]) -> list[str]:
    """``name=value`` for the options that differ from their defaults, in a pasteable form.

    Dtypes print as their names (``dtype='bfloat16'``); hooks as their ``repr``, so two different
    functions never print the same.

    Example:
        >>> options_repr({'dtype': np.dtype('float16'), 'precision': None})
        ["dtype='float16'"]
    """
    defaults: dict[str, Any] = {"param_dtype": np.dtype("float32")}
    out = []
    for name, value in options.items():
        if value is None or (name in defaults and _same(value, defaults[name])):
            continue
        if isinstance(value, np.dtype):
            out.append(f"{name}={value.name!r}")
        else:
            out.append(f"{name}={value!r}")
    return out


def _same(value: Any, default: np.dtype) -> bool:
    try:
        return bool(np.dtype(jnp.dtype(value)) == default)
    except TypeError:
        return False


def index(value: Any) -> int | None:
    """``value`` as an int if it is one (NumPy integers included, bools excluded), else None.

    Example:
        >>> index(np.int64(3)), index(2.5), index(True)
        (3, None, None)
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
