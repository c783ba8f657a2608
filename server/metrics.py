"""Prometheus metrics, prefix ``lvlm_prune_``, served on vLLM's own ``/metrics``.

Created in the API process with prometheus-client's default registry, which vLLM's ``/metrics``
exposes. Names follow vLLM's (``_total``, ``_seconds``, a ``model_name`` label). Selection time is
measured in the workers and drained from them over ``collective_rpc``; a flow pass's time comes
back with its answer.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from lvlm_prune.vllm_plugin.processing.accounting import LEDGER

LABELS = ("model_name",)
REQUEST_LABELS = (*LABELS, "preset")
"""Per-request metrics also carry the pruning preset the request named as its model
(``presets.py``), ``none`` without one."""
NO_PRESET = "none"

IMAGE_TOKENS_BEFORE = Counter(
    "lvlm_prune_image_tokens_before",
    "Image tokens the vision encoder produced, before pruning.",
    REQUEST_LABELS,
)
IMAGE_TOKENS_AFTER = Counter(
    "lvlm_prune_image_tokens_after",
    "Image tokens that entered the language model, after pruning.",
    REQUEST_LABELS,
)
IMAGES = Counter("lvlm_prune_images", "Images processed.", REQUEST_LABELS)
REQUESTS = Counter(
    "lvlm_prune_requests",
    "Requests that carried images, by pruning method (keep_ratio 1.0 counts as method 'none').",
    (*REQUEST_LABELS, "method"),
)
KEEP_RATIO_HISTOGRAM = Histogram(
    "lvlm_prune_keep_ratio",
    "keep_ratio in force per request that carried images.",
    REQUEST_LABELS,
    buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99, 1.0),
)
SELECTION_SECONDS = Histogram(
    "lvlm_prune_selection_seconds",
    "Wall time of the token selection per encoder batch, measured in the worker.",
    LABELS,
    buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
)
FLOW_SECONDS = Histogram(
    "lvlm_prune_flow_seconds",
    "Wall time of one flow diagnostics pass (one eager forward of the request's prompt), "
    "measured in the worker.",
    LABELS,
    buckets=(1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
)
FLOW_REJECTED = Counter(
    "lvlm_prune_flow_rejected",
    "Requests for flow diagnostics refused with HTTP 429: the server's flow passes were all busy.",
    LABELS,
)
DIAGNOSTICS_PENDING = Gauge(
    "lvlm_prune_diagnostics_pending",
    "Diagnostics entries held in the workers' bounded store, not yet fetched.",
    LABELS,
)
LEDGER_ENTRIES = Gauge(
    "lvlm_prune_ledger_entries",
    "Requests this API process holds an entry for: accepted, response not finished. Back to 0 "
    "when idle, disconnects and errors included. Per process, so no model_name label.",
)
LEDGER_ENTRIES.set_function(lambda: len(LEDGER))  # read at scrape time
MODEL_PRUNED = Gauge(
    "lvlm_prune_model_pruned",
    "1 when lvlm-prune prunes the served model's image tokens; 0 when the model's architecture is "
    "not one it prunes, so the model is served unpruned and requests that ask for pruning are "
    "refused (HTTP 400). Set at start-up.",
    LABELS,
)
MEMORY_TRIMS = Counter(
    "lvlm_prune_memory_trims",
    "Times the server, gone idle, handed the memory its last burst freed back to the operating "
    "system (malloc_trim in the API process and its workers).",
)


def observe_request(model_name: str, counts, preset: str | None = None) -> None:
    """Record one request's image-token counts (``accounting.RequestCounts``)."""
    labels = (model_name, preset or NO_PRESET)
    IMAGE_TOKENS_BEFORE.labels(*labels).inc(counts.before)
    IMAGE_TOKENS_AFTER.labels(*labels).inc(counts.after)
    IMAGES.labels(*labels).inc(len(counts.per_image))
    method = counts.method if counts.keep_ratio < 1.0 else "none"
    REQUESTS.labels(*labels, method).inc()
    KEEP_RATIO_HISTOGRAM.labels(*labels).observe(counts.keep_ratio)
