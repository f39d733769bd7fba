"""The ``ksm`` command line: ``ksm demo``, ``ksm info``, ``ksm bench``.

``ksm demo`` merges several copies of real data (the installed Python standard
library, laid out page-aligned as a page cache would hold it) and reports the
memory before and after; ``ksm info`` shows what this machine supports.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

MIB = 1 << 20

# userfaultfd feature bits (linux/userfaultfd.h), for `ksm info`.
_UFFD_FEATURES: tuple[str, ...] = (
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
)

# The knobs of /sys/kernel/mm/ksm/ that `ksm info` shows (those this build lacks read "n/a").
_KNOBS: tuple[str, ...] = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "max_page_sharing",
    "use_zero_pages",
    "merge_across_nodes",
    "smart_scan",
    "advisor_mode",
)

_MAX_SCANS = 10
_MIN_SCANS = 3


# --------------------------------------------------------------------------- helpers


def _read_text(path: str) -> str | None:
    """The stripped contents of a small file, or None if it cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _pss_kib() -> int | None:
    """Proportional set size of this process in KiB, from /proc/self/smaps_rollup."""
    text = _read_text("/proc/self/smaps_rollup")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.1f} MiB"


def _stats() -> dict[str, int]:
    import ksm

    raw: dict[str, Any] = dict(ksm.stats())
    return {k: int(v) for k, v in raw.items()}


# --------------------------------------------------------------------------- demo data


@dataclass
class DataSet:
    """The stdlib files laid out page-aligned in one buffer."""

    data: bytearray
    files: int
    file_bytes: int
    root: str


def _stdlib_files(root: str) -> list[str]:
    """Regular files under `root`, sorted by path.

    Leaves out installed third-party packages (site-packages) and the build
    configuration (config-*/, which holds a static libpython of tens of MiB that
    would otherwise be most of the data set).
    """
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _e: None):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in ("site-packages", "dist-packages")
            and not (dirpath == root and d.startswith("config-"))
        ]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found.append(path)
    found.sort()
    return found


def load_stdlib(limit: int, page: int) -> DataSet:
    """Up to `limit` bytes of stdlib files, each starting on a page boundary.

    The last file is cut so the data set is exactly `limit` bytes when the
    standard library is big enough; otherwise it is all of it.
    """
    root = sysconfig.get_paths()["stdlib"]
    data = bytearray()
    files = 0
    file_bytes = 0
    for path in _stdlib_files(root):
        if len(data) >= limit:
            break
        try:
            with open(path, "rb") as f:
                content = f.read(limit - len(data))
        except OSError:
            continue
        if not content:
            continue
        data += content
        data += bytes(-len(data) % page)
        files += 1
        file_bytes += len(content)
    del data[limit:]
    return DataSet(data=data, files=files, file_bytes=file_bytes, root=root)


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line text progress bar on a tty, one line per step otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.monotonic()

    def update(self, done: int, pages_sharing: int, note: str = "") -> None:
        elapsed = time.monotonic() - self.start
        width = 20
        filled = width * min(done, self.total) // self.total
        bar = "#" * filled + "-" * (width - filled)
        line = (
            f"merging [{bar}] scan {done}/{self.total}  "
            f"pages_sharing {pages_sharing:,}  {elapsed:5.1f}s{note}"
        )
        sys.stdout.flush()  # keep the report and the progress lines in order when both are piped
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- demo


@dataclass
class Snapshot:
    pss_kib: int | None
    frames: int
    pool_bytes: int
    pages_sharing: int
    pages_shared: int
    general_profit: int
    vmas_added: int

    @classmethod
    def take(cls) -> Snapshot:
        s = _stats()
        return cls(
            pss_kib=_pss_kib(),
            frames=s.get("frames", 0),
            pool_bytes=s.get("pool_bytes", 0),
            pages_sharing=s.get("pages_sharing", 0),
            pages_shared=s.get("pages_shared", 0),
            general_profit=s.get("general_profit", 0),
            vmas_added=s.get("vmas_added", 0),
        )


