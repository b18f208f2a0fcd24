"""Measured planning (opt-in): time the cost model's best candidates once, keep the fastest.

The cost model of ``_lower`` predicts; on a given machine and XLA version it can be wrong by tens
of percent where candidates are close, and by more on layouts its terms do not see. Inside
:func:`measured_planning`, the functional ``apply`` and the layers instead compile the
cheapest candidate of each kind (x first, weight first, broadcast weight, loop, block-diagonal) and
the next cheapest up to ``top`` for the input's shape and dtype, time their forward and
forward+backward passes on random values drawn on the device (interleaved, ``ROUNDS`` rounds,
medians; nothing moves from the host, so it runs under ``jax.transfer_guard("disallow")``), and
take the one with the lowest measured regret: ``_lower.regrets``, the one rule the cost model
applies to its predictions. The decision is kept per configuration (plan, shape, dtype,
options, backend profile) for the life of the process (at most ``DECISIONS`` of them, least recently used
dropped first), so each is measured once. No lock is held while measuring: a ``dot_general`` hook
may apply other layers, threads planning different configurations measure at the same time (sharing
the machine's cores, so each one's timings are noisier), and callers of one configuration wait for
its one measurement.

It costs compile and timing time once per configuration (two compiles per candidate timed, a few
hundred milliseconds); the choice happens while the caller traces, so under ``jax.jit`` the
context must be active when the function is first traced. The Flax layers are measured too,
except while a tool intercepts the contraction (their weight then goes into it as stored); a
sharded apply (the mesh rules decide there) and a shape with symbolic dimensions
(``jax.export``) fall back to the cost model.

Example:
    >>> layer = em.layer('b t (g c) -> b t (g d)', 'g c d', 'g d', g=8, c=4, d=4)
    >>> params = layer.init(jax.random.key(0))
    >>> with em.measured_planning():
    ...     y = layer(params, jnp.ones((64, 8, 32)))
    >>> y.shape
    (64, 8, 32)
"""

from __future__ import annotations

import contextlib
import contextvars
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._cache import LRU
from ._errors import EinMixError
from ._lower import Choice, Lowering, build, candidates, lower, regrets
from ._parse import Plan
from ._profile import Profile, profile

#: Timing rounds per decision (each times every candidate once, in a rotating order).
ROUNDS = 5
#: Seconds each measurement runs for at least (repeating the call).
MIN_TIME = 0.005
#: The most decisions kept at once.
DECISIONS = 4096

_TOP: contextvars.ContextVar[int | None] = contextvars.ContextVar("einmix_measure", default=None)


