"""A bounded, locked, oldest-first dictionary: the one implementation of both side stores.

The API process's request ledger and the worker's diagnostics store hold entries that somebody is
expected to take (the response being built, the API process fetching diagnostics). A client that
disconnects or a request that fails leaves its entry behind, so both are capped: when full, the
entry touched longest ago goes first. Each is read and written from more than one thread (the event
loop, ``asyncio.to_thread`` workers, vLLM's RPC thread), hence the lock.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedStore(Generic[K, V]):
    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._touch(key)

    def update(
        self, key: K, change: Callable[[V], None], *, create: Callable[[], V] | None = None
    ) -> bool:
        """Apply ``change`` to the entry under the lock; a missing entry is created by ``create``
        when given, else left alone. Returns whether ``change`` ran."""
        with self._lock:
            if key not in self._entries:
                if create is None:
                    return False
                self._entries[key] = create()
            change(self._entries[key])
            self._touch(key)
            return True

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._entries.get(key)

    def pop(self, key: K) -> V | None:
        with self._lock:
            return self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _touch(self, key: K) -> None:
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