def _touch(view: memoryview, page: int) -> None:
    """Read one byte of every page, so merged pages are mapped (for a fair PSS)."""
    bytes(view[::page])


def _change_pages(view: memoryview, rng: random.Random, percent: float, page: int) -> dict[int, bytes]:
    """Write a few random bytes into `percent`% of the pages; return the expected pages."""
    npages = len(view) // page
    count = min(npages, round(npages * percent / 100))
    changed: dict[int, bytes] = {}
    for index in sorted(rng.sample(range(npages), count)):
        base = index * page
        for _ in range(rng.randint(1, 8)):
            offset = base + rng.randrange(page)
            view[offset] = rng.randrange(256)
        changed[index] = bytes(view[base : base + page])
    return changed


def _mismatches(view: memoryview, original: memoryview, changed: dict[int, bytes], page: int) -> int:
    """Bytes of `view` that differ from `original` with the `changed` pages applied."""

    def count(actual: memoryview, expected: memoryview | bytes) -> int:
        a, e = bytes(actual), bytes(expected)
        if a == e:
            return 0
        return sum(1 for x, y in zip(a, e, strict=True) if x != y)

    def segments() -> Iterator[tuple[int, int]]:
        """Runs of unchanged pages, as byte ranges."""
        start = 0
        for index in sorted(changed):
            if index * page > start:
                yield start, index * page
            start = (index + 1) * page
        if start < len(view):
            yield start, len(view)

    bad = 0
    chunk = 16 * MIB
    for lo, hi in segments():
        for a in range(lo, hi, chunk):
            b = min(a + chunk, hi)
            if bytes(view[a:b]) != bytes(original[a:b]):
                for p in range(a, b, page):
                    bad += count(view[p : min(p + page, b)], original[p : min(p + page, b)])
    for index, expected in changed.items():
        base = index * page
        bad += count(view[base : base + page], expected)
    return bad


