"""The lowering: which contraction each pattern runs, checked on plans, on optimized HLO and on values.

Plan-level tests read ``lower(plan, x_shape)`` for the benchmark's shapes without any array. HLO
tests compile the apply on small shapes and check that no copy/transpose moves x, the output or
the output gradient where the plan says none is needed. Value tests compare outputs and gradients
with ``np.einsum`` on flat axes (``einops.rearrange`` for the groups).
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einmix_jax as em
from einmix_jax import _lower
from einmix_jax._apply import apply_lowering, apply_traced
from einmix_jax._execute import _LAX_DOT_GENERAL, execute
from einmix_jax._lower import lower
from einmix_jax.planning import Lowering

from .cases import departing
from .reference import reference_einmix

ROOT = Path(__file__).resolve().parents[1]
TWO_D = (((1,), (0,)), ((), ()))
BATCHED = (((2,), (1,)), ((0,), (0,)))


def lowering(
    pattern: str,
    weight_shape: str,
    x_shape: tuple[int, ...],
    loops: bool = True,
    bias_shape: str | None = None,
    **axes: int,
) -> Lowering:
    layer = em.layer(pattern, weight_shape=weight_shape, bias_shape=bias_shape, **axes)
    return lower(layer.plan, x_shape, loops)


# ------------------------------------------------------------------------------------------
# Plan level: the benchmark's shapes, no arrays
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "x_shape", "dot_shape"),
    [
        ("b t c -> b t d", (32, 256, 512), (8192, 512)),
        ("... c -> ... d", (8, 16, 128, 512), (16384, 512)),
        ("b c -> b d", (7, 512), (7, 512)),
    ],
)
def test_plain_linear_is_one_2d_gemm_with_free_reshapes(pattern, x_shape, dot_shape):
    low = lowering(pattern, "c d", x_shape, c=512, d=2048)
    # XLA's own lowering: N-d as given where x has one row dimension, else its 2-d GEMM form
    assert low.strategy == ("as einsum" if len(x_shape) == 2 else "x first")
    assert low.x_first and not low.loop
    assert (low.x_perm, low.w_perm, low.y_perm, low.w_broadcast) == (None, None, None, None)
    assert low.x_dot_shape == dot_shape and low.dimension_numbers == TWO_D


def test_token_mixing_keeps_x_and_output_in_place():
    # one (u, t) @ (t, c) GEMM per b, the weight broadcast along b: no copy of x or the output
    # (on XLA:CPU within 0-10% of a loop over b in bench.py, and it compiles 3-4x faster; on the
    # regret corpus the loop lost forward+backward everywhere); with loops off the same
    for loops in (True, False):
        low = lowering("b t c -> b u c", "t u", (64, 196, 512), loops, t=196, u=256)
        assert low.strategy == "broadcast batch" and not low.loop and not low.x_first
        assert (low.x_perm, low.y_perm) == (None, None)
        assert low.w_broadcast == ((1, 256, 196), (64, 256, 196))
        assert low.x_dot_shape == (64, 196, 512) and low.dimension_numbers == BATCHED


def test_a_small_weight_is_broadcast_rather_than_looped_over():
    # 512 loop steps cost more than broadcasting a 4 x 6 weight 512 times
    low = lowering("b t c -> b u c", "t u", (512, 4, 64), t=4, u=6)
    assert low.strategy == "broadcast batch" and (low.x_perm, low.y_perm) == (None, None)


def test_no_loop_of_matrix_vector_products():
    # many large heads: looping over the 512 rows of (b t) would run 512 batches of 32
    # matrix-vector products; the planner moves rows of c once instead (x first)
    low = lowering("b t (h c) -> b t (h d)", "h c d", (16, 32, 4096), h=32, c=128, d=128)
    assert low.strategy == "x first" and not low.loop
    assert low.x_dot_shape == (32, 512, 128) and low.w_dot_shape == (32, 128, 128)


def test_no_loop_of_small_gemms():
    # 7x7 pixels per image: a loop over the batch would run 590 GEMMs of 49 rows
    low = lowering("b c h w -> b d h w", "c d", (590, 256, 7, 7), c=256, d=256)
    assert not low.loop


def test_channels_first_mixes_channels_in_place():
    # a loop would copy 16 slices of 1 MB in and out; the broadcast weight is only 16 x 256 KB
    low = lowering("b c h w -> b d h w", "c d", (16, 256, 32, 32), c=256, d=256)
    assert low.strategy == "broadcast batch" and (low.x_perm, low.y_perm) == (None, None)
    assert low.x_dot_shape == (16, 256, 1024) and low.w_dot_shape == (16, 256, 256)
    assert low.w_broadcast == ((1, 256, 256), (16, 256, 256))


def test_a_weight_stored_out_in_is_used_as_stored():
    low = lowering("b t c -> b t d", "d c", (32, 256, 512), c=512, d=2048)
    assert (low.x_perm, low.w_perm, low.y_perm) == (None, None, None)
    assert low.w_dot_shape == (2048, 512) and low.dimension_numbers == (((1,), (1,)), ((), ()))


def test_channels_last_to_channels_first():
    # one big GEMM and a transpose of the (smaller) output beat a loop over b
    low = lowering("b t c -> b d t", "c d", (64, 196, 512), c=512, d=256)
    assert low.strategy == "x first" and low.x_perm is None and low.y_perm == (0, 2, 1)
    # with a longer t: (b, d, c) @ x (b, t, c) contracted on its last dimension, no transpose
    low = lowering("b t c -> b d t", "c d", (2, 4096, 64), c=64, d=512)
    assert low.strategy == "broadcast batch" and (low.x_perm, low.y_perm) == (None, None)
    assert low.dimension_numbers == (((2,), (2,)), ((0,), (0,)))


def test_multi_head_moves_rows_of_c_and_puts_x_first():
    low = lowering("b t (h c) -> b t (h d)", "h c d", (16, 256, 1024), h=16, c=64, d=64)
    assert low.strategy == "x first" and low.x_first
    assert low.x_perm == (2, 0, 1, 3)  # (b, t, h, c) -> (h, b, t, c): contiguous rows of c
    assert low.y_perm == (1, 2, 0, 3) and low.w_perm is None
    assert low.x_dot_shape == (16, 4096, 64) and low.w_dot_shape == (16, 64, 64)
    assert low.dimension_numbers == BATCHED


def test_patch_embedding_keeps_contracted_axes_in_memory_order():
    low = lowering(
        "b (h ph) (w pw) c -> b (h w) d", "ph pw c d", (32, 224, 224, 3), ph=16, pw=16, c=3, d=768
    )
    assert low.strategy == "x first"
    assert low.x_perm == (0, 1, 3, 2, 4, 5)  # (b h ph w pw c) -> (b h w ph pw c)
    assert (low.w_perm, low.y_perm) == (None, None)  # weight (ph pw c, d) used as stored
    assert low.x_dot_shape == (6272, 768) and low.dimension_numbers == TWO_D


def test_batch_axis_after_an_x_only_axis():
    # x (b, h, t, c), weight (h, c, d): the dot batches over (b, h), the weight broadcast along b
    low = lowering("b h t c -> b h t d", "h c d", (64, 8, 256, 64), h=8, c=64, d=32)
    assert low.strategy == "broadcast batch"
    assert (low.x_perm, low.y_perm, low.w_perm) == (None,) * 3
    assert low.x_dot_shape == (512, 256, 64) and low.dimension_numbers == BATCHED
    # a big weight and a big output: a loop over b or the weight broadcast along it, but never
    # a transpose of the output; with loops off, the weight broadcast
    for loops in (True, False):
        low = lowering("b h t c -> b h t d", "h c d", (4, 8, 256, 64), loops, h=8, c=64, d=1024)
        assert low.strategy in (("loop",) if loops else ()) + ("broadcast batch",)
        assert (low.x_perm, low.y_perm) == (None, None)


def test_qkv_projection_is_one_gemm_and_one_output_transpose():
    low = lowering("b t c -> qkv b h t d", "c qkv h d", (16, 256, 512), c=512, qkv=3, h=8, d=64)
    assert low.strategy == "x first" and (low.x_perm, low.w_perm) == (None, None)
    assert low.x_dot_shape == (4096, 512) and low.w_dot_shape == (512, 1536)
    assert low.y_perm == (2, 0, 3, 1, 4)


def test_input_only_axis_is_contracted_after_one_transpose_of_x():
    low = lowering("b h t e -> b t c", "h e c", (16, 8, 256, 64), h=8, e=64, c=512)
    assert low.strategy == "x first" and low.x_perm == (0, 2, 1, 3)
    assert low.x_dot_shape == (4096, 512) and low.y_perm is None


def test_summed_axis_is_summed_before_a_2d_gemm():
    low = lowering("b t c -> b d", "c d", (64, 196, 512), c=512, d=1024)
    assert low.sum_axes == (1,) and low.x_perm is None
    assert low.x_dot_shape == (64, 512) and low.dimension_numbers == TWO_D


def test_ties_go_to_xla_s_own_lowering_and_the_lowering_is_cached():
    layer = em.layer("b c -> b d", c=3, d=4)
    low = lower(layer.plan, (5, 3))
    assert low.strategy == "as einsum"
    assert lower(layer.plan, (5, 3)) is low


def test_loops_are_allowed_by_default_on_one_cpu_device():
    expected = jax.default_backend() == "cpu" and jax.device_count() == 1
    assert em.planning.profile().loops == expected
    layer = em.layer("b t c -> b u c", t=1024, u=1024)
    assert any(c.candidate.loop for c in _lower.candidates(layer.plan, (4, 1024, 64))) == expected


# ------------------------------------------------------------------------------------------
# Optimized HLO on small shapes: nothing of x's or the output's size is copied or transposed
# ------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"=\s*(\w+)\[([\d,]*)\]\{[\d,]*\}\s+([\w-]+)\(")


def moved_sizes(hlo: str) -> set[int]:
    """Element counts of every copy/transpose in an optimized HLO module (fusions included)."""
    out = set()
    for dtype, dims, op in _INSTRUCTION.findall(hlo):
        if op in ("copy", "transpose") and dtype != "s32":
            out.add(int(np.prod([int(d) for d in dims.split(",") if d])))
    return out


def entry_instructions(hlo: str) -> list[tuple[str, str, int, str]]:
    """(dtype, op, element count, line) of each instruction of the entry computation."""
    entry = hlo[hlo.index("\nENTRY") :]
    found = ((_INSTRUCTION.search(line), line) for line in entry.splitlines())
    return [
        (m.group(1), m.group(3), int(np.prod([int(d) for d in m.group(2).split(",") if d])), line)
        for m, line in found
        if m
    ]


def materialized_moves(hlo: str) -> list[int]:
    """Sizes of the arrays that the entry computation writes with a copy/transpose kernel."""
    bodies = {c.split(" ", 1)[0].lstrip("%"): c for c in hlo.split("\n\n") if c.startswith("%")}
    out = []
    for dtype, op, size, line in entry_instructions(hlo):
        if dtype == "s32":
            continue
        called = re.search(r"calls=%([\w.-]+)", line)
        if op in ("copy", "transpose") or (
            called is not None and moved_sizes(bodies.get(called.group(1), ""))
        ):
            out.append(size)
    return out


# (pattern, weight_shape, bias_shape, axes, x_shape): for each the plan moves neither x nor y
IN_PLACE = [
    ("b t c -> b t d", "c d", "d", dict(c=16, d=24), (4, 12, 16)),
    ("... c -> ... d", "c d", "d", dict(c=16, d=24), (2, 3, 5, 16)),
    ("b t c -> b u c", "t u", "u", dict(t=12, u=20), (4, 12, 64)),  # broadcast batch
    ("b t c -> b u c", "t u", "u", dict(t=128, u=136), (2, 128, 128)),  # loop
    ("b c h w -> b d h w", "c d", "d", dict(c=128, d=136), (2, 128, 8, 16)),  # loop
    ("b t c -> b d", "c d", "d", dict(c=16, d=24), (4, 12, 16)),
]


@pytest.mark.parametrize(("pattern", "weight_shape", "bias_shape", "axes", "x_shape"), IN_PLACE)
def test_compiled_apply_copies_neither_x_nor_the_output(
    pattern, weight_shape, bias_shape, axes, x_shape
):
    params, layer = em.init(
        pattern, jax.random.key(0), weight_shape=weight_shape, bias_shape=bias_shape, **axes
    )
    with departing():  # on these small shapes the gain is within the margin
        _in_place(layer, params, x_shape)


def _in_place(layer, params, x_shape):
    low = lower(layer.plan, x_shape)
    assert (low.x_perm, low.y_perm) == (None, None), low
    x = jnp.ones(x_shape)
    y_shape = jax.eval_shape(layer, params, x).shape
    big = {int(np.prod(x_shape)), int(np.prod(y_shape))}
    assert not big & {int(np.prod(s)) for s in layer.param_shapes.values()}  # sizes distinct

    def loss(p, x, ct):
        return jnp.vdot(layer(p, x), ct)

    fwd = jax.jit(layer).lower(params, x).compile().as_text()
    bwd = jax.jit(jax.grad(loss, (0, 1))).lower(params, x, jnp.ones(y_shape)).compile().as_text()
    assert "dot(" in fwd or "dot_general" in fwd
    assert not moved_sizes(fwd) & big, moved_sizes(fwd)
    assert not moved_sizes(bwd) & big, moved_sizes(bwd)
    if low.loop:
        assert "while(" in fwd


def test_multi_head_hlo_moves_x_and_the_output_once_each():
    params, layer = em.init(
        "b t (h c) -> b t (h d)",
        jax.random.key(0),
        weight_shape="h c d",
        bias_shape="h d",
        h=4,
        c=32,
        d=48,
    )
    x = jnp.ones((2, 16, 128))
    hlo = jax.jit(layer).lower(params, x).compile().as_text()
    computations = hlo.split("\n\n")  # a kernel that moves data: a computation with a copy
    moving = [c for c in computations if moved_sizes(c) - {1}]
    assert len(moving) == 2, moving  # x to (h, b t, c), the result back to (b, t, h d)


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "axes", "x_shape"),
    [
        ("b t c -> qkv b h t d", "c qkv h d", "qkv h d", dict(c=64, qkv=3, h=4, d=16), (4, 64, 64)),
        ("b t (h c) -> b t (h d)", "h c d", "h d", dict(h=4, c=32, d=40), (4, 64, 128)),
    ],
)
def test_output_gradient_is_transposed_once_for_the_dots_and_the_bias(
    pattern, weight_shape, bias_shape, axes, x_shape
):
    # the bias is added on the dot result's layout and transposes run at their lowest rank, so
    # one transposed copy of the output gradient feeds the bias gradient and both backward dots
    params, layer = em.init(
        pattern, jax.random.key(0), weight_shape=weight_shape, bias_shape=bias_shape, **axes
    )
    x = jnp.ones(x_shape)
    ct = jnp.ones(jax.eval_shape(layer, params, x).shape)
    grad = jax.grad(lambda p, x, ct: jnp.vdot(layer(p, x), ct), (0, 1))
    hlo = jax.jit(grad).lower(params, x, ct).compile().as_text()
    assert materialized_moves(hlo).count(ct.size) == 1


def entry_writes(hlo: str, size: int) -> list[str]:
    """The entry computation's kernels that write an array of ``size`` elements."""
    return [
        op
        for _, op, n, _ in entry_instructions(hlo)
        if n == size and op not in ("bitcast", "parameter", "tuple", "constant")
    ]


