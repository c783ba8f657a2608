"""The server's exit status, for whatever supervises it (systemd, Kubernetes, a shell loop).

When its engine core process dies, vLLM 0.32 fails the requests in flight (500 with an error
body; an error event inside a stream that had already started), answers ``/health`` with 503,
stops its HTTP server and returns from ``run_server`` normally: ``vllm serve`` then exits 0, which
a ``Restart=on-failure`` unit does not restart. ``lvlm-prune serve`` exits 1 instead, so every
restart policy brings the server back; a SIGTERM or Ctrl-C stop still exits 0.
"""

from __future__ import annotations

import logging

from lvlm_prune.vllm_plugin import vllm_internals

logger = logging.getLogger(__name__)

ENGINE_DEAD_EXIT_STATUS = 1

_engine_clients: list = []


def watch(engine_client) -> None:
    """Remember an engine client of this API process (the endpoint plugin's ``init_state``)."""
    _engine_clients.append(engine_client)


def engine_died() -> bool:
    """Whether an engine core behind this process died, as opposed to being shut down."""
    return any(vllm_internals.engine_core_died(client) for client in _engine_clients)


def exit_status() -> int:
    """0 after a requested stop; ``ENGINE_DEAD_EXIT_STATUS`` after the engine died."""
    if engine_died():
        logger.error(
            "lvlm-prune: the engine core died; exiting with status %d so a supervisor restarts "
            "the server",
            ENGINE_DEAD_EXIT_STATUS,
        )
        return ENGINE_DEAD_EXIT_STATUS
    return 0
