"""``ksm soak``: a long run of mixed load, every byte checked against a model.

Writer threads write into ksm memory (``ksm.mmap`` regions, owned, and
stdlib ``mmap.mmap(-1, n)`` regions advised with ``ksm.madvise``, foreign)
while ksmd scans at full speed (``run=1``, ``sleep_millisecs=0``) and a
control thread keeps changing the scene: it creates and closes regions (a
foreign region is sometimes unadvised first, sometimes unmapped while
advised), flips the advice of parts of regions (``MADV_UNMERGEABLE`` then
``MADV_MERGEABLE`` again), switches ``ksmd.run`` between 0, 1 and 2, flips
``use_zero_pages`` and calls ``ksm.scan()`` itself.

Writers mostly write whole pages (or runs of pages) from a small set of
contents, so pages merge all the time and merged pages are written (copy on
write); sometimes a few random bytes, which makes a page unique. Each region
has a ``bytearray`` model, updated under the region's lock together with the
write. Every ``check_every`` seconds every byte of every region is compared
with its model; the statistics are checked for consistency
(``pages_shared + pages_sharing + pages_unshared + pages_volatile ==
rmap_items``) and sampled with the process's RSS and PSS. One line is printed
per ``report_every`` seconds (and optionally written to a CSV file).

At the end every region is closed and the verdict is given: mismatches (pages
that differed from the model, must be 0), errors (exceptions in any thread,
inconsistent statistics, frames not accounted for once everything is closed),
and whether RSS, the frame pool and the bookkeeping stayed flat over the run
(the working set is bounded, so they should) or kept growing.
"""

from __future__ import annotations

import argparse
import csv
import errno
import functools
import json
import mmap as stdlib_mmap
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import ksm

PAGE = ksm.PAGE_SIZE
MIB = 1 << 20

# Kernel statistics that add up to rmap_items in every snapshot.
_KERNEL_SUMS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
# Columns of the report (and of the CSV file).
COLUMNS = (
    "elapsed_s",
    "rss_mib",
    "pss_mib",
    "frames",
    "pool_mib",
    "metadata_kib",
    "vmas_used",
    "regions",
    "region_mib",
    "overhead_mib",
    "meta_b_per_page",
    "pages_shared",
    "pages_sharing",
    "merges",
    "cows",
    "scanned_k",
    "checks",
    "mismatches",
    "errors",
)


