"""Publishing each process's statistics, for ``ksm top`` and ``ksm stat``.

Every process that uses ksm (its first ``ksm.mmap``, ``ksm.madvise`` or knob
write on ``ksm.ksmd``) starts a daemon thread that writes its statistics, about
once a second, to ``/dev/shm/ksm-<pid>.json`` (written to a temporary file and
renamed, so a reader never sees half a file), and removes the file at exit (a
process killed by a signal cannot: see stale files below).
The kernel keeps the same figures in ``/proc/<pid>/ksm_stat``; a userspace
merger has to publish them itself.

Environment:
    ``KSM_PUBLISH=0`` turns publishing off for the process.
    ``KSM_PUBLISH_DIR`` publishes to (and reads from) another directory
    (default ``/dev/shm``).
    ``KSM_PUBLISH_INTERVAL`` seconds between refreshes (default 1).

A file whose process is gone (no such pid, or the pid was reused: the start
time in ``/proc/<pid>/stat`` differs) is stale: readers ignore it and remove it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _knobs

FORMAT = 1
"""Version of the file format (the ``format`` key)."""

DEFAULT_DIR = "/dev/shm"
DEFAULT_INTERVAL = 1.0
_NAME = re.compile(r"^ksm-(\d+)\.json$")
_MAX_BYTES = 1 << 20

# The kernel's /proc/<pid>/ksm_stat names, in the kernel's order.
KSM_STAT_NAMES: tuple[str, ...] = (
    "ksm_rmap_items",
    "ksm_zero_pages",
    "ksm_merging_pages",
    "ksm_process_profit",
    "ksm_merge_any",
    "ksm_mergeable",
)


# --------------------------------------------------------------------------- settings


def enabled() -> bool:
    """Whether this process publishes (``KSM_PUBLISH`` is not ``0``/``no``/``false``/``off``)."""
    return os.environ.get("KSM_PUBLISH", "1").strip().lower() not in ("0", "no", "false", "off")


def directory() -> Path:
    """Where statistics files are written and read (``KSM_PUBLISH_DIR``, default ``/dev/shm``)."""
    return Path(os.environ.get("KSM_PUBLISH_DIR") or DEFAULT_DIR)


def interval() -> float:
    """Seconds between refreshes (``KSM_PUBLISH_INTERVAL``, default 1; at least 0.01)."""
    raw = os.environ.get("KSM_PUBLISH_INTERVAL")
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL
    return max(value, 0.01) if value == value else DEFAULT_INTERVAL  # NaN: the default


def path_for(pid: int) -> Path:
    """The statistics file of process ``pid``."""
    return directory() / f"ksm-{pid}.json"


# --------------------------------------------------------------------------- /proc


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` (empty if unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] if raw else []


# --------------------------------------------------------------------------- records


def ksm_stat(stats: dict[str, Any], merge_any: bool | None = None) -> dict[str, int]:
    """The kernel's ``/proc/<pid>/ksm_stat`` figures from a ``ksm.stats()`` snapshot.

    Fields the core reports itself (``ksm_zero_pages``, ``ksm_merging_pages``, ...)
    are used as they are; otherwise: ``ksm_rmap_items`` = ``rmap_items``,
    ``ksm_zero_pages`` = ``ksm_zero_pages`` (0 if absent),
    ``ksm_merging_pages`` = ``pages_shared + pages_sharing`` (the process's
    pages that map a shared frame), ``ksm_process_profit`` = ``general_profit +
    pages_shared * PAGE_SIZE`` (like ``general_profit``, but every merging page of
    the process counts, first users of frames included), ``ksm_merge_any`` =
    ``get_memory_merge()`` where it exists, ``ksm_mergeable`` = 1 once any memory
    is advised.
    """

    def get(name: str, default: int) -> int:
        value = stats.get(name)
        return default if value is None else int(value)

    return {
        "ksm_rmap_items": get("ksm_rmap_items", get("rmap_items", 0)),
        "ksm_zero_pages": get("ksm_zero_pages", 0),
        "ksm_merging_pages": get("ksm_merging_pages", get("pages_shared", 0) + get("pages_sharing", 0)),
        "ksm_process_profit": get(
            "ksm_process_profit",
            get("general_profit", 0) + get("pages_shared", 0) * os.sysconf("SC_PAGE_SIZE"),
        ),
        "ksm_merge_any": get("ksm_merge_any", int(bool(merge_any))),
        "ksm_mergeable": get("ksm_mergeable", int(get("advised_pages", 0) > 0 or bool(merge_any))),
    }


def snapshot() -> dict[str, Any]:
    """This process's record, as published: identity, knobs, ``ksm_stat`` and ``stats()``."""
    import ksm

    stats: dict[str, Any] = {k: (v if isinstance(v, bool) else int(v)) for k, v in ksm.stats().items()}
    merge_any: bool | None = None
    getter = getattr(ksm, "get_memory_merge", None)
    if getter is not None:
        with contextlib.suppress(Exception):
            merge_any = bool(getter())
    knobs: dict[str, Any] = {}
    for name in _knobs.KNOB_NAMES:
        with contextlib.suppress(Exception):
            knobs[name] = getattr(ksm._ksm.ksmd, name)
    kernel = ksm_stat(stats, merge_any)
    native = getattr(ksm._ksm, "ksm_stat", None)  # the core's own figures, where it reports them
    if native is not None:
        with contextlib.suppress(Exception):
            kernel.update({k: int(v) for k, v in native().items()})
    pid = os.getpid()
    domain: str | None = None
    with contextlib.suppress(Exception):
        domain = ksm.domain()
    return {
        "format": FORMAT,
        "pid": pid,
        "start_time": start_time(pid),
        "cmdline": cmdline(pid),
        "updated_at": time.time(),
        "ksm_version": ksm.__version__,
        "page_size": int(ksm.PAGE_SIZE),
        "available": bool(ksm.available()),
        "knobs": knobs,
        "ksm_stat": kernel,
        "stats": stats,
        "domain": domain,
    }