def _table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}} | {r[2]:>{widths[2]}}   {r[3]:>{widths[3]}}".rstrip()
        )
        if i == 0:
            lines.append("  " + "-" * (sum(widths) + 9))
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    import ksm

    out = sys.stdout
    if not ksm.available():
        print(f"ksm demo: merging is not available here: {ksm.unavailable_reason()}", file=sys.stderr)
        return 2
    if args.copies < 1 or args.mib <= 0 or not 0 <= args.change_percent <= 100:
        print("ksm demo: need --copies >= 1, --mib > 0, 0 <= --change-percent <= 100", file=sys.stderr)
        return 2

    page: int = ksm.PAGE_SIZE
    limit = max(page, int(args.mib * MIB) // page * page)
    seed: int = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)

    t0 = time.monotonic()
    ds = load_stdlib(limit, page)
    if not ds.data:
        print(f"ksm demo: no readable files under {ds.root}", file=sys.stderr)
        return 2
    size = len(ds.data)
    npages = size // page
    print(
        f"data: {ds.files:,} files from {ds.root} ({_mib(ds.file_bytes)} of file data, "
        f"{_mib(size)} page-aligned, {npages:,} pages), read in {time.monotonic() - t0:.2f}s"
    )
    if size < limit:
        print(f"note: the standard library has only {_mib(size)} (asked for {_mib(limit)})")

    maps: list[ksm.mmap] = []
    try:
        t0 = time.monotonic()
        changed: list[dict[int, bytes]] = []
        for _ in range(args.copies):
            m = ksm.mmap(size)
            maps.append(m)
            with memoryview(m) as view:
                view[:] = ds.data
                changed.append(_change_pages(view, rng, args.change_percent, page))
        nchanged = sum(len(c) for c in changed)
        print(
            f"loaded: {args.copies} copies ({_mib(size * args.copies)}), "
            f"{nchanged:,} pages changed ({args.change_percent:g}% per copy, seed {seed}) "
            f"in {time.monotonic() - t0:.2f}s"
        )

        before = Snapshot.take()
        for m in maps:
            m.madvise(ksm.MADV_MERGEABLE)

        progress = Progress(_MAX_SCANS, sys.stderr)
        start_stats = _stats()
        t0 = time.monotonic()
        scans = 0
        settled = False
        while scans < _MAX_SCANS:
            ksm.scan(1)
            scans += 1
            s = _stats()
            settled = bool(s.get("settled", False))
            progress.update(scans, s.get("pages_sharing", 0), "  settled" if settled else "")
            if settled and scans >= _MIN_SCANS:
                break
        merge_time = time.monotonic() - t0
        progress.finish()
        end_stats = _stats()

        for m in maps:
            with memoryview(m) as view:
                _touch(view, page)
        after = Snapshot.take()

        merged = end_stats.get("merges", 0) - start_stats.get("merges", 0)
        scanned = end_stats.get("pages_scanned", 0) - start_stats.get("pages_scanned", 0)
        rate = merged / merge_time if merge_time > 0 else float("inf")
        print(
            f"merged: {scans} full scans in {merge_time:.2f}s "
            f"({'settled' if settled else 'not settled'}), {merged:,} merges, "
            f"{rate:,.0f} pages merged/s, {scanned / max(merge_time, 1e-9):,.0f} pages scanned/s"
        )

        skipped = end_stats.get("vma_budget_skips", 0) - start_stats.get("vma_budget_skips", 0)
        if skipped > 0:
            print(f"note: {skipped:,} merge attempts put off by the VMA budget (vm.max_map_count)")
        print(_report(before, after, page, size * len(maps)))

        t0 = time.monotonic()
        bad = 0
        with memoryview(ds.data) as original:
            for m, expected in zip(maps, changed, strict=True):
                with memoryview(m) as view:
                    bad += _mismatches(view, original, expected, page)
        total = size * len(maps)
        print(
            f"verified: {total:,} bytes in {len(maps)} copies, {bad:,} mismatches "
            f"({time.monotonic() - t0:.2f}s)"
        )
        out.flush()
        return 1 if bad else 0
    finally:
        for m in maps:
            m.close()


def _report(before: Snapshot, after: Snapshot, page: int, loaded: int) -> str:
    def pss(s: Snapshot) -> str:
        return "n/a" if s.pss_kib is None else _mib(s.pss_kib * 1024)

    def delta(a: int | None, b: int | None, fmt: str = "mib") -> str:
        if a is None or b is None:
            return ""
        d = b - a
        if fmt == "mib":
            return f"{'+' if d > 0 else '-' if d < 0 else ''}{_mib(abs(d))}"
        return f"{d:+,}"

    rows: list[tuple[str, str, str, str]] = [
        ("", "before", "after", "change"),
        (
            "PSS (whole process)",
            pss(before),
            pss(after),
            delta(
                None if before.pss_kib is None else before.pss_kib * 1024,
                None if after.pss_kib is None else after.pss_kib * 1024,
            ),
        ),
        (
            "pool frames",
            f"{before.frames:,}",
            f"{after.frames:,}",
            delta(before.frames, after.frames, "n"),
        ),
        (
            "pool bytes",
            _mib(before.pool_bytes),
            _mib(after.pool_bytes),
            delta(before.pool_bytes, after.pool_bytes),
        ),
        ("pages_shared", f"{before.pages_shared:,}", f"{after.pages_shared:,}", ""),
        (
            "pages_sharing",
            f"{before.pages_sharing:,}",
            f"{after.pages_sharing:,}",
            f"= {_mib(after.pages_sharing * page)}",
        ),
        ("general_profit", _mib(before.general_profit), _mib(after.general_profit), ""),
        ("vmas_added", f"{before.vmas_added:,}", f"{after.vmas_added:,}", ""),
    ]
    text = _table(rows)
    if before.pss_kib is not None and after.pss_kib is not None and before.pss_kib > 0:
        saved = (before.pss_kib - after.pss_kib) * 1024
        text += (
            f"\nsaving: {_mib(saved)} of PSS, {100 * saved / loaded:.1f}% of the {_mib(loaded)} loaded "
            f"({100 * saved / (before.pss_kib * 1024):.1f}% of the whole process)"
        )
    return text


