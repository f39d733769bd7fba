"""fork(): parent and child keep private contents; the child starts a fresh engine.

The hazard (docs/design.md, "Fork rule"): after fork a child may map a frame lazily (no PTE
yet). If the parent then drops its last reference to that frame and the frame
were freed, the child would read zeros. Frames must be held back while a child
may map them.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from conftest import PAGE, Child, delta, fill, page_pattern

import ksm

A, B, C = page_pattern(100), page_pattern(101), page_pattern(102)
UNIQUE = [page_pattern(200 + i) for i in range(4)]
# pages 0-3: A (merged, child does not touch them before the parent rewrites them)
# pages 4-7: B (merged, child reads them first)
# pages 8-11: unique (unmerged)
LAYOUT = [A] * 4 + [B] * 4 + UNIQUE
NPAGES = len(LAYOUT)


def page(view: memoryview, i: int) -> bytes:
    return bytes(view[i * PAGE : (i + 1) * PAGE])


def maps_file_page(address: int) -> bool:
    """Whether the page at ``address`` maps a file page (a frame), from pagemap bit 61."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        entry = int.from_bytes(f.read(8), "little")
    present, file = entry >> 63 & 1, entry >> 61 & 1
    assert present, "read the page first"
    return bool(file)


def merged_mapping() -> ksm.mmap:
    m = ksm.mmap(NPAGES * PAGE)
    fill(m, LAYOUT)
    m.madvise(ksm.MADV_MERGEABLE)
    ksm.scan(2)
    states = [m.page_state(i * PAGE) for i in range(NPAGES)]
    assert states == ["merged"] * 8 + ["unshared"] * 4
    return m


def test_contents_stay_private_across_fork() -> None:
    m = merged_mapping()
    address = m.address

    def child(conn: Connection) -> dict[str, object]:
        report: dict[str, object] = {}
        view = memoryview(m)
        assert m.address == address
        # Touch pages 4-11 now (maps B's frame and the unique pages), not 0-3.
        report["early_ok"] = [page(view, i) == LAYOUT[i] for i in range(4, NPAGES)]
        conn.send("read")
        assert conn.recv() == "parent rewrote"
        report["late_ok"] = [page(view, i) == LAYOUT[i] for i in range(NPAGES)]
        # The child's writes are its own.
        view[0:3] = b"kid"
        view[5 * PAGE : 5 * PAGE + 3] = b"kid"
        view[9 * PAGE : 9 * PAGE + 3] = b"kid"
        report["own_writes"] = [
            page(view, 0) == b"kid" + A[3:],
            page(view, 1) == A,
            page(view, 5) == b"kid" + B[3:],
            page(view, 4) == B,
            page(view, 9) == b"kid" + UNIQUE[1][3:],
        ]
        conn.send("wrote")
        assert conn.recv() == "done"
        view.release()
        return report

    try:
        kid = Child(child)
        assert kid.recv() == "read"
        # Rewrite every merged page: the frames of A and B lose all their references.
        before = ksm.stats()
        fill(m, [C] * 8)
        ksm.scan(2)
        after = ksm.stats()
        assert after["cows"] - before["cows"] == 8
        assert [m.page_state(i * PAGE) for i in range(8)] == ["merged"] * 8
        # A's and B's frames may still be mapped by the child: they are held back.
        assert after["deferred_frames"] >= 2
        kid.send("parent rewrote")
        assert kid.recv() == "wrote"
        with memoryview(m) as view:
            assert [page(view, i) for i in range(NPAGES)] == [C] * 8 + UNIQUE
        kid.send("done")
        report = kid.finish()
        assert report["early_ok"] == [True] * 8
        assert report["late_ok"] == [True] * NPAGES, "the child lost contents after the parent's writes"
        assert report["own_writes"] == [True] * 5
        with memoryview(m) as view:
            assert [page(view, i) for i in range(NPAGES)] == [C] * 8 + UNIQUE
        # The child is gone: no other process maps the pool, the held frames are freed
        # (checked at least every 8 full scans).
        ksm.scan(8)
        assert ksm.stats()["deferred_frames"] == 0
    finally:
        m.close()


def test_parent_writes_after_fork_are_invisible_to_child_and_vice_versa() -> None:
    m = merged_mapping()

    def child(conn: Connection) -> list[bool]:
        with memoryview(m) as view:
            view[0:PAGE] = C  # child writes a merged page before the parent does anything
            conn.send("wrote")
            assert conn.recv() == "go"
            return [page(view, 0) == C] + [page(view, i) == LAYOUT[i] for i in range(1, NPAGES)]

    try:
        kid = Child(child)
        assert kid.recv() == "wrote"
        with memoryview(m) as view:
            assert [page(view, i) for i in range(NPAGES)] == LAYOUT
            view[PAGE : 2 * PAGE] = UNIQUE[0]
            view[8 * PAGE : 9 * PAGE] = B
        ksm.scan(2)
        kid.send("go")
        assert kid.finish() == [True] * NPAGES
        expected = [A, UNIQUE[0], A, A, B, B, B, B, B, *UNIQUE[1:]]
        with memoryview(m) as view:
            assert [page(view, i) for i in range(NPAGES)] == expected
        assert m.page_state(8 * PAGE) == "merged"  # the new B joined B's frame
    finally:
        m.close()


