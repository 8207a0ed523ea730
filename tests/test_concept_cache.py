"""Concept slot table: refcounts, LRU eviction of unreferenced slots only, pins, counters."""

from __future__ import annotations

import pytest

from flas_vllm.engine.concept_cache import ConceptSlots, ConceptTableFull


def test_hits_misses_and_slot_reuse():
    t = ConceptSlots(2)
    s1, fresh1 = t.acquire("a")
    s2, fresh2 = t.acquire("a")
    assert (s1, fresh1, fresh2) == (s2, True, False)
    assert 1 <= s1 <= 2  # slot 0 is reserved for "no concept"
    assert t.stats.hits == 1 and t.stats.misses == 1


def test_lru_evicts_only_unreferenced_and_oldest():
    t = ConceptSlots(2)
    sa, _ = t.acquire("a")
    sb, _ = t.acquire("b")
    t.release(sa)
    t.release(sb)
    sa2, fresh = t.acquire("a")  # touch a: b is now the least recently used
    assert not fresh and sa2 == sa
    t.release(sa2)
    sc, fresh = t.acquire("c")
    assert fresh and sc == sb and t.slot_of("b") is None and t.slot_of("a") == sa
    assert t.stats.evictions == 1


def test_full_table_with_all_slots_held_raises_instead_of_corrupting():
    t = ConceptSlots(1)
    t.acquire("a")
    with pytest.raises(ConceptTableFull, match="max_concepts"):
        t.acquire("b")
    assert t.slot_of("a") == 1  # the held concept is untouched


def test_pins_have_their_own_budget_and_evict_unpins():
    t = ConceptSlots(1, max_pinned=1)
    slot, fresh = t.pin("a")
    assert fresh and t.stats.misses == 0  # a preload is not a request miss
    with pytest.raises(ConceptTableFull, match="max_pinned=1"):
        t.pin("b")
    sb, _ = t.acquire("b")  # traffic still has its max_concepts slot
    with pytest.raises(ConceptTableFull):
        t.acquire("c")  # b is held, a is pinned: nothing may be evicted
    t.release(sb)
    assert t.acquire("c")[1] and t.slot_of("b") is None and t.slot_of("a") == slot
    s, fresh = t.acquire("a")
    assert not fresh and t.stats.hits == 1
    assert not t.evict("a")  # still referenced: unpinned, dropped once released
    t.release(s)
    assert t.slot_of("a") == slot and t.evict("a") and t.slot_of("a") is None
    assert t.pin("d")[1]  # the pin budget is free again


def test_snapshot_counts_slots_in_use():
    t = ConceptSlots(3)
    t.acquire("a")
    t.acquire("b")
    snap = t.snapshot()
    assert snap["slots_in_use"] == 2 and snap["capacity"] == 3
    assert [e["concept"] for e in t.entries()] == ["a", "b"]