# --------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    del args
    import ksm

    rows: list[tuple[str, str]] = []
    rows.append(("ksm version", str(ksm.__version__)))
    avail = bool(ksm.available())
    rows.append(("available", "yes" if avail else "no"))
    if not avail:
        rows.append(("reason", str(ksm.unavailable_reason())))
    info: tuple[str, int] | None = ksm._ksm._uffd_info()
    if info is None:
        rows.append(("userfaultfd", "not usable"))
    else:
        mode, features = info
        rows.append(("userfaultfd mode", str(mode)))
        names = [n for i, n in enumerate(_UFFD_FEATURES) if features >> i & 1]
        unknown = features & ~((1 << len(_UFFD_FEATURES)) - 1)
        if unknown:
            names.append(f"{unknown:#x}")
        rows.append(("userfaultfd features", f"{features:#x} ({' '.join(names) or 'none'})"))
    rows.append(("page size", f"{int(ksm.PAGE_SIZE)} bytes"))
    rows.append(("vm.max_map_count", _read_text("/proc/sys/vm/max_map_count") or "unreadable"))
    unpriv = _read_text("/proc/sys/vm/unprivileged_userfaultfd")
    rows.append(("vm.unprivileged_userfaultfd", "unreadable" if unpriv is None else unpriv))
    kernel_run = _read_text("/sys/kernel/mm/ksm/run")
    if kernel_run is None:
        rows.append(("kernel KSM", "absent (/sys/kernel/mm/ksm/run not readable)"))
    else:
        rows.append(("kernel KSM", f"present, run={kernel_run}"))
    for knob in _KNOBS:
        try:
            value = str(getattr(ksm.ksmd, knob))
        except AttributeError:
            value = "n/a"
        rows.append((f"ksmd.{knob}", value))

    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 1}} {v}")
    return 0


# --------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    return _bench.run(args)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ksm", description="Kernel Samepage Merging rebuilt in userspace.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="merge copies of the Python standard library's files and report the saving",
        description=(
            "Load N copies of the installed standard library's files (page-aligned, as a cache "
            "would hold them) into ksm memory, change a few pages, merge, report memory before "
            "and after, and verify every byte."
        ),
    )
    demo.add_argument("--copies", type=int, default=4, metavar="N", help="copies to load (default 4)")
    demo.add_argument("--mib", type=float, default=64, metavar="M", help="MiB of data per copy (default 64)")
    demo.add_argument(
        "--change-percent",
        type=float,
        default=2,
        metavar="P",
        help="percent of pages changed at random in each copy (default 2)",
    )
    demo.add_argument("--seed", type=int, default=None, metavar="S", help="random seed (default: random)")
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="what this machine supports, and the effective settings")
    info.set_defaults(func=cmd_info)

    from . import _bench

    bench = sub.add_parser(
        "bench",
        help="the same workloads through ksm and through kernel KSM, side by side",
        description=(
            "Run each workload through ksm and through kernel KSM (driven through /sys/kernel/mm/ksm "
            "as root; every knob is restored afterwards) and print each figure for both, the ratio "
            "ksm/kernel, and the targets of issue 4. Workloads: "
            + "; ".join(f"{k}: {v}" for k, v in _bench.WORKLOAD_HELP.items())
            + "."
        ),
    )
    _bench.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func = args.func
    try:
        result = func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result)
