"""A bounded least-recently-used mapping: the compiled applies and the measured decisions."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``maxsize`` entries; the least recently used goes first. Thread-safe.

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
        self._lock = threading.Lock()

    def get_or_add(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` and kept if there is none."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                value = self._items[key] = make()
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
            return value

    def values(self) -> Iterator[V]:
        """The values, least recently used first."""
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