@contextlib.contextmanager
def measured_planning(top: int = 4) -> Iterator[None]:
    """Within this context, layers traced choose their lowering by timing (see the module doc).

    Args:
        top: how many candidates to time at least: the cheapest of each kind, then the next
            cheapest up to ``top`` (at least 1).

    Example:
        >>> layer = em.layer('b t c -> b u c', 't u', t=16, u=16)
        >>> with em.measured_planning(top=2):
        ...     layer(layer.init(jax.random.key(0)), jnp.ones((4, 16, 8))).shape
        (4, 16, 8)
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise EinMixError(f"measured_planning(top=...) must be an int >= 1, got {top!r}")
    token = _TOP.set(top)
    try:
        yield
    finally:
        _TOP.reset(token)


def measuring() -> bool:
    """Whether :func:`measured_planning` is active here."""
    return _TOP.get() is not None


#: the label of the candidate measured fastest, per configuration
_DECISIONS: LRU[str] = LRU(DECISIONS)

#: runs one lowering: (lowering, weight, bias or None, x) -> y
Execute = Callable[[Lowering, jax.Array, jax.Array | None, jax.Array], jax.Array]


def plan(
    plan: Plan,
    x_shape: tuple[int, ...],
    dtype: Any,
    weight_dtype: Any,
    has_bias: bool,
    options_key: Any,
    execute: Execute,
    packs: bool | None = None,
    p: Profile | None = None,
) -> Lowering:
    """The lowering to run: the measured choice inside :func:`measured_planning`, else ``lower``.

    ``options_key`` identifies everything else the computation depends on (dtype options and
    the contraction); ``execute`` runs a lowering as the layer does; ``packs`` as for ``lower``;
    ``p`` the profile (default: the one in use).
    """
    p = profile() if p is None else p
    top = _TOP.get()
    if top is None or not all(isinstance(n, int) for n in x_shape):
        return lower(plan, x_shape, packs=packs, profile=p)
    dtypes = (np.dtype(dtype), np.dtype(weight_dtype))
    key = (plan, x_shape, *dtypes, has_bias, options_key, p, top, packs)
    choices = candidates(plan, x_shape, packs=packs, profile=p)

    def measure() -> str:
        ranked = shortlist(choices, top)
        if len(ranked) == 1:
            return ranked[0].label
        # every array it makes comes from a compiled call: concrete, also while the caller traces
        return _fastest(plan, x_shape, dtype, weight_dtype, has_bias, ranked, execute)

    label = _DECISIONS.get_or_add(key, measure)
    return build(plan, x_shape, next(c for c in choices if c.label == label))


def shortlist(choices: list[Choice], top: int) -> list[Choice]:
    """What is timed: the cheapest candidate of each kind (XLA's own, x first, weight first,
    broadcast weight, loop, block-diagonal), then the next cheapest up to ``top`` in all, cheapest first.

    The cost model is least sure between kinds (a loop against a broadcast weight, a packing
    against a batch of small GEMMs), so each kind's best is measured.

    Example:
        >>> from einmix_jax import _lower
        >>> plan = em.layer('b t c -> b u c', 't u', t=196, u=256).plan
        >>> [c.label for c in shortlist(_lower.candidates(plan, (64, 196, 512), True, profile=em.planning.EXAMPLE_PROFILE), 4)]
        ['w first, batch (b), broadcast over b', 'w first', 'w first, loop over b', 'as einsum', 'x first']
    """
    ranked = sorted(choices, key=lambda c: c.cost)  # stable: ties keep their order
    firsts = {id(next(c for c in ranked if c.kind == k)) for k in {c.kind for c in ranked}}
    rest = [c for c in ranked if id(c) not in firsts]
    picked = {id(c) for c in rest[: max(0, top - len(firsts))]} | firsts
    return [c for c in ranked if id(c) in picked]


def _normal(specs: list[tuple[tuple[int, ...], Any]]) -> list[jax.Array]:
    """Standard normal values of these (shape, dtype), drawn on the device.

    Drawn by one compiled call with no arguments: concrete while the caller traces, and nothing
    moves from the host, so the timing works under the caller's ``jax.transfer_guard("disallow")``
    as the caller's own call does.
    """

    def draw() -> list[jax.Array]:
        keys = jax.random.split(jax.random.key(0), len(specs))
        return [
            jax.random.normal(k, shape, jnp.float32).astype(dt)
            for k, (shape, dt) in zip(keys, specs, strict=True)
        ]

    return jax.jit(draw).lower().compile()()


def _timed(f: Callable[..., Any], args: tuple, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def _fastest(
    plan: Plan,
    x_shape: tuple[int, ...],
    dtype: Any,
    weight_dtype: Any,
    has_bias: bool,
    ranked: list[Choice],
    execute: Execute,
) -> str:
    """Time the ranked candidates' forward and forward+backward; the label of the best."""
    lowerings = [build(plan, x_shape, c) for c in ranked]
    specs = [(plan.weight_sizes, weight_dtype), (x_shape, dtype), (lowerings[0].out_shape, dtype)]
    if has_bias and plan.bias_sizes:
        specs.append((plan.bias_sizes, weight_dtype))
    w, x, ct, *bias = _normal(specs)
    b = bias[0] if bias else None
    fns = []
    for low in lowerings:

        def fwd(w: jax.Array, b: Any, x: jax.Array, low: Lowering = low) -> jax.Array:
            return execute(low, w, b, x)

        def loss(w: jax.Array, b: Any, x: jax.Array, ct: jax.Array, fwd: Any = fwd) -> jax.Array:
            return jnp.vdot(fwd(w, b, x), ct)

        f = jax.jit(fwd).lower(w, b, x).compile()
        fb = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(w, b, x, ct).compile()
        jax.block_until_ready((f(w, b, x), fb(w, b, x, ct)))  # warm up
        fns.append((f, fb))
    args = ((w, b, x), (w, b, x, ct))
    reps = [
        tuple(max(1, min(100, round(MIN_TIME / max(_timed(g, a, 1), 1e-6)))) for g, a in pairs)
        for pairs in (zip(fs, args, strict=True) for fs in fns)
    ]
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in ranked]
    for r in range(ROUNDS):
        for i in np.roll(np.arange(len(ranked)), r):
            (f, fb), (n_f, n_fb) = fns[i], reps[i]
            times[i][0].append(_timed(f, args[0], n_f))
            times[i][1].append(_timed(fb, args[1], n_fb))
    medians = [(statistics.median(tf), statistics.median(tfb)) for tf, tfb in times]
    return pick(ranked, medians).label


def pick(ranked: list[Choice], medians: list[tuple[float, float]]) -> Choice:
    """The candidate with the lowest measured regret (``_lower.regrets``, with the profile's
    loop margin); the first of equals.

    Example:
        >>> from einmix_jax import _lower
        >>> plan = em.layer('b t c -> b u c', 't u', t=8, u=8).plan
        >>> a, b = _lower.candidates(plan, (4, 8, 64))[:2]
        >>> pick([a, b], [(1.0, 3.0), (0.95, 3.3)]) is a  # a: 1.0 / 0.95 = 1.05; b: 3.3 / 3.0 = 1.1
        True
    """
    margin = (ranked[0].profile or profile()).loop_margin
    score = regrets(medians, [bool(c.candidate.loop) for c in ranked], margin)
    return ranked[int(np.argmin(score))]
