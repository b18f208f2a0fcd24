"""No cache lock is held while a value is made: measured planning compiles and times (and calls
the user's ``dot_general`` hook) with no lock held, so a hook may apply another layer and threads
planning different layers run side by side; callers of one key wait for its one computation.
Measured planning transfers nothing from the host: it runs under ``jax.transfer_guard``.

Every test that could hang on a lock runs its calls in daemon threads joined with a timeout, so a
regression fails instead of stopping the suite.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

import einmix_jax as em
from einmix_jax import _measure
from einmix_jax._cache import LRU
from tests.reference import reference_einmix

PATTERN, WEIGHT, BIAS = "b t (g c) -> b t (g d)", "g c d", "g d"
SIZES = dict(g=8, c=4, d=3)
#: seconds an event is waited for where, with a lock held across ``make``, it would never come
WAIT = 10.0
#: seconds a thread that plans (compiles and times a few candidates) is given to finish
JOIN = 120.0


class Run(threading.Thread):
    """``fn()`` in a daemon thread; ``.result`` is its value, ``.error`` what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed to the test
            self.error = e

    def outcome(self, timeout: float) -> Any:
        """Wait at most ``timeout`` seconds; the value, or what the call raised."""
        self.join(timeout)
        assert not self.is_alive(), f"still running after {timeout} s (a lock held across make?)"
        if self.error is not None:
            raise self.error
        return self.result


def start(fn: Callable[[], Any]) -> Run:
    thread = Run(fn)
    thread.start()
    return thread


# --- the LRU ------------------------------------------------------------------------------------


def parked(cache: LRU, key: str, n: int) -> None:
    """Wait until ``n`` callers wait for the value of ``key`` being made."""
    deadline = time.monotonic() + WAIT
    while cache.waiting(key) < n:
        assert time.monotonic() < deadline, f"{n} callers never came to wait for {key!r}"
        time.sleep(0.001)


def test_a_make_waiting_for_another_key_made_in_another_thread_completes():
    cache = LRU[bool](4)
    a_started, b_made = threading.Event(), threading.Event()

    def make_a() -> bool:
        a_started.set()
        return b_made.wait(WAIT)  # False if the call for 'b' could not run meanwhile

    a = start(lambda: cache.get_or_add("a", make_a))
    assert a_started.wait(WAIT)
    b = start(lambda: cache.get_or_add("b", lambda: b_made.set() or True))
    assert b.outcome(WAIT) is True
    assert a.outcome(WAIT) is True, "the call for 'b' waited for the make of 'a'"
    assert list(cache.values()) == [True, True]


def test_a_make_may_ask_for_another_key():
    cache = LRU[int](4)
    made = start(
        lambda: cache.get_or_add("outer", lambda: cache.get_or_add("inner", lambda: 1) + 1)
    )
    assert made.outcome(WAIT) == 2
    assert cache.get_or_add("inner", lambda: -1) == 1 and cache.get_or_add("outer", lambda: -1) == 2


def test_callers_of_one_key_wait_for_its_one_make_while_other_keys_proceed():
    cache = LRU[object](4)
    calls: list[str] = []
    started, gate = threading.Event(), threading.Event()
    value = object()

    def make() -> object:
        calls.append("k")
        started.set()
        return value if gate.wait(3 * WAIT) else None

    first = start(lambda: cache.get_or_add("k", make))
    assert started.wait(WAIT)
    # while 'k' is being made, another key is made and returned at once
    assert start(lambda: cache.get_or_add("other", lambda: 0)).outcome(WAIT) == 0
    waiters = [start(lambda: cache.get_or_add("k", make)) for _ in range(3)]
    parked(cache, "k", 3)
    gate.set()
    results = [t.outcome(WAIT) for t in (first, *waiters)]
    assert all(r is value for r in results), "a caller of 'k' did not get the value made once"
    assert calls == ["k"] and cache.waiting("k") == 0


def test_an_error_in_make_reaches_the_callers_waiting_and_nothing_is_kept():
    cache = LRU[int](4)
    started, gate = threading.Event(), threading.Event()
    calls: list[str] = []

    def failing() -> int:
        calls.append("failing")
        started.set()
        gate.wait(3 * WAIT)
        raise ValueError("no value for k")

    def fine() -> int:
        calls.append("fine")
        return 1

    first = start(lambda: cache.get_or_add("k", failing))
    assert started.wait(WAIT)
    assert start(lambda: cache.get_or_add("other", lambda: 0)).outcome(WAIT) == 0
    waiters = [start(lambda: cache.get_or_add("k", fine)) for _ in range(2)]
    parked(cache, "k", 2)
    gate.set()
    for t in (first, *waiters):
        with pytest.raises(ValueError, match="no value for k"):
            t.outcome(WAIT)
    assert calls == ["failing"] and list(cache.values()) == [0]
    assert cache.get_or_add("k", fine) == 1 and calls == ["failing", "fine"]  # made anew


def test_a_make_that_needs_its_own_key_gets_an_error_not_a_hang():
    cache = LRU[int](4)
    made = start(lambda: cache.get_or_add("k", lambda: cache.get_or_add("k", lambda: 1) + 1))
    with pytest.raises(RecursionError, match="'k'"):
        made.outcome(WAIT)
    assert len(cache) == 0


