"""Extent merging on real memory: a copied run is one mapping per copy,
and a page that differs inside it is covered, keeping its own bytes as a private copy
inside the run's mapping, instead of splitting it.

The VMA counts come from /proc/self/maps; contents are checked byte for byte after
merging, writing, discarding (MADV_DONTNEED), forking and unmerging.
"""

from __future__ import annotations

import ctypes
import os

import pytest
from conftest import PAGE, libc, page_pattern, raw_mmap, raw_munmap

import ksm

MERGE, UNMERGE, MADV_DONTNEED = ksm.MADV_MERGEABLE, ksm.MADV_UNMERGEABLE, 4
N = 64  # pages per copy


def mappings(start: int, length: int) -> list[tuple[int, int, bool]]:
    """The VMAs of [start, start+length): (start, end, maps the frame pool)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            s, e = (int(x, 16) for x in fields[0].split("-"))
            if s < start + length and e > start:
                out.append((max(s, start), min(e, start + length), "ksm-frames" in line))
    return out


def copies(changed: dict[tuple[int, int], bytes], n_copies: int) -> list[list[bytes]]:
    """`n_copies` copies of N distinct pages, with the pages `changed` names replaced."""
    return [[changed.get((c, i), page_pattern(500 + i)) for i in range(N)] for c in range(n_copies)]


class Memory:
    """Copies of a run in one range: owned (ksm.mmap) or not (libc mmap), one spare page
    of its own between copies so that no two copies touch."""

    def __init__(self, owned: bool, n_copies: int) -> None:
        self.stride = (N + 1) * PAGE
        self.length = n_copies * self.stride
        self.m = ksm.mmap(self.length) if owned else None
        self.base = self.m.address if self.m is not None else raw_mmap(self.length)

    def addr(self, copy: int, page: int) -> int:
        return self.base + copy * self.stride + page * PAGE

    def write(self, pages: list[list[bytes]]) -> None:
        for c, run in enumerate(pages):
            ctypes.memmove(self.addr(c, 0), b"".join(run), N * PAGE)
            ctypes.memmove(self.addr(c, N), page_pattern(900 + c), PAGE)

    def merge(self, pages: list[list[bytes]], scans: int) -> None:
        """Write the copies, advise the range and run `scans` full scans."""
        self.write(pages)
        ksm.madvise(self.base, self.length, MERGE)
        ksm.scan(scans)

    def check(self, pages: list[list[bytes]]) -> None:
        for c, run in enumerate(pages):
            for i, want in enumerate(run):
                assert ctypes.string_at(self.addr(c, i), PAGE) == want, f"copy {c} page {i}"

    def unmerge(self, pages: list[list[bytes]]) -> None:
        """Unadvise the range: every byte kept, and no page left in a pool mapping."""
        ksm.madvise(self.base, self.length, UNMERGE)
        self.check(pages)
        assert not any(pool for _, _, pool in mappings(self.base, self.length))

    def copy_mappings(self, copy: int) -> list[tuple[int, int, bool]]:
        return mappings(self.addr(copy, 0), N * PAGE)

    def close(self) -> None:
        ksm.madvise(self.base, self.length, UNMERGE)
        if self.m is not None:
            self.m.close()
        else:
            raw_munmap(self.base, self.length)


@pytest.fixture(params=[True, False], ids=["owned", "foreign"])
def owned(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_a_copied_run_with_changed_pages_is_one_mapping_per_copy(owned: bool) -> None:
    # Copy 1 differs from copy 0 at page 20 and at pages 40-41: the run covers them.
    changed = {(1, 20): page_pattern(1), (1, 40): page_pattern(2), (1, 41): page_pattern(3)}
    pages = copies(changed, 2)
    mem = Memory(owned, 2)
    try:
        mem.merge(pages, 2)
        s = ksm.stats()
        assert (s["pages_shared"], s["pages_sharing"]) == (N - 3, N - 3)
        # The frame offsets under the covered pages hold no frame, and no memory.
        assert (s["frames"], s["pool_bytes"]) == (N - 3, (N - 3) * PAGE)
        for c in range(2):
            maps = mem.copy_mappings(c)
            assert len(maps) == 1 and maps[0][2], f"copy {c}: {maps}"
        mem.check(pages)
        if mem.m is not None:
            states = {mem.m.page_state((N + 1) * PAGE + i * PAGE) for i in (20, 40, 41)}
            assert "merged" not in states, states
            assert mem.m.page_state((N + 1) * PAGE + 19 * PAGE) == "merged"
        # Writes into a covered page and into a merged page: only those bytes change.
        ctypes.memmove(mem.addr(1, 20) + 7, b"covered", 7)
        ctypes.memmove(mem.addr(1, 21) + 7, b"merged!", 7)
        pages[1][20] = pages[1][20][:7] + b"covered" + pages[1][20][14:]
        pages[1][21] = pages[1][21][:7] + b"merged!" + pages[1][21][14:]
        mem.check(pages)
        ksm.scan(2)
        mem.check(pages)
        mem.unmerge(pages)
    finally:
        mem.close()


def test_dontneed_on_a_covered_page_reads_zeros_where_its_offset_holds_a_frame(owned: bool) -> None:
    # Copy 0 differs at page 5; copies 1 and 2 agree there and merge in place, on the
    # very frame offset copy 0's covered page sits over. Discarding copy 0's page must
    # read zeros (anonymous semantics), never the frame's bytes.
    pages = copies({(0, 5): page_pattern(7)}, 3)
    mem = Memory(owned, 3)
    try:
        mem.merge(pages, 4)
        s = ksm.stats()
        assert (s["pages_shared"], s["pages_sharing"]) == (N, 2 * (N - 1) + 1)
        for c in range(3):
            assert len(mem.copy_mappings(c)) == 1, f"copy {c}: {mem.copy_mappings(c)}"
        mem.check(pages)
        # Read at once (the fault thread answers), and read only after ksm followed the
        # discard (a scan does): zeros both times.
        assert libc.madvise(mem.addr(0, 5), PAGE, MADV_DONTNEED) == 0
        assert ctypes.string_at(mem.addr(0, 5), PAGE) == bytes(PAGE)
        assert libc.madvise(mem.addr(0, 5), PAGE, MADV_DONTNEED) == 0
        ksm.scan(1)
        assert ctypes.string_at(mem.addr(0, 5), PAGE) == bytes(PAGE)
        pages[0][5] = bytes(PAGE)
        ksm.scan(2)
        mem.check(pages)
        ctypes.memmove(mem.addr(0, 5), b"after", 5)
        pages[0][5] = b"after" + bytes(PAGE - 5)
        ksm.scan(1)
        mem.check(pages)
    finally:
        mem.close()


def test_writes_to_merged_pages_change_no_mapping(owned: bool) -> None:
    # Every other page of copy 0 written after merging: each keeps its private copy
    # where the write put it, inside the run's mapping (covered), so a write adds no
    # mapping (two per page would soon reach the application's vm.max_map_count).
    pages = copies({}, 2)
    mem = Memory(owned, 2)
    try:
        mem.merge(pages, 3)
        before = [mem.copy_mappings(c) for c in range(2)]
        assert all(len(m) == 1 for m in before), before
        for i in range(0, N, 2):
            ctypes.memmove(mem.addr(0, i) + 1, b"w", 1)
            pages[0][i] = pages[0][i][:1] + b"w" + pages[0][i][2:]
        ksm.scan(2)
        assert [mem.copy_mappings(c) for c in range(2)] == before
        s = ksm.stats()
        assert (s["pages_shared"], s["pages_sharing"]) == (N, N // 2)
        mem.check(pages)
        # Its frame still holds the original bytes (copy 1 maps it): a discard reads
        # zeros, never those bytes.
        assert libc.madvise(mem.addr(0, 4), PAGE, MADV_DONTNEED) == 0
        assert ctypes.string_at(mem.addr(0, 4), PAGE) == bytes(PAGE)
        pages[0][4] = bytes(PAGE)
        ksm.scan(2)
        mem.check(pages)
        mem.unmerge(pages)
    finally:
        mem.close()


def test_a_forked_child_reads_covered_pages_and_can_unmerge_them() -> None:
    pages = copies({(1, 10): page_pattern(9)}, 2)
    mem = Memory(True, 2)
    try:
        mem.merge(pages, 2)
        assert len(mem.copy_mappings(1)) == 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            status = 1
            try:
                mem.check(pages)
                ksm.madvise(mem.base, mem.length, UNMERGE)
                mem.check(pages)
                status = 0 if not any(p for _, _, p in mappings(mem.base, mem.length)) else 2
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        mem.check(pages)
    finally:
        mem.close()


# ---- discarded covered pages (each once read another page's bytes) ---------------------


def test_a_discarded_covered_page_over_a_free_frame_keeps_reading_zeros(owned: bool) -> None:
    # Copies 0 and 1 differ at page 5 (a pair run covers it on both sides over a free
    # frame offset); copy 2 differs too. Copy 0's page is discarded and read, then
    # copies 1 and 2 are made equal there and merge in place on that very offset:
    # copy 0's page must go on reading zeros, not their bytes.
    ksm.ksmd.smart_scan = 0
    pages = copies({(0, 5): page_pattern(7), (1, 5): page_pattern(8), (2, 5): page_pattern(9)}, 3)
    mem = Memory(owned, 3)
    try:
        mem.merge(pages, 3)
        for c in range(3):
            assert len(mem.copy_mappings(c)) == 1, f"copy {c}: {mem.copy_mappings(c)}"
        assert libc.madvise(mem.addr(0, 5), PAGE, MADV_DONTNEED) == 0
        ksm.scan(1)
        frames = ksm.stats()["frames"]
        assert ctypes.string_at(mem.addr(0, 5), PAGE) == bytes(PAGE)
        assert ksm.stats()["pool_bytes"] <= frames * PAGE, "a read put a page into the pool"
        pages[0][5] = bytes(PAGE)
        ctypes.memmove(mem.addr(2, 5), page_pattern(8), PAGE)
        pages[2][5] = page_pattern(8)
        ksm.scan(4)
        assert len(mem.copy_mappings(2)) == 1, "merged in place"
        mem.check(pages)
    finally:
        mem.close()


def test_a_discarded_covered_page_moved_by_mremap_reads_zeros() -> None:
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    ksm.ksmd.smart_scan = 0
    pages = copies({(0, 5): page_pattern(7)}, 3)
    mem = Memory(False, 3)
    dst = raw_mmap(N * PAGE)
    try:
        mem.merge(pages, 4)
        assert len(mem.copy_mappings(0)) == 1
        assert libc.madvise(mem.addr(0, 5), PAGE, MADV_DONTNEED) == 0
        ksm.scan(1)
        mremap_fixed = 3  # MREMAP_MAYMOVE | MREMAP_FIXED
        assert libc.mremap(mem.addr(0, 0), N * PAGE, N * PAGE, mremap_fixed, dst) == dst
        ksm.scan(1)
        assert ctypes.string_at(dst + 5 * PAGE, PAGE) == bytes(PAGE)
        assert ctypes.string_at(dst + 6 * PAGE, PAGE) == pages[0][6]
    finally:
        ksm.madvise(dst, N * PAGE, UNMERGE)
        raw_munmap(dst, N * PAGE)
        rest = mem.addr(0, N)  # copy 0's pages were moved away
        ksm.madvise(rest, mem.base + mem.length - rest, UNMERGE)
        raw_munmap(mem.base, mem.length)


def test_a_forked_child_reads_zeros_for_a_covered_page_discarded_before_the_fork() -> None:
    ksm.ksmd.smart_scan = 0
    pages = copies({(0, 5): page_pattern(7)}, 3)
    mem = Memory(True, 3)
    try:
        mem.merge(pages, 4)
        assert len(mem.copy_mappings(0)) == 1
        assert libc.madvise(mem.addr(0, 5), PAGE, MADV_DONTNEED) == 0
        ksm.scan(1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            got = ctypes.string_at(mem.addr(0, 5), PAGE)
            os._exit(0 if got == bytes(PAGE) else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ctypes.string_at(mem.addr(0, 5), PAGE) == bytes(PAGE)
    finally:
        mem.close()
