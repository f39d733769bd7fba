"""No code changes, in-process: ``ksm.advise(obj)`` and numpy's allocator hook."""

from __future__ import annotations

import errno
import gc
import json
import mmap as stdlib_mmap
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import PAGE, run_python
from hypothesis import given
from hypothesis import strategies as st

import ksm
from ksm import _advise, _numpy

np = pytest.importorskip("numpy")
try:
    from numpy._core.multiarray import get_handler_name
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import get_handler_name  # type: ignore[no-redef]

MIB = 1 << 20


@pytest.fixture(autouse=True)
def allocator_off() -> Iterator[None]:
    """No handler installed and nothing kept after each test (the tracked-pages check follows)."""
    yield
    ksm.uninstall_numpy_allocator()
    gc.collect()
    _numpy.trim()
    assert _advise.kept() == 0, "ksm.advise still keeps objects after the test"


def sharing() -> int:
    return int(ksm.stats()["pages_sharing"])


# ---- ksm.advise ------------------------------------------------------------------


def test_advise_bytearrays_merge_and_keep_their_bytes() -> None:
    data = bytes(range(256)) * (8 * PAGE // 256)
    a, b = bytearray(data), bytearray(data)
    before = sharing()
    # A bytearray's data is malloc'd: its first and last pages are partial.
    na, nb = ksm.advise(a), ksm.advise(b)
    assert na >= 7 and nb >= 7
    ksm.scan(2)
    assert sharing() - before >= 6
    assert a == data and b == data
    a[PAGE * 3] ^= 0xFF  # a write gets its own copy
    assert b == data and a[PAGE * 3] == data[PAGE * 3] ^ 0xFF
    assert ksm.advise(a, ksm.MADV_UNMERGEABLE) == na
    assert ksm.advise(b, ksm.MADV_UNMERGEABLE) == nb


def test_advise_numpy_arrays_unaligned_data() -> None:
    x = np.full(64 * PAGE // 8, 7.0)
    y = np.full(64 * PAGE // 8, 7.0)
    # What advise() answers: madvise of an ordinary array's data is refused.
    if x.ctypes.data % PAGE:
        with pytest.raises(OSError) as e:
            ksm.madvise(x.ctypes.data, x.nbytes, ksm.MADV_MERGEABLE)
        assert e.value.errno == errno.EINVAL
    start = -(-x.ctypes.data // PAGE) * PAGE
    assert ksm.advise(x) == (x.ctypes.data + x.nbytes) // PAGE - start // PAGE
    ksm.advise(y)
    before = sharing()
    ksm.scan(2)
    assert sharing() - before >= 60
    assert (x == 7.0).all() and (y == 7.0).all()
    ksm.advise(x, ksm.MADV_UNMERGEABLE)
    ksm.advise(y, ksm.MADV_UNMERGEABLE)


def test_advise_private_mmap_and_memoryview() -> None:
    m = stdlib_mmap.mmap(-1, 4 * PAGE, flags=stdlib_mmap.MAP_PRIVATE)
    m[:] = b"z" * (4 * PAGE)
    assert ksm.advise(m) == 4
    with pytest.raises(BufferError):
        m.close()  # exported while advised
    assert ksm.advise(memoryview(m), ksm.MADV_UNMERGEABLE) == 4
    m.close()
    buf = bytearray(10 * PAGE)
    view = memoryview(buf)[PAGE:]
    assert ksm.advise(view) in (8, 9)
    ksm.advise(view, ksm.MADV_UNMERGEABLE)
    view.release()


def test_advise_refuses_read_only_and_shared_memory() -> None:
    with pytest.raises(TypeError, match="read-only"):
        ksm.advise(b"x" * 3 * PAGE)
    ro = np.zeros(4 * PAGE, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        ksm.advise(ro)
    with pytest.raises(TypeError, match="writable buffer"):
        ksm.advise(12345)
    shared = stdlib_mmap.mmap(-1, 4 * PAGE)  # the stdlib's default: MAP_SHARED
    with pytest.raises(ValueError, match="MAP_SHARED") as e:
        ksm.advise(shared)
    assert "MAP_PRIVATE" in str(e.value) and "ksm.mmap" in str(e.value)
    shared.close()  # not kept: closable
    with pytest.raises(OSError) as oe:
        ksm.advise(bytearray(4 * PAGE), 99)
    assert oe.value.errno == errno.EINVAL


def test_advise_file_mapping_is_refused(tmp_path: Any) -> None:
    f = tmp_path / "data"
    f.write_bytes(b"\0" * 4 * PAGE)
    with open(f, "r+b") as fh:
        m = stdlib_mmap.mmap(fh.fileno(), 0, flags=stdlib_mmap.MAP_PRIVATE)
        with pytest.raises(ValueError, match="file"):
            ksm.advise(m)
        m.close()


def test_advise_under_a_page_is_zero() -> None:
    assert ksm.advise(bytearray(100)) == 0
    assert ksm.advise(np.zeros(10)) == 0
    assert ksm.advise(bytearray()) == 0
    assert _advise.kept() == 0


def test_advise_keeps_the_object_alive_until_unmergeable() -> None:
    arr = np.ones(16 * PAGE // 8)
    ref = weakref.ref(arr)
    count = sys.getrefcount(arr)
    ksm.advise(arr)
    assert sys.getrefcount(arr) > count
    del arr
    gc.collect()
    kept = ref()
    assert kept is not None
    ksm.advise(kept, ksm.MADV_UNMERGEABLE)
    del kept
    gc.collect()
    assert ref() is None


def test_bytearray_resize_refused_while_tracked() -> None:
    b = bytearray(8 * PAGE)
    ksm.advise(b)
    with pytest.raises(BufferError):
        b.extend(b"more")
    ksm.advise(b, ksm.MADV_UNMERGEABLE)
    b.extend(b"more")
    assert len(b) == 8 * PAGE + 4


def test_objects_let_go_when_ksm_forgets_the_pages() -> None:
    b = bytearray(8 * PAGE)
    ksm.advise(b)
    ksm.set_memory_merge(True)
    ksm.set_memory_merge(False)  # every advice dropped
    assert _advise.kept() == 0
    b.extend(b"x")
    c = bytearray(8 * PAGE)
    n = ksm.advise(c)
    start = -(-_address(c) // PAGE) * PAGE
    ksm.madvise(start, n * PAGE, ksm.MADV_UNMERGEABLE)  # the raw call over its pages
    assert _advise.kept() == 0


def _address(obj: Any) -> int:
    from conftest import buffer_address

    return buffer_address(obj)


# ---- numpy's allocator -----------------------------------------------------------


def test_handler_name_alignment_and_merging() -> None:
    ksm.install_numpy_allocator()
    a = np.full(MIB // 8 * 2, 3.0)
    b = np.full(MIB // 8 * 2, 3.0)
    small = np.zeros(100)
    assert get_handler_name() == "ksm" and get_handler_name(a) == "ksm"
    assert a.ctypes.data % PAGE == 0 and b.ctypes.data % PAGE == 0
    assert ksm._ksm._numpy_owns(a.ctypes.data) and not ksm._ksm._numpy_owns(small.ctypes.data)
    before = sharing()
    ksm.scan(2)
    assert sharing() - before >= 2 * (2 * MIB // PAGE) - 4
    assert (a == 3.0).all() and (b == 3.0).all()
    a[5] = 1.0
    assert b[5] == 3.0
    ksm.uninstall_numpy_allocator()
    assert get_handler_name() == "default_allocator"
    c = np.full(MIB // 8 * 2, 3.0)
    assert not ksm._ksm._numpy_owns(c.ctypes.data)
    # Arrays made under the handler stay valid after it is gone.
    assert a.sum() == 3.0 * a.size - 2.0 and get_handler_name(a) == "ksm"
    stats = ksm.numpy_allocator_stats()
    assert stats["live_allocations"] == 2 and stats["live_bytes"] == 2 * 2 * MIB
    del a, b
    assert ksm.numpy_allocator_stats()["live_allocations"] == 0


def _anon_huge_kib(addr: int) -> int:
    """``AnonHugePages`` of the mapping holding ``addr`` (kB), from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_merging_inside_transparent_huge_pages() -> None:
    # Arrays of 4 MiB and more ask for huge pages, as numpy's own handler does; a merge
    # maps frames over 4 KiB pages inside them, which splits the huge pages (as the
    # kernel's ksmd does): every byte stays, every write gets its own copy.
    size = 8 * MIB
    pattern = (np.arange(size) % 251).astype(np.uint8)  # pages differ from each other
    with ksm.numpy_allocator(MIB):
        a = np.empty(size, dtype=np.uint8)
        b = np.empty(size, dtype=np.uint8)
    a[:] = pattern
    b[:] = pattern
    if _anon_huge_kib(a.ctypes.data) == 0:
        pytest.skip("no transparent huge page here (setting or fragmentation)")
    before = sharing()
    ksm.scan(2)
    assert sharing() - before >= size // PAGE - 4
    assert _anon_huge_kib(a.ctypes.data) == 0 or _anon_huge_kib(b.ctypes.data) == 0
    assert (a == pattern).all() and (b == pattern).all()
    a[PAGE * 5 + 7] ^= 0xFF
    b[-1] ^= 0xFF
    assert a[PAGE * 5 + 7] == pattern[PAGE * 5 + 7] ^ 0xFF and b[PAGE * 5 + 7] == pattern[PAGE * 5 + 7]
    assert b[-1] == pattern[-1] ^ 0xFF and a[-1] == pattern[-1]
    del a, b
    assert ksm.numpy_allocator_stats()["live_allocations"] == 0


def test_large_arrays_cost_no_records_until_scanned() -> None:
    # Records are created when the scan first changes a page's: making and dropping a
    # large array costs the same whatever its size, and no write tracking starts
    # before a scan reaches it.
    ksm.scan(1)
    meta = int(ksm.stats()["metadata_bytes"])
    with ksm.numpy_allocator(MIB):
        a = np.empty(256 * MIB, dtype=np.uint8)
    assert ksm._ksm._numpy_owns(a.ctypes.data)
    assert int(ksm.stats()["metadata_bytes"]) - meta < 4096
    assert ksm._ksm._advised_pages(a.ctypes.data, a.nbytes) == a.nbytes // PAGE
    a[:: 2 * PAGE] = 1  # half the pages written
    ksm.scan(1)
    assert int(ksm.stats()["metadata_bytes"]) - meta >= 8 * (a.nbytes // PAGE)
    assert (a[:: 2 * PAGE] == 1).all() and not a[PAGE :: 2 * PAGE].any()
    before = int(ksm.stats()["advised_pages"])
    del a
    assert before - int(ksm.stats()["advised_pages"]) == 256 * MIB // PAGE
    assert int(ksm.stats()["metadata_bytes"]) - meta < 4096


@pytest.mark.parametrize("before", ["untouched", "written", "merged", "read"])
def test_zeros_from_a_kept_block(before: str) -> None:
    # A kept block is cleared where it may hold bytes only (pages never written read as
    # zeros already); merged pages are cleared too, never read through to a frame.
    size = 8 * MIB
    with ksm.numpy_allocator(MIB):
        a = np.empty(size, dtype=np.uint8)
        if before == "written":
            a[:: 3 * PAGE] = 7
            a[-1] = 7
        elif before == "merged":
            shared = sharing()
            a[:] = 5
            ksm.scan(2)
            assert sharing() - shared >= size // PAGE // 2
        elif before == "read":
            assert not a[::PAGE].any()
        hits = ksm.numpy_allocator_stats()["cache_hits"]
        del a
        z = np.zeros(size, dtype=np.uint8)
        assert ksm.numpy_allocator_stats()["cache_hits"] == hits + 1
        assert not z.any()
        z[1] = 1
        assert z.sum() == 1


def test_calloc_and_realloc() -> None:
    with ksm.numpy_allocator(MIB):
        z = np.zeros(MIB)  # calloc: zeros, also from a reused block
        assert not z.any()
        z[:] = 9
        del z
        z = np.zeros(MIB)
        assert not z.any()
        r = np.arange(MIB // 8, dtype=np.int64)
        r.resize(MIB // 2, refcheck=False)  # realloc to a larger ksm block
        assert (r[: MIB // 8] == np.arange(MIB // 8)).all() and not r[MIB // 8 :].any()
        r.resize(10, refcheck=False)  # below min_bytes: moves to numpy's default
        assert (r == np.arange(10)).all()
        assert not ksm._ksm._numpy_owns(r.ctypes.data)
        d = np.arange(10, dtype=np.int64)  # numpy's memory, grown by the handler
        d.resize(MIB, refcheck=False)
        assert (d[:10] == np.arange(10)).all()


def test_fallback_when_ksm_memory_cannot_be_had() -> None:
    before = ksm.numpy_allocator_stats()["fallbacks"]
    _numpy.trim()
    ksm._ksm._inject("anonymous", 1, errno.ENOMEM)
    try:
        with ksm.numpy_allocator():
            a = np.ones(2 * MIB)
    finally:
        ksm._ksm._inject("anonymous", 0, 0)
    stats = ksm.numpy_allocator_stats()
    assert stats["fallbacks"] == before + 1 and stats["last_fallback_errno"] == errno.ENOMEM
    assert a.sum() == 2 * MIB and not ksm._ksm._numpy_owns(a.ctypes.data)


def test_fallback_where_ksm_is_unavailable() -> None:
    out = run_python(
        """
        import json, ksm, numpy as np
        ksm.install_numpy_allocator()
        a = np.ones(1 << 20)
        print(json.dumps([ksm.available(), float(a.sum()), ksm.numpy_allocator_stats()["fallbacks"]]))
        """,
        env={"KSM_DISABLE_USERFAULTFD": "1"},
    )
    assert json.loads(out) == [False, float(1 << 20), 1]


def test_new_threads_get_the_installed_handler_not_the_context_managers() -> None:
    names: list[str | None] = []

    def record() -> None:
        names.append(get_handler_name())

    with ksm.numpy_allocator():
        t = threading.Thread(target=record)
        t.start()
        t.join()
    ksm.install_numpy_allocator()
    t = threading.Thread(target=record)
    t.start()
    t.join()
    ksm.uninstall_numpy_allocator()
    t = threading.Thread(target=record)
    t.start()
    t.join()
    assert names == ["default_allocator", "ksm", "default_allocator"]


def test_bad_min_bytes() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        ksm.install_numpy_allocator(-1)
    with pytest.raises(TypeError):
        ksm.install_numpy_allocator("1M")  # type: ignore[arg-type]
    with pytest.raises(TypeError), ksm.numpy_allocator(1.5):  # type: ignore[arg-type]
        pass
    assert not _numpy.installed()


# ---- the model: every array's bytes as plain numpy's ------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.sampled_from(["empty", "zeros", "ones", "arange"]), st.integers(1, 600)),
        st.tuples(st.just("resize_method"), st.integers(0, 15), st.integers(1, 600)),
        st.tuples(st.just("np_resize"), st.integers(0, 15), st.integers(1, 600)),
        st.tuples(st.just("view"), st.integers(0, 15), st.integers(0, 50)),
        st.tuples(st.just("write"), st.integers(0, 15), st.integers(0, 255)),
        st.tuples(st.just("free"), st.integers(0, 15), st.just(0)),
        st.tuples(st.just("toggle"), st.sampled_from([0, 4096, 65536]), st.just(0)),
    ),
    max_size=40,
)


@given(ops=OPS)
def test_model_numpy_allocations_keep_their_bytes(ops: list[tuple[str, Any, int]]) -> None:
    arrays: list[Any] = []  # (array under test)
    model: list[Any] = []  # the same array, made by plain numpy
    installed = False
    try:
        for op, a, b in ops:
            if op == "toggle":
                if installed:
                    ksm.uninstall_numpy_allocator()
                else:
                    ksm.install_numpy_allocator(a)
                installed = not installed
            elif op == "new":
                n = b * 1024  # 1 KiB .. 600 KiB of int64s: both sides of min_bytes
                make: Callable[[int], Any] = {
                    "empty": lambda n: np.zeros(n, np.int64),  # contents of empty are unknown: zero both
                    "zeros": lambda n: np.zeros(n, np.int64),
                    "ones": lambda n: np.ones(n, np.int64),
                    "arange": lambda n: np.arange(n, dtype=np.int64),
                }[a]
                arrays.append(make(n // 8))
                with ksm.numpy_allocator(1 << 40):  # the model: never ksm
                    model.append(make(n // 8))
            elif not arrays:
                continue
            elif op in ("resize_method", "np_resize", "view", "write", "free"):
                i = a % len(arrays)
                if op == "resize_method":
                    arrays[i] = arrays[i].copy()
                    arrays[i].resize(b * 128, refcheck=False)
                    model[i] = model[i].copy()
                    model[i].resize(b * 128, refcheck=False)
                elif op == "np_resize":
                    arrays[i] = np.resize(arrays[i], b * 128)
                    model[i] = np.resize(model[i], b * 128)
                elif op == "view":
                    arrays.append(arrays[i][b:])
                    model.append(model[i][b:])
                elif op == "write":
                    arrays[i][::97] = b
                    model[i][::97] = b
                else:
                    arrays.pop(i)
                    model.pop(i)
            for x, y in zip(arrays, model, strict=True):
                assert x.shape == y.shape and (x == y).all()
        ksm.scan(2)
        for x, y in zip(arrays, model, strict=True):
            assert (x == y).all()
    finally:
        ksm.uninstall_numpy_allocator()
        del arrays, model
        gc.collect()
        _numpy.trim()