def test_two_threads_whose_makes_need_each_other_get_an_error_not_a_hang():
    cache = LRU[int](4)
    started = {"a": threading.Event(), "b": threading.Event()}

    def make(mine: str, theirs: str) -> Callable[[], int]:
        def made() -> int:
            started[mine].set()
            assert started[theirs].wait(WAIT)
            return cache.get_or_add(theirs, lambda: 0) + 1

        return made

    a = start(lambda: cache.get_or_add("a", make("a", "b")))
    b = start(lambda: cache.get_or_add("b", make("b", "a")))
    for t in (a, b):
        with pytest.raises(RecursionError, match="needs that value itself"):
            t.outcome(WAIT)
    assert len(cache) == 0


def test_bounded_and_least_recently_used_first():
    cache = LRU[int](2)
    for k in ("a", "b", "a", "c"):  # 'b' is the least recently used when 'c' comes
        cache.get_or_add(k, lambda k=k: ord(k))
    assert list(cache.values()) == [97, 99] and len(cache) == 2
    assert cache.get_or_add("b", lambda: -1) == -1  # made anew
    cache.clear()
    assert len(cache) == 0


# --- measured planning --------------------------------------------------------------------------


@pytest.fixture
def decisions(monkeypatch):
    """Start from no measured decisions; the list of input shapes measured."""
    measured: list[tuple[int, ...]] = []
    fastest = _measure._fastest

    def counted(*args: Any, **kwargs: Any) -> str:
        measured.append(args[1])
        return fastest(*args, **kwargs)

    monkeypatch.setattr(_measure, "_fastest", counted)
    monkeypatch.setattr(_measure, "_DECISIONS", LRU(_measure.DECISIONS))
    return measured


def case(seed: int, b: int, dot_general: Any = None):
    """A grouped layer (with ``dot_general``), numpy params and input, and the reference output."""
    layer = em.layer(PATTERN, WEIGHT, BIAS, dot_general=dot_general, **SIZES)
    rng = np.random.default_rng(seed)
    params = {
        "weight": rng.normal(size=(8, 4, 3)).astype(np.float32),
        "bias": rng.normal(size=(8, 3)).astype(np.float32),
    }
    x = rng.normal(size=(b, 4, 32)).astype(np.float32)
    args = (PATTERN, WEIGHT, BIAS, x, params["weight"], params["bias"], dict(SIZES, b=b, t=4))
    return layer, params, x, reference_einmix(*args)


def close(actual: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5)


def test_a_hook_that_applies_another_layer_inside_measured_planning(decisions):
    inner = em.layer("b c -> b d", "c d", c=2, d=1)
    inner_w = np.array([[0.5], [0.25]], np.float32)
    probe = np.array([[2.0, 4.0]], np.float32)  # inner(probe) = 2 * 0.5 + 4 * 0.25 = 2

    def scaled(lhs, rhs, dimension_numbers, **kwargs):
        scale = inner({"weight": inner_w}, probe).reshape(())
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs) * scale

    layer, params, x, expected = case(0, 16, scaled)
    bias = params["bias"].reshape(1, 1, 8, 3)
    scaled_ref = ((expected.reshape(16, 4, 8, 3) - bias) * 2.0 + bias).reshape(expected.shape)

    def measured_call() -> Any:
        with em.measured_planning(top=2):
            return np.asarray(layer(params, x))

    close(start(measured_call).outcome(JOIN), scaled_ref)
    assert (16, 4, 32) in decisions
    assert len(_measure._DECISIONS) == 2  # the inner layer's decision too, made meanwhile


def test_threads_planning_different_layers_do_not_wait_for_each_other(decisions):
    a_waiting, b_traced = threading.Event(), threading.Event()
    waited: list[bool] = []

    def waits_for_b(lhs, rhs, dimension_numbers, **kwargs):
        a_waiting.set()
        waited.append(b_traced.wait(WAIT))  # False if layer b could not be planned meanwhile
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)

    def opens_for_a(lhs, rhs, dimension_numbers, **kwargs):
        b_traced.set()
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)

    layer_a, params_a, x_a, expected_a = case(1, 16, waits_for_b)
    layer_b, params_b, x_b, expected_b = case(2, 8, opens_for_a)

    def measured_call(layer: em.EinMix, params: Any, x: np.ndarray) -> Callable[[], Any]:
        def call() -> Any:
            with em.measured_planning(top=2):
                return np.asarray(layer(params, x))

        return call

    a = start(measured_call(layer_a, params_a, x_a))
    assert a_waiting.wait(JOIN)  # layer a is being measured, its hook parked on the event
    b = start(measured_call(layer_b, params_b, x_b))
    close(b.outcome(JOIN), expected_b)
    close(a.outcome(JOIN), expected_a)
    assert waited and all(waited), "planning layer b waited for layer a's measurement"
    assert sorted(decisions) == [(8, 4, 32), (16, 4, 32)]


def test_measured_planning_transfers_nothing_from_the_host(decisions):
    layer, params, x, expected = case(3, 16)
    params, x = jax.device_put(params), jax.device_put(x)
    with jax.transfer_guard("disallow"), em.measured_planning(top=2):
        y = layer(params, x)
        y_jit = jax.jit(layer)(params, x)
    assert decisions == [(16, 4, 32)]  # measured once (the jitted call reuses the decision)
    close(y, expected)
    close(y_jit, expected)
