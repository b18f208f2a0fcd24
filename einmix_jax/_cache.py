"""A bounded least-recently-used mapping: the compiled applies and the measured decisions."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from typing import Generic, TypeVar

V = TypeVar("V")


class _Making(Generic[V]):
    """A value being made: the thread making it, its result to come, the callers waiting."""

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self.result: Future[V] = Future()
        self.waiting = 0


class LRU(Generic[V]):
    """At most ``maxsize`` entries; the least recently used goes first. Thread-safe.

    No lock is held while a value is made: the first caller of a key runs ``make()`` alone, the
    other callers of that key wait for its result (or its error; nothing is kept then), callers
    of other keys go on, and a ``make`` may itself ask for other keys.

    Example:
        >>> cache = LRU[int](2)
        >>> [cache.get_or_add(k, lambda k=k: len(k)) for k in ('a', 'bb', 'a', 'ccc')]
        [1, 2, 1, 3]
        >>> list(cache.values())  # 'bb' was the least recently used
        [1, 3]
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.OrderedDict[Hashable, V] = collections.OrderedDict()
        self._making: dict[Hashable, _Making[V]] = {}
        #: per thread, the value it waits for
        self._waits: dict[int, _Making[V]] = {}
        self._lock = threading.Lock()  # held only to read and change the dicts above

    def get_or_add(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` and kept if there is none.

        Raises ``RecursionError`` where making ``key`` needs ``key`` itself (in this thread, or
        through others waiting on this one), which would otherwise wait forever.
        """
        me = threading.get_ident()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            making = self._making.get(key)
            if making is None:
                making = self._making[key] = _Making()
            else:
                self._cycle_check(key, making, me)
                making.waiting += 1
                self._waits[me] = making
        if making.owner != me:
            try:
                return making.result.result()
            finally:
                with self._lock:
                    making.waiting -= 1
                    del self._waits[me]
        try:
            value = make()
        except BaseException as error:
            with self._lock:
                del self._making[key]
            making.result.set_exception(error)
            raise
        with self._lock:
            del self._making[key]
            self._items[key] = value
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        making.result.set_result(value)
        return value

    def _cycle_check(self, key: Hashable, making: _Making[V], me: int) -> None:
        """An error if the thread making ``key`` is this one, or (through the values the
        threads wait for) waits for this one: waiting would never end. Under the lock."""
        owner, seen = making.owner, set()
        while owner != me and owner in self._waits and owner not in seen:
            seen.add(owner)
            owner = self._waits[owner].owner
        if owner == me:
            name = repr(key) if len(repr(key)) <= 80 else f"a {type(key).__name__}"
            raise RecursionError(f"making the value of {name} needs that value itself")

    def waiting(self, key: Hashable) -> int:
        """How many callers wait for the value of ``key`` now being made (0 if none is)."""
        with self._lock:
            making = self._making.get(key)
            return 0 if making is None else making.waiting

    def values(self) -> Iterator[V]:
        """The values, least recently used first."""
        with self._lock:
            return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Drop every value kept (values being made are kept when done)."""
        with self._lock:
            self._items.clear()