@pytest.mark.parametrize(
    ("pattern", "x_shape"),
    [
        ("b t c -> b t d", (1, 1, 48)),  # one token
        ("b t c -> b d", (1, 16, 48)),  # t summed before the contraction: one row
    ],
)
def test_one_row_weight_gradient_is_written_once(pattern, x_shape):
    # with one row the weight gradient is an outer product; as a 2-d dot XLA:CPU writes it
    # transposed and then copies it (4x slower forward+backward at c=1024, d=3072), with a unit
    # batch dimension it is written once, in place
    params, layer = em.init(
        pattern, jax.random.key(0), weight_shape="c d", bias_shape="d", c=48, d=80
    )
    x = jnp.ones(x_shape)
    ct = jnp.ones(jax.eval_shape(layer, params, x).shape)
    grad = jax.grad(lambda p, x, ct: jnp.vdot(layer(p, x), ct), (0, 1))
    hlo = jax.jit(grad).lower(params, x, ct).compile().as_text()
    assert len(entry_writes(hlo, 48 * 80)) == 1, entry_writes(hlo, 48 * 80)


def dots_contracting_a_leading_lhs_dim(hlo: str) -> list[str]:
    """The dots whose left operand is contracted along other than its last dimension."""
    out = []
    for computation in hlo.split("\n\n"):
        ranks = {  # operand name -> rank, within the computation
            name: len(dims.split(","))
            for name, dims in re.findall(r"(%[\w.-]+) = \w+\[([\d,]*)\]", computation)
        }
        for line in computation.splitlines():
            dot = re.search(r"\} dot\((%[\w.-]+),.*lhs_contracting_dims=\{(\d+)\}", line)
            if dot and int(dot.group(2)) != ranks[dot.group(1)] - 1:
                out.append(line.strip())
    return out