def _page_content(seed: int) -> bytes:
    """One page of non-zero bytes determined by ``seed``."""
    head = seed.to_bytes(8, "little")
    body = bytes(((seed * 37 + i * 11) % 251) + 1 for i in range(256))
    return (head + body * (PAGE // len(body) + 1))[:PAGE]


# A few contents so that pages keep finding twins; the zero page for use_zero_pages.
CONTENTS = [_page_content(i) for i in range(6)] + [bytes(PAGE)]


def _proc_kib(path: str, key: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


class Region:
    """One region under load: its memory, its model, and the lock over both."""

    def __init__(self, rid: int, npages: int, owned: bool) -> None:
        self.rid = rid
        self.npages = npages
        self.owned = owned
        self.lock = threading.Lock()
        self.closed = False
        self.mem: Any
        if owned:
            self.mem = ksm.mmap(npages * PAGE)
            self.address = self.mem.address
        else:
            self.mem = stdlib_mmap.mmap(-1, npages * PAGE, flags=stdlib_mmap.MAP_PRIVATE)
            self.address = _buffer_address(self.mem)
        self.model = bytearray(npages * PAGE)

    def madvise(self, advice: int, first: int = 0, count: int | None = None) -> None:
        count = self.npages - first if count is None else count
        _retry_eagain(lambda: ksm.madvise(self.address + first * PAGE, count * PAGE, advice))

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` and into the model (the caller holds the lock)."""
        self.mem[offset : offset + len(data)] = data
        self.model[offset : offset + len(data)] = data

    def mismatched_pages(self) -> list[int]:
        """Pages whose bytes differ from the model (the caller holds the lock)."""
        got = self.mem[:]
        if got == self.model:
            return []
        return [
            p
            for p in range(self.npages)
            if got[p * PAGE : (p + 1) * PAGE] != self.model[p * PAGE : (p + 1) * PAGE]
        ]

    def close(self, unadvise: bool) -> None:
        """Close (the caller holds the lock). A foreign region is either unadvised first or
        unmapped while advised (ksm learns of the munmap through userfaultfd)."""
        self.closed = True
        if not self.owned and unadvise:
            self.madvise(ksm.MADV_UNMERGEABLE)
        self.mem.close()


def _buffer_address(obj: Any) -> int:
    import ctypes

    view = ctypes.c_char.from_buffer(obj)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _retry_eagain(call: Callable[[], None], attempts: int = 50) -> None:
    """``call()``, retried on EAGAIN (madvise's documented temporary failure)."""
    for i in range(attempts):
        try:
            call()
            return
        except OSError as e:
            if e.errno != errno.EAGAIN or i == attempts - 1:
                raise
            time.sleep(0.01)


@dataclass
class Report:
    """What a soak run found."""

    seconds: float = 0.0
    checks: int = 0
    bytes_checked: int = 0
    mismatches: int = 0
    errors: list[str] = field(default_factory=list)
    writes: int = 0
    regions_created: int = 0
    regions_closed: int = 0
    advice_flips: int = 0
    run_changes: int = 0
    zero_page_flips: int = 0
    caller_scans: int = 0
    pages_scanned: int = 0
    merges: int = 0
    cows: int = 0
    samples: list[dict[str, float]] = field(default_factory=list)
    growth: dict[str, str] = field(default_factory=dict)
    final: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and not self.errors

    @property
    def verdict(self) -> str:
        trend = "growing" if any(v.startswith("growing") for v in self.growth.values()) else "flat"
        if any(v == "too short to judge" for v in self.growth.values()):
            trend = "too short to judge"
        return (
            f"{'PASS' if self.ok else 'FAIL'}: {self.mismatches} mismatches, {len(self.errors)} errors, "
            f"{self.checks} checks of every byte, memory {trend}"
        )


class Soak:
    def __init__(
        self,
        seconds: float,
        *,
        writers: int = 4,
        max_regions: int = 10,
        max_pages: int = 512,
        check_every: float = 1.0,
        report_every: float = 30.0,
        seed: int = 1,
        out: TextIO | None = sys.stdout,
        csv_path: str | None = None,
    ) -> None:
        self.seconds = seconds
        self.writers = writers
        self.max_regions = max_regions
        self.max_pages = max_pages
        self.check_every = check_every
        self.report_every = report_every
        self.seed = seed
        self.out = out
        self.csv_path = csv_path
        self.report = Report()
        self.regions: list[Region] = []
        self.regions_lock = threading.Lock()  # the list; each region has its own lock
        self.stop = threading.Event()
        self.errors_lock = threading.Lock()
        self.next_rid = 0
        self.writes = [0] * writers
        self.start_stats: dict[str, int] = {}
        self.csv_file: TextIO | None = None

    # ---- helpers ----------------------------------------------------------------

    def error(self, what: str) -> None:
        with self.errors_lock:
            self.report.errors.append(what)
        if self.out is not None:
            print(f"ERROR: {what}", file=self.out, flush=True)

    def guarded(self, name: str, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:
                self.error(f"{name}: {exc!r}")
                self.stop.set()

        return run

    def pick(self, rng: random.Random) -> Region | None:
        with self.regions_lock:
            return rng.choice(self.regions) if self.regions else None

    def new_region(self, rng: random.Random) -> None:
        npages = rng.choice([16, 32, 64, 128, 256, self.max_pages])
        owned = rng.random() < 0.5
        region = Region(self.next_rid, npages, owned)
        self.next_rid += 1
        with region.lock:
            # Start from copies of a few contents in runs, so that extents merge too.
            for p in range(0, npages, 8):
                n = min(8, npages - p)
                region.write(p * PAGE, rng.choice(CONTENTS) * n)
            region.madvise(ksm.MADV_MERGEABLE)
        with self.regions_lock:
            self.regions.append(region)
        self.report.regions_created += 1

    def close_region(self, rng: random.Random) -> None:
        with self.regions_lock:
            if not self.regions:
                return
            region = self.regions.pop(rng.randrange(len(self.regions)))
        with region.lock:
            self.check_region(region)  # its last contents count too
            region.close(unadvise=rng.random() < 0.5)
        self.report.regions_closed += 1

    def check_region(self, region: Region) -> None:
        bad = region.mismatched_pages()
        self.report.bytes_checked += region.npages * PAGE
        if bad:
            self.report.mismatches += len(bad)
            self.error(
                f"region {region.rid} ({'owned' if region.owned else 'foreign'}, {region.npages} pages): "
                f"{len(bad)} pages differ from the model, first {bad[:8]}"
            )

    # ---- threads ----------------------------------------------------------------

    def writer(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-writer-{index}")
        while not self.stop.is_set():
            region = self.pick(rng)
            if region is None:
                time.sleep(0.001)
                continue
            with region.lock:
                if region.closed:
                    continue
                kind = rng.random()
                if kind < 0.6:  # one page
                    p = rng.randrange(region.npages)
                    region.write(p * PAGE, rng.choice(CONTENTS))
                elif kind < 0.8:  # a run of one content, or a copy of another run
                    n = rng.randint(2, 16)
                    p = rng.randrange(max(1, region.npages - n))
                    n = min(n, region.npages - p)
                    if rng.random() < 0.5:
                        region.write(p * PAGE, rng.choice(CONTENTS) * n)
                    else:
                        q = rng.randrange(max(1, region.npages - n))
                        region.write(p * PAGE, bytes(region.model[q * PAGE : (q + n) * PAGE]))
                else:  # a few bytes: the page becomes unique
                    off = rng.randrange(region.npages * PAGE - 16)
                    region.write(off, rng.randbytes(rng.randint(1, 16)))
            self.writes[index] += 1
            # Rest now and then, so that written pages stay stable long enough to merge.
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.002)

    def control(self) -> None:
        rng = random.Random(f"{self.seed}-control")
        while not self.stop.wait(rng.uniform(0.02, 0.2)):
            action = rng.random()
            with self.regions_lock:
                nregions = len(self.regions)
            if action < 0.15 and nregions < self.max_regions:
                self.new_region(rng)
            elif action < 0.25 and nregions > 2:
                self.close_region(rng)
            elif action < 0.50:
                region = self.pick(rng)
                if region is None:
                    continue
                with region.lock:
                    if region.closed:
                        continue
                    first = rng.randrange(region.npages)
                    count = rng.randint(1, region.npages - first)
                    region.madvise(ksm.MADV_UNMERGEABLE, first, count)
                # Unadvised for a moment (writers go on), then mergeable again.
                self.stop.wait(rng.uniform(0, 0.05))
                with region.lock:
                    if region.closed:
                        continue
                    region.madvise(ksm.MADV_MERGEABLE, first, count)
                self.report.advice_flips += 1
            elif action < 0.60:
                run = rng.choice([0, 1, 1, 2])
                if run == 2:
                    _retry_eagain(lambda: setattr(ksm.ksmd, "run", 2))
                else:
                    ksm.ksmd.run = run
                self.report.run_changes += 1
            elif action < 0.65:
                ksm.ksmd.use_zero_pages = 1 - ksm.ksmd.use_zero_pages
                self.report.zero_page_flips += 1
            else:
                if ksm.ksmd.run != 1:  # keep merging while ksmd is stopped
                    ksm.ksmd.run = 1
                    self.report.run_changes += 1
                ksm.scan(1)
                self.report.caller_scans += 1

    # ---- checks and samples -----------------------------------------------------

    def check_all(self) -> None:
        with self.regions_lock:
            regions = list(self.regions)
        for region in regions:
            with region.lock:
                if not region.closed:
                    self.check_region(region)
        self.report.checks += 1
        s = ksm.stats()
        if sum(s[k] for k in _KERNEL_SUMS) != s["rmap_items"]:
            self.error(f"statistics do not add up: {dict((k, s[k]) for k in (*_KERNEL_SUMS, 'rmap_items'))}")

    def sample(self, elapsed: float) -> dict[str, float]:
        s = ksm.stats()
        with self.regions_lock:
            regions = list(self.regions)
        region_bytes = sum(r.npages for r in regions) * PAGE
        rss_kib = _proc_kib("/proc/self/status", "VmRSS:")
        return {
            "elapsed_s": round(elapsed, 1),
            "rss_mib": round(rss_kib / 1024, 1),
            "pss_mib": round(_proc_kib("/proc/self/smaps_rollup", "Pss:") / 1024, 1),
            "frames": s["frames"],
            "pool_mib": round(s["pool_bytes"] / MIB, 2),
            "metadata_kib": round(s["metadata_bytes"] / 1024, 1),
            "vmas_used": s["vmas_used"],
            "regions": len(regions),
            "region_mib": round(region_bytes / MIB, 2),
            # RSS beyond the memory under load, and bookkeeping per tracked page: what must
            # stay flat while regions of different sizes come and go.
            "overhead_mib": round(rss_kib / 1024 - region_bytes / MIB, 1),
            "meta_b_per_page": round(s["metadata_bytes"] / max(1, s["tracked_pages"]), 1),
            "pages_shared": s["pages_shared"],
            "pages_sharing": s["pages_sharing"],
            "merges": s["merges"] - self.start_stats["merges"],
            "cows": s["cows"] - self.start_stats["cows"],
            "scanned_k": (s["pages_scanned"] - self.start_stats["pages_scanned"]) // 1000,
            "checks": self.report.checks,
            "mismatches": self.report.mismatches,
            "errors": len(self.report.errors),
        }

    def emit(self, row: dict[str, float], writer: Any) -> None:
        if self.out is not None:
            print(" ".join(f"{_fmt(row[c]):>{_width(c)}}" for c in COLUMNS), file=self.out, flush=True)
        if writer is not None:
            writer.writerow(row)
            if self.csv_file is not None:
                self.csv_file.flush()

    # ---- the run ----------------------------------------------------------------

    def run(self) -> Report:
        knobs = {
            k: getattr(ksm.ksmd, k) for k in ("run", "sleep_millisecs", "pages_to_scan", "use_zero_pages")
        }
        self.start_stats = ksm.stats()
        rng = random.Random(f"{self.seed}-setup")
        csv_file = open(self.csv_path, "w", newline="") if self.csv_path else None
        self.csv_file = csv_file
        csv_writer = csv.DictWriter(csv_file, fieldnames=COLUMNS) if csv_file else None
        if csv_writer is not None:
            csv_writer.writeheader()
        if self.out is not None:
            print(
                f"ksm soak: {self.seconds:g} s, {self.writers} writer threads, "
                f"up to {self.max_regions} regions of up to {self.max_pages} pages (owned and foreign), "
                f"ksmd run=1 sleep_millisecs=0, "
                f"every byte checked every {self.check_every:g} s, seed {self.seed}",
                file=self.out,
            )
            print(" ".join(f"{c:>{_width(c)}}" for c in COLUMNS), file=self.out, flush=True)
        threads: list[threading.Thread] = []
        t0 = time.monotonic()
        try:
            for _ in range(max(3, self.max_regions // 2)):
                self.new_region(rng)
            ksm.ksmd.pages_to_scan = 10000
            ksm.ksmd.sleep_millisecs = 0
            ksm.ksmd.run = 1
            threads = [
                threading.Thread(
                    target=self.guarded(f"writer {i}", functools.partial(self.writer, i)), daemon=True
                )
                for i in range(self.writers)
            ]
            threads.append(threading.Thread(target=self.guarded("control", self.control), daemon=True))
            for t in threads:
                t.start()
            end = t0 + self.seconds
            next_check = t0 + self.check_every
            next_report = t0
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_report:
                    row = self.sample(now - t0)
                    self.report.samples.append(row)
                    self.emit(row, csv_writer)
                    next_report += self.report_every
                if now >= end:
                    break
                self.stop.wait(max(0.0, min(next_check, end) - now))
                if time.monotonic() >= next_check:
                    self.check_all()
                    next_check += self.check_every
        except BaseException as exc:
            self.error(f"main: {exc!r}")
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=60)
                if t.is_alive():
                    self.error(f"{t.name} did not stop (blocked in a fault?)")
            self.finish(t0, knobs, csv_writer)
            if csv_file is not None:
                csv_file.close()
        return self.report

    def finish(self, t0: float, knobs: dict[str, Any], csv_writer: Any) -> None:
        report = self.report
        try:
            ksm.ksmd.run = 0
            self.check_all()
            row = self.sample(time.monotonic() - t0)
            report.samples.append(row)
            self.emit(row, csv_writer)
            end = ksm.stats()
            report.pages_scanned = end["pages_scanned"] - self.start_stats["pages_scanned"]
            report.merges = end["merges"] - self.start_stats["merges"]
            report.cows = end["cows"] - self.start_stats["cows"]
            rng = random.Random(f"{self.seed}-finish")
            while self.regions:
                self.close_region(rng)
            for name in ("use_zero_pages", "pages_to_scan", "sleep_millisecs", "run"):
                setattr(ksm.ksmd, name, knobs[name])
            s = ksm.stats()
            report.final = {
                k: s[k]
                for k in (
                    "frames",
                    "pages_shared",
                    "deferred_frames",
                    "suspect_frames",
                    "pool_bytes",
                    "tracked_pages",
                    "metadata_bytes",
                )
            }
            if s["frames"] != s["pages_shared"] + s["deferred_frames"] + s["suspect_frames"]:
                self.error(f"frames not accounted for after closing every region: {report.final}")
            if s["tracked_pages"] != self.start_stats["tracked_pages"]:
                self.error(f"pages still tracked after closing every region: {report.final}")
        except BaseException as exc:
            self.error(f"finish: {exc!r}")
        report.seconds = round(time.monotonic() - t0, 1)
        report.writes = sum(self.writes)
        report.growth = {k: _trend(report.samples, k) for k in TRENDS}
        if self.out is not None:
            print(
                f"\n{report.seconds:g} s: {report.writes:,} writes, {report.merges:,} merges, "
                f"{report.cows:,} copies on write, {report.pages_scanned:,} pages scanned "
                f"({report.caller_scans} ksm.scan calls), {report.regions_created} regions created, "
                f"{report.regions_closed} closed, {report.advice_flips} advice flips, "
                f"{report.run_changes} run changes, {report.zero_page_flips} use_zero_pages flips, "
                f"{report.bytes_checked / MIB:,.0f} MiB compared",
                file=self.out,
            )
            print(
                "trend (steady part of the run): " + ", ".join(f"{k} {v}" for k, v in report.growth.items()),
                file=self.out,
            )
            print(f"after closing everything: {report.final}", file=self.out)
            for e in report.errors[:10]:
                print(f"error: {e}", file=self.out)
            print(report.verdict, file=self.out, flush=True)


# Figures judged flat or growing, with the slack allowed on top of 10 %.
TRENDS = {"overhead_mib": 8.0, "pool_mib": 2.0, "meta_b_per_page": 8.0, "vmas_used": 1024.0}


def _width(column: str) -> int:
    return max(len(column), 8)


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _trend(samples: list[dict[str, float]], key: str) -> str:
    """Flat or growing: the mean of the last third of the steady part (after the first
    tenth of the run) against the mean of its first third, with some slack (10 % and a
    floor: regions come and go, so the figures swing)."""
    if len(samples) < 6:
        return "too short to judge"
    steady = samples[max(1, len(samples) // 10) :]
    third = max(1, len(steady) // 3)
    first = sum(s[key] for s in steady[:third]) / third
    last = sum(s[key] for s in steady[-third:]) / third
    floor = TRENDS[key]
    verdict = "growing" if last > first * 1.10 + floor else "flat"
    return f"{verdict} ({first:g} -> {last:g})" if verdict == "growing" else "flat"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("SOAK_SECONDS", "3600")),
        metavar="SEC",
        help="how long to run (default SOAK_SECONDS, else 3600)",
    )
    parser.add_argument("--writers", type=int, default=4, metavar="N", help="writer threads (default 4)")
    parser.add_argument(
        "--regions", type=int, default=10, metavar="N", help="most regions at once (default 10)"
    )
    parser.add_argument(
        "--pages", type=int, default=512, metavar="N", help="most pages per region (default 512)"
    )
    parser.add_argument(
        "--every", type=float, default=30.0, metavar="SEC", help="seconds between report lines (default 30)"
    )
    parser.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default 1)")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the report lines to FILE")
    parser.add_argument("--json", action="store_true", help="print the final report as JSON (no table)")


def run(args: argparse.Namespace) -> int:
    if not ksm.available():
        print(f"ksm soak: merging is unavailable here: {ksm.unavailable_reason()}", file=sys.stderr)
        return 1
    soak = Soak(
        args.seconds,
        writers=args.writers,
        max_regions=args.regions,
        max_pages=args.pages,
        report_every=args.every,
        seed=args.seed,
        out=None if args.json else sys.stdout,
        csv_path=args.csv,
    )
    report = soak.run()
    if args.json:
        doc = asdict(report)
        doc["ok"], doc["verdict"] = report.ok, report.verdict
        print(json.dumps(doc, indent=1))
    return 0 if report.ok else 1
