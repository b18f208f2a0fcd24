"""An independent numpy reference for EinMix, following einops' semantics.

It shares no code with ``einmix_jax``: the pattern is tokenised here, the input is rearranged with
``einops.rearrange`` on numpy arrays, contracted with ``np.einsum`` (sublist form with integer ids,
so more than 26 axes work), the bias is broadcast along the output axes it names, and the result is
rearranged to the output composition. Everything is computed in float64.
"""

from __future__ import annotations

import re

import einops
import numpy as np

_TOKEN = re.compile(r"\.\.\.|\(|\)|[^\s()]+")


def tokens(expression: str) -> list[str]:
    """The tokens of one side of a pattern: names, '...', '1', '(' and ')'.

    Example:
        >>> tokens('b (h ...) 1 ()')
        ['b', '(', 'h', '...', ')', '1', '(', ')']
    """
    return _TOKEN.findall(expression)


def flat_axes(expression: str) -> list[str]:
    """The axis names of one side in order, groups flattened, unit axes dropped; '...' kept.

    Example:
        >>> flat_axes('b (h w) 1 () ... c')
        ['b', 'h', 'w', '...', 'c']
    """
    return [t for t in tokens(expression) if t not in ("(", ")", "1")]


def default_weight_shape(pattern: str) -> str:
    """The weight axes inferred when none are given: input-only axes, then output-only axes.

    Example:
        >>> default_weight_shape('b t c -> b t d'), default_weight_shape('b t c -> b u c')
        ('c d', 't u')
    """
    left, right = (flat_axes(side) for side in pattern.split("->"))
    names = [a for a in left if a not in right and a != "..."]
    return " ".join(names + [a for a in right if a not in left and a != "..."])


def reference_einmix(
    pattern: str,
    weight_shape: str | None,
    bias_shape: str | None,
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    axes: dict[str, int],
) -> np.ndarray:
    """EinMix computed with einops.rearrange + np.einsum + a broadcast bias, in float64.

    Example:
        >>> x, w, b = np.ones((2, 3)), np.ones((3, 4)), np.arange(4.0)
        >>> reference_einmix('b c -> b d', 'c d', 'd', x, w, b, {'c': 3, 'd': 4})
        array([[3., 4., 5., 6.],
               [3., 4., 5., 6.]])
    """
    if weight_shape is None:
        weight_shape = default_weight_shape(pattern)
    left, right = pattern.split("->")
    x_axes, out_axes = flat_axes(left), flat_axes(right)
    w_axes = weight_shape.split()

    # 1. the input, rearranged to its flat named axes
    left_lengths = {a: n for a, n in axes.items() if a in x_axes}
    x_flat = einops.rearrange(
        np.asarray(x, np.float64), f"{left} -> {' '.join(x_axes)}", **left_lengths
    )

    # 2. the contraction, with integer ids (np.einsum's sublist form) and Ellipsis
    ids: dict[str, int] = {}
    for a in x_axes + w_axes + out_axes:
        if a != "...":
            ids.setdefault(a, len(ids))

    def sub(names: list[str]) -> list:
        return [Ellipsis if a == "..." else ids[a] for a in names]

    y = np.asarray(
        np.einsum(x_flat, sub(x_axes), np.asarray(weight, np.float64), sub(w_axes), sub(out_axes))
    )

    # 3. the bias, in output order, with unit lengths on the output axes it doesn't name
    if bias_shape is not None:
        b_axes = bias_shape.split()
        b = np.transpose(
            np.asarray(bias, np.float64), [b_axes.index(a) for a in out_axes if a in b_axes]
        )
        after = out_axes[out_axes.index("...") + 1 :] if "..." in out_axes else out_axes
        y = np.asarray(y + b.reshape([axes[a] if a in b_axes else 1 for a in after]))

    # 4. the output composition
    return einops.rearrange(y, f"{' '.join(out_axes)} -> {right}")
