"""Allocation cost of numpy arrays with ksm's allocator against numpy's default, side by side.

For each size (1 MiB to 1 GiB) and each of ``np.empty``, ``np.zeros`` and
``np.ones``, the time to make the array and drop it, under numpy's default
handler and under ksm's (``ksm.numpy_allocator()``: arrays of 1 MiB and more), in alternating rounds;
medians of the rounds and the ratio ksm/default. ksmd is stopped (the cost
measured is the allocation's, not the scanner's CPU). The target: at most 1.2x
for arrays of 1 MiB and more.

    python benches/numpy_alloc.py [--rounds N] [--max-size 1G] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import ksm

MIB = 1 << 20
SIZES = [MIB, 16 * MIB, 256 * MIB, 1024 * MIB]
OPS: dict[str, Callable[[int], Any]] = {
    "empty": lambda n: np.empty(n, dtype=np.uint8),
    "zeros": lambda n: np.zeros(n, dtype=np.uint8),
    "ones": lambda n: np.ones(n, dtype=np.uint8),
}


def once(op: Callable[[int], Any], size: int, reps: int) -> float:
    """Seconds per make-and-drop, over ``reps`` repetitions."""
    t = time.perf_counter()
    for _ in range(reps):
        a = op(size)
        del a
    return (time.perf_counter() - t) / reps


def measure(rounds: int, max_size: int) -> list[dict[str, Any]]:
    rows = []
    for size in [s for s in SIZES if s <= max_size]:
        # About 64 MiB of arrays per timed batch (at least one).
        reps = max(1, (64 * MIB) // size)
        for name, op in OPS.items():
            default: list[float] = []
            ours: list[float] = []
            once(op, size, 1)  # warm both paths
            with ksm.numpy_allocator(MIB):
                once(op, size, 1)
            for _ in range(rounds):
                default.append(once(op, size, reps))
                with ksm.numpy_allocator(MIB):
                    ours.append(once(op, size, reps))
            d, k = statistics.median(default), statistics.median(ours)
            rows.append({"op": name, "size": size, "default_s": d, "ksm_s": k, "ratio": k / d})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per case (default 7)")
    p.add_argument("--max-size", default="1G", help="largest size (default 1G)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args()
    from ksm._autorun import parse_bytes

    if not ksm.available():
        print(f"ksm is unavailable here: {ksm.unavailable_reason()}", file=sys.stderr)
        return 1
    ksm.ksmd.run = 0
    rows = measure(args.rounds, parse_bytes(args.max_size))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        f"numpy {np.__version__}, Python {platform.python_version()}, Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs; medians of {args.rounds} rounds; fallbacks: "
        f"{ksm.numpy_allocator_stats()['fallbacks']}"
    )
    print(f"{'op':6} {'size':>8} {'default':>11} {'ksm':>11} {'ksm/default':>11}")
    for r in rows:
        size = f"{r['size'] // MIB} MiB"
        d_us, k_us = r["default_s"] * 1e6, r["ksm_s"] * 1e6
        print(f"{r['op']:6} {size:>8} {d_us:9.1f}us {k_us:9.1f}us {r['ratio']:10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
