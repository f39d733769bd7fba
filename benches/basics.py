"""Basic figures of the merge mechanism, each against a baseline measured in the same run.

    python benches/basics.py [--mib 1024]

Prints: merge cost per page (pairs of pages, the common case of duplicated data),
first-write latency on a merged page against an ordinary first write, and memory
saved (PSS) for MIB of duplicated data held as 4 copies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ksm

PAGE = ksm.PAGE_SIZE


def pss_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss line")


def fill_copies(m: ksm.mmap, data: bytes, copies: int) -> None:
    with memoryview(m) as v:
        for c in range(copies):
            v[c * len(data) : (c + 1) * len(data)] = data


def merge_cost(pages: int) -> tuple[float, float, int]:
    """Seconds for scan 1 (checksums) and scan 2 (merging), and pages merged."""
    data = os.urandom(pages // 2 * PAGE)
    with ksm.mmap(len(data) * 2) as m:
        fill_copies(m, data, 2)
        m.madvise(ksm.MADV_MERGEABLE)
        t0 = time.perf_counter()
        ksm.scan(1)
        t1 = time.perf_counter()
        before = ksm.stats()["merges"]
        ksm.scan(1)
        t2 = time.perf_counter()
        merged = ksm.stats()["merges"] - before
    return t1 - t0, t2 - t1, merged


def first_write(pages: int) -> tuple[float, float]:
    """Median ns of a one-byte first write: ordinary untouched page vs merged page."""

    def timed_writes(m: ksm.mmap) -> float:
        samples = []
        with memoryview(m) as v:
            clock = time.perf_counter_ns
            for i in range(pages):
                t = clock()
                v[i * PAGE] = 1
                samples.append(clock() - t)
        return statistics.median(samples)

    with ksm.mmap(pages * PAGE) as plain:
        base = timed_writes(plain)
    with ksm.mmap(pages * PAGE) as m:
        with memoryview(m) as v:
            for i in range(pages):
                v[i * PAGE : (i + 1) * PAGE] = bytes([7]) * PAGE
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        assert m.page_state(0) == "merged"
        merged = timed_writes(m)
    return base, merged


def memory_saved(mib: int, copies: int = 4) -> None:
    data = os.urandom(mib * 2**20 // copies)
    with ksm.mmap(len(data) * copies) as m:
        fill_copies(m, data, copies)
        m.madvise(ksm.MADV_MERGEABLE)
        pss0 = pss_kib()
        t = time.perf_counter()
        scans = 0
        while True:
            ksm.scan(1)
            scans += 1
            if scans >= 3 and ksm.stats()["settled"]:
                break
        elapsed = time.perf_counter() - t
        with memoryview(m) as v:  # map every merged page so PSS counts it
            _ = sum(v[i] for i in range(0, len(m), PAGE))
        pss1 = pss_kib()
        s = ksm.stats()
        with memoryview(m) as v:
            ok = all(v[c * len(data) : (c + 1) * len(data)] == data for c in range(copies))
        print(f"memory: {mib} MiB as {copies} copies of {len(data) >> 20} MiB random data")
        saved = (pss0 - pss1) / 1024
        print(f"  PSS before {pss0 / 1024:8.1f} MiB   after {pss1 / 1024:8.1f} MiB   saved {saved:.1f} MiB")
        print(f"  pages_sharing {s['pages_sharing']}  frames {s['frames']}  pool {s['pool_bytes'] >> 20} MiB")
        print(f"  vmas_added {s['vmas_added']}  general_profit {s['general_profit'] >> 20} MiB")
        print(f"  {scans} full scans in {elapsed:.2f} s; contents verified: {ok}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    rows = [merge_cost(20000) for _ in range(a.runs)]
    s1 = statistics.median(r[0] for r in rows)
    s2 = statistics.median(r[1] for r in rows)
    merged = rows[0][2]
    print(f"merge cost: 10000 pairs of pages ({a.runs} runs, medians)")
    print(f"  scan 1 (checksums): {s1 / 20000 * 1e6:.2f} us/page")
    print(f"  scan 2 (merges {merged} pages): {s2 / merged * 1e6:.2f} us/merged page")
    fw = [first_write(4096) for _ in range(a.runs)]
    base = statistics.median(x[0] for x in fw)
    merged_ns = statistics.median(x[1] for x in fw)
    print(f"first write (one byte, from Python, {a.runs} runs of 4096 pages, medians):")
    print(f"  ordinary untouched page {base / 1000:.2f} us; merged page {merged_ns / 1000:.2f} us")
    print(f"  ratio {merged_ns / base:.2f}")
    memory_saved(a.mib)


if __name__ == "__main__":
    main()
