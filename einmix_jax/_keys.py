"""What a layer compares and hashes by: its callable options (initializers, hooks) as keys.

A compiled apply's key holds a hook weakly (:func:`weak_key`), so a hook and what it captured
are freed with the layer that holds it, while an equal rebuilt partial finds the same compile.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any


def hook_key(fn: Any) -> Any:
    """What a callable option (an init, ``dot_general``) compares and hashes by, inside a layer.

    A ``functools.partial`` compares by its function and arguments, so rebuilding the same partial
    gives an equal layer; anything else by its own ``==`` (identity for functions). What cannot be
    hashed compares by identity, so the layer stays a hashable static ``jit`` argument.

    Example:
        >>> import functools
        >>> hook_key(functools.partial(max, 1)) == hook_key(functools.partial(max, 1))
        True
        >>> (lambda: 0) == (lambda: 0)  # two functions: never equal
        False
    """
    if isinstance(fn, functools.partial):
        key = ("partial", hook_key(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
        try:
            hash(key)
        except TypeError:
            return _Identity(fn)
        return key
    try:
        hash(fn)
    except TypeError:
        return _Identity(fn)
    return fn


class _Weak:
    """A key part held weakly: equal to another while both objects live and are equal.

    A compiled apply's key holds its hook this way, so a hook (and what it captured) is freed
    with the layer that holds it, while an equal rebuilt partial finds the same compiled apply.
    """

    __slots__ = ("__weakref__", "hash", "ref")

    def __init__(self, obj: Any) -> None:
        self.ref = weak_ref(obj)
        self.hash = hash(obj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Weak):
            return False
        a, b = self.ref(), other.ref()
        return a is not None and b is not None and (a is b or bool(a == b))

    def __hash__(self) -> int:
        return self.hash


def weak_key(key: Any) -> Any:
    """``key`` (a :func:`hook_key`) with every object in it held weakly where it can be.

    Example:
        >>> weak_key(hook_key(functools.partial(max, 1))) == weak_key(hook_key(functools.partial(max, 1)))
        True
    """
    if isinstance(key, tuple):
        return tuple(weak_key(k) for k in key)
    if isinstance(key, _Identity):
        try:
            return _WeakIdentity(key.obj)
        except TypeError:
            return key
    try:
        return _Weak(key)
    except TypeError:  # a value (a number, a string, None): nothing to free
        return key


class _WeakIdentity(_Weak):
    """A weakly held object that compares by identity (it may be unhashable)."""

    __slots__ = ()

    def __init__(self, obj: Any) -> None:
        self.ref = weakref.ref(obj)
        self.hash = id(obj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _WeakIdentity):
            return False
        a = self.ref()
        return a is not None and a is other.ref()

    def __hash__(self) -> int:
        return self.hash


class _Identity:
    """Compares and hashes by the identity of the object it holds."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def hook_ref(hook: Any) -> Callable[[], Any]:
    """A weak reference to ``hook`` where it can be held weakly, else a strong one."""
    if hook is None:
        return lambda: None
    try:
        return weak_ref(hook)
    except TypeError:  # e.g. a builtin: nothing it could capture
        return lambda: hook


def weak_ref(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj`` (a ``WeakMethod`` for a bound method, which would die at
    once); ``TypeError`` where ``obj`` cannot be held weakly."""
    is_method = hasattr(obj, "__self__") and hasattr(obj, "__func__")
    return (weakref.WeakMethod if is_method else weakref.ref)(obj)