def test_a_transposed_left_weight_is_written_out_before_the_dot():
    # mixing along x's first axis: the weight goes first, transposed; XLA:CPU would fold the
    # transpose into the dot and run it outside its fast GEMM path (1.4x slower forward at
    # x (227, 128, 1024)); written out first, every dot of the forward and backward contracts
    # its left operand along its last dimension; values and derivatives (reverse and forward
    # mode, vmapped) are those of the numpy reference
    pattern, sizes = "t b c -> u b c", dict(t=24, u=32, b=4, c=16)
    layer = em.layer(pattern, weight_shape="t u", bias_shape="u", t=24, u=32)
    low = lower(layer.plan, (24, 4, 16))
    assert low.strategy == "w first" and low.w_perm == (1, 0)
    assert low.w_copy == (jax.default_backend() == "cpu")
    rng = np.random.default_rng(0)
    x, dx = rng.normal(size=(2, 24, 4, 16))
    w, dw = rng.normal(size=(2, 24, 32))
    b, db = rng.normal(size=(2, 32))
    p, dp = {"weight": w, "bias": b}, {"weight": dw, "bias": db}

    def ref(x, w, b):
        return reference_einmix(pattern, "t u", "u", x, w, b, sizes)

    f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)  # noqa: E731
    y, dy = jax.jvp(layer, f32((p, x)), f32((dp, dx)))
    np.testing.assert_allclose(y, ref(x, w, b), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dy, ref(dx, w, db) + ref(x, dw, 0 * db), rtol=1e-4, atol=1e-4)
    ys = jax.vmap(layer, (None, 0))(f32(p), f32(np.stack([x, dx])))
    np.testing.assert_allclose(ys[1], ref(dx, w, b), rtol=1e-4, atol=1e-4)
    hlo = jax.jit(layer).lower(f32(p), f32(x)).compile().as_text()
    grad = jax.grad(lambda p, x, ct: jnp.vdot(layer(p, x), ct), (0, 1))
    hlo_bwd = jax.jit(grad).lower(f32(p), f32(x), f32(ys[0])).compile().as_text()
    if low.w_copy:
        assert not dots_contracting_a_leading_lhs_dim(hlo + hlo_bwd)


