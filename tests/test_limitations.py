"""Reproducers for the documented limitations (docs/limitations.md).

Each test states the kernel's behaviour and is marked ``xfail`` while ksm does
not match it: ``strict=True`` where the demonstration is deterministic (a fix
shows up as an XPASS to turn into a plain test), ``strict=False`` where it is a
race (pinned pages under O_DIRECT, the EFAULT of user-mode-only userfaultfd,
unmap + map of foreign memory during its merge), which a short run may miss.
Next to them, plain tests for what must hold even so: user-mode-only never
loses data silently, full mode never fails. ``KSM_LIMIT_SECONDS`` sets how long
each stress runs (default 2).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PAGE, page_pattern, raw_mmap, raw_munmap, run_python

import ksm


def test_new_memory_at_an_unmapped_advised_address_is_not_advised() -> None:
    # The kernel keeps VM_MERGEABLE on the VMA: memory mapped where advised memory was
    # unmapped is a new VMA, not mergeable until advised. ksm follows /proc/self/maps
    # once per full scan and sees the same address, protection and kind.
    base = raw_mmap(4 * PAGE)
    try:
        ctypes.memmove(base, page_pattern(3) * 4, 4 * PAGE)
        ksm.madvise(base, 4 * PAGE, ksm.MADV_MERGEABLE)
        ksm.scan(2)
        assert ksm.stats()["pages_sharing"] == 3
        raw_munmap(base, 4 * PAGE)
        assert raw_mmap(4 * PAGE, fixed=base) == base  # new memory, never advised
        ctypes.memmove(base, page_pattern(7) * 4, 4 * PAGE)
        ksm.scan(3)
        assert ctypes.string_at(base, 4 * PAGE) == page_pattern(7) * 4  # no byte is lost either way
        s = ksm.stats()
        assert (s["pages_shared"], s["pages_sharing"], s["advised_pages"]) == (0, 0, 0)
    finally:
        ksm.madvise(base, 4 * PAGE, ksm.MADV_UNMERGEABLE)
        raw_munmap(base, 4 * PAGE)


# ---- pinned pages: O_DIRECT into memory being merged ---------------------------------

STRESS_SECONDS = float(os.environ.get("KSM_LIMIT_SECONDS", "2"))


def _odirect_file(tmp_path: Path, pages: list[bytes]) -> int:
    path = tmp_path / "direct.bin"
    path.write_bytes(b"".join(pages))
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:  # pragma: no cover - a filesystem without O_DIRECT (tmpfs < 6.6)
        pytest.skip(f"O_DIRECT not supported on {tmp_path}: {e}")


@pytest.mark.xfail(
    strict=False,
    reason='limitation (docs/limitations.md, "O_DIRECT and DMA"): a page pinned for O_DIRECT/DMA '
    "can be merged while "
    "the I/O is in flight, and the data then lands in the page that was replaced. The kernel "
    "refuses to merge pinned pages; userspace cannot see pins. Racy: it may pass.",
)
def test_o_direct_read_into_memory_being_merged_loses_nothing(tmp_path: Path) -> None:
    # Pages hold A and are merged; O_DIRECT reads B into them one at a time while
    # another thread scans without pause; each page is given A back (by a plain write)
    # so that it merges again. A read that returned but left A in the page lost its data.
    n = 16
    a, b = page_pattern(60), page_pattern(61)
    fd = _odirect_file(tmp_path, [b] * n)
    stop = threading.Event()

    def scan() -> None:
        while not stop.is_set():
            ksm.scan(1)

    reads = lost = 0
    with ksm.mmap(n * PAGE) as m:
        m[:] = a * n
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        assert ksm.stats()["pages_sharing"] >= n - 1
        scanner = threading.Thread(target=scan)
        scanner.start()
        try:
            view = memoryview(m)
            deadline = time.monotonic() + STRESS_SECONDS
            while time.monotonic() < deadline:
                i = reads % n
                assert os.preadv(fd, [view[i * PAGE : (i + 1) * PAGE]], i * PAGE) == PAGE
                reads += 1
                if m[i * PAGE : (i + 1) * PAGE] != b:
                    lost += 1
                m[i * PAGE : (i + 1) * PAGE] = a
            view.release()
        finally:
            stop.set()
            scanner.join()
            os.close(fd)
        assert m[:] == a * n  # the rest of the memory is intact either way
    print(f"O_DIRECT reads into merged memory under scanning: {lost} of {reads} lost")
    assert lost == 0, f"{lost} of {reads} O_DIRECT reads were lost (pinned page merged mid-I/O)"


# ---- user-mode-only userfaultfd ----------------------------------------------------------

# The reproducer runs in a fresh interpreter that drops root before ksm opens its
# userfaultfd (the mode is chosen once, at first use): as user nobody, without access
# to /dev/userfaultfd and with vm.unprivileged_userfaultfd = 0, the kernel only gives
# a user-mode-only context. Everything the run needs is imported or opened before.
USER_MODE_ONLY = """
import ctypes, errno, os, sys, threading, time
import ksm
from ksm import cli
from conftest import PAGE, page_pattern

