"""The API tests' server: the benchmarks' harness (``lvlm_prune.benchmarks.harness``), and what
the shared test server is started with."""

from lvlm_prune.benchmarks.harness import Server, free_port, serve

__all__ = ["API_KEY", "MAX_IMAGES", "MODEL", "SERVER_KEEP_RATIO", "Server", "free_port", "serve"]

API_KEY = "test-key"
MODEL = "lvlm-prune-tiny"
SERVER_KEEP_RATIO = 0.5
MAX_IMAGES = 2