def frozen_lhs_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A dot whose own derivative gives its left operand no gradient (like a tool's custom VJP)."""
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)

    @jax.custom_vjp
    def dot(lhs, rhs):
        return _LAX_DOT_GENERAL(lhs, rhs, dimension_numbers, **kw)

    def bwd(res, g):
        lhs, rhs = res
        _, vjp = jax.vjp(lambda r: _LAX_DOT_GENERAL(lhs, r, dimension_numbers, **kw), rhs)
        return jnp.zeros_like(lhs), vjp(g)[0]

    dot.defvjp(lambda lhs, rhs: (dot(lhs, rhs), (lhs, rhs)), bwd)
    return dot(lhs, rhs)


@pytest.mark.parametrize("how", ["option", "patched"])
def test_a_dot_general_hook_keeps_its_own_derivative(how, monkeypatch):
    # the weight-first form with a transposed weight (w_copy) wraps the plain dot in a custom
    # JVP that assumes it is bilinear; a hook's (or a patched jax.lax.dot_general's) derivative
    # must stand instead: here the weight, the left operand, gets no gradient
    axes = dict(t=23, u=29)
    if how == "patched":
        monkeypatch.setattr(jax.lax, "dot_general", frozen_lhs_dot)
        layer = em.layer("t b c -> u b c", weight_shape="t u", **axes)
    else:
        layer = em.layer("t b c -> u b c", weight_shape="t u", dot_general=frozen_lhs_dot, **axes)
    x = jnp.ones((23, 3, 5))
    with departing():  # the weight-first form (a small gain here)
        _frozen_lhs(layer, x, how)