SECONDS = {seconds}
import encodings.ascii, encodings.latin_1, encodings.utf_8  # codecs load lazily: not as nobody
fd = os.open({path!r}, os.O_RDONLY)
libc = ctypes.CDLL(None, use_errno=True)
if {drop}:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    assert libc.prctl(4, 1, 0, 0, 0) == 0  # PR_SET_DUMPABLE: /proc/self/* stay ours
mode = cli._uffd_mode(ksm._ksm._uffd_info()[0])  # what `ksm info` shows (info_dict reads files nobody cannot)
n = 16
a, b = page_pattern(60), page_pattern(61)
m = ksm.mmap(n * PAGE)
m[:] = a * n
m.madvise(ksm.MADV_MERGEABLE)
ksm.scan(2)
merged = sum(m.page_state(i * PAGE) == "merged" for i in range(n))
stop = threading.Event()
def scan():
    while not stop.is_set():
        ksm.scan(1)
t = threading.Thread(target=scan)
t.start()
view = memoryview(m)
reads = efaults = short = silent = 0
deadline = time.monotonic() + SECONDS
while time.monotonic() < deadline:
    i = reads % n
    reads += 1
    try:
        got = os.preadv(fd, [view[i * PAGE : (i + 1) * PAGE]], i * PAGE)
    except OSError as e:
        assert e.errno == errno.EFAULT, e
        efaults += 1
    else:
        # A short count is a visible failure too (the copy faulted part way); the bytes
        # it reports as read must be there. A full count must have all of them.
        short += got < PAGE
        if m[i * PAGE : i * PAGE + got] != b[:got]:
            silent += 1
    m[i * PAGE : (i + 1) * PAGE] = a
