"""The interval arithmetic behind the benchmark's copy/compute overlap figures."""

from moetrain.bench.stream_overlap import overlap_summary, paging_window


def test_overlap_summary_against_hand_counted_intervals():
    events = [("h2d", 0, 10), ("h2d", 5, 20), ("d2h", 15, 30), ("kernel", 0, 8), ("kernel", 25, 40)]
    got = overlap_summary(events)
    assert got["h2d_busy_s"] * 1e6 == 20  # [0, 20]
    assert got["d2h_busy_s"] * 1e6 == 15  # [15, 30]
    assert got["both_directions_s"] * 1e6 == 5  # [15, 20]
    assert got["copies_busy_s"] * 1e6 == 30  # [0, 30]
    assert got["compute_busy_s"] * 1e6 == 23  # [0, 8] + [25, 40]
    assert got["copies_under_compute_s"] * 1e6 == 13  # [0, 8] + [25, 30]
    assert got["span_s"] * 1e6 == 40


def test_paging_window_splits_the_copy_span_by_link_use():
    # copies span [10, 60]: h2d [10, 30], d2h [20, 40], nothing [40, 50], h2d [50, 60]; kernels [0, 12] and [45, 48]
    events = [("kernel", 0, 12), ("h2d", 10, 30), ("d2h", 20, 40), ("kernel", 45, 48), ("h2d", 50, 60)]
    got = {k: round(v * 1e6, 6) for k, v in paging_window(events).items()}
    assert got == {"window_s": 50, "both_ways_s": 10, "one_way_s": 30, "link_idle_s": 10, "link_idle_gpu_busy_s": 3}
    assert paging_window([("kernel", 0, 5)]) == {}
