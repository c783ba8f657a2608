"""API-process ledger of the requests our server tagged, and what the processor decided for them.

The server's middleware opens an entry (``expect``) with a fresh tag, and the diagnostics id when
diagnostics were asked for, before vLLM sees the request; the processor adds each image's token
counts before/after pruning and the options in force (``add``, also on processor-cache hits since
``apply`` runs for every request) and, for flow diagnostics, the prompt as the engine runs it (the
flow pass reruns it in the worker); the middleware takes the entry when the response is done
(``pop``). Tags and diagnostics ids that no entry expects are refused at the API (``is_expected``),
so a client cannot forge one. Bounded: entries nobody takes are evicted oldest-first.
"""

from __future__ import annotations

import dataclasses

from ..bounded import BoundedStore

MAX_ENTRIES = 16384


@dataclasses.dataclass
class RequestCounts:
    keep_ratio: float
    method: str
    merge: bool
    per_image: list[tuple[int, int]]  # (tokens before, tokens after) per image
    prompt_token_ids: list[int] | None = None
    """The prompt as the engine ran it (K placeholders per image); kept for flow diagnostics."""

    @property
    def before(self) -> int:
        return sum(b for b, _ in self.per_image)

    @property
    def after(self) -> int:
        return sum(a for _, a in self.per_image)


@dataclasses.dataclass
class _Entry:
    diagnostics_id: int | None
    counts: RequestCounts | None = None


class RequestLedger:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: BoundedStore[str, _Entry] = BoundedStore(max_entries)

    def expect(self, tag: str, diagnostics_id: int | None = None) -> None:
        self._entries.put(tag, _Entry(diagnostics_id))

    def is_expected(self, tag: object, diagnostics_id: object) -> bool:
        entry = self._entries.get(tag) if isinstance(tag, str) else None
        return entry is not None and entry.diagnostics_id == diagnostics_id

    def add(self, tag: str, counts: RequestCounts) -> None:
        """Record counts for an expected tag (several prompts of one request add up)."""

        def add_to(entry: _Entry) -> None:
            if entry.counts is None:
                entry.counts = counts
            else:
                entry.counts.per_image.extend(counts.per_image)
                if entry.counts.prompt_token_ids is None:
                    entry.counts.prompt_token_ids = counts.prompt_token_ids

        self._entries.update(tag, add_to)

    def pop(self, tag: str) -> RequestCounts | None:
        entry = self._entries.pop(tag)
        return entry.counts if entry else None

    def __len__(self) -> int:
        return len(self._entries)


LEDGER = RequestLedger()