stop.set()
t.join()
view.release()
intact = m[:] == a * n
m.close()
print(mode, merged, reads, efaults, short, silent, intact)
"""


@pytest.fixture(scope="module")
def user_mode_only_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to user nobody (this user's own mode is shown by `ksm info`)")
    path = tmp_path_factory.mktemp("umo") / "data.bin"
    path.write_bytes(page_pattern(61) * 16)
    path.chmod(0o644)
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    saved = sysctl.read_text().strip()
    if saved != "0":  # pragma: no cover - machines that allow unprivileged full mode
        sysctl.write_text("0")
    try:
        out = run_python(
            USER_MODE_ONLY.format(seconds=STRESS_SECONDS, path=str(path), drop=True),
            env={"KSM_PUBLISH": "0"},
        )
    finally:
        if sysctl.read_text().strip() != saved:
            sysctl.write_text(saved)
    mode, merged, reads, efaults, short, silent, intact = out.split()
    return {
        "mode": mode,
        "merged": int(merged),
        "reads": int(reads),
        "efaults": int(efaults),
        "short": int(short),
        "silent": int(silent),
        "intact": intact == "True",
    }


def test_user_mode_only_is_reported_and_merges(user_mode_only_run: dict[str, Any]) -> None:
    # `ksm info` names the mode, and merging works in it.
    r = user_mode_only_run
    assert r["mode"] == "user-mode-only"
    assert r["merged"] == 16
    assert r["intact"]


def test_user_mode_only_read_into_a_page_under_merge_never_loses_data_silently(
    user_mode_only_run: dict[str, Any],
) -> None:
    # The worst case of user-mode-only is an error the caller sees (EFAULT), not lost data.
    r = user_mode_only_run
    print(f"user-mode-only: {r['efaults']} of {r['reads']} reads failed with EFAULT, {r['short']} were short")
    assert r["reads"] > 100
    assert r["silent"] == 0, r


@pytest.mark.xfail(
    strict=False,
    reason='limitation (docs/limitations.md, "User-mode-only userfaultfd"): with a user-mode-only '
    "userfaultfd, a read(2) into a "
    "page inside the merge window fails with EFAULT instead of waiting. Racy: it may pass.",
)
def test_user_mode_only_read_into_a_page_under_merge_never_fails(user_mode_only_run: dict[str, Any]) -> None:
    r = user_mode_only_run
    assert r["efaults"] + r["short"] == 0, (
        f"{r['efaults']} EFAULT and {r['short']} short of {r['reads']} reads"
    )


def test_full_mode_read_into_a_page_under_merge_waits(tmp_path: Path) -> None:
    # The mitigation: in full mode (this process, as root) the kernel's fault waits for
    # the merge to finish; the same reads never fail and never lose data.
    if "user-mode only" in (ksm._ksm._uffd_info() or ("", 0))[0]:
        pytest.skip("this process has a user-mode-only userfaultfd")
    path = tmp_path / "data.bin"
    path.write_bytes(page_pattern(61) * 16)
    out = run_python(USER_MODE_ONLY.format(seconds=STRESS_SECONDS, path=str(path), drop=False))
    mode, merged, reads, efaults, short, silent, intact = out.split()
    assert mode == "full"
    assert int(merged) == 16
    assert int(reads) > 100
    assert (int(efaults), int(short), int(silent), intact) == (0, 0, 0, "True")


# ---- memory ksm does not own: munmap + mmap at the same address while merging ----------


@pytest.mark.xfail(
    strict=False,
    reason='limitation (docs/limitations.md, "The exact-range munmap race"): an application that '
    "unmaps advised foreign memory "
    "and maps and writes new memory at the same address in the microseconds while ksm remaps that "
    "very page can have the new page replaced (the kernel checks the page table under its lock; "
    "userspace cannot). Racy: it may pass.",
)
def test_foreign_munmap_and_mmap_while_merging_never_clobbers_new_memory() -> None:
    # Advised foreign pages hold A (like their merged twins in ksm memory), so every scan
    # tries to merge them; a thread keeps unmapping one, mapping new memory at the same
    # address and writing B there at once. The new memory is not advised: it must keep B.
    n = 8
    a, b = page_pattern(70), page_pattern(71)
    stop = threading.Event()
    scans = 0

    def scan() -> None:
        nonlocal scans
        while not stop.is_set():
            ksm.scan(1)
            scans += 1

    cycles = clobbered = 0
    with ksm.mmap(4 * PAGE) as twins:
        twins[:] = a * 4
        twins.madvise(ksm.MADV_MERGEABLE)
        base = raw_mmap(n * PAGE)
        try:
            ctypes.memmove(base, a * n, n * PAGE)
            ksm.madvise(base, n * PAGE, ksm.MADV_MERGEABLE)
            ksm.scan(2)
            scanner = threading.Thread(target=scan)
            scanner.start()
            try:
                deadline = time.monotonic() + STRESS_SECONDS
                while time.monotonic() < deadline:
                    page = base + cycles % n * PAGE
                    raw_munmap(page, PAGE)
                    assert raw_mmap(PAGE, fixed=page) == page
                    ctypes.memmove(page, b, PAGE)
                    start = scans
                    while scans < start + 2 and scanner.is_alive():
                        time.sleep(0)
                    if ctypes.string_at(page, PAGE) != b:
                        clobbered += 1
                    # Make it mergeable A again for the next round.
                    ctypes.memmove(page, a, PAGE)
                    ksm.madvise(page, PAGE, ksm.MADV_MERGEABLE)
                    cycles += 1
            finally:
                stop.set()
                scanner.join()
            assert twins[:] == a * 4
        finally:
            ksm.madvise(base, n * PAGE, ksm.MADV_UNMERGEABLE)
            raw_munmap(base, n * PAGE)
    print(f"munmap+mmap+write of advised foreign pages under scanning: {clobbered} of {cycles} clobbered")
    assert cycles > 20
    assert clobbered == 0, f"{clobbered} of {cycles} new pages were replaced by a merge"


# ---- merged pages are mappings of ksm's pool ------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MREMAP_MAYMOVE_FIXED = 3
MADV_FREE, MADV_WIPEONFORK = 8, 18


def _lone_merged_pages() -> int:
    """Three pages of foreign memory, the first and last merged with each other (so the
    range is three VMAs: two pool mappings with an anonymous page between)."""
    base = raw_mmap(3 * PAGE)
    ctypes.memmove(base, page_pattern(80) + page_pattern(81) + page_pattern(80), 3 * PAGE)
    ksm.madvise(base, 3 * PAGE, ksm.MADV_MERGEABLE)
    ksm.scan(2)
    assert ksm.stats()["pages_sharing"] == 1
    return base


@pytest.mark.xfail(
    strict=True,
    reason='limitation (docs/limitations.md, "mremap across merged pages"): the kernel moves any '
    "range of one VMA; a merged page splits the range into several VMAs, so mremap fails with EFAULT",
)
def test_mremap_across_merged_pages_moves_them() -> None:
    base = _lone_merged_pages()
    dst = raw_mmap(3 * PAGE)
    expected = ctypes.string_at(base, 3 * PAGE)
    try:
        moved = _libc.mremap(base, 3 * PAGE, 3 * PAGE, MREMAP_MAYMOVE_FIXED, dst)
        err = ctypes.get_errno()
        assert moved == dst, f"mremap failed: {os.strerror(err)}"
        assert ctypes.string_at(dst, 3 * PAGE) == expected
    finally:
        ksm.madvise(base, 3 * PAGE, ksm.MADV_UNMERGEABLE)
        raw_munmap(base, 3 * PAGE)
        ksm.madvise(dst, 3 * PAGE, ksm.MADV_UNMERGEABLE)
        raw_munmap(dst, 3 * PAGE)


@pytest.mark.xfail(
    strict=True,
    reason='limitation (docs/limitations.md, "MADV_FREE and MADV_WIPEONFORK"): the kernel takes '
    "them on anonymous memory; a merged page is a private file mapping of the pool, so EINVAL",
)
@pytest.mark.parametrize("advice", [MADV_FREE, MADV_WIPEONFORK], ids=["FREE", "WIPEONFORK"])
def test_madv_free_and_wipeonfork_on_merged_pages_succeed(advice: int) -> None:
    base = _lone_merged_pages()
    try:
        ret = _libc.madvise(base, PAGE, advice)
        err = ctypes.get_errno()
        assert ret == 0, f"madvise({advice}) on a merged page: {os.strerror(err)}"
    finally:
        ksm.madvise(base, 3 * PAGE, ksm.MADV_UNMERGEABLE)
        raw_munmap(base, 3 * PAGE)


def _vm_flags(address: int) -> list[str]:
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no VMA at {address:#x}")


def test_ksm_memory_is_never_backed_by_huge_pages() -> None:
    # Transparent huge pages: write-protecting or remapping 4 KiB inside a huge page
    # splits it for good, so ksm's own memory asks for none (VmFlags "nh").
    with ksm.mmap(4 << 20) as m:
        assert "nh" in _vm_flags(m.address)
        assert "hg" not in _vm_flags(m.address)
