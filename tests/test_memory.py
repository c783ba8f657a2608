"""``lvlm_prune.memory`` hands freed heap back; ``IdleTrimmer`` calls it only once idle."""

from __future__ import annotations

import asyncio
import platform
import time

import psutil
import pytest

from lvlm_prune import memory
from lvlm_prune.server import plugin


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim"
)
def test_trim_returns_freed_memory_that_glibc_keeps():
    # 100 KiB blocks sit below glibc's mmap threshold, so they come from the heap; the last one,
    # kept, pins the heap's top, so freeing the others returns nothing by itself.
    blocks = [bytearray(100 * 1024) for _ in range(2000)]  # ~200 MiB, each page touched
    rss = lambda: psutil.Process().memory_info().rss / 2**20
    allocated = rss()
    del blocks[:-1]
    freed = rss()
    assert memory.trim()
    trimmed = rss()
    assert allocated - freed < 50, (allocated, freed)  # glibc kept it
    assert freed - trimmed > 150, (freed, trimmed)  # and gave it back on trim


EARLY = 1e-6
"""asyncio wakes a sleeper up to its clock's resolution (1 ns on Linux) before the deadline."""


def run_trimmer(monkeypatch, scenario) -> list[float]:
    """Runs ``scenario(trimmer)`` with a 0.1 s idle wait and a 0.6 s minimum interval; returns
    the times (s from the start) at which the trimmer decided to trim: the clock its spacing rule
    reads, not the end of the trim itself, whose length varies with what there is to hand back.
    Every bound a test asserts follows from the sleeps (which never end early); the gaps around
    them leave a busy event loop 0.3 s of slack."""
    monkeypatch.setattr(plugin, "TRIM_IDLE_SECONDS", 0.1)
    monkeypatch.setattr(plugin, "TRIM_MIN_INTERVAL_SECONDS", 0.6)
    trims: list[float] = []

    async def main():
        t0 = time.monotonic()

        async def trim_engines():
            trims.append(trimmer.last_trim - t0)

        trimmer = plugin.IdleTrimmer(trim_engines)
        await scenario(trimmer)
        await asyncio.sleep(1.0)

    asyncio.run(main())
    return trims


def test_trimmer_waits_until_nothing_is_in_flight(monkeypatch):
    async def scenario(t):
        t.started()
        t.started()
        t.finished()  # one still in flight
        await asyncio.sleep(0.4)
        t.finished()

    trims = run_trimmer(monkeypatch, scenario)
    assert len(trims) == 1 and trims[0] >= 0.4 + 0.1 - EARLY, trims


def test_trimmer_does_not_trim_a_busy_server_and_spaces_its_trims(monkeypatch):
    async def scenario(t):
        t.started()
        t.finished()  # idle: would trim at 0.1
        await asyncio.sleep(0.04)
        t.started()  # busy again before that: no trim while it runs
        await asyncio.sleep(0.2)
        t.finished()  # at >= 0.24: trims at >= 0.34
        await asyncio.sleep(0.4)
        for _ in range(3):  # a burst after it: one more trim, not before that one + 0.6
            t.started()
            t.finished()
            await asyncio.sleep(0.02)

    trims = run_trimmer(monkeypatch, scenario)
    assert len(trims) == 2, trims
    assert trims[0] >= 0.24 + 0.1 - EARLY, trims
    assert trims[1] - trims[0] >= 0.6 - EARLY, trims


def test_an_idle_server_that_served_nothing_is_not_trimmed(monkeypatch):
    async def scenario(t):
        await asyncio.sleep(0.1)

    assert run_trimmer(monkeypatch, scenario) == []
