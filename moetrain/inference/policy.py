"""Replacement policies of the device-side expert cache (:class:`~moetrain.inference.cache.ExpertCache`), and what
a prefetch may do while the link is busy.

A policy ranks the (layer, expert) entries of the main slots: which one makes room (:meth:`CachePolicy.victim`),
whether a demanded expert deserves a main slot (:meth:`CachePolicy.admit`), and whether a *predicted* expert
may push a cached one out (:meth:`CachePolicy.prefetch_may_evict`). A prefetch is a guess (the next layer's
router applied to this layer's input is right about one time in two on a random Mixtral-shaped model: the likeliest
of a decode token's two guesses 0.54 of the time, the other 0.41), so it may only take the place of an entry the
policy values less than the guessed expert, and until its layer demands it the guess is valued least of all (a wrong
guess is the next entry to go, not the entries next to it).

Prefetch while the link is busy (``prefetch_when_busy``, :func:`busy_guesses`)
-------------------------------------------------------------------------------
A layer that missed experts offers its guesses for the next layer while the link still carries those misses. A
guess queued behind them arrives about when its own miss would have (no time saved) but counts as a hit and stays
cached; a wrong one delays the next layer's misses by a copy. ``never`` copies none of them, ``first`` the
likeliest (:func:`~moetrain.inference.paged.likely_experts`), ``always`` all. The default is ``first``.

Measured on an H200 (``moetrain bench paged_generate --preset mixtral-8x7b --layers 4``: 32 experts of 352 MB, 22
slots = 70% of their bytes, 63 decode tokens; link 54 GB/s; targets: time <= 1.3 x the floor = resident + misses
at the link rate, hit rate >= 0.95 x the ideal static cache's on the same trace):

============================  ========  ========  =========  ========  ==============  ================
run                           ms/token  vs floor  hit/ideal  GB/token  wasted GB/tok.  prefetched/used
============================  ========  ========  =========  ========  ==============  ================
p2, old prefetch, LRU         43.2      1.42      0.82       2.09
p2, old prefetch, LFU         32.0      1.40      1.00       1.52      0.40            173/102
q3, ``never``, LRU            30.4      1.041     0.879      1.197     0.134           65/41
q3, ``never``, LFU            25.6      0.941     0.926      1.040     0.112           56/36
r4, ``first``, LRU            28.1      1.340     0.946      1.348     0.263           119/72
r4, ``first``, LFU            26.1      1.266     0.953      1.169     0.229           90/49
============================  ========  ========  =========  ========  ==============  ================

Run r4 measured the default (``first``): LFU meets both targets (1.27 of the floor, 0.953 of the ideal's hit rate),
LRU neither (1.34, 0.946), so the cache's default policy is LFU (:class:`~moetrain.inference.config.InferenceConfig`,
``moetrain generate --cache_policy``). The surrogate below had predicted LFU ``first`` at 1.02 of the floor and 0.966
of the ideal: the hit rate within its spread, the time ratio not (r4's floor is lower than q3's: fewer misses).

``never`` met the time target with room and missed the hit target (q3 offered a decode token's two guesses in
the order of their ids; the router's order, now, moves the figures below by under 0.002). The choice among the
settings rests on predictions of :mod:`moetrain.inference.surrogate`: twelve routing traces recorded on the CPU
from random Mixtral-8x7B-shaped models of the bench's shape (three weight seeds x four prompts,
``tests/inference/data/mixtral_4l_routing.json``; the GPU run's own trace was not recorded, and the GPU draws other
weights), replayed through this cache and timed by a model of the host, the compute stream and the copy stream
fitted to q3 (:func:`~moetrain.inference.surrogate.calibrate`: GPU work as long as 0.75 x the host's launches, half
of a layer's launches before its read of the routed experts). Calibration, ``never`` (mean [min, max] over the
traces, q3 measured beside):

=====  ===================  ===================  ====================  ========  ===================
q3     ms/token             vs floor             hit/ideal             GB/token  pf/used/skipped
=====  ===================  ===================  ====================  ========  ===================
LRU    28.2 [26.6, 30.1]    0.996 [0.953, 1.048] 0.890 [0.826, 0.956]  1.101     56/33/67
       measured 30.4        measured 1.041       measured 0.879        1.197     65/41/62
LFU    26.0 [24.0, 28.1]    0.994 [0.976, 1.020] 0.941 [0.907, 0.966]  0.948     50/31/71
       measured 25.6        measured 0.941       measured 0.926        1.040     56/36/91
=====  ===================  ===================  ====================  ========  ===================

q3's figures lie within the traces' spread (its LFU hit rate at the hard end: its trace is harder than most of
the twelve) but for LRU's time (30.4 ms, the traces' slowest 30.1), LFU's vs floor (0.941, the lowest 0.976) and
LFU's skipped guesses (91, the most 86); the model gives LRU and LFU the same vs floor where q3 measured 1.04 and
0.94, so its vs floor is good to about +-0.05. (The previous surrogate, which started a layer's compute after its
last copy, predicted 1.10-1.13 for ``never``.) Predicted per setting over the twelve traces (``both``: traces
meeting both targets; GB and wasted GB a token):

==============  ========  ====================  ====================  =====  ======  =====
setting         ms/token  vs floor              hit/ideal             GB     wasted  both
==============  ========  ====================  ====================  =====  ======  =====
LRU ``never``   28.2      0.996 [0.953, 1.048]  0.890 [0.826, 0.956]  1.101  0.128   1/12
LRU ``first``   27.9      1.144 [1.110, 1.187]  0.984 [0.936, 1.022]  1.189  0.266   10/12
LRU ``always``  28.5      1.187 [1.141, 1.246]  0.994 [0.948, 1.024]  1.235  0.330   11/12
LFU ``never``   26.0      0.994 [0.976, 1.020]  0.941 [0.907, 0.966]  0.948  0.105   4/12
LFU ``first``   26.3      1.075 [1.043, 1.098]  0.981 [0.934, 1.005]  1.047  0.192   11/12
LFU ``always``  26.7      1.099 [1.067, 1.121]  0.987 [0.947, 1.005]  1.070  0.214   11/12
==============  ========  ====================  ====================  =====  ======  =====

and on q3's own trace: q3's measured ``never`` figures plus each trace's change from ``never`` (vs floor: times
each trace's ratio), mean [min, max] over the traces:

==============  ========  ====================  ====================  =====  ======
setting         ms/token  vs floor              hit/ideal             GB     wasted
==============  ========  ====================  ====================  =====  ======
LRU ``first``   30.1      1.197 [1.137, 1.260]  0.973 [0.924, 1.023]  1.286  0.272
LRU ``always``  30.7      1.242 [1.194, 1.317]  0.983 [0.936, 1.045]  1.332  0.336
LFU ``first``   25.9      1.018 [0.994, 1.054]  0.966 [0.948, 0.993]  1.139  0.198
LFU ``always``  26.3      1.040 [1.022, 1.073]  0.971 [0.953, 0.993]  1.162  0.221
==============  ========  ====================  ====================  =====  ======

Other candidates, evaluated the same way and not offered: a guess allowed while busy when its expert is routed at
least as often as its layer's average expert (the expected value of the guess): hit/ideal LRU 0.957, LFU 0.947
(a frequent expert is already cached, so LFU gains little); at most three copies queued by a layer call, misses
included: hit/ideal LRU 0.971 at 1.153 of the floor, LFU 0.988 at 1.099 (no better than ``always``); LFU with counts
decayed by 0.99 a demand: 0.915 (``never``), 0.946 (``first``), worse than whole-run counts on these stationary
traces; three staging slots instead of five: LFU ``first`` 0.980, ``always`` 0.983 with no trace below 0.957 (a
change of the cache's layout, for prefill and validation too: left for a GPU run to confirm). The decode time
barely moves between the settings (a busy guess that is right costs no time, a wrong one only where the next layer
misses too); what rises is vs floor, since every prefetch hit takes a miss out of the floor.

``first`` is the default: both policies meet both targets on average, LFU on 11 of the 12 traces and LRU on 10;
``always`` adds 0.006 (LFU) and 0.010 (LRU) to hit/ideal for 2-4% more bytes a token (11-24% more wasted), and on
q3's trace would take LRU's vs floor to 1.24, up to 1.32 (over the target), where ``first`` stays at 1.20, up to
1.26. On q3's trace LFU ``first`` is predicted at 0.966 of the ideal's hit rate (0.948 at the worst) and 1.02 of the
floor. These are predictions, to be checked on the GPU with::

    python -m moetrain.cli bench paged_generate --preset mixtral-8x7b --layers 4 --make_dir DIR --new_tokens 64

(``--prefetch_when_busy never|first|always``; ``python -m moetrain.inference.surrogate
tests/inference/data/mixtral_4l_routing.json --calibrate`` prints the predictions and refits the timing.)
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


PREFETCH_WHEN_BUSY: tuple[str, ...] = ("never", "first", "always")
"""Which guesses :meth:`ExpertCache.prefetch` copies while the link still carries the current layer's misses."""
DEFAULT_PREFETCH_WHEN_BUSY = "first"
"""The default of ``prefetch_when_busy`` (see the module docstring for the measurements and predictions)."""
CACHE_POLICIES: tuple[str, ...] = ("lru", "lfu")
"""The expert cache's replacement policies (:func:`make_policy`)."""
DEFAULT_CACHE_POLICY = "lfu"
"""The default policy: the one that met both targets of run r4 (module docstring)."""


def busy_guesses(mode: str, wanted: list[Key]) -> list[Key]:
    """The guesses of ``wanted`` (likeliest first, none on the device) to copy while the link carries the current
    layer's misses: none (``never``), the likeliest (``first``) or all (``always``)."""
    if mode == "never":
        return []
    if mode == "first":
        return wanted[:1]
    if mode == "always":
        return list(wanted)
    raise ValueError(f"prefetch_when_busy={mode!r}: choose one of {', '.join(PREFETCH_WHEN_BUSY)}")


def make_policy(name: str) -> CachePolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    raise ValueError(f"cache policy {name!r}: choose lru or lfu")
