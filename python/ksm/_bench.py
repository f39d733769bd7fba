"""``ksm bench``: the same workloads through ksm and through kernel KSM, side by side.

One process, one command. Each workload is built twice with the same seed: once
in ``ksm.mmap`` memory merged by ksm's daemon, once in a plain anonymous private
``mmap`` merged by the kernel's ksmd (driven through ``/sys/kernel/mm/ksm``,
which needs root). Every figure is printed for both, with the ratio
ksm / kernel, and the targets ksm is held to (each printed with its reason)
are checked as ratios from the same run. Every kernel KSM knob is saved first and restored afterwards (also on
SIGINT and SIGTERM); if the benchmark ran kernel KSM, ``run=2`` unmerges
everything before ``run`` goes back to its saved value.

How each figure is taken (same for both sides unless said):

- *madvise to settled*: wall time from ``MADV_MERGEABLE`` (ksmd already
  configured with ``pages_to_scan`` large and ``sleep_millisecs=0``, ``run=1``
  right after the madvise) until a full scan completes that changes nothing.
  ksm: ``ksm.stats()["settled"]``, polled; kernel: ``full_scans`` and
  ``pages_sharing`` polled, settled when a full scan (the 2nd or later) ends
  with ``pages_sharing`` unchanged. A workload that has not settled after
  ``--max-scans`` full scans (or ``--timeout`` seconds) is reported as not
  settled, with the time so far.
- *scanner CPU*: CPU spent over that interval by ksm's threads other than the
  main thread (process CPU minus main-thread CPU), and by the kernel's
  ``ksmd`` thread (``/proc/<pid>/schedstat``).
- *CPU of a full scan after settling*: ksm: ``ksm.scan(1)`` with ksmd stopped,
  after one scan that finishes the one in progress (process CPU, averaged over
  at least 0.25 s of scans); kernel: ksmd's CPU over the full scans that
  follow settling (at least one, at least 0.25 s).
- *first write*: ksmd stopped; a 1-byte write (of the byte already there, so
  contents do not change) to each of up to 8192 merged pages, evenly spread
  (every page is looked at when a sample of 16,384 holds fewer than 4096
  merged ones, as for ksm's pairs under the VMA budget), timed in batches of 32
  from Python; the median per page over the batches.
  Pages are confirmed merged first (ksm: ``page_state``; kernel: the KSM flag
  in ``/proc/kpageflags``).
- *unmerge*: ``madvise(MADV_UNMERGEABLE)`` on the whole buffer.
- *pages saved*: ``pages_sharing``; *general_profit* as each reports it.
- *VMAs added*: lines of ``/proc/self/maps`` after settling minus before the
  madvise; *per merged page*: divided by ``pages_sharing``.
- *metadata*: ksm: ``metadata_peak_bytes / tracked_pages`` (bookkeeping at the
  end of the settling full scan, its unstable index included, the most a scan
  holds; ``metadata_bytes`` alone, taken while ksmd scans on, could miss the
  unstable index); kernel:
  ``ksm_rmap_items * 64 / pages`` from ``/proc/self/ksm_stat``.
- *metadata, half then written*: ksm only, after the unmerge: advised and
  merged again (``ksm.scan(1)`` until settled), then one byte changed in half
  of the pages (a seeded
  random half, the worst spread for bookkeeping: merged pages written at random
  leave written pages inside frame mappings one by one), then ``ksm.scan(1)``
  until settled, then ``metadata_peak_bytes / tracked_pages`` as above. The
  kernel's stays 64 bytes per ``rmap_item``. The contents are verified after
  the writes' scans and their unmerge too.
- *verified*: SHA-1 of the buffer before the madvise, after settling and after
  the unmerge are equal.
- *peak RSS* (JSON and ``--sweep``): the process's ``VmHWM``, reset through
  ``/proc/self/clear_refs`` before the buffer is allocated, when the workload
  settled, minus its RSS at the reset.

``--sweep`` runs one workload at several sizes (see ``_sweep.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap as stdlib_mmap
import os
import platform
import random
import signal
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, Protocol, TextIO

from ._data import pack_files

MIB = 1 << 20
GIB = 1 << 30

WORKLOADS: tuple[str, ...] = ("identical", "pairs", "unique", "zero", "dataset")
WORKLOAD_HELP: dict[str, str] = {
    "identical": "every page has the same (random) content",
    "pairs": "each random page appears twice, at random positions",
    "unique": "every page is different (random)",
    "zero": "every page is populated with zeros",
    "dataset": "4 copies of real data (stdlib + site-packages files, page-aligned), 1% of pages changed",
}

KSYS = "/sys/kernel/mm/ksm"
RMAP_ITEM_BYTES = 64  # sizeof(struct ksm_rmap_item) on 64-bit
KPF_KSM = 21  # /proc/kpageflags bit
FIRST_WRITE_PAGES = 8192
FIRST_WRITE_BATCH = 32
MIN_SCAN_CPU_TIME = 0.25
POLL_S = 0.0005
DATASET_COPIES = 4
DATASET_CHANGE_PERCENT = 1.0


# --------------------------------------------------------------------------- small helpers


def parse_size(text: str) -> int:
    """'1G', '64M', '16MiB', '4096' -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", MIB), ("g", GIB), ("t", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} (examples: 1G, 64M, 16MiB)") from None
    if not value > 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * mult)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM), in KiB."""
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss() -> int | None:
    """Reset the process's peak RSS (VmHWM) to its RSS now (``clear_refs`` 5); that RSS in
    bytes, or None where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5\n")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def peak_rss_bytes() -> int | None:
    """The process's peak RSS since the last ``reset_peak_rss()`` (VmHWM), in bytes."""
    hwm = _status_kib("VmHWM")
    return None if hwm is None else hwm * 1024


def count_vmas() -> int:
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def _digest(view: memoryview) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    chunk = 64 * MIB
    for a in range(0, len(view), chunk):
        h.update(view[a : a + chunk])
    return h.hexdigest()


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    mem_kib = 0
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": model,
        "cpus": os.cpu_count() or 0,
        "kernel": platform.release(),
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- workloads


def _dataset_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots: list[str] = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = os.path.realpath(paths[key])
        if os.path.isdir(p) and not any(p == r or p.startswith(r + os.sep) for r in roots):
            roots.append(p)
    return roots


