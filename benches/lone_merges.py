"""Lone merges: random pairs (each page content present exactly twice, at random
places), ksm against kernel KSM side by side in the same run.

    python benches/lone_merges.py [--size 256M] [--rounds 3] [--no-kernel]

Every merge here is a lone one: a page merged with one other page, neither next
to anything it could extend into. With the default ``vm.max_map_count`` merging
stops at ksm's VMA budget, so the run raises it to 1,048,576 (and ksm's
``vma_reserve`` is held at half of the default limit, as it starts): every merge
is allowed, ksm and the kernel save the same pages, and the figures are the cost
of the merges alone. ``vm.max_map_count`` and every kernel KSM knob are put back
afterwards, on error too (kernel KSM: every knob as it was, then ``run=0``,
``pages_to_scan=100``, ``sleep_millisecs=20``); kernel KSM found running
(``run`` not 0: something else drives it) is left alone and not measured.

Per round and side: wall time from ``MADV_MERGEABLE`` until settled (ksm:
``stats()["settled"]``; kernel: a full scan that leaves ``pages_sharing``
unchanged), and the scanner's CPU over it (ksm: every thread but the main one;
the kernel: its ksmd thread), both divided by the pages saved
(``pages_sharing``). Medians over the rounds, and ksm / kernel ratios. The
workload, knobs and helpers are ``ksm bench``'s (``ksm._bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

from ksm import _bench

MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"
RAISED_MAP_COUNT = 1_048_576
PAGES_TO_SCAN = 10_000
KERNEL_DEFAULTS = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20"}


def one(side: _bench.Side, size: int, page: int, filler: _bench.Filler, timeout: float) -> dict[str, float]:
    buf = side.alloc(size)
    view = side.view(buf)
    try:
        filler.fill("pairs", view)
        before = _bench._digest(view)
        cpu0 = side.cpu_s()
        t0 = time.perf_counter()
        side.advise(buf)
        side.start()
        settled, scans = side.wait_settled(timeout, 50)
        wall = time.perf_counter() - t0
        cpu = side.cpu_s() - cpu0
        side.stop()
        sharing = int(side.counters(buf, size // page)["pages_sharing"] or 0)
        if not settled:
            raise RuntimeError(f"{side.name}: not settled after {scans} full scans, {wall:.1f} s")
        if _bench._digest(view) != before:
            raise RuntimeError(f"{side.name}: contents changed")
        side.unadvise(buf)
        return {"wall_s": wall, "cpu_s": cpu, "sharing": sharing, "scans": scans}
    finally:
        view.release()
        side.close(buf)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256M", help="buffer size (default 256M)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side (default 3)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per settle")
    p.add_argument("--no-kernel", action="store_true", help="ksm only")
    args = p.parse_args()
    size = _bench.parse_size(args.size)

    import ksm

    page = ksm.PAGE_SIZE
    kernel_reason = None if not args.no_kernel else "--no-kernel"
    if kernel_reason is None:
        kernel_reason = _bench.kernel_unavailable_reason()
    if kernel_reason is None and Path(f"{_bench.KSYS}/run").read_text().strip() != "0":
        # Something else drives the kernel's KSM (another benchmark?): leave it alone.
        kernel_reason = "kernel KSM is in use (run is not 0): not touched"
    saved_map_count = Path(MAX_MAP_COUNT).read_text().strip()
    saved_reserve = int(ksm.ksmd.vma_reserve)
    ksm_side = _bench.KsmSide(PAGES_TO_SCAN)
    kk = _bench.KernelKsm() if kernel_reason is None else None
    rows: dict[str, list[dict[str, float]]] = {"ksm": [], "kernel": []}
    try:
        try:
            Path(MAX_MAP_COUNT).write_text(f"{RAISED_MAP_COUNT}\n")
        except OSError as e:
            print(f"cannot raise vm.max_map_count ({e}): merges stop at the VMA budget", file=sys.stderr)
        ksm.ksmd.vma_reserve = 65_530 // 2
        sides: list[_bench.Side] = [ksm_side]
        if kk is not None:
            sides.append(_bench.KernelSide(kk, PAGES_TO_SCAN))
        for r in range(args.rounds):
            for side in sides:
                filler = _bench.Filler(page, 1000 + r, None)
                fig = one(side, size, page, filler, args.timeout)
                rows[side.name].append(fig)
                us = 1e6 / max(fig["sharing"], 1)
                print(
                    f"round {r + 1} {side.name:>6}: {fig['sharing']:,} pages saved in {fig['scans']:.0f} "
                    f"full scans, {fig['wall_s']:.3f} s wall ({fig['wall_s'] * us:.1f} µs/page), "
                    f"{fig['cpu_s']:.3f} s CPU ({fig['cpu_s'] * us:.1f} µs/page)",
                    file=sys.stderr,
                )
    finally:
        ksm_side.restore()
        ksm.ksmd.vma_reserve = saved_reserve
        if kk is not None:
            # Every knob back as it was (run=2 first unmerges what the kernel merged),
            # then the three this run changes at their defaults, whatever happened.
            errors = kk.restore()
            for name, value in KERNEL_DEFAULTS.items():
                try:
                    if kk.read(name) != value:
                        kk.write(name, value)
                except OSError as e:
                    errors.append(f"{name}={value}: {e}")
            for message in errors:
                print(f"kernel KSM: {message}", file=sys.stderr)
        with contextlib.suppress(OSError):
            Path(MAX_MAP_COUNT).write_text(f"{saved_map_count}\n")

    m = _bench.machine()
    print(
        f"machine: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, Linux {m.get('kernel', '?')}; "
        f"random pairs, {size / _bench.MIB:.0f} MiB, medians of {args.rounds} rounds"
    )
    print(f"{'':>8} {'saved':>8} {'wall s':>8} {'CPU s':>8} {'wall µs/page':>13} {'CPU µs/page':>12}")
    med: dict[str, tuple[float, float]] = {}
    for name, figs in rows.items():
        if not figs:
            continue
        saved = statistics.median(f["sharing"] for f in figs)
        wall = statistics.median(f["wall_s"] for f in figs)
        cpu = statistics.median(f["cpu_s"] for f in figs)
        wall_us = statistics.median(1e6 * f["wall_s"] / max(f["sharing"], 1) for f in figs)
        cpu_us = statistics.median(1e6 * f["cpu_s"] / max(f["sharing"], 1) for f in figs)
        med[name] = (wall_us, cpu_us)
        print(f"{name:>8} {saved:>8,.0f} {wall:>8.3f} {cpu:>8.3f} {wall_us:>13.1f} {cpu_us:>12.1f}")
    if "ksm" in med and "kernel" in med:
        (kw, kc), (nw, nc) = med["ksm"], med["kernel"]
        print(f"{'ratio':>8} {'':>8} {'':>8} {'':>8} {kw / nw:>13.2f} {kc / nc:>12.2f}   (ksm / kernel)")
    elif kernel_reason is not None:
        print(f"kernel KSM not run: {kernel_reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
