"""Starting and stopping a real ``lvlm-prune serve`` on 127.0.0.1 for the API tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import requests

API_KEY = "test-key"
MODEL = "lvlm-prune-tiny"
SERVER_KEEP_RATIO = 0.5
MAX_IMAGES = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited {self.proc.returncode}:\n{self.log.read_text()[-5000:]}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log.read_text()[-5000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def serve(
    args: Sequence[str], log_dir: Path, *, env: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[Server]:
    """``lvlm-prune serve ARGS --port P`` with a multiprocess engine, ready; stopped (SIGTERM,
    then SIGKILL of its whole session) on exit."""
    port = free_port()
    log = log_dir / "server.log"
    cmd = [sys.executable, "-m", "lvlm_prune.server.cli", "serve", *args, "--port", str(port)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(port, proc, log)
    try:
        server.wait_ready(timeout=timeout)
        yield server
    finally:
        server.stop()
        # Whatever the API process did, nothing of its session may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
