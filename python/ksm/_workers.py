"""Worker processes that load the same real data: ``ksm demo --workers N`` and
``ksm bench --only workers`` (side by side with kernel KSM over the same kind of
processes).

Each worker is a separate interpreter (multiprocessing, spawn) that loads the
installed Python's files page-aligned (as a cache would hold them), changes a few
pages of its own, and answers commands over a pipe. With ksm, workers hold the
data in ksm memory and join one merge domain; with the kernel, in anonymous
private memory advised ``MADV_MERGEABLE``.
"""

from __future__ import annotations

import argparse
import hashlib as _hashlib
import mmap as _mmap
import multiprocessing as _mp
import os as _os
import random as _random
import sys as _sys
import time as _time
import uuid as _uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TextIO

from . import _data

MIB = 1 << 20


@dataclass(frozen=True)
class Spec:
    """What a worker loads and how it merges."""

    mode: str  # "ksm" or "kernel"
    index: int
    mib: float
    change_percent: float
    seed: int
    domain: str = ""
    daemon: bool = False  # ksm: merge with ksmd (run=1) rather than on command
    pages_to_scan: int = 10_000
    sleep_millisecs: int = 0  # ksm: ksmd's sleep between batches
    # "stdlib": the standard library's files; "dataset": those and site-packages' (as
    # `ksm bench`'s dataset workload; more of them, for the larger benchmarks).
    source: str = "stdlib"
    # Copies of the data the worker holds (each with its own changed pages): 2 makes a
    # process whose pages merge with each other, inside it.
    copies: int = 1


