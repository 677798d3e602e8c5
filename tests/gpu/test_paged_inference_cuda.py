"""The paged experts' grouped path on CUDA (``torch._grouped_mm`` over the expert cache's slot buffer) against
their per-expert loop, in bf16, with a cache smaller than the layer's experts (a layer runs in several groups)
and with int8 slots (gathered and dequantized).

Tolerance, from the math: both paths read the same bf16 operands and accumulate in fp32; they differ only in
where bf16 roundings (unit roundoff u = 2**-8) fall. Against the exact result (fp64 from the same bf16
operands), the gate and up outputs are rounded once each and ``silu(g) * u`` once more: with |silu'| <= 1.1 and
|silu(g)| <= |g|, an intermediate ``h`` is off by at most (1.1 + 1 + 1) u |g| |u| = 3.1 u |g||u|; the down
projection's output adds u |y|, the combine weight's product u, and the bf16 ``index_add_`` over the top-k one u
per term (fp32 accumulation inside the GEMMs, K * 2**-24, is below all of these). With
M[t, i] = sum_k |w_tk| (|W_down| @ (|g| * |u|))[i] >= every one of those magnitudes, each path is within
(3.1 + 1 + 1 + k) u M of the exact result, and the two paths within twice that of each other.
"""

import pytest
import torch

from moetrain.inference.cache import ExpertCache
from moetrain.inference.paged import GROUPED_MIN_TOKENS, PagedExperts
from moetrain.inference.store import HostExpertStore
from moetrain.models.router import Routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="needs CUDA sm90+ (the grouped kernel)")

E, H, WIDTH, K, TOKENS, SLOTS = 8, 128, 64, 2, 96, 5
U = 2.0**-8
PATH_BOUND = 3.1 + 1 + 1 + K
"""Each path's error against the exact result, in units of u * M (the module docstring)."""


def _routing(tokens: int) -> Routing:
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])  # (T, k)
    weight = torch.rand(tokens, K, generator=g)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    return Routing(topk_idx=idx.cuda(), topk_weight=weight.cuda(), counts=counts.cuda(),
                   logits=torch.zeros(tokens, E, device="cuda"), aux_loss=torch.zeros((), device="cuda"))


def _experts(quantize: bool) -> tuple[PagedExperts, list[tuple[torch.Tensor, ...]]]:
    """Paged experts of one layer over ``SLOTS`` slots, and each expert's (gate, up, down) as the cache serves
    them (bf16, dequantized when int8)."""
    torch.manual_seed(0)
    store = HostExpertStore([0], E, H, WIDTH, dtype=torch.bfloat16, quantize=quantize, pin=True)
    for e in range(E):
        for proj, shape in enumerate(store.shapes()):
            store.put(0, e, proj, weight=torch.randn(shape) * 0.2)
    cache = ExpertCache(store, SLOTS, torch.device("cuda"), staging_slots=1)
    served = []
    for e in range(E):
        got = cache.acquire(0, [e])
        served.append(tuple(w.double() for w in cache.weights(got.slots[0], torch.bfloat16)))
        cache.release(got)
    return PagedExperts(cache, 0, next_router=None, next_layer=None, prefetch=False), served


def _exact_and_bound(x: torch.Tensor, routing: Routing, served) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact output (T, H), M (T, H)) in fp64 from the bf16 operands."""
    x = x.double()
    exact = torch.zeros_like(x)
    bound = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(K):
            e, w = int(routing.topk_idx[t, slot]), float(routing.topk_weight[t, slot])
            wg, wu, wd = served[e]
            g, u = wg @ x[t], wu @ x[t]
            exact[t] += w * (wd @ (torch.nn.functional.silu(g) * u))
            bound[t] += abs(w) * (wd.abs() @ (g.abs() * u.abs()))
    return exact, bound


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "int8"])
def test_grouped_path_over_the_slots_equals_the_loop(quantize, monkeypatch):
    import moetrain.inference.paged as paged_module

    experts, served = _experts(quantize)
    routing = _routing(TOKENS)
    x = (torch.randn(TOKENS, H, generator=torch.Generator().manual_seed(2)) * 0.5).to("cuda", torch.bfloat16)
    assert experts.use_grouped(x, TOKENS) and not experts.use_grouped(x, 1)  # auto: prefill grouped, decode loop
    assert GROUPED_MIN_TOKENS <= TOKENS

    calls = []
    grouped = paged_module.grouped_swiglu_forward
    monkeypatch.setattr(paged_module, "grouped_swiglu_forward",
                        lambda *a, **k: calls.append(k["wg"].shape) or grouped(*a, **k))
    with torch.no_grad():
        experts.impl = "loop"
        loop = experts(x, routing).double()
        experts.impl = "grouped"
        got = experts(x, routing).double()
    torch.cuda.synchronize()
    assert len(calls) >= 2  # 8 experts through 5 slots: the layer ran in groups
    exact, m = _exact_and_bound(x, routing, served)
    assert ((loop - exact).abs() <= PATH_BOUND * U * m).all()
    assert ((got - exact).abs() <= PATH_BOUND * U * m).all()
    assert ((got - loop).abs() <= 2 * PATH_BOUND * U * m).all()
    assert (PATH_BOUND * U * m).median() < exact.abs().median()  # not vacuous: a wrong expert's output fails it


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_a_layer_larger_than_the_cache_keeps_what_fits(impl):
    """8 experts through 5 slots, call after call: the groups reuse the staging slot on the copy stream (its copy
    waits for the last group's kernels), the main slots keep their experts, so the second call hits at least those,
    and both calls are within the bound of the exact result (the loop's two calls are the same kernels: equal)."""
    experts, served = _experts(False)
    experts.impl = impl
    routing = _routing(TOKENS)
    x = (torch.randn(TOKENS, H, generator=torch.Generator().manual_seed(3)) * 0.5).to("cuda", torch.bfloat16)
    cache = experts.cache
    with torch.no_grad():
        first = experts(x, routing).double()
        cache.reset_stats()
        second = experts(x, routing).double()
    torch.cuda.synchronize()
    assert cache.stats.demands == E and cache.stats.hits >= cache.main_slots
    exact, m = _exact_and_bound(x, routing, served)
    for out in (first, second):
        assert ((out - exact).abs() <= PATH_BOUND * U * m).all()
    if impl == "loop":
        assert torch.equal(first, second)