@dataclass
class Record:
    """One live process's published statistics."""

    pid: int
    path: Path
    data: dict[str, Any]

    @property
    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.data.get("stats", {})
        return stats

    @property
    def domain(self) -> str | None:
        """The merge domain the process joined, if any."""
        d = self.data.get("domain")
        return d if isinstance(d, str) else None

    @property
    def command(self) -> str:
        """The command line for display: program names without their directories, one line."""
        args: list[str] = list(self.data.get("cmdline") or [])
        for i in range(min(2, len(args))):
            if i == 1 and args[1].startswith("-"):
                break
            args[i] = os.path.basename(args[i]) or args[i]
        return " ".join(" ".join(args).split())

    @property
    def page_size(self) -> int:
        return int(self.data.get("page_size", 4096))

    @property
    def run(self) -> int | None:
        value = self.data.get("knobs", {}).get("run")
        return None if value is None else int(value)

    @property
    def ksm_stat(self) -> dict[str, int]:
        published: dict[str, int] | None = self.data.get("ksm_stat")
        return dict(published) if published else ksm_stat(self.stats)


def _remove_stale(path: Path) -> None:
    # Files of other users in a sticky /dev/shm cannot be removed: leave them.
    with contextlib.suppress(OSError):
        path.unlink()


def read(pid: int, *, clean: bool = True) -> Record | None:
    """The record of ``pid`` if that process is alive and publishing, else None.

    A stale file (the process is gone, or its pid now belongs to another process)
    is removed when ``clean`` is true, as is an unreadable one.
    """
    path = path_for(pid)
    try:
        # Not following symlinks, a regular file, at most _MAX_BYTES: /dev/shm is writable by all.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP and clean:
            _remove_stale(path)  # a symlink: not written by ksm
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        raw = f.read(_MAX_BYTES + 1) if stat.S_ISREG(st.st_mode) else b""
    if not raw or len(raw) > _MAX_BYTES:
        return None
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        owner = None
    if owner is not None and owner != st.st_uid:
        return None  # written by another user than the process's: not its own statistics
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        published_pid = int(data["pid"])
        published_start = data.get("start_time")
    except (ValueError, KeyError, TypeError):
        # Renames are atomic, so a broken file was not written by ksm: stale.
        if clean:
            _remove_stale(path)
        return None
    actual_start = start_time(pid)
    if published_pid != pid or actual_start is None or published_start != actual_start:
        if clean:
            _remove_stale(path)
        return None
    return Record(pid=pid, path=path, data=data)


