"""Worker-side record of what the selection did, for requests that asked for diagnostics.

vLLM has no generic channel from the model back to the API process. The model writes here, in the
worker process; the API process reads it over ``collective_rpc`` through ``PruneWorkerExtension``
(``--worker-extension-cls``). The store is bounded: entries nobody fetches are evicted oldest-first.
"""

from __future__ import annotations

import collections
import threading
import time

import torch

from lvlm_prune import memory
from lvlm_prune.kernels import Selection, cosine_matrix

from ..bounded import BoundedStore

MAX_ENTRIES = 1024
MAX_FLOW_ENTRIES = 32
"""Requests whose kept rows wait for their flow pass (K x D each, on the host): the API process
runs a handful at a time and takes them at once; this caps what abandoned ones can hold."""


class DiagnosticsStore:
    def __init__(
        self, max_entries: int = MAX_ENTRIES, max_flow_entries: int = MAX_FLOW_ENTRIES
    ) -> None:
        self._entries: BoundedStore[int, list[dict]] = BoundedStore(max_entries)
        self._flow: BoundedStore[int, dict] = BoundedStore(max_flow_entries)
        self._timers_lock = threading.Lock()
        self._timers: collections.deque[tuple[object, object, int]] = collections.deque(
            maxlen=max_entries
        )

    def put(
        self,
        diag_id: int,
        sel: Selection,
        *,
        image: torch.Tensor,
        query: torch.Tensor,
        query_ids: torch.Tensor,
        grid: tuple[int, int] | None = None,
        views: list[dict] | None = None,
    ) -> None:
        """Append one image's selection under the request's diagnostics id; ``grid`` is the
        image's tokens as (rows, cols), for the heatmap; ``views`` the parts of an image laid
        out in several grids (LLaVA-NeXT's base view and crops), offsets into its rows. A row
        that did not compete in the selection has no score (NaN here, None in the entry)."""
        scores = None
        if sel.scores is not None:
            scores = [None if s != s else s for s in sel.scores.float().cpu().tolist()]
        entry = {
            "num_tokens": int(image.shape[0]),
            "grid": None if grid is None else list(grid),
            "kept_indices": sel.kept.tolist(),
            "scores": scores,
            "method": sel.method,
            "query_ids": query_ids.tolist(),
            "query_votes": query_votes(image, query, sel.kept),
        }
        if views is not None:
            entry["views"] = views
        self._entries.update(diag_id, lambda images: images.append(entry), create=list)

    def put_flow(
        self,
        diag_id: int,
        sel: Selection,
        *,
        num_tokens: int,
        grid: tuple[int, int] | None = None,
    ) -> None:
        """Keep one image's rows as the LLM sees them, for the request's flow pass (appended in
        prompt order, as ``put``); ``grid``: its tokens as (rows, cols) (M-RoPE positions and
        the map's shape)."""

        def append(entry: dict) -> None:
            entry["rows"].append(sel.rows.detach().to("cpu", copy=True))
            entry["kept"].append(sel.kept.tolist())
            entry["num_tokens"].append(num_tokens)
            entry["grids"].append(None if grid is None else tuple(grid))

        self._flow.update(
            diag_id,
            append,
            create=lambda: {"rows": [], "kept": [], "num_tokens": [], "grids": []},
        )

    def put_flow_levels(self, diag_id: int, levels: torch.Tensor) -> None:
        """Keep one image's DeepStack rows ([K, levels x D], the kept tokens' rows of every
        level; Qwen3-VL), after its ``put_flow``, in the same order."""
        self._flow.update(
            diag_id,
            lambda entry: entry.setdefault("levels", []).append(levels.detach().to("cpu")),
        )

    def put_flow_span(self, diag_id: int, span: int) -> None:
        """Keep the positions one image spans (1-D families, ``positions.py``), after its
        ``put_flow``, in the same order."""
        self._flow.update(diag_id, lambda entry: entry.setdefault("spans", []).append(span))

    def pop_flow(self, diag_id: int) -> dict | None:
        return self._flow.pop(diag_id)

    def pop(self, diag_ids: list[int]) -> dict[int, list[dict]]:
        """Take the requests' entries; whatever their flow pass did not take goes too."""
        for i in diag_ids:
            self._flow.pop(i)
        popped = {i: self._entries.pop(i) for i in diag_ids}
        return {i: images for i, images in popped.items() if images is not None}

    def start_timer(self, device: torch.device):
        """CUDA events on a GPU (read when drained, seconds later: no sync in the forward pass),
        the wall clock elsewhere."""
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def stop_timer(self, start, *, num_images: int) -> None:
        if isinstance(start, float):
            stop: object = time.perf_counter()
        else:
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
        with self._timers_lock:
            self._timers.append((start, stop, num_images))

    def drain_timings(self) -> list[tuple[float, int]]:
        """(seconds, images) per selection since the last drain."""
        with self._timers_lock:
            timers = list(self._timers)
            self._timers.clear()
        out = []
        for start, stop, num_images in timers:
            if isinstance(start, float):
                out.append((stop - start, num_images))
            else:
                stop.synchronize()
                out.append((start.elapsed_time(stop) / 1e3, num_images))
        return out

    def __len__(self) -> int:
        return len(self._entries) + len(self._flow)


def query_votes(image: torch.Tensor, query: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """Per query token: how many kept image tokens it is the most similar query token for.

    Says which words of the question drew the kept tokens. Only computed for requests that asked
    for diagnostics.
    """
    if query.shape[0] == 0:
        return []
    sim = cosine_matrix(image[kept], query)  # [K, T]; row-invariant, as the selection's
    return torch.bincount(sim.argmax(dim=1), minlength=query.shape[0]).tolist()


STORE = DiagnosticsStore()


class PruneWorkerExtension:
    """Mixed into vLLM's worker (``--worker-extension-cls``): RPCs the API process calls."""

    def lvlm_prune_pop_diagnostics(self, diag_ids: list[int]) -> dict[int, list[dict]]:
        return STORE.pop(diag_ids)

    def lvlm_prune_flow(self, diag_id: int, prompt_ids: list[int]) -> dict | None:
        """This rank's part of a request's flow diagnostics (``flow.flow_pass``); None when this
        worker's engine did not run the request. Every rank of the engine that ran it holds its
        rows and runs the pass together (the layers all-reduce); other data-parallel engines
        answer None without a collective."""
        entry = STORE.pop_flow(diag_id)
        if entry is None:
            return None
        from . import flow

        try:
            return flow.flow_pass(self.get_model(), prompt_ids, entry)
        except flow.FlowUnavailable as err:
            return {"error": str(err)}

    def lvlm_prune_drain_timings(self) -> list[tuple[float, int]]:
        return STORE.drain_timings()

    def lvlm_prune_store_size(self) -> int:
        return len(STORE)

    def lvlm_prune_trim_memory(self) -> bool:
        """Called when the server has gone idle (``lvlm_prune.memory``)."""
        return memory.trim()
