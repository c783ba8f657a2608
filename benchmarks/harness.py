"""A real ``lvlm-prune serve`` on 127.0.0.1, for the benchmarks and the API tests alike.

``serve(args)`` starts it as a subprocess (in its own session, engine in its own processes, as
``vllm serve`` runs it) on a free port, waits until ``/health`` answers and, on exit, stops it:
SIGTERM, then SIGKILL of whatever is left of its session. A ``Server`` is the handle on one
started process: its URL, log, ``/metrics`` and process tree (API, engine core, workers).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

SERVE = (sys.executable, "-m", "lvlm_prune.server.cli", "serve")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(image, fmt: str = "PNG") -> str:
    """A PIL image as the ``data:`` URL an OpenAI chat request carries."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "jpeg" if fmt.upper() == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    """A started server process: where it listens, its log, readiness, metrics, processes, stop."""

    def __init__(self, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log
        self.url = f"http://127.0.0.1:{port}"
        self._log_at = 0

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM and up to a minute to shut down; then SIGKILL, to its whole session: nothing
        it started may outlive it, whatever the API process did."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, chars: int = 5000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def new_log(self) -> str:
        """The log's complete lines written since the last call."""
        with open(self.log, errors="replace") as f:
            f.seek(self._log_at)
            text = f.read()
        end = text.rfind("\n") + 1  # a line still being written is read next time
        self._log_at += len(text[:end].encode(errors="replace"))
        return text[:end]

    def chat(self, body: dict) -> dict:
        """One non-streamed ``/v1/chat/completions`` call; an HTTP error raises with its body."""
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"HTTP {err.code}: {err.read()[:2000]!r}") from None

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)

    def processes(self) -> dict:
        return processes(self.proc.pid)

    def engine_core(self):
        return engine_core(self.proc.pid)


@contextlib.contextmanager
def serve(
    args: Sequence[str],
    log_dir: Path | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> Iterator[Server]:
    """``lvlm-prune serve ARGS --port P`` with a multiprocess engine, ready; stopped on exit.

    Without ``log_dir`` its log lives in a temporary folder removed afterwards. A SIGTERM to this
    process stops the server too (Python's default would leave it running).
    """
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lvlm-prune-")))
        stack.enter_context(_exit_on_sigterm())
        port = free_port()
        log = log_dir / "server.log"
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", **(env or {})}
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [*SERVE, *args, "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        server = Server(port, proc, log)
        stack.callback(server.stop)
        server.wait_ready(timeout=timeout)
        yield server


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def server_options(name: str, *, max_model_len: int, dtype: str, images: int = 1) -> list[str]:
    """What every benchmark's server is started with (and the model folder before them)."""
    return [
        *("--served-model-name", name, "--enforce-eager"),
        *("--max-model-len", str(max_model_len), "--dtype", dtype),
        *("--limit-mm-per-prompt", json.dumps({"image": images})),
    ]


# --------------------------------------------------------------------------------------------
# /metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(url: str) -> dict[str, float]:
    """Every sample on ``/metrics``, keyed ``name{labels}`` as Prometheus writes it."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that has the given labels."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in wanted):
            total += value
    return total


# --------------------------------------------------------------------------------------------
# Processes: memory and CPU


def processes(pid: int) -> dict:
    """``{"api": Process, "VLLM::EngineCore": Process, ...}``: the API process and vLLM's engine
    processes under it (found by process tree: vLLM names them ``VLLM::...``)."""
    import psutil

    api = psutil.Process(pid)
    out = {"api": api}
    for child in api.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            name = child.name()
            if name.startswith("VLLM::"):
                key, n = name, 1
                while key in out:
                    n += 1
                    key = f"{name} #{n}"
                out[key] = child
    return out


def engine_core(pid: int):
    """The engine-core process of the server whose API process is ``pid``."""
    return next(p for name, p in processes(pid).items() if name.startswith("VLLM::EngineCore"))
