"""Sample a process's private host memory and say where it lives (a diagnostic for scripts/bisect_host_growth.sh).

Every ``--every`` seconds it reads RssAnon of the newest process whose command line contains ``--match``; when
that process exits it prints one ``SAMPLER`` JSON line: the RssAnon series (GiB, seconds since start) and, from
``/proc/PID/smaps`` at the largest sample, how the anonymous memory is laid out: the ``[heap]`` (brk: glibc's main
arena), mappings by size class (glibc's other arenas are 64 MiB mappings; a large ``malloc`` is a mapping of its
own size) and the ten largest.

    python3 scripts/host_growth_sampler.py --match default_root_dir=/tmp/run --every 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

from moetrain.training.telemetry import proc_gib


def find_pid(match: str) -> int | None:
    """The newest pid whose command line contains ``match`` (not this sampler's)."""
    best = None
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if match in cmd and "host_growth_sampler" not in cmd and "timeout" not in cmd.split(" ")[0]:
            best = max(best or 0, int(name))
    return best


def smaps_layout(pid: int) -> dict:
    """Anonymous memory of ``pid`` by mapping: heap, size classes, the ten largest (GiB)."""
    maps: list[tuple[float, float, str]] = []  # (anonymous GiB, mapping size GiB, name)
    size = name = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and not head[0].endswith(":"):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    size, name = (hi - lo) / 2**30, head[5] if len(head) > 5 else ""
                elif head[0] == "Anonymous:" and int(head[1]):
                    maps.append((int(head[1]) / 2**20, size, name))
    except OSError:
        return {}
    classes = {"<1MiB": 0.0, "1-63MiB": 0.0, "64MiB (arena)": 0.0, "65MiB-1GiB": 0.0, ">1GiB": 0.0}
    counts = dict.fromkeys(classes, 0)
    heap = 0.0
    for anon, sz, nm in maps:
        if nm == "[heap]":
            heap += anon
            continue
        mib = sz * 1024
        key = ("<1MiB" if mib < 1 else "1-63MiB" if mib < 63.5 else "64MiB (arena)" if mib <= 64.5
               else "65MiB-1GiB" if mib <= 1024 else ">1GiB")
        classes[key] += anon
        counts[key] += 1
    top = sorted(maps, reverse=True)[:10]
    return {"heap_gib": round(heap, 3), "by_class_gib": {k: round(v, 3) for k, v in classes.items()},
            "by_class_count": counts, "largest": [[round(a, 3), round(s, 3), n] for a, s, n in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--match", required=True, help="a string of the process's command line")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the process to appear")
    args = ap.parse_args()
    t0 = time.monotonic()
    pid = None
    while pid is None and time.monotonic() - t0 < args.wait:
        pid = find_pid(args.match)
        time.sleep(0.5)
    if pid is None:
        print("SAMPLER " + json.dumps({"error": f"no process matching {args.match!r}"}), flush=True)
        return
    series, peak, layout = [], -1.0, {}
    while True:
        gib = proc_gib(f"/proc/{pid}/status", {"RssAnon": "anon"}).get("anon")  # None once it has ended
        if gib is None:
            break
        series.append([round(time.monotonic() - t0, 1), round(gib, 2)])
        if gib > peak + 0.25:  # the layout at (near) the largest sample
            peak = gib
            layout = smaps_layout(pid) or layout
        time.sleep(args.every)
    print("SAMPLER " + json.dumps({"pid": pid, "peak_rss_anon_gib": round(peak, 2), "layout_at_peak": layout,
                                   "series": series[::max(1, len(series) // 40)]}), flush=True)


if __name__ == "__main__":
    main()