def _dataset_files() -> Iterator[str]:
    """Files of the standard library and the installed site-packages, sorted per root.

    The top-level config-*/ directory (build configuration: a static libpython of
    tens of MiB) is left out, as in ``ksm demo``.
    """
    for root in _dataset_roots():
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _e: None):
            dirnames[:] = [d for d in dirnames if not (dirpath == root and d.startswith("config-"))]
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    found.append(path)
        found.sort()
        yield from found


def load_dataset(limit: int, page: int) -> tuple[bytearray, int]:
    """Up to `limit` bytes of files, each starting on a page boundary; (data, files)."""
    data, files, _ = pack_files(_dataset_files(), limit, page)
    return data, files


class Filler:
    """Writes a workload's content into a buffer; the same seed gives the same bytes."""

    def __init__(self, page: int, seed: int, dataset: bytearray | memoryview | None) -> None:
        self.page = page
        self.seed = seed
        self.dataset = dataset

    def fill(self, name: str, view: memoryview) -> int:
        """Fill `view`; return the number of pages changed (dataset) or 0."""
        page = self.page
        npages = len(view) // page
        rng = random.Random(f"{self.seed}:{name}")
        if name == "identical":
            chunk = rng.randbytes(page) * min(npages, 4096)
            for a in range(0, len(view), len(chunk)):
                b = min(a + len(chunk), len(view))
                view[a:b] = chunk[: b - a]
        elif name == "pairs":
            perm = list(range(npages))
            rng.shuffle(perm)
            block = 2048  # pairs per block of random bytes (8 MiB)
            for k0 in range(0, npages // 2, block):
                k1 = min(k0 + block, npages // 2)
                blob = rng.randbytes((k1 - k0) * page)
                for k in range(k0, k1):
                    src = blob[(k - k0) * page : (k - k0 + 1) * page]
                    for index in (perm[2 * k], perm[2 * k + 1]):
                        view[index * page : (index + 1) * page] = src
            if npages % 2:
                index = perm[-1]
                view[index * page : (index + 1) * page] = rng.randbytes(page)
        elif name == "unique":
            chunk_size = 16 * MIB
            for a in range(0, len(view), chunk_size):
                b = min(a + chunk_size, len(view))
                view[a:b] = rng.randbytes(b - a)
        elif name == "zero":
            for off in range(0, len(view), page):
                view[off] = 0  # a write fault: a real page, filled with zeros
        elif name == "dataset":
            assert self.dataset is not None
            data = self.dataset
            copies = len(view) // len(data)
            changed = 0
            per_copy = len(data) // page
            count = min(per_copy, round(per_copy * DATASET_CHANGE_PERCENT / 100))
            for c in range(copies):
                base = c * len(data)
                view[base : base + len(data)] = data
                for index in rng.sample(range(per_copy), count):
                    for _ in range(rng.randint(1, 8)):
                        off = base + index * page + rng.randrange(page)
                        view[off] = (view[off] + 1 + rng.randrange(255)) % 256
                    changed += 1
            return changed
        else:
            raise ValueError(f"unknown workload {name!r}")
        return 0


# --------------------------------------------------------------------------- kernel KSM control


def _ksmd_pid() -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if _read(f"/proc/{entry}/comm") == "ksmd":
            stat = _read(f"/proc/{entry}/stat") or ""
            # A kernel thread's parent is kthreadd (pid 2).
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 1 and fields[1] == "2":
                return int(entry)
    return None


def kernel_unavailable_reason() -> str | None:
    if not os.path.isdir(KSYS):
        return f"{KSYS} does not exist (kernel without CONFIG_KSM)"
    if os.geteuid() != 0 or not os.access(f"{KSYS}/run", os.W_OK):
        return f"{KSYS} is not writable (not root)"
    if _ksmd_pid() is None:
        return "the ksmd kernel thread was not found in /proc"
    return None


class KernelKsm:
    """Drives /sys/kernel/mm/ksm; remembers every writable knob and restores it."""

    def __init__(self) -> None:
        pid = _ksmd_pid()
        assert pid is not None
        self.pid = pid
        self.saved: dict[str, str] = {}
        for name in sorted(os.listdir(KSYS)):
            path = f"{KSYS}/{name}"
            if os.stat(path).st_mode & 0o200:
                value = _read(path)
                if value is not None:
                    self.saved[name] = self._norm(name, value)
        self.used = False  # set once run=1 was written: restore then unmerges with run=2

    @staticmethod
    def _norm(name: str, value: str) -> str:
        if name == "advisor_mode" and "[" in value:
            return value.partition("[")[2].partition("]")[0]
        return value

    def read(self, name: str) -> str:
        value = _read(f"{KSYS}/{name}")
        if value is None:
            raise OSError(f"cannot read {KSYS}/{name}")
        return self._norm(name, value)

    def num(self, name: str) -> int:
        return int(self.read(name))

    def write(self, name: str, value: int | str) -> None:
        if name == "run" and str(value) == "1":
            self.used = True
        with open(f"{KSYS}/{name}", "w", encoding="ascii") as f:
            f.write(f"{value}\n")

    def cpu_s(self) -> float:
        """CPU seconds of the ksmd thread so far."""
        text = _read(f"/proc/{self.pid}/schedstat")
        if text:
            return int(text.split()[0]) / 1e9
        stat = _read(f"/proc/{self.pid}/stat") or ""
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def configure(self, pages_to_scan: int) -> None:
        """Stop and unmerge (resets the scan cursor and full_scans), set the fastest knobs."""
        if self.saved.get("run") == "0":
            self.write("run", 2)
        self.write("pages_to_scan", pages_to_scan)
        self.write("sleep_millisecs", 0)

    def changed(self) -> dict[str, tuple[str, str]]:
        """Knobs whose value differs from the saved one: name -> (saved, now)."""
        out: dict[str, tuple[str, str]] = {}
        for name, value in self.saved.items():
            now = self._norm(name, _read(f"{KSYS}/{name}") or "?")
            if now != value:
                out[name] = (value, now)
        return out

    def restore(self) -> list[str]:
        """Put every knob back; returns error messages (empty on success)."""
        errors: list[str] = []

        def put(name: str, value: str) -> None:
            try:
                if self._norm(name, _read(f"{KSYS}/{name}") or "") != value:
                    self.write(name, value)
            except OSError as e:
                errors.append(f"{name}={value}: {e}")

        if self.used and self.saved.get("run") == "0":
            # Stop and unmerge everything we merged before run goes back to 0.
            for _ in range(3):
                try:
                    self.write("run", 2)
                    break
                except OSError as e:
                    errors.append(f"run=2: {e}")
        # advisor_mode first: switching it resets pages_to_scan.
        order = ["advisor_mode"] + [n for n in self.saved if n not in ("advisor_mode", "run")] + ["run"]
        for name in order:
            if name in self.saved:
                put(name, self.saved[name])
        left = self.changed()
        errors.extend(f"{n} is {now!r}, was {was!r}" for n, (was, now) in left.items())
        return errors


# --------------------------------------------------------------------------- one side


@dataclass
class Figures:
    """What one side measured for one workload (None: not measured / not applicable)."""

    settle_s: float | None = None
    settled: bool = False
    full_scans: int | None = None
    scanner_cpu_s: float | None = None
    scan_after_cpu_s: float | None = None
    first_write_us: float | None = None
    first_write_pages: int = 0
    unmerge_s: float | None = None
    pages_sharing: int | None = None
    pages_shared: int | None = None
    general_profit: int | None = None
    vmas_added: int | None = None
    vmas_after: int | None = None
    vmas_per_merged_page: float | None = None
    metadata_per_page: float | None = None
    metadata_written_per_page: float | None = None
    vma_budget_skips: int | None = None
    metadata_before_bytes: int | None = None
    metadata_bytes: int | None = None
    pool_bytes: int | None = None
    peak_rss_bytes: int | None = None
    verified: bool | None = None
    error: str | None = None


class Side(Protocol):
    name: str

    def alloc(self, size: int) -> Any: ...
    def view(self, buf: Any) -> memoryview: ...
    def close(self, buf: Any) -> None: ...
    def advise(self, buf: Any) -> None: ...
    def unadvise(self, buf: Any) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def cpu_s(self) -> float: ...
    def wait_settled(self, timeout: float, max_scans: int) -> tuple[bool, int]: ...
    def scan_after_cpu_s(self, timeout: float) -> float | None: ...
    def counters(self, buf: Any, npages: int) -> dict[str, int | float | None]: ...
    def metadata_bytes(self) -> int | None: ...
    def metadata_settled_after_writes(self, max_scans: int) -> float | None: ...
    def merged(self, buf: Any, offsets: list[int]) -> list[bool] | None: ...


class KsmSide:
    name = "ksm"

    def __init__(self, pages_to_scan: int) -> None:
        import ksm

        self.ksm = ksm
        self.pages_to_scan = pages_to_scan
        self.saved = {k: int(getattr(ksm.ksmd, k)) for k in ("run", "pages_to_scan", "sleep_millisecs")}
        self._scan_mark = 0
        self._skips_mark = 0

    def restore(self) -> None:
        for k in ("pages_to_scan", "sleep_millisecs", "run"):
            with contextlib.suppress(Exception):
                setattr(self.ksm.ksmd, k, self.saved[k])

    def alloc(self, size: int) -> Any:
        return self.ksm.mmap(size)

    def view(self, buf: Any) -> memoryview:
        return memoryview(buf)

    def close(self, buf: Any) -> None:
        buf.close()

    def advise(self, buf: Any) -> None:
        self.ksm.ksmd.run = 0
        self.ksm.ksmd.pages_to_scan = self.pages_to_scan
        self.ksm.ksmd.sleep_millisecs = 0
        s = self.ksm.stats()
        self._scan_mark = int(s["full_scans"])
        # The process's count goes on from earlier workloads and phases: this one's.
        self._skips_mark = int(s["vma_budget_skips"])
        buf.madvise(self.ksm.MADV_MERGEABLE)

    def unadvise(self, buf: Any) -> None:
        buf.madvise(self.ksm.MADV_UNMERGEABLE)

    def start(self) -> None:
        self.ksm.ksmd.run = 1

    def stop(self) -> None:
        self.ksm.ksmd.run = 0

    def cpu_s(self) -> float:
        # Everything but the (idle, polling) main thread: ksmd, the fault thread, workers.
        return time.process_time() - time.thread_time()

    def wait_settled(self, timeout: float, max_scans: int) -> tuple[bool, int]:
        # Polls stats() rather than ksm.wait_settled(): with sleep_millisecs=0 the
        # scanner re-takes its lock before a condvar waiter can (see the report).
        deadline = time.monotonic() + timeout
        while True:
            s = self.ksm.stats()
            scans = int(s["full_scans"]) - self._scan_mark
            if s["settled"] and scans >= 1:
                return True, scans
            if scans >= max_scans or time.monotonic() > deadline:
                return False, scans
            time.sleep(POLL_S)

    def scan_after_cpu_s(self, timeout: float) -> float | None:
        self.ksm.ksmd.run = 0
        self.ksm.scan(1)  # finishes the scan ksmd had begun, then one more
        t0, c0, n = time.monotonic(), time.process_time(), 0
        while n == 0 or (time.monotonic() - t0 < MIN_SCAN_CPU_TIME and n < 50):
            self.ksm.scan(1)
            n += 1
            if time.monotonic() - t0 > timeout:
                break
        return (time.process_time() - c0) / n

    def counters(self, buf: Any, npages: int) -> dict[str, int | float | None]:
        s = self.ksm.stats()
        tracked = int(s["tracked_pages"]) or npages
        return {
            "pages_sharing": int(s["pages_sharing"]),
            "pages_shared": int(s["pages_shared"]),
            "general_profit": int(s["general_profit"]),
            # The peak a full scan needs (its unstable index included): ksmd goes on
            # scanning, so metadata_bytes alone is taken at some point of the next scan.
            "metadata_per_page": int(s["metadata_peak_bytes"]) / tracked,
            "metadata_bytes": int(s["metadata_bytes"]),
            "pool_bytes": int(s["pool_bytes"]),
            "vma_budget_skips": int(s["vma_budget_skips"]) - self._skips_mark,
        }

    def metadata_bytes(self) -> int | None:
        return int(self.ksm.stats()["metadata_bytes"])

    def metadata_settled_after_writes(self, max_scans: int) -> float | None:
        # ksmd is stopped: scans in this thread, until one changes nothing.
        for _ in range(max_scans):
            self.ksm.scan(1)
            if self.ksm.stats()["settled"]:
                break
        s = self.ksm.stats()
        return int(s["metadata_peak_bytes"]) / (int(s["tracked_pages"]) or 1)

    def merged(self, buf: Any, offsets: list[int]) -> list[bool] | None:
        return [buf.page_state(off) == "merged" for off in offsets]


class KernelSide:
    name = "kernel"

    def __init__(self, k: KernelKsm, pages_to_scan: int) -> None:
        self.k = k
        self.pages_to_scan = pages_to_scan
        self._mark = 0
        self._boundary: tuple[int, float, float] | None = None  # (full_scans, cpu, time) at settling

    def alloc(self, size: int) -> Any:
        m = stdlib_mmap.mmap(
            -1,
            size,
            flags=stdlib_mmap.MAP_PRIVATE | stdlib_mmap.MAP_ANONYMOUS,
            prot=stdlib_mmap.PROT_READ | stdlib_mmap.PROT_WRITE,
        )
        # ksm.mmap memory is MADV_NOHUGEPAGE; give the kernel the same 4 KiB pages.
        with contextlib.suppress(OSError, AttributeError):
            m.madvise(stdlib_mmap.MADV_NOHUGEPAGE)
        return m

    def view(self, buf: Any) -> memoryview:
        return memoryview(buf)

    def close(self, buf: Any) -> None:
        buf.close()

    def advise(self, buf: Any) -> None:
        self.k.configure(self.pages_to_scan)
        self._mark = self.k.num("full_scans")
        buf.madvise(stdlib_mmap.MADV_MERGEABLE)

    def unadvise(self, buf: Any) -> None:
        buf.madvise(stdlib_mmap.MADV_UNMERGEABLE)

    def start(self) -> None:
        self.k.write("run", 1)

    def stop(self) -> None:
        self.k.write("run", 0)

    def cpu_s(self) -> float:
        return self.k.cpu_s()

    def wait_settled(self, timeout: float, max_scans: int) -> tuple[bool, int]:
        deadline = time.monotonic() + timeout
        last = self._mark
        history: list[int] = []
        while True:
            fs = self.k.num("full_scans")
            if fs != last:
                cpu, now = self.k.cpu_s(), time.monotonic()
                last = fs
                history.append(self.k.num("pages_sharing"))
                scans = fs - self._mark
                if scans >= 2 and len(history) >= 2 and history[-1] == history[-2]:
                    self._boundary = (fs, cpu, now)
                    return True, scans
                if scans >= max_scans:
                    self._boundary = (fs, cpu, now)
                    return False, scans
            if time.monotonic() > deadline:
                self._boundary = None
                return False, fs - self._mark
            time.sleep(POLL_S)

    def scan_after_cpu_s(self, timeout: float) -> float | None:
        # ksmd keeps scanning (sleep_millisecs=0): its CPU between full-scan boundaries.
        if self._boundary is None:
            return None
        fs0, cpu0, t0 = self._boundary
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fs = self.k.num("full_scans")
            if fs > fs0 and (time.monotonic() - t0 >= MIN_SCAN_CPU_TIME or fs - fs0 >= 50):
                return (self.k.cpu_s() - cpu0) / (fs - fs0)
            time.sleep(POLL_S)
        return None

    def counters(self, buf: Any, npages: int) -> dict[str, int | float | None]:
        rmap_items: int | None = None
        for line in (_read("/proc/self/ksm_stat") or "").splitlines():
            if line.startswith("ksm_rmap_items"):
                rmap_items = int(line.split()[1])
        return {
            "pages_sharing": self.k.num("pages_sharing"),
            "pages_shared": self.k.num("pages_shared"),
            "general_profit": self.k.num("general_profit"),
            "metadata_per_page": None if rmap_items is None else rmap_items * RMAP_ITEM_BYTES / npages,
            "metadata_bytes": None if rmap_items is None else rmap_items * RMAP_ITEM_BYTES,
            "pool_bytes": None,
            "vma_budget_skips": None,
        }

    def metadata_bytes(self) -> int | None:
        return None

    def metadata_settled_after_writes(self, max_scans: int) -> float | None:
        return None

    def merged(self, buf: Any, offsets: list[int]) -> list[bool] | None:
        """KSM flag of each page, from /proc/self/pagemap and /proc/kpageflags."""
        import ctypes

        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        page = stdlib_mmap.PAGESIZE
        try:
            pm = os.open("/proc/self/pagemap", os.O_RDONLY)
            kf = os.open("/proc/kpageflags", os.O_RDONLY)
        except OSError:
            return None
        try:
            out: list[bool] = []
            for off in offsets:
                entry = int.from_bytes(os.pread(pm, 8, (base + off) // page * 8), "little")
                pfn = entry & ((1 << 55) - 1)
                if not entry >> 63 & 1 or pfn == 0:
                    out.append(False)
                    continue
                flags = int.from_bytes(os.pread(kf, 8, pfn * 8), "little")
                out.append(bool(flags >> KPF_KSM & 1))
            return out
        finally:
            os.close(pm)
            os.close(kf)


# --------------------------------------------------------------------------- one workload on one side


def first_write_us(side: Side, buf: Any, view: memoryview, page: int) -> tuple[float | None, int]:
    """Median µs of a 1-byte first write on merged pages, timed in batches."""
    npages = len(view) // page
    step = max(1, npages // (2 * FIRST_WRITE_PAGES))
    candidates = [i * page for i in range(0, npages, step)]
    flags = side.merged(buf, candidates)
    if flags is None:
        return None, 0
    offs = [off for off, ok in zip(candidates, flags, strict=True) if ok]
    if len(offs) < FIRST_WRITE_PAGES // 2 and step > 1:
        # Few merged pages (pairs under the VMA budget): look at every page, so that
        # the median comes from as many pages as elsewhere.
        candidates = [i * page for i in range(npages)]
        flags = side.merged(buf, candidates) or []
        offs = [off for off, ok in zip(candidates, flags, strict=True) if ok]
    if len(offs) > FIRST_WRITE_PAGES:
        stride = len(offs) / FIRST_WRITE_PAGES
        offs = [offs[int(i * stride)] for i in range(FIRST_WRITE_PAGES)]
    if len(offs) < FIRST_WRITE_BATCH:
        return None, len(offs)
    pairs = [(off, view[off]) for off in offs]  # reading a merged page does not unshare it
    clock = time.perf_counter_ns
    per_page: list[float] = []
    for b in range(0, len(pairs) - FIRST_WRITE_BATCH + 1, FIRST_WRITE_BATCH):
        batch = pairs[b : b + FIRST_WRITE_BATCH]
        t = clock()
        for off, value in batch:
            view[off] = value
        per_page.append((clock() - t) / len(batch))
    return statistics.median(per_page) / 1000, len(per_page) * FIRST_WRITE_BATCH


def run_one(
    side: Side,
    workload: str,
    size: int,
    page: int,
    filler: Filler,
    timeout: float,
    max_scans: int,
    log: Callable[[str], None],
) -> Figures:
    fig = Figures()
    npages = size // page
    # Bookkeeping kept from earlier workloads (this one's buffer has records from its
    # allocation on: they are this workload's).
    fig.metadata_before_bytes = side.metadata_bytes()
    rss0 = reset_peak_rss()
    buf = side.alloc(size)
    view = side.view(buf)
    try:
        t_fill = time.monotonic()
        filler.fill(workload, view)
        before = _digest(view)
        log(f"{workload}/{side.name}: filled in {time.monotonic() - t_fill:.1f}s, merging")
        vmas0 = count_vmas()
        cpu0 = side.cpu_s()
        t0 = time.perf_counter()
        side.advise(buf)
        side.start()
        fig.settled, fig.full_scans = side.wait_settled(timeout, max_scans)
        fig.settle_s = time.perf_counter() - t0
        fig.scanner_cpu_s = side.cpu_s() - cpu0
        c = side.counters(buf, npages)
        peak = peak_rss_bytes()
        if rss0 is not None and peak is not None:
            fig.peak_rss_bytes = max(0, peak - rss0)
        log(
            f"{workload}/{side.name}: {'settled' if fig.settled else 'NOT settled'} after "
            f"{fig.full_scans} full scans in {fig.settle_s:.2f}s, pages_sharing {c['pages_sharing']}"
        )
        fig.scan_after_cpu_s = side.scan_after_cpu_s(timeout)
        side.stop()
        fig.pages_sharing = int(c["pages_sharing"] or 0)
        fig.pages_shared = int(c["pages_shared"] or 0)
        fig.general_profit = int(c["general_profit"] or 0)
        mpp = c["metadata_per_page"]
        fig.metadata_per_page = None if mpp is None else float(mpp)
        for key in ("metadata_bytes", "pool_bytes"):
            v = c[key]
            setattr(fig, key, None if v is None else int(v))
        skips = c["vma_budget_skips"]
        fig.vma_budget_skips = None if skips is None else int(skips)
        fig.vmas_after = count_vmas()
        fig.vmas_added = fig.vmas_after - vmas0
        if fig.pages_sharing:
            fig.vmas_per_merged_page = fig.vmas_added / fig.pages_sharing
        merged_ok = _digest(view) == before
        fig.first_write_us, fig.first_write_pages = first_write_us(side, buf, view, page)
        t0 = time.perf_counter()
        side.unadvise(buf)
        fig.unmerge_s = time.perf_counter() - t0
        fig.verified = merged_ok and _digest(view) == before
        if side.name == "ksm":
            # Merged again, then half of it written (after the unmerge, which is
            # measured on the merged workload as on the kernel's side).
            side.advise(buf)
            side.metadata_settled_after_writes(max_scans)
            write_half(view, page, filler.seed, workload)
            written = _digest(view)
            fig.metadata_written_per_page = side.metadata_settled_after_writes(max_scans)
            side.unadvise(buf)
            fig.verified = fig.verified and _digest(view) == written
    finally:
        view.release()
        side.close(buf)
    return fig


def write_half(view: memoryview, page: int, seed: int, workload: str) -> None:
    """Change one byte in a seeded random half of the pages (see *metadata, half then written*)."""
    rng = random.Random(f"{seed}:{workload}:written")
    npages = len(view) // page
    for i in rng.sample(range(npages), npages // 2):
        off = i * page + rng.randrange(page)
        view[off] ^= 0xA5


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    label: str
    key: str
    fmt: Callable[[float], str]
    better: str  # "lower" or "higher": for reading the ratio
    ksm_only: bool = False  # measured on ksm's side only (the kernel's shows "-")


def _f(digits: int, scale: float = 1.0) -> Callable[[float], str]:
    return lambda x: f"{x * scale:,.{digits}f}"


ROWS: tuple[Row, ...] = (
    Row("madvise to settled (s)", "settle_s", _f(3), "lower"),
    Row("full scans to settle", "full_scans", _f(0), "lower"),
    Row("scanner CPU to settle (s)", "scanner_cpu_s", _f(3), "lower"),
    Row("CPU of a full scan after settling (ms)", "scan_after_cpu_s", _f(2, 1000), "lower"),
    Row("first write on a merged page (us, median)", "first_write_us", _f(2), "lower"),
    Row("unmerge (s)", "unmerge_s", _f(3), "lower"),
    Row("pages saved (pages_sharing)", "pages_sharing", _f(0), "higher"),
    Row("general_profit (MiB)", "general_profit", _f(1, 1 / MIB), "higher"),
    Row("VMAs added", "vmas_added", _f(0), "lower"),
    Row("VMAs per merged page", "vmas_per_merged_page", _f(4), "lower"),
    Row("metadata (bytes per page)", "metadata_per_page", _f(1), "lower"),
    Row("metadata, half then written (B/page)", "metadata_written_per_page", _f(1), "lower", ksm_only=True),
)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclass
class WorkloadResult:
    workload: str
    pages: int
    ksm: Figures
    kernel: Figures | None
    ratios: dict[str, float | None] = field(default_factory=dict)


def _value(f: Figures | None, key: str) -> float | None:
    if f is None:
        return None
    v = getattr(f, key)
    return None if v is None else float(v)


def compute_ratios(r: WorkloadResult) -> None:
    for row in ROWS:
        r.ratios[row.key] = _ratio(_value(r.ksm, row.key), _value(r.kernel, row.key))


def table(results: list[WorkloadResult], with_kernel: bool) -> str:
    head = (
        ("workload", "figure", "ksm", "kernel", "ksm/kernel")
        if with_kernel
        else ("workload", "figure", "ksm")
    )
    rows: list[tuple[str, ...]] = [head]
    for r in results:
        first = True
        for row in ROWS:
            k = _value(r.ksm, row.key)
            cells = [r.workload if first else "", row.label, "-" if k is None else row.fmt(k)]
            if row.key == "settle_s" and not r.ksm.settled and k is not None:
                cells[2] = ">" + cells[2]
            if with_kernel:
                kv = _value(r.kernel, row.key)
                kc = "-" if kv is None else row.fmt(kv)
                if row.key == "settle_s" and r.kernel is not None and not r.kernel.settled and kv is not None:
                    kc = ">" + kc
                ratio = r.ratios.get(row.key)
                cells += [kc, "-" if ratio is None else f"{ratio:.3g}"]
            rows.append(tuple(cells))
            first = False
        verified = "yes" if r.ksm.verified else "NO"
        cells = ["", "contents verified", verified]
        if with_kernel:
            cells += ["-" if r.kernel is None else ("yes" if r.kernel.verified else "NO"), ""]
        rows.append(tuple(cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = []
    for i, line in enumerate(rows):
        parts = [f"{line[0]:<{widths[0]}}", f"{line[1]:<{widths[1]}}"]
        parts += [f"{c:>{w}}" for c, w in zip(line[2:], widths[2:], strict=True)]
        out.append("  ".join(parts).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


@dataclass
class Target:
    text: str
    status: str  # PASS, MISS, n/a
    detail: str
    reason: str = ""
    """Why ksm is held to it, in a few words."""


REASONS: dict[str, str] = {
    "dataset: settle": "real data (copies of files, 1% changed) should be saved well before the kernel does",
    "dataset: <= 0.01 VMAs": "merging maps frames, and each mapping is a VMA out of vm.max_map_count",
    "dataset: at least as many": "the saving itself should be the kernel's",
    "identical: at least kernel speed": "the easiest case should be no slower than the kernel",
    "identical: pages saved": "the same content gives the kernel's saving, max_page_sharing included",
    "identical: VMAs within budget": "one content repeated must fit the VMA budget (tiles of frames)",
    "pairs: no worse": "scattered pairs are the worst case for VMAs; time must stay bounded",
    "pairs: VMA budget": "the application keeps its VMAs; what the budget left unmerged is reported",
    "unique: full scan": "memory that does not change should cost next to nothing to watch",
    "first write": "copy-on-write is the application's cost of merging and should be the kernel's",
    "unmerge: no slower": "MADV_UNMERGEABLE and run = 2 must give memory back as fast as the kernel",
    "metadata: <= 16 bytes": "bookkeeping under a quarter of the kernel's 64-byte rmap_item",
}
"""Why each target is there, by the start of its text."""


def targets(results: list[WorkloadResult], budget: int) -> list[Target]:
    """The targets ksm is held to, PASS/MISS; `budget` is ksm's VMA budget (``stats()['vma_budget']``)."""
    by = {r.workload: r for r in results}
    out: list[Target] = []

    def add(text: str, ok: bool | None, detail: str) -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "MISS")
        reason = next((why for start, why in REASONS.items() if text.startswith(start)), "")
        out.append(Target(text, status, detail, reason))

    def saved_share(r: WorkloadResult) -> float:
        kk = r.kernel.pages_sharing if r.kernel is not None else None
        return 1.0 if not kk else (r.ksm.pages_sharing or 0) / kk

    def complete(r: WorkloadResult) -> bool:
        """A settle time counts only if ksm settled having saved >= 99% of the kernel's pages."""
        return r.ksm.settled and saved_share(r) >= 0.99

    def caveat(r: WorkloadResult) -> str:
        notes = [] if r.ksm.settled else ["ksm not settled"]
        if saved_share(r) < 0.99:
            notes.append(f"ksm saved only {100 * saved_share(r):.1f}% of the kernel's pages")
        return f" ({'; '.join(notes)})" if notes else ""

    def both(name: str) -> WorkloadResult | None:
        r = by.get(name)
        return r if r is not None and r.kernel is not None and r.ksm.error is None else None

    d = both("dataset")
    if d and d.kernel:
        kt, st = d.kernel.settle_s, d.ksm.settle_s
        speedup = None if not (kt and st) else kt / st
        add(
            "dataset: settle 4x sooner than kernel KSM",
            None if speedup is None else (complete(d) and speedup >= 4),
            "-" if speedup is None else f"kernel/ksm = {speedup:.2f}" + caveat(d),
        )
        vpp = d.ksm.vmas_per_merged_page
        add(
            "dataset: <= 0.01 VMAs per merged page",
            None if vpp is None else vpp <= 0.01,
            f"{vpp:.4f}" if vpp is not None else "-",
        )
        ks, kk = d.ksm.pages_sharing or 0, d.kernel.pages_sharing or 0
        add("dataset: at least as many pages saved", ks >= kk, f"ksm {ks:,} vs kernel {kk:,}")
    else:
        add("dataset workload targets", None, "not run with kernel KSM")

    i = both("identical")
    if i and i.kernel:
        ratio = _ratio(i.ksm.settle_s, i.kernel.settle_s)
        add(
            "identical: at least kernel speed (settle time)",
            None if ratio is None else (complete(i) and ratio <= 1),
            "-" if ratio is None else f"ksm/kernel = {ratio:.2f}" + caveat(i),
        )
        ks, kk = i.ksm.pages_sharing or 0, i.kernel.pages_sharing or 0
        add(
            "identical: pages saved within 1% of kernel's",
            kk > 0 and abs(ks - kk) <= 0.01 * kk,
            f"ksm {ks:,} vs kernel {kk:,}",
        )
        va = i.ksm.vmas_after or 0
        add("identical: VMAs within budget", va <= budget, f"{va:,} VMAs, budget {budget:,}")
    else:
        add("identical workload targets", None, "not run with kernel KSM")

    p = both("pairs")
    if p and p.kernel:
        ratio = _ratio(p.ksm.settle_s, p.kernel.settle_s)
        va = p.ksm.vmas_after or 0
        # The VMA budget is expected to stop merging random pairs short (what was left
        # is reported in the next target): the time counts if ksm settled having
        # saved what the kernel did, or every page it did not save was put off by the
        # budget, which was then (nearly) full.
        at_budget = bool(p.ksm.vma_budget_skips) and va >= 0.99 * budget
        counted = p.ksm.settled and (saved_share(p) >= 0.99 or at_budget)
        why = caveat(p)
        if counted and at_budget and saved_share(p) < 0.99:
            share = 100 * saved_share(p)
            why = f" (settled at the VMA budget with {share:.1f}% of the kernel's pages, see below)"
        add(
            "pairs: no worse than 2x kernel's time",
            None if ratio is None else (counted and ratio <= 2),
            "-" if ratio is None else f"ksm/kernel = {ratio:.2f}" + why,
        )
        unmerged = (p.kernel.pages_sharing or 0) - (p.ksm.pages_sharing or 0)
        add(
            "pairs: VMA budget respected, unmerged reported",
            va <= budget,
            f"{va:,} VMAs (budget {budget:,}); {max(unmerged, 0):,} pages fewer saved than kernel, "
            f"{p.ksm.vma_budget_skips or 0:,} merges put off by the budget",
        )
    else:
        add("pairs workload targets", None, "not run with kernel KSM")

    u = both("unique")
    if u and u.kernel:
        ratio = _ratio(u.kernel.scan_after_cpu_s, u.ksm.scan_after_cpu_s)
        add(
            "unique: full scan after settling >= 100x less CPU",
            None if ratio is None else ratio >= 100,
            "-" if ratio is None else f"kernel/ksm = {ratio:.1f}",
        )
    else:
        add("unique workload targets", None, "not run with kernel KSM")

    fw = [(r.workload, r.ratios.get("first_write_us")) for r in results if r.kernel is not None]
    fwv = [(w, x) for w, x in fw if x is not None]
    if fwv:
        w, worst = max(fwv, key=lambda t: t[1])
        add(
            "first write on a merged page <= 1.5x kernel's",
            worst <= 1.5,
            f"worst ksm/kernel = {worst:.2f} ({w}); " + ", ".join(f"{a} {b:.2f}" for a, b in fwv),
        )
    else:
        add("first write on a merged page <= 1.5x kernel's", None, "no workload with merged pages on both")

    um = [
        (r.workload, r.ratios.get("unmerge_s"))
        for r in results
        if r.kernel is not None and (r.kernel.pages_sharing or 0) > 0
    ]
    umv = [(w, x) for w, x in um if x is not None]
    if umv:
        w, worst = max(umv, key=lambda t: t[1])
        add(
            "unmerge: no slower than kernel KSM",
            worst <= 1.0,
            f"worst ksm/kernel = {worst:.2f} ({w}); " + ", ".join(f"{a} {b:.2f}" for a, b in umv),
        )
    else:
        add("unmerge: no slower than kernel KSM", None, "no workload with merged pages on both")

    md = [(r.workload, r.ksm.metadata_per_page) for r in results if r.ksm.metadata_per_page is not None]
    md += [
        (f"{r.workload}, half then written", r.ksm.metadata_written_per_page)
        for r in results
        if r.ksm.metadata_written_per_page is not None
    ]
    if md:
        w, worst = max(md, key=lambda t: t[1] or 0.0)
        add(
            "metadata: <= 16 bytes per tracked page",
            (worst or 0.0) <= 16,
            f"worst {worst:.1f} B ({w}; kernel: 64 B per rmap_item)",
        )
    return out


# --------------------------------------------------------------------------- command


class _Terminated(SystemExit):
    pass


def restore_sides(ksm_side: Any, k: Any, old_term: Any, err: TextIO, log: Callable[[str], None]) -> list[str]:
    """Put ksm's knobs and (if driven) kernel KSM's back, with SIGINT and SIGTERM held
    off meanwhile, then the SIGTERM handler `old_term`; says on `err` what could not be
    restored. Returns those errors (empty on success)."""
    errors: list[str] = []
    prev_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ksm_side.restore()
        if k is not None:
            errors = k.restore()
    finally:
        signal.signal(signal.SIGINT, prev_int)
        signal.signal(signal.SIGTERM, old_term)
    if errors:
        print("ksm bench: could not restore kernel KSM knobs: " + "; ".join(errors), file=err)
    elif k is not None:
        log("kernel KSM knobs restored")
    return errors


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    del frame
    raise _Terminated(128 + signum)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="1G", help="bytes per workload, e.g. 1G (default), 64M, 16MiB")
    p.add_argument(
        "--only",
        action="append",
        metavar="WORKLOAD",
        help=(
            f"run only this workload (repeatable): {', '.join(WORKLOADS)}; or workers (worker processes "
            "loading the same data, merged by a ksm merge domain and by kernel KSM; not in the default set)"
        ),
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON (progress still on stderr)")
    p.add_argument("--no-kernel", action="store_true", help="measure ksm alone, leave kernel KSM untouched")
    p.add_argument("--seed", type=int, default=1, help="random seed of the workloads (default 1)")
    p.add_argument(
        "--pages-to-scan",
        type=int,
        default=100_000,
        metavar="N",
        help="pages_to_scan for both daemons while merging (default 100000; sleep_millisecs is 0)",
    )
    p.add_argument(
        "--max-scans",
        type=int,
        default=16,
        metavar="N",
        help="full scans after which a workload counts as not settled (default 16)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300,
        metavar="S",
        help="seconds after which a workload counts as not settled (default 300)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="workers: run each side N times in turn and report medians (default 1)",
    )
    p.add_argument(
        "--workers-data",
        choices=("stdlib", "dataset"),
        default="stdlib",
        help=(
            "workers: what each worker loads: the standard library's files (default; "
            "all of them where they hold less than asked, as the output then says) or "
            "the dataset workload's files (site-packages too: more of them)"
        ),
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--sweep",
        action="store_true",
        help=(
            "how the cost grows with the memory merged: one workload (dataset, or the one --only "
            "names) at each size of --sweep-sizes, through ksm and kernel KSM side by side; prints "
            "settle time, seconds per GiB, scanner CPU, peak RSS and pages saved per size (a size "
            "that does not fit in MemAvailable is skipped, and said so)"
        ),
    )
    p.add_argument(
        "--sweep-sizes",
        default="64M,256M,1G,4G,8G",
        metavar="SIZES",
        help="comma-separated sizes of --sweep (default 64M,256M,1G,4G,8G)",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="with --sweep: draw the sweep into FILE.png (needs matplotlib: pip install 'ksm[plot]')",
    )


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    import ksm

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err

    def fail(msg: str) -> int:
        print(f"ksm bench: {msg}", file=err)
        return 2

    if args.sweep:
        from . import _sweep

        return _sweep.sweep(args, out, err)
    if args.plot is not None:
        return fail("--plot draws a sweep: give --sweep too")
    if getattr(args, "workers_data", "stdlib") != "stdlib" and "workers" not in (args.only or []):
        return fail("--workers-data says what the workers load: give --only workers too")
    try:
        size = parse_size(args.size)
    except ValueError as e:
        return fail(str(e))
    if args.only and "workers" in args.only:
        # Worker pools across processes: its own sizes and sides (see _workers.py).
        from . import _workers

        if not ksm.available():
            return fail(f"merging is not available here: {ksm.unavailable_reason()}")
        rc = _workers.bench(args, out, err)
        args.only = [w for w in args.only if w != "workers"]
        if not args.only:
            return rc
    selected = list(dict.fromkeys(args.only or WORKLOADS))
    bad = [w for w in selected if w not in WORKLOADS]
    if bad:
        return fail(f"unknown workload {', '.join(bad)}; choose from {', '.join(WORKLOADS)}")
    if args.pages_to_scan < 1 or args.max_scans < 2 or args.timeout <= 0:
        return fail("need --pages-to-scan >= 1, --max-scans >= 2, --timeout > 0")
    if not ksm.available():
        return fail(f"merging is not available here: {ksm.unavailable_reason()}")

    page = int(ksm.PAGE_SIZE)
    unit = page * DATASET_COPIES
    size = max(unit, size // unit * unit)
    npages = size // page

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=err, flush=True)

    kernel_note: str | None = "--no-kernel given" if args.no_kernel else kernel_unavailable_reason()
    max_map_count = int(_read("/proc/sys/vm/max_map_count") or 65530)
    # ksm's VMA budget: vm.max_map_count - ksmd.vma_reserve (the knob; stats()'s
    # vma_budget is only counted once ksm has scanned).
    budget = max(0, max_map_count - int(ksm._ksm.ksmd.vma_reserve))

    results: list[WorkloadResult] = []
    dataset_info: dict[str, Any] | None = None
    k: KernelKsm | None = None
    restore_errors: list[str] = []
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    ksm_side = KsmSide(args.pages_to_scan)
    interrupted = False
    try:
        if kernel_note is None:
            k = KernelKsm()
            if k.saved.get("run") != "0" or k.num("pages_sharing") != 0:
                log(
                    f"warning: kernel KSM is in use (run={k.saved.get('run')}, "
                    f"pages_sharing={k.num('pages_sharing')}): its figures include other processes"
                )
        dataset: bytearray | None = None
        if "dataset" in selected:
            t = time.monotonic()
            dataset, files = load_dataset(size // DATASET_COPIES, page)
            if len(dataset) < size // DATASET_COPIES:
                log(f"note: only {len(dataset) / MIB:.1f} MiB of files found for the data set")
            dataset_info = {
                "files": files,
                "bytes": len(dataset),
                "roots": _dataset_roots(),
                "copies": DATASET_COPIES,
                "change_percent": DATASET_CHANGE_PERCENT,
            }
            log(
                f"dataset: {files:,} files, {len(dataset) / MIB:.1f} MiB, read in {time.monotonic() - t:.1f}s"
            )
        filler = Filler(page, args.seed, dataset)
        for w in selected:
            wsize = size
            if w == "dataset" and dataset is not None:
                wsize = max(page, len(dataset)) * DATASET_COPIES
                if not dataset:
                    log("dataset: no files found, skipped")
                    continue
            figs: dict[str, Figures | None] = {"ksm": None, "kernel": None}
            sides: list[Side] = [ksm_side]
            if k is not None:
                sides.append(KernelSide(k, args.pages_to_scan))
            for side in sides:
                try:
                    figs[side.name] = run_one(side, w, wsize, page, filler, args.timeout, args.max_scans, log)
                except (OSError, MemoryError, ValueError) as e:
                    figs[side.name] = Figures(error=f"{type(e).__name__}: {e}")
                    log(f"{w}/{side.name}: failed: {e}")
                    with contextlib.suppress(Exception):
                        side.stop()
            kf = figs["kernel"]
            kf_ok = kf if kf is not None and kf.error is None else None
            r = WorkloadResult(w, wsize // page, figs["ksm"] or Figures(), kf_ok)
            compute_ratios(r)
            results.append(r)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        restore_errors = restore_sides(ksm_side, k, old_term, err, log)
    if interrupted:
        print("interrupted", file=err)
        return 130

    with_kernel = k is not None
    tg = targets(results, budget) if with_kernel else []
    info = machine()
    header = (
        f"ksm bench: {size / MIB:,.0f} MiB per workload ({npages:,} pages of {page} B), seed {args.seed}, "
        f"ksm {ksm.__version__}\n"
        f"machine: {info['cpus']} x {info['cpu']}, Linux {info['kernel']}, {info['mem_gib']} GiB, "
        f"Python {info['python']}\n"
        f"both daemons: pages_to_scan={args.pages_to_scan} sleep_millisecs=0; "
        f"vm.max_map_count={max_map_count} (ksm's VMA budget {budget:,})"
    )
    if not with_kernel:
        header += f"\nkernel KSM not driven: {kernel_note}; ksm's figures alone"
    if args.json:
        doc: dict[str, Any] = {
            "size": size,
            "page_size": page,
            "seed": args.seed,
            "ksm_version": ksm.__version__,
            "machine": info,
            "pages_to_scan": args.pages_to_scan,
            "max_map_count": max_map_count,
            "vma_budget": budget,
            "kernel": None if not with_kernel else {"ksmd_pid": k.pid if k else None},
            "kernel_note": kernel_note,
            "dataset": dataset_info,
            "workloads": {
                r.workload: {
                    "pages": r.pages,
                    "ksm": asdict(r.ksm),
                    "kernel": None if r.kernel is None else asdict(r.kernel),
                    "ratio_ksm_over_kernel": r.ratios,
                }
                for r in results
            },
            "targets": [asdict(t) for t in tg],
            "knobs_restored": not restore_errors,
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        print(header, file=out)
        if dataset_info:
            print(
                f"dataset: {dataset_info['files']:,} files "
                f"({dataset_info['bytes'] / MIB:.1f} MiB page-aligned) "
                f"from {', '.join(dataset_info['roots'])}, {DATASET_COPIES} copies, "
                f"{DATASET_CHANGE_PERCENT:g}% of pages changed per copy",
                file=out,
            )
        print(file=out)
        print(table(results, with_kernel), file=out)
        for r in results:
            for name, f in (("ksm", r.ksm), ("kernel", r.kernel)):
                if f is not None and f.error:
                    print(f"error: {r.workload}/{name}: {f.error}", file=out)
            if r.kernel is None and with_kernel:
                print(f"note: {r.workload}: no kernel figures", file=out)
            if r.ksm.metadata_before_bytes:
                print(
                    f"note: {r.workload}: ksm's metadata_bytes was already "
                    f"{r.ksm.metadata_before_bytes / 1024:,.0f} KiB before its buffer was allocated "
                    "(kept from earlier workloads); its metadata and general_profit rows include it",
                    file=out,
                )
        if tg:
            print(file=out)
            print("targets, each a ratio measured in this run (why it matters below each):", file=out)
            width = max(len(x.text) for x in tg)
            for x in tg:
                print(f"  {x.status:<4}  {x.text:<{width}}  {x.detail}", file=out)
                if x.reason:
                    print(f"        {x.reason}", file=out)
    bad_verify = [
        r.workload for r in results if r.ksm.verified is False or (r.kernel and r.kernel.verified is False)
    ]
    if bad_verify:
        print(f"ksm bench: contents changed by merging in {', '.join(bad_verify)}", file=err)
        return 1
    if restore_errors:
        return 1
    return 0
