"""API-process record of what the processor decided for each tagged request.

The server tags a request (``prune_tag``, kept out of the multimodal hash) and reads back, once
the response is done, how many image tokens each image had before and after pruning and which
options were in force (server default merged with the request). Exact also on processor-cache
hits, since ``apply`` runs for every request. Bounded: untaken entries are evicted oldest-first.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

MAX_ENTRIES = 4096


@dataclasses.dataclass
class RequestCounts:
    keep_ratio: float
    method: str
    merge: bool
    per_image: list[tuple[int, int]]  # (tokens before, tokens after) per image

    @property
    def before(self) -> int:
        return sum(b for b, _ in self.per_image)

    @property
    def after(self) -> int:
        return sum(a for _, a in self.per_image)


class CountsStore:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, RequestCounts] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, tag: str, counts: RequestCounts) -> None:
        with self._lock:
            if tag in self._entries:  # several prompts in one request (n > 1 completions)
                self._entries[tag].per_image.extend(counts.per_image)
            else:
                self._entries[tag] = counts
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def pop(self, tag: str) -> RequestCounts | None:
        with self._lock:
            return self._entries.pop(tag, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


COUNTS = CountsStore()
