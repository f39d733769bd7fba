"""When merging cannot work (no userfaultfd), ksm says why and MADV_MERGEABLE fails like CONFIG_KSM=n.

The environment variable KSM_DISABLE_USERFAULTFD=1, read when ksm is
imported, simulates that; it runs in a fresh interpreter.
"""

from __future__ import annotations

import json

from conftest import run_python

import ksm

SCENARIO = """
import errno, json
import ksm

out = {"available": ksm.available(), "reason": ksm.unavailable_reason()}
with ksm.mmap(4 * ksm.PAGE_SIZE) as m:
    m[:] = b"x" * len(m)
    try:
        m.madvise(ksm.MADV_MERGEABLE)
        out["mmap_madvise"] = None
    except OSError as exc:
        out["mmap_madvise"] = exc.errno
    try:
        ksm.madvise(m.address, len(m), ksm.MADV_MERGEABLE)
        out["madvise"] = None
    except OSError as exc:
        out["madvise"] = exc.errno
    ksm.madvise(m.address, len(m), ksm.MADV_UNMERGEABLE)  # nothing to undo: fine
    ksm.scan(2)
    out["stats"] = ksm.stats()
    out["intact"] = m[:] == b"x" * len(m)
    out["state"] = m.page_state(0)
out["einval"] = errno.EINVAL
print(json.dumps(out))
"""


def test_disabled_userfaultfd_makes_merging_unavailable() -> None:
    out = json.loads(run_python(SCENARIO, env={"KSM_DISABLE_USERFAULTFD": "1"}))
    assert out["available"] is False
    reason = out["reason"]
    assert isinstance(reason, str) and len(reason) > 20
    assert "KSM_DISABLE_USERFAULTFD" in reason  # says what to do
    assert out["mmap_madvise"] == out["einval"]
    assert out["madvise"] == out["einval"]
    assert out["intact"]
    assert out["state"] == "unmerged"
    s = out["stats"]
    assert (s["pages_shared"], s["pages_sharing"], s["rmap_items"], s["advised_pages"]) == (0, 0, 0, 0)


def test_zero_or_empty_variable_keeps_merging_available() -> None:
    code = "import ksm; print(ksm.available(), ksm.unavailable_reason())"
    for value in ("0", ""):
        assert run_python(code, env={"KSM_DISABLE_USERFAULTFD": value}).split() == ["True", "None"]


def test_available_in_this_process() -> None:
    assert ksm.available()
    assert ksm.unavailable_reason() is None
