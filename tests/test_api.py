"""The public surface as a user meets it: ``dir(ksm)``, ``help()`` on every name, the
one table of knobs, and ``ksm.mmap_of``."""

from __future__ import annotations

import inspect
import pydoc
import types

import pytest

import ksm
from ksm import _knobs, _ksm

_CONSTANTS = {"MADV_MERGEABLE", "MADV_UNMERGEABLE", "PAGE_SIZE", "__version__"}


def _doc(obj: object) -> str:
    return inspect.getdoc(obj) or ""


@pytest.mark.parametrize("name", sorted(set(ksm.__all__) - _CONSTANTS))
def test_every_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(ksm, name)
    doc = _doc(type(obj) if name == "ksmd" else obj)
    assert len(doc) > 20, f"ksm.{name} has no docstring: help(ksm.{name}) shows nothing"


@pytest.mark.parametrize("name", ["stats", "wait_settled", "ksm_stat", "available", "unavailable_reason"])
def test_help_shows_the_compiled_functions_text(name: str) -> None:
    # These live in the compiled core: their text must be on the runtime object, not
    # only in the type stub.
    text = pydoc.plain(pydoc.render_doc(getattr(ksm, name)))
    assert len(_doc(getattr(_ksm, name))) > 40, name
    assert _doc(getattr(_ksm, name)).splitlines()[0] in text


def test_compiled_functions_keep_their_signatures() -> None:
    assert str(inspect.signature(ksm.wait_settled)) == "(timeout=None)"
    # A Python wrapper (it also lets go of objects ksm.advise keeps): same parameter.
    assert list(inspect.signature(ksm.set_memory_merge).parameters) == ["enable"]


def _public(cls: type) -> list[str]:
    return [n for n in dir(cls) if not n.startswith("_")]


def test_every_public_method_of_mmap_has_a_docstring() -> None:
    names = _public(ksm.mmap)
    assert {"madvise", "page_state", "close", "address", "closed"} <= set(names), names
    for name in names:
        assert len(_doc(getattr(ksm.mmap, name))) > 10, f"ksm.mmap.{name} has no docstring"
    assert len(_doc(ksm.mmap)) > 40


def test_the_ksmd_proxy_documents_every_knob_and_statistic() -> None:
    doc = _doc(ksm.Ksmd)
    for name in (*_knobs.KNOB_NAMES, *_knobs.STATISTIC_NAMES):
        assert f"{name} " in doc or f"{name}:" in doc, f"help(ksm.ksmd) does not mention {name}"
    for name in _public(ksm.Ksmd):
        assert _doc(getattr(ksm.Ksmd, name)), f"ksm.Ksmd.{name} has no docstring"
    assert _doc(type(_ksm.ksmd))


def test_dir_shows_the_public_api_only() -> None:
    for name in dir(ksm):
        if name.startswith("_"):
            continue
        obj = getattr(ksm, name)
        is_submodule = isinstance(obj, types.ModuleType) and obj.__name__ == f"ksm.{name}"
        assert name in ksm.__all__ or is_submodule, f"dir(ksm) shows {name!r}, which is not public API"
    for name in ksm.__all__:
        assert hasattr(ksm, name), name


def test_one_table_of_knobs_agrees_with_the_core() -> None:
    # The core's own order (dir() would sort it): the kernel's knobs, ksm's, statistics.
    core = type(_ksm.ksmd).__dir__(_ksm.ksmd)
    assert list(core) == [*_knobs.KNOB_NAMES, *_knobs.STATISTIC_NAMES]
    assert sorted(dir(ksm.ksmd)) == sorted(core)
    # The typed attributes of the proxy (for mypy and IDEs) are the same names.
    assert list(ksm.Ksmd.__annotations__) == [*_knobs.KNOB_NAMES, *_knobs.STATISTIC_NAMES]
    own = [k.name for k in _knobs.KNOBS if k.own]
    assert own == ["vma_reserve", "write_tracking", "hash_threads"]
    # Defaults the table states as a number (the conftest fixture restored them).
    for k in _knobs.KNOBS:
        if k.default.isdigit():
            assert getattr(ksm.ksmd, k.name) == int(k.default), k
        elif k.default.startswith("'"):
            assert getattr(ksm.ksmd, k.name) == k.default.strip("'"), k


def test_mmap_of_finds_the_memory_behind_an_array() -> None:
    np = pytest.importorskip("numpy")
    a = ksm.zeros((8, ksm.PAGE_SIZE // 8))
    m = ksm.mmap_of(a)
    assert isinstance(m, ksm.mmap)
    assert m.address == a.ctypes.data and len(m) == a.nbytes
    assert ksm.mmap_of(a[::2]) is m and ksm.mmap_of(a[3]) is m and ksm.mmap_of(a.T) is m
    assert ksm.mmap_of(m) is m and ksm.mmap_of(memoryview(m)[5:]) is m
    a[:] = 1.0
    ksm.scan(2)
    assert m.page_state(0) == "merged"
    with pytest.raises(ValueError, match=r"not backed by a ksm\.mmap"):
        ksm.mmap_of(np.zeros(4))
    with pytest.raises(ValueError, match=r"not backed by a ksm\.mmap"):
        ksm.mmap_of(bytearray(10))
    del a