def _frozen_lhs(layer, x, how):
    assert lower(layer.plan, x.shape).w_copy == (jax.default_backend() == "cpu")
    params = layer.init(jax.random.key(0))
    # a patched dot is seen in a module's trace (here the Equinox layer's, which plans as the
    # functional form does); the functional apply's own jit keeps the dot as imported
    run = (
        layer if how == "option" else functools.partial(apply_traced, layer, weight_as_stored=False)
    )
    g_w, g_x = jax.grad(lambda p, x: jnp.sum(run(p, x) ** 2), (0, 1))(params, x)
    assert not np.any(g_w["weight"]) and np.any(g_x)


@pytest.mark.parametrize(
    ("dtype", "param_dtype", "preferred"),
    [
        (None, jnp.float32, None),
        (jnp.bfloat16, jnp.bfloat16, None),
        (None, jnp.bfloat16, jnp.float32),
        (None, jnp.float32, jnp.float32),
    ],
)
def test_dtype_options_add_no_convert_of_x_or_the_output(dtype, param_dtype, preferred):
    params, layer = em.init(
        "b t (h c) -> b t (h d)",
        jax.random.key(0),
        weight_shape="h c d",
        bias_shape="h d",
        h=2,
        c=3,
        d=4,
        dtype=dtype,
        param_dtype=param_dtype,
        preferred_element_type=preferred,
    )
    x = jnp.ones((5, 7, 6), param_dtype)
    jaxpr = jax.make_jaxpr(layer)(params, x)
    converts = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "convert_element_type"]
    big = {x.size, 5 * 7 * 8}
    assert not [e for e in converts if e.invars[0].aval.size in big], converts


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple) else (param,):
                if hasattr(sub, "jaxpr"):  # ClosedJaxpr
                    sub = sub.jaxpr
                if hasattr(sub, "eqns"):
                    yield from _all_eqns(sub)


# ------------------------------------------------------------------------------------------
# Values: every strategy against np.einsum, forward and gradients
# ------------------------------------------------------------------------------------------


def _flat(side: str) -> list[str]:
    return [t for t in re.findall(r"\.\.\.|\w+", side) if t != "1"]