def _pss_kib(pid: int | str = "self") -> int:
    """Proportional set size of a process (KiB), from smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _digest(b: memoryview) -> bytes:
    return _hashlib.blake2b(b, digest_size=16).digest()


def _changes(npages: int, rng: _random.Random, percent: float) -> list[int]:
    n = min(npages, round(npages * percent / 100))
    return sorted(rng.sample(range(npages), n))


def _scan_cost(rounds: int) -> float:
    """CPU seconds of a full scan of settled memory: ksmd stopped, synchronous scans in
    this thread (their hashing threads' CPU included), the median of `rounds`."""
    import ksm

    run = ksm.ksmd.run
    ksm.ksmd.run = 0
    ksm.scan(1)
    costs = []
    for _ in range(rounds):
        t = _time.process_time()
        ksm.scan(1)
        costs.append(_time.process_time() - t)
    ksm.ksmd.run = run
    return sorted(costs)[len(costs) // 2]


def _worker(conn: Connection, spec: Spec) -> None:  # pragma: no cover - runs in a child
    import ksm

    page = ksm.PAGE_SIZE
    limit = max(page, int(spec.mib * MIB) // page * page)
    if spec.source == "dataset":
        from . import _bench

        data = _bench.load_dataset(limit, page)[0]
    else:
        data = _data.load_stdlib(limit, page).data
    one = len(data)
    size = one * spec.copies
    buf: Any
    if spec.mode == "ksm":
        buf = ksm.mmap(size)
    else:
        buf = _mmap.mmap(-1, size, flags=_mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS)
    view = memoryview(buf)
    for c in range(spec.copies):
        view[c * one : (c + 1) * one] = data
    rng = _random.Random(spec.seed * 1000 + spec.index)
    changed = _changes(size // page, rng, spec.change_percent)
    for p in changed:
        view[p * page : (p + 1) * page] = rng.randbytes(page)
    # A digest per page to verify against: the loaded data itself is let go, so that
    # the worker's memory is its pages (as a worker that loaded a model would hold it).
    digests = [_digest(view[p * page : (p + 1) * page]) for p in range(size // page)]
    del data
    conn.send(("loaded", size, len(changed)))
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "advise":
                if spec.mode == "ksm":
                    buf.madvise(ksm.MADV_MERGEABLE)
                    if spec.domain:
                        ksm.join(spec.domain)
                    if spec.daemon:
                        ksm.ksmd.pages_to_scan = spec.pages_to_scan
                        ksm.ksmd.sleep_millisecs = spec.sleep_millisecs
                        ksm.ksmd.run = 1
                else:
                    buf.madvise(_mmap.MADV_MERGEABLE)
                conn.send(("ok",))
            elif cmd == "scan":
                ksm.scan(int(args[0]))
                ksm._ksm._domain_sync(10.0)
                conn.send(("ok",))
            elif cmd == "run":
                ksm.ksmd.run = int(args[0])
                conn.send(("ok",))
            elif cmd == "scancost":
                with open("/proc/self/maps", "rb") as maps:
                    vmas = sum(1 for _ in maps)
                conn.send(("scancost", _scan_cost(int(args[0])), vmas))
            elif cmd == "leavecost":
                # The domain's own share of a full scan: the same pages and mappings
                # scanned in the domain, then once this worker has left it; then it
                # joins again (the segments it holds are offered again: back in use).
                inside = _scan_cost(int(args[0]))
                ksm.leave()
                outside = _scan_cost(int(args[0]))
                ksm.join(spec.domain)
                ksm._ksm._domain_sync(10.0)
                ksm.scan(1)
                conn.send(("leavecost", inside, outside))
            elif cmd == "write":
                # Write the pages the parent chose (the same in every worker) with bytes
                # of this worker's own, so that they stay private.
                wrng = _random.Random(spec.seed * 7919 + spec.index)
                for p in args[0]:
                    view[p * page : (p + 1) * page] = wrng.randbytes(page)
                    digests[p] = _digest(view[p * page : (p + 1) * page])
                conn.send(("ok",))
            elif cmd == "pss":
                conn.send(("pss", _pss_kib()))
            elif cmd == "stats":
                s = dict(ksm.stats()) if spec.mode == "ksm" else {}
                m = ksm.member_stats() if spec.mode == "ksm" else {}
                conn.send(("stats", s, m))
            elif cmd == "verify":
                bad = sum(_digest(view[p * page : (p + 1) * page]) != d for p, d in enumerate(digests))
                conn.send(("verify", bad))
            elif cmd == "exit":
                if spec.mode == "ksm":
                    ksm.ksmd.run = 0
                    ksm.leave()
                conn.send(("ok",))
                return
    finally:
        view.release()
        buf.close()


class Pool:
    """N worker processes, each with its pipe."""

    def __init__(self, specs: list[Spec]) -> None:
        ctx = _mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for s in specs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, s), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.loaded = [c.recv() for c in self.conns]

    def ask(self, *cmd: Any) -> list[tuple[Any, ...]]:
        for c in self.conns:
            c.send(cmd)
        return [c.recv() for c in self.conns]

    def pss_kib(self) -> list[int]:
        return [r[1] for r in self.ask("pss")]

    def close(self) -> None:
        for c, p in zip(self.conns, self.procs, strict=True):
            try:
                if p.is_alive():
                    c.send(("exit",))
                    c.recv()
            except (EOFError, OSError):
                pass
            c.close()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()


def _bar(done: int, total: int, width: int = 30) -> str:
    n = min(width, done * width // max(1, total))
    return "[" + "#" * n + "." * (width - n) + "]"


class _Progress:
    """A progress line: redrawn in place on a terminal; elsewhere (a pipe, a log) a
    line of its own each time it changes."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.tty = err.isatty()
        self.last = ""

    def show(self, line: str) -> None:
        if self.tty:
            self.err.write("\r" + line + "\x1b[K")
        elif line != self.last:
            self.err.write(line + "\n")
        self.last = line
        self.err.flush()

    def done(self) -> None:
        if self.tty:
            self.err.write("\n")
            self.err.flush()


def demo(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``ksm demo --workers N``: N workers load the same data; merge; PSS before and after."""
    import ksm

    out = _sys.stdout if out is None else out
    err = _sys.stderr if err is None else err
    n: int = args.workers
    if n < 2:
        print("ksm demo: --workers needs at least 2 processes", file=err)
        return 2
    seed: int = args.seed if args.seed is not None else _random.randrange(1 << 32)
    domain = f"demo-{_os.getpid()}-{_uuid.uuid4().hex[:6]}"
    specs = [Spec("ksm", i, args.mib, args.change_percent, seed, domain) for i in range(n)]
    t0 = _time.monotonic()
    pool = Pool(specs)
    try:
        size = pool.loaded[0][1]
        print(
            f"workers: {n} processes, each loaded {size / MIB:.1f} MiB of the standard library's "
            f"files and changed {args.change_percent:g}% of its pages (seed {seed}), "
            f"in {_time.monotonic() - t0:.2f}s",
            file=out,
        )
        before = pool.pss_kib()
        pool.ask("advise")
        t0 = _time.monotonic()
        rounds, last, steady = 0, -1, 0
        max_rounds = 64
        progress = _Progress(err)
        while rounds < max_rounds:
            pool.ask("scan", 1)
            rounds += 1
            d = ksm.domain_stats(domain)
            sharing = d["pages_sharing"]
            steady = steady + 1 if sharing == last else 0
            last = sharing
            want = (n - 1) * size // ksm.PAGE_SIZE
            progress.show(f"merging {_bar(sharing, want)} pages_sharing {sharing:,} after {rounds} scans")
            if steady >= 2 and rounds >= 4:
                break
        progress.done()
        merge_s = _time.monotonic() - t0
        after = pool.pss_kib()
        d = ksm.domain_stats(domain)
        bad = sum(r[1] for r in pool.ask("verify"))
        stats = pool.ask("stats")
        alone = before[0]
        rows = [(f"worker {i + 1}", b, a) for i, (b, a) in enumerate(zip(before, after, strict=True))]
        print(f"\n{'':<12}{'PSS before':>14}{'PSS after':>14}", file=out)
        for label, b, a in rows:
            print(f"{label:<12}{b / 1024:>10.1f} MiB{a / 1024:>10.1f} MiB", file=out)
        print(f"{'total':<12}{sum(before) / 1024:>10.1f} MiB{sum(after) / 1024:>10.1f} MiB", file=out)
        print(
            f"one process alone: {alone / 1024:.1f} MiB; {n} workers use "
            f"{sum(after) / max(1, alone):.2f}x that after merging "
            f"({sum(before) / max(1, alone):.2f}x before)",
            file=out,
        )
        msgs = sum(s[2].get("messages_sent", 0) + s[2].get("messages_received", 0) for s in stats)
        print(
            f"domain {domain}: {d['members']} members, pages_shared {d['pages_shared']:,}, "
            f"pages_sharing {d['pages_sharing']:,}, segments {d['segments']} "
            f"({d['pool_bytes'] / MIB:.1f} MiB, {d['live_frames']:,} frames live); "
            f"{rounds} scans in {merge_s:.2f}s, {msgs:,} messages",
            file=out,
        )
        print(f"verified: {n} workers, {bad:,} mismatched pages", file=out)
        return 1 if bad else 0
    finally:
        pool.close()


# --------------------------------------------------------------------------- benchmark

SETTLE_QUIET_S = 1.0


def _settle(read: Any, timeout: float) -> tuple[float, int, bool]:
    """Poll `read()` (pages_sharing) until unchanged for SETTLE_QUIET_S: the time of its
    last change, its value, and whether it settled before `timeout`."""
    t0 = _time.monotonic()
    last, changed_at = read(), t0
    while True:
        now = _time.monotonic()
        if now - changed_at >= SETTLE_QUIET_S and last > 0:
            return changed_at - t0, last, True
        if now - t0 > timeout:
            return now - t0, last, False
        _time.sleep(0.02)
        v = read()
        if v != last:
            last, changed_at = v, _time.monotonic()


def _bench_one(
    mode: str,
    n: int,
    mib: float,
    seed: int,
    pages_to_scan: int,
    timeout: float,
    k: Any,
    extras: bool = True,
    source: str = "stdlib",
) -> dict[str, Any]:
    import ksm

    domain = f"bench-{_os.getpid()}-{_uuid.uuid4().hex[:6]}"
    specs = [
        Spec(mode, i, mib, 1.0, seed, domain, daemon=True, pages_to_scan=pages_to_scan, source=source)
        for i in range(n)
    ]
    pool = Pool(specs)
    try:
        size = pool.loaded[0][1]
        before = sum(pool.pss_kib())
        if mode == "kernel":
            k.configure(pages_to_scan)
            k.write("run", 1)
            read = lambda: k.num("pages_sharing")  # noqa: E731
        else:
            read = lambda: ksm.domain_stats(domain)["pages_sharing"]  # noqa: E731
        pool.ask("advise")
        settle_s, sharing, settled = _settle(read, timeout)
        after = sum(pool.pss_kib())
        stats = pool.ask("stats")
        bad = sum(r[1] for r in pool.ask("verify"))
        res: dict[str, Any] = {
            "settle_s": settle_s,
            "settled": settled,
            "pages_sharing": sharing,
            "pss_before_mib": before / 1024,
            "pss_after_mib": after / 1024,
            "bytes_per_worker": size,
            "verified": bad == 0,
        }
        if mode == "ksm":
            d = ksm.domain_stats(domain)
            msgs = sum(s[2].get("messages_sent", 0) + s[2].get("messages_received", 0) for s in stats)
            nbytes = sum(s[2].get("bytes_sent", 0) + s[2].get("bytes_received", 0) for s in stats)
            meta = _bookkeeping(stats)
            res.update(
                metadata_median_per_page=_median(meta),
                metadata_worst_per_page=max(meta),
            )
            res.update(
                pool_mib=d["pool_bytes"] / MIB,
                live_mib=d["live_frames"] * ksm.PAGE_SIZE / MIB,
                live_frames=d["live_frames"],
                messages_per_merged_page=msgs / max(1, sharing),
                bytes_per_merged_page=nbytes / max(1, sharing),
            )
            if extras:
                res.update(_scan_costs(pool, mib, seed, pages_to_scan, timeout, source))
                left = pool.ask("leavecost", SCAN_COST_ROUNDS)
                res["domain_scan_ms"] = _median([r[1] for r in left]) * 1e3
                res["left_scan_ms"] = _median([r[2] for r in left]) * 1e3
                res.update(_compaction(pool, domain, size // ksm.PAGE_SIZE, seed))
        return res
    finally:
        pool.close()
        if mode == "kernel":
            k.write("run", 2)


SCAN_COST_ROUNDS = 7

# Figures of a round that are taken as the median over rounds (the others, measured in
# the first round only, are kept from it).
ROUND_FIGURES = ("settle_s", "pages_sharing", "pss_before_mib", "pss_after_mib")


def _medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The first round's figures, with ROUND_FIGURES the medians of all rounds, every
    round's settle time kept, and settled/verified only if so in every round."""
    out = dict(results[0])
    for key in ROUND_FIGURES:
        out[key] = _median([float(r[key]) for r in results])
    out["settle_each_s"] = [r["settle_s"] for r in results]
    out["settled"] = all(r["settled"] for r in results)
    out["verified"] = all(r["verified"] for r in results)
    return out


def _bookkeeping(stats: list[tuple[Any, ...]]) -> list[float]:
    """Each member's bookkeeping at its peak, per page it tracks (as `ksm bench`'s),
    from the workers' answers to "stats"."""
    return [int(s[1]["metadata_peak_bytes"]) / max(1, int(s[1]["tracked_pages"])) for s in stats]


def _label(workers: int, mib: float, held: int | None = None) -> str:
    """A configuration's name, and what each worker really held where the data set
    had less than asked (the standard library's files: about 211 MiB here)."""
    label = f"{workers} workers x {mib:g} MiB"
    if held is not None and held < mib * MIB * 0.99:
        label += f" ({held / MIB:,.0f} MiB of data each: all there is)"
    return label


def _median(xs: list[float]) -> float:
    import statistics

    return float(statistics.median(xs))


def _scan_costs(
    pool: Pool, mib: float, seed: int, pages_to_scan: int, timeout: float, source: str
) -> dict[str, Any]:
    """CPU of a settled member's full scan against the same data merged inside one
    process, and both sides' mappings.

    The one process (no domain) holds two copies of a worker's data (1% of each
    changed), merged with each other; it is started once the members have settled.
    Then every ksmd is stopped and the scans are taken one at a time, round after
    round: the one process, then each member in turn. So no scan shares the CPUs with
    another scan or a ksmd, and both sides see the same moments of the machine's load
    (measured minutes apart, the one-process side alone moved by half between runs).
    Each figure is a median: over rounds for the one process (per copy), over members
    and rounds for a member."""
    spec = Spec(
        "ksm", 0, mib, 1.0, seed, "", daemon=True, pages_to_scan=pages_to_scan, copies=2, source=source
    )
    alone = Pool([spec])
    try:
        alone.ask("advise")
        _settle(lambda: alone.ask("stats")[0][1]["pages_sharing"], timeout)
        alone.ask("run", 0)
        pool.ask("run", 0)
        member: list[float] = []
        member_vmas: list[int] = []
        one: list[float] = []
        one_vmas: list[int] = []
        for _ in range(SCAN_COST_ROUNDS):
            r = alone.ask("scancost", 1)[0]
            one.append(float(r[1]) / spec.copies)
            one_vmas.append(int(r[2]))
            for c in pool.conns:
                c.send(("scancost", 1))
                r = c.recv()
                member.append(float(r[1]))
                member_vmas.append(int(r[2]))
        return {
            "scan_ms": _median(member) * 1e3,
            "vmas": round(_median([float(v) for v in member_vmas])),
            "alone_scan_ms": _median(one) * 1e3,
            "alone_vmas": round(_median([float(v) for v in one_vmas])),
        }
    finally:
        alone.close()


def _compaction(pool: Pool, domain: str, npages: int, seed: int) -> dict[str, Any]:
    """Every worker writes the same half of its pages (bytes of its own): frames that
    nobody maps any more. Scans step by step (ksmd stopped, every member scans once,
    then a round trip to the broker) until the domain's pool stops changing: the pool
    and its live frames before the writes, and once compaction is over."""
    import ksm

    pool.ask("run", 0)
    start = dict(ksm.domain_stats(domain))
    chosen = sorted(_random.Random(seed).sample(range(npages), npages // 2))
    pool.ask("write", chosen)
    seen: list[dict[str, Any]] = []
    # Unchanged for as many steps as a page may be passed over (smart scan) plus the
    # broker's retirement age: over.
    quiet = 20
    for _ in range(200):
        pool.ask("scan", 1)
        seen.append(dict(ksm.domain_stats(domain)))
        if len(seen) > quiet and all(
            (x["pool_bytes"], x["live_frames"]) == (seen[-1]["pool_bytes"], seen[-1]["live_frames"])
            for x in seen[-quiet:]
        ):
            break
    bad = sum(r[1] for r in pool.ask("verify"))
    # Each member's bookkeeping once compacted, half of its pages written (its own).
    meta = _bookkeeping(pool.ask("stats"))
    first, last = start, seen[-1]
    page = ksm.PAGE_SIZE
    return {
        "metadata_compacted_median_per_page": _median(meta),
        "metadata_compacted_worst_per_page": max(meta),
        "written_pages": len(chosen),
        "pool_written_mib": first["pool_bytes"] / MIB,
        "live_written_mib": first["live_frames"] * page / MIB,
        "segments_retired": last["segments_retired"] - first["segments_retired"],
        "pool_compacted_mib": last["pool_bytes"] / MIB,
        "live_compacted_mib": last["live_frames"] * page / MIB,
        "compaction_scans": len(seen) - quiet,
        "compaction_verified": bad == 0,
    }


def bench(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``ksm bench --only workers``: worker pools merged by ksm domains and by kernel KSM."""
    from . import _bench

    if int(getattr(args, "rounds", 1)) < 1:
        print(f"ksm bench: --rounds takes a whole number >= 1, not {args.rounds}", file=err)
        return 2
    note = None if not args.no_kernel else "--no-kernel given"
    note = note or _bench.kernel_unavailable_reason()
    k = _bench.KernelKsm() if note is None else None
    configs = [(4, 256.0), (16, 64.0)]
    if getattr(args, "size", None) and args.size != "1G":
        per = _bench.parse_size(args.size) / MIB
        configs = [(4, per), (16, per / 4)]
    rows: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    failed = False
    try:
        rounds = int(getattr(args, "rounds", 1))
        source = str(getattr(args, "workers_data", "stdlib"))
        for n, mib in configs:
            label = _label(n, mib)
            mine: list[dict[str, Any]] = []
            kernel: list[dict[str, Any]] = []
            # Both sides in turn, round after round: a machine whose load changes moves
            # both; the figures are the medians of the rounds.
            for r in range(rounds):
                tag = f" (round {r + 1} of {rounds})" if rounds > 1 else ""
                print(f"workers: {label}: ksm{tag} ...", file=err, flush=True)
                mine.append(
                    _bench_one(
                        "ksm", n, mib, args.seed, 10_000, args.timeout, None, extras=r == 0, source=source
                    )
                )
                if k is not None:
                    print(f"workers: {label}: kernel{tag} ...", file=err, flush=True)
                    kernel.append(
                        _bench_one("kernel", n, mib, args.seed, 10_000, args.timeout, k, source=source)
                    )
            ours = _medians(mine)
            theirs = _medians(kernel) if kernel else None
            rows.append((_label(n, mib, int(ours["bytes_per_worker"])), ours, theirs))
    finally:
        if k is not None:
            errors = k.restore()
            if errors:
                print("ksm bench: kernel KSM knobs not restored: " + "; ".join(errors), file=err)
                failed = True
    data = {"stdlib": "the standard library's files", "dataset": "the dataset workload's files"}
    what = data.get(str(getattr(args, "workers_data", "stdlib")), "")
    print(
        f"\nworkers (each loads the same real data, {what}, 1% of pages changed per worker; settled =",
        file=out,
    )
    print("pages_sharing unchanged for 1 s; pages_to_scan 10000, sleep_millisecs 0 on both sides)", file=out)
    print(f"{'':<26}{'ksm':>12}{'kernel':>12}{'ksm/kernel':>12}", file=out)
    targets: list[tuple[bool, str]] = []
    for label, ours, theirs in rows:

        def line(
            name: str,
            key: str,
            fmt: str = "{:,.2f}",
            ours: dict[str, Any] = ours,
            theirs: dict[str, Any] | None = theirs,
        ) -> None:
            a = ours.get(key)
            b = theirs.get(key) if theirs else None
            ratio = (
                f"{a / b:.3g}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
            )
            sa = fmt.format(a) if isinstance(a, (int, float)) else "-"
            sb = fmt.format(b) if isinstance(b, (int, float)) else "-"
            print(f"  {name:<24}{sa:>12}{sb:>12}{ratio:>12}", file=out)

        print(label, file=out)
        line("settle (s)" + (", median" if len(ours["settle_each_s"]) > 1 else ""), "settle_s")
        if len(ours["settle_each_s"]) > 1:
            each = " ".join(f"{x:.2f}" for x in ours["settle_each_s"])
            each_k = " ".join(f"{x:.2f}" for x in theirs["settle_each_s"]) if theirs else "-"
            print(f"  {'  each round':<24}ksm {each}; kernel {each_k}", file=out)
        line("pages saved", "pages_sharing", "{:,.0f}")
        line("PSS before (MiB)", "pss_before_mib", "{:,.1f}")
        line("PSS after (MiB)", "pss_after_mib", "{:,.1f}")
        line("domain pool (MiB)", "pool_mib", "{:,.1f}")
        line("  of it live (MiB)", "live_mib", "{:,.1f}")
        line("messages / merged page", "messages_per_merged_page", "{:.3f}")
        line("bytes / merged page", "bytes_per_merged_page", "{:.1f}")
        line("member metadata (B/page)", "metadata_median_per_page", "{:.1f}")
        line("  worst member", "metadata_worst_per_page", "{:.1f}")
        print(
            f"  {'contents verified':<24}{'yes' if ours['verified'] else 'NO':>12}"
            f"{('yes' if theirs['verified'] else 'NO') if theirs else '-':>12}",
            file=out,
        )
        failed |= not ours["verified"] or bool(theirs and not theirs["verified"])
        member, alone = ours["scan_ms"], ours["alone_scan_ms"]
        print(
            f"  {'settled full scan, CPU':<24}a member {member:,.2f} ms; the same data merged inside "
            f"one process {alone:,.2f} ms (per copy): member/alone {member / max(1e-9, alone):.3g}; "
            f"mappings: a member {ours['vmas']:,}, the process with two copies {ours['alone_vmas']:,}",
            file=out,
        )
        print(
            f"  {'compaction':<24}pool {ours['pool_written_mib']:,.1f} MiB (live "
            f"{ours['live_written_mib']:,.1f}); every worker wrote the same "
            f"{ours['written_pages']:,} pages (half); {ours['compaction_scans']} scans later "
            f"{ours['segments_retired']} segments retired, pool {ours['pool_compacted_mib']:,.1f} MiB "
            f"(live {ours['live_compacted_mib']:,.1f}); contents "
            f"{'verified' if ours['compaction_verified'] else 'WRONG'}; a member's bookkeeping "
            f"{ours['metadata_compacted_median_per_page']:.1f} B/page "
            f"(worst {ours['metadata_compacted_worst_per_page']:.1f})",
            file=out,
        )
        failed |= not ours["compaction_verified"]
        inside, left = ours["domain_scan_ms"], ours["left_scan_ms"]
        print(
            f"  {'the domain in a scan':<24}a settled member's full scan {inside:,.2f} ms of CPU, "
            f"{left:,.2f} ms once it left the domain (the same pages and mappings): "
            f"member/left {inside / max(1e-9, left):.3g}",
            file=out,
        )
        targets.append(
            (
                member <= alone,
                f"{label}: a settled member's full scan costs no more than inside one process "
                f"(member/alone = {member / max(1e-9, alone):.2f})",
            )
        )
        worst = ours["metadata_worst_per_page"]
        written = ours["metadata_compacted_worst_per_page"]
        targets.append(
            (
                max(worst, written) <= 16,
                f"{label}: a member's bookkeeping <= 16 bytes per tracked page (settled: worst member "
                f"{worst:.1f}, median {ours['metadata_median_per_page']:.1f}; half written, compacted: "
                f"worst {written:.1f}; kernel: 64 B per rmap_item)",
            )
        )
        compacted = ours["pool_compacted_mib"] / max(1e-9, ours["live_compacted_mib"])
        targets.append(
            (
                compacted <= 1.25,
                f"{label}: after compaction the domain's pool holds at most 25% more than its live frames "
                f"(pool/live = {compacted:.2f})",
            )
        )
        if theirs:
            sp = theirs["settle_s"] / max(1e-9, ours["settle_s"])
            saved = ours["pages_sharing"] / max(1, theirs["pages_sharing"])
            pss = ours["pss_after_mib"] / max(1e-9, theirs["pss_after_mib"])
            targets.append(
                (
                    sp >= 1.0 and ours["settled"],
                    f"{label}: settle at least as fast as kernel KSM (kernel/ksm = {sp:.2f}; aim 2)",
                )
            )
            targets.append((saved >= 0.99, f"{label}: pages saved >= 99% of the kernel's ({saved:.1%})"))
            targets.append(
                (pss <= 1.05, f"{label}: total PSS within 5% of the kernel's (ksm/kernel = {pss:.3f})")
            )
    if targets:
        print("\ntargets, each a ratio measured in this run:", file=out)
        for ok, text in targets:
            print(f"  {'PASS' if ok else 'MISS'}  {text}", file=out)
    return 1 if failed else 0
