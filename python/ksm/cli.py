"""The ``ksm`` command line: ``demo``, ``top``, ``stat``, ``info``, ``bench``, ``soak``, ``run``.

``ksm demo`` merges several copies of real data (the installed Python standard
library, laid out page-aligned as a page cache would hold it) and reports the
memory before and after (``--plot`` draws it against time); ``ksm top`` lists
every process using ksm with its savings and ``ksm stat PID`` shows one, from
the statistics each process publishes (``ksm._publish``); ``ksm info`` shows
what this machine supports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ksm import _knobs, _publish
from ksm._data import load_stdlib

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


class PlotError(Exception):
    """``--plot`` cannot work here (matplotlib missing)."""


@dataclass
class Plot:
    """Memory against time while the scanner works, for ``ksm demo --plot FILE.png``.

    One sample before merging, one after every full scan and one after the
    pages were touched (merged pages are mapped lazily, so PSS is final only then).
    """

    path: str
    title: str
    start: float = field(default_factory=time.monotonic)
    samples: list[tuple[float, Snapshot, str]] = field(default_factory=list)
    scans: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise PlotError(
                "--plot needs matplotlib, which is not installed: pip install 'ksm[plot]' "
                "(or pip install matplotlib)"
            ) from None

    def sample(self, snap: Snapshot, label: str = "") -> None:
        with self._lock:
            self.samples.append((time.monotonic() - self.start, snap, label))

    def scan_done(self) -> None:
        """Mark the end of a full scan, and sample."""
        self.scans.append(time.monotonic() - self.start)
        self.sample(Snapshot.take())

    def begin(self, every: float = 0.02) -> None:
        """Time 0: sample now, then every ``every`` seconds from a thread while the scanner works
        (``ksm.scan`` releases the GIL), so the curves show progress within a full scan."""
        self.start = time.monotonic()
        self.sample(Snapshot.take(), "MADV_MERGEABLE")

        def run() -> None:
            while not self._stop.wait(every):
                self.sample(Snapshot.take())

        self._thread = threading.Thread(target=run, name="ksm-demo-plot", daemon=True)
        self._thread.start()

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def save(self, page: int) -> None:
        from matplotlib.figure import Figure

        samples = sorted(self.samples, key=lambda s: s[0])
        t = [s[0] for s in samples]
        fig = Figure(figsize=(9, 5), layout="constrained")
        ax = fig.add_subplot()
        pss = [(s[1].pss_kib or 0) * 1024 / MIB for s in samples]
        frames = [s[1].frames * page / MIB for s in samples]
        sharing = [s[1].pages_sharing * page / MIB for s in samples]
        ax.plot(t, pss, ".-", label="PSS of the whole process")
        ax.plot(t, sharing, ".-", label="pages_sharing (memory saved)")
        ax.plot(t, frames, ".-", label="frames (one copy of each merged page)")
        for i, x in enumerate(self.scans):
            ax.axvline(x, color="0.8", linewidth=1, linestyle=":", zorder=0)
            ax.annotate(
                f"scan {i + 1}",
                (x, 1),
                xycoords=("data", "axes fraction"),
                xytext=(-2, -4),
                textcoords="offset points",
                fontsize=8,
                color="0.4",
                ha="right",
                va="top",
                rotation=90,
            )
        for x, _, label in samples:
            if label and label != "MADV_MERGEABLE":
                ax.annotate(
                    label,
                    (x, 0),
                    xytext=(-2, 3),
                    textcoords="offset points",
                    fontsize=8,
                    color="0.4",
                    ha="right",
                )
        ax.set_xlabel("seconds since MADV_MERGEABLE (dotted: end of each full scan)")
        ax.set_ylabel("MiB (page counts times the page size)")
        ax.set_title(self.title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="center left")
        fig.savefig(self.path, dpi=100)


def _hold(seconds: float) -> None:
    """Keep the merged memory mapped for a while, so that ``ksm top`` elsewhere can show it."""
    _publish.refresh()  # the final figures, for `ksm top` right now
    pub = _publish.publishing()
    where = f", published in {pub}" if pub is not None else ""
    print(
        f"holding the merged copies for {seconds:g}s (pid {os.getpid()}{where}); "
        "try `ksm top` or `ksm stat PID` in another terminal, Ctrl-C to stop",
        flush=True,
    )
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass


def cmd_demo(args: argparse.Namespace) -> int:
    import ksm

    if args.workers is not None:
        if not ksm.available():
            print(f"ksm demo: merging is not available here: {ksm.unavailable_reason()}", file=sys.stderr)
            return 2
        if args.numpy:
            from . import _pooldemo

            return _pooldemo.demo(args)
        from . import _workers

        return _workers.demo(args)
    if args.numpy:
        print("ksm demo: --numpy goes with --workers N", file=sys.stderr)
        return 2
    out = sys.stdout
    if not ksm.available():
        print(f"ksm demo: merging is not available here: {ksm.unavailable_reason()}", file=sys.stderr)
        return 2
    if args.copies < 1 or args.mib <= 0 or not 0 <= args.change_percent <= 100 or not args.hold >= 0:
        print(
            "ksm demo: need --copies >= 1, --mib > 0, 0 <= --change-percent <= 100, --hold >= 0",
            file=sys.stderr,
        )
        return 2

    plot: Plot | None = None
    if args.plot is not None:
        try:
            plot = Plot(args.plot, f"ksm demo: {args.copies} copies of {args.mib:g} MiB")
        except PlotError as e:
            print(f"ksm demo: {e}", file=sys.stderr)
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
        if plot is not None:
            plot.begin()
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
            if plot is not None:
                plot.scan_done()
            if settled and scans >= _MIN_SCANS:
                break
        merge_time = time.monotonic() - t0
        progress.finish()
        end_stats = _stats()

        for m in maps:
            with memoryview(m) as view:
                _touch(view, page)
        after = Snapshot.take()
        if plot is not None:
            plot.end()
            plot.sample(after, "every page read")

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
        if plot is not None:
            try:
                plot.save(page)
            except (OSError, ValueError) as e:
                print(f"ksm demo: could not write the plot to {args.plot}: {e}", file=sys.stderr)
                return 2
            print(f"plot: {args.plot}")
        out.flush()
        if args.hold > 0:
            _hold(args.hold)
        return 1 if bad else 0
    finally:
        if plot is not None:
            plot.end()
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
        (
            "vmas_added",
            f"{before.vmas_added:,}",
            f"{after.vmas_added:,}",
            f"{after.vmas_added / after.pages_sharing:.4f} per merged page" if after.pages_sharing else "",
        ),
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


def _uffd_mode(source: str) -> str:
    """``full`` or ``user-mode-only`` from the core's description of how it opened userfaultfd."""
    return "user-mode-only" if "user-mode only" in source else "full"


