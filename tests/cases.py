"""What the tests share: the configurations every form of the layer runs (the functional core,
linen, NNX, Equinox, export, qwix), the partitioning cases of the Flax layers, and random inputs."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

import einmix_jax as em

from .reference import reference_einmix


def normal(shape: tuple[int, ...], seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Standard normal values of ``shape`` drawn by numpy's generator from ``seed``."""
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def jax_normal(shape: tuple[int, ...], seed: int = 1) -> jax.Array:
    """Standard normal values of ``shape`` drawn by ``jax.random`` from ``jax.random.key(seed)``."""
    return jax.random.normal(jax.random.key(seed), shape)


@contextlib.contextmanager
def departing() -> Iterator[None]:
    """Plan on the cost model alone (``depart_margin=0``): a form other than XLA's own lowering
    wherever it is predicted faster at all, so test-sized shapes reach the departures."""
    old = em.planning.use_profile(
        dataclasses.replace(em.planning.profile(), name="departing", depart_margin=0.0)
    )
    try:
        yield
    finally:
        em.planning.use_profile(old)


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration: ``em.init(pattern, key, weight_shape=, bias_shape=, **axes)`` on x."""

    pattern: str
    weight_shape: str | None
    bias_shape: str | None
    axes: dict[str, int]
    x_shape: tuple[int, ...]

    def init(self, key: jax.Array, **options) -> tuple[dict, em.EinMix]:
        return em.init(
            self.pattern,
            key,
            weight_shape=self.weight_shape,
            bias_shape=self.bias_shape,
            **options,
            **self.axes,
        )

    def reference(self, params: dict, x: np.ndarray) -> np.ndarray:
        bias = params.get("bias")
        return reference_einmix(
            self.pattern,
            self.weight_shape,
            self.bias_shape,
            np.asarray(x),
            np.asarray(params["weight"], np.float64),
            None if bias is None else np.asarray(bias, np.float64),
            self.axes,
        )


def _many_axes_case() -> Case:
    """28 distinct axes: 14 batch axes, 7 contracted, 7 produced (einops' letters stop at 26)."""
    batch = [f"b{i}" for i in range(14)]
    ins = [f"k{i}" for i in range(7)]
    outs = [f"o{i}" for i in range(7)]
    axes = {a: 2 for a in ins + outs}
    axes.update({"b3": 2, "b10": 2})  # batch axes may be given; the rest are read off x
    x_shape = tuple(2 if a in ("b3", "b10") else 1 for a in batch) + (2,) * 7
    pattern = f"{' '.join(batch)} {' '.join(ins)} -> {' '.join(batch)} ({' '.join(outs)})"
    return Case(pattern, " ".join(ins + outs), " ".join(outs[::-1]), axes, x_shape)


CASES = {
    "plain linear": Case("b t c -> b t d", "c d", "d", dict(c=4, d=3), (2, 3, 4)),
    "inferred weight": Case("b t c -> b t d", None, "d", dict(c=4, d=3), (2, 3, 4)),
    "weight order d c": Case("b c -> b d", "d c", None, dict(c=4, d=3), (2, 4)),
    "token mixing": Case("b t c -> b u c", "t u", "u", dict(t=3, u=5), (2, 3, 4)),
    "token mixing, no bias": Case("b t c -> b u c", None, None, dict(t=3, u=5), (2, 3, 4)),
    "mix the first axis": Case("h w c -> hout w c", "h hout", "hout", dict(h=3, hout=2), (3, 2, 4)),
    "multi-head": Case("b t (h c) -> b t (h d)", "h c d", "h d", dict(h=2, c=3, d=4), (2, 3, 6)),
    "multi-head, head axis separate": Case(
        "b t (h c) -> b h t d", "h c d", "d", dict(h=2, c=3, d=4), (2, 3, 6)
    ),
    "heads first in x, last in output": Case(
        "h b c -> b d h", "c h d", "h", dict(h=2, c=3, d=4), (2, 5, 3)
    ),
    "composition on both sides": Case(
        "b (t g) c -> (b t) (g d)", "g c d", "g d", dict(g=2, c=3, d=2), (2, 6, 3)
    ),
    "composed batch on the left": Case("(b t) c -> b t d", "c d", "d", dict(t=3, c=4, d=2), (6, 4)),
    "patch embedding": Case(
        "b (h ph) (w pw) c -> b (h w) d",
        "ph pw c d",
        "d",
        dict(ph=2, pw=2, c=3, d=5),
        (2, 4, 6, 3),
    ),
    "ellipsis with bias": Case("b ... c -> b ... d", "c d", "d", dict(c=4, d=3), (2, 3, 2, 4)),
    "leading ellipsis": Case("... c -> ... d", "c d", "d", dict(c=4, d=3), (3, 2, 4)),
    "empty ellipsis": Case("b ... c -> b ... d", "c d", "d", dict(c=4, d=3), (2, 4)),
    "ellipsis mixed and moved": Case(
        "b ... t -> u ... b", "t u", None, dict(t=3, u=2), (2, 3, 2, 3)
    ),
    "parenthesised ellipsis on the right": Case(
        "b ... c -> b (... d)", "c d", "d", dict(c=4, d=3), (2, 3, 2, 4)
    ),
    "parenthesised ellipsis after an axis": Case(
        "b ... c -> (b ... d)", "c d", None, dict(c=4, d=3), (2, 3, 4)
    ),
    "elementwise scale": Case("t b c -> t b c", "c", "c", dict(c=4), (3, 2, 4)),
    "elementwise scale, no bias": Case("t b c -> t b c", "c", None, dict(c=4), (3, 2, 4)),
    "multi-axis bias, order differs from output": Case(
        "b (h c) -> b h d", "h c d", "d h", dict(h=2, c=3, d=4), (2, 6)
    ),
    "bias over a composed output": Case(
        "b t c -> b (t d e)", "c d e", "e d", dict(c=3, d=2, e=3), (2, 3, 3)
    ),
    "28 axes": _many_axes_case(),
    "axes named key and pattern": Case(
        "b key -> b pattern", "key pattern", "pattern", dict(key=3, pattern=4), (2, 3)
    ),
    "unitary anonymous axes 1": Case("b 1 c -> b d 1", "c d", "d", dict(c=4, d=3), (2, 1, 4)),
    "unitary anonymous axes ()": Case(
        "b () c -> (b 1) d ()", "c d", "d", dict(c=4, d=3), (2, 1, 4)
    ),
    "1 inside a group": Case("b (1 c) -> (b 1) d", "c d", None, dict(c=4, d=3), (2, 4)),
    "input-only axis is summed": Case("b t c -> b d", "c d", "d", dict(c=4, d=3), (2, 3, 4)),
    "scalar weight": Case("b c -> b c", "", "c", dict(c=4), (2, 4)),
    "scalar input, weight and bias": Case(" -> ", "", "", {}, ()),
    "weight-only output axis (outer product)": Case("b c -> b c r", "r", "r", dict(r=3), (2, 4)),
    "input length given and used": Case("b c -> b d", "c d", None, dict(b=2, c=4, d=3), (2, 4)),
    "batch, contracted and free axes interleaved": Case(
        "x h y c -> h d y x", "h c d", "h d", dict(h=2, c=3, d=2), (2, 2, 3, 3)
    ),
}


# Partitioning metadata: (pattern, weight_shape, bias_shape, axes, x_shape, logical_axes option,
# expected names of the weight and the bias, logical axis rules).
LOGICAL_CASES = {
    "own names": (
        "b t c -> b t d",
        "c d",
        "d",
        {"c": 4, "d": 6},
        (2, 3, 4),
        True,
        {"weight": ("c", "d"), "bias": ("d",)},
        [("d", "model"), ("c", None)],
    ),
    "multi-head, renamed": (
        "b t (h c) -> b t (h d)",
        "h c d",
        "h d",
        {"h": 2, "c": 3, "d": 4},
        (2, 3, 6),
        {"h": "heads", "c": "embed"},
        {"weight": ("heads", "embed", "d"), "bias": ("heads", "d")},
        [("heads", "model"), ("embed", "data"), ("d", "model")],  # 'model' taken: d replicated
    ),
    "token mixing": (
        "b t c -> b u c",
        "t u",
        "u c",
        {"t": 4, "u": 6, "c": 3},
        (2, 4, 3),
        {"u": "seq"},
        {"weight": ("t", "seq"), "bias": ("seq", "c")},
        [("seq", "model"), ("t", "data"), ("b", "data")],
    ),
    "inferred weight, no bias": (
        "b c -> b d",
        None,
        None,
        {"c": 4, "d": 2},
        (3, 4),
        {},
        {"weight": ("c", "d")},
        [("c", "model")],
    ),
}


def record_executed(monkeypatch) -> list:
    """The lowerings ``execute`` runs from now on (from an empty compiled-apply cache, so the
    functional apply traces again)."""
    from einmix_jax import _apply, _execute

    ran: list = []
    real = _execute.execute

    def recording(low, *args, **kwargs):
        ran.append(low)
        return real(low, *args, **kwargs)

    monkeypatch.setattr(_execute, "execute", recording)
    _apply._COMPILED.clear()
    return ran


#: A grouped layer that the planner packs block-diagonally on one device.
GROUPED = ("b t (g c) -> b t (g d)", "g c d", "g d", dict(g=8, c=4, d=3))


def grouped_case(seed: int) -> tuple[em.EinMix, dict, np.ndarray, np.ndarray]:
    """:data:`GROUPED`'s layer, params, an input (16, 4, 32) and the reference output."""
    pattern, weight, bias, sizes = GROUPED
    rng = np.random.default_rng(seed)
    params = {
        "weight": rng.normal(size=(8, 4, 3)).astype(np.float32),
        "bias": rng.normal(size=(8, 3)).astype(np.float32),
    }
    x = rng.normal(size=(16, 4, 32)).astype(np.float32)
    w, b = params["weight"], params["bias"]
    expected = reference_einmix(pattern, weight, bias, x, w, b, dict(sizes, b=16, t=4))
    return em.layer(pattern, weight, bias, **sizes), params, x, expected
