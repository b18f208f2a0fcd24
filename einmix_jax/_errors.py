"""The one error type of einmix_jax and the helpers that word its messages."""

from __future__ import annotations

from collections.abc import Iterable

from einops import EinopsError


class EinMixError(EinopsError):
    """Raised for an invalid EinMix configuration, input or parameter.

    A subclass of :class:`einops.EinopsError`, so ``except einops.EinopsError`` catches it.

    Example:
        >>> import einops, jax
        >>> import einmix_jax as em
        >>> try:
        ...     em.init('b t c -> b t d', jax.random.key(0), c=4)
        ... except einops.EinopsError as e:
        ...     print(type(e).__name__)
        EinMixError
    """


def axes_list(axes: Iterable[str]) -> str:
    """Quote axis names for a message, sorted for a stable text.

    Example:
        >>> axes_list({'d', 'c'})
        "'c', 'd'"
    """
    return ", ".join(repr(a) for a in sorted(axes))


def describe_call(pattern: str, weight_shape: str | None, bias_shape: str | None) -> str:
    """The configuration as the user wrote it, appended to every message.

    Example:
        >>> describe_call('b c -> b d', 'c d', None)
        "pattern 'b c -> b d', weight_shape 'c d'"
    """
    text = f"pattern {pattern!r}"
    if weight_shape is not None:
        text += f", weight_shape {weight_shape!r}"
    if bias_shape is not None:
        text += f", bias_shape {bias_shape!r}"
    return text
