"""The quiet-machine guard (``common.QuietGuard``) with a scripted CPU meter: which rounds count,
when more rounds run, when a run is marked. No engine."""

from __future__ import annotations

import argparse

import pytest

from lvlm_prune.benchmarks import common


@pytest.fixture
def scripted(monkeypatch):
    """Co-tenant shares the guard will read, one per timed sample; the waits it asked for."""
    shares: list[float] = []
    waits: list[float] = []

    class Meter:
        def __init__(self, processes=()) -> None:
            self.value = shares.pop(0)

        def share(self) -> float:
            return self.value

    monkeypatch.setattr(common, "CpuMeter", Meter)
    monkeypatch.setattr(
        common, "wait_for_quiet", lambda limit, processes, **k: waits.append(k["timeout"]) or 0.01
    )
    return shares, waits


def run(guard: common.QuietGuard, warmup: int, repeats: int, samples_per_round: int = 2):
    """Rounds as a benchmark runs them: each sample timed, its value the round number."""
    values = []
    for round_ in guard.rounds(warmup, repeats):
        for _ in range(samples_per_round):
            with guard.timer():
                pass
        if round_ >= warmup:
            values.append(round_)
    return values


def test_a_noisy_round_is_left_out_and_run_again(scripted):
    shares, waits = scripted
    # warm-up (2 samples), then rounds 1..4: round 2 has one noisy sample.
    shares += [0.9, 0.9] + [0.01, 0.02] + [0.02, 0.5] + [0.0, 0.05] + [0.1, 0.0]
    guard = common.QuietGuard(wait=60)
    values = run(guard, warmup=1, repeats=3)
    assert values == [1, 2, 3, 4]  # the warm-up's shares count for nothing
    assert guard.quiet(values) == [1, 3, 4]  # 0.1 is at the limit, not above
    assert [r["noisy"] for r in guard.log] == [False, True, False, False]
    assert waits == [60] * 4  # each measured round waited for a quiet machine first
    record = guard.record()
    assert (record["quiet_rounds"], record["noisy_rounds"], record["marked"]) == (3, 1, False)
    assert record["rounds"][1]["cotenant_during_max"] == 0.5
    assert "3 quiet measured rounds of 4" in common.quiet_markdown(record)
    assert "Marked" not in common.quiet_markdown(record)


def test_a_run_that_never_quiets_down_is_marked(scripted):
    shares, _ = scripted
    shares += [0.3] * 8  # 2 repeats + 2 extra rounds, 2 samples each
    guard = common.QuietGuard(wait=0)
    values = run(guard, warmup=0, repeats=2)
    assert values == [0, 1, 2, 3]  # repeats + max(2, repeats // 2) rounds, then it stops
    assert guard.quiet(values) == values  # nothing quiet: the table shows what it saw
    record = guard.record()
    assert record["marked"] and record["quiet_rounds"] == 0
    assert "not a headline" in common.quiet_markdown(record)
    with pytest.raises(ValueError):
        guard.quiet(values[:-1])  # one value per measured round, or it is a bug


def test_smoke_runs_glance_and_real_runs_wait():
    smoke = common.QuietGuard.for_run(argparse.Namespace(quiet_wait=0))
    real = common.QuietGuard.for_run(argparse.Namespace(quiet_wait=300))
    assert (smoke.wait, smoke.window) == (0, 0.1)
    assert (real.wait, real.window) == (300, 2.0)