def einsum_case(pattern, weight_shape, sizes, rng):
    """Random x, weight, output cotangent, and the output and gradients of ``vdot(y, ct)``.

    x and ct are drawn on their flat axes and rearranged to the pattern's compositions with
    ``einops.rearrange``; the contraction and its gradients are ``np.einsum`` in float64.
    """
    left, right = pattern.split("->")
    xa, ya, wa = _flat(left), _flat(right), weight_shape.split()
    ids = {a: i for i, a in enumerate(a for a in dict.fromkeys(xa + wa + ya) if a != "...")}
    ellipsis = [len(ids) + i for i in range(len(sizes.get("...", ())))]

    def sub(names):  # np.einsum cannot sum over '...': give its dimensions ids too
        return [i for a in names for i in (ellipsis if a == "..." else [ids[a]])]

    def shape(names):
        return [n for a in names for n in (sizes[a] if a == "..." else (sizes[a],))]

    xf, w, ctf = (rng.normal(size=shape(names)) for names in (xa, wa, ya))
    y = np.einsum(xf, sub(xa), w, sub(wa), sub(ya))
    gw = np.einsum(xf, sub(xa), ctf, sub(ya), sub(wa))
    gx = np.einsum(ctf, sub(ya), w, sub(wa), sub(xa))  # every x axis is in y or w here

    def compose(a, names, side):
        return einops.rearrange(a, f"{' '.join(names)} -> {side}")

    return (
        compose(xf, xa, left),
        w,
        compose(ctf, ya, right),
        compose(y, ya, right),
        gw,
        compose(gx, xa, left),
    )


# (pattern, weight_shape, every axis length, loops, strategy expected)
VALUES = [
    ("b t c -> b t d", "c d", dict(b=4, t=12, c=16, d=24), True, "x first"),
    ("b t c -> b u c", "t u", dict(b=4, t=12, u=20, c=64), True, "broadcast batch"),
    ("b t c -> b u c", "t u", dict(b=2, t=128, u=136, c=128), True, "loop"),
    ("b t c -> b u c", "t u", dict(b=2, t=128, u=136, c=128), False, "x first"),
    ("b h t c -> b h t d", "h c d", dict(b=3, h=2, t=64, c=96, d=88), True, "loop"),
    ("b h t c -> b h t d", "h c d", dict(b=3, h=2, t=64, c=16, d=24), True, "broadcast batch"),
    ("b t (h c) -> b t (h d)", "h c d", dict(b=2, t=5, h=2, c=3, d=4), True, "x first"),
    ("b c -> d b", "c d", dict(b=64, c=5, d=7), True, "w first"),
    ("b t c -> b t d", "d c", dict(b=2, t=3, c=16, d=24), True, "x first"),
    ("b t c -> b d t", "c d", dict(b=2, t=512, c=128, d=136), True, "broadcast batch"),
    ("b t c -> b d t", "c d", dict(b=3, t=5, c=8, d=4), True, "x first"),
    (
        "b (h ph) (w pw) c -> b (h w) d",
        "ph pw c d",
        dict(b=2, h=2, ph=2, w=3, pw=2, c=3, d=5),
        True,
        "x first",
    ),
    ("b t c -> qkv b h t d", "c qkv h d", dict(b=2, t=5, c=6, qkv=3, h=2, d=4), True, "x first"),
    ("... c -> ... d", "c d", {"...": (2, 3, 5), "c": 4, "d": 3}, True, "x first"),
]