def pids() -> list[int]:
    """Process ids that have a statistics file (live or stale), sorted."""
    try:
        names = os.listdir(directory())
    except OSError:
        return []
    found = []
    for name in names:
        match = _NAME.match(name)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def read_all(*, clean: bool = True) -> list[Record]:
    """Every live process's record (stale files are skipped and, with ``clean``, removed)."""
    records = []
    for pid in pids():
        record = read(pid, clean=clean)
        if record is not None:
            records.append(record)
    return records


# --------------------------------------------------------------------------- writer


def write(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file in the same directory, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # readable by `ksm top` run by other users
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Publisher:
    """The daemon thread of one process (a forked child gets a new one on its first use)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.path = path_for(self.pid)
        self.interval = interval()
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held while writing and while removing
        self.stopped = False
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="ksm-publish", daemon=True)

    def start(self) -> None:
        self.publish()  # at once, so the file exists when the first use returns
        self.thread.start()

    def publish(self) -> None:
        if os.getpid() != self.pid:
            return  # inherited by a forked child: its lock may have been held at fork()
        with self.lock:
            if self.stopped:
                return
            try:
                write(self.path, snapshot())
                self.error = None
            except Exception as e:  # never disturb the application: note it, retry later
                self.error = f"{type(e).__name__}: {e}"

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.publish()

    def close(self) -> None:
        """Stop refreshing and remove the file (at exit)."""
        if os.getpid() != self.pid:
            return  # inherited by a forked child (atexit): the file is the parent's
        self.stop.set()
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=1)


_publisher: _Publisher | None = None
_start_lock = threading.Lock()


def start() -> None:
    """Start publishing this process's statistics, once (called on the first use of ksm)."""
    global _publisher
    if _publisher is not None and _publisher.pid == os.getpid():
        return
    with _start_lock:
        if _publisher is not None and _publisher.pid == os.getpid():
            return
        if not enabled():
            return
        publisher = _Publisher()
        _publisher = publisher
        atexit.register(publisher.close)
        publisher.start()


def publishing() -> Path | None:
    """The file this process publishes to, or None if it does not publish (yet, or at all)."""
    p = _publisher
    if p is None or p.pid != os.getpid() or p.stopped:
        return None
    return p.path


def refresh() -> None:
    """Publish now rather than at the next tick (no-op when this process does not publish)."""
    p = _publisher
    if p is not None and p.pid == os.getpid():
        p.publish()


def stop() -> None:
    """Stop publishing and remove this process's file (also done at exit)."""
    p = _publisher
    if p is not None and p.pid == os.getpid():
        p.close()


def _after_fork_child() -> None:
    # The thread did not survive fork(); the child publishes under its own pid on its
    # first use. The parent's atexit handler is inherited but checks the pid.
    global _publisher, _start_lock
    _publisher = None
    _start_lock = threading.Lock()


def iter_fields(record: Record) -> Iterator[tuple[str, int]]:
    """``ksm stat``'s lines: the kernel's ``ksm_stat`` names first, then ksm's statistics."""
    kernel = record.ksm_stat
    for name in KSM_STAT_NAMES:
        if name in kernel:
            yield name, int(kernel[name])
    for name, value in record.stats.items():
        if name not in kernel:
            yield name, int(value)
