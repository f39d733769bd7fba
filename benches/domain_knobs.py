"""A merge domain settling at given ksmd knobs (by default the kernel's defaults).

    python benches/domain_knobs.py [--workers 4] [--mib 16] [--pages-to-scan 100]
                                   [--sleep-ms 20] [--rounds 3]

``--workers`` processes (multiprocessing, spawn) each load the same ``--mib`` MiB of the
standard library's files into ``ksm.mmap`` memory, change 1 % of its pages, then, all at
once, advise it, join one domain and run ksmd at ``--pages-to-scan`` and
``--sleep-ms``. Printed per round, and as medians: seconds from then until the domain's
``pages_sharing`` last changed (settled: unchanged for 4 s), and until it first reached
95 % and 99 % of its final value. ``ksm bench --only workers`` measures the same at
``pages_to_scan=10000`` and no sleep, side by side with kernel KSM; this one shows what
a domain does at the knobs most users leave as they are.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from multiprocessing.connection import Connection

import ksm

QUIET_S = 4.0


def worker(conn: Connection, index: int, mib: float, domain: str, pages: int, sleep_ms: int) -> None:
    from ksm import _data

    page = ksm.PAGE_SIZE
    data = _data.load_stdlib(int(mib * 2**20), page).data
    m = ksm.mmap(len(data))
    m[:] = data
    rng = random.Random(index)
    n = len(data) // page
    for p in rng.sample(range(n), n // 100):
        m[p * page : (p + 1) * page] = rng.randbytes(page)
    conn.send("loaded")
    conn.recv()
    m.madvise(ksm.MADV_MERGEABLE)
    ksm.join(domain)
    ksm.ksmd.pages_to_scan = pages
    ksm.ksmd.sleep_millisecs = sleep_ms
    ksm.ksmd.run = 1
    conn.send("running")
    conn.recv()
    ksm.ksmd.run = 0
    ksm.leave()
    conn.send("done")


def one_round(args: argparse.Namespace) -> tuple[float, float, float, int]:
    domain = f"knobs-{os.getpid()}-{time.monotonic_ns()}"
    ctx = mp.get_context("spawn")
    conns = []
    for i in range(args.workers):
        parent, child = ctx.Pipe()
        ctx.Process(
            target=worker, args=(child, i, args.mib, domain, args.pages_to_scan, args.sleep_ms), daemon=True
        ).start()
        conns.append(parent)
    for c in conns:
        c.recv()
    t0 = time.monotonic()
    for c in conns:
        c.send("go")
    for c in conns:
        c.recv()
    seen: list[tuple[float, int]] = []
    last, changed = -1, t0
    while time.monotonic() - changed < QUIET_S and time.monotonic() - t0 < args.timeout:
        v = ksm.domain_stats(domain)["pages_sharing"]
        if v != last:
            last, changed = v, time.monotonic()
            seen.append((changed - t0, v))
        time.sleep(0.05)
    for c in conns:
        c.send("end")
    for c in conns:
        c.recv()
    t95 = next(t for t, v in seen if v >= 0.95 * last)
    t99 = next(t for t, v in seen if v >= 0.99 * last)
    return changed - t0, t95, t99, last


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--mib", type=float, default=16)
    p.add_argument("--pages-to-scan", type=int, default=100)
    p.add_argument("--sleep-ms", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    print(
        f"{args.workers} workers x {args.mib:g} MiB, pages_to_scan {args.pages_to_scan}, "
        f"sleep_millisecs {args.sleep_ms}"
    )
    rows = []
    for r in range(args.rounds):
        settle, t95, t99, sharing = one_round(args)
        rows.append((settle, t95, t99))
        print(
            f"round {r + 1}: settled {settle:.2f} s, 95% at {t95:.2f} s, 99% at {t99:.2f} s, "
            f"pages_sharing {sharing:,}"
        )
        sys.stdout.flush()
    med = [statistics.median(x) for x in zip(*rows, strict=True)]
    print(f"medians: settled {med[0]:.2f} s, 95% at {med[1]:.2f} s, 99% at {med[2]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
