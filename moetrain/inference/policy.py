"""Replacement policies of the device-side expert cache (:class:`~moetrain.inference.cache.ExpertCache`).

A policy ranks the (layer, expert) entries of the main slots: which one makes room (:meth:`CachePolicy.victim`),
whether a demanded expert deserves a main slot (:meth:`CachePolicy.admit`), and whether a *predicted* expert
may push a cached one out (:meth:`CachePolicy.prefetch_may_evict`). A prefetch is a guess (the next layer's
router applied to this layer's input is right about two times in three on a Mixtral-shaped model), so it may
only take the place of an entry the policy values less than the guessed expert, and until its layer demands it
the guess is valued least of all (a wrong guess is the next entry to go, not the entries next to it).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Optional

Key = tuple[int, int]
"""(layer, expert)."""


class CachePolicy:
    """Which cached expert makes room, and whether an incoming one deserves a main slot."""

    def touch(self, key: Key) -> None:
        """``key`` was demanded (hit or miss)."""
        raise NotImplementedError

    def admit(self, key: Key, victim: Key, *, scan: bool = False) -> bool:
        """Whether ``key`` (not cached) should replace ``victim`` (cached). ``scan``: ``key``'s layer routes to more
        experts in this call than the cache has slots (a prefill or validation batch on a small cache)."""
        raise NotImplementedError

    def prefetch_may_evict(self, key: Key, victim: Key) -> bool:
        """Whether a prefetch of ``key`` (predicted, not demanded yet) may replace ``victim`` (cached)."""
        raise NotImplementedError

    def victim(self, cached: Iterable[Key]) -> Optional[Key]:
        """The entry of ``cached`` (those that may be evicted now) to evict first, or None if empty."""
        raise NotImplementedError

    def inserted(self, key: Key, *, prefetch: bool = False) -> None:
        """``key`` took a main slot (``prefetch``: on a guess, not demanded yet)."""

    def evicted(self, key: Key) -> None:
        """``key`` left its main slot."""


class LRUPolicy(CachePolicy):
    """Least recently used: every miss is cached, evicting the entry demanded longest ago; except a scan's.

    A layer that routes to more experts than the cache has slots cannot keep them all, and if its misses evicted
    the other layers' experts, every layer after it would do the same: the whole cache turns over in each call and
    the next call finds nothing (LRU on a cyclic trace longer than the cache hits nothing). Its misses therefore
    take free main slots only, and pass through the staging slots otherwise (scan resistance).

    A prefetched expert enters at the least recently used end and moves to the other end only when demanded: a
    wrong guess costs the one entry it replaced (the one the next miss would have replaced anyway) and is itself
    the next to go.
    """

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        if key in self.order:
            self.order.move_to_end(key)

    def admit(self, key: Key, victim: Key, *, scan: bool = False) -> bool:
        return not scan

    def prefetch_may_evict(self, key: Key, victim: Key) -> bool:
        return True  # the victim is the least recently demanded entry; the guess is for the very next layer

    def victim(self, cached: Iterable[Key]) -> Optional[Key]:
        allowed = set(cached)
        return next((k for k in self.order if k in allowed), None)

    def inserted(self, key: Key, *, prefetch: bool = False) -> None:
        self.order[key] = None
        if prefetch:
            self.order.move_to_end(key, last=False)

    def evicted(self, key: Key) -> None:
        self.order.pop(key, None)


class LFUPolicy(CachePolicy):
    """Least frequently used, with the counts of the whole run (evicted experts keep theirs): an expert
    replaces the least frequent cached one only if it is now more frequent. On a stationary routing
    distribution the cache converges to the most frequent experts, i.e. to the ideal static set.

    A prefetch follows the same order with the guessed expert's count as it stands (its demand is not counted
    before it happens): it never replaces an expert demanded more often, and of two experts demanded equally often
    LFU keeps the more recent one, which the guess (for the very next layer) is."""

    def __init__(self) -> None:
        self.counts: Counter[Key] = Counter()
        self.last: dict[Key, int] = {}
        self.clock = 0

    def touch(self, key: Key) -> None:
        self.clock += 1
        self.counts[key] += 1
        self.last[key] = self.clock

    def admit(self, key: Key, victim: Key, *, scan: bool = False) -> bool:
        return self.counts[key] > self.counts[victim]  # a scan too: the counts already resist it

    def prefetch_may_evict(self, key: Key, victim: Key) -> bool:
        return self.counts[key] >= self.counts[victim]

    def victim(self, cached: Iterable[Key]) -> Optional[Key]:
        return min(cached, key=lambda k: (self.counts[k], self.last.get(k, 0)), default=None)


def make_policy(name: str) -> CachePolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    raise ValueError(f"cache policy {name!r}: choose lru or lfu")
