"""Fixed-capacity concept slot table: refcounted by in-flight requests, LRU-evicted when free.

Only bookkeeping lives here (which concept sits in which slot, who holds it);
the tensors the slots index are owned by the model runtime. Slot 0 is reserved
for "no concept" so that unsteered tokens always index something valid.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class ConceptCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    encode_seconds: float = 0.0
    encoded: int = 0

    def as_dict(self, slots_in_use: int, capacity: int) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "encode_seconds": round(self.encode_seconds, 6),
            "encoded": self.encoded,
            "slots_in_use": slots_in_use,
            "capacity": capacity,
        }


class ConceptTableFull(RuntimeError):
    """Every slot is held by an in-flight request; the scheduler patch keeps this from happening."""


@dataclass
class _Slot:
    concept: str
    refs: int = 0
    pinned: bool = False
    hits: int = 0


class ConceptSlots:
    """Which concept holds which slot: `capacity` slots for in-flight concepts plus `max_pinned` for
    preloaded ones, refcounted, evicted LRU. Bookkeeping only: the slots' concept keys and values
    live in `SlotTableKV` (slot_table.py).

    The scheduler admits at most `capacity` distinct concepts in flight; pins
    have their own budget, so a full set of pins can never starve traffic.
    """

    def __init__(self, capacity: int, max_pinned: int = 0):
        if capacity < 1:
            raise ValueError(f"max_concepts must be >= 1, got {capacity}")
        self.max_pinned = max_pinned
        capacity = capacity + max_pinned
        self.capacity = capacity
        self._by_concept: dict[str, int] = {}
        self._slots: dict[int, _Slot] = {}
        self._free: list[int] = list(range(capacity, 0, -1))  # slot ids 1..capacity
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced, unpinned, oldest first
        self.stats = ConceptCacheStats()

    def acquire(self, concept: str) -> tuple[int, bool]:
        """Take a reference on `concept`'s slot. Returns (slot, needs_encoding)."""
        slot = self._by_concept.get(concept)
        if slot is not None:
            entry = self._slots[slot]
            entry.refs += 1
            entry.hits += 1
            self._lru.pop(slot, None)
            self.stats.hits += 1
            return slot, False
        slot = self._take_slot()
        self._slots[slot] = _Slot(concept=concept, refs=1)
        self._by_concept[concept] = slot
        self.stats.misses += 1
        return slot, True

    def release(self, slot: int) -> None:
        entry = self._slots.get(slot)
        if entry is None or entry.refs <= 0:
            return
        entry.refs -= 1
        if entry.refs == 0 and not entry.pinned:
            self._lru[slot] = None

    def pin(self, concept: str) -> tuple[int, bool]:
        """Keep a concept resident regardless of traffic (preloading)."""
        slot = self._by_concept.get(concept)
        if (slot is None or not self._slots[slot].pinned) and self.pinned_count >= self.max_pinned:
            raise ConceptTableFull(
                f"cannot pin {concept!r}: {self.pinned_count} concepts are pinned, the limit is "
                f"max_pinned={self.max_pinned}; evict some first"
            )
        slot, fresh = self.acquire(concept)
        entry = self._slots[slot]
        entry.pinned = True
        entry.refs -= 1
        if not fresh:
            self.stats.hits -= 1  # a preload is not a request hit
            entry.hits -= 1
        else:
            self.stats.misses -= 1
        return slot, fresh

    def evict(self, concept: str) -> bool:
        """Unpin a concept and drop it if no request holds it; False if absent or still in use."""
        slot = self._by_concept.get(concept)
        if slot is None:
            return False
        entry = self._slots[slot]
        entry.pinned = False
        if entry.refs > 0:
            return False
        self._drop(slot)
        return True

    @property
    def pinned_count(self) -> int:
        return sum(1 for e in self._slots.values() if e.pinned)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if not self._lru:
            raise ConceptTableFull(
                f"all {self.capacity} concept slots are held by in-flight requests or pinned (max_concepts)"
            )
        slot, _ = self._lru.popitem(last=False)
        self._drop(slot, to_free=False)
        self.stats.evictions += 1
        return slot

    def _drop(self, slot: int, to_free: bool = True) -> None:
        entry = self._slots.pop(slot)
        del self._by_concept[entry.concept]
        self._lru.pop(slot, None)
        if to_free:
            self._free.append(slot)

    def slot_of(self, concept: str) -> int | None:
        return self._by_concept.get(concept)

    @property
    def in_use(self) -> int:
        return len(self._slots)

    def entries(self) -> list[dict]:
        return [
            {"concept": e.concept, "slot": s, "refs": e.refs, "pinned": e.pinned, "hits": e.hits}
            for s, e in sorted(self._slots.items())
        ]

    def snapshot(self) -> dict:
        return self.stats.as_dict(self.in_use, self.capacity)
