"""The one bounded store behind the request ledger and the worker's diagnostics store."""

import threading

import pytest

from lvlm_prune.vllm_plugin.bounded import BoundedStore
from lvlm_prune.vllm_plugin.processing.accounting import RequestCounts, RequestLedger
from lvlm_prune.vllm_plugin.worker.diagnostics import DiagnosticsStore


def test_evicts_the_entry_touched_longest_ago():
    store = BoundedStore(3)
    for key in "abc":
        store.put(key, [key])
    assert store.update("a", lambda v: v.append("again"))  # "a" is now the newest
    store.put("d", ["d"])
    assert store.get("b") is None and len(store) == 3
    assert store.get("a") == ["a", "again"]
    assert not store.update("zz", lambda v: v.append(1)), "a missing entry is not created"
    assert store.update("e", lambda v: v.append(1), create=list) and store.pop("e") == [1]
    assert store.pop("e") is None


def test_capacity_holds_under_concurrent_writers():
    store = BoundedStore(50)

    def write(offset):
        for i in range(2000):
            store.update(offset + i % 80, lambda v: v.append(1), create=list)

    threads = [threading.Thread(target=write, args=(1000 * t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 50


def test_ledger_and_diagnostics_store_are_bounded():
    ledger = RequestLedger(max_entries=2)
    for tag in ("t1", "t2", "t3"):
        ledger.expect(tag, diagnostics_id=7)
    ledger.add("t1", RequestCounts(0.5, "simignore", False, [(576, 288)]))  # evicted: ignored
    ledger.add("t3", RequestCounts(0.5, "simignore", False, [(576, 288)]))
    ledger.add("t3", RequestCounts(0.5, "simignore", False, [(576, 288)]))
    assert len(ledger) == 2 and not ledger.is_expected("t1", 7) and ledger.is_expected("t3", 7)
    assert not ledger.is_expected("t3", 8), "the diagnostics id must match its tag"
    assert ledger.pop("t3").per_image == [(576, 288), (576, 288)]
    assert ledger.pop("t1") is None

    store = DiagnosticsStore(max_entries=2)
    for diag_id in (1, 2, 3):
        store._entries.update(diag_id, lambda v: v.append({}), create=list)
    assert len(store) == 2 and store.pop([1, 2, 3]) == {2: [{}], 3: [{}]}


def test_zero_capacity_is_refused():
    with pytest.raises(ValueError, match="max_entries"):
        BoundedStore(0)
