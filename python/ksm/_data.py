"""Real data laid out page-aligned, as a page cache holds files: the data sets of
``ksm demo`` (the standard library) and ``ksm bench`` (the standard library and
site-packages)."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class DataSet:
    """The stdlib files laid out page-aligned in one buffer."""

    data: bytearray
    files: int
    file_bytes: int
    root: str


def _stdlib_files(root: str) -> list[str]:
    """Regular files under `root`, sorted by path.

    Leaves out installed third-party packages (site-packages) and the build
    configuration (config-*/, which holds a static libpython of tens of MiB that
    would otherwise be most of the data set).
    """
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _e: None):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in ("site-packages", "dist-packages")
            and not (dirpath == root and d.startswith("config-"))
        ]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found.append(path)
    found.sort()
    return found


def load_stdlib(limit: int, page: int) -> DataSet:
    """Up to `limit` bytes of stdlib files, each starting on a page boundary.

    The last file is cut so the data set is exactly `limit` bytes when the
    standard library is big enough; otherwise it is all of it.
    """
    root = sysconfig.get_paths()["stdlib"]
    data, files, file_bytes = pack_files(_stdlib_files(root), limit, page)
    return DataSet(data=data, files=files, file_bytes=file_bytes, root=root)


def pack_files(paths: Iterable[str], limit: int, page: int) -> tuple[bytearray, int, int]:
    """Up to `limit` bytes of the files at `paths`, each starting on a page boundary
    as a page cache holds them; (data, files read, bytes of file contents)."""
    data = bytearray()
    files = 0
    file_bytes = 0
    for path in paths:
        if len(data) >= limit:
            break
        try:
            with open(path, "rb") as f:
                content = f.read(limit - len(data))
        except OSError:
            continue
        if not content:
            continue
        data += content
        data += bytes(-len(data) % page)
        files += 1
        file_bytes += len(content)
    del data[limit:]
    return data, files, file_bytes