@pytest.mark.parametrize(("pattern", "weight_shape", "sizes", "loops", "strategy"), VALUES)
def test_values_and_gradients_match_np_einsum(pattern, weight_shape, sizes, loops, strategy):
    axes = {a: sizes[a] for a in weight_shape.split()}
    layer = em.layer(pattern, weight_shape=weight_shape, **axes)
    x, w, ct, y_ref, gw_ref, gx_ref = einsum_case(
        pattern, weight_shape, sizes, np.random.default_rng(0)
    )
    # the first candidate of that strategy (the planner's choice where it is one)
    choices = _lower.candidates(layer.plan, x.shape, loops)
    builds = [_lower.build(layer.plan, x.shape, c) for c in choices]
    low = next(b for b in builds if b.strategy == strategy)

    def run(p, x, ct):  # execute exactly this lowering
        y = execute(low, x, p["weight"], layer).reshape(low.out_shape)
        return jnp.vdot(y, ct), y

    f32 = np.float32
    (_, y), (gw, gx) = jax.jit(jax.value_and_grad(run, (0, 1), has_aux=True))(
        {"weight": w.astype(f32)}, x.astype(f32), ct.astype(f32)
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw["weight"], gw_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
    y_apply = layer({"weight": w.astype(f32)}, x.astype(f32))  # the planner's own choice
    np.testing.assert_allclose(y_apply, y_ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# The benchmark script runs
# ------------------------------------------------------------------------------------------


def test_benchmark_smoke():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
            "--cases",
            "tiny",
            "--rounds",
            "2",
            "--compile-rounds",
            "1",
            "--no-write",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| einmix |" in result.stdout and "Worst einmix ratio" in result.stdout


# ------------------------------------------------------------------------------------------
# The candidates: every lowering the planner considers runs and is right; lower() takes the cheapest
# ------------------------------------------------------------------------------------------

# (pattern, weight_shape, bias_shape, every axis length): one of each kind of candidate set
CANDIDATE_CASES = [
    ("b t c -> b u c", "t u", "u", dict(b=3, t=6, u=5, c=64)),  # 64 rows: loops allowed
    ("b h t c -> b h t d", "h c d", "h d", dict(b=3, h=2, t=64, c=5, d=3)),
    ("b t (h c) -> b t (h d)", "h c d", "h d", dict(b=2, t=64, h=2, c=3, d=4)),
    ("b h t e -> b t c", "h e c", "c", dict(b=2, h=2, t=64, e=2, c=5)),
]


def check_choices(pattern, weight_shape, bias_shape, sizes, which=lambda choice: True):
    """Every candidate (filtered by ``which``) against the numpy reference, value and gradients."""
    axes = {a: sizes[a] for a in weight_shape.split()}
    layer = em.layer(pattern, weight_shape=weight_shape, bias_shape=bias_shape, **axes)
    x, w, ct, _, gw_ref, gx_ref = einsum_case(
        pattern, weight_shape, sizes, np.random.default_rng(1)
    )
    bias = np.random.default_rng(2).normal(size=[sizes[a] for a in bias_shape.split()])
    y_ref = reference_einmix(pattern, weight_shape, bias_shape, x, w, bias, sizes)
    choices = [
        *_lower.candidates(layer.plan, x.shape, loops=True),
        *_lower.candidates(layer.plan, x.shape, stored_weight=True),
    ]
    assert len({c.label for c in choices}) == len(choices)  # labels name them
    choices = [c for c in choices if which(c)]
    lowerings = [_lower.build(layer.plan, x.shape, c) for c in choices]

    def run(p, x, ct, low):
        y = apply_lowering(low, p, x, layer)
        return jnp.vdot(y, ct), y

    @jax.jit
    def every(p, x, ct):  # one compile for all candidates (the suite stays fast)
        return [jax.value_and_grad(run, (0, 1), has_aux=True)(p, x, ct, low) for low in lowerings]

    f32 = np.float32
    params = {"weight": w.astype(f32), "bias": bias.astype(f32)}
    outs = every(params, x.astype(f32), ct.astype(f32))
    for choice, ((_, y), (g, gx)) in zip(choices, outs, strict=True):
        for got, want in ((y, y_ref), (g["weight"], gw_ref), (gx, gx_ref)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=choice.label)
    return choices


@pytest.mark.parametrize(("pattern", "weight_shape", "bias_shape", "sizes"), CANDIDATE_CASES)
def test_every_candidate_matches_the_reference(pattern, weight_shape, bias_shape, sizes):
    choices = check_choices(pattern, weight_shape, bias_shape, sizes)
    assert any(c.candidate.loop for c in choices) and any(c.candidate.bcast for c in choices)


# grouped layers with narrow groups: k groups packed into one block-diagonal weight
PACKING_CASES = [
    # all 8 groups in one (8 c, 8 d) block: x and the output stay in place
    ("b t (g c) -> b t (g d)", "g c d", "g d", dict(b=2, t=3, g=8, c=4, d=2), [8]),
    # 64 groups of (4, 2): all in one (256, 128) block
    ("b t (g c) -> b t (g d)", "g c d", "g d", dict(b=2, t=3, g=64, c=4, d=2), [64]),
    # the weight's axes in another order, the groups last in the output, a bias without them
    ("b (g c) -> b (d g)", "c d g", "d", dict(b=5, g=4, c=3, d=2), [4]),
    ("b h t c -> b h t d", "h c d", "h d", dict(b=3, h=2, t=4, c=5, d=3), [2]),
]


@pytest.mark.parametrize(("pattern", "weight_shape", "bias_shape", "sizes", "ks"), PACKING_CASES)
def test_every_packing_matches_the_reference(pattern, weight_shape, bias_shape, sizes, ks):
    choices = check_choices(
        pattern, weight_shape, bias_shape, sizes, lambda c: c.candidate.pack is not None
    )
    assert sorted({c.candidate.pack[1] for c in choices}) == ks
    assert {c.candidate.pack[0] for c in choices} == {"g" if "g" in sizes else "h"}
    assert all(c.candidate.x_first for c in choices)


def test_only_narrow_groups_are_packed():
    def packings(c, d):
        layer = em.layer("b t (g c) -> b t (g d)", "g c d", g=4, c=c, d=d)
        choices = _lower.candidates(layer.plan, (2, 3, 4 * c), loops=True)
        return {c.candidate.pack for c in choices} - {None}

    assert packings(128, 128) == set()  # full-width GEMMs already
    assert packings(128, 8) == packings(8, 128) == {("g", 4)}  # narrow on one side


# (pattern, weight_shape, x_shape, axes): the benchmark's shapes
PLANNER_SHAPES = [
    ("b t c -> b t d", "c d", (32, 256, 512), dict(c=512, d=2048)),
    ("b t c -> b u c", "t u", (64, 196, 512), dict(t=196, u=256)),
    ("b t (h c) -> b t (h d)", "h c d", (16, 256, 1024), dict(h=16, c=64, d=64)),
    ("b t (h c) -> b t (h d)", "h c d", (16, 32, 4096), dict(h=32, c=128, d=128)),
    (
        "b (h ph) (w pw) c -> b (h w) d",
        "ph pw c d",
        (32, 224, 224, 3),
        dict(ph=16, pw=16, c=3, d=768),
    ),
    ("b c h w -> b d h w", "c d", (16, 256, 32, 32), dict(c=256, d=256)),
    ("b h t e -> b t c", "h e c", (16, 8, 256, 64), dict(h=8, e=64, c=512)),
    ("b t c -> b d", "c d", (64, 196, 512), dict(c=512, d=1024)),
]


@pytest.mark.parametrize("loops", [True, False])
@pytest.mark.parametrize(("pattern", "weight_shape", "x_shape", "axes"), PLANNER_SHAPES)
def test_lower_builds_the_first_cheapest_candidate(pattern, weight_shape, x_shape, axes, loops):
    plan = em.layer(pattern, weight_shape=weight_shape, **axes).plan
    choices = _lower.candidates(plan, x_shape, loops)
    cheapest = min(c.cost for c in choices)
    chosen = _lower.choose(choices)
    assert chosen is next(c for c in choices if c.cost == cheapest)
    assert lower(plan, x_shape, loops) == _lower.build(plan, x_shape, chosen)
    assert loops or not any(c.candidate.loop for c in choices)
    stored = _lower.candidates(plan, x_shape, loops, stored_weight=True)
    assert [c.label for c in stored] == ["weight as stored"]
    assert lower(plan, x_shape, loops, True) == _lower.build(plan, x_shape, stored[0])


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "axes", "x_shape", "nd_backward_copies"),
    [
        ("b c -> b d", "c d", dict(c=16, d=24), (48, 16), False),  # already a 2-d GEMM
        ("b t c -> b t d", "c d", dict(c=16, d=24), (4, 12, 16), True),  # two row dimensions
        ("b t c -> qkv b h t d", "c qkv h d", dict(c=16, qkv=3, h=2, d=8), (4, 12, 16), True),
    ],
)
def test_xla_s_own_lowering_is_kept_in_its_cheaper_spelling(
    pattern, weight_shape, axes, x_shape, nd_backward_copies
):
    # 'as einsum' (one N-d dot of x and the weight as given, what jnp.einsum runs) and 'x first'
    # with no outer axes (the same dot with adjacent axes merged) compile to the same forward;
    # the N-d dot's backward writes out more wherever the dot is not already a 2-d GEMM
    layer = em.layer(pattern, weight_shape, **axes)
    params = layer.init(jax.random.key(0))
    x = jnp.ones(x_shape)
    choices = {c.label: c for c in _lower.candidates(layer.plan, x_shape)}
    hlo = {}
    for label in ("as einsum", "x first"):
        low = _lower.build(layer.plan, x_shape, choices[label])

        def f(p, x, low=low):
            return apply_lowering(low, p, x, layer)

        y = f(params, x)
        np.testing.assert_allclose(
            y,
            reference_einmix(
                pattern, weight_shape, None, np.asarray(x), np.asarray(params["weight"]), None, axes
            ),
            rtol=1e-5,
            atol=1e-5,
        )
        fwd = jax.jit(f).lower(params, x).compile().as_text()
        grad = jax.grad(lambda p, x, ct: jnp.vdot(f(p, x), ct), (0, 1))
        bwd = jax.jit(grad).lower(params, x, jnp.ones(y.shape)).compile().as_text()
        hlo[label] = (sorted(materialized_moves(fwd)), sum(materialized_moves(bwd)))
    assert hlo["as einsum"][0] == hlo["x first"][0]  # the same moves forward
    assert (hlo["as einsum"][1] > hlo["x first"][1]) == nd_backward_copies
    chosen = lower(layer.plan, x_shape).strategy
    assert chosen == ("x first" if nd_backward_copies else "as einsum")
