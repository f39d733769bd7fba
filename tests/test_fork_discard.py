"""Forked children and discarded pages of pool mappings.

Anonymous memory reads zeros after MADV_DONTNEED. A forked child has no userfaultfd,
so what it reads after discarding a page that sits in a pool mapping is the frame at
that offset: the parent keeps those frames from holding bytes written after the fork,
and gives pages it discarded itself their zeros before it forks.
"""

from __future__ import annotations

import ctypes
import os

import pytest
from conftest import PAGE, libc, page_pattern
from test_extents import MADV_DONTNEED, Memory, copies

import ksm

CHILD_DISCARD = (
    'limitation (docs/limitations.md, "Fork and discarded pages"): a child has no userfaultfd, '
    "so MADV_DONTNEED in the child "
    "of a page still in a pool mapping reads the frame at its offset (its own old bytes, or for a covered "
    "page the bytes merged there before the fork), not zeros, until the child's ksm gives it anonymous memory"
)


def child_read_after_discard(addr: int) -> bytes:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            assert libc.madvise(addr, PAGE, MADV_DONTNEED) == 0
            os.write(w, ctypes.string_at(addr, PAGE))
        finally:
            os._exit(0)
    os.close(w)
    got = b""
    while len(got) < PAGE:
        b = os.read(r, PAGE)
        if not b:
            break
        got += b
    os.waitpid(pid, 0)
    os.close(r)
    return got


@pytest.mark.xfail(
    strict=True,
    reason=CHILD_DISCARD,
)
@pytest.mark.parametrize("owned", [True, False], ids=["owned", "foreign"])
def test_child_discards_covered_page_over_live_frame(owned: bool) -> None:
    # As test_dontneed_on_a_covered_page_reads_zeros_where_its_offset_holds_a_frame,
    # but the discard happens in a forked child.
    ksm.ksmd.smart_scan = 0
    pages = copies({(0, 5): page_pattern(7)}, 3)
    mem = Memory(owned, 3)
    try:
        mem.merge(pages, 4)
        assert len(mem.copy_mappings(0)) == 1
        got = child_read_after_discard(mem.addr(0, 5))
        assert got != pages[1][5], "child read ANOTHER page's bytes (copy 1/2 page 5)"
        assert got == bytes(PAGE)
    finally:
        mem.close()


@pytest.mark.xfail(
    strict=True,
    reason=CHILD_DISCARD,
)
@pytest.mark.parametrize("owned", [True, False], ids=["owned", "foreign"])
def test_child_discards_merged_page(owned: bool) -> None:
    ksm.ksmd.smart_scan = 0
    pages = copies({}, 2)
    mem = Memory(owned, 2)
    try:
        mem.merge(pages, 3)
        got = child_read_after_discard(mem.addr(0, 5))
        assert got == bytes(PAGE), "child's discarded merged page reads the frame's old bytes"
    finally:
        mem.close()


@pytest.mark.parametrize("owned", [True, False], ids=["owned", "foreign"])
def test_child_discards_covered_page_after_parent_reuses_offset(owned: bool) -> None:
    # All three copies differ at page 5: covered over a FREE frame offset g at fork.
    # After the fork the parent makes copies 1 and 2 equal there: they merge in place
    # on g (new bytes written into the pool at g). The child then discards copy 0 page 5.
    ksm.ksmd.smart_scan = 0
    pages = copies({(0, 5): page_pattern(7), (1, 5): page_pattern(8), (2, 5): page_pattern(9)}, 3)
    mem = Memory(owned, 3)
    try:
        mem.merge(pages, 3)
        for c in range(3):
            assert len(mem.copy_mappings(c)) == 1
        go_r, go_w = os.pipe()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.read(go_r, 1)
                assert libc.madvise(mem.addr(0, 5), PAGE, MADV_DONTNEED) == 0
                os.write(w, ctypes.string_at(mem.addr(0, 5), PAGE))
            finally:
                os._exit(0)
        ctypes.memmove(mem.addr(2, 5), page_pattern(8), PAGE)
        try:
            # The offset stays reserved while the child lives: copies 1 and 2 merge
            # elsewhere, and nothing new is written at g.
            ksm.scan(4)
        finally:
            os.write(go_w, b"x")
        os.close(w)
        got = b""
        while len(got) < PAGE:
            b = os.read(r, PAGE)
            if not b:
                break
            got += b
        os.waitpid(pid, 0)
        assert got != page_pattern(8), "child read the bytes the parent merged at the reused offset"
        assert got == bytes(PAGE)
    finally:
        mem.close()


@pytest.mark.parametrize("owned", [True, False], ids=["owned", "foreign"])
@pytest.mark.parametrize("covered", [False, True], ids=["merged", "covered"])
def test_parent_discards_then_forks_at_once(owned: bool, covered: bool) -> None:
    # The parent discards a merged (or covered) page and forks before ksm followed the
    # discard: the child must read zeros, as the parent does.
    ksm.ksmd.smart_scan = 0
    pages = copies({(0, 5): page_pattern(7)} if covered else {}, 3)
    mem = Memory(owned, 3)
    try:
        mem.merge(pages, 4)
        assert libc.madvise(mem.addr(0, 5), PAGE, MADV_DONTNEED) == 0
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, ctypes.string_at(mem.addr(0, 5), PAGE))
            finally:
                os._exit(0)
        os.close(w)
        got = b""
        while len(got) < PAGE:
            b = os.read(r, PAGE)
            if not b:
                break
            got += b
        os.waitpid(pid, 0)
        assert ctypes.string_at(mem.addr(0, 5), PAGE) == bytes(PAGE)
        assert got == bytes(PAGE), "child read the discarded page's old bytes"
    finally:
        mem.close()
