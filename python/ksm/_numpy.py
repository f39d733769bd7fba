"""numpy's allocator hook (NEP 49): array data in ksm memory, with no change to the program.

numpy keeps its memory handler in a context variable: ``PyDataMem_SetHandler``
sets it for the current context only. What each place gets:

- the thread (context) that installs it: every array from then on;
- asyncio tasks created afterwards from that context: the same (a task copies
  the context it is created in);
- new threads: Python starts each thread in an empty context, where numpy's
  default applies. ``install_numpy_allocator`` therefore also sets the handler
  at the start of every thread started through ``threading`` afterwards (with
  ``threading.setprofile``: a one-shot hook that puts back any profile hook set
  before it); threads started otherwise (``_thread``, C code) get numpy's default;
- ``numpy_allocator()``: the ``with`` block's context only, no other thread.

Arrays keep the handler they were made under: one made under ksm's handler is
freed (and resized) by it even after the handler is uninstalled.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import operator
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from . import _ksm

DEFAULT_MIN_BYTES = 1 << 20

_lock = threading.RLock()
# What install_numpy_allocator set: the handler, and what it replaced.
_installed: tuple[Any, Any] | None = None
# The profile hook of `threading` before ours (put back in each thread, and at uninstall).
_previous_thread_hook: Any = None
_thread_hook_set = False


def _min_bytes(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"min_bytes must be an int (bytes), not {type(value).__name__}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"min_bytes must be an int (bytes), not {type(value).__name__}") from None
    if n < 0:
        raise ValueError(f"min_bytes must be 0 or more, got {n}")
    return n


def _array_api() -> Any:
    """numpy's C-API table capsule; ModuleNotFoundError or RuntimeError saying why not."""
    try:
        import numpy
    except ImportError as e:
        raise ModuleNotFoundError(
            "ksm's numpy allocator needs numpy, which is not installed: pip install 'ksm[numpy]'",
            name="numpy",
        ) from e
    version = tuple(int(p) for p in numpy.__version__.split(".")[:2] if p.isdigit())
    if version < (1, 22):
        raise RuntimeError(
            f"ksm's numpy allocator needs numpy 1.22 or later (NEP 49), found {numpy.__version__}"
        )
    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:
        umath = importlib.import_module("numpy.core._multiarray_umath")  # numpy 1.x
    return umath._ARRAY_API


def _set_max_live() -> None:
    """Cap the live ksm allocations (one VMA each at least) at half of what merging's VMA budget leaves."""
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        reserve = int(_ksm.ksmd.vma_reserve)
    except (OSError, ValueError):
        return
    _ksm._numpy_set_max_live(max(0, (limit - reserve) // 2))


def _follow_hugepage_setting() -> None:
    """Ask for huge pages for large arrays as numpy's default handler does, if it does."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")  # numpy 1.x
    get = getattr(multiarray, "_get_madvise_hugepage", None)
    if get is not None:
        _ksm._numpy_set_hugepages(bool(get()))


def handler(min_bytes: int = DEFAULT_MIN_BYTES) -> Any:
    """The capsule of ksm's handler for arrays of at least ``min_bytes`` (tests, advanced use)."""
    api = _array_api()
    _follow_hugepage_setting()
    return _ksm._numpy_handler(api, _min_bytes(min_bytes))


def _set(h: Any) -> Any:
    return _ksm._numpy_set_handler(_array_api(), h)


def _thread_start(frame: FrameType, event: str, arg: Any) -> Any:
    """One-shot profile hook: the first event of a new thread sets the handler there."""
    prev = _previous_thread_hook
    sys.setprofile(prev)
    with contextlib.suppress(Exception):  # never break the user's thread
        current = _installed
        if current is not None:
            _set(current[0])
    if prev is not None:
        return prev(frame, event, arg)
    return None


def install_numpy_allocator(min_bytes: int = DEFAULT_MIN_BYTES) -> None:
    n = _min_bytes(min_bytes)
    global _installed, _previous_thread_hook, _thread_hook_set
    with _lock:
        h = handler(n)
        _set_max_live()
        previous = _set(h)
        if _installed is not None:
            previous = _installed[1]  # installing again keeps what the first install replaced
        _installed = (h, previous)
        if not _thread_hook_set:
            _previous_thread_hook = threading.getprofile()
            threading.setprofile(_thread_start)
            _thread_hook_set = True


def uninstall_numpy_allocator() -> None:
    global _installed, _thread_hook_set, _previous_thread_hook
    with _lock:
        if _installed is None:
            return
        _set(_installed[1])
        _installed = None
        _ksm._numpy_trim()
        if _thread_hook_set:
            if threading.getprofile() is _thread_start:
                threading.setprofile(_previous_thread_hook)
            _thread_hook_set = False
            _previous_thread_hook = None


@contextlib.contextmanager
def numpy_allocator(min_bytes: int = DEFAULT_MIN_BYTES) -> Iterator[None]:
    h = handler(min_bytes)
    _set_max_live()
    previous = _set(h)
    try:
        yield
    finally:
        _set(previous)


def numpy_allocator_stats() -> dict[str, int]:
    return dict(_ksm._numpy_allocator_stats())


def trim() -> int:
    """Give back the freed blocks kept for reuse (up to 64 MiB); how many there were."""
    return int(_ksm._numpy_trim())


def installed() -> bool:
    """Whether ``install_numpy_allocator`` is in effect."""
    return _installed is not None


# ---- installing when numpy is first imported ------------------------------------


class _Watcher(importlib.abc.MetaPathFinder):
    """Installs the allocator right after numpy is imported (numpy is not imported for it)."""

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "numpy":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        exec_module = getattr(loader, "exec_module", None)
        if spec is None or loader is None or exec_module is None:
            return spec
        min_bytes = self.min_bytes

        def exec_then_install(module: ModuleType) -> None:
            exec_module(module)
            _install_quietly(min_bytes)

        loader.exec_module = exec_then_install  # type: ignore[method-assign]
        return spec


def _install_quietly(min_bytes: int) -> None:
    try:
        install_numpy_allocator(min_bytes)
    except Exception as e:  # never break the program's import of numpy
        print(f"ksm: numpy's allocator not installed: {e}", file=sys.stderr)


def install_when_imported(min_bytes: int) -> None:
    """Install now if numpy is imported, else right after it is."""
    if "numpy" in sys.modules:
        _install_quietly(min_bytes)
        return
    if not any(isinstance(f, _Watcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _Watcher(min_bytes))
