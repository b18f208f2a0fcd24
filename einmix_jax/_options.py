"""The layer options: one :class:`Options` value, checked once, at creation.

:class:`Options` declares the computation and init options once, as dataclass fields; it
validates them, is what a layer compares and hashes them by and prints them. Every form
(functional, linen, NNX, Equinox) forwards its keyword arguments to it, so an invalid one is an
:class:`~einmix_jax.EinMixError` naming the argument when the layer is built, never a
``TypeError`` at the first call. An integer given for an option is read as an axis length that
collided with the option's name, and the message says how to pass it (``sizes={'dtype': 4}``).
"""

from __future__ import annotations

import dataclasses
import functools
import keyword
import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._errors import EinMixError
from ._init import Initializer
from ._keys import hook_key

DotGeneral = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
    """A layer's computation and init options, checked and normalised (dtypes as NumPy dtypes).

    Equal when they compute and draw the same (a rebuilt ``functools.partial`` hook is equal);
    hashable, so a layer is a static ``jit`` argument.

    Example:
        >>> o = Options.make('', dtype='bfloat16')
        >>> o.dtype, o.param_dtype
        (dtype(bfloat16), dtype('float32'))
        >>> o.repr_args()
        ["dtype='bfloat16'"]
        >>> Options.make('', dtype=4)
        Traceback (most recent call last):
        ...
        einmix_jax._errors.EinMixError: dtype=4 is not a valid dtype option: to give the length of an axis named 'dtype', pass sizes={'dtype': 4} ()
    """

    param_dtype: np.dtype = np.dtype("float32")  # noqa: RUF009 (immutable)
    dtype: np.dtype | None = None
    precision: Any = None
    preferred_element_type: np.dtype | None = None
    #: the contraction; None: ``jax.lax.dot_general``, looked up at each call
    dot_general: DotGeneral | None = None
    weight_init: Initializer | None = None
    bias_init: Initializer | None = None

    @classmethod
    def make(cls, context: str, **values: Any) -> Options:
        """Check every option given (the others keep their defaults); ``context`` ends messages."""
        unknown = sorted(set(values) - set(OPTION_FIELDS))
        if unknown:
            raise EinMixError(f"unknown option {unknown[0]!r} ({context})")
        checked = {name: _CHECKS[name](name, value, context) for name, value in values.items()}
        return cls(**checked)

    def replace(self, **values: Any) -> Options:
        """These options with some replaced (not checked again: for the library's own use)."""
        return dataclasses.replace(self, **values)

    def key(self) -> tuple[Any, ...]:
        """What the options compare and hash by: the values, callables by :func:`hook_key`."""
        return tuple(hook_key(v) if name in _CALLABLE else v for name, v in self.items())

    def items(self) -> list[tuple[str, Any]]:
        """``(name, value)`` of every option, in declaration order."""
        return [(name, getattr(self, name)) for name in OPTION_FIELDS]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Options):
            return NotImplemented
        return self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def repr_args(self, **extra: Any) -> list[str]:
        """``name=value`` for the options that differ from their defaults (and ``extra`` ones
        that are not ``None``), pasteable: dtypes as their names, hooks as their ``repr``."""
        out = []
        for name, value in [*self.items(), *extra.items()]:
            if value is None or (name == "param_dtype" and value == np.dtype("float32")):
                continue
            if isinstance(value, np.dtype):
                out.append(f"{name}={value.name!r}")
            else:
                out.append(f"{name}={value!r}")
        return out

    def __repr__(self) -> str:
        return f"Options({', '.join(self.repr_args())})"


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


def logical_option(value: object, pattern: str) -> Mapping[str, str] | None:
    """The Flax layers' ``logical_axes`` option as a mapping (``True``: ``{}``), or ``None`` (off).

    Example:
        >>> logical_option(True, 'b c -> b d'), logical_option(None, 'b c -> b d')
        ({}, None)
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        return value
    reject_length("logical_axes", value, f"pattern {pattern!r}")
    raise EinMixError(
        f"logical_axes must be None, True or a dict from axis names to logical names, like "
        f"{{'c': 'embed'}}, got {value!r} (pattern {pattern!r})"
    )


def pass_length(axis: str) -> str:
    """How to pass the length of ``axis``: as a keyword, or in ``sizes`` if it is an option name.

    Example:
        >>> pass_length('d'), pass_length('dtype')
        ('d=...', "sizes={'dtype': ...}")
    """
    return f"sizes={{{axis!r}: ...}}" if axis in OPTION_NAMES else f"{axis}=..."


def _dtype_check(optional: bool) -> Callable[[str, Any, str], Any]:
    return lambda name, value, context: float_dtype(name, value, context, optional=optional)


def _hook_check(name: str, value: Any, context: str) -> Any:
    return hook_option(name, value, context, optional=True)


#: The names of :class:`Options`' fields, in declaration order.
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(Options))
_CALLABLE = frozenset({"dot_general", "weight_init", "bias_init"})
_CHECKS: dict[str, Callable[[str, Any, str], Any]] = {
    "param_dtype": _dtype_check(optional=False),
    "dtype": _dtype_check(optional=True),
    "precision": lambda name, value, context: precision_option(value, context),
    "preferred_element_type": _dtype_check(optional=True),
    **{name: _hook_check for name in _CALLABLE},
}

#: Keyword arguments of the layer constructors; an axis of one of these names goes in ``sizes=``.
OPTION_NAMES = frozenset(
    {
        *OPTION_FIELDS,
        "plan",
        "weight_shape",
        "bias_shape",
        "sizes",
        "dot_general_cls",
        "out_sharding",
        "logical_axes",
        "params",
        "rngs",
    }
)