def test_child_starts_from_zero_and_merges_its_own_memory() -> None:
    m = merged_mapping()
    parent_before = ksm.stats()

    def child(conn: Connection) -> dict[str, object]:
        s = ksm.stats()
        report: dict[str, object] = {
            "start": {
                k: s[k]
                for k in ("rmap_items", "pages_shared", "pages_sharing", "pages_unshared", "frames", "merges")
            }
        }
        # New memory of its own.
        with ksm.mmap(8 * PAGE) as own:
            own[:] = C * 8
            own.madvise(ksm.MADV_MERGEABLE)
            ksm.scan(2)
            s = ksm.stats()
            report["own"] = (s["pages_shared"], s["pages_sharing"])
            report["own_states"] = sorted({own.page_state(i * PAGE) for i in range(8)})
            own[PAGE : PAGE + 1] = b"x"
            report["own_cow"] = own[PAGE : 2 * PAGE] == b"x" + C[1:] and own[0:PAGE] == C
        # The inherited mapping: the unique pages made identical, advised again.
        fill(m, [A] * 4, first=8)
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.scan(2)
        report["inherited_states"] = [m.page_state(i * PAGE) for i in range(8, NPAGES)]
        with memoryview(m) as view:
            report["inherited_ok"] = [page(view, i) for i in range(NPAGES)] == [A] * 4 + [B] * 4 + [A] * 4
        m.madvise(ksm.MADV_UNMERGEABLE)
        with memoryview(m) as view:
            report["unmerged_ok"] = [page(view, i) for i in range(NPAGES)] == [A] * 4 + [B] * 4 + [A] * 4
        # Every page, the inherited merged ones (0-7) included, is a private anonymous
        # page now: present and not file-backed in pagemap.
        report["maps_a_frame"] = [maps_file_page(m.address + i * PAGE) for i in range(NPAGES)]
        return report

    try:
        report = Child(child).finish()
        assert report["start"] == dict.fromkeys(
            ("rmap_items", "pages_shared", "pages_sharing", "pages_unshared", "frames", "merges"), 0
        )
        assert report["own"] == (1, 7)
        assert report["own_states"] == ["merged"]
        assert report["own_cow"]
        assert report["inherited_states"] == ["merged"] * 4
        assert report["inherited_ok"]
        assert report["unmerged_ok"]
        assert report["maps_a_frame"] == [False] * NPAGES
        # Nothing the child did shows in the parent.
        after = ksm.stats()
        assert delta(
            parent_before, after, "pages_shared", "pages_sharing", "merges", "rmap_items"
        ) == dict.fromkeys(("pages_shared", "pages_sharing", "merges", "rmap_items"), 0)
        with memoryview(m) as view:
            assert [page(view, i) for i in range(NPAGES)] == LAYOUT
    finally:
        m.close()


def test_fork_while_ksmd_runs() -> None:
    # Fork repeatedly while ksmd merges: pthread_atfork must quiesce the threads so that
    # no lock is left held in the child (which would hang it) and no page is left
    # write-protected.
    pages = [page_pattern(300 + i % 8) for i in range(256)]
    with ksm.mmap(len(pages) * PAGE) as m:
        fill(m, pages)
        m.madvise(ksm.MADV_MERGEABLE)
        ksm.ksmd.pages_to_scan = 16
        ksm.ksmd.sleep_millisecs = 0
        ksm.ksmd.run = 1
        for round_ in range(8):

            def child(conn: Connection) -> bool:
                ok = True
                with memoryview(m) as view:
                    for i, p in enumerate(pages):
                        ok &= page(view, i) == p
                    view[0:4] = b"kid!"  # writes must not block forever
                    ok &= page(view, 0) == b"kid!" + pages[0][4:]
                ksm.scan(2)
                ok &= ksm.stats()["full_scans"] >= 2
                return ok

            assert Child(child).finish(), f"round {round_}"
            m[PAGE * round_ : PAGE * round_ + 4] = b"par!"
            pages[round_] = b"par!" + pages[round_][4:]
        assert ksm.wait_settled(timeout=30)
        ksm.ksmd.run = 0
        with memoryview(m) as view:
            assert [page(view, i) for i in range(len(pages))] == pages
