"""Shared fixtures and helpers for the ksm test suite.

Statistics are per process and cumulative, so every test starts from a known
state: ksmd stopped, knobs at their defaults, and every ``ksm.mmap`` the test
created closed afterwards (a leak fails the test). Tests compare deltas of
``ksm.stats()``, or run in a fresh interpreter (``run_python``) when they need
absolute values.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import mmap as stdlib_mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Every process of the suite that uses ksm publishes its statistics (ksm top); forked
# children leave with os._exit, so their files would be left behind: publish into a
# directory of our own, removed at exit (after the test process removed its own file).
if "KSM_PUBLISH_DIR" not in os.environ:
    _publish_dir = tempfile.mkdtemp(prefix="ksm-tests-publish-")
    os.environ["KSM_PUBLISH_DIR"] = _publish_dir
    atexit.register(shutil.rmtree, _publish_dir, ignore_errors=True)

import ksm

PAGE = ksm.PAGE_SIZE
TESTS_DIR = Path(__file__).resolve().parent

# ---- hypothesis profiles ---------------------------------------------------------

# The autouse state fixture below is function scoped on purpose: each example
# cleans up after itself, the fixture guards the test as a whole.
_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
# fast (CI): derandomized, so that a run is reproducible; slow: explores afresh each time.
settings.register_profile(
    "fast",
    max_examples=50,
    deadline=None,
    stateful_step_count=40,
    suppress_health_check=_SUPPRESS,
    derandomize=True,
)
settings.register_profile(
    "slow", max_examples=1000, deadline=None, stateful_step_count=100, suppress_health_check=_SUPPRESS
)
settings.load_profile(os.environ.get("KSM_HYPOTHESIS_PROFILE", "fast"))

# ---- state around every test -----------------------------------------------------


def available_cores() -> int:
    """The cores this process may use, counted like Rust's ``available_parallelism``
    (``ksmd.hash_threads``' default, at most 1024): its CPU affinity, capped by any
    cgroup v2 CPU quota (``cpu.max``) from its cgroup up (v1 quotas are not read)."""
    cores = len(os.sched_getaffinity(0))
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    root = Path("/sys/fs/cgroup")
    d = root / path.lstrip("/") if path is not None else root
    while path is not None:
        limit = d / "cpu.max"
        quota, _, period = limit.read_text().partition(" ") if limit.exists() else ("max", "", "")
        if quota != "max" and period.strip():
            cores = min(cores, max(1, -(-int(quota) // int(period))))
        if d in (root, d.parent):
            break
        d = d.parent
    return min(cores, 1024)


# advisor_mode first: pages_to_scan cannot be set while the advisor is on.
KNOB_DEFAULTS: dict[str, int | str] = {
    "advisor_mode": "none",
    "run": 0,
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
    "max_page_sharing": 256,
    "use_zero_pages": 0,
    "merge_across_nodes": 1,
    "stable_node_chains_prune_millisecs": 2000,
    "smart_scan": 1,
    "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500,
    "advisor_max_pages_to_scan": 30000,
    "advisor_target_scan_time": 200,
    # ksm's own: VMAs kept for the application, half of the limit by default.
    "vma_reserve": int(Path("/proc/sys/vm/max_map_count").read_text()) // 2,
    "write_tracking": 1,
    # ksm's own: threads a scan hashes pages on, the cores available by default.
    "hash_threads": available_cores(),
}


class _TrackedMmap(ksm.mmap):
    """``ksm.mmap`` that registers itself, so the fixture can close leftovers."""

    live: list[weakref.ref[_TrackedMmap]] = []  # noqa: RUF012 - shared registry on purpose

    def __init__(self, *args: Any) -> None:
        super().__init__()
        _TrackedMmap.live.append(weakref.ref(self))


@pytest.fixture(autouse=True)
def ksm_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ksmd stopped and knobs at defaults around each test; every ksm.mmap closed after it."""
    ksm.ksmd.run = 0
    baseline = ksm.stats()["tracked_pages"]
    _TrackedMmap.live = []
    monkeypatch.setattr(ksm, "mmap", _TrackedMmap)
    yield
    ksm.ksmd.run = 0
    monkeypatch.undo()
    gc.collect()
    leaked = []
    for ref in _TrackedMmap.live:
        m = ref()
        if m is None or m.closed:
            continue
        try:
            m.close()
        except BufferError:
            leaked.append(m)
    _TrackedMmap.live = []
    ksm.set_memory_merge(False)
    for name, value in KNOB_DEFAULTS.items():
        if getattr(ksm.ksmd, name) != value:
            setattr(ksm.ksmd, name, value)
    assert not leaked, f"ksm.mmap objects still exported after the test: {leaked}"
    s = ksm.stats()
    assert s["frames"] == s["pages_shared"] + s["deferred_frames"] + s["suspect_frames"], (
        "frames not accounted for (a leak, or a frame freed while in use)",
        s,
    )
    tracked = ksm.stats()["tracked_pages"]
    assert tracked == baseline, (
        f"the test left {tracked - baseline} pages tracked (an advised range not unadvised, "
        "or an mmap not released)"
    )


# ---- helpers ---------------------------------------------------------------------


def pss_bytes() -> int:
    """Proportional set size of this process, from /proc/self/smaps_rollup, in bytes."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Pss line in /proc/self/smaps_rollup")


def delta(before: dict[str, Any], after: dict[str, Any], *keys: str) -> dict[str, int]:
    """``after - before`` for the given statistics."""
    return {k: after[k] - before[k] for k in keys}


def page_pattern(seed: int) -> bytes:
    """One page of non-zero bytes determined by ``seed`` (distinct seeds give distinct pages)."""
    head = seed.to_bytes(8, "little")
    body = bytes(((seed * 31 + i * 7) % 251) + 1 for i in range(256))
    return (head + body * (PAGE // len(body) + 1))[:PAGE]


def fill(m: Any, pages: list[bytes], first: int = 0) -> None:
    """Write ``pages`` into ``m`` from page ``first`` on."""
    for i, data in enumerate(pages):
        off = (first + i) * PAGE
        m[off : off + PAGE] = data


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter with the tests directory importable; return stdout."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    prelude = f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


# ---- libc and foreign memory -------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mprotect.restype = ctypes.c_int
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def raw_mmap(
    length: int, prot: int = stdlib_mmap.PROT_READ | stdlib_mmap.PROT_WRITE, fixed: int | None = None
) -> int:
    """Anonymous private memory from libc (not owned by ksm); returns its address.

    With ``fixed``, map at that address, replacing what is there (MAP_FIXED).
    """
    flags = stdlib_mmap.MAP_PRIVATE | stdlib_mmap.MAP_ANONYMOUS | (0x10 if fixed is not None else 0)
    addr = libc.mmap(fixed, length, prot, flags, -1, 0)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(addr)


def raw_munmap(addr: int, length: int) -> None:
    if libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def raw_mprotect(addr: int, length: int, prot: int) -> None:
    if libc.mprotect(addr, length, prot) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def buffer_address(obj: Any) -> int:
    """Address of byte 0 of a writable buffer (the ctypes view is released before returning)."""
    view = ctypes.c_char.from_buffer(obj)
    try:
        return ctypes.addressof(view)
    finally:
        del view


# ---- fork ----------------------------------------------------------------------------


class Child:
    """A forked child running ``fn(conn)``; talk to it with ``send``/``recv``.

    The child sends ``("ok", result)`` or ``("error", traceback)`` and leaves with
    ``os._exit``, so nothing of pytest runs in it.
    """

    def __init__(self, fn: Callable[[Connection], Any]) -> None:
        parent, child = Pipe()
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process with threads (ksm has some;
            # it quiesces them with pthread_atfork, which is what this suite tests).
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                parent.close()
                try:
                    child.send(("ok", fn(child)))
                    code = 0
                except BaseException:
                    child.send(("error", traceback.format_exc()))
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self.conn = parent
        self.result: Any = None

    def send(self, obj: Any) -> None:
        self.conn.send(obj)

    def recv(self, timeout: float = 30) -> Any:
        if not self.conn.poll(timeout):
            self.kill()
            raise AssertionError(f"child {self.pid} did not answer within {timeout} s (deadlock?)")
        try:
            msg = self.conn.recv()
        except EOFError:
            self.join()
            raise AssertionError(f"child {self.pid} died without answering") from None
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "error":
            self.join()
            raise AssertionError(f"child failed:\n{msg[1]}")
        return msg

    def finish(self, timeout: float = 30) -> Any:
        """Wait for the child's final ``("ok", result)`` and its exit; return the result."""
        msg = self.recv(timeout)
        assert msg[0] == "ok", msg
        status = self.join()
        assert status == 0, f"child exit status {status}"
        return msg[1]

    def join(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.conn.close()
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.join()