def _dev_userfaultfd() -> str:
    path = "/dev/userfaultfd"
    if not os.path.exists(path):
        return "absent"
    if os.access(path, os.R_OK | os.W_OK):
        return "read-write for this user"
    return "no access for this user"


def _count_lines(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _module_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _slab_object_size(name: str) -> int | None:
    """The object size in bytes of the kernel's slab cache `name` (/proc/slabinfo, readable
    by root), or None."""
    text = _read_text("/proc/slabinfo")
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[0] == name:
            return _int_or_none(fields[3])
    return None


def info_dict() -> dict[str, Any]:
    """Everything ``ksm info`` shows, as plain data (``ksm info --json``)."""
    import ksm

    uname = os.uname()
    avail = bool(ksm.available())
    uffd: dict[str, Any] = {
        "mode": None,
        "source": None,
        "features": None,
        "feature_names": [],
        "unprivileged_userfaultfd": _int_or_none(_read_text("/proc/sys/vm/unprivileged_userfaultfd")),
        "dev_userfaultfd": _dev_userfaultfd(),
    }
    uinfo: tuple[str, int] | None = ksm._ksm._uffd_info()
    if uinfo is not None:
        source, features = uinfo
        names = [n for i, n in enumerate(_UFFD_FEATURES) if features >> i & 1]
        unknown = features & ~((1 << len(_UFFD_FEATURES)) - 1)
        if unknown:
            names.append(f"{unknown:#x}")
        uffd.update(mode=_uffd_mode(source), source=source, features=features, feature_names=names)

    max_map = _int_or_none(_read_text("/proc/sys/vm/max_map_count"))
    reserve = int(ksm._ksm.ksmd.vma_reserve)  # the proxy's knob read would start publishing
    vma = {
        "max_map_count": max_map,
        "reserve": reserve,
        "budget": None if max_map is None else max(max_map - reserve, 0),
        "used": _count_lines("/proc/self/maps"),
        # What each VMA costs the kernel, for raising vm.max_map_count.
        "vm_area_struct_bytes": _slab_object_size("vm_area_struct"),
    }

    ksm_dir = "/sys/kernel/mm/ksm"
    run_path = f"{ksm_dir}/run"
    present = os.path.isdir(ksm_dir)
    root = os.geteuid() == 0
    writable = present and os.access(run_path, os.W_OK)
    if not present:
        why = "no /sys/kernel/mm/ksm (kernel built without CONFIG_KSM)"
    elif not root:
        why = "needs root"
    elif not writable:
        why = f"{run_path} is not writable (read-only sysfs?)"
    else:
        why = "root, and /sys/kernel/mm/ksm/run is writable"
    kernel_ksm: dict[str, Any] = {
        "present": present,
        "drivable": present and root and writable,
        "why": why,
        "run": _int_or_none(_read_text(run_path)),
        "pages_sharing": _int_or_none(_read_text(f"{ksm_dir}/pages_sharing")),
    }

    knobs: dict[str, Any] = {}
    for knob in _knobs.KNOB_NAMES:
        try:
            knobs[knob] = getattr(ksm.ksmd, knob)
        except AttributeError:
            knobs[knob] = None

    return {
        "ksm_version": str(ksm.__version__),
        "python": platform.python_version(),
        "kernel": {"release": uname.release, "machine": uname.machine},
        "page_size": int(ksm.PAGE_SIZE),
        "available": avail,
        "unavailable_reason": None if avail else ksm.unavailable_reason(),
        "userfaultfd": uffd,
        "vma": vma,
        "kernel_ksm": kernel_ksm,
        "knobs": knobs,
        "publish": {
            "enabled": _publish.enabled(),
            "dir": str(_publish.directory()),
            "interval": _publish.interval(),
        },
        "extras": {"numpy": _module_version("numpy"), "matplotlib": _module_version("matplotlib")},
    }


def _wrap(text: str, indent: int) -> str:
    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    lines = textwrap.wrap(text, width=width - indent, break_on_hyphens=False) or [""]
    return ("\n" + " " * indent).join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    uffd = d["userfaultfd"]
    vma = d["vma"]
    kk = d["kernel_ksm"]
    pub = d["publish"]
    sections: list[tuple[str, list[tuple[str, str]]]] = []

    rows = [("ksm version", d["ksm_version"]), ("available", yes(d["available"]))]
    if not d["available"]:
        rows.append(("reason", str(d["unavailable_reason"])))
    if uffd["mode"] is None:
        rows.append(("userfaultfd mode", "not usable"))
    else:
        if uffd["mode"] == "full":
            mode = f"full (via {uffd['source']})"
        else:
            mode = (
                "user-mode-only (no permission for full mode: a read(2) into a page under merge "
                "fails with EFAULT; full mode needs read-write access to /dev/userfaultfd or "
                "vm.unprivileged_userfaultfd=1)"
            )
        rows.append(("userfaultfd mode", mode))
        names = " ".join(uffd["feature_names"]) or "none"
        rows.append(("userfaultfd features", f"{uffd['features']:#x}: {names}"))
    unpriv = uffd["unprivileged_userfaultfd"]
    rows.append(("vm.unprivileged_userfaultfd", "unreadable" if unpriv is None else str(unpriv)))
    rows.append(("/dev/userfaultfd", uffd["dev_userfaultfd"]))
    rows.append(("page size", f"{d['page_size']} bytes"))
    sections.append(("Merging in this process", rows))

    rows = [("vm.max_map_count", "unreadable" if vma["max_map_count"] is None else str(vma["max_map_count"]))]
    if vma["budget"] is not None:
        used = "" if vma["used"] is None else f"; this process has {vma['used']:,} now"
        rows.append(
            (
                "VMA budget",
                f"{vma['budget']:,} VMAs (vm.max_map_count - ksmd.vma_reserve {vma['reserve']:,}){used}",
            )
        )
    vma_bytes = vma["vm_area_struct_bytes"]
    size = (
        f"vm_area_struct is {vma_bytes} bytes on this kernel (/proc/slabinfo) "
        "plus its share of maple-tree nodes"
        if vma_bytes
        else "vm_area_struct plus its share of maple-tree nodes"
    )
    rows.append(
        (
            "raising the limit",
            "merges the budget puts off are counted in stats()['vma_budget_skips'], and the memory they "
            "would save in stats()['vma_budget_bytes']; `sysctl vm.max_map_count=N` (as root) lifts the "
            f"budget with the limit, at about 200 bytes of kernel memory per VMA used ({size}; a VMA "
            "merging adds also holds an anon_vma and an anon_vma_chain, 380 bytes in all, charged in "
            "general_profit)",
        )
    )
    sections.append(("VMAs (each lone merged page costs up to 2)", rows))

    if kk["present"]:
        state = f"present, run={kk['run']}"
        if kk["pages_sharing"] is not None:
            state += f", pages_sharing={kk['pages_sharing']:,}"
    else:
        state = "absent"
    rows = [
        ("kernel KSM", state),
        ("drivable", f"{yes(kk['drivable'])} ({kk['why']})"),
    ]
    sections.append(("Kernel KSM (/sys/kernel/mm/ksm, for comparison)", rows))

    knobs = d["knobs"]
    rows = [(f"ksmd.{k}", "n/a (not implemented)" if v is None else str(v)) for k, v in knobs.items()]
    sections.append(("Effective knobs (ksm.ksmd)", rows))

    if pub["enabled"]:
        where = f"on: {pub['dir']}/ksm-<pid>.json every {pub['interval']:g} s (KSM_PUBLISH=0 turns it off)"
    else:
        where = "off (KSM_PUBLISH=0): `ksm top` does not see processes started like this"
    rows = [("publishing", where)]
    extras = d["extras"]
    rows.append(("numpy", extras["numpy"] or "not installed (pip install 'ksm[numpy]')"))
    rows.append(("matplotlib", extras["matplotlib"] or "not installed (pip install 'ksm[plot]')"))
    sections.append(("Statistics and extras", rows))

    kernel = d["kernel"]
    print(f"ksm {d['ksm_version']} · Python {d['python']} · Linux {kernel['release']} {kernel['machine']}")
    width = max(len(k) for _, rows in sections for k, _ in rows)
    for title, rows in sections:
        print(f"\n{title}")
        for k, v in rows:
            print(f"  {k + ':':<{width + 1}} {_wrap(v, width + 4)}")
    return 0


# --------------------------------------------------------------------------- top, stat


def _state(record: _publish.Record) -> str:
    run = record.run
    if run == 1:
        return "settled" if record.stats.get("settled") else "running"
    return {0: "stopped", 2: "unmerged"}.get(run if run is not None else -1, "?")


def _mib_short(nbytes: float) -> str:
    return f"{nbytes / MIB:,.1f}"


def top_table(
    records: Sequence[_publish.Record],
    width: int | None = None,
    domains: dict[str, dict[str, int]] | None = None,
) -> str:
    """``ksm top``'s screen: a title with the totals, then one line per process, most saved first.

    A member of a merge domain counts each of its pages on a domain frame as saved (the
    frame's one copy is the domain's): the totals take the frames of ``domains`` off
    once, so that they are memory saved across the processes, as the kernel counts it
    system-wide, and the profit is net of the domains' pools."""
    header = ("PID", "SHARING", "SAVED MiB", "PROFIT MiB", "FRAMES", "VMAS", "SCANS", "STATE", "COMMAND")
    rows: list[tuple[str, ...]] = []
    records = sorted(records, key=lambda r: (-int(r.stats.get("pages_sharing", 0)), r.pid))
    total_saved = 0
    total_profit = 0
    for r in records:
        s = r.stats
        saved = int(s.get("pages_sharing", 0)) * r.page_size
        total_saved += saved
        total_profit += int(s.get("general_profit", 0))
        rows.append(
            (
                str(r.pid),
                f"{int(s.get('pages_sharing', 0)):,}",
                _mib_short(saved),
                _mib_short(int(s.get("general_profit", 0))),
                f"{int(s.get('frames', 0)):,}",
                f"{int(s.get('vmas_used', 0)):,}",
                f"{int(s.get('full_scans', 0)):,}",
                _state(r),
                r.command,
            )
        )
    for name, d in (domains or {}).items():
        # (Only a domain whose members are listed: a member that does not publish
        # its figures counted nothing to take off.)
        if any(r.domain == name for r in records):
            total_saved -= int(d["pages_shared"]) * records[0].page_size
            total_profit -= int(d["pool_bytes"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    fixed = sum(widths) + 2 * (len(widths))
    lines = []
    for row in [header, *rows]:
        cells = [row[0].rjust(widths[0])]
        cells += [
            c.rjust(w) if i < 6 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row[1:-1], widths[1:], strict=True))
        ]
        command = row[-1]
        room = max((width or 0) - fixed, 10)
        if width is not None and len(command) > room:
            command = command[: room - 1] + "…"
        lines.append(("  ".join([*cells, command])).rstrip())
    when = time.strftime("%H:%M:%S")
    count = len(records)
    title = (
        f"ksm top - {when}  {count} process{'es' if count != 1 else ''} using ksm, "
        f"{_mib(total_saved)} saved, general_profit {_mib(total_profit)}"
    )
    if not records:
        lines.append("  (no process is using ksm; one appears here once it calls ksm.mmap or ksm.madvise)")
    return "\n".join([title, "", *lines])


def _printable(name: str) -> str:
    """`name` for one cell of a table: control characters and spaces shown escaped."""
    if name.isprintable() and " " not in name:
        return name
    return repr(name)


def domains_table(records: Sequence[_publish.Record], stats: dict[str, dict[str, int]]) -> str:
    """``ksm top``'s merge domains: one line per domain with its totals and its members' pids."""
    if not stats:
        return ""
    header = ("DOMAIN", "MEMBERS", "SHARED", "SHARING", "SAVED MiB", "POOL MiB", "LIVE", "PIDS")
    page = records[0].page_size if records else 4096
    rows = []
    for name in sorted(stats):
        d = stats[name]
        pids = sorted(r.pid for r in records if r.domain == name)
        rows.append(
            (
                _printable(name),
                f"{d['members']:,}",
                f"{d['pages_shared']:,}",
                f"{d['pages_sharing']:,}",
                _mib_short(d["pages_sharing"] * page),
                _mib_short(d["pool_bytes"]),
                f"{d['live_frames']:,}",
                " ".join(map(str, pids)) or "-",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(["", "merge domains (totals over their members, counted like the kernel's):", *lines])


def _domain_stats_now() -> dict[str, dict[str, int]]:
    """Every domain of this user with a broker, and its totals (members 0: left out)."""
    import ksm

    out: dict[str, dict[str, int]] = {}
    for name in ksm._ksm._domains():
        try:
            d = ksm.domain_stats(name)
        except OSError:
            continue
        if d["members"] > 0:
            out[name] = d
    return out


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("ksm top: --interval must be > 0", file=sys.stderr)
        return 2
    iterations: int | None = 1 if args.once else args.iterations
    if iterations is not None and iterations < 1:
        print("ksm top: -n must be >= 1", file=sys.stderr)
        return 2
    out = sys.stdout
    tty = out.isatty()
    done = 0
    try:
        while True:
            width = shutil.get_terminal_size((120, 24)).columns if tty else None
            records = _publish.read_all()
            domains = _domain_stats_now()
            table = top_table(records, width, domains) + domains_table(records, domains)
            if tty:
                out.write("\x1b[H\x1b[2J" + table + "\n")
            else:
                out.write(("\n" if done else "") + table + "\n")
            out.flush()
            done += 1
            if iterations is not None and done >= iterations:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_stat(args: argparse.Namespace) -> int:
    pid: int = args.pid
    if pid <= 0 or _publish.start_time(pid) is None:
        print(f"ksm stat: no process with pid {pid}", file=sys.stderr)
        return 1
    record = _publish.read(pid)
    if record is None:
        command = " ".join(_publish.cmdline(pid)) or "?"
        print(
            f"ksm stat: process {pid} ({command}) does not use ksm: nothing published at "
            f"{_publish.path_for(pid)} (a process publishes once it calls ksm.mmap or "
            "ksm.madvise, unless KSM_PUBLISH=0)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(record.data, indent=2))
        return 0
    for name, value in _publish.iter_fields(record):
        print(f"{name} {value}")
    return 0


# --------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    return _bench.run(args)


def cmd_soak(args: argparse.Namespace) -> int:
    from . import _soak

    return _soak.run(args)


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
    demo.add_argument(
        "--hold",
        type=float,
        default=0,
        metavar="SEC",
        help="keep the merged memory for SEC seconds after the report, to watch it with `ksm top`",
    )
    demo.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw PSS, frames and pages_sharing against time to FILE (needs matplotlib: ksm[plot])",
    )
    demo.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=(
            "instead: start N worker processes that each load the same data (--mib of it) into one "
            "merge domain, merge, and show each worker's PSS before and after"
        ),
    )
    demo.add_argument(
        "--numpy",
        action="store_true",
        help=(
            "with --workers N: run a worker-pool program that knows nothing of ksm (N workers each "
            "load the same --mib MiB numpy table) through `ksm run --domain NAME --numpy`, and show "
            "the workers' PSS going from N copies to about one"
        ),
    )
    demo.set_defaults(func=cmd_demo)

    top = sub.add_parser(
        "top",
        help="list every process using ksm with its savings, refreshing like top",
        description=(
            "Every live process using ksm, most memory saved first, from the statistics each "
            "publishes under /dev/shm (KSM_PUBLISH_DIR). On a terminal the screen is redrawn; "
            "otherwise one table is printed per refresh."
        ),
    )
    top.add_argument(
        "--interval",
        "-d",
        type=float,
        default=1.0,
        metavar="SEC",
        help="seconds between refreshes (default 1)",
    )
    top.add_argument(
        "-n", dest="iterations", type=int, default=None, metavar="ITER", help="stop after ITER refreshes"
    )
    top.add_argument("--once", action="store_true", help="print once and exit (same as -n 1)")
    top.set_defaults(func=cmd_top)

    stat = sub.add_parser(
        "stat",
        help="one process's statistics, like /proc/PID/ksm_stat",
        description=(
            "The statistics process PID publishes: the kernel's /proc/PID/ksm_stat names first "
            "(ksm_rmap_items, ksm_zero_pages, ksm_merging_pages, ksm_process_profit, ...), then "
            "ksm's own. Exit status 1 if PID does not exist or does not use ksm."
        ),
    )
    stat.add_argument("pid", type=int, metavar="PID", help="process id")
    stat.add_argument("--json", action="store_true", help="the whole published record as JSON")
    stat.set_defaults(func=cmd_stat)

    # Parsed by ksm._runner (main() hands it over before argparse); listed for --help.
    sub.add_parser(
        "run",
        help="run a Python program with ksm set up, no code changes (ksm run --help)",
        add_help=False,
    )

    info = sub.add_parser("info", help="what this machine supports, and the effective settings")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    from . import _bench

    bench = sub.add_parser(
        "bench",
        help="the same workloads through ksm and through kernel KSM, side by side",
        description=(
            "Run each workload through ksm and through kernel KSM (driven through /sys/kernel/mm/ksm "
            "as root; every knob is restored afterwards) and print each figure for both, the ratio "
            "ksm/kernel, and the targets ksm is held to, each with its reason. Workloads: "
            + "; ".join(f"{k}: {v}" for k, v in _bench.WORKLOAD_HELP.items())
            + "."
        ),
    )
    _bench.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    from . import _soak

    soak = sub.add_parser(
        "soak",
        help="a long run of mixed load with every byte checked against a model",
        description=(
            "Writer threads write into owned and foreign ksm memory while ksmd scans at full speed "
            "and regions are created and closed, advice flipped, run and use_zero_pages changed; "
            "every byte is compared with a model every second. Prints RSS, PSS, frames, pool and "
            "bookkeeping over time and a verdict (exit status 1 on any mismatch or error)."
        ),
    )
    _soak.add_arguments(soak)
    soak.set_defaults(func=cmd_soak)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        # Its own parser: everything after the program's name belongs to the program.
        from . import _runner

        return _runner.main(argv[1:])
    args = _parser().parse_args(argv)
    func = args.func
    try:
        result = func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ksm stat PID --json | head`): stop quietly, like cat.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    return int(result)
