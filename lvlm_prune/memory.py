"""Give the memory a burst of requests freed back to the operating system.

glibc's malloc keeps what a burst freed (decoded images, processor outputs, batched activations)
in its arenas for reuse. A server's resident memory then stays at the high-water mark of its
busiest second, which a soak, a container limit or a dashboard cannot tell from a leak.
``malloc_trim(0)`` returns the free pages of every arena. It walks the heap (milliseconds to tens
of milliseconds), so the server calls it only once it has gone idle: ``server.plugin.IdleTrimmer``
in the API process, ``PruneWorkerExtension.lvlm_prune_trim_memory`` in the workers. Where the C
library has no ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Returns whether any memory went back (False also where there is no ``malloc_trim``)."""
    fn = _malloc_trim()
    return bool(fn is not None and fn(0))
