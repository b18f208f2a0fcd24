"""The planner, for benchmarks and power users: candidates, their costs, the choice, the steps.

For a layer's plan and an input shape, :func:`candidates` lists every lowering the planner
considers, each with its predicted forward and forward+backward seconds and its regret;
:func:`choose` picks one (for training; :func:`choose_forward`: the forward pass's own pick, which
:func:`split` makes the forward of the lowering where it is clearly faster), :func:`build` turns a
choice into a :class:`Lowering` (a list of :class:`Step`), and :func:`apply_lowering` runs a layer
with it. :func:`lower` is all of it at
once, as ``apply`` does. What a backend costs comes from a :class:`Profile`: :func:`profile` is
the one in use, :func:`load_profile` puts one written by ``benchmarks/calibrate.py`` in use.

Example:
    >>> from einmix_jax import planning
    >>> layer = em.layer('b t c -> b u c', 't u', t=196, u=256)
    >>> choices = planning.candidates(layer.plan, (64, 196, 512),
    ...                               profile=planning.EXAMPLE_PROFILE)
    >>> planning.choose(choices).label
    'w first, batch (b), broadcast over b'
    >>> low = planning.build(layer.plan, (64, 196, 512), planning.choose(choices))
    >>> [step.op for step in low.steps]
    ['transpose', 'reshape', 'broadcast', 'dot_general']
"""

from __future__ import annotations

from ._apply import apply_lowering
from ._lower import (
    SYMBOLIC_LENGTH,
    Choice,
    build,
    candidates,
    choose,
    choose_forward,
    lower,
    regrets,
    split,
    terms,
)
from ._lowering import Lowering, Step
from ._profile import (
    EXAMPLE_PROFILE,
    TERMS,
    UNMEASURED,
    XLA_CPU,
    Profile,
    load_profile,
    profile,
    use_profile,
)

__all__ = [
    "EXAMPLE_PROFILE",
    "SYMBOLIC_LENGTH",
    "TERMS",
    "UNMEASURED",
    "XLA_CPU",
    "Choice",
    "Lowering",
    "Profile",
    "Step",
    "apply_lowering",
    "build",
    "candidates",
    "choose",
    "choose_forward",
    "load_profile",
    "lower",
    "profile",
    "regrets",
    "split",
    "terms",
    "use_profile",
]
