"""A merge domain settling at given ksmd knobs (by default the kernel's defaults).

    python benches/domain_knobs.py [--workers 4] [--mib 16] [--pages-to-scan 100]
                                   [--sleep-ms 20] [--rounds 3] [--kernel]

``--workers`` processes (``ksm bench --only workers``'s: multiprocessing, spawn) each
load the same ``--mib`` MiB of the standard library's files into ``ksm.mmap`` memory and
change 1 % of its pages, then, all at once, advise it, join one domain and run ksmd at
``--pages-to-scan`` and ``--sleep-ms``. Printed per round, and as medians: seconds from
then until the domain's ``pages_sharing`` last changed (settled: unchanged for 4 s), and
until it first reached 95 % and 99 % of its final value. ``ksm bench --only workers``
measures the same at ``pages_to_scan=10000`` and no sleep, side by side with kernel KSM;
this one shows what a domain does at the knobs most users leave as they are.

``--kernel`` (root): the same rounds through kernel KSM too, alternating with ksm's: each
worker advises a private anonymous copy ``MADV_MERGEABLE`` and the kernel's one ksmd
runs at the same knobs (every knob of ``/sys/kernel/mm/ksm`` is restored afterwards).
The knobs do not mean the same work: the kernel's ksmd scans ``--pages-to-scan`` pages
of all the workers per wake-up, each ksm member its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import ksm
from ksm._bench import KernelKsm
from ksm._workers import Pool, Spec

QUIET_S = 4.0


def one_round(
    args: argparse.Namespace, seed: int, kernel: KernelKsm | None
) -> tuple[float, float, float, int]:
    """One round of ksm's side, or of the kernel's with ``kernel``."""
    mode = "kernel" if kernel else "ksm"
    domain = "" if kernel else f"knobs-{os.getpid()}-{time.monotonic_ns()}"
    knobs = (args.pages_to_scan, args.sleep_ms)
    specs = [
        Spec(
            mode,
            i,
            args.mib,
            1.0,
            seed,
            domain,
            daemon=True,
            pages_to_scan=knobs[0],
            sleep_millisecs=knobs[1],
        )
        for i in range(args.workers)
    ]
    pool = Pool(specs)
    try:
        if kernel:
            # Stopped and unmerged (the scan starts afresh), then the knobs.
            kernel.write("run", 2)
            kernel.write("pages_to_scan", args.pages_to_scan)
            kernel.write("sleep_millisecs", args.sleep_ms)
        t0 = time.monotonic()
        pool.ask("advise")
        if kernel:
            kernel.write("run", 1)
        read: Any = (
            (lambda: kernel.num("pages_sharing"))
            if kernel
            else (lambda: ksm.domain_stats(domain)["pages_sharing"])
        )
        seen: list[tuple[float, int]] = []
        last, changed = -1, t0
        while time.monotonic() - changed < QUIET_S and time.monotonic() - t0 < args.timeout:
            v = read()
            if v != last:
                last, changed = v, time.monotonic()
                seen.append((changed - t0, v))
            time.sleep(0.05)
    finally:
        pool.close()
        if kernel:
            kernel.write("run", 2)
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
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--kernel", action="store_true", help="also through kernel KSM (root), alternating")
    args = p.parse_args()
    print(
        f"{args.workers} workers x {args.mib:g} MiB, pages_to_scan {args.pages_to_scan}, "
        f"sleep_millisecs {args.sleep_ms}"
    )
    k = KernelKsm() if args.kernel else None
    sides = ["ksm", "kernel"] if k else ["ksm"]
    rows: dict[str, list[tuple[float, float, float]]] = {side: [] for side in sides}
    try:
        for r in range(args.rounds):
            for side in sides:
                settle, t95, t99, sharing = one_round(args, args.seed, k if side == "kernel" else None)
                rows[side].append((settle, t95, t99))
                print(
                    f"round {r + 1} {side:>6}: settled {settle:.2f} s, 95% at {t95:.2f} s, "
                    f"99% at {t99:.2f} s, pages_sharing {sharing:,}"
                )
                sys.stdout.flush()
    finally:
        errors = k.restore() if k else []
    for side in sides:
        med = [statistics.median(x) for x in zip(*rows[side], strict=True)]
        print(f"medians {side:>6}: settled {med[0]:.2f} s, 95% at {med[1]:.2f} s, 99% at {med[2]:.2f} s")
    if k:
        ratio = statistics.median(x[0] for x in rows["kernel"]) / statistics.median(x[0] for x in rows["ksm"])
        print(f"settle kernel/ksm: {ratio:.2f}")
    for e in errors:
        print(f"kernel KSM: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
