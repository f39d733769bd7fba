"""The first full scan of unique pages (every page read and hashed) on 1 and more hash threads.

    python benches/hash_threads.py [--mib 1024] [--runs 5] [--threads 1,2] [--ksmd]

For memory ksm owns (``ksm.mmap``) and memory it does not (a private ``mmap`` advised
with ``ksm.madvise``, read fault-safely): the wall time and the process CPU time of
``ksm.scan(1)`` right after ``madvise``, medians of ``--runs`` runs, the thread counts
alternating run by run so that a noisy machine weighs on each alike.

With ``--ksmd``, instead: ``ksm.mmap`` memory scanned by ksmd (``pages_to_scan=100000``,
``sleep_millisecs=0``, as ``ksm bench`` runs it) from ``madvise`` until settled (two
full scans), and the CPU time of every thread but this one (which polls ``stats()``).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import time
from array import array

import ksm

PAGE = ksm.PAGE_SIZE


def unique_pages(mib: int) -> bytearray:
    """``mib`` MiB of pages that all differ (each starts with its index)."""
    data = bytearray(mib << 20)
    words = memoryview(data).cast("Q")
    words[:: PAGE // 8] = array("Q", range(len(data) // PAGE))
    return data


def first_scan(data: bytearray, owned: bool) -> tuple[float, float, int]:
    """Seconds and CPU seconds of the first full scan of ``data`` copied into fresh memory."""
    if owned:
        m = ksm.mmap(len(data))
        m[:] = data
        advise = (m.address, len(data))
    else:
        buf = mmap.mmap(-1, len(data), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf[:] = data
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        advise = (address, len(data))
    try:
        ksm.madvise(*advise, ksm.MADV_MERGEABLE)
        hashed = ksm.stats()["pages_hashed"]
        t0, c0 = time.perf_counter(), time.process_time()
        ksm.scan(1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        hashed = ksm.stats()["pages_hashed"] - hashed
        ksm.madvise(*advise, ksm.MADV_UNMERGEABLE)
    finally:
        if owned:
            m.close()
        else:
            buf.close()
    return wall, cpu, hashed


def ksmd_settles(data: bytearray) -> tuple[float, float, int]:
    """Seconds from ``madvise`` until ksmd has settled on a copy of ``data``, and the CPU
    seconds of every thread but this one meanwhile."""
    ksm.ksmd.pages_to_scan = 100_000
    ksm.ksmd.sleep_millisecs = 0
    with ksm.mmap(len(data)) as m:
        m[:] = data
        scans, hashed = ksm.stats()["full_scans"], ksm.stats()["pages_hashed"]
        t0, c0 = time.perf_counter(), time.process_time() - time.thread_time()
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.ksmd.run = 1
        while not ((s := ksm.stats())["settled"] and s["full_scans"] - scans >= 2):
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - time.thread_time() - c0
        ksm.ksmd.run = 0
        m.madvise(ksm.MADV_UNMERGEABLE)
    return wall, cpu, s["pages_hashed"] - hashed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="hash_threads values, comma-separated")
    ap.add_argument("--ksmd", action="store_true", help="ksmd from madvise to settled instead")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    data = unique_pages(args.mib)
    what = "ksmd, madvise to settled, on" if args.ksmd else "first full scan of"
    print(f"{what} {args.mib} MiB of unique pages, medians of {args.runs} runs")
    for owned in (True,) if args.ksmd else (True, False):
        times: dict[int, list[tuple[float, float]]] = {t: [] for t in threads}
        for _ in range(args.runs):
            for t in threads:
                ksm.ksmd.hash_threads = t
                wall, cpu, hashed = ksmd_settles(data) if args.ksmd else first_scan(data, owned)
                assert hashed >= len(data) // PAGE, hashed
                times[t].append((wall, cpu))
        kind = "ksm.mmap" if owned else "foreign "
        base = statistics.median(w for w, _ in times[threads[0]])
        for t in threads:
            wall = statistics.median(w for w, _ in times[t])
            cpu = statistics.median(c for _, c in times[t])
            print(
                f"{kind} hash_threads={t}: {wall * 1000:7.1f} ms wall ({base / wall:.2f}x), "
                f"{cpu * 1000:7.1f} ms CPU, runs {', '.join(f'{w * 1000:.0f}' for w, _ in times[t])} ms"
            )


if __name__ == "__main__":
    main()
